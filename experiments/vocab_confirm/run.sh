#!/usr/bin/env bash
# vocab_confirm: experiments/vocab (same arms) on the second corpus, vimdoc (Vim's help files), each vocabulary
# built from /usr/share/vim/vim*/doc here when missing.
#   SEEDS=1337,42 ABLATE_JOBS=2 bash experiments/vocab_confirm/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/second_corpus.sh   # PROFILE=cpu unless set, and the vimdoc corpus
source experiments/profile.sh
export ABLATE_CORPUS=vimdoc
source experiments/vocab_data.sh
exec "${PYTHON:-python3}" experiments/ablate.py experiments/vocab_confirm "$@"
