#!/usr/bin/env bash
# vocab (issue 23): the tokenizer at equal bytes and equal FLOPs on the CPU proxy. sp1024 (control), sp4096,
# sp8192 and CaseOps sp8192, each its own tokenization of the same corpus (data/prepare_local.py, built here
# when missing; CaseOps scored by its byte sidecar), all fitted under one binding cap (SIZE_TARGET=fit,
# SIZE_LIMIT 1.2 MB: the sp8192 model alone is ~1.6 MB at the fit's finest grid) and each trained for the steps
# its FLOPs buy from the proxy's budget (QUESTION=demo). bpb compares across tokenizers.
#   SEEDS=1337,42 ABLATE_JOBS=2 bash experiments/vocab/run.sh         # bundled corpus, held-out pool
#   SEEDS=1337,42 ABLATE_JOBS=2 bash experiments/vocab_confirm/run.sh # vimdoc (Vim's help files), its val split
set -euo pipefail
cd "$(dirname "$0")/../.."
export PROFILE=cpu QUESTION=demo ABLATE_CORPUS="${ABLATE_CORPUS:-local}"
. experiments/profile.sh
text=(); [ "$ABLATE_CORPUS" = local ] || text=(--text-dir "$(ls -d /usr/share/vim/vim*/doc | head -1)" --name "$ABLATE_CORPUS")
for v in 1024 4096 8192; do "${PYTHON:-python3}" data/prepare_local.py "${text[@]}" --vocab-size $v >&2; done
"${PYTHON:-python3}" data/prepare_local.py "${text[@]}" --vocab-size 8192 --caseops >&2
export DATA_PATH="data/datasets/${ABLATE_CORPUS}_sp1024" TOKENIZER_PATH="data/tokenizers/${ABLATE_CORPUS}_1024_bpe.model"
[ "$ABLATE_CORPUS" = local ] || export VAL_FILES='*_val_[0-9]*.bin'   # only the bundled corpus has a held-out pool
export SIZE_TARGET=fit SIZE_LIMIT="${SIZE_LIMIT:-1200000}" SIZE_MARGIN="${SIZE_MARGIN:-12000}"
exec "${PYTHON:-python3}" experiments/ablate.py "experiments/${ABLATE_EXPERIMENT:-vocab}" "$@"
