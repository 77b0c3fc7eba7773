#!/usr/bin/env bash
# arms_9seeds: the three crawler arms that crawler_arms (3 seeds, 2026-11-24) left undecided (taps,
# deliberation, loop_dt), at 9 paired seeds on the shipped demo corpus with its train documents shuffled.
# Settings as in crawler_arms: the CPU proxy's plain crawler as the control, one arm on at a time.
#   PROFILE=cpu SEEDS=1337,42,7,11,13,17,19,23,29 ABLATE_JOBS=2 bash experiments/arms_9seeds/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh
export TAP_DIM=0 DELIBERATION=0 LOOP_DT=1.0
exec "${PYTHON:-python3}" experiments/ablate.py experiments/arms_9seeds "$@"
