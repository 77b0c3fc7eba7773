#!/usr/bin/env python3
"""The ablation runner: env vars plus arms.tsv make an experiment; every arm runs beside the control on the same
seeds, each result (train_gpt.py's JSON) lands in results.tsv as it ends, and a LOG.md entry closes. See README.md."""
import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import threading
import sys
import time
import warnings
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from string import Template
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from filelock import FileLock, Timeout
from matplotlib import colormaps
from matplotlib.figure import Figure                # no pyplot: files only, no GUI backend, nothing to close
from scipy import stats
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]          # the repo root, where train_gpt.py lives
# The value that meant off of each knob deleted with its arm (train_gpt.REMOVED_KNOBS names them and where the
# decision is): a sweep whose stored runs had one at this value resumes without it.
REMOVED_OFF = dict(kv.split("=") for kv in """DELTA_NET_HEADS=0 HELIX=0 HELIX_STRIDE=1 HELIX_DIM=32 HELIX_MODE=linear
LOOP_SMEAR=0 CRAWLER_LOOP_ROPE_SCALES= REPLAY_BATCHES=0 REPLAY_EPOCHS=2 REPLAY_LR_SCALE=0.1 DISTILL_STEPS=0
DISTILL_TEMPERATURE=2.0 DISTILL_ALPHA=0.7 DISTILL_LR_SCALE=0.05 INST_DIM=0 QAT_CRAWLER_ONLY=0 CRAWLER_QUANT_INT8=0
CHOKE_GROUPS=4 TRAIN_SAMPLING=shuffled TAP_DIM=0 TAP_LAYERS=all TAP_PER_LOOP=1 DELIBERATION=0 SWA_EVERY=0
SWA_START_SCALE=0.2 QUANT_CLIP=sdclip COMPRESSOR=brotli""".split())
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402
from experiments.cost_model import budget_steps  # noqa: E402

RUNNER_VARS = ("SEEDS", "PROFILE", "PROXY", "THRESHOLD", "MIN_SEEDS", "TRAIN_CMD",   # with ABLATE_*: never passed
               "TRAIN_TFLOPS", "QUESTION", "VARIANT")         # on (TRAIN_TFLOPS: ITERATIONS; VARIANT: run.sh's data)
# What a CPU verdict is for (QUESTION), and so how a compute budget (TRAIN_TFLOPS, PROFILE=cpu) becomes each arm's
# steps. pod: every arm runs the control's steps (equal steps), the proxy that ranked published scripts closest to
# their pod order (experiments/proxy_fidelity, LOG.md 2026-12-03); demo: each arm the steps the budget buys at its
# own FLOPs (equal compute: the CPU demo's own question, a fixed clock).
QUESTIONS = {"pod": "equal steps", "demo": "equal compute"}
PER_RUN_VARS = ("SEED", "RUN_ID", "LOG_DIR", "ARTIFACT_DIR", "RECORDS_DIR")          # the runner sets these
PROXY_ENV = {"ITERATIONS": "500", "MAX_WALLCLOCK_SECONDS": "0"}
ALPHA, POWER = 0.05, 0.8            # the paired test's level (two-sided) and the power behind the MDE
ARM_ID, KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z"), re.compile(r"[A-Z][A-Z0-9_]*\Z")
LEAD_COLUMNS = ["arm", "seed", "status", "val_bpb", "step_ms", "train_seconds", "wallclock_s", "bytes_total", "run_id",
                "code", "error"]   # results.tsv's first columns (even when every run failed), then the JSON's scalars
LEGACY_COLUMNS = {"sliding_bpb": "val_bpb", "ms_per_step": "step_ms", "train_s": "train_seconds",   # names before
                  "pre_quant_bpb": "pre_quant_val_bpb", "post_quant_bpb": "post_quant_val_bpb"}  # the JSON results
NUMBER_COLUMNS = [("val_bpb", "val_bpb", ".5f"), ("mean Δ", "delta", "+.5f"), ("paired p", "p", "p"),   # title,
                  ("Welch p", "welch_p", "p"), ("MDE", "mde", ".5f"), ("ms/step", "step_ms", ".1f"),  # column,
                  ("bytes_total", "bytes_total", ",.0f")]                               # format ("p": a p-value)
VERDICT_RULE = ("Δ = arm − control per seed, val_bpb (lower is better). **promote**: mean Δ ≤ −{t:g} and paired "
                "t-test p < {alpha}; **worse**: mean Δ ≥ +{t:g} and p < {alpha}; worse?: mean Δ ≥ +{t:g} but p ≥ "
                "{alpha} or 1 seed (rerun before dropping); else no signal. 95% CI: t-interval of mean Δ. MDE: (t[.975,"
                " n−1] + t[.8, n−1]) · sd(Δ) / √n, the |Δ| n seeds detect at α {alpha} two-sided, power {power}.")
