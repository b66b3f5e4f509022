#!/usr/bin/env bash
# Pretrain on one host with several GPUs: one process per GPU, joined by JAX's distributed runtime on this host
# (docs/accelerators.md). Each process decodes its own slice of the data with its share of the cores, so the
# input pipeline scales with the GPUs instead of sharing one Python interpreter.
#
#   scripts/multi_gpu.sh [extra launch.py flags...]
#   CUDA_VISIBLE_DEVICES=0,1,2,3 scripts/multi_gpu.sh --config.batch_size=1024
#   DRY_RUN=1 NUM_GPUS=8 scripts/multi_gpu.sh            # print the commands only
#
# Environment: PRESET (default usf_mae), DATA (shard root), WORKDIR, VENV (.venv), NUM_GPUS (default: the
# entries of CUDA_VISIBLE_DEVICES, else the GPUs nvidia-smi lists), PORT (coordinator port, default 29500),
# THREADS (grain read threads per process, default: cores / GPUs). Process 0 prints to the terminal; the others
# write WORKDIR/logs/process_<i>.log. SIGTERM and Ctrl-C go to every process; if one fails, the rest are stopped.
set -euo pipefail
PRESET=${PRESET:-usf_mae}
DATA=${DATA:-data/openus46}
WORKDIR=${WORKDIR:-runs/usf_mae_multi_gpu}
VENV=${VENV:-.venv}
PORT=${PORT:-29500}
if [[ -z "${NUM_GPUS:-}" ]]; then
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -r -a visible <<< "${CUDA_VISIBLE_DEVICES}"
    NUM_GPUS=${#visible[@]}
  else
    NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
fi
if [[ "${NUM_GPUS:-0}" -lt 1 ]]; then
  echo "$0: no GPU found (nvidia-smi -L lists none); set NUM_GPUS" >&2
  exit 2
fi
CORES=$(nproc)
THREADS=${THREADS:-$(( CORES / NUM_GPUS > 1 ? CORES / NUM_GPUS : 1 ))}

command_for() {  # the launch command of process $1
  CMD=(env "JAX_LOCAL_DEVICE_IDS=$1" "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
       "${VENV}/bin/python" launch.py "--config=configs/pretrain.py:${PRESET}" "--workdir=${WORKDIR}"
       "--config.input.data_dir=${DATA}" "--config.input.num_threads=${THREADS}"
       "--coordinator_address=127.0.0.1:${PORT}" "--num_processes=${NUM_GPUS}" "--process_id=$1")
}

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  for ((i = 0; i < NUM_GPUS; i++)); do
    command_for "$i"
    printf '%q ' "${CMD[@]}" "$@"
    echo
  done
  exit 0
fi

mkdir -p "${WORKDIR}/logs"
pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap stop TERM INT
for ((i = 0; i < NUM_GPUS; i++)); do
  command_for "$i"
  if [[ $i == 0 ]]; then
    "${CMD[@]}" "$@" &
  else
    "${CMD[@]}" "$@" > "${WORKDIR}/logs/process_${i}.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
while ((${#pids[@]})); do  # the first failure stops the others, which would wait for it in their next collective
  for index in "${!pids[@]}"; do
    if ! kill -0 "${pids[$index]}" 2>/dev/null; then
      wait "${pids[$index]}" || { code=$?; ((status == 0)) && status=$code; stop; }
      unset "pids[$index]"
    fi
  done
  sleep 1
done
exit "$status"
