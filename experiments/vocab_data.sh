# Sourced by vocab/run.sh and vocab_confirm/run.sh after experiments/profile.sh: each arm's data and tokenizer
# (the ABLATE_* values arms.tsv reads). On CPU, a corpus tokenized at each vocabulary (data/prepare_local.py,
# built here when missing); on a pod (PROFILE=pod, bundled corpus), the FineWeb variants setup_pod.sh fetches.
corpus="${ABLATE_CORPUS:-local}"
if [ "$PROFILE" = pod ] && [ "$corpus" = local ]; then
  export ABLATE_SP4096_DATA=data/datasets/fineweb10B_sp4096 ABLATE_SP4096_TOK=data/tokenizers/fineweb_4096_bpe.model
  export ABLATE_SP8192_DATA=data/datasets/fineweb10B_sp8192 ABLATE_SP8192_TOK=data/tokenizers/fineweb_8192_bpe.model
  export ABLATE_CASEOPS_DATA=data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved
  export ABLATE_CASEOPS_TOK=data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model
else
  text=(); [ "$corpus" = local ] || text=(--text-dir "$(ls -d /usr/share/vim/vim*/doc | head -1)" --name "$corpus")
  for v in 4096 8192; do "${PYTHON:-python3}" data/prepare_local.py "${text[@]}" --vocab-size $v >&2; done
  "${PYTHON:-python3}" data/prepare_local.py "${text[@]}" --vocab-size 8192 --caseops >&2
  export ABLATE_SP4096_DATA=data/datasets/${corpus}_sp4096 ABLATE_SP4096_TOK=data/tokenizers/${corpus}_4096_bpe.model
  export ABLATE_SP8192_DATA=data/datasets/${corpus}_sp8192 ABLATE_SP8192_TOK=data/tokenizers/${corpus}_8192_bpe.model
  export ABLATE_CASEOPS_DATA=data/datasets/${corpus}_caseops_sp8192
  export ABLATE_CASEOPS_TOK=data/tokenizers/${corpus}_caseops_8192_bpe.model
  # one binding cap on the CPU model: the sp8192 model alone is ~1.6 MB at the fit's finest grid
  export SIZE_LIMIT="${SIZE_LIMIT:-1200000}" SIZE_MARGIN="${SIZE_MARGIN:-12000}"
fi
export SIZE_TARGET=fit QUESTION="${QUESTION:-demo}"   # equal bytes; each arm the steps its FLOPs buy
