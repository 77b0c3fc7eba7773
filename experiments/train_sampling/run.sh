#!/usr/bin/env bash
# train_sampling (issue 28): on the shuffled demo corpus, the sequential stream (upstream's TokenStream)
# against the records' way of sampling: every window of every shard once an epoch, in a random order and
# phase. The CPU proxy reads the corpus several times (the pod reads FineWeb less than once), so this is
# where the two can differ. The CPU proxy's profile otherwise:
#   PROFILE=cpu SEEDS=1337,42,7 ABLATE_JOBS=2 bash experiments/train_sampling/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh
export TRAIN_SAMPLING=stream
exec "${PYTHON:-python3}" experiments/ablate.py experiments/train_sampling "$@"
