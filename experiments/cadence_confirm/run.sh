#!/usr/bin/env bash
# cadence_confirm: does the cadence sweep's winner hold on a different kind of English text? The compute-
# budget proxy (TRAIN_TFLOPS, paired seeds), trained and scored on the vimdoc corpus (Vim's help files),
# built here from /usr/share/vim/vim*/doc if it is not there yet. Two runs at once on 2 cores:
#   PROFILE=cpu SEEDS=1337,42,7 ABLATE_JOBS=2 bash experiments/cadence_confirm/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/second_corpus.sh   # PROFILE=cpu unless set, and the vimdoc corpus
source experiments/profile.sh

export CRAWLER_CADENCE=1 CRAWLER_LOOPS_SCHEDULE=

exec "${PYTHON:-python3}" experiments/ablate.py experiments/cadence_confirm "$@"
