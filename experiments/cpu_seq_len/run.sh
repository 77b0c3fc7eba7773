#!/usr/bin/env bash
# cpu_seq_len: the demo's 512-token sequences (chosen at 330 s on the bundled corpus) against 256, on the
# vimdoc corpus (the proxy, paired seeds): does it hold on other text?
#   PROFILE=cpu SEEDS=1337,42 bash experiments/cpu_seq_len/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/second_corpus.sh   # PROFILE=cpu unless set, and the vimdoc corpus
source experiments/profile.sh
exec "${PYTHON:-python3}" experiments/ablate.py experiments/cpu_seq_len "$@"