VERDICT_COLORS = {"promote": "#2ca02c", "worse": "#d62728", "worse?": "#ff9896", "no signal": "#7f7f7f"}
Arm = namedtuple("Arm", "name description overrides line")   # overrides: ((KEY, VALUE), ...) as written
Run = namedtuple("Run", "arm seed run_id env")                # env: the child's whole environment


class ValidationError(ValueError):
    """The sweep cannot start (bad arms.tsv, knob, runner variable or budget; missing data): nothing ran."""


def _rel(path: Path) -> Path:
    return path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path.resolve()


def _seeds(seeds: Sequence[int]) -> str:
    return ",".join(map(str, seeds))


def runner_only(name: str) -> bool:
    return name in RUNNER_VARS or name.startswith("ABLATE_")


def parse_arms_text(text: str, source: str = "arms.tsv") -> list[Arm]:
    """`arm<TAB>description<TAB>overrides` rows under that header (`#`, blank lines skipped), `control` first."""
    rows = [(n, line.rstrip("\r").split("\t")) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]
    if not rows or [c.strip().lower() for c in rows[0][1]] != ["arm", "description", "overrides"]:
        raise ValidationError(f"{source}: the first row must be the header 'arm<TAB>description<TAB>overrides'")
    arms: dict[str, Arm] = {}
    for n, cols in rows[1:]:
        name, description, text = (c.strip() for c in (cols + ["", ""])[:3])
        tokens = [token.partition("=") for token in ([] if text in ("", "-") else text.split())]
        keys = [key for key, _, _ in tokens]
        bad = [k + eq + v for k, eq, v in tokens if not (eq and KEY.match(k) and v and Template(v).is_valid())]
        problem = (f"expected 3 tab-separated columns, got {len(cols)}" if len(cols) > 3
                   else f"bad arm id {name!r}: letters, digits, '_', '.', '-' only" if not ARM_ID.match(name)
                   else f"duplicate arm id {name!r} (first on line {arms[name].line})" if name in arms
                   else f"arm {name!r} has no description" if not description
                   else f"malformed override {bad[0]!r}: expected KEY=VALUE, KEY upper-case, VALUE non-empty, a $ "
                        "only in a ${NAME} reference" if bad
                   else f"{max(keys, key=keys.count)} is set twice" if len(set(keys)) < len(keys) else None)
        if problem:
            raise ValidationError(f"{source}:{n}: {problem}")
        arms[name] = Arm(name, description, tuple((k, v) for k, _, v in tokens), n)
    if next(iter(arms), None) != "control":
        where = f" (it is on line {arms['control'].line})" if "control" in arms else ""
        raise ValidationError(f"{source}: the first arm must be 'control'{where}" if arms else f"{source}: no arms")
    return list(arms.values())


def read_settings(environ: Mapping[str, str]) -> SimpleNamespace:
    """The runner variables; gpus = training processes (0: plain python, always so under TRAIN_CMD)."""
    def setting(name: str, default: Any, convert: Callable, valid: Callable, expected: str) -> Any:
        raw = environ.get(name, "").strip()
        with contextlib.suppress(ValueError):
            if not raw or valid(value := convert(raw)):
                return value if raw else default
        raise ValidationError(f"{name}={raw!r}: expected {expected}")
    train_cmd = shlex.split(environ.get("TRAIN_CMD", ""))
    gpus = 0 if train_cmd else setting("ABLATE_GPUS", torch.cuda.device_count(), int, lambda v: v >= 0, "int >= 0")
    return SimpleNamespace(
        seeds=setting("SEEDS", (1337,), lambda s: tuple(int(x) for x in re.split(r"[,\s]+", s) if x),
                      lambda v: v and min(v) >= 0 and len(set(v)) == len(v), "distinct integers >= 0, e.g. 1337,42"),
        proxy=setting("PROXY", "0", str, lambda v: v in ("0", "1"), "0 or 1") == "1",
        threshold=setting("THRESHOLD", 0.005, float, lambda v: 0 < v < math.inf, "a BPB delta > 0"),
        question=setting("QUESTION", "pod", str, lambda v: v in QUESTIONS, " or ".join(QUESTIONS)),
        min_seeds=setting("MIN_SEEDS", 3, int, lambda v: v >= 1, "an integer >= 1"),
        jobs=setting("ABLATE_JOBS", 1, int, lambda v: v == 1 or v > 1 and not gpus, "1, or CPU runs side by side"),
        profile=environ.get("PROFILE") or "pod", train_cmd=train_cmd, gpus=gpus)


def run_child(cmd: Sequence[str], env: Mapping[str, str], console: Path, tick: Callable[[], Any]) -> int:
    """Runs cmd in the repo root, output to console, calling tick each second. The child shares our process
    group, so Ctrl-C reaches it (and torchrun's workers) too; leaving Popen waits for it to stop."""
    with console.open("wb") as out, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out,
                                                     stderr=subprocess.STDOUT) as proc:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return proc.wait(timeout=1.0)
            tick()


