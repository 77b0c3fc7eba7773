#!/usr/bin/env bash
# proxy_fidelity: run published scripts (their own code, ported at run time by port.py) under each CPU proxy and
# score each proxy by how it ranks them against their pod results (Kendall tau; calibrate.py report). Needs a
# clone of openai/parameter-golf (PG_REPO) and the prepared corpora (bash run.sh: local; vimdoc: LOG.md).
#   SEEDS=1337,42,7 PROXIES=steps200,wall bash experiments/proxy_fidelity/run.sh
# Each run takes one core for 5-12 minutes (PF_JOBS side by side); finished runs in results.jsonl are skipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
. .ci/bootstrap.sh
bootstrap_python proxy_fidelity || exit 1
results=${PF_RESULTS:-experiments/proxy_fidelity/results.jsonl}
proxies=${PROXIES:-steps200,wall}
for proxy in ${proxies//,/ }; do
  "$PYTHON" experiments/proxy_fidelity/calibrate.py run --proxy "$proxy" --seeds "${SEEDS:-1337,42,7}" \
    --jobs "${PF_JOBS:-2}" --results "$results" --out "${PF_OUT:-/tmp/proxy_fidelity}" ${PF_SCRIPTS:+--scripts "$PF_SCRIPTS"}
done
"$PYTHON" experiments/proxy_fidelity/calibrate.py report --results "$results"
