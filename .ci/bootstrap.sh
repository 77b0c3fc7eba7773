# Sourced, never run, from the repo root by run.sh, setup_pod.sh and .ci/run: the one place that
# decides which Python runs the project and installs its requirements into it when needed.
# It lives in .ci/ because the top-level layout is fixed and .ci/ is where the environment set-up
# was already kept (the old .ci/run made the venv); run.sh sources it from there.
#
#   bootstrap_python TAG    sets and exports PYTHON to an interpreter on which every import of
#                           the trainer, the data scripts and the tests succeeds; one "TAG: ..."
#                           line per step, one "TAG: error: ..." line and status 1 on failure.
#   bootstrap_gpus TAG      after bootstrap_python: sets BOOTSTRAP_GPUS to the CUDA devices PYTHON's
#                           torch can use; a GPU that nvidia-smi lists but torch cannot use is one
#                           "TAG: error: ..." line (the driver, the torch build, the fix) and status 1.
#
# Which interpreter, first match wins:
#   1. PYTHON=...      the caller's choice;
#   2. $VIRTUAL_ENV    the active venv;
#   3. .venv           the repo's own venv, when its python runs (updated when the file it was
#                      installed from, requirements.lock or requirements.txt, changed since: a
#                      checksum is kept in .venv);
#   4. python3         when it already has everything (a pod image with its CUDA torch, say);
#   5. a new .venv     made by python3 (>= 3.10).
# What an interpreter that lacks a module gets, the line before each install saying which torch
# build comes and roughly how big it is:
#   - TORCH_SPEC set: pip install $TORCH_SPEC (its words are pip's arguments, so
#     TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" works), then
#     requirements.txt;
#   - a GPU (nvidia-smi lists one): torch==2.13.0 from PyPI, whose default build for Linux x86_64
#     is CUDA 13.0 (several GB with its nvidia packages), then requirements.txt;
#   - no GPU, CPython 3.11 on Linux x86_64 (glibc >= 2.28): requirements.lock in one step,
#     pip install --require-hashes -r requirements.lock: every package pinned with its hash, torch
#     as torch==2.13.0+cpu, the CPU build (a ~190 MB wheel). That wheel is not on PyPI: where
#     pip finds no local copy (our machines keep one in PIP_FIND_LINKS) it retries once with
#     PyTorch's CPU index (--extra-index-url https://download.pytorch.org/whl/cpu);
#   - no GPU, any other Python or platform: one line on why the lock was not used, then
#     torch==2.13.0 from PyPI (on Linux x86_64 the CUDA build: a hint line first says how to get
#     the CPU build with TORCH_SPEC), then requirements.txt.
# An interpreter that is the user's own (not .venv) and already has torch keeps it, whatever its
# version (never replace a user's torch): it gets requirements.txt only, the lock never, and on a
# GPU machine its torch version is shown next to the pinned one when they differ. .venv's torch is
# the bootstrap's to manage. pip's own output goes to logs/bootstrap.log. requirements.lock is made
# by .ci/lock.sh.

BOOTSTRAP_IMPORTS="torch numpy sentencepiece brotli python_minifier huggingface_hub pandas scipy matplotlib
tqdm filelock tabulate pytest hypothesis"
BOOTSTRAP_TORCH="torch==2.13.0"            # the pin where the lock does not apply (PyPI's build)
BOOTSTRAP_LOCK=requirements.lock
BOOTSTRAP_CPU_INDEX=https://download.pytorch.org/whl/cpu

# The probe: one python -c that prints "<status> <python version> <where> <torch> <missing...>":
# status ok, or missing (then the modules that fail to import follow), or old (then nothing
# follows the version); where is implementation/system/machine/libc, e.g.
# CPython/Linux/x86_64/glibc-2.36; torch is torch's version, or - when it does not import.
_BS_PROBE='
import importlib, os, platform, sys
version = sys.version.split()[0]
if sys.version_info < (3, 10):
    print("old", version)
    sys.exit(1)
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION").replace(" ", "-")
except (AttributeError, OSError, ValueError):
    libc = "-"
