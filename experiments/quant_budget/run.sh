#!/usr/bin/env bash
# quant_budget: landing under a cap that binds by choosing the grid, not by pruning. On the CPU proxy,
# with SIZE_LIMIT set so the model must shrink to ~60% of its absmax size. The 2026-11-23 sweep compared the
# absmax grid + pruning and a fixed SDClip k against the fit (both failed the cap; both were deleted in
# issue 21); what stays open is the fit with per-group Hessian allocation against the uniform fit.
# Training is a fixed step count (no wallclock cap), so every arm of a seed trains the same weights and
# the paired differences are export effects only.
#   PROFILE=cpu SEEDS=1337,42,7 bash experiments/quant_budget/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export PROFILE="${PROFILE:-cpu}"
source experiments/profile.sh
export MAX_WALLCLOCK_SECONDS=0 QUANT=gptq GPTQ_LOOP_AWARE=1
case "$PROFILE" in
  pod) steps=500 ABLATE_CAP=11400000 ;;  # ~60% of the production model's absmax bytes (~19 MB)
  *) steps=190 ABLATE_CAP=570000 ;;      # the proxy's steps in 100 s; ~60% of its absmax model bytes (880k) + code
esac
case " $ABLATE_CALLER_VARS " in *" ITERATIONS "*) ;; *) export ITERATIONS=$steps ;; esac   # yours wins
export SIZE_LIMIT="$ABLATE_CAP"

exec "${PYTHON:-python3}" experiments/ablate.py experiments/quant_budget "$@"
