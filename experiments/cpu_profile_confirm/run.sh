#!/usr/bin/env bash
# cpu_profile_confirm: is the chosen CPU profile better on a different kind of English text, or only on
# the bundled Python docs it was tuned on? The same proxy (100 s, paired seeds), trained and scored on the
# vimdoc corpus (Vim's help files), built here from /usr/share/vim/vim*/doc if it is not there yet.
#   PROFILE=cpu SEEDS=1337,42 bash experiments/cpu_profile_confirm/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/second_corpus.sh   # PROFILE=cpu unless set, and the vimdoc corpus
source experiments/profile.sh
exec "${PYTHON:-python3}" experiments/ablate.py experiments/cpu_profile_confirm "$@"
