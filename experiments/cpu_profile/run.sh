#!/usr/bin/env bash
# cpu_profile: choosing the CPU demo's settings (issue: the demo must beat the naive baseline at equal
# wallclock). Every arm changes one thing against the current demo profile (experiments/profile.sh),
# on the CPU proxy (PROFILE=cpu: the demo's model and schedule, 100 s, held-out scoring), at equal
# wallclock: an arm that costs ms/step gets fewer steps. Winners go into profile.sh; the final profile
# is confirmed at the demo's full 330 s on the bundled val split and on the vimdoc corpus (LOG.md).
#   PROFILE=cpu SEEDS=1337,42 bash experiments/cpu_profile/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export PROFILE="${PROFILE:-cpu}"
source experiments/profile.sh
exec "${PYTHON:-python3}" experiments/ablate.py experiments/cpu_profile "$@"
