#!/usr/bin/env bash
# demo_vs_record (issue 22): does PROFILE=record_0405, scaled to the CPU demo's size, beat the demo profile at the
# demo's wallclock? If it does, it becomes the demo. Both run the demo's clock (PROFILE=demo: 330 s + the GPTQ
# reserve, compiled, sliding eval on the val split), side by side, one thread each:
#   SEEDS=1337,42 ABLATE_JOBS=2 bash experiments/demo_vs_record/run.sh                 # the bundled corpus
#   CORPUS=vimdoc SEEDS=1337 ABLATE_JOBS=2 bash experiments/demo_vs_record/run.sh      # the second corpus
set -euo pipefail
cd "$(dirname "$0")/../.."
export PROFILE="${PROFILE:-demo}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" QUESTION="${QUESTION:-demo}"   # equal wallclock
[ "${CORPUS:-local}" = vimdoc ] && source experiments/second_corpus.sh
source experiments/profile.sh
exec "${PYTHON:-python3}" experiments/ablate.py experiments/demo_vs_record "$@"
