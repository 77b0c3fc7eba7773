#!/usr/bin/env bash
# Pod setup, safe to re-run: Python packages, FlashAttention 3 on Hopper, checks, FineWeb data.
set -euo pipefail
cd "$(dirname "$0")"
# requirements.txt into the interpreter run.sh uses too (PYTHON, the active venv, .venv or python3).
. .ci/bootstrap.sh
bootstrap_python setup_pod || exit 1
PY=$PYTHON

is_hopper() {
  $PY - <<'PYEOF'
import sys, torch
sys.exit(0 if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 else 1)
PYEOF
}
if is_hopper; then
  if ! $PY -c "import flash_attn_interface" 2>/dev/null; then
    # Override FA3_PIP_ARGS with the wheel that matches your torch/CUDA if this one does not.
    FA3_PIP_ARGS=${FA3_PIP_ARGS:-"flash_attn_3 --find-links https://download.pytorch.org/whl/cu128/flash_attn_3/"}
    echo "setup_pod: trying FlashAttention 3: pip install $FA3_PIP_ARGS"
    $PY -m pip install -q $FA3_PIP_ARGS || echo "setup_pod: FA3 install failed"
  fi
  if $PY -c "import flash_attn_interface" 2>/dev/null; then
    echo "setup_pod: FlashAttention 3 active"
  else
    echo "setup_pod: FlashAttention 3 NOT active: train_gpt.py will use PyTorch SDPA (slower)"
  fi
else
  echo "setup_pod: no Hopper GPU: FlashAttention 3 not needed"
fi

$PY -c "import zstandard, brotli, sentencepiece, huggingface_hub" \
  || { echo "setup_pod: a required package failed to import (see above)" >&2; exit 1; }
echo "setup_pod: zstandard, brotli, sentencepiece, huggingface_hub import fine"

$PY data/cached_challenge_fineweb.py --train-shards "${TRAIN_SHARDS:-80}"
echo "setup_pod: done"
