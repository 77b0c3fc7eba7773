#!/usr/bin/env bash
# vocab_confirm: experiments/vocab on the second corpus (vimdoc, built from /usr/share/vim/vim*/doc), same arms.
#   SEEDS=1337,42 ABLATE_JOBS=2 bash experiments/vocab_confirm/run.sh
ABLATE_CORPUS=vimdoc ABLATE_EXPERIMENT=vocab_confirm exec bash "$(dirname "$0")/../vocab/run.sh" "$@"
