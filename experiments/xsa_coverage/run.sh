#!/usr/bin/env bash
# xsa_coverage: exclusive self attention (XSA) on the last 0 / half / all blocks of the effective depth.
# XSA_LAST_N counts effective depth, crawler loops included: 4 flat + 2 crawler x 2 loops = depth 8,
# so half = 4 and all = 8 (-1 means all).
#   PROFILE=cpu SEEDS=1337 bash experiments/xsa_coverage/run.sh
#   SEEDS=1337,42 bash experiments/xsa_coverage/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh

# Architecture pinned: the arms' XSA_LAST_N values assume effective depth 8.
export NUM_FLAT_LAYERS=4 NUM_CRAWLER_LAYERS=2 CRAWLER_LOOPS=2
# The control: no XSA.
export XSA_LAST_N=0

exec "${PYTHON:-python3}" experiments/ablate.py experiments/xsa_coverage "$@"