where = "/".join([platform.python_implementation(), platform.system(), platform.machine(), libc])
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
torch = getattr(sys.modules.get("torch"), "__version__", "-")
print("missing" if missing else "ok", version, where, torch, *missing)
sys.exit(1 if missing else 0)
'

_bs_say() { echo "$_bs_tag: $*"; }
_bs_fail() { echo "$_bs_tag: error: $*" >&2; return 1; }

# Sets _bs_status, _bs_version, _bs_where, _bs_torch and _bs_details (the missing modules) from the
# probe's last line (all empty: it did not run).
_bs_probe() {
  local out
  # shellcheck disable=SC2086  # the module list is meant to split into arguments
  out=$("$1" -c "$_BS_PROBE" $BOOTSTRAP_IMPORTS 2>/dev/null | tail -n 1)
  read -r _bs_status _bs_version _bs_where _bs_torch _bs_details <<<"$out"
}

# "torch, numpy, sentencepiece and 9 more": the missing list, short enough for one line.
_bs_short_list() {
  set -- $_bs_details
  local n=$#
  if [ "$n" -le 3 ]; then echo "$*" | sed 's/ /, /g'; return; fi
  echo "$1, $2, $3 and $((n - 3)) more"
}

_bs_has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
_bs_linux_x86_64() { [[ $_bs_where == */Linux/x86_64/* ]]; }

# Nothing when requirements.lock fits the probed interpreter (CPython 3.11, Linux x86_64, glibc
# >= 2.28: the lock's manylinux_2_28 wheels), else why it does not.
_bs_lock_misfit() {
  local impl system machine libc major minor
  [ -f "$BOOTSTRAP_LOCK" ] || { echo "there is no $BOOTSTRAP_LOCK here"; return; }
  IFS=/ read -r impl system machine libc <<<"$_bs_where"
  IFS=. read -r major minor _ <<<"${libc#glibc-}"
  if [ "$impl/$system/$machine" = CPython/Linux/x86_64 ] && [[ $_bs_version == 3.11.* ]] \
    && [[ $libc == glibc-* && $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] \
    && { [ "$major" -gt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -ge 28 ]; }; }; then
    return
  fi
  [[ $libc == glibc-* ]] && libc="glibc ${libc#glibc-}" || libc="no glibc"
  echo "it is for CPython 3.11 on Linux x86_64 with glibc >= 2.28, this is $impl $_bs_version on $system $machine ($libc)"
}

# The stamp in .venv: the file installed last and its checksum, "requirements.lock 123 456".
_bs_stamp_file() { echo "$PWD/.venv/.requirements.cksum"; }
_bs_stamp() { echo "$1 $(cksum 2>/dev/null <"$1")"; }
_bs_is_repo_venv() { [ "$1" = "$PWD/.venv/bin/python" ]; }
# Nothing when .venv is up to date, else what changed since it was set up.
_bs_stamp_changed() {
  local file
  file=$(head -n 1 "$(_bs_stamp_file)" 2>/dev/null)
  case ${file%% *} in
    requirements.txt|"$BOOTSTRAP_LOCK")
      [ "$file" = "$(_bs_stamp "${file%% *}")" ] || echo "${file%% *}" ;;
    *) echo "its requirements" ;;   # no stamp, or one from before the lock
  esac
}

# pip install "$@" into $1, pip's output appended to the log.
_bs_pip_quiet() {
  local py=$1
  shift
  "$py" -m pip install -q "$@" >>"$_bs_log" 2>&1
}
# One line for a failed pip install: $1 its exit status, the rest its arguments (after the python).
_bs_pip_error() {
  local rc=$1 last
  shift
  last=$(grep -iE '^[a-z]*error' "$_bs_log" | tail -n 1)
  [ -n "$last" ] || last=$(grep -v '^[[:space:]]*$' "$_bs_log" | tail -n 1)
  _bs_fail "pip install $* failed (exit $rc): $last; pip's output: $_bs_log"
}
# pip install "$@" into $1; on failure the one line.
_bs_pip() {
  local rc=0
  _bs_pip_quiet "$@" || rc=$?
  [ "$rc" -eq 0 ] && return 0
  shift
  _bs_pip_error "$rc" "$@"
}

# requirements.lock into $1 (shown as $2), torch included; once more with PyTorch's CPU index when
# pip finds no copy of the lock's CPU torch (it is not on PyPI).
_bs_install_lock() {
  local py=$1 label=$2 pin start rc=0
  pin=$(sed -n 's/^\(torch==[^ ]*\).*/\1/p' "$BOOTSTRAP_LOCK" | head -n 1)
  _bs_say "installing $BOOTSTRAP_LOCK into $label (no GPU: $pin, the CPU build, a ~190 MB wheel, and every package pinned with its hash; minutes the first time)"
  start=$(wc -l <"$_bs_log")
  _bs_pip_quiet "$py" --require-hashes -r "$BOOTSTRAP_LOCK" || rc=$?
  [ "$rc" -eq 0 ] && return 0
  if [ -n "$pin" ] && tail -n +"$((start + 1))" "$_bs_log" | grep -qF "No matching distribution found for $pin"; then
    _bs_say "pip found no $pin here (no local wheel): retrying once with PyTorch's CPU index, --extra-index-url $BOOTSTRAP_CPU_INDEX"
    _bs_pip "$py" --require-hashes -r "$BOOTSTRAP_LOCK" --extra-index-url "$BOOTSTRAP_CPU_INDEX"
    return
  fi
  _bs_pip_error "$rc" --require-hashes -r "$BOOTSTRAP_LOCK"
}

# Installs into interpreter $1 (shown as $2) what it lacks; $3 = yes: torch may be installed over
# the one it has (it is .venv, or it has none). Uses the last probe's facts; sets _bs_installed
# to the requirements file installed.
_bs_install() {
  local py=$1 label=$2 with_torch=$3 misfit rest
  local -a spec=()
  mkdir -p logs && _bs_log=$PWD/logs/bootstrap.log && : >"$_bs_log"
  _bs_installed=requirements.txt rest="its torch $_bs_torch stays"
  if [ -n "${TORCH_SPEC:-}" ]; then
    if [ "$with_torch" = yes ]; then
      read -ra spec <<<"$TORCH_SPEC"   # words, not one argument: "torch==X --index-url URL"
      _bs_say "installing $TORCH_SPEC into $label (TORCH_SPEC as given; minutes the first time)"
      _bs_pip "$py" "${spec[@]}" || return 1
      rest="the rest"
    fi
  elif _bs_has_cuda; then
    if [ "$_bs_torch" = - ]; then
      _bs_say "installing $BOOTSTRAP_TORCH into $label (GPU found: PyPI's default build, CUDA 13.0 on Linux x86_64, several GB with its nvidia packages; minutes the first time)"
      _bs_pip "$py" "$BOOTSTRAP_TORCH" || return 1
      rest="the rest"
    elif [ "${_bs_torch%%+*}" != "${BOOTSTRAP_TORCH#torch==}" ]; then
      rest="its torch $_bs_torch stays, the pinned one is ${BOOTSTRAP_TORCH#torch==}"
    fi
  elif [ "$with_torch" = no ]; then
    _bs_say "$BOOTSTRAP_LOCK not used: it would replace $label's own torch $_bs_torch"
  elif misfit=$(_bs_lock_misfit) && [ -z "$misfit" ]; then
    _bs_install_lock "$py" "$label" || return 1
    _bs_installed=$BOOTSTRAP_LOCK
  else
    _bs_say "$BOOTSTRAP_LOCK not used: $misfit"
    if _bs_linux_x86_64; then
      _bs_say "hint: no GPU here, yet PyPI's torch for Linux x86_64 is the CUDA build (several GB); for the CPU build (~190 MB) stop and rerun with TORCH_SPEC=\"${BOOTSTRAP_TORCH} --index-url $BOOTSTRAP_CPU_INDEX\""
      _bs_say "installing $BOOTSTRAP_TORCH into $label (PyPI's default build, the CUDA one: several GB with its nvidia packages; minutes the first time)"
    else
      _bs_say "installing $BOOTSTRAP_TORCH into $label (PyPI's default build for ${_bs_where%/*}; minutes the first time)"
    fi
    _bs_pip "$py" "$BOOTSTRAP_TORCH" || return 1
    rest="the rest"
  fi
  if [ "$_bs_installed" = requirements.txt ]; then
    _bs_say "installing requirements.txt into $label ($rest)"
    _bs_pip "$py" -r requirements.txt || return 1
  fi
  if _bs_is_repo_venv "$py"; then _bs_stamp "$_bs_installed" >"$(_bs_stamp_file)"; fi
}

# Makes interpreter $1 (shown as $2) good if it is not, then exports it; $3 = new: a venv made
# just now (its lacking everything goes without saying).
_bs_use() {
  local py=$1 label=$2 new=${3:-} with_torch=yes changed
  _bs_probe "$py"
  case $_bs_status in
    ok)
      if _bs_is_repo_venv "$py" && changed=$(_bs_stamp_changed) && [ -n "$changed" ]; then
        _bs_say "$changed changed since $label was last set up here: updating it"
        _bs_install "$py" "$label" yes || return 1
        _bs_probe "$py"
      fi ;;
    missing)
      [ -n "$new" ] || _bs_say "$label lacks $(_bs_short_list): installing the requirements into it"
      # Another interpreter's torch is the user's: keep it if it imports.
      if ! _bs_is_repo_venv "$py" && [ "$_bs_torch" != - ]; then with_torch=no; fi
      _bs_install "$py" "$label" "$with_torch" || return 1
      _bs_probe "$py" ;;
    old) _bs_fail "$label is Python $_bs_version; need >= 3.10 (install one, then set PYTHON=/path/to/python3.x)"; return 1 ;;
    *) _bs_fail "$label ($py) does not run"; return 1 ;;
  esac
  if [ "$_bs_status" != ok ]; then
    _bs_fail "$label still lacks $(_bs_short_list) after installing $_bs_installed; to see why: $py -c 'import ${_bs_details%% *}'"
    return 1
  fi
  _bs_say "using $label (Python $_bs_version, torch $_bs_torch)"
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
    ok) _bs_say "using $base (Python $_bs_version, torch $_bs_torch): it has everything, no .venv needed"
        _bs_export "$base"; return 0 ;;
    old) _bs_fail "python3 is Python $_bs_version; need >= 3.10 (install one, then set PYTHON=/path/to/python3.x)"; return 1 ;;
  esac
  # On a GPU machine the image's CUDA torch (several GB) is seen by .venv and kept: the pinned
  # torch is installed only when none imports.
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
  _bs_installed=requirements.txt
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

