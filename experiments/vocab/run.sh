#!/usr/bin/env bash
# vocab (issue 23): the tokenizer at equal bytes and equal FLOPs. sp1024 (control), sp4096, sp8192 and CaseOps
# sp8192, each its own tokenization of the same text (CaseOps scored by its byte sidecar), fitted under one
# binding cap (SIZE_TARGET=fit) and trained for the steps its FLOPs buy from the proxy's budget
# (QUESTION=demo). bpb compares across tokenizers. Data per arm: experiments/vocab_data.sh.
#   SEEDS=1337,42 ABLATE_JOBS=2 bash experiments/vocab/run.sh            # CPU: bundled corpus, held-out pool
#   SEEDS=1337,42 ABLATE_JOBS=2 bash experiments/vocab_confirm/run.sh    # CPU: vimdoc, its val split
set -euo pipefail
cd "$(dirname "$0")/../.."
export PROFILE="${PROFILE:-cpu}"
source experiments/profile.sh
source experiments/vocab_data.sh
exec "${PYTHON:-python3}" experiments/ablate.py experiments/vocab "$@"
