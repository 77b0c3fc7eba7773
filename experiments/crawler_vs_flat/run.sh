#!/usr/bin/env bash
# crawler_vs_flat: does weight sharing pay at equal stored bytes? A plain 6-block GPT (the control)
# against crawler models whose saved bytes are reinvested in width, and the 6-unique-blocks-looped-twice
# "Frugendorff". MODEL_DIM is picked per arm so the unique parameter count (= stored bytes, about)
# matches the control's within 3%: `bash experiments/crawler_vs_flat/run.sh --dry-run` prints the
# counts for the current train_gpt.py (arms.tsv quotes them as of commit bdaac0f, and
# tests/test_experiments.py checks the 3% for both profiles).
# Value embeddings go on every block (VE_LAYERS=all): the default puts them on crawler blocks only,
# which would hand the crawler arms an extra table the flat control lacks.
#   PROFILE=cpu SEEDS=1337 bash experiments/crawler_vs_flat/run.sh
#   SEEDS=1337,42 bash experiments/crawler_vs_flat/run.sh       (PROXY=1: 500 steps each)
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh

# The control: 6 flat blocks, no crawler.
export NUM_FLAT_LAYERS=6 NUM_CRAWLER_LAYERS=0 CRAWLER_LOOPS=2 VE_LAYERS=all
# Widths: MODEL_DIM for the 6-unique-block arms, ABLATE_WIDE_DIM for the 5-unique-block arms
# (arms.tsv uses it as ${ABLATE_WIDE_DIM}; the runner keeps ABLATE_* away from train_gpt.py).
case "$PROFILE" in
  pod) export MODEL_DIM=640 ABLATE_WIDE_DIM=700 ;;   # 10 heads: head dim 64 / 70
  cpu) export MODEL_DIM=64 ABLATE_WIDE_DIM=72 ;;     # 4 heads: head dim 16 / 18
esac

exec "${PYTHON:-python3}" experiments/ablate.py experiments/crawler_vs_flat "$@"