# PyPI's torch 2.13 is built for CUDA 13.0, which needs NVIDIA driver R580 or newer; on an older
# driver torch.cuda.is_available() is False and the GPU machine would run the CPU path (run.sh: the
# CPU demo on 8 H100s). CUDA_VISIBLE_DEVICES set empty hides the GPUs on purpose: then no error.
bootstrap_gpus() {
  _bs_tag=${1:-bootstrap}
  local torch_version torch_cuda driver
  read -r BOOTSTRAP_GPUS torch_version torch_cuda < <("$PYTHON" -c "import torch
print(torch.cuda.device_count() if torch.cuda.is_available() else 0, torch.__version__, torch.version.cuda)")
  export BOOTSTRAP_GPUS=${BOOTSTRAP_GPUS:-0}
  if [ "$BOOTSTRAP_GPUS" = 0 ] && [ "${CUDA_VISIBLE_DEVICES-unset}" != "" ] && _bs_has_cuda; then
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
    _bs_fail "nvidia-smi lists a GPU (driver ${driver:-unknown}) that torch $torch_version (CUDA $torch_cuda) cannot use — upgrade the NVIDIA driver (CUDA 13 needs R580 or newer), or install a torch built for this driver's CUDA: rm -rf .venv and rerun with TORCH_SPEC=\"torch --index-url https://download.pytorch.org/whl/cu126\" (CUDA_VISIBLE_DEVICES= for the CPU path)"
    return 1
  fi
}
