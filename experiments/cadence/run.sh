#!/usr/bin/env bash
# cadence: the crawler's loops on every training step vs only on every k-th step (CRAWLER_CADENCE=k:
# all loops fire on every k-th step, one loop on the others). Cheaper steps: under the pod's 600 s
# wallclock cap a cadence arm gets more steps; with PROXY=1 (fixed 500 steps) it gets none, so compare
# both before deciding. The evaluation always runs every loop.
#   PROFILE=cpu SEEDS=1337 bash experiments/cadence/run.sh
#   SEEDS=1337,42 bash experiments/cadence/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh

# The control: the production architecture, crawler loops on every step.
export NUM_FLAT_LAYERS=4 NUM_CRAWLER_LAYERS=2 CRAWLER_LOOPS=2
export CRAWLER_CADENCE=1

exec "${PYTHON:-python3}" experiments/ablate.py experiments/cadence "$@"
