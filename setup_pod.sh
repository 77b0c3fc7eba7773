#!/usr/bin/env bash
# Pod setup, safe to re-run: Python packages, FlashAttention 3 on Hopper, checks, FineWeb data.
set -euo pipefail
cd "$(dirname "$0")"
# The requirements into the interpreter run.sh uses too (PYTHON, the active venv, .venv or python3);
# on a GPU that means torch==2.13.0 from PyPI (CUDA 13.0) unless the interpreter already has a torch.
. .ci/bootstrap.sh
bootstrap_python setup_pod || exit 1
bootstrap_gpus setup_pod || exit 1   # a GPU torch cannot use (an older driver than its build's CUDA) stops here
PY=$PYTHON

is_hopper() {
  $PY - <<'PYEOF'
import sys, torch
sys.exit(0 if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 else 1)
PYEOF
}
if is_hopper; then
  if ! $PY -c "import flash_attn_interface" 2>/dev/null; then
    # Pinned: the FlashAttention 3 wheel the 2026-04-05 record's README installs (CUDA 13.0, as
    # the bootstrap's torch==2.13.0 from PyPI). FA3_PIP_ARGS overrides it with the wheel that
    # matches your torch/CUDA if this one does not install or import.
    FA3_PIP_ARGS=${FA3_PIP_ARGS:-"https://download.pytorch.org/whl/cu130/flash_attn_3-3.0.0-cp39-abi3-manylinux_2_28_x86_64.whl"}
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

$PY -c "import brotli, sentencepiece, huggingface_hub" \
  || { echo "setup_pod: a required package failed to import (see above)" >&2; exit 1; }
echo "setup_pod: brotli, sentencepiece, huggingface_hub import fine"

# VARIANT=sp1024|sp4096|sp8192|caseops: the tokenizer's data. Default: the profile's (PROFILE=record_0405: sp8192,
# PROFILE=pod: sp1024), else the pod default's (run.sh: PROFILE=record_0427, CaseOps).
case "${PROFILE:-}" in record_0405) default=sp8192 ;; pod) default=sp1024 ;; *) default=caseops ;; esac
$PY data/cached_challenge_fineweb.py --variant "${VARIANT:-$default}" --train-shards "${TRAIN_SHARDS:-80}"
echo "setup_pod: done"
