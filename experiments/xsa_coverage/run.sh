#!/usr/bin/env bash
# xsa_coverage: exclusive self attention (XSA) on no block, the crawler's firings only, or every block of the
# effective depth. XSA_LAST_N counts effective depth, crawler loops included (-1 = all).
#   PROFILE=cpu SEEDS=1337,42,7 bash experiments/xsa_coverage/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh

# The control: no XSA.
export XSA_LAST_N=0

case "$PROFILE" in pod) export ABLATE_XSA_HALF=4 ;; *) export ABLATE_XSA_HALF=2 ;; esac

exec "${PYTHON:-python3}" experiments/ablate.py experiments/xsa_coverage "$@"
