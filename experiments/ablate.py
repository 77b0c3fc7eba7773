#!/usr/bin/env python3
"""The ablation runner: an experiment is env vars plus arms.tsv, and every arm runs beside the control.

An experiment lives in experiments/<slug>/: run.sh exports the env that defines it (and sources
experiments/profile.sh for sizes and steps), arms.tsv declares the arms, and run.sh ends with
`exec python experiments/ablate.py experiments/<slug> "$@"`. This runner then

  1. parses arms.tsv (first row `control`), builds every (arm, seed) run's env and validates each
     one with train_gpt.Hyperparameters.from_env, so a typo'd knob fails here, before any compute;
  2. runs the control and every arm with the same seeds, seed by seed, control first, each as
     `python train_gpt.py` (CPU) or `torchrun --standalone --nproc_per_node=<gpus> train_gpt.py`;
  3. records each (arm, seed) as a row of results/results.tsv as soon as it ends (a failure is a
     `failed` row with the error tail, and the sweep goes on); a rerun skips the `ok` rows, so an
     interrupted sweep resumes and failed pairs are retried;
  4. writes results/summary.md, results/curves.png, results/bars.png and appends an entry to
     experiments/LOG.md (the person adds the decision).

Usage:
    bash experiments/<slug>/run.sh                 run or resume the sweep (pod profile)
    PROFILE=cpu SEEDS=1337,42 bash experiments/<slug>/run.sh
    bash experiments/<slug>/run.sh --dry-run       validate and print the plan, run nothing
    bash experiments/<slug>/run.sh --summarize     rebuild summary.md and the plots from results/

Runner variables (they never reach train_gpt.py, which rejects unknown variables):
    SEEDS       comma-separated seeds, each arm runs every one (default 1337)
    PROXY=1     fixed token count: ITERATIONS=500 MAX_WALLCLOCK_SECONDS=0 for every arm
    THRESHOLD   BPB delta that counts as a signal (default 0.005)
    PROFILE     pod (default) or cpu, read by profile.sh; recorded here
    TRAIN_CMD   replaces the training command (a fake trainer in the tests)
    ABLATE_*    helpers: ABLATE_GPUS=n runs n processes instead of every GPU; run.sh may define
                ABLATE_<NAME> values that arms.tsv uses as ${ABLATE_<NAME>} (per-profile sizes)

Only the standard library, numpy and matplotlib (plus train_gpt itself, for validation).
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]          # the repo root, where train_gpt.py lives

RUNNER_VARS = ("SEEDS", "PROFILE", "PROXY", "THRESHOLD", "TRAIN_CMD")
RUNNER_PREFIX = "ABLATE_"
PER_RUN_VARS = ("SEED", "RUN_ID", "LOG_DIR", "ARTIFACT_DIR", "RECORDS_DIR")  # the runner sets these
PROXY_ENV = {"ITERATIONS": "500", "MAX_WALLCLOCK_SECONDS": "0"}
DEFAULT_SEEDS = (1337,)
DEFAULT_THRESHOLD = 0.005
P_PROMOTE = 0.05

RESULT_COLUMNS = ("arm", "seed", "status", "pre_quant_bpb", "post_quant_bpb", "sliding_bpb", "quant_gap",
                  "bytes_total", "ms_per_step", "steps", "wallclock_s", "unique_params", "train_s",
                  "run_id", "code", "error")
ARMS_HEADER = ("arm", "description", "overrides")
ARM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
KEY = re.compile(r"[A-Z][A-Z0-9_]*\Z")
REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
PROGRESS = re.compile(r"(?:^|\s)step:(\d+)/(\d+)(?:\s.*?)?\seta:(\S+?)s(?:\s|$)")

LOG_HEADER = """# Experiment log

