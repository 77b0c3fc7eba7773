#!/usr/bin/env bash
# crawler_power_shuffled (issue 28): crawler_power (flat only against 2 flat + 1 crawler x 2 at equal bytes
# and FLOPs) on the shipped corpus with its train documents shuffled, at crawler_power's first 3 seeds.
#   PROFILE=cpu SEEDS=1337,42,7 ABLATE_JOBS=2 bash experiments/crawler_power_shuffled/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh
source experiments/equal_bytes.sh   # flat only against the arms, every one fitted under the same cap
exec "${PYTHON:-python3}" experiments/ablate.py experiments/crawler_power_shuffled "$@"