def read_results(path: Path) -> pd.DataFrame:
    rows = pd.read_csv(path, sep="\t", dtype={"arm": str, "code": str, "run_id": str}) if path.is_file() else pd.DataFrame()
    rows = rows.rename(columns=LEGACY_COLUMNS)
    return rows.reindex(columns=list(dict.fromkeys([*LEAD_COLUMNS, *rows.columns])))


def paired_stats(arm: np.ndarray, control: np.ndarray) -> dict[str, float]:
    """arm − control on the same seeds: mean, 95% CI, paired p, Welch p (secondary) and the MDE, the smallest true
    difference n seeds detect at ALPHA two-sided with POWER: (t[1 - ALPHA/2, n-1] + t[POWER, n-1]) * sd(diff) / √n."""
    diff, n = arm - control, len(arm)
    out = dict(n=n, delta=diff.mean() if n else math.nan, ci_lo=math.nan, ci_hi=math.nan, p=math.nan,
               welch_p=math.nan, mde=math.nan)
    if n >= 2:
        with warnings.catch_warnings():  # an arm that changes only the export can tie the control exactly
            warnings.simplefilter("ignore", RuntimeWarning)
            paired = stats.ttest_rel(arm, control)
            out.update(p=paired.pvalue, welch_p=stats.ttest_ind(arm, control, equal_var=False).pvalue)
            out["ci_lo"], out["ci_hi"] = paired.confidence_interval(1 - ALPHA)
        t = stats.t(df=n - 1)
        out["mde"] = (t.ppf(1 - ALPHA / 2) + t.ppf(POWER)) * diff.std(ddof=1) / math.sqrt(n)
    return out


def verdict(delta: float, p: float, threshold: float) -> str:
    """The rule of experiments/README.md: a promotion needs the paired test; a regression is flagged without."""
    significant = p < ALPHA           # False for a NaN p: fewer than 2 seeds, or no spread at all
    return ("no data" if math.isnan(delta) else "promote" if delta <= -threshold and significant
            else ("worse" if significant else "worse?") if delta >= threshold else "no signal")


def arm_table(rows: pd.DataFrame, arm_names: Sequence[str], threshold: float) -> pd.DataFrame:
    """One row per arm (control first): means over its seeds, failures, the paired comparison."""
    ok = rows[rows.status == "ok"]
    by_seed = ok.pivot_table(index="seed", columns="arm", values="val_bpb").reindex(columns=arm_names)
    table = ok.groupby("arm")[["val_bpb", "step_ms", "bytes_total"]].mean().reindex(arm_names)
    table["failed"] = (rows.status != "ok").groupby(rows.arm).sum().reindex(arm_names).fillna(0).astype(int)
    pairs = [by_seed[[name, "control"]].dropna().to_numpy().T for name in arm_names]
    table = table.join(pd.DataFrame([paired_stats(*pair) for pair in pairs], index=table.index))
    table["verdict"] = [verdict(r.delta, r.p, threshold) for r in table.itertuples()]
    table.loc["control", ["ci_lo", "ci_hi", "p", "welch_p", "mde", "verdict"]] = [math.nan] * 5 + ["control"]
    return table


def _fmt(value: float, spec: str) -> str:
    if pd.isna(value):
        return "—"
    return "<0.001" if spec == "p" and value < 0.001 else format(value, ".3f" if spec == "p" else spec)


def markdown_table(table: pd.DataFrame) -> str:
    """The arms ranked by val_bpb, with the paired comparison against the control."""
    r = table.sort_values("val_bpb", na_position="last")
    cells = pd.DataFrame({title: [_fmt(v, spec) for v in r[col]] for title, col, spec in NUMBER_COLUMNS})
    cells.insert(0, "rank", [str(i) if pd.notna(v) else "—" for i, v in enumerate(r.val_bpb, 1)])
    cells.insert(1, "arm", [f"`{a}`" for a in r.index])
    cells.insert(2, "seeds", [f"{n:.0f}" + (f" (+{f} failed)" if f else "") for n, f in zip(r.n, r.failed)])
    cells.loc[list(r.index == "control"), "mean Δ"] = "0 (control)"
    cells.insert(5, "95% CI", [f"[{lo:+.5f}, {hi:+.5f}]" if pd.notna(lo) else "—"
                               for lo, hi in zip(r.ci_lo, r.ci_hi)])
    cells.insert(9, "verdict", [f"**{v}**" if v in ("promote", "worse") else v for v in r.verdict])
    return cells.to_markdown(index=False, disable_numparse=True)


