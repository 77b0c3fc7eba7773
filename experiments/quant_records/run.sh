#!/usr/bin/env bash
# quant_records (issue 23): the records' quantizer options as export-only arms, at a binding cap. One training
# (the CPU proxy's model and steps at the records' vocabulary, sp8192, where the embedding is half the model),
# then every arm exported from the same weights and fitted to the same SIZE_LIMIT on its own, so each difference
# is exact (experiments/compare_exports.py, COMPARE_ARMS). One seed per call; run it per seed and corpus:
#   SEED=1337 bash experiments/quant_records/run.sh
#   SEED=1337 CORPUS=vimdoc bash experiments/quant_records/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export PROFILE=cpu
. experiments/profile.sh
corpus="${CORPUS:-local}"
[ "$corpus" = vimdoc ] && export VAL_FILES='*_val_[0-9]*.bin'   # vimdoc has no held-out pool
export VOCAB_SIZE=8192 DATA_PATH="data/datasets/${corpus}_sp8192" TOKENIZER_PATH="data/tokenizers/${corpus}_8192_bpe.model"
export ITERATIONS="${QR_ITERATIONS:-120}"   # profile.sh set 5000 (its cap is a budget); 120 of the proxy's steps
export SIZE_LIMIT="${SIZE_LIMIT:-1200000}" SIZE_MARGIN="${SIZE_MARGIN:-12000}"   # binds: ~3/4 of its natural bytes
export RUN_ID="quant_records_${corpus}_s${SEED:-1337}" LOG_DIR=experiments/quant_records/results/logs
export ARTIFACT_DIR=experiments/quant_records/results/work RECORDS_DIR=experiments/quant_records/results/work
export COMPARE_ARMS="${COMPARE_ARMS:-embed_gptq:EMBED_GPTQ=1|embed_int7:EMBED_GPTQ=1 EMBED_QUANT=int7|roles:QUANT_ROLES=attn:13,mlp:11.5,embed:14|hessian_clip:HESSIAN_CLIP=0.175|lqer:LQER_RANK=4 LQER_TOP=3}"
exec "${PYTHON:-python3}" experiments/compare_exports.py
