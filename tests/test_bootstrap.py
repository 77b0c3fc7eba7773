"""The Python bootstrap (.ci/bootstrap.sh) that run.sh, setup_pod.sh and .ci/run share, and the
lock file it installs on the CPU path (requirements.lock, made by .ci/lock.sh).

No network and no real install: a fake interpreter on PATH stands in for python3, for the venvs it
makes and for pip. It logs every call (and pip's arguments one by one) and keeps its state in files
beside it: `all` (every import works), `torch` (torch imports; its text, if any, is torch's
version), `old` (Python 3.8). pip -r marks `all`, pip torch... marks `torch`. FAKE_VERSION and
FAKE_WHERE (implementation/system/machine/libc) set what the probe reports.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
LOCK_INSTALL = "--require-hashes -r requirements.lock"

FAKE_PYTHON = r"""#!/bin/bash
home=$(cd "$(dirname "$0")/.." && pwd)
args="$*"
echo "$0 ${args//$'\n'/ }" >>"$FAKE_LOG"
[[ -n "$FAKE_ENV_LOG" && "$1" == *.py ]] && env >"$FAKE_ENV_LOG"   # what a script would see
[[ -n "$FAKE_SEED_LOG" && "$1" == *.py ]] && echo "$* SEED=${SEED:-} RUN_ID=${RUN_ID:-}" >>"$FAKE_SEED_LOG"
if [ "$1" = -c ]; then
  [ -n "$2" ] || exit 0                       # "does it run at all"
  # bootstrap_gpus: how many CUDA devices torch can use, its version and its CUDA
  [[ "$2" == *device_count* ]] && { echo "${FAKE_GPUS:-0} ${FAKE_TORCH:-2.13.0+cu130} ${FAKE_TORCH_CUDA:-13.0}"; exit 0; }
  if [ -e "$home/old" ]; then echo "old 3.8.10"; exit 1; fi
  version=${FAKE_VERSION:-3.11.9} where=${FAKE_WHERE:-CPython/Linux/x86_64/glibc-2.36} torch=-
  if [ -e "$home/torch" ]; then torch=$(cat "$home/torch"); torch=${torch:-2.13.0+fake}; fi
  if [ -e "$home/all" ]; then echo "ok $version $where ${torch/#-/2.13.0+fake}"; exit 0; fi
  shift 2
  [ "$torch" = - ] || shift                   # torch is the first module probed
  echo "missing $version $where $torch $*"; exit 1
fi
if [ "$1 $2" = "-m venv" ]; then
  [ -z "$FAKE_VENV_FAIL" ] || exit 1
  dir=${!#}
  mkdir -p "$dir/bin" && cp "$0" "$dir/bin/python" && touch "$dir/pyvenv.cfg"
  exit 0
fi
if [ "$1 $2 $3" = "-m pip install" ]; then
  { printf '%s\x1f' "${@:4}"; echo; } >>"$FAKE_ARGV"
  if [ -n "$FAKE_PIP_FAIL" ] && [[ "$*" == *"$FAKE_PIP_FAIL"* ]]; then
    echo "Looking in links: /nowhere"
    echo "ERROR: No matching distribution found for $FAKE_PIP_FAIL" >&2
    exit 1
  fi
  # No local torch==2.13.0+cpu: the lock fails without PyTorch's CPU index (always: with it too).
  if [ -n "$FAKE_NO_LOCAL_TORCH" ] && [[ "$*" == *requirements.lock* ]] \
    && { [ "$FAKE_NO_LOCAL_TORCH" = always ] || [[ "$*" != *"--extra-index-url $CPU_INDEX"* ]]; }; then
    echo "ERROR: Could not find a version that satisfies the requirement torch==2.13.0+cpu (from versions: 2.13.0)" >&2
    echo "ERROR: No matching distribution found for torch==2.13.0+cpu" >&2
    exit 1
  fi
  [ -n "$FAKE_PIP_NOOP" ] && exit 0           # "installed", yet still fails to import
  case "$*" in *" -r "*) touch "$home/all" ;; *torch*) touch "$home/torch" ;; esac
  exit 0
