#!/usr/bin/env bash
# cpu_profile_confirm: is the chosen CPU profile better on a different kind of English text, or only on
# the bundled Python docs it was tuned on? The same proxy (100 s, paired seeds), trained and scored on the
# vimdoc corpus (Vim's help files), built here from /usr/share/vim/vim*/doc if it is not there yet.
#   PROFILE=cpu SEEDS=1337,42 bash experiments/cpu_profile_confirm/run.sh
# (CONFIRM_EXPERIMENT=experiments/<other> runs another experiment's arms on vimdoc the same way)
set -euo pipefail
cd "$(dirname "$0")/../.."
export PROFILE="${PROFILE:-cpu}"
if [ ! -e data/datasets/vimdoc_sp1024/manifest.json ]; then
  docs=$(ls -d /usr/share/vim/vim*/doc 2>/dev/null | head -1)
  [ -n "$docs" ] || { echo "cpu_profile_confirm: no /usr/share/vim/vim*/doc here; build a second corpus with data/prepare_local.py --text-dir DIR --name vimdoc" >&2; exit 2; }
  "${PYTHON:-python3}" data/prepare_local.py --text-dir "$docs" --name vimdoc
fi
export DATA_PATH=data/datasets/vimdoc_sp1024 TOKENIZER_PATH=data/tokenizers/vimdoc_1024_bpe.model
export VAL_FILES='*_val_*.bin'
source experiments/profile.sh
exec "${PYTHON:-python3}" experiments/ablate.py "${CONFIRM_EXPERIMENT:-experiments/cpu_profile_confirm}" "$@"
