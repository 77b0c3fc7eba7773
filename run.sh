#!/usr/bin/env bash
# The main job. With CUDA: the production config under torchrun on FineWeb sp1024.
# Without CUDA: the CPU demo profile on the shipped demo corpus (<= 10 minutes on 2 cores).
# Either way the run ends with its records folder (experiments/records.py). Any variable you set overrides
# the profile. DRY_RUN=1: the cost model only (experiments/cost_model.py). REHEARSAL=1 (no CUDA): the
# production code path at production shapes in minutes (experiments/rehearsal.py).
# First it finds or makes a Python with the project's requirements (.ci/bootstrap.sh: PYTHON, the active
# venv, .venv, or a new .venv) and runs everything below with it.
set -euo pipefail
cd "$(dirname "$0")"
. .ci/bootstrap.sh
bootstrap_python run.sh || exit 1
PY=$PYTHON

# PROFILE=record_0405|record_0427: a published record's recipe through our knobs (experiments/profile.sh).
case "${PROFILE:-}" in record_*) . experiments/profile.sh ;; esac
case "${DRY_RUN:-0}" in
  1|true|yes|on)
    echo "run.sh: DRY_RUN: the config's parameters, depth, estimated artifact bytes and pod cost"
    exec "$PY" experiments/cost_model.py ;;
esac

rehearsal=0
case "${REHEARSAL:-0}" in 1|true|yes|on) rehearsal=1 ;; esac
unset DRY_RUN REHEARSAL   # run.sh's switches, not train_gpt.py's knobs
# The run's id names its log, artifact and records folder; chosen here so the records step can find them.
export RUN_ID="${RUN_ID:-$(date +%Y%m%d_%H%M%S)_$$}"
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$gpus" -gt 0 ]; then
  echo "run.sh: $gpus CUDA device(s): production config under torchrun on FineWeb sp1024"
  if ! ls data/datasets/fineweb10B_sp1024/fineweb_val_*.bin >/dev/null 2>&1; then
    bash setup_pod.sh
  fi
  torchrun --standalone --nproc_per_node="$gpus" train_gpt.py
elif [ "$rehearsal" = 1 ]; then
  if ! ls data/datasets/fineweb10B_sp1024/fineweb_val_*.bin >/dev/null 2>&1; then
    "$PY" data/prepare_local.py >/dev/null
    export DATA_PATH=${DATA_PATH:-data/datasets/local_sp1024} TOKENIZER_PATH=${TOKENIZER_PATH:-data/tokenizers/local_1024_bpe.model}
  fi
  echo "run.sh: REHEARSAL without CUDA: the production config, 2 steps, on ${DATA_PATH:-FineWeb}"
  PROFILE=rehearsal
  . experiments/profile.sh
  exec "$PY" experiments/rehearsal.py
elif [[ "${PROFILE:-}" == record_* ]]; then
  "$PY" data/prepare_local.py >/dev/null
  export DATA_PATH=${DATA_PATH:-data/datasets/local_sp1024} TOKENIZER_PATH=${TOKENIZER_PATH:-data/tokenizers/local_1024_bpe.model}
  echo "run.sh: no CUDA device: PROFILE=$PROFILE at MODEL_DIM=$MODEL_DIM on $DATA_PATH (set the size knobs to scale it)"
  "$PY" train_gpt.py
else
  echo "run.sh: no CUDA device: running the CPU demo profile on the shipped demo corpus (experiments/profile.sh)"
  PROFILE=demo
  . experiments/profile.sh
  "$PY" train_gpt.py
fi
"$PY" experiments/records.py "${LOG_DIR:-logs}/$RUN_ID.json"
