#!/usr/bin/env bash
# Pretrain on one host with several GPUs: a single process drives every visible GPU (data parallel, or FSDP
# with --config.mesh.fsdp=N).
#
#   scripts/multi_gpu.sh [extra launch.py flags...]
#   CUDA_VISIBLE_DEVICES=0,1,2,3 scripts/multi_gpu.sh --config.batch_size=256
#   DRY_RUN=1 scripts/multi_gpu.sh                       # print the command only
#
# Environment: PRESET (default usf_mae), DATA (shard root), WORKDIR, VENV (.venv).
set -euo pipefail
PRESET=${PRESET:-usf_mae}
DATA=${DATA:-data/openus46}
WORKDIR=${WORKDIR:-runs/usf_mae_multi_gpu}
VENV=${VENV:-.venv}
CMD=("${VENV}/bin/python" launch.py "--config=configs/pretrain.py:${PRESET}" "--workdir=${WORKDIR}"
     "--config.input.data_dir=${DATA}" "--config.model.attention=cudnn" "--config.input.num_threads=16" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"
  echo
else
  XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92} "${CMD[@]}"
fi
