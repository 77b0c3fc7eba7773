#!/usr/bin/env bash
# crawler_power: crawler_vs_flat's closest pair (flat only against 2 flat + 1 crawler x 2, the demo's shape)
# at equal bytes and equal FLOPs, with enough paired seeds for an MDE under 0.01 bpb: at 3 seeds the 1x2
# arm's Δ varied by seed with sd 0.0093 (MDE 0.029). crawler_vs_flat's settings; two runs at once:
#   PROFILE=cpu SEEDS=1337,42,7,11,13,17,19,23,29,31,37,41 ABLATE_JOBS=2 bash experiments/crawler_power/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh

export SIZE_TARGET=fit VE_LAYERS=all CRAWLER_LOOPS=2
case "$PROFILE" in
  pod) export NUM_FLAT_LAYERS=6 NUM_CRAWLER_LAYERS=0 SIZE_LIMIT=12000000 ABLATE_FLAT=4 ;;
  *) export NUM_FLAT_LAYERS=4 NUM_CRAWLER_LAYERS=0 SIZE_LIMIT=700000 ABLATE_FLAT=2 ;;
esac

exec "${PYTHON:-python3}" experiments/ablate.py experiments/crawler_power "$@"
