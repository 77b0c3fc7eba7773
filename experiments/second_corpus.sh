# Sourced by the experiments that confirm a CPU-profile choice on a second kind of English text: the vimdoc
# corpus (Vim's help files), built from /usr/share/vim/vim*/doc the first time. Sets where the data is;
# experiments/profile.sh, sourced after it, keeps these. These confirmations run on the CPU proxy.
export PROFILE="${PROFILE:-cpu}"
vim_docs=$(ls -d /usr/share/vim/vim*/doc 2>/dev/null | head -1 || true)
if [ -n "$vim_docs" ]; then   # built the first time, rebuilt when its manifest is of another format
  "${PYTHON:-python3}" data/prepare_local.py --text-dir "$vim_docs" --name vimdoc >&2
elif [ ! -e data/datasets/vimdoc_sp1024/manifest.json ]; then
  echo "second_corpus.sh: no /usr/share/vim/vim*/doc here: build a second corpus with data/prepare_local.py --text-dir DIR --name vimdoc" >&2
fi
export DATA_PATH=data/datasets/vimdoc_sp1024 TOKENIZER_PATH=data/tokenizers/vimdoc_1024_bpe.model
export VAL_FILES='*_val_[0-9]*.bin'   # the shards, not their byte sidecars (*_val_bytes_*)
