#!/usr/bin/env bash
# cpu_weight_decay: the demo's weight decay 0.2 (chosen at 330 s on the bundled corpus, which the demo sees
# ~9 times) against the pod's 0.04, on the vimdoc corpus (the proxy, paired seeds): does it hold on other text?
#   PROFILE=cpu SEEDS=1337,42 bash experiments/cpu_weight_decay/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/second_corpus.sh   # PROFILE=cpu unless set, and the vimdoc corpus
source experiments/profile.sh
exec "${PYTHON:-python3}" experiments/ablate.py experiments/cpu_weight_decay "$@"
