#!/usr/bin/env bash
# crawler_arms: the seeds' crawler research arms (#990 ClownCar, #1308 Ouroboros, #579 Frugendorff) against
# the plain crawler of the profile. Of the nine arms swept on 2026-11-24 (results/, experiments/LOG.md), only
# the choke MLP is still in train_gpt.py: it lost on the CPU proxy but won on the seeds' pod. DeltaNet,
# Helix, loop smear, per-loop RoPE, taps, deliberation and contractive loops were deleted (LOG.md says when
# and why); their rows stay in results/.
#   PROFILE=cpu SEEDS=1337,42,7 bash experiments/crawler_arms/run.sh
#   SEEDS=1337,42 PROXY=1 bash experiments/crawler_arms/run.sh       (pod: 500 steps each)
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh

export CRAWLER_MLP=standard
case "$PROFILE" in
  # choke: the seeds' winning "flat" choke at the model width (#1308: 512 at dim 512)
  pod) export ABLATE_CHOKE_DIM=640 ;;
  *) export ABLATE_CHOKE_DIM=128 ;;
esac

exec "${PYTHON:-python3}" experiments/ablate.py experiments/crawler_arms "$@"
