#!/usr/bin/env bash
# Pretrain on every host of a Cloud TPU VM pod slice (e.g. v5p-32, v4-64).
#
#   scripts/tpu_pod.sh TPU_NAME ZONE [extra launch.py flags...]
#   DRY_RUN=1 scripts/tpu_pod.sh my-pod us-central2-b --config.batch_size=1024   # print, do not run
#
# Every host runs the same `python launch.py`; JAX detects the multi-host slice and calls
# jax.distributed.initialize() itself. Data and checkpoints live in a GCS bucket mounted on every host with
# gcsfuse (BUCKET, mounted at MOUNT), so grain and orbax read and write ordinary paths.
# Environment: BUCKET (required), PRESET (default usf_mae), REPO (default the upstream URL in REPO_URL),
# MOUNT (default /gcs), RUN (default usf_mae_pod).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [launch.py flags...]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2
shift 2
: "${BUCKET:?set BUCKET to the GCS bucket holding data/ and runs/}"
PRESET=${PRESET:-usf_mae}
MOUNT=${MOUNT:-/gcs}
RUN=${RUN:-usf_mae_pod}
REPO_URL=${REPO_URL:-https://example.org/usf-mae-jax.git}

read -r -d '' REMOTE <<CMD || true
set -e
sudo mkdir -p ${MOUNT} && (mountpoint -q ${MOUNT} || sudo gcsfuse --implicit-dirs -o allow_other ${BUCKET} ${MOUNT})
[ -d usf-mae-jax ] || git clone ${REPO_URL} usf-mae-jax
cd usf-mae-jax
python3 -m pip install -q -r requirements.txt 'jax[tpu]==0.10.2'
python3 launch.py --config=configs/pretrain.py:${PRESET} --workdir=${MOUNT}/runs/${RUN} --config.input.data_dir=${MOUNT}/data/openus46 $*
CMD

CMD=(gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="${REMOTE}")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"
  echo
else
  "${CMD[@]}"
fi
