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
source experiments/equal_bytes.sh   # flat only against the arms, every one fitted under the same cap

exec "${PYTHON:-python3}" experiments/ablate.py experiments/crawler_vs_flat "$@"
