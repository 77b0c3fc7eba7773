#!/usr/bin/env bash
# crawler_vs_flat: the founding question. At a fixed artifact size (SIZE_TARGET=fit under a SIZE_LIMIT that
# binds every arm: each lands in the same [cap - 20 kB, cap] window by choosing its SDClip k) and a fixed
# wallclock, does sharing weights across loops buy bpb? Flat only (the control) against crawlers of 1 or
# 2 shared blocks run 2 or 3 times, one with its saved bytes reinvested in width, and the all-shared
# Frugendorff. Value embeddings go on every block (VE_LAYERS=all), so no arm gets a table the others lack.
#   PROFILE=cpu SEEDS=1337,42,7 bash experiments/crawler_vs_flat/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh

export SIZE_TARGET=fit VE_LAYERS=all CRAWLER_LOOPS=2
case "$PROFILE" in
  # pod: 6 flat x 640 (28.7M params) against the same crawlers; the cap binds at ~12 MB
  pod) export NUM_FLAT_LAYERS=6 NUM_CRAWLER_LAYERS=0 SIZE_LIMIT=12000000 ABLATE_FLAT=4 ABLATE_WIDE_DIM=720 ;;
  # cpu: 4 flat x 128 (the demo's depth); the cap binds at ~0.70 MB (every arm's k rises above 4)
  *) export NUM_FLAT_LAYERS=4 NUM_CRAWLER_LAYERS=0 SIZE_LIMIT=700000 ABLATE_FLAT=2 ABLATE_WIDE_DIM=144 ;;
esac

exec "${PYTHON:-python3}" experiments/ablate.py experiments/crawler_vs_flat "$@"