One entry per finished sweep, appended by `experiments/ablate.py` when every (arm, seed) of the
experiment has a row in its `results/results.tsv`: the date, the command, the device, the commit, the
summary table (mean sliding val_bpb per arm, delta vs the control run in the same sweep with the same
seeds, seed spread, Welch p-value, verdict). The runner never decides: each entry ends with a
`Decision:` line that the person who ran it fills in (promote / drop / rerun with more seeds, and why).
Do not edit the numbers by hand; rerun or `--summarize` instead.
"""


class ArmsError(ValueError):
    """arms.tsv is malformed; the message names the file and line."""


class ValidationError(ValueError):
    """The sweep cannot start: a bad knob, a bad runner variable, missing data. Nothing has run."""


# ============================================================================
# arms.tsv
# ============================================================================


@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    overrides: tuple[tuple[str, str], ...]
    line: int = 0

    @property
    def overrides_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.overrides) or "-"


def parse_overrides(text: str, where: str) -> tuple[tuple[str, str], ...]:
    """`KEY=VALUE KEY=VALUE`, space-separated; `-` or nothing = no overrides."""
    text = text.strip()
    if text in ("", "-"):
        return ()
    pairs, seen = [], set()
    for token in text.split():
        key, eq, value = token.partition("=")
        if not eq or not KEY.match(key) or value == "":
            raise ArmsError(f"{where}: malformed override {token!r}: expected KEY=VALUE "
                            "(KEY upper-case, VALUE non-empty and without spaces)")
        if "$" in REF.sub("", value):
            raise ArmsError(f"{where}: {token!r}: only ${{NAME}} references are expanded; a bare $ is not allowed")
        if key in seen:
            raise ArmsError(f"{where}: {key} is set twice")
        seen.add(key)
        pairs.append((key, value))
    return tuple(pairs)


def parse_arms_text(text: str, source: str = "arms.tsv") -> list[Arm]:
    """Rows of `arm<TAB>description<TAB>overrides` after that header; `#` lines and blank lines are
    skipped. The first row is the arm `control`; arm ids are unique."""
    arms: list[Arm] = []
    first_line: dict[str, int] = {}
    header = False
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cols = line.split("\t")
        if not header:
            if tuple(c.strip().lower() for c in cols) != ARMS_HEADER:
                raise ArmsError(f"{source}:{lineno}: the first row must be the header "
                                f"'arm<TAB>description<TAB>overrides', got {line!r}")
            header = True
            continue
        if len(cols) == 2:
            cols.append("")
        if len(cols) != 3:
            raise ArmsError(f"{source}:{lineno}: expected 3 tab-separated columns (arm, description, overrides), "
                            f"got {len(cols)}")
        name, description, overrides = (c.strip() for c in cols)
        if not ARM_ID.match(name):
            raise ArmsError(f"{source}:{lineno}: bad arm id {name!r}: letters, digits, '_', '.', '-' only")
        if name in first_line:
            raise ArmsError(f"{source}:{lineno}: duplicate arm id {name!r} (first on line {first_line[name]})")
        if not description:
            raise ArmsError(f"{source}:{lineno}: arm {name!r} has no description")
        first_line[name] = lineno
        arms.append(Arm(name, description, parse_overrides(overrides, f"{source}:{lineno}"), lineno))
    if not header:
        raise ArmsError(f"{source}: empty (no header, no arms)")
    if not arms:
        raise ArmsError(f"{source}: no arms under the header")
    if arms[0].name != "control":
        where = f" (it is on line {first_line['control']})" if "control" in first_line else ""
        raise ArmsError(f"{source}: the first arm must be 'control'{where}; every experiment has exactly one "
                        f"control, in the first row")
    return arms


def parse_arms(path: Path) -> list[Arm]:
    if not path.is_file():
        raise ArmsError(f"{path}: missing (every experiment declares its arms in arms.tsv)")
    return parse_arms_text(path.read_text(), str(_rel(path)))


# ============================================================================
# Settings, experiment, plan
# ============================================================================


def runner_only(name: str) -> bool:
    return name in RUNNER_VARS or name.startswith(RUNNER_PREFIX)


@dataclass
class Settings:
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    proxy: bool = False
    threshold: float = DEFAULT_THRESHOLD
    profile: str = "pod"
    train_cmd: list[str] | None = None
    gpus: int | None = None


def read_settings(environ: Mapping[str, str]) -> Settings:
    s = Settings(profile=environ.get("PROFILE", "pod") or "pod")
    raw = environ.get("SEEDS", "").strip()
    if raw:
        try:
            seeds = tuple(int(x) for x in re.split(r"[,\s]+", raw) if x)
        except ValueError:
            raise ValidationError(f"SEEDS={raw!r}: expected comma-separated integers, e.g. SEEDS=1337,42") from None
        if not seeds or min(seeds) < 0:
            raise ValidationError(f"SEEDS={raw!r}: expected non-negative integers")
        if len(set(seeds)) != len(seeds):
            raise ValidationError(f"SEEDS={raw!r}: a seed is repeated")
        s.seeds = seeds
    proxy = environ.get("PROXY", "0").strip() or "0"
    if proxy not in ("0", "1"):
        raise ValidationError(f"PROXY={proxy!r}: expected 0 or 1")
    s.proxy = proxy == "1"
    threshold = environ.get("THRESHOLD", "").strip()
    if threshold:
        try:
            s.threshold = float(threshold)
        except ValueError:
            raise ValidationError(f"THRESHOLD={threshold!r}: expected a number of BPB, e.g. 0.005") from None
        if not s.threshold > 0:
            raise ValidationError(f"THRESHOLD={threshold!r}: must be > 0")
    cmd = environ.get("TRAIN_CMD", "").strip()
    s.train_cmd = shlex.split(cmd) if cmd else None
    gpus = environ.get("ABLATE_GPUS", "").strip()
    if gpus:
        if not gpus.isdigit():
            raise ValidationError(f"ABLATE_GPUS={gpus!r}: expected a non-negative integer")
        s.gpus = int(gpus)
    return s


@dataclass
class Experiment:
    dir: Path
    arms: list[Arm]

    @property
    def slug(self) -> str:
        return self.dir.name

    @property
    def results(self) -> Path:
        return self.dir / "results"

    @property
    def logs(self) -> Path:
        return self.results / "logs"

    @property
    def work(self) -> Path:
        return self.results / "work"

    @property
    def tsv(self) -> Path:
        return self.results / "results.tsv"

    @property
    def sweep_json(self) -> Path:
        return self.results / "sweep.json"

    @property
    def log_md(self) -> Path:
        return self.dir.parent / "LOG.md"

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms if a.name == name), None)


def load_experiment(path: str | Path) -> Experiment:
    d = Path(path).resolve()
    if not d.is_dir():
        raise ArmsError(f"{path}: not an experiment folder")
    return Experiment(d, parse_arms(d / "arms.tsv"))


@dataclass
class Run:
    arm: Arm
    arm_index: int            # 1-based, control = 1
    seed: int
    run_id: str
    env: dict[str, str]       # the child's whole environment


def _rel(path: Path) -> Path:
    try:
        return path.resolve().relative_to(ROOT)
    except ValueError:
        return path.resolve()


def expand(value: str, environ: Mapping[str, str], where: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in environ:
            raise ValidationError(f"{where}: ${{{name}}} is not set (run.sh defines it for each PROFILE)")
        return environ[name]
    return REF.sub(sub, value)


def base_env(environ: Mapping[str, str], settings: Settings) -> dict[str, str]:
    """What every run shares: the caller's env and run.sh's exports, minus runner variables, plus PROXY."""
    env = {k: v for k, v in environ.items() if not runner_only(k)}
    if settings.proxy:
        env.update(PROXY_ENV)
    return env


def build_plan(exp: Experiment, settings: Settings, environ: Mapping[str, str]) -> list[Run]:
    """Seed-major: for each seed the control, then every arm, so a cut-short sweep still compares."""
    base = base_env(environ, settings)
    arm_envs = []
    for arm in exp.arms:
        where = f"arm {arm.name!r} (arms.tsv line {arm.line})"
        for key, _ in arm.overrides:
            if key in PER_RUN_VARS:
                raise ValidationError(f"{where}: {key} is set by the runner for each run; an arm may not set it")
            if runner_only(key):
                raise ValidationError(f"{where}: {key} is a runner variable, not a knob; set it in run.sh")
        arm_envs.append({k: expand(v, environ, f"{where}: {k}={v}") for k, v in arm.overrides})
    folders = {"LOG_DIR": exp.logs, "ARTIFACT_DIR": exp.work / "artifacts", "RECORDS_DIR": exp.work / "records"}
    plan = []
    for seed in settings.seeds:
        for i, (arm, overrides) in enumerate(zip(exp.arms, arm_envs), 1):
            run_id = f"{exp.slug}_{arm.name}_s{seed}"
            env = {**base, **overrides, "SEED": str(seed), "RUN_ID": run_id,
                   **{k: str(_rel(v)) for k, v in folders.items()}}
            plan.append(Run(arm, i, seed, run_id, env))
    return plan


def knob_env(env: Mapping[str, str], knobs: Iterable[str]) -> dict[str, str]:
    """The knob part of a run's env, without the per-run variables: what defines the arm."""
    known = set(knobs) - set(PER_RUN_VARS)
    return {k: env[k] for k in sorted(env) if k in known}


