#!/usr/bin/env bash
# crawler_power_confirm: does crawler_power's answer (crawler 1x2 beats flat at equal bytes and FLOPs) hold on
# a different kind of English text? The same two arms and settings, trained and scored on the vimdoc corpus
# (Vim's help files, built from /usr/share/vim/vim*/doc if it is not there yet). Two runs at once on 2 cores:
#   PROFILE=cpu SEEDS=1337,42,7,11,13,17 ABLATE_JOBS=2 bash experiments/crawler_power_confirm/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/second_corpus.sh   # PROFILE=cpu unless set, and the vimdoc corpus
source experiments/profile.sh

# crawler_power's CPU settings: 4 flat x 128 against 2 flat + 1 crawler x 2, both fitted under 700,000 bytes
export SIZE_TARGET=fit VE_LAYERS=all CRAWLER_LOOPS=2 NUM_FLAT_LAYERS=4 NUM_CRAWLER_LAYERS=0 SIZE_LIMIT=700000 ABLATE_FLAT=2

exec "${PYTHON:-python3}" experiments/ablate.py experiments/crawler_power_confirm "$@"
