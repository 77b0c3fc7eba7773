# Sourced, never run, from the repo root by run.sh, setup_pod.sh and .ci/run: the one place that
# decides which Python runs the project and installs requirements.txt into it when needed.
# It lives in .ci/ because the top-level layout is fixed and .ci/ is where the environment set-up
# was already kept (the old .ci/run made the venv); run.sh sources it from there.
#
#   bootstrap_python TAG    sets and exports PYTHON to an interpreter on which every import of
#                           the trainer, the data scripts and the tests succeeds; one "TAG: ..."
#                           line per step, one "TAG: error: ..." line and status 1 on failure.
#
# Which interpreter, first match wins:
#   1. PYTHON=...      the caller's choice;
#   2. $VIRTUAL_ENV    the active venv;
#   3. .venv           the repo's own venv, when its python runs (updated when requirements.txt
#                      changed since it was set up: a checksum is kept in .venv);
#   4. python3         when it already has everything (a pod image with its CUDA torch, say);
#   5. a new .venv     made by python3 (>= 3.10).
# An interpreter that lacks a module gets requirements.txt installed. torch comes first, pinned,
# unless the interpreter is the user's own and already has one (never replace a user's torch):
# TORCH_SPEC if set; else, with no usable nvidia-smi, torch==2.13.0 (the CPU build: on our machines
# a wheel on disk, elsewhere PyPI's CPU release); else requirements.txt's range, i.e. the default
# CUDA build. pip's own output goes to logs/bootstrap.log.

BOOTSTRAP_IMPORTS="torch numpy sentencepiece zstandard brotli huggingface_hub pandas scipy matplotlib
tqdm filelock tabulate pytest hypothesis"
BOOTSTRAP_CPU_TORCH="torch==2.13.0"

# The probe: one python -c that prints "<status> <python version> <details>", where status is
# ok (details: torch's version), missing (details: the modules that fail to import) or old.
_BS_PROBE='
import importlib, sys
version = sys.version.split()[0]
if sys.version_info < (3, 10):
    print("old", version)
    sys.exit(1)
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
if missing:
    print("missing", version, *missing)
    sys.exit(1)
print("ok", version, sys.modules["torch"].__version__)
'

_bs_say() { echo "$_bs_tag: $*"; }
_bs_fail() { echo "$_bs_tag: error: $*" >&2; return 1; }

# Sets _bs_status, _bs_version and _bs_details from the probe's last line (empty: it did not run).
_bs_probe() {
  local out
  # shellcheck disable=SC2086  # the module list is meant to split into arguments
  out=$("$1" -c "$_BS_PROBE" $BOOTSTRAP_IMPORTS 2>/dev/null | tail -n 1)
  read -r _bs_status _bs_version _bs_details <<<"$out"
}

# "torch, numpy, sentencepiece and 9 more": the missing list, short enough for one line.
_bs_short_list() {
  set -- $_bs_details
  local n=$#
  if [ "$n" -le 3 ]; then echo "$*" | sed 's/ /, /g'; return; fi
  echo "$1, $2, $3 and $((n - 3)) more"
}

_bs_has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

_bs_stamp_file() { echo "$PWD/.venv/.requirements.cksum"; }
_bs_stamp() { cksum <requirements.txt; }
_bs_is_repo_venv() { [ "$1" = "$PWD/.venv/bin/python" ]; }

# pip install "$@" into $1; on failure one line with pip's last error and the log's path.
_bs_pip() {
  local py=$1 rc last
  shift
  "$py" -m pip install -q "$@" >>"$_bs_log" 2>&1 && return 0
  rc=$?
  last=$(grep -iE '^[a-z]*error' "$_bs_log" | tail -n 1)
  [ -n "$last" ] || last=$(grep -v '^[[:space:]]*$' "$_bs_log" | tail -n 1)
  _bs_fail "pip install $* failed (exit $rc): $last; pip's output: $_bs_log"
}

# Installs into interpreter $1 (shown as $2); $3 = yes to install the pinned torch first.
_bs_install() {
  local py=$1 label=$2 with_torch=$3 spec why
  mkdir -p logs && _bs_log=$PWD/logs/bootstrap.log && : >"$_bs_log"
  if [ -n "${TORCH_SPEC:-}" ]; then spec=$TORCH_SPEC why="from TORCH_SPEC"
  elif _bs_has_cuda; then spec="" why="CUDA found: requirements.txt's torch, the default CUDA build"
  else spec=$BOOTSTRAP_CPU_TORCH why="no CUDA: the CPU build"
  fi
  if [ "$with_torch" = yes ] && [ -n "$spec" ]; then
    _bs_say "installing $spec into $label ($why; minutes the first time)"
    _bs_pip "$py" "$spec" || return 1
    why="the rest"
  fi
  _bs_say "installing requirements.txt into $label ($why)"
  _bs_pip "$py" -r requirements.txt || return 1
  if _bs_is_repo_venv "$py"; then _bs_stamp >"$(_bs_stamp_file)"; fi
}