# ============================================================================
# Validation (before any compute)
# ============================================================================


def _train_gpt():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import train_gpt  # noqa: PLC0415 - importing it is side-effect free, but slow: only when needed
    return train_gpt


def cuda_count() -> int:
    try:
        import torch  # noqa: PLC0415
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch, no CUDA: run on CPU
        return 0


def nproc(settings: Settings) -> int:
    return settings.gpus if settings.gpus is not None else cuda_count()


def train_command(settings: Settings) -> list[str]:
    if settings.train_cmd:
        return list(settings.train_cmd)
    gpus = nproc(settings)
    if gpus > 0:
        launcher = ["torchrun"] if _which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
        return launcher + ["--standalone", f"--nproc_per_node={gpus}", "train_gpt.py"]
    return [sys.executable, "train_gpt.py"]


def _which(name: str) -> bool:
    from shutil import which  # noqa: PLC0415
    return which(name) is not None


@dataclass
class ArmInfo:
    env: dict[str, str]
    unique_params: int
    effective_depth: int
    overrides: str = "-"          # with ${NAME} references expanded


def validate(exp: Experiment, settings: Settings, environ: Mapping[str, str], plan: list[Run],
             data_problems: list[str] | None = None) -> dict[str, ArmInfo]:
    """Every run's env through Hyperparameters.from_env, every arm's model built once (its unique
    parameter count goes in the plan), the data present. Raises ValidationError naming the problem.
    With data_problems (a dry run), a missing dataset is appended there instead of raised."""
    tg = _train_gpt()
    knobs = set(tg.knob_names())
    try:
        tg.reject_unknown_knobs(base_env(environ, settings))
    except tg.HyperparameterError as err:
        raise ValidationError(f"experiment env (run.sh, profile.sh or your shell): {err}") from None
    for arm in exp.arms:
        for key, _ in arm.overrides:
            if key not in knobs:
                hint = difflib.get_close_matches(key, sorted(knobs), n=1, cutoff=0.6)
                raise ValidationError(f"arm {arm.name!r} (arms.tsv line {arm.line}): {key} is not a knob of "
                                      f"train_gpt.py" + (f"; did you mean {hint[0]}?" if hint else ""))
    gpus = 0 if settings.train_cmd else nproc(settings)
    infos: dict[str, ArmInfo] = {}
    for run in plan:
        where = f"arm {run.arm.name!r} (arms.tsv line {run.arm.line}) seed {run.seed}"
        try:
            hp = tg.Hyperparameters.from_env(run.env)
        except tg.HyperparameterError as err:
            raise ValidationError(f"{where}: {err}") from None
        if gpus > 1 and hp.accum_splits % gpus:
            raise ValidationError(f"{where}: ACCUM_SPLITS={hp.accum_splits} is not divisible by the {gpus} GPUs")
        if run.arm.name in infos:
            continue
        try:
            params = tg.count_unique_params(tg.CrawlerGPT(hp))
        except Exception as err:  # noqa: BLE001 - any construction failure stops the sweep here
            raise ValidationError(f"{where}: the model cannot be built: {type(err).__name__}: {err}") from None
        expanded = " ".join(f"{k}={run.env[k]}" for k, _ in run.arm.overrides) or "-"
        infos[run.arm.name] = ArmInfo(knob_env(run.env, knobs), params, hp.effective_depth, expanded)
        if not settings.train_cmd:
            try:
                check_data(hp, where)
            except ValidationError as err:
                if data_problems is None:
                    raise
                data_problems.append(str(err))
    return infos


def check_data(hp: Any, where: str) -> None:
    data = ROOT / hp.data_path
    if not list(data.glob(hp.val_files)) or not list(data.glob(hp.train_files)):
        raise ValidationError(f"{where}: no shards in DATA_PATH={hp.data_path}: on a pod run `bash setup_pod.sh`; "
                              f"on CPU use PROFILE=cpu (the bundled corpus, python data/prepare_local.py)")
    if not (ROOT / hp.tokenizer_path).is_file():
        raise ValidationError(f"{where}: TOKENIZER_PATH={hp.tokenizer_path} does not exist")


# ============================================================================
# The trainer's log
# ============================================================================


def parse_kv(line: str) -> dict[str, str]:
    """`key:value key:value ...`; tokens without a colon are ignored."""
    out = {}
    for token in line.split():
        key, sep, value = token.partition(":")
        if sep and key and value:
            out[key] = value
    return out


def _num(text: str | None) -> float | None:
    if text is None:
        return None
    m = re.match(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text)
    return float(m.group(0)) if m else None


@dataclass
class LogFacts:
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float, float]] = field(default_factory=list)   # (step, train seconds, val bpb)


def parse_log(text: str) -> LogFacts:
    facts = LogFacts()
    m = facts.metrics
    for line in text.splitlines():
        if line.startswith("hp "):
            continue
        kv = parse_kv(line)
        if not kv:
            continue
        step = kv.get("step", "")
        if "val_bpb" in kv and step.isdigit():
            bpb, t = _num(kv["val_bpb"]), _num(kv.get("train_time"))
            if bpb is not None:   # a second line for the same step (e.g. EMA weights) replaces the first
                if facts.curve and facts.curve[-1][0] == int(step):
                    facts.curve.pop()
                facts.curve.append((int(step), t if t is not None else float("nan"), bpb))
                m["steps"], m["train_s"] = float(step), t if t is not None else float("nan")
        elif "/" in step and "step_avg" in kv:
            m["ms_per_step"] = _num(kv["step_avg"])
        for src, dst in (("pre_quant_val_bpb", "pre_quant_bpb"), ("post_quant_val_bpb", "post_quant_bpb"),
                         ("sliding_val_bpb", "sliding_bpb"), ("quant_gap", "quant_gap"),
                         ("bytes_total", "bytes_total"), ("unique_params", "unique_params")):
            if src in kv and _num(kv[src]) is not None:
                m[dst] = _num(kv[src])
    return facts


# ============================================================================
# Running one (arm, seed)
# ============================================================================


