#!/usr/bin/env bash
# crawler_power: crawler_vs_flat's closest pair (flat only against 2 flat + 1 crawler x 2, the demo's shape)
# at equal bytes and equal FLOPs, with enough paired seeds for an MDE under 0.01 bpb: at 3 seeds the 1x2
# arm's Δ varied by seed with sd 0.0093 (MDE 0.029). Same settings as crawler_vs_flat; two runs at once:
#   PROFILE=cpu SEEDS=1337,42,7,11,13,17,19,23,29,31,37,41 ABLATE_JOBS=2 bash experiments/crawler_power/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ABLATE_EXPERIMENT=experiments/crawler_power exec bash experiments/crawler_vs_flat/run.sh "$@"
