#!/usr/bin/env bash
# helix_steps: crawler_arms found Helix +0.124 bpb at equal FLOPs (143 steps to the control's 178); the seeds'
# one Helix result (#1308's DGX Spark micro suite, -0.046 at bridge dim 64) was at equal steps. Here both arms
# train the same steps, so Helix gets its second stream for free: does it win per step at all?
#   PROFILE=cpu SEEDS=1337,42,7 ABLATE_JOBS=2 bash experiments/helix_steps/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh

export HELIX=0
case "$PROFILE" in
  pod) export MAX_WALLCLOCK_SECONDS=0 ABLATE_HELIX_DIM=64 ;;       # ITERATIONS for both, no clock (PROXY=1: 500)
  *) export TRAIN_TFLOPS=0 ITERATIONS=178 ABLATE_HELIX_DIM=32 ;;   # the crawler_arms control's steps, no budget
esac

exec "${PYTHON:-python3}" experiments/ablate.py experiments/helix_steps "$@"