def _terminate(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def execute(cmd: Sequence[str], env: Mapping[str, str], console: Path,
            on_line: Callable[[str], None]) -> tuple[int, list[str], float]:
    """Runs cmd in the repo root, streaming its merged stdout/stderr to on_line and to console.
    Returns (exit code, the last lines, wall seconds). Ctrl-C ends the child's whole process group."""
    console.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=80)
    t0 = time.monotonic()
    with console.open("w") as out:
        try:
            proc = subprocess.Popen(list(cmd), cwd=ROOT, env=dict(env), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                    start_new_session=True)
        except OSError as err:
            out.write(f"cannot start {cmd[0]}: {err}\n")
            return 127, [f"cannot start {shlex.join(cmd)}: {err}"], time.monotonic() - t0
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                tail.append(line.rstrip("\n"))
                on_line(line)
            rc = proc.wait()
        except BaseException:
            _terminate(proc)
            raise
    return rc, list(tail), time.monotonic() - t0


def error_tail(rc: int, lines: Sequence[str], limit: int = 400) -> str:
    useful = [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("step:", "hp "))]
    text = " | ".join(useful[-3:]) or "(no output)"
    text = f"exit {rc}: {text}".replace("\t", " ")
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def _fmt(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return ""
    return f"{value:.{digits}f}" if digits else str(int(round(value)))


def set_aside(path: Path) -> None:
    """Keeps an earlier attempt's file as <name>.attemptN.<ext> instead of overwriting it."""
    if not path.exists():
        return
    n = 1
    while (dest := path.with_name(f"{path.stem}.attempt{n}{path.suffix}")).exists():
        n += 1
    path.rename(dest)


def code_hash() -> str:
    path = ROOT / "train_gpt.py"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10] if path.is_file() else "none"


def run_one(run: Run, n_arms: int, cmd: Sequence[str], exp: Experiment, say: Callable[[str], None]) -> dict:
    prefix = f"[arm {run.arm_index}/{n_arms} seed {run.seed}] {run.arm.name}:"
    log_path, console = exp.logs / f"{run.run_id}.txt", exp.work / "console" / f"{run.run_id}.txt"
    set_aside(log_path)
    set_aside(exp.logs / f"{run.run_id}.console.txt")
    code = code_hash()

    def on_line(line: str) -> None:
        m = PROGRESS.search(line)
        if m:
            say(f"{prefix} step {m.group(1)}/{m.group(2)} eta {m.group(3)}s")

    rc, tail, wall = execute(cmd, run.env, console, on_line)
    row = {c: "" for c in RESULT_COLUMNS}
    row.update(arm=run.arm.name, seed=str(run.seed), run_id=run.run_id, code=code, wallclock_s=f"{wall:.1f}")
    facts = parse_log(log_path.read_text(errors="replace")) if log_path.is_file() else LogFacts()
    m = facts.metrics
    for col, digits in (("pre_quant_bpb", 6), ("post_quant_bpb", 6), ("sliding_bpb", 6), ("quant_gap", 6),
                        ("bytes_total", 0), ("ms_per_step", 1), ("steps", 0), ("unique_params", 0), ("train_s", 1)):
        row[col] = _fmt(m.get(col), digits)
    if rc == 0 and row["sliding_bpb"]:
        row["status"] = "ok"
        say(f"{prefix} ok sliding_bpb {row['sliding_bpb']} bytes_total {row['bytes_total'] or '?'} ({wall:.0f}s)")
    else:
        row["status"] = "failed"
        row["error"] = error_tail(rc, tail) if rc else f"exit 0 but {_rel(log_path)} has no sliding_val_bpb"
        (exp.logs / f"{run.run_id}.console.txt").write_text(console.read_text(errors="replace"))
        say(f"{prefix} FAILED {row['error']}")
    return row


# ============================================================================
# results.tsv and sweep.json
# ============================================================================


def read_results(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    if not lines:
        return []
    header = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        if line.strip():
            cells = line.split("\t")
            rows.append({c: (cells[i] if i < len(cells) else "") for i, c in enumerate(header)})
    return rows


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_results(path: Path, rows: list[dict[str, str]], order: Sequence[str]) -> None:
    rank = {name: i for i, name in enumerate(order)}
    rows = sorted(rows, key=lambda r: (rank.get(r["arm"], len(rank)), r["arm"], int(r["seed"] or 0)))
    clean = lambda v: str(v).replace("\t", " ").replace("\n", " ")  # noqa: E731
    text = "\t".join(RESULT_COLUMNS) + "\n" + "".join(
        "\t".join(clean(r.get(c, "")) for c in RESULT_COLUMNS) + "\n" for r in rows)
    _write_atomic(path, text)


def check_resume(exp: Experiment, infos: dict[str, ArmInfo], rows: list[dict[str, str]]) -> None:
    """Refuses to mix configurations: an arm with finished rows must have the same knob env now."""
    if not exp.sweep_json.is_file():
        return
    stored = json.loads(exp.sweep_json.read_text()).get("arms", {})
    finished = {r["arm"] for r in rows if r.get("status") == "ok"}
    for name in sorted(finished & set(infos) & set(stored)):
        old, new = stored[name].get("env", {}), infos[name].env
        diff = [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}"
                for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diff:
            raise ValidationError(
                f"arm {name!r} already has finished runs in {_rel(exp.results)} made with a different config "
                f"({'; '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}). Resuming would mix configurations: "
                f"move {_rel(exp.results)} aside (or restore the old settings) and run again")


def caller_vars(environ: Mapping[str, str]) -> set[str] | None:
    raw = environ.get("ABLATE_CALLER_VARS")
    return None if raw is None else set(raw.split())


def command_line(exp: Experiment, settings: Settings, environ: Mapping[str, str], knobs: Iterable[str]) -> str:
    """The command that reproduces this sweep: runner variables, the caller's knobs, run.sh."""
    caller = caller_vars(environ)
    parts = [f"PROFILE={settings.profile}", f"SEEDS={','.join(map(str, settings.seeds))}"]
    if settings.proxy:
        parts.append("PROXY=1")
    for k in ("THRESHOLD", "TRAIN_CMD", "ABLATE_GPUS"):
        if environ.get(k):
            parts.append(f"{k}={shlex.quote(environ[k])}")
    if caller is not None:
        parts += [f"{k}={shlex.quote(environ[k])}" for k in sorted(caller & set(knobs)) if k in environ]
        return " ".join(parts + [f"bash {_rel(exp.dir)}/run.sh"])
    return " ".join(parts + [f"python experiments/ablate.py {_rel(exp.dir)}"])


def device_text(settings: Settings) -> str:
    gpus = 0 if settings.train_cmd else nproc(settings)
    if gpus:
        try:
            import torch  # noqa: PLC0415
            return f"{gpus}x {torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001
            return f"{gpus}x CUDA GPU"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"CPU {model or 'unknown'} ({os.cpu_count()} cores"
            + (f", OMP_NUM_THREADS={threads}" if threads else "") + ")"
            + (" with TRAIN_CMD" if settings.train_cmd else ""))


