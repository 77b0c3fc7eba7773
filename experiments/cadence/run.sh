#!/usr/bin/env bash
# cadence: the crawler's loops on every training step, only on every k-th step (CRAWLER_CADENCE=k: one
# loop on the others), or switched on part-way through training (progressive recurrence,
# CRAWLER_LOOPS_SCHEDULE: a loop record turned loops on in stages to avoid a loss spike). Cheaper steps
# buy more steps in the same wallclock; evaluation always runs every loop.
#   PROFILE=cpu SEEDS=1337,42,7 bash experiments/cadence/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh

# The control: the profile's crawler, every loop on every step.
export CRAWLER_CADENCE=1 CRAWLER_LOOPS_SCHEDULE=

exec "${PYTHON:-python3}" experiments/ablate.py experiments/cadence "$@"
