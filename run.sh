#!/usr/bin/env bash
# The main job. With CUDA: the pod default (PROFILE=record_0427) under torchrun on its FineWeb variant.
# Without CUDA: the CPU demo profile on the shipped demo corpus (<= 10 minutes on 2 cores).
# Either way the run ends with its records folder (experiments/records.py). Any variable you set overrides
# the profile. DRY_RUN=1: the cost model only (experiments/cost_model.py). REHEARSAL=1 (no CUDA): the
# pod default's code path at production shapes in minutes (experiments/rehearsal.py).
# First it finds or makes a Python with the project's requirements (.ci/bootstrap.sh: PYTHON, the active
# venv, .venv, or a new .venv) and runs everything below with it.
set -euo pipefail
cd "$(dirname "$0")"
. .ci/bootstrap.sh
bootstrap_python run.sh || exit 1
PY=$PYTHON

# The CUDA devices torch can use; a GPU it cannot use (torch built for a newer driver) is an error, never the CPU demo.
bootstrap_gpus run.sh || exit 1
gpus=$BOOTSTRAP_GPUS
dry=0 rehearsal=0
case "${DRY_RUN:-0}" in 1|true|yes|on) dry=1 ;; esac
case "${REHEARSAL:-0}" in 1|true|yes|on) rehearsal=1 ;; esac
unset DRY_RUN REHEARSAL   # run.sh's switches, not train_gpt.py's knobs
# The pod default: PROFILE=record_0427, the best published record through our knobs (README, "The pod default"):
# what a pod trains, what DRY_RUN costs and what REHEARSAL rehearses when no PROFILE is set. PROFILE=pod is the
# knob defaults (the seeds' 2026-03 stack); without CUDA, the CPU demo.
if [ -z "${PROFILE:-}" ] && { [ "$gpus" -gt 0 ] || [ "$dry" = 1 ] || [ "$rehearsal" = 1 ]; }; then
  export PROFILE=record_0427
fi
# PROFILE=record_0405|record_0427: a published record's recipe through our knobs (experiments/profile.sh).
case "${PROFILE:-}" in record_*) . experiments/profile.sh ;; esac
if [ "$dry" = 1 ]; then
  echo "run.sh: DRY_RUN: ${PROFILE:-the knob defaults}: the config's parameters, depth, estimated artifact bytes and pod cost"
  exec "$PY" experiments/cost_model.py
fi

# The run's id names its log, artifact and records folder; chosen here so the records step can find them.
export RUN_ID="${RUN_ID:-$(date +%Y%m%d_%H%M%S)_$$}"
# VARIANT (a record profile sets it): the tokenizer and its data, sp1024 (default), sp4096, sp8192 or caseops
variant="${VARIANT:-sp1024}"
unset VARIANT
# SEEDS=a,b,c: the same config once per seed, one after another, then one records folder with their mean,
# std and (COMPARE_TO=<records folder or JSON>) the upstream rule's significance test (experiments/records.py).
# Both are checked here, before any training: a typo must not cost a pod run.
seeds="${SEEDS:-}" compare="${COMPARE_TO:-}"
unset SEEDS COMPARE_TO
if [ -n "$seeds" ]; then
  if ! [[ "$seeds" =~ ^[0-9]+(,[0-9]+)+$ ]] || [ -n "$(tr , '\n' <<< "$seeds" | sort | uniq -d)" ]; then
    echo "run.sh: error: SEEDS=$seeds: give two or more distinct integer seeds, comma-separated (e.g. 42,0,1234)" >&2
    exit 2
  elif [ -n "${SEED:-}" ]; then
    echo "run.sh: error: SEED=$SEED and SEEDS=$seeds: set one of them" >&2
    exit 2
  fi
fi
[ -z "$compare" ] || "$PY" experiments/records.py --check-baseline "$compare" || exit 2
# Without FineWeb: the demo corpus built at the config's tokenizer (CaseOps too).
local_data() {
  local vocab="${VOCAB_SIZE:-1024}" name=local caseops=""
  [ "$variant" = caseops ] && name=local_caseops caseops=--caseops
  "$PY" data/prepare_local.py --vocab-size "$vocab" $caseops >/dev/null
  export DATA_PATH=${DATA_PATH:-data/datasets/${name}_sp$vocab} TOKENIZER_PATH=${TOKENIZER_PATH:-data/tokenizers/${name}_${vocab}_bpe.model}
}
# FineWeb at the config's tokenizer (setup_pod.sh's layout); `fineweb` says whether its val shards are here.
fineweb_data() {
  local paths folder tokenizer
  paths=$("$PY" -c "from data.cached_challenge_fineweb import VARIANTS as V; print(*V['$variant'][1:])")
  read -r folder tokenizer <<< "$paths"
  export DATA_PATH="${DATA_PATH:-data/datasets/$folder}" TOKENIZER_PATH="${TOKENIZER_PATH:-data/tokenizers/$tokenizer.model}"
}
fineweb() { ls "$DATA_PATH"/fineweb_val_[0-9]*.bin >/dev/null 2>&1; }

train() {
  if [ "$gpus" -gt 0 ]; then
    fineweb_data
    echo "run.sh: $gpus CUDA device(s): the config under torchrun on FineWeb $variant ($DATA_PATH)"
    fineweb || VARIANT="$variant" bash setup_pod.sh
    torchrun --standalone --nproc_per_node="$gpus" train_gpt.py
  elif [ "$rehearsal" = 1 ]; then
    if [ -z "${DATA_PATH:-}" ]; then   # FineWeb at the config's tokenizer if it is here, else the demo corpus
      fineweb_data
      fineweb || { unset DATA_PATH TOKENIZER_PATH; local_data; }
    fi
    echo "run.sh: REHEARSAL without CUDA: ${PROFILE:-the knob defaults} at production shapes, 2 steps, on ${DATA_PATH:-FineWeb $variant}"
    PROFILE=rehearsal
    . experiments/profile.sh
    exec "$PY" experiments/rehearsal.py
  elif [[ "${PROFILE:-}" == record_* ]]; then   # the demo corpus at the record's tokenizer (CaseOps too)
    local_data
    echo "run.sh: no CUDA device: PROFILE=$PROFILE at MODEL_DIM=$MODEL_DIM on $DATA_PATH (set the size knobs to scale it)"
    "$PY" train_gpt.py
  else
    echo "run.sh: no CUDA device: running the CPU demo profile on the shipped demo corpus (experiments/profile.sh)"
    PROFILE=demo
    . experiments/profile.sh
    "$PY" train_gpt.py
  fi
}

if [ -z "$seeds" ]; then
  train
  "$PY" experiments/records.py "${LOG_DIR:-logs}/$RUN_ID.json" ${compare:+--compare-to "$compare"}
else
  base=$RUN_ID results=()
  for seed in ${seeds//,/ }; do
    export SEED=$seed RUN_ID="${base}_seed$seed"
    echo "run.sh: SEEDS: seed $seed (RUN_ID=$RUN_ID)"
    train
    results+=("${LOG_DIR:-logs}/$RUN_ID.json")
  done
  "$PY" experiments/records.py "${results[@]}" --name "$base" ${compare:+--compare-to "$compare"}
fi