def git_commit() -> str:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head


def git_dirty(exp: Experiment) -> list[str]:
    paths = ["train_gpt.py", "experiments/ablate.py", "experiments/profile.sh"]
    for name in ("run.sh", "arms.tsv"):
        if (exp.dir / name).is_file():
            paths.append(str(_rel(exp.dir / name)))
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=ROOT, capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in out.splitlines() if line.strip()]


# ============================================================================
# Statistics: Welch's t-test with a hand-written Student-t CDF
# ============================================================================


def _betacf(a: float, b: float, x: float, max_iter: int = 10_000, eps: float = 1e-15) -> float:
    """1/(1+d1/(1+d2/(1+...))), the continued fraction of I_x(a, b), by the modified Lentz method.
    d_{2m+1} = -(a+m)(a+b+m)x / ((a+2m)(a+2m+1)),  d_{2m} = m(b-m)x / ((a+2m-1)(a+2m))."""
    tiny = 1e-300
    f, c, d = tiny, tiny, 0.0
    for j in range(1, max_iter):
        k = j - 1                         # numerator j is d_k; the first numerator is 1
        if k == 0:
            num = 1.0
        elif k % 2:
            m = (k - 1) // 2
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            m = k // 2
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        step = c * d
        f *= step
        if abs(step - 1.0) < eps:
            return f
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) = B(x; a, b) / B(a, b)."""
    if a <= 0 or b <= 0:
        raise ValueError("betainc needs a > 0 and b > 0")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - log_beta)
    if x < (a + 1.0) / (a + b + 2.0):       # the fraction converges fast on this side
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    if df <= 0:
        raise ValueError("df must be > 0")
    if math.isinf(t):
        return 0.0
    return min(1.0, max(0.0, betainc(df / 2.0, 0.5, df / (df + t * t))))


def t_cdf(t: float, df: float) -> float:
    half = 0.5 * t_two_sided_p(t, df)
    return 1.0 - half if t >= 0 else half


@dataclass(frozen=True)
class Welch:
    t: float
    df: float
    p: float
    se: float


def welch_test(a: Sequence[float], b: Sequence[float]) -> Welch | None:
    """Welch's unequal-variance t-test of mean(a) - mean(b); None unless both have >= 2 values."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or len(y) < 2:
        return None
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se2, diff = vx + vy, float(x.mean() - y.mean())
    if se2 == 0.0:
        return Welch(math.copysign(math.inf, diff) if diff else 0.0, float(len(x) + len(y) - 2),
                     0.0 if diff else 1.0, 0.0)
    df = se2 ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    t = diff / math.sqrt(se2)
    return Welch(t, float(df), t_two_sided_p(t, df), math.sqrt(se2))


def verdict(delta: float | None, p: float | None, multi_seed: bool, threshold: float) -> str:
    """promote: delta <= -threshold (and p < 0.05 with >= 2 seeds); worse: delta >= +threshold."""
    if delta is None:
        return "no data"
    if delta <= -threshold and (not multi_seed or (p is not None and p < P_PROMOTE)):
        return "promote"
    if delta >= threshold:
        return "worse"
    return "no signal"


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


@dataclass
class ArmStats:
    arm: str
    values: list[float]                     # sliding bpb of the ok seeds
    seeds: list[int]
    failed: int = 0
    mean: float | None = None
    std: float | None = None
    lo: float | None = None
    hi: float | None = None
    delta: float | None = None
    se: float | None = None
    p: float | None = None
    verdict: str = "no data"
    extra: dict[str, float | None] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.values)


def _cell(row: Mapping[str, str], col: str) -> float | None:
    try:
        v = float(row.get(col, "") or "nan")
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def arm_stats(rows: Sequence[Mapping[str, str]], arm_names: Sequence[str], threshold: float) -> list[ArmStats]:
    """One ArmStats per arm (in arm_names order, control first), delta and p against the control."""
    out = []
    for name in arm_names:
        ok = [r for r in rows if r["arm"] == name and r.get("status") == "ok" and _cell(r, "sliding_bpb") is not None]
        s = ArmStats(name, [_cell(r, "sliding_bpb") for r in ok], [int(r["seed"]) for r in ok],
                     failed=sum(1 for r in rows if r["arm"] == name and r.get("status") != "ok"))
        if s.values:
            v = np.asarray(s.values)
            s.mean, s.lo, s.hi = float(v.mean()), float(v.min()), float(v.max())
            s.std = float(v.std(ddof=1)) if len(v) >= 2 else None
        for col in ("post_quant_bpb", "quant_gap", "bytes_total", "ms_per_step", "steps", "unique_params", "wallclock_s"):
            s.extra[col] = _mean([x for x in (_cell(r, col) for r in ok) if x is not None])
        out.append(s)
    control = out[0] if out else None
    for s in out:
        if control is None or control.mean is None or s.mean is None:
            continue
        s.delta = s.mean - control.mean
        if s is control:
            s.verdict = "control"
            continue
        w = welch_test(s.values, control.values)
        if w is not None:
            s.p, s.se = w.p, w.se
        s.verdict = verdict(s.delta, s.p, s.n >= 2 and control.n >= 2, threshold)
    if control is not None and control.mean is not None:
        control.delta = 0.0
    return out


# ============================================================================
# summary.md, curves.png, bars.png, LOG.md
# ============================================================================


def _f(value: float | None, spec: str, none: str = "—") -> str:
    return none if value is None or not math.isfinite(value) else format(value, spec)


def _p(p: float | None) -> str:
    if p is None:
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def ranked(stats: list[ArmStats]) -> list[ArmStats]:
    return sorted(stats, key=lambda s: (s.mean is None, s.mean if s.mean is not None else 0.0))


def spread_text(s: ArmStats) -> str:
    if s.n == 0:
        return "—"
    if s.n == 1:
        return "— (1 seed)"
    return f"±{s.std:.5f} ({s.lo:.5f}–{s.hi:.5f})"


