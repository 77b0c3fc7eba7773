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

echo "run.sh: no CUDA device: running the CPU demo profile on the bundled corpus"
"$PY" data/prepare_local.py
# ---- CPU demo profile: edit the values here (a variable set by the caller still wins) ----
export DATA_PATH=${DATA_PATH:-data/datasets/local_sp1024}
export TOKENIZER_PATH=${TOKENIZER_PATH:-data/tokenizers/local_1024_bpe.model}
export MODEL_DIM=${MODEL_DIM:-128}
export NUM_HEADS=${NUM_HEADS:-4}
export NUM_KV_HEADS=${NUM_KV_HEADS:-2}
export NUM_FLAT_LAYERS=${NUM_FLAT_LAYERS:-2}
export NUM_CRAWLER_LAYERS=${NUM_CRAWLER_LAYERS:-1}
export CRAWLER_LOOPS=${CRAWLER_LOOPS:-2}
export ROPE_DIMS=${ROPE_DIMS:-16}
export TRAIN_SEQ_LEN=${TRAIN_SEQ_LEN:-256}
export EVAL_SEQ_LEN=${EVAL_SEQ_LEN:-256}
export TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-8192}
export ACCUM_SPLITS=${ACCUM_SPLITS:-1}
export ITERATIONS=${ITERATIONS:-400}
export MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-360}
export WARMDOWN_ITERS=${WARMDOWN_ITERS:-150}
export MUON_MOMENTUM_WARMUP_STEPS=${MUON_MOMENTUM_WARMUP_STEPS:-100}
export VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-100}
export TRAIN_LOG_EVERY=${TRAIN_LOG_EVERY:-50}
export VAL_BATCH_SIZE=${VAL_BATCH_SIZE:-65536}
export QUANT_COMPARE=${QUANT_COMPARE:-1}
# ---- end of the CPU demo profile ----
exec "$PY" train_gpt.py
