#!/usr/bin/env bash
# The main job. With CUDA: the production config under torchrun on FineWeb sp1024.
# Without CUDA: the CPU demo profile on the bundled corpus (<= 10 minutes on 2 cores).
# Any variable you set overrides the profile.
# First it finds or makes a Python with requirements.txt installed (.ci/bootstrap.sh: PYTHON, the
# active venv, .venv, or a new .venv) and runs everything below with it.
set -euo pipefail
cd "$(dirname "$0")"
. .ci/bootstrap.sh
bootstrap_python run.sh || exit 1
PY=$PYTHON

case "${DRY_RUN:-0}" in
  1|true|yes|on)
    echo "run.sh: DRY_RUN: the production config's parameters, depth and estimated artifact bytes"
    exec "$PY" train_gpt.py ;;
esac

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$gpus" -gt 0 ]; then
  echo "run.sh: $gpus CUDA device(s): production config under torchrun on FineWeb sp1024"
  if ! ls data/datasets/fineweb10B_sp1024/fineweb_val_*.bin >/dev/null 2>&1; then
    bash setup_pod.sh
  fi
  exec torchrun --standalone --nproc_per_node="$gpus" train_gpt.py
fi

case "${REHEARSAL:-0}" in
  1|true|yes|on)   # the pod's code path at production shapes, on whatever shards are here
    if ! ls data/datasets/fineweb10B_sp1024/fineweb_val_*.bin >/dev/null 2>&1; then
      "$PY" data/prepare_local.py >/dev/null
      export DATA_PATH=${DATA_PATH:-data/datasets/local_sp1024} TOKENIZER_PATH=${TOKENIZER_PATH:-data/tokenizers/local_1024_bpe.model}
    fi
    echo "run.sh: REHEARSAL without CUDA: the production config, 2 steps, on ${DATA_PATH:-FineWeb}"
    exec "$PY" train_gpt.py ;;
esac

echo "run.sh: no CUDA device: running the CPU demo profile on the bundled corpus (experiments/profile.sh)"
PROFILE=demo
. experiments/profile.sh
exec "$PY" train_gpt.py