def summary_table(stats: list[ArmStats], compact: bool = False) -> str:
    control = stats[0]
    head = ["rank", "arm", "seeds", "sliding bpb", "spread: std (min–max)", "Δ vs control", "p (Welch)", "verdict"]
    if not compact:
        head += ["post-quant bpb", "quant gap", "bytes total", "Δ bytes", "unique params", "ms/step", "steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, s in enumerate(ranked(stats), 1):
        seeds = f"{s.n}" + (f" (+{s.failed} failed)" if s.failed else "")
        delta = "0 (control)" if s is control and s.mean is not None else _f(s.delta, "+.5f")
        cells = [str(rank) if s.mean is not None else "—", f"`{s.arm}`", seeds, _f(s.mean, ".5f"), spread_text(s),
                 delta, "" if s is control else _p(s.p), f"**{s.verdict}**" if s.verdict in ("promote", "worse") else s.verdict]
        if not compact:
            e, ce = s.extra, control.extra
            dbytes = None if e.get("bytes_total") is None or ce.get("bytes_total") is None else e["bytes_total"] - ce["bytes_total"]
            cells += [_f(e.get("post_quant_bpb"), ".5f"), _f(e.get("quant_gap"), "+.5f"), _f(e.get("bytes_total"), ",.0f"),
                      "" if s is control else _f(dbytes, "+,.0f"), _f(e.get("unique_params"), ",.0f"),
                      _f(e.get("ms_per_step"), ".1f"), _f(e.get("steps"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_rule(threshold: float) -> str:
    return (f"Verdict: **promote** if Δ ≤ −{threshold:g} BPB and, with ≥ 2 seeds in both arms, Welch p < {P_PROMOTE}; "
            f"**worse** if Δ ≥ +{threshold:g}; otherwise **no signal**. Δ = mean(arm) − mean(control) of the "
            f"sliding-window post-quant val_bpb (the scored number); lower is better.")


def write_summary(exp: Experiment, stats: list[ArmStats], rows: list[dict[str, str]], meta: dict) -> None:
    threshold = meta["threshold"]
    control = stats[0]
    n_seeds = min((s.n for s in stats), default=0)
    lines = [f"# `{exp.slug}`: ablation summary", "",
             f"- command: `{meta.get('command', '?')}`",
             f"- device: {meta.get('device', '?')}",
             f"- commit: {meta.get('commit', '?')}; train_gpt.py sha256 {', '.join(meta.get('codes') or ['?'])}",
             f"- profile: {meta.get('profile', '?')}; proxy: {'on (ITERATIONS=500, no wallclock cap)' if meta.get('proxy') else 'off'}; "
             f"seeds: {', '.join(map(str, meta.get('seeds', [])))}; threshold: {threshold:g} BPB",
             f"- updated: {time.strftime('%Y-%m-%d %H:%M:%S')}", ""]
    if len(meta.get("codes") or []) > 1:
        lines += [f"> **Warning**: these rows come from {len(meta['codes'])} different versions of train_gpt.py; "
                  "the comparison may be confounded by the code change. Rerun in a fresh results folder.", ""]
    lines += ["## Ranking (by mean sliding val_bpb)", "", summary_table(stats), "", verdict_rule(threshold)]
    if control.n == 0:
        lines += ["", "> The control has no finished run: no deltas."]
    elif n_seeds < 2:
        lines += ["", "> Fewer than 2 seeds in some arm: no p-value there, and a verdict rests on one number. "
                  "Rerun with `SEEDS=1337,42` (finished pairs are kept) before acting on it."]
    lines += ["", "![validation curves](curves.png)", "", "![delta vs control](bars.png)", "", "## Arms", "",
              "| arm | description | overrides (on top of the experiment env) |", "|---|---|---|"]
    for arm in exp.arms:
        lines.append(f"| `{arm.name}` | {arm.description} | `{arm.overrides_text}` |")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Failed runs (rerun the same command to retry them)", "", "| arm | seed | error |", "|---|---|---|"]
        lines += [f"| `{r['arm']}` | {r['seed']} | `{r.get('error', '').replace('|', '/')}` |" for r in failed]
    env = meta.get("experiment_env") or {}
    if env:
        lines += ["", "## Experiment env (knobs shared by every arm)", "", "```",
                  *[f"{k}={v}" for k, v in env.items()], "```"]
    lines += ["", "Logs: `logs/<slug>_<arm>_s<seed>.txt`; every number comes from `results.tsv`. "
              "Regenerate with `python experiments/ablate.py " + str(_rel(exp.dir)) + " --summarize`.", ""]
    _write_atomic(exp.results / "summary.md", "\n".join(lines))


def _plt():
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


ARM_MARKERS = ("o", "s", "^", "D")


def _arm_colors(names: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """(colour, marker) per arm. Control black; the others from tab10 without its green, red and grey
    (the bar chart's verdict colours); past 7 arms the colours repeat with another marker."""
    cmap = _plt().get_cmap("tab10")
    palette = [cmap(i) for i in (0, 1, 4, 5, 6, 8, 9)]
    styles, i = {}, 0
    for name in names:
        if name == "control":
            styles[name] = ("black", "o")
        else:
            styles[name] = (palette[i % len(palette)], ARM_MARKERS[(i // len(palette)) % len(ARM_MARKERS)])
            i += 1
    return styles


def plot_curves(path: Path, exp: Experiment, rows: list[dict[str, str]], title: str) -> None:
    plt = _plt()
    names = [a.name for a in exp.arms]
    colors = _arm_colors(names)
    styles = ["-", "--", ":", "-."]
    seeds = sorted({int(r["seed"]) for r in rows if r.get("status") == "ok"})
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    drawn = False
    for name in names:
        first = True
        for r in rows:
            if r["arm"] != name or r.get("status") != "ok":
                continue
            run_id = r.get("run_id") or f"{exp.slug}_{name}_s{r['seed']}"
            log = exp.logs / f"{run_id}.txt"
            if not log.is_file():
                continue
            pts = [p for p in parse_log(log.read_text(errors="replace")).curve if p[0] > 0]
            if not pts:
                continue
            steps, secs, bpb = zip(*pts)
            style = dict(color=colors[name][0], ls=styles[seeds.index(int(r["seed"])) % len(styles)],
                         lw=2.4 if name == "control" else 1.6, marker=colors[name][1], ms=4)
            label = name if first else None
            axes[0].plot(steps, bpb, label=label, **style)
            axes[1].plot(secs, bpb, **style)
            first, drawn = False, True
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training time (s, periodic validation excluded)")
    axes[0].set_ylabel("validation bpb (lower is better)")
    axes[0].set_title("val bpb vs step")
    axes[1].set_title("val bpb vs wallclock")
    for ax in axes:
        ax.grid(alpha=0.3)
    if drawn:
        handles, labels = axes[0].get_legend_handles_labels()
        if len(seeds) > 1:
            for i, seed in enumerate(seeds):
                handles.append(plt.Line2D([], [], color="gray", ls=styles[i % len(styles)]))
                labels.append(f"seed {seed}")
        axes[1].legend(handles, labels, title="arm", fontsize=9, loc="upper right")
    else:
        for ax in axes:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


VERDICT_COLORS = {"promote": "#2ca02c", "worse": "#d62728", "no signal": "#8c8c8c", "no data": "#dddddd"}


def plot_bars(path: Path, stats: list[ArmStats], threshold: float, title: str) -> None:
    plt = _plt()
    from matplotlib.patches import Patch  # noqa: PLC0415
    others = stats[1:]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(others) + 3.0), 5.2))
    x = np.arange(len(others))
    deltas = [s.delta if s.delta is not None else 0.0 for s in others]
    errs = [s.se if s.se is not None else 0.0 for s in others]
    ax.bar(x, deltas, yerr=errs if any(errs) else None, capsize=8, width=0.6,
           color=[VERDICT_COLORS.get(s.verdict, "#8c8c8c") for s in others], edgecolor="black", linewidth=0.8)
    ax.axhline(0.0, color="black", lw=1.0)
    ax.axhline(threshold, color="gray", ls="--", lw=1.0)
    ax.axhline(-threshold, color="gray", ls="--", lw=1.0)
    span = max([abs(d) + e for d, e in zip(deltas, errs)] + [threshold * 1.5])
    for xi, s, d, e in zip(x, others, deltas, errs):
        p_text = "" if s.p is None else ("\np<0.001" if s.p < 0.001 else f"\np={s.p:.3f}")
        text = "no data" if s.delta is None else f"{s.delta:+.5f}" + (p_text or f"\n{s.n} seed")
        y = d + (e + 0.04 * span) * (1 if d >= 0 else -1)
        ax.text(xi, y, text, ha="center", va="bottom" if d >= 0 else "top", fontsize=9)
    ax.set_ylim(-1.35 * span, 1.35 * span)
    ax.set_xticks(x, [s.arm for s in others], rotation=15 if len(others) > 3 else 0)
    ax.set_xlabel("arm")
    ax.set_ylabel("Δ sliding val bpb vs control (lower is better)")
    multi = any(s.se for s in others)
    ax.set_title(title + ("\nerror bars: ±1 standard error of the difference (Welch)" if multi
                          else "\none seed per arm: no error bars"), fontsize=11)
    handles = [Patch(color=c, label=v) for v, c in VERDICT_COLORS.items() if any(s.verdict == v for s in others)]
    handles.append(plt.Line2D([], [], color="gray", ls="--", label=f"±threshold ({threshold:g})"))
    ax.legend(handles=handles, fontsize=9, loc="best")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_meta(exp: Experiment) -> dict:
    return json.loads(exp.sweep_json.read_text()) if exp.sweep_json.is_file() else {}


def write_outputs(exp: Experiment, threshold: float | None = None) -> list[ArmStats]:
    """summary.md, curves.png, bars.png from results.tsv, the logs and sweep.json."""
    rows = read_results(exp.tsv)
    meta = load_meta(exp)
    meta["threshold"] = threshold if threshold is not None else meta.get("threshold", DEFAULT_THRESHOLD)
    names = [a.name for a in exp.arms]
    known = [r for r in rows if r["arm"] in names]
    meta["codes"] = sorted({r.get("code") for r in known if r.get("code") and r.get("status") == "ok"})
    stats = arm_stats(known, names, meta["threshold"])
    exp.results.mkdir(parents=True, exist_ok=True)
    write_summary(exp, stats, known, meta)
    seeds = ",".join(map(str, meta.get("seeds", []))) or "?"
    plot_curves(exp.results / "curves.png", exp, known,
                f"{exp.slug}: validation bpb per arm (profile {meta.get('profile', '?')}, seeds {seeds})")
    plot_bars(exp.results / "bars.png", stats, meta["threshold"],
              f"{exp.slug}: mean sliding val bpb, arm − control (profile {meta.get('profile', '?')}, seeds {seeds})")
    return stats


def append_log_entry(exp: Experiment, stats: list[ArmStats], meta: dict, rows: list[dict[str, str]]) -> None:
    path = exp.log_md
    if not path.is_file():
        path.write_text(LOG_HEADER)
    failed = [r for r in rows if r.get("status") != "ok"]
    dirty = meta.get("dirty") or []
    entry = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} — `{exp.slug}`", "",
             f"- command: `{meta['command']}`",
             f"- device: {meta['device']}",
             f"- commit: `{meta['commit']}`" + (f" (uncommitted changes in {', '.join(dirty)})" if dirty else ""),
             f"- results: `{_rel(exp.results)}/` (summary.md, results.tsv, curves.png, bars.png)"]
    if failed:
        entry.append(f"- **{len(failed)} failed run(s)**: " + ", ".join(f"{r['arm']}/s{r['seed']}" for r in failed))
    entry += ["", summary_table(stats, compact=True), "", verdict_rule(meta["threshold"]), "",
              "Decision: _(to be filled in by the person: promote / drop / rerun, and why)_", ""]
    with path.open("a") as fh:
        fh.write("\n".join(entry))


# ============================================================================
# The sweep
# ============================================================================


class Lock:
    """One sweep per experiment at a time (results.tsv is rewritten after every run)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                    os.kill(pid, 0)
                except (ValueError, ProcessLookupError, OSError):
                    self.path.unlink(missing_ok=True)       # stale: its process is gone
                    continue
                raise ValidationError(f"another sweep (pid {pid}) is running on this experiment; "
                                      f"remove {_rel(self.path)} if it is not") from None
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return self
        raise ValidationError(f"cannot take the lock {_rel(self.path)}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def prepare_results(exp: Experiment) -> None:
    exp.logs.mkdir(parents=True, exist_ok=True)
    exp.work.mkdir(parents=True, exist_ok=True)
    gi = exp.results / ".gitignore"
    if not gi.is_file():
        gi.write_text("# written by experiments/ablate.py: artifacts, records and console copies are big or noisy\n"
                      "work/\n"
                      "# the repo-wide 'logs/' rule would hide the sweep's logs; they are part of the record\n"
                      "!logs/\n")


def print_plan(exp: Experiment, settings: Settings, plan: list[Run], infos: dict[str, ArmInfo],
               cmd: Sequence[str], say: Callable[[str], None]) -> None:
    ctrl = infos[exp.arms[0].name].unique_params
    say(f"ablate: {exp.slug}: {len(exp.arms)} arms x {len(settings.seeds)} seed(s) "
        f"({', '.join(map(str, settings.seeds))}) = {len(plan)} runs, profile {settings.profile}"
        f"{', PROXY' if settings.proxy else ''}; command: {shlex.join(cmd)}")
    width = max(len(a.name) for a in exp.arms)
    for i, arm in enumerate(exp.arms, 1):
        info = infos[arm.name]
        rel = 100.0 * (info.unique_params / ctrl - 1.0) if ctrl else 0.0
        say(f"  {i}. {arm.name:<{width}}  params {info.unique_params:>11,} ({rel:+.1f}% vs control)  "
            f"depth {info.effective_depth:>2}  {info.overrides}")


def sweep(exp: Experiment, settings: Settings, environ: Mapping[str, str], plan: list[Run],
          infos: dict[str, ArmInfo], say: Callable[[str], None]) -> int:
    tg = _train_gpt()
    cmd = train_command(settings)
    prepare_results(exp)
    with Lock(exp.work / ".lock"):
        rows = read_results(exp.tsv)
        check_resume(exp, infos, rows)
        meta = load_meta(exp)
        stored_arms = meta.get("arms", {})
        stored_arms.update({name: {"overrides": info.overrides, "env": info.env,
                                   "unique_params": info.unique_params, "effective_depth": info.effective_depth}
                            for name, info in infos.items()})
        base_knobs = knob_env(base_env(environ, settings), tg.knob_names())
        meta.update(slug=exp.slug, profile=settings.profile, proxy=settings.proxy, seeds=list(settings.seeds),
                    threshold=settings.threshold, command=command_line(exp, settings, environ, tg.knob_names()),
                    device=device_text(settings), commit=git_commit(), dirty=git_dirty(exp),
                    experiment_env=base_knobs, arms=stored_arms)
        _write_atomic(exp.sweep_json, json.dumps(meta, indent=1) + "\n")
        done = {(r["arm"], r["seed"]) for r in rows if r.get("status") == "ok"}
        todo = [run for run in plan if (run.arm.name, str(run.seed)) not in done]
        say(f"ablate: {len(plan) - len(todo)} run(s) already finished in {_rel(exp.tsv)}, {len(todo)} to run")
        order = [a.name for a in exp.arms]
        ran = 0
        try:
            for i, run in enumerate(todo, 1):
                say(f"[arm {run.arm_index}/{len(exp.arms)} seed {run.seed}] {run.arm.name}: start "
                    f"(run {i}/{len(todo)}) {infos[run.arm.name].overrides}")
                row = run_one(run, len(exp.arms), cmd, exp, say)
                rows = [r for r in rows if (r["arm"], r["seed"]) != (run.arm.name, str(run.seed))] + [row]
                write_results(exp.tsv, rows, order)
                ran += 1
        except KeyboardInterrupt:
            say(f"ablate: interrupted; finished runs are in {_rel(exp.tsv)}: rerun the same command to resume")
            return 130
        stats = write_outputs(exp, settings.threshold)
        planned = {(run.arm.name, str(run.seed)) for run in plan}
        mine = [r for r in rows if (r["arm"], r["seed"]) in planned]
        failed = [r for r in mine if r.get("status") != "ok"]
        if ran and len(mine) == len(planned):
            append_log_entry(exp, stats, {**meta, "threshold": settings.threshold}, mine)
            say(f"ablate: appended an entry to {_rel(exp.log_md)}: write its Decision line")
        say(f"ablate: {_rel(exp.results / 'summary.md')}:")
        for line in summary_table(stats, compact=True).splitlines():
            say("  " + line)
        if failed:
            say(f"ablate: {len(failed)} run(s) failed (see summary.md); rerun the same command to retry them")
            return 1
        return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
         say: Callable[[str], None] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="the experiment folder, e.g. experiments/quant")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="validate and print the plan; run nothing")
    mode.add_argument("--summarize", action="store_true", help="rebuild summary.md and the plots; run nothing")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    args = parser.parse_args(argv)
    environ = dict(os.environ if environ is None else environ)
    say = say or (lambda msg: print(msg, flush=True))
    try:
        exp = load_experiment(args.experiment)
        settings = read_settings(environ)
        if args.summarize:
            if not exp.tsv.is_file():
                raise ValidationError(f"{_rel(exp.tsv)} does not exist: nothing to summarize")
            write_outputs(exp)
            say(f"ablate: wrote {_rel(exp.results)}/summary.md, curves.png, bars.png")
            return 0
        plan = build_plan(exp, settings, environ)
        data_problems: list[str] = []
        infos = validate(exp, settings, environ, plan, data_problems if args.dry_run else None)
    except (ArmsError, ValidationError) as err:
        print(f"ablate: error: {err}", file=sys.stderr, flush=True)
        return 2
    if args.dry_run and args.json:
        say(json.dumps({"experiment": exp.slug, "seeds": list(settings.seeds), "proxy": settings.proxy,
                        "command": train_command(settings),
                        "data_problems": list(dict.fromkeys(data_problems)),
                        "arms": [{"arm": a.name, "overrides": infos[a.name].overrides, "env": infos[a.name].env,
                                  "unique_params": infos[a.name].unique_params,
                                  "effective_depth": infos[a.name].effective_depth} for a in exp.arms]}, indent=1))
        return 0
    print_plan(exp, settings, plan, infos, train_command(settings), say)
    if args.dry_run:
        for problem in dict.fromkeys(data_problems):
            say(f"ablate: warning: {problem}")
        say("ablate: dry run: every override is valid; nothing ran")
        return 0
    try:
        return sweep(exp, settings, environ, plan, infos, say)
    except ValidationError as err:
        print(f"ablate: error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
