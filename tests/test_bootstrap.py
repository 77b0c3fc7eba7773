"""The Python bootstrap (.ci/bootstrap.sh) that run.sh, setup_pod.sh and .ci/run share.

No network and no real install: a fake interpreter on PATH stands in for python3, for the venvs it
makes and for pip. It logs every call and keeps its state in files beside it: `all` (every import
works), `torch` (torch imports), `old` (Python 3.8). pip -r marks `all`, pip torch... marks `torch`.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = r"""#!/bin/bash
home=$(cd "$(dirname "$0")/.." && pwd)
args="$*"
echo "$0 ${args//$'\n'/ }" >>"$FAKE_LOG"
if [ "$1" = -c ]; then
  [ -n "$2" ] || exit 0                       # "does it run at all"
  if [ -e "$home/old" ]; then echo "old 3.8.10"; exit 1; fi
  if [ -e "$home/all" ]; then echo "ok 3.11.9 2.13.0+fake"; exit 0; fi
  shift 2
  [ -e "$home/torch" ] && shift               # torch is the first module probed
  echo "missing 3.11.9 $*"; exit 1
fi
if [ "$1 $2" = "-m venv" ]; then
  [ -z "$FAKE_VENV_FAIL" ] || exit 1
  dir=${!#}
  mkdir -p "$dir/bin" && cp "$0" "$dir/bin/python" && touch "$dir/pyvenv.cfg"
  exit 0
fi
if [ "$1 $2 $3" = "-m pip install" ]; then
  if [ -n "$FAKE_PIP_FAIL" ] && [[ "$*" == *"$FAKE_PIP_FAIL"* ]]; then
    echo "Looking in links: /nowhere"
    echo "ERROR: No matching distribution found for $FAKE_PIP_FAIL" >&2
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
        for name in (".ci/bootstrap.sh", ".ci/run", "run.sh", "requirements.txt"):
            shutil.copy(ROOT / name, self.repo / name)
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.system_python = self.fake_python(self.bin / "python3")
        self.gpu(False)
        self.log = tmp_path / "calls.log"
        self.env = {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C",
                    "PIP_NO_INDEX": "1", "FAKE_LOG": str(self.log)}

    def fake_python(self, path: Path, *state: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(FAKE_PYTHON)
        path.chmod(0o755)
        for name in state:
            (path.parent.parent / name).touch()
        return path

    def gpu(self, present: bool) -> None:
        smi = self.bin / "nvidia-smi"
        smi.write_text("#!/bin/sh\n" + ("echo 'GPU 0: H100'\n" if present else "exit 9\n"))
        smi.chmod(0o755)

    def bootstrap(self, **env):
        """Source the bootstrap, run it, and report what it exported."""
        script = ('. .ci/bootstrap.sh && bootstrap_python test && '
                  'echo "PYTHON=$PYTHON" && echo "VIRTUAL_ENV=${VIRTUAL_ENV:-}" && echo "PATH=$PATH"')
        return self.run(["bash", "-c", script], **env)

    def run(self, argv, **env):
        self.log.write_text("")
        res = subprocess.run(argv, cwd=self.repo, env={**self.env, **env}, capture_output=True,
                             text=True, timeout=30)
        res.said = [line for line in res.stdout.splitlines() if line.startswith("test: ")]
        res.exported = dict(line.split("=", 1) for line in res.stdout.splitlines()
                            if line.split("=")[0] in ("PYTHON", "VIRTUAL_ENV", "PATH"))
        res.calls = self.log.read_text().splitlines()
        return res

    def pip_calls(self, res):
        return [c.split(" -m pip install -q ", 1)[1] for c in res.calls if " -m pip install " in c]

    def venv_calls(self, res):
        return [c for c in res.calls if " -m venv " in c]


@pytest.fixture
def box(tmp_path):
    return Sandbox(tmp_path)


def test_missing_venv_is_created_with_the_cpu_torch_then_reused(box):
    res = box.bootstrap()
    assert res.returncode == 0, res.stderr
    venv_python = box.repo / ".venv" / "bin" / "python"
    assert box.venv_calls(res) == [f"{box.system_python} -m venv .venv"]
    assert box.pip_calls(res) == ["torch==2.13.0", "-r requirements.txt"]
    assert res.exported["PYTHON"] == str(venv_python)
    assert res.exported["VIRTUAL_ENV"] == str(box.repo / ".venv")
    assert res.exported["PATH"].startswith(f"{venv_python.parent}:")
    assert [line.split(":")[1].split()[0] for line in res.said] == ["python3", "installing",
                                                                    "installing", "using"]
    assert "creating .venv" in res.said[0] and "no CUDA" in res.said[1]
    assert res.stderr == ""

    again = box.bootstrap()
    assert again.returncode == 0
    assert box.pip_calls(again) == [] and box.venv_calls(again) == []
    assert again.said == ["test: using .venv (Python 3.11.9, torch 2.13.0+fake)"]
    assert again.exported["PYTHON"] == str(venv_python)


def test_a_changed_requirements_file_updates_the_venv(box):
    assert box.bootstrap().returncode == 0
    with open(box.repo / "requirements.txt", "a") as f:
        f.write("rich>=13\n")
    res = box.bootstrap()
    assert res.returncode == 0
    assert "requirements.txt changed" in res.said[0]
    assert box.pip_calls(res) == ["torch==2.13.0", "-r requirements.txt"]
    assert box.pip_calls(box.bootstrap()) == []  # the new checksum was recorded


def test_a_gpu_gets_the_default_cuda_torch_and_the_images_packages(box):
    box.gpu(True)
    res = box.bootstrap()
    assert res.returncode == 0, res.stderr
    assert box.venv_calls(res) == [f"{box.system_python} -m venv --system-site-packages .venv"]
    assert box.pip_calls(res) == ["-r requirements.txt"]
    assert "CUDA found" in res.said[1]


def test_torch_spec_overrides_the_choice(box):
    res = box.bootstrap(TORCH_SPEC="torch==2.14.1")
    assert res.returncode == 0
    assert box.pip_calls(res) == ["torch==2.14.1", "-r requirements.txt"]


def test_an_active_venv_is_used_and_its_own_torch_kept(box):
    venv = box.root / "myenv"
    python = box.fake_python(venv / "bin" / "python", "torch")  # has torch, lacks the rest
    res = box.bootstrap(VIRTUAL_ENV=str(venv))
    assert res.returncode == 0, res.stderr
    assert box.pip_calls(res) == ["-r requirements.txt"]
    assert res.calls[-1].startswith(f"{python} -c")
    assert res.exported["PYTHON"] == str(python) and res.exported["VIRTUAL_ENV"] == str(venv)
    assert not (box.repo / ".venv").exists()

    good = box.bootstrap(VIRTUAL_ENV=str(venv))
    assert box.pip_calls(good) == [] and good.said[0].startswith(f"test: using the active venv {venv}")


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


@pytest.mark.parametrize("failing", ["torch==2.13.0", "requirements.txt"])
def test_a_failing_install_stops_with_one_line(box, failing):
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
    assert re.search(r"still lacks torch, numpy, sentencepiece and \d+ more", res.stderr)
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


def test_run_sh_runs_the_trainer_with_the_bootstrapped_python(box):
    res = box.run(["bash", "run.sh"], DRY_RUN="1")
    assert res.returncode == 0, res.stderr
    assert res.calls[-1] == f"{box.repo}/.venv/bin/python train_gpt.py"
    assert res.stdout.startswith("run.sh: python3 3.11.9 lacks torch, numpy, sentencepiece and ")


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = readme.split("## The two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in commands.strip().splitlines()] == [
        "bash run.sh", "bash .ci/run"]
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
