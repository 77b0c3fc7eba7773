# Sourced first by every experiments/<slug>/run.sh (from the repo root). It records which variables
# the caller set (so experiments/ablate.py can write the exact command into LOG.md), then sets the
# size and step knobs of the chosen PROFILE. A profile only changes sizes and step counts, never what
# an arm means. A value you set yourself wins: `PROFILE=cpu ITERATIONS=40 bash experiments/quant/run.sh`.
#
#   PROFILE=pod (default)  production sizes (the Hyperparameters defaults) on FineWeb sp1024, GPU pod;
#                          the 600 s wallclock cap applies unless PROXY=1 (500 steps, no cap)
#   PROFILE=cpu            a tiny model on the bundled corpus, fixed step count: about a minute per run
#                          on 2 CPU cores (set OMP_NUM_THREADS when the cores are shared)

export ABLATE_CALLER_VARS="$(compgen -e | tr '\n' ' ')"
export PROFILE="${PROFILE:-pod}"

case "$PROFILE" in
  pod)
    # Curves: a validation on 2M tokens every 250 steps (not counted in the training time);
    # the final scores always use the whole validation split.
    export VAL_LOSS_EVERY="${VAL_LOSS_EVERY:-250}"
    export VAL_MAX_TOKENS="${VAL_MAX_TOKENS:-2097152}"
    ;;
  cpu)
    if ! ls data/datasets/local_sp1024/*_val_*.bin >/dev/null 2>&1; then
      "${PYTHON:-python3}" data/prepare_local.py
    fi
    export DATA_PATH="${DATA_PATH:-data/datasets/local_sp1024}"
    export TOKENIZER_PATH="${TOKENIZER_PATH:-data/tokenizers/local_1024_bpe.model}"
    export MODEL_DIM="${MODEL_DIM:-64}"
    export NUM_HEADS="${NUM_HEADS:-4}"
    export NUM_KV_HEADS="${NUM_KV_HEADS:-2}"
    export ROPE_DIMS="${ROPE_DIMS:-8}"
    export TRAIN_SEQ_LEN="${TRAIN_SEQ_LEN:-128}"
    export EVAL_SEQ_LEN="${EVAL_SEQ_LEN:-128}"
    export EVAL_STRIDE="${EVAL_STRIDE:-64}"
    export TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-4096}"
    export ACCUM_SPLITS="${ACCUM_SPLITS:-1}"
    export ITERATIONS="${ITERATIONS:-80}"
    export MAX_WALLCLOCK_SECONDS="${MAX_WALLCLOCK_SECONDS:-0}"
    export WARMDOWN_ITERS="${WARMDOWN_ITERS:-30}"
    export MUON_MOMENTUM_WARMUP_STEPS="${MUON_MOMENTUM_WARMUP_STEPS:-30}"
    export VAL_LOSS_EVERY="${VAL_LOSS_EVERY:-20}"    # on the whole (small) validation split: one curve
    export VAL_BATCH_SIZE="${VAL_BATCH_SIZE:-16384}"
    export TRAIN_LOG_EVERY="${TRAIN_LOG_EVERY:-10}"
    export GPTQ_CALIB_BATCHES="${GPTQ_CALIB_BATCHES:-4}"
    ;;
  *)
    echo "PROFILE=$PROFILE: expected pod or cpu" >&2
    exit 2
    ;;
esac
