#!/usr/bin/env bash
# crawler_arms: the seeds' crawler research arms (#990 ClownCar, #1308 Ouroboros, #579 Frugendorff),
# one arm per variant against the plain production crawler (4 flat + 2 crawler x 2 loops). Every arm
# is off in the control and changes one thing; the ninth, cadence, is experiments/cadence (with progressive loops).
# DeltaNet was deleted after the 2026-11-24 sweep (experiments/LOG.md); its rows stay in results/.
# Arm widths are picked per profile below (ABLATE_* values, used in arms.tsv as ${ABLATE_*}).
#   PROFILE=cpu SEEDS=1337,42,7 bash experiments/crawler_arms/run.sh
#   SEEDS=1337,42 PROXY=1 bash experiments/crawler_arms/run.sh       (pod: 500 steps each)
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh

# The control: the profile's plain crawler (cpu: 2 flat + 1 crawler x 2; pod: 4 flat + 2 crawler x 2),
# every arm at its off value.
export HELIX=0 LOOP_SMEAR=0 TAP_DIM=0 CRAWLER_MLP=standard CRAWLER_LOOP_ROPE_SCALES= \
       DELIBERATION=0 LOOP_DT=1.0
case "$PROFILE" in
  # choke: the seeds' winning "flat" choke at the model width (#1308: 512 at dim 512);
  # helix: the seeds' best bridge width (64); taps: their core hypothesis (32).
  pod) export ABLATE_CHOKE_DIM=640 ABLATE_HELIX_DIM=64 ABLATE_TAP_DIM=32 ;;
  *) export ABLATE_CHOKE_DIM=128 ABLATE_HELIX_DIM=32 ABLATE_TAP_DIM=16 ;;
esac

exec "${PYTHON:-python3}" experiments/ablate.py experiments/crawler_arms "$@"
