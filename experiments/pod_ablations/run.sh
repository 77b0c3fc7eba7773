#!/usr/bin/env bash
# pod_ablations (issue 25): the proxy's calibration against published pod ablations. Each arm is one change a
# record or the seeds measured on a pod (the pod's Δ and its source line: proxy_fidelity/ablation_pairs.md), made
# to the CPU proxy's profile in the pod's direction, at equal steps (QUESTION=pod): does the CPU sign agree?
#   PROFILE=cpu SEEDS=1337,42 ABLATE_JOBS=2 bash experiments/pod_ablations/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh
exec "${PYTHON:-python3}" experiments/ablate.py experiments/pod_ablations "$@"
