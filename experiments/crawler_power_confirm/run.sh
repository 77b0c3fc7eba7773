#!/usr/bin/env bash
# crawler_power_confirm: does crawler_power's answer (crawler 1x2 beats flat at equal bytes and FLOPs) hold on
# a different kind of English text? The same two arms and settings, trained and scored on the vimdoc corpus
# (Vim's help files, built from /usr/share/vim/vim*/doc if it is not there yet). Two runs at once on 2 cores:
#   PROFILE=cpu SEEDS=1337,42,7,11,13,17 ABLATE_JOBS=2 bash experiments/crawler_power_confirm/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/second_corpus.sh   # PROFILE=cpu unless set, and the vimdoc corpus
source experiments/profile.sh
source experiments/equal_bytes.sh   # flat only against the arms, every one fitted under the same cap

exec "${PYTHON:-python3}" experiments/ablate.py experiments/crawler_power_confirm "$@"