def plot_bars(path: Path, table: pd.DataFrame, threshold: float, title: str) -> None:
    """Each arm's paired mean Δ with its 95% CI, a zero line and the ±threshold lines."""
    arms = table.drop(index="control")
    ax = Figure(figsize=(10, 1.6 + 0.55 * len(arms))).subplots()
    for y, r in enumerate(arms.itertuples()):
        err = [[r.delta - r.ci_lo], [r.ci_hi - r.delta]] if pd.notna(r.ci_lo) else None
        ax.errorbar(r.delta, y, xerr=err, fmt="o", ms=8, capsize=6, lw=2, color=VERDICT_COLORS.get(r.verdict))
        ax.annotate(f"  {_fmt(r.delta, '+.4f')}  p={_fmt(r.p, 'p')}  {r.verdict} ({r.n:.0f} seeds)" if r.n else
                    "  no finished pair", (1.0, y), xycoords=("axes fraction", "data"), va="center", fontsize=9)
    for x in (-threshold, 0, threshold):
        ax.axvline(x, color="gray" if x else "black", ls="--" if x else "-", lw=1 if x else 1.2)
    ax.set(yticks=range(len(arms)), yticklabels=arms.index, ylim=(max(len(arms), 1) - 0.5, -0.5), title=title,
           xlabel=f"val_bpb, arm − control: mean over seeds with 95% CI (lower is better; dashed ±{threshold:g})")
    ax.grid(axis="x", alpha=0.3)
    ax.figure.savefig(path, dpi=110, bbox_inches="tight")


def plot_curves(path: Path, curves: list[pd.DataFrame], arm_names: Sequence[str], title: str) -> None:
    """val_bpb against training seconds, a line per run: equal wallclock is the rule of the game."""
    ax = Figure(figsize=(10, 5.5), layout="tight").subplots()
    palette = [colormaps["tab10"](i) for i in (0, 1, 4, 5, 6, 8, 9)]    # no green, red, grey: verdicts in bars.png
    colors = dict(zip(arm_names[1:], itertools.cycle(palette)), control="black")
    for curve in curves:
        arm, curve = curve.arm.iloc[0], curve[curve.step > 0]     # the untrained model's score flattens the rest
        ax.plot(curve.train_seconds, curve.val_bpb, label=arm, color=colors[arm], lw=2.2 if arm == "control" else 1.4)
    by_arm = dict(zip(*reversed(ax.get_legend_handles_labels())))   # one legend entry per arm, not per run
    ax.legend(by_arm.values(), by_arm.keys(), title="arm", fontsize=9)
    ax.set(xlabel="training seconds (periodic validation excluded)", ylabel="val_bpb (lower is better)", title=title)
    ax.grid(alpha=0.3)
    ax.figure.savefig(path, dpi=110)


def run_seconds(rows: pd.DataFrame, hps: dict[str, train_gpt.Hyperparameters]) -> dict[str, float] | None:
    """Seconds per run of each arm: its steps (ITERATIONS, or the cap) at the ms/step its runs measured, plus
    their wall time outside the training loop; unmeasured arms take the measured mean. None: nothing measured."""
    ok = rows[(rows.status == "ok") & rows.step_ms.notna()]
    ok = ok.assign(overhead=(ok.wallclock_s - ok.train_seconds).clip(lower=0))
    per_arm, overall = ok.groupby("arm")[["step_ms", "overhead"]].mean(), ok[["step_ms", "overhead"]].mean()
    estimates = {}
    for name, hp in hps.items():
        measured = per_arm.loc[name] if name in per_arm.index else overall
        train = hp.iterations * measured.step_ms / 1000
        estimates[name] = float(measured.overhead + min(train, hp.max_wallclock_seconds or math.inf))
    return None if ok.empty else estimates


def fit_seeds(todo: list[Run], seeds: Sequence[int], estimates: dict[str, float], budget_s: float,
              min_seeds: int) -> tuple[int, ...]:
    """The longest prefix of seeds whose pending runs fit the budget; refuses fewer than min(min_seeds, len(seeds))."""
    cost = [sum(estimates[r.arm.name] for r in todo if r.seed == seed) for seed in seeds]
    fitting, floor = sum(total <= budget_s for total in itertools.accumulate(cost)), min(min_seeds, len(seeds))
    if fitting < floor:
        raise ValidationError(f"the budget ({tqdm.format_interval(budget_s)} left) is too small: {floor} seed(s) "
                              f"({_seeds(seeds[:floor])}) need about {tqdm.format_interval(sum(cost[:floor]))}; "
                              "raise --budget-minutes, lower MIN_SEEDS or drop arms")
    return tuple(seeds[:fitting])