# Makes interpreter $1 (shown as $2) good if it is not, then exports it; $3 = new: a venv made
# just now (its lacking everything goes without saying).
_bs_use() {
  local py=$1 label=$2 new=${3:-} with_torch=yes
  _bs_probe "$py"
  case $_bs_status in
    ok)
      if _bs_is_repo_venv "$py" && [ "$(cat "$(_bs_stamp_file)" 2>/dev/null)" != "$(_bs_stamp)" ]; then
        _bs_say "requirements.txt changed since $label was last set up here: updating it"
        _bs_install "$py" "$label" yes || return 1
        _bs_probe "$py"
      fi ;;
    missing)
      [ -n "$new" ] || _bs_say "$label lacks $(_bs_short_list): installing requirements.txt into it"
      # Another interpreter's torch is the user's: keep it if it imports.
      if ! _bs_is_repo_venv "$py" && ! [[ " $_bs_details " == *" torch "* ]]; then with_torch=no; fi
      _bs_install "$py" "$label" "$with_torch" || return 1
      _bs_probe "$py" ;;
    old) _bs_fail "$label is Python $_bs_version; need >= 3.10 (install one, then set PYTHON=/path/to/python3.x)"; return 1 ;;
    *) _bs_fail "$label ($py) does not run"; return 1 ;;
  esac
  if [ "$_bs_status" != ok ]; then
    _bs_fail "$label still lacks $(_bs_short_list) after installing requirements.txt; to see why: $py -c 'import ${_bs_details%% *}'"
    return 1
  fi
  _bs_say "using $label (Python $_bs_version, torch $_bs_details)"
  _bs_export "$py"
}

# PYTHON for every later step and child script; a venv is also activated (PATH, VIRTUAL_ENV), so
# torchrun, pytest and plain `python` in child processes are the venv's too.
_bs_export() {
  export PYTHON=$1
  local bin
  bin=$(dirname "$1")
  if [ -f "$bin/../pyvenv.cfg" ]; then
    VIRTUAL_ENV=$(cd "$bin/.." && pwd)
    case $PATH in "$bin:"*) ;; *) PATH="$bin:$PATH" ;; esac
    export VIRTUAL_ENV PATH
  fi
}

# No PYTHON, no active venv, no working .venv: python3 if it has everything, else a new .venv.
_bs_system_or_new_venv() {
  local base
  local -a args=()  # expanded as ${args[@]+...}: bash < 4.4 calls an empty array unbound
  base=$(command -v python3) || { _bs_fail "no python3 on PATH: install Python >= 3.10 or set PYTHON"; return 1; }
  _bs_probe "$base"
  case $_bs_status in
    ok) _bs_say "using $base (Python $_bs_version, torch $_bs_details): it has everything, no .venv needed"
        _bs_export "$base"; return 0 ;;
    old) _bs_fail "python3 is Python $_bs_version; need >= 3.10 (install one, then set PYTHON=/path/to/python3.x)"; return 1 ;;
  esac
  # On a GPU machine the image's CUDA torch (several GB) is reused when it fits requirements.txt.
  if _bs_has_cuda; then args+=(--system-site-packages); fi
  if [ -e .venv ]; then
    args+=(--clear)
    _bs_say ".venv is broken (its python does not run): recreating it with python3 $_bs_version"
  else
    _bs_say "python3 $_bs_version lacks $(_bs_short_list): creating .venv"
  fi
  mkdir -p logs && _bs_log=$PWD/logs/bootstrap.log
  "$base" -m venv ${args[@]+"${args[@]}"} .venv >"$_bs_log" 2>&1 \
    || { _bs_fail "python3 -m venv .venv failed (on Debian/Ubuntu: apt-get install python3-venv); output: $_bs_log"; return 1; }
  _bs_use "$PWD/.venv/bin/python" .venv new
}

bootstrap_python() {
  _bs_tag=${1:-bootstrap}
  _bs_log=$PWD/logs/bootstrap.log
  if [ -n "${PYTHON:-}" ]; then
    local py=$PYTHON
    case $py in */*) ;; *) py=$(command -v "$py") || { _bs_fail "PYTHON=$PYTHON is not on PATH"; return 1; } ;; esac
    _bs_use "$py" "PYTHON=$PYTHON"
  elif [ -n "${VIRTUAL_ENV:-}" ]; then
    _bs_use "$VIRTUAL_ENV/bin/python" "the active venv $VIRTUAL_ENV"
  elif [ -x .venv/bin/python ] && .venv/bin/python -c "" 2>/dev/null; then
    _bs_use "$PWD/.venv/bin/python" .venv
  else
    _bs_system_or_new_venv
  fi
}
