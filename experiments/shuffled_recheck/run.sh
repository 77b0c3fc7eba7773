#!/usr/bin/env bash
# shuffled_recheck (issue 28): the CPU verdicts that rested on the harvest-ordered corpus, run again on the
# shipped corpus with its train documents shuffled (manifest format 2), one arm against the proxy's profile
# each: the size choices (cpu_profile), the loop schedule (cadence), XSA (xsa_coverage), choke (crawler_arms).
# results/ holds 69c36f4's runs (the stream loader, as the harvest-order verdicts); its control rows are
# arms_9seeds' control (same commit and settings; one thread at a fixed FLOP budget is deterministic), copied
# in rather than run again. At e519753 or later (the window sampler) give a new folder: --results NAME.
#   PROFILE=cpu SEEDS=1337,42,7 ABLATE_JOBS=2 bash experiments/shuffled_recheck/run.sh --results results_windows
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/profile.sh
exec "${PYTHON:-python3}" experiments/ablate.py experiments/shuffled_recheck "$@"
