#!/usr/bin/env bash
# quant: how the trained model is stored. RTN vs GPTQ vs loop-aware GPTQ (the 2026-11-23 sweep also had int8
# crawler matrices, zstd and lzma: none gained, and issue 21 deleted them; brotli is the only compressor).
# Every arm trains the same model (same seeds); only the export differs, so the deltas are export effects
# plus run-to-run noise. Watch bytes_total beside the bpb: int8 costs bytes.
#   PROFILE=cpu SEEDS=1337 bash experiments/quant/run.sh      # about a minute per run on 2 cores
#   SEEDS=1337,42 bash experiments/quant/run.sh               # pod, production sizes
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh

# The control's export (arms.tsv overrides one thing at a time): loop-aware int6 GPTQ, brotli.
export QUANT=gptq GPTQ_LOOP_AWARE=1
# Architecture pinned (the production one) so loop-aware calibration has a crawler to act on.
export NUM_FLAT_LAYERS=4 NUM_CRAWLER_LAYERS=2 CRAWLER_LOOPS=2

exec "${PYTHON:-python3}" experiments/ablate.py experiments/quant "$@"