class Sweep:
    """One experiment folder under one set of runner variables: its plan, its runs, its outputs."""

    def __init__(self, folder: str | Path, environ: Mapping[str, str], say: Callable[[str], None] = tqdm.write,
                 results: str = "results"):
        self.dir, self.environ, self.say = Path(folder).resolve(), dict(environ), say
        if not (self.dir / "arms.tsv").is_file():
            raise ValidationError(f"{folder}: not an experiment folder (no arms.tsv)")
        self.arms = parse_arms_text((self.dir / "arms.tsv").read_text(), str(_rel(self.dir / "arms.tsv")))
        self.names, self.settings = [arm.name for arm in self.arms], read_settings(environ)
        self.results, self.log_md = self.dir / results, self.dir.parent / "LOG.md"
        self.logs, self.work, self.tsv = (self.results / name for name in ("logs", "work", "results.tsv"))
        self.rows, self.ran, self.meta, self.writing = pd.DataFrame(), 0, {}, threading.Lock()   # rows: under the lock
        self.plan, self.hps, self.records = [], {}, {}     # by validate: the runs; per arm its hp, its sweep.json

    def train_command(self) -> list[str]:
        if self.settings.train_cmd or not self.settings.gpus:
            return self.settings.train_cmd or [sys.executable, "train_gpt.py"]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",          # torchrun, this Python's
                f"--nproc_per_node={self.settings.gpus}", "train_gpt.py"]

    def build_plan(self) -> list[Run]:
        """Seed-major (each seed's control, then its arms) so a cut-short sweep still compares."""
        # shared: the caller's env and run.sh's exports, minus runner variables, plus PROXY
        base = {k: v for k, v in self.environ.items() if not runner_only(k)}
        base |= PROXY_ENV if self.settings.proxy else {}
        if self.settings.jobs > 1:   # runs side by side share the cores: OpenMP threads that oversubscribe them spin
            base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.settings.jobs)))
        arm_envs = []
        for arm in self.arms:
            where = f"arm {arm.name!r} (arms.tsv line {arm.line})"
            if key := next((k for k, _ in arm.overrides if k not in train_gpt.knob_names() or k in PER_RUN_VARS), None):
                raise ValidationError(f"{where}: {key} is " + ("set by the runner for each run" if key in PER_RUN_VARS
                                      else "a runner variable" if runner_only(key) else "not a knob of train_gpt.py"))
            try:
                arm_envs.append({k: Template(v).substitute(self.environ) for k, v in arm.overrides})
            except KeyError as err:
                raise ValidationError(f"{where}: ${{{err.args[0]}}} is not set (run.sh sets it per PROFILE)") from None
        base |= {"LOG_DIR": str(_rel(self.logs)), "ARTIFACT_DIR": str(_rel(self.work / "artifacts")),
                 "RECORDS_DIR": str(_rel(self.work / "records"))}
        if tflops := float(self.environ.get("TRAIN_TFLOPS") or 0):   # a compute budget: steps per QUESTIONS
            for arm_env in arm_envs:
                try:
                    hp = train_gpt.Hyperparameters.from_env({**base, **(arm_env if self.settings.question == "demo"
                                                                         else arm_envs[0])})
                except train_gpt.GolfError:
                    continue   # validate() names the bad value
                arm_env["ITERATIONS"] = str(budget_steps(hp, tflops))
        return [Run(arm, seed, run_id, {**base, **arm_env, "SEED": str(seed), "RUN_ID": run_id})
                for seed in self.settings.seeds for arm, arm_env in zip(self.arms, arm_envs)
                for run_id in [f"{self.dir.name}_{arm.name}_s{seed}"]]

    def validate(self) -> list[str]:
        """Plans and checks every run (Hyperparameters.from_env, each arm's model built); returns missing data."""
        if not shutil.which(self.train_command()[0]):
            raise ValidationError(f"cannot run {shlex.join(self.train_command())}: {self.train_command()[0]} not found")
        knobs, gpus = set(train_gpt.knob_names()) - set(PER_RUN_VARS), self.settings.gpus   # knobs: what an arm is
        self.plan, missing = self.build_plan(), set()
        for run in self.plan:
            try:
                hp = train_gpt.Hyperparameters.from_env(run.env)
                if gpus > 1 and hp.accum_splits % gpus:
                    raise ValueError(f"ACCUM_SPLITS={hp.accum_splits} is not divisible by the {gpus} GPUs")
                params = self.records.get(run.arm.name, {}).get("unique_params") or train_gpt.count_unique_params(
                    train_gpt.CrawlerGPT(hp))
            except Exception as err:  # noqa: BLE001 - a bad value or a model that cannot be built stops it here
                raise ValidationError(f"arm {run.arm.name!r} (arms.tsv line {run.arm.line}) seed {run.seed}: "
                                      f"{err if isinstance(err, ValueError) else repr(err)}") from None
            self.hps[run.arm.name], self.records[run.arm.name] = hp, {
                "overrides": " ".join(f"{k}={run.env[k]}" for k, _ in run.arm.overrides) or "-",
                "env": {k: v for k, v in sorted(run.env.items()) if k in knobs}, "unique_params": params,
                "effective_depth": hp.effective_depth}
            shards = [list((ROOT / hp.data_path).glob(files)) for files in (hp.val_files, hp.train_files)]
            if not all(shards) or not (ROOT / hp.tokenizer_path).is_file():
                missing.add(f"no shards in DATA_PATH={hp.data_path} or no TOKENIZER_PATH={hp.tokenizer_path}: on a "
                            "pod run `bash setup_pod.sh`; on CPU use PROFILE=cpu (python data/prepare_local.py)")
        return [] if self.settings.train_cmd else sorted(missing)

    def print_plan(self) -> None:
        s, control = self.settings, self.records["control"]["unique_params"]
        self.say(f"ablate: {self.dir.name}: {len(self.arms)} arms x {len(s.seeds)} seed(s) ({_seeds(s.seeds)}), "
                 f"profile {s.profile}{', PROXY' if s.proxy else ''}; command: {shlex.join(self.train_command())}")
        for i, (name, rec) in enumerate(self.records.items(), 1):
            self.say(f"  {i}. {name:<{max(map(len, self.names))}}  params {rec['unique_params']:>11,} "
                     f"({100 * (rec['unique_params'] / control - 1):+.1f}% vs control)  "
                     f"depth {rec['effective_depth']:>2}  {rec['overrides']}")

    def write_meta(self) -> None:
        """sweep.json: each arm's knobs (an arm whose knobs changed is not resumed), what summary.md, LOG.md print."""
        s, env, path = self.settings, self.environ, self.results / "sweep.json"
        stored = json.loads(path.read_text())["arms"] if path.is_file() else {}
        for name in sorted(set(self.rows.arm[self.rows.status == "ok"]) & set(self.records) & set(stored)):
            old, new = stored[name]["env"], self.records[name]["env"]
            if diff := [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted({*old, *new}) if old.get(k) != new.get(k)
                        and not (k not in new and old.get(k) == REMOVED_OFF.get(k))]:
                raise ValidationError(f"arm {name!r} has finished runs in {_rel(self.results)} made with another "
                                      f"config ({'; '.join(diff)}): move the folder aside or restore the settings")
        caller = set(env.get("ABLATE_CALLER_VARS", "").split()) & set(train_gpt.knob_names())   # from profile.sh
        command = [f"PROFILE={s.profile}", f"SEEDS={_seeds(s.seeds)}"] + ["PROXY=1"] * s.proxy + [
            f"{k}={shlex.quote(env[k])}" for k in ("QUESTION", "THRESHOLD", "MIN_SEEDS", "TRAIN_CMD", "ABLATE_GPUS",
                                                   "ABLATE_JOBS", *sorted(caller)) if env.get(k)]
        device = train_gpt.device_name(torch.device("cuda" if s.gpus else "cpu"))
        budget = (f"{QUESTIONS[s.question]} from {env['TRAIN_TFLOPS']} TFLOPs" if env.get("TRAIN_TFLOPS") else
                  "fixed steps (PROXY=1)" if s.proxy else "each run's ITERATIONS and wallclock cap")
        self.meta.update(question=f"{s.question} ({budget})", profile=s.profile, seeds=list(s.seeds),
                         threshold=s.threshold, commit=train_gpt.git_commit(),
                         command=" ".join(command + [f"bash {_rel(self.dir)}/run.sh" if "ABLATE_CALLER_VARS" in env
                                                     else f"python experiments/ablate.py {_rel(self.dir)}"]
                                          + [f"--results {self.results.name}"] * (self.results.name != "results")),
                         device=(f"{s.gpus}x {device}" if s.gpus else device) + " (TRAIN_CMD)" * bool(s.train_cmd),
                         arms={**stored, **self.records})
        train_gpt.write_atomic(path, (json.dumps(self.meta, indent=1) + "\n").encode())

    def todo(self) -> list[Run]:
        ok = self.rows[self.rows.status == "ok"]
        return [run for run in self.plan if (run.arm.name, run.seed) not in set(zip(ok.arm, ok.seed))]

    def run_one(self, run: Run, tick: Callable[[], Any] = lambda: None) -> None:
        """Runs one (arm, seed); its row in results.tsv holds the scalars of its JSON result, or the failure.
        An earlier attempt's files are kept as <name>.attemptN.<ext> (and a stale JSON cannot pass for a result)."""
        result, console = self.logs / f"{run.run_id}.json", self.work / f"{run.run_id}.console.txt"
        for path in (self.logs / f"{run.run_id}.txt", result):
            attempts = (path.with_suffix(f".attempt{n}{path.suffix}") for n in itertools.count(1))
            if path.exists():
                path.rename(next(p for p in attempts if not p.exists()))
        row = {"arm": run.arm.name, "seed": run.seed, "run_id": run.run_id, "status": "ok",
               "code": hashlib.sha256((ROOT / "train_gpt.py").read_bytes()).hexdigest()[:10]}
        start, rc = time.monotonic(), run_child(self.train_command(), run.env, console, tick)
        row["wallclock_s"] = round(time.monotonic() - start, 1)
        if rc == 0 and result.is_file():
            row.update({k: v for k, v in json.loads(result.read_text()).items() if not isinstance(v, (dict, list))})
        else:
            train_gpt.write_atomic(self.logs / f"{run.run_id}.console.txt", console.read_bytes())   # makes logs/
            tail = [ln.strip() for ln in console.read_text(errors="replace").splitlines() if ln.strip()][-3:]
            error = f"exit {rc}: {' | '.join(tail) or '(no output)'}"[-400:] if rc else f"exit 0 but no {_rel(result)}"
            row.update(status="failed", error=error)
            self.say(f"ablate: {run.arm.name} seed {run.seed}: FAILED {error}")
        with self.writing:   # ABLATE_JOBS > 1: one run at a time rewrites results.tsv
            others = self.rows[(self.rows.arm != run.arm.name) | (self.rows.seed != run.seed)]   # a retry replaces
            rows = pd.DataFrame([*others.to_dict("records"), row], columns=list(dict.fromkeys([*others.columns, *row])))
            text = rows.replace(r"[\t\n]", " ", regex=True).to_csv(sep="\t", index=False, float_format="%.10g")
            train_gpt.write_atomic(self.tsv, text.encode())
            self.rows, self.ran = read_results(self.tsv), self.ran + 1     # the dtypes as a later sweep reads them

    def plan_time(self, budget_minutes: float | None) -> dict[str, float] | None:
        """Estimates run times (timing the first run if nothing is measured), fits SEEDS to the budget, says the ETA."""
        started, todo, s = time.monotonic(), self.todo(), self.settings
        if todo and run_seconds(self.rows, self.hps) is None:
            self.say(f"ablate: nothing measured yet: the first run ({todo[0].run_id}) times the sweep")
            self.run_one(todo[0])
        estimates = run_seconds(self.rows, self.hps)
        if budget_minutes and estimates is None:
            raise ValidationError("cannot plan to the budget: the first run failed, so nothing is measured")
        if budget_minutes:
            asked, budget_s = s.seeds, (budget_minutes * 60 - (time.monotonic() - started)) * s.jobs   # run-seconds
            s.seeds = fit_seeds(self.todo(), asked, estimates, budget_s, s.min_seeds)
            self.plan = [run for run in self.plan if run.seed in s.seeds]
            if s.seeds != asked:
                self.say(f"ablate: SEEDS={_seeds(asked)} does not fit --budget-minutes {budget_minutes:g}: "
                         f"running SEEDS={_seeds(s.seeds)} (MIN_SEEDS={s.min_seeds})")
        left = self.todo()
        eta = tqdm.format_interval(sum(estimates[r.arm.name] for r in left) / s.jobs) if estimates else "?"
        self.say(f"ablate: {len(self.plan) - len(left)} run(s) finished in {_rel(self.tsv)}, {len(left)} to run, "
                 f"about {eta}" + (f" of the {budget_minutes:g} min budget" if budget_minutes else ""))
        return estimates

    def run_all(self, estimates: dict[str, float] | None) -> None:
        """A bar of estimated seconds (or runs) so tqdm's ETA weighs slow arms; refreshed each second of a run on a
        terminal, once a run in a file (a second's refresh there would be a line of its own)."""
        todo = self.todo()
        weights = [estimates[r.arm.name] if estimates else 1.0 for r in todo]
        bar_format = "{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed, ETA {remaining}"
        def one(i: int, run: Run, weight: float) -> None:
            bar.set_description_str(f"run {i}/{len(todo)} {run.arm.name} s{run.seed}")
            self.run_one(run, bar.refresh if sys.stderr.isatty() else lambda: None)
            bar.update(weight)
        with tqdm(total=sum(weights), bar_format=bar_format, smoothing=0, file=sys.stderr, disable=not todo) as bar, \
                ThreadPoolExecutor(self.settings.jobs) as pool:   # threads: each only waits on its child
            list(pool.map(one, itertools.count(1), todo, weights))

    def report(self, table: pd.DataFrame, rows: pd.DataFrame) -> list[str]:
        """What summary.md and the LOG.md entry share: provenance, failures, the table, the verdict rule."""
        failed, meta = rows[rows.status != "ok"], self.meta
        return [f"- question: {meta.get('question', 'pod')}", f"- command: `{meta['command']}`",
                f"- device: {meta['device']}", f"- commit: `{meta['commit']}`",
                f"- results: `{_rel(self.results)}/` (summary.md, results.tsv, bars.png, curves.png)",
                *[f"- **failed run** {a}/s{s}: `{e}`" for a, s, e in zip(failed.arm, failed.seed, failed.error)],
                "", markdown_table(table), "", VERDICT_RULE.format(t=meta["threshold"], alpha=ALPHA, power=POWER), ""]

    def write_outputs(self, rows: pd.DataFrame) -> pd.DataFrame:
        """summary.md, bars.png and curves.png from the rows of this experiment's arms."""
        table, ok, slug = arm_table(rows, self.names, self.meta["threshold"]), rows[rows.status == "ok"], self.dir.name
        codes = sorted(set(ok.code.dropna()))          # train_gpt.py's hash when each run started
        warning = [f"> **Warning**: {len(codes)} versions of train_gpt.py ran in this sweep ({', '.join(codes)}).", ""]
        summary = [f"# `{slug}`: each arm against the control", "", *self.report(table, rows),
                   *warning * (len(codes) > 1), "![paired delta vs control](bars.png)", "", "![curves](curves.png)", ""]
        train_gpt.write_atomic(self.results / "summary.md", "\n".join(summary).encode())
        where = f"(profile {self.settings.profile}, seeds {_seeds(self.settings.seeds)})"
        plot_bars(self.results / "bars.png", table, self.meta["threshold"], f"{slug}: arms against the control {where}")
        results = [(arm, self.logs / f"{run_id}.json") for arm, run_id in zip(ok.arm, ok.run_id)]
        curves = [pd.DataFrame(json.loads(p.read_text())["curve"]).assign(arm=arm) for arm, p in results if p.is_file()]
        plot_curves(self.results / "curves.png", curves, self.names, f"{slug}: validation bpb per arm {where}")
        return table

    def finish(self) -> int:
        """The outputs, and a LOG.md entry once every planned pair has a row (if this sweep ran something)."""
        table = self.write_outputs(self.rows[self.rows.arm.isin(self.names)])
        planned = {(r.arm.name, r.seed) for r in self.plan}
        mine = self.rows[[pair in planned for pair in zip(self.rows.arm, self.rows.seed)]]
        if self.ran and len(mine) == len(planned):
            with self.log_md.open("a") as log:
                log.write("\n".join([f"\n## {time.strftime('%Y-%m-%d %H:%M')} — `{self.dir.name}`", "", *self.report(
                    table, mine), "Decision: _(to be filled in by the person: promote / drop / rerun, and why)_", ""]))
            self.say(f"ablate: appended an entry to {_rel(self.log_md)}: write its Decision line")
        self.say(f"ablate: {_rel(self.results / 'summary.md')}:\n{markdown_table(table)}")
        if failed := (mine.status != "ok").sum():
            self.say(f"ablate: {failed} run(s) failed (see summary.md); rerun the same command to retry them")
        return 1 if failed else 0

    def run(self, budget_minutes: float | None) -> int:
        try:
            with FileLock(self.work / ".lock", timeout=0):     # one sweep at a time rewrites results.tsv
                self.rows = read_results(self.tsv)
                self.write_meta()
                estimates = self.plan_time(budget_minutes)
                self.write_meta()                                # again: SEEDS may be cut to the budget
                self.run_all(estimates)
                return self.finish()
        except Timeout:
            raise ValidationError(f"another sweep is running on {_rel(self.dir)}") from None
        except KeyboardInterrupt:
            self.say(f"ablate: interrupted; finished runs are in {_rel(self.tsv)}: rerun the command to resume")
            return 130


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
         say: Callable[[str], None] = tqdm.write) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="the experiment folder, e.g. experiments/quant")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; run nothing")
    parser.add_argument("--budget-minutes", type=float, help="cut SEEDS (never below MIN_SEEDS) to fit N minutes")
    parser.add_argument("--results", default="results", metavar="NAME",
                        help="the folder of this sweep's results inside the experiment's (default: results); another "
                             "name reruns the experiment beside the first, e.g. on other data")
    args = parser.parse_args(argv)
    try:
        if args.budget_minutes is not None and not args.budget_minutes > 0:
            raise ValidationError(f"--budget-minutes {args.budget_minutes:g}: expected minutes > 0")
        if not ARM_ID.match(args.results) or not args.results.startswith("results"):
            raise ValidationError(f"--results {args.results!r}: expected a folder name starting with 'results'")
        sweep = Sweep(args.experiment, os.environ if environ is None else environ, say, args.results)
        missing = sweep.validate()
        if missing and not args.dry_run:
            raise ValidationError("; ".join(missing))
        sweep.print_plan()
        if not args.dry_run:
            return sweep.run(args.budget_minutes)
        say("".join(f"ablate: warning: {problem}\n" for problem in missing) + "ablate: dry run: nothing ran")
        return 0
    except ValidationError as err:
        print(f"ablate: error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
