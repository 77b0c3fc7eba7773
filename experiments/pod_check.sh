#!/usr/bin/env bash
# The one-GPU check (experiments/pod_check.py has what each phase measures).
#
#   bash experiments/pod_check.sh prepare     where the package registry is reachable (this machine): the
#                                             wheels the check needs beyond the GPU image's torch, numpy and
#                                             sentencepiece (brotli, python-minifier: CPython 3.12), the
#                                             CaseOps sp8192 sample of the shipped corpus, and the 2026-04-27
#                                             record's train_gpt.py, into .pod_check/ (git-ignored, <= 60 MiB)
#   bash experiments/pod_check.sh [--out DIR] on one H100 with no network, .pod_check/ carried along: installs
#                                             the carried wheels, then runs the phases (8 minutes at most) and
#                                             writes DIR/pod_check.json and DIR/summary.txt (DIR: $OUT if set)
#   bash experiments/pod_check.sh --cpu       the same phases at tiny shapes, anywhere (the suite runs it)
#
# prepare and --cpu find or make the project's Python as run.sh does (.ci/bootstrap.sh: PYTHON, the active
# venv, .venv, or a new .venv); on the GPU it is PYTHON or python3, the image's own, which holds torch.
set -euo pipefail
cd "$(dirname "$0")/.."
case " $* " in
  *" prepare "*|*" --cpu "*) . .ci/bootstrap.sh; bootstrap_python pod_check || exit 1; PY=$PYTHON ;;
  *) PY=${PYTHON:-python3} ;;
esac
carry=.pod_check
# The wheels the GPU image lacks, at the lock's versions: brotli (the artifact's coder) and python-minifier (the
# packed script the cap counts)
wheels=$(sed -n 's/^\(brotli\|python-minifier\)==\([0-9.]*\).*/\1==\2/p' requirements.lock | tr '\n' ' ')

if [ "${1:-}" = prepare ]; then
  mkdir -p "$carry/whl" "$carry/record"
  echo "pod_check: wheels for CPython 3.12 manylinux x86_64 into $carry/whl: $wheels"
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$carry/whl" $wheels
  echo "pod_check: the CaseOps sp8192 sample of the shipped corpus into $carry/data"
  "$PY" data/prepare_local.py --vocab-size 8192 --caseops --out-root "$carry/data" >/dev/null
  echo "pod_check: the 2026-04-27 record's train_gpt.py (readable) into $carry/record"
  "$PY" - "$carry/record/r0427_train_gpt.py" <<'PYEOF'
import sys
sys.path.insert(0, "experiments/proxy_fidelity")
import port
open(sys.argv[1], "w").write(port.read_source(port.SCRIPTS["r0427"]))
PYEOF
  mib=$(du -sm "$carry" | cut -f1)
  if [ "$mib" -gt 60 ]; then
    echo "pod_check: error: $carry holds $mib MiB, over the 60 MiB it may carry" >&2
    exit 1
  fi
  echo "pod_check: $carry ready ($mib MiB): carry it to the GPU machine and run 'bash experiments/pod_check.sh'"
  exit 0
fi

cpu=0
for arg in "$@"; do [ "$arg" = --cpu ] && cpu=1; done
if [ "$cpu" = 0 ] && ! "$PY" -c "import brotli, python_minifier" 2>/dev/null; then
  # the GPU image has no registry: the carried wheels, installed beside its own packages
  if ! ls "$carry"/whl/*.whl >/dev/null 2>&1; then
    echo "pod_check: error: brotli or python-minifier is missing and $carry/whl holds no wheels — run 'bash experiments/pod_check.sh prepare' where pip reaches its registry, and carry $carry" >&2
    exit 1
  fi
  site=$(mktemp -d /tmp/pod_check_site.XXXXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$carry"/whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" experiments/pod_check.py "$@"
