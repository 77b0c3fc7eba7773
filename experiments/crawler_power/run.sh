#!/usr/bin/env bash
# crawler_power: crawler_vs_flat's closest pair (flat only against 2 flat + 1 crawler x 2, the demo's shape)
# at equal bytes and equal FLOPs, with enough paired seeds for an MDE under 0.01 bpb: at 3 seeds the 1x2
# arm's Δ varied by seed with sd 0.0093 (MDE 0.029). crawler_vs_flat's settings; two runs at once:
#   PROFILE=cpu SEEDS=1337,42,7,11,13,17,19,23,29,31,37,41 ABLATE_JOBS=2 bash experiments/crawler_power/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh
source experiments/equal_bytes.sh   # flat only against the arms, every one fitted under the same cap

exec "${PYTHON:-python3}" experiments/ablate.py experiments/crawler_power "$@"