fi
if [ "$1 $2" = "-m pytest" ]; then exit "${FAKE_PYTEST_RC:-0}"; fi
exit 0
"""


class Sandbox:
    """A repo copy (only the files the bootstrap's callers read) and a PATH with the fake python3."""

    def __init__(self, tmp_path: Path):
        self.root = tmp_path
        self.repo = tmp_path / "repo"
        (self.repo / ".ci").mkdir(parents=True)
        for name in (".ci/bootstrap.sh", ".ci/run", "run.sh", "requirements.txt", "requirements.lock"):
            shutil.copy(ROOT / name, self.repo / name)
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.system_python = self.fake_python(self.bin / "python3")
        self.gpu(False)
        self.log = tmp_path / "calls.log"
        self.argv = tmp_path / "argv.log"
        self.env = {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C",
                    "PIP_NO_INDEX": "1", "FAKE_LOG": str(self.log), "FAKE_ARGV": str(self.argv),
                    "CPU_INDEX": CPU_INDEX}

    def fake_python(self, path: Path, *state: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(FAKE_PYTHON)
        path.chmod(0o755)
        for name in state:
            (path.parent.parent / name).touch()
        return path

    def gpu(self, present: bool, driver: str = "580.65.06") -> None:
        """A fake nvidia-smi: -L lists an H100 (or fails: no GPU); --query-gpu=driver_version prints `driver`."""
        smi = self.bin / "nvidia-smi"
        listing = (f'case "$*" in *driver_version*) echo {driver} ;; *) echo "GPU 0: NVIDIA H100 80GB HBM3" ;; esac\n'
                   if present else "exit 9\n")
        smi.write_text("#!/bin/sh\n" + listing)
        smi.chmod(0o755)

    def bootstrap(self, **env):
        """Source the bootstrap, run it, and report what it exported."""
        script = ('. .ci/bootstrap.sh && bootstrap_python test && '
                  'echo "PYTHON=$PYTHON" && echo "VIRTUAL_ENV=${VIRTUAL_ENV:-}" && echo "PATH=$PATH"')
        return self.run(["bash", "-c", script], **env)

    def run(self, argv, **env):
        self.log.write_text("")
        self.argv.write_text("")
        res = subprocess.run(argv, cwd=self.repo, env={**self.env, **env}, capture_output=True,
                             text=True, timeout=30)
        res.said = [line for line in res.stdout.splitlines() if line.startswith("test: ")]
        res.exported = dict(line.split("=", 1) for line in res.stdout.splitlines()
                            if line.split("=")[0] in ("PYTHON", "VIRTUAL_ENV", "PATH"))
        res.calls = self.log.read_text().splitlines()
        res.pip_argv = [line.split("\x1f")[:-1] for line in self.argv.read_text().splitlines()]
        return res

    def pip_calls(self, res):
        return [c.split(" -m pip install -q ", 1)[1] for c in res.calls if " -m pip install " in c]

    def venv_calls(self, res):
        return [c for c in res.calls if " -m venv " in c]


@pytest.fixture
def box(tmp_path):
    return Sandbox(tmp_path)


def said_index(res, text):
    """The index of the first line said that contains text (ValueError if none does)."""
    return next(i for i, line in enumerate(res.said) if text in line)


def test_missing_venv_is_created_from_the_lock_then_reused(box):
    res = box.bootstrap()
    assert res.returncode == 0, res.stderr
    venv_python = box.repo / ".venv" / "bin" / "python"
    assert box.venv_calls(res) == [f"{box.system_python} -m venv .venv"]
    assert box.pip_calls(res) == [LOCK_INSTALL]  # torch included: one step
    assert res.pip_argv == [["-q", "--require-hashes", "-r", "requirements.lock"]]
    assert res.exported["PYTHON"] == str(venv_python)
    assert res.exported["VIRTUAL_ENV"] == str(box.repo / ".venv")
    assert res.exported["PATH"].startswith(f"{venv_python.parent}:")
    assert [line.split(":")[1].split()[0] for line in res.said] == ["python3", "installing", "using"]
    assert "creating .venv" in res.said[0]
    assert res.said[1].startswith("test: installing requirements.lock into .venv (no GPU: "
                                  "torch==2.13.0+cpu, the CPU build, a ~190 MB wheel")
    assert not any("hint" in line or "CUDA" in line for line in res.said)
    assert res.stderr == ""

    again = box.bootstrap()
    assert again.returncode == 0
    assert box.pip_calls(again) == [] and box.venv_calls(again) == []
    assert again.said == ["test: using .venv (Python 3.11.9, torch 2.13.0+fake)"]
    assert again.exported["PYTHON"] == str(venv_python)


def test_no_local_cpu_torch_retries_once_with_pytorchs_cpu_index(box):
    res = box.bootstrap(FAKE_NO_LOCAL_TORCH="1")
    assert res.returncode == 0, res.stderr
    assert box.pip_calls(res) == [LOCK_INSTALL, f"{LOCK_INSTALL} --extra-index-url {CPU_INDEX}"]
    retry = said_index(res, "retrying")
    assert res.said[retry] == (f"test: pip found no torch==2.13.0+cpu here (no local wheel): retrying "
                               f"once with PyTorch's CPU index, --extra-index-url {CPU_INDEX}")
    assert said_index(res, "installing requirements.lock") < retry < said_index(res, "using")

    shutil.rmtree(box.repo / ".venv")
    failed = box.bootstrap(FAKE_NO_LOCAL_TORCH="always")
    assert failed.returncode == 1 and len(box.pip_calls(failed)) == 2  # once, not again
    assert failed.stderr.count("\n") == 1
    assert failed.stderr.startswith(f"test: error: pip install {LOCK_INSTALL} --extra-index-url {CPU_INDEX} failed")


def test_another_lock_failure_is_not_retried(box):
    res = box.bootstrap(FAKE_PIP_FAIL="requirements.lock")
    assert res.returncode == 1 and box.pip_calls(res) == [LOCK_INSTALL]
    assert not any("retrying" in line for line in res.said)
    assert res.stderr.startswith(f"test: error: pip install {LOCK_INSTALL} failed (exit 1): ")


@pytest.mark.parametrize("version, where, file", [
    ("3.11.9", "CPython/Linux/x86_64/glibc-2.36", "requirements.lock"),
    ("3.12.4", "CPython/Linux/x86_64/glibc-2.36", "requirements.txt"),
])
def test_a_changed_requirements_file_updates_the_venv(box, version, where, file):
    env = {"FAKE_VERSION": version, "FAKE_WHERE": where}
    assert box.bootstrap(**env).returncode == 0
    other = "requirements.txt" if file == "requirements.lock" else "requirements.lock"
    with open(box.repo / other, "a") as f:  # the file not installed: no update
        f.write("# another line\n")
    assert box.pip_calls(box.bootstrap(**env)) == []
    with open(box.repo / file, "a") as f:
        f.write("# another line\n")
    res = box.bootstrap(**env)
    assert res.returncode == 0
    assert res.said[0] == f"test: {file} changed since .venv was last set up here: updating it"
    expected = [LOCK_INSTALL] if file == "requirements.lock" else ["torch==2.13.0", "-r requirements.txt"]
    assert box.pip_calls(res) == expected
    assert box.pip_calls(box.bootstrap(**env)) == []  # the new checksum was recorded


def test_a_stamp_from_before_the_lock_updates_the_venv_once(box):
    assert box.bootstrap().returncode == 0
    stamp = box.repo / ".venv" / ".requirements.cksum"
    stamp.write_text("1234567890 456\n")  # the old format: requirements.txt's cksum alone
    res = box.bootstrap()
    assert res.said[0] == "test: its requirements changed since .venv was last set up here: updating it"
    assert box.pip_calls(res) == [LOCK_INSTALL]
    assert stamp.read_text().startswith("requirements.lock ")
    assert box.pip_calls(box.bootstrap()) == []


@pytest.mark.parametrize("version, where, why, hint", [
    ("3.12.4", "CPython/Linux/x86_64/glibc-2.36", "this is CPython 3.12.4 on Linux x86_64 (glibc 2.36)", True),
    ("3.11.9", "PyPy/Linux/x86_64/glibc-2.36", "this is PyPy 3.11.9 on Linux x86_64", True),
    ("3.11.9", "CPython/Linux/x86_64/glibc-2.17", "(glibc 2.17)", True),
    ("3.11.9", "CPython/Linux/x86_64/-", "(no glibc)", True),
    ("3.11.9", "CPython/Linux/aarch64/glibc-2.36", "on Linux aarch64", False),
    ("3.11.9", "CPython/Darwin/arm64/-", "on Darwin arm64", False),
])
def test_where_the_lock_does_not_fit_requirements_txt_is_installed_with_one_line_why(
        box, version, where, why, hint):
    res = box.bootstrap(FAKE_VERSION=version, FAKE_WHERE=where)
    assert res.returncode == 0, res.stderr
    assert box.pip_calls(res) == ["torch==2.13.0", "-r requirements.txt"]
    why_line = said_index(res, "requirements.lock not used")
    assert res.said[why_line].startswith("test: requirements.lock not used: it is for CPython 3.11 on "
                                         "Linux x86_64 with glibc >= 2.28, this is ")
    assert why in res.said[why_line]
    install = said_index(res, "installing torch==2.13.0")
    hints = [i for i, line in enumerate(res.said) if line.startswith("test: hint: ")]
    if hint:  # PyPI's torch for Linux x86_64 is the CUDA build: say how to get the CPU one first
        assert hints == [install - 1]
        assert res.said[install - 1].endswith(
            f'rerun with TORCH_SPEC="torch==2.13.0 --index-url {CPU_INDEX}"')
        assert "CUDA" in res.said[install] and "several GB" in res.said[install]
    else:
        assert hints == [] and "CUDA" not in res.said[install]
    assert why_line < install < said_index(res, "installing requirements.txt")


def test_no_lock_file_falls_back_to_requirements_txt(box):
    (box.repo / "requirements.lock").unlink()
    res = box.bootstrap()
    assert res.returncode == 0
    assert box.pip_calls(res) == ["torch==2.13.0", "-r requirements.txt"]
    assert "test: requirements.lock not used: there is no requirements.lock here" in res.said


def test_a_gpu_gets_the_pinned_cuda_torch_then_requirements_txt(box):
    box.gpu(True)
    res = box.bootstrap()
    assert res.returncode == 0, res.stderr
    assert box.venv_calls(res) == [f"{box.system_python} -m venv --system-site-packages .venv"]
    assert box.pip_calls(res) == ["torch==2.13.0", "-r requirements.txt"]
    assert res.said[1].startswith("test: installing torch==2.13.0 into .venv (GPU found: PyPI's "
                                  "default build, CUDA 13.0 on Linux x86_64, several GB")
    assert res.said[2] == "test: installing requirements.txt into .venv (the rest)"
    assert not any("hint" in line or "lock" in line for line in res.said)


@pytest.mark.parametrize("theirs, shown", [("2.9.1+cu128", "its torch 2.9.1+cu128 stays, the pinned one is 2.13.0)"),
                                           ("2.13.0+cu130", "its torch 2.13.0+cu130 stays)")])
def test_on_a_gpu_the_users_own_torch_is_kept_and_shown_next_to_the_pin(box, theirs, shown):
    box.gpu(True)
    venv = box.root / "myenv"
    python = box.fake_python(venv / "bin" / "python", "torch")
    (venv / "torch").write_text(theirs)
    res = box.bootstrap(VIRTUAL_ENV=str(venv))
    assert res.returncode == 0, res.stderr
    assert box.pip_calls(res) == ["-r requirements.txt"]
    assert res.said[1] == f"test: installing requirements.txt into the active venv {venv} ({shown}"
    assert res.said[2] == f"test: using the active venv {venv} (Python 3.11.9, torch {theirs})"
    assert res.exported["PYTHON"] == str(python)


def test_torch_spec_words_reach_pip_as_separate_arguments(box):
    spec = f"torch==2.13.0 --index-url {CPU_INDEX}"
    res = box.bootstrap(TORCH_SPEC=spec)
    assert res.returncode == 0, res.stderr
    assert res.pip_argv == [["-q", "torch==2.13.0", "--index-url", CPU_INDEX],
                            ["-q", "-r", "requirements.txt"]]
    assert res.said[1] == f"test: installing {spec} into .venv (TORCH_SPEC as given; minutes the first time)"
    box.gpu(True)
    shutil.rmtree(box.repo / ".venv")
    assert box.pip_calls(box.bootstrap(TORCH_SPEC="torch==2.14.1")) == ["torch==2.14.1", "-r requirements.txt"]


def test_an_active_venv_is_used_and_its_own_torch_kept(box):
    venv = box.root / "myenv"
    python = box.fake_python(venv / "bin" / "python", "torch")  # has torch, lacks the rest
    res = box.bootstrap(VIRTUAL_ENV=str(venv))
    assert res.returncode == 0, res.stderr
    assert box.pip_calls(res) == ["-r requirements.txt"]  # not the lock: it pins torch
    assert res.said[1] == (f"test: requirements.lock not used: it would replace the active venv "
                           f"{venv}'s own torch 2.13.0+fake")
    assert res.said[2] == f"test: installing requirements.txt into the active venv {venv} (its torch 2.13.0+fake stays)"
    assert res.calls[-1].startswith(f"{python} -c")
    assert res.exported["PYTHON"] == str(python) and res.exported["VIRTUAL_ENV"] == str(venv)
    assert not (box.repo / ".venv").exists()

    good = box.bootstrap(VIRTUAL_ENV=str(venv))
    assert box.pip_calls(good) == [] and good.said[0].startswith(f"test: using the active venv {venv}")


def test_a_users_interpreter_without_torch_gets_the_lock(box):
    python = box.fake_python(box.root / "opt" / "bin" / "python3.11")
    res = box.bootstrap(PYTHON=str(python))
    assert res.returncode == 0, res.stderr
    assert box.pip_calls(res) == [LOCK_INSTALL]
    assert not (box.repo / ".venv").exists()


def test_python_wins_over_an_active_venv_and_is_taken_as_given(box):
    python = box.fake_python(box.root / "opt" / "bin" / "python3.11", "all")
    res = box.bootstrap(PYTHON=str(python), VIRTUAL_ENV=str(box.root / "elsewhere"))
    assert res.returncode == 0, res.stderr
    assert res.exported["PYTHON"] == str(python)
    assert box.pip_calls(res) == [] and box.venv_calls(res) == []
    assert res.said == [f"test: using PYTHON={python} (Python 3.11.9, torch 2.13.0+fake)"]

    missing = box.bootstrap(PYTHON=str(box.root / "nope" / "python"))
    assert missing.returncode == 1 and "does not run" in missing.stderr


def test_a_system_python_that_has_everything_needs_no_venv(box):
    (box.root / "all").touch()
    res = box.bootstrap()
    assert res.returncode == 0
    assert res.exported["PYTHON"] == str(box.system_python)
    assert box.venv_calls(res) == [] and box.pip_calls(res) == []
    assert not (box.repo / ".venv").exists()


@pytest.mark.parametrize("gpu, failing", [(False, "requirements.lock"), (True, "torch==2.13.0"),
                                          (True, "requirements.txt")])
def test_a_failing_install_stops_with_one_line(box, gpu, failing):
    box.gpu(gpu)
    res = box.bootstrap(FAKE_PIP_FAIL=failing)
    assert res.returncode == 1
    assert "PYTHON=" not in res.stdout and not any("using" in s for s in res.said)
    assert res.stderr.count("\n") == 1
    assert res.stderr.startswith("test: error: pip install ")
    assert f"ERROR: No matching distribution found for {failing}" in res.stderr
    assert "logs/bootstrap.log" in res.stderr


def test_modules_that_still_fail_after_the_install_stop_with_one_line(box):
    res = box.bootstrap(FAKE_PIP_NOOP="1")
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert re.search(r"still lacks torch, numpy, sentencepiece and \d+ more after installing "
                     r"requirements\.lock", res.stderr)
    assert res.stderr.rstrip().endswith("-c 'import torch'")


def test_an_old_python3_or_no_venv_module_is_one_line(box):
    (box.root / "old").touch()
    res = box.bootstrap()
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "Python 3.8.10; need >= 3.10" in res.stderr
    (box.root / "old").unlink()
    res = box.bootstrap(FAKE_VENV_FAIL="1")
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "python3-venv" in res.stderr


def test_a_broken_venv_is_recreated(box):
    (box.repo / ".venv" / "bin").mkdir(parents=True)  # e.g. its base Python was removed
    res = box.bootstrap()
    assert res.returncode == 0, res.stderr
    assert "broken" in res.said[0]
    assert box.venv_calls(res) == [f"{box.system_python} -m venv --clear .venv"]


def test_ci_run_bootstraps_then_runs_the_test_command(box):
    res = box.run(["bash", ".ci/run"])
    assert res.returncode == 0, res.stderr
    assert res.calls[-1] == f"{box.repo}/.venv/bin/python -m pytest -q tests"
    assert box.run(["bash", ".ci/run", "-k", "data"]).calls[-1].endswith("-m pytest -k data")
    no_tests = box.run(["bash", ".ci/run"], FAKE_PYTEST_RC="5")
    assert no_tests.returncode == 1 and "collected no tests" in no_tests.stderr


def test_run_sh_runs_its_python_step_with_the_bootstrapped_python(box):
    (box.repo / "experiments").mkdir()
    shutil.copy(ROOT / "experiments" / "profile.sh", box.repo / "experiments" / "profile.sh")
    res = box.run(["bash", "run.sh"], DRY_RUN="1")
    assert res.returncode == 0, res.stderr
    # DRY_RUN's script (train_gpt.py or a helper under experiments/) under .venv's python
    assert re.fullmatch(rf"{re.escape(str(box.repo))}/\.venv/bin/python [\w/]+\.py", res.calls[-1])
    assert res.stdout.startswith("run.sh: python3 3.11.9 lacks torch, numpy, sentencepiece and ")


def test_run_sh_applies_a_record_profile_to_dry_run_and_to_a_cpu_run(box, tmp_path):
    (box.repo / "experiments").mkdir()
    shutil.copy(ROOT / "experiments" / "profile.sh", box.repo / "experiments" / "profile.sh")
    seen = tmp_path / "env.txt"
    for env, script in (({"DRY_RUN": "1"}, "experiments/cost_model.py"), ({}, "train_gpt.py")):
        res = box.run(["bash", "run.sh"], PROFILE="record_0405", FAKE_ENV_LOG=str(seen), MODEL_DIM="256", **env)
        calls = [c.split()[-1] for c in res.calls if c.split()[-1].endswith(".py")]
        assert script in calls, (calls, res.stderr)   # records.py runs after train_gpt.py
        exported_text = seen.read_text()
        exported = dict(line.split("=", 1) for line in exported_text.splitlines() if "=" in line)
        assert exported["SKIPS"] == "virtual" and exported["CRAWLER_POSITION"] == "4", env
        assert exported["MODEL_DIM"] == "256"   # a value the user set wins
        if not env:   # without CUDA: the demo corpus, not the demo profile; and without PROFILE, the demo
            res = box.run(["bash", "run.sh"], FAKE_ENV_LOG=str(seen))
            assert res.returncode == 0 and "CPU demo profile" in res.stdout, res.stderr
            assert "NUM_FLAT_LAYERS=2" in seen.read_text()
            seen.write_text(exported_text)
            assert exported["DATA_PATH"] == "data/datasets/local_sp8192" and "NUM_FLAT_LAYERS=9" in seen.read_text()
            assert exported["VOCAB_SIZE"] == "8192" and exported["EMBED_GPTQ"] == "1" and "VARIANT" not in exported
            res = box.run(["bash", "run.sh"], PROFILE="record_0427", FAKE_ENV_LOG=str(seen), MODEL_DIM="256")
            caseops = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
            assert res.returncode == 0 and caseops["DATA_PATH"] == "data/datasets/local_caseops_sp8192", res.stderr
            assert caseops["LQER_RANK"] == "4" and caseops["EMBED_QUANT"] == "int7"
            assert any("prepare_local.py" in c and "--caseops" in c for c in res.calls), res.calls


def test_the_pod_default_is_the_2026_04_27_profile_for_dry_run_and_rehearsal(box, tmp_path):
    """Without PROFILE, DRY_RUN costs and REHEARSAL rehearses what a pod trains: PROFILE=record_0427 (the rehearsal
    on the demo corpus at its tokenizer, CaseOps sp8192, when FineWeb is absent); PROFILE=pod is the knob defaults."""
    (box.repo / "experiments").mkdir()
    shutil.copy(ROOT / "experiments" / "profile.sh", box.repo / "experiments" / "profile.sh")
    seen = tmp_path / "env.txt"
    for switch, script in (("DRY_RUN", "experiments/cost_model.py"), ("REHEARSAL", "experiments/rehearsal.py")):
        res = box.run(["bash", "run.sh"], FAKE_ENV_LOG=str(seen), **{switch: "1"})
        assert res.returncode == 0 and res.calls[-1].endswith(script), res.stderr
        env = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
        assert env["LQER_RANK"] == "4" and env["CRAWLER_LOOPS_SCHEDULE"] == "0:1,0.35:3", switch
        assert "record_0427" in res.stdout and switch not in env
    assert env["DATA_PATH"] == "data/datasets/local_caseops_sp8192" and env["ITERATIONS"] == "2"
    res = box.run(["bash", "run.sh"], FAKE_ENV_LOG=str(seen), DRY_RUN="1", PROFILE="pod")
    assert res.returncode == 0 and "LQER_RANK" not in seen.read_text() and "the knob defaults" not in res.stdout


@pytest.mark.parametrize("script", ["run.sh", "setup_pod.sh"])
def test_a_gpu_torch_cannot_use_is_one_error_line_never_the_cpu_demo(box, tmp_path, script):
    """Issue 40: PyPI's torch 2.13 is built for CUDA 13 (driver R580+). On an older driver nvidia-smi lists the GPUs,
    torch.cuda.is_available() is False, and run.sh trained the CPU demo on 8 H100s. Now: one error line naming the
    driver and the torch build, with the fix; nothing trains. CUDA_VISIBLE_DEVICES= (empty) is the CPU path."""
    (box.repo / "experiments").mkdir()
    shutil.copy(ROOT / "experiments" / "profile.sh", box.repo / "experiments" / "profile.sh")
    shutil.copy(ROOT / "setup_pod.sh", box.repo / "setup_pod.sh")
    seen = tmp_path / "env.txt"
    box.gpu(True, driver="535.183.01")
    res = box.run(["bash", script], FAKE_GPUS="0", FAKE_ENV_LOG=str(seen))
    assert res.returncode == 1, res.stdout + res.stderr
    tag = script.removesuffix(".sh") if script == "setup_pod.sh" else script
    assert res.stderr == (f"{tag}: error: nvidia-smi lists a GPU (driver 535.183.01) that torch 2.13.0+cu130 "
                          "(CUDA 13.0) cannot use — upgrade the NVIDIA driver (CUDA 13 needs R580 or newer), or install "
                          "a torch built for this driver's CUDA: rm -rf .venv and rerun with TORCH_SPEC=\"torch "
                          "--index-url https://download.pytorch.org/whl/cu126\" (CUDA_VISIBLE_DEVICES= for the CPU "
                          "path)\n")
    assert not seen.exists() and "CPU demo" not in res.stdout   # no script ran: no demo, no data fetch
    if script == "run.sh":
        hidden = box.run(["bash", script], FAKE_GPUS="0", FAKE_ENV_LOG=str(seen), CUDA_VISIBLE_DEVICES="")
        assert hidden.returncode == 0 and "CPU demo profile" in hidden.stdout, hidden.stderr
        usable = box.run(["bash", "-c", ". .ci/bootstrap.sh && bootstrap_python test && bootstrap_gpus test && "
                          "echo gpus=$BOOTSTRAP_GPUS"], FAKE_GPUS="8")
        assert usable.returncode == 0 and usable.stdout.splitlines()[-1] == "gpus=8", usable.stderr


def test_run_sh_seeds_train_each_seed_then_write_one_folder(box, tmp_path):
    """SEEDS=a,b,c: train_gpt.py once per seed (SEED and its own RUN_ID), then records.py once over all the runs;
    COMPARE_TO is read before any training; a bad SEEDS stops before training with one line."""
    (box.repo / "experiments").mkdir()
    shutil.copy(ROOT / "experiments" / "profile.sh", box.repo / "experiments" / "profile.sh")
    seen = tmp_path / "seeds.txt"
    res = box.run(["bash", "run.sh"], SEEDS="42,0,1234", RUN_ID="sub", COMPARE_TO="records/old", FAKE_SEED_LOG=str(seen))
    assert res.returncode == 0, res.stderr
    lines = [line for line in seen.read_text().splitlines() if "prepare_local" not in line]   # the demo's data
    scripts = [line.split(" SEED=")[0] for line in lines]
    assert scripts == ["experiments/records.py --check-baseline records/old"] + ["train_gpt.py"] * 3 + [
        "experiments/records.py logs/sub_seed42.json logs/sub_seed0.json logs/sub_seed1234.json --name sub "
        "--compare-to records/old"]
    runs = [line.split(" ", 1)[1] for line in lines[1:4]]
    assert runs == ["SEED=42 RUN_ID=sub_seed42", "SEED=0 RUN_ID=sub_seed0", "SEED=1234 RUN_ID=sub_seed1234"]
    for bad in ({"SEEDS": "42"}, {"SEEDS": "42,x"}, {"SEEDS": "1,2,1"}, {"SEEDS": "1,2", "SEED": "3"}):
        seen.write_text("")
        res = box.run(["bash", "run.sh"], FAKE_SEED_LOG=str(seen), **bad)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "SEED" in res.stderr, (bad, res.stderr)
        assert seen.read_text() == ""   # nothing ran


def _lock_entries(text):
    """{canonical name: (version, [hashes])} from a pip requirements file with --hash lines."""
    entries = {}
    logical = re.sub(r"\\\n", " ", "\n".join(l.split(" #")[0] for l in text.splitlines()
                                              if not l.lstrip().startswith("#")))
    for line in logical.splitlines():
        words = line.split()
        if not words:
            continue
        name, sep, version = words[0].partition("==")
        assert sep and version, f"not pinned with ==: {line}"
        hashes = [w.removeprefix("--hash=sha256:") for w in words[1:]]
        assert all(w.startswith("--hash=sha256:") for w in words[1:]), f"not only hashes: {line}"
        entries[canonicalize_name(name)] = (version, hashes)
    return entries


def test_the_lock_pins_every_requirement_with_hashes_and_the_cpu_torch():
    text = (ROOT / "requirements.lock").read_text()
    entries = _lock_entries(text)
    required = [Requirement(line.split("#")[0]) for line in
                (ROOT / "requirements.txt").read_text().splitlines() if line.split("#")[0].strip()]
    assert len(required) >= 13
    for req in required:
        name = canonicalize_name(req.name)
        assert name in entries, f"{req.name} is in requirements.txt but not in requirements.lock"
        assert req.specifier.contains(entries[name][0], prereleases=True), (
            f"requirements.lock's {req.name}=={entries[name][0]} is outside requirements.txt's {req.specifier}")
    assert entries["torch"][0] == "2.13.0+cpu"
    for name, (version, hashes) in entries.items():
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), f"{name}: no --hash"
    assert "Generated by .ci/lock.sh" in text and "do not edit by hand" in text
    for leak in ("/opt/", "/tmp/", "/dev/", "/home/", "/root/", "--index-url", "--find-links"):
        assert leak not in text
    assert os.access(ROOT / ".ci" / "lock.sh", os.X_OK)


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = readme.split("## The two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in commands.strip().splitlines()] == [
        "bash run.sh", "bash .ci/run"]
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
