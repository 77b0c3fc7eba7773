"""The ablation harness: experiments/ablate.py and every experiments/<slug>/ (CPU, a fake trainer, fast)."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from string import Template

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))

import ablate  # noqa: E402
import train_gpt  # noqa: E402

# Knobs an experiment may use before train_gpt.py has them: the check is strict once they exist.
PENDING = {"XSA_LAST_N", "CRAWLER_CADENCE"}
EXPERIMENT_DIRS = sorted(p for p in EXPERIMENTS.iterdir() if (p / "arms.tsv").is_file())
TOOL_DIRS = {"overhead", "proxy_fidelity"}   # tools with their own scripts, not sweeps of ablate.py


def test_every_folder_is_a_sweep_a_tool_or_results():
    for p in EXPERIMENTS.iterdir():
        if p.is_dir() and p.name not in TOOL_DIRS and not p.name.startswith((".", "__")):
            assert (p / "arms.tsv").is_file() == (p / "run.sh").is_file() or (p / "results").is_dir(), p.name

# A stand-in for train_gpt.py: writes a log and the result JSON train_gpt.py writes, fast. Its behaviour is
# keyed on knob values (the runner validates every override, so a test can only steer it through real knobs):
#   LOGIT_SOFTCAP=13 always fails; LOGIT_SOFTCAP=14 exits 0 without a JSON; QK_GAIN_INIT=5 fails once while
#   <script>.fail_once exists; LOGIT_SOFTCAP=15 takes a second, its start and end in <RUN_ID>.span. val_bpb = 2.5 + (QK_GAIN_INIT - 4) / 100 * a per-seed factor + a per-seed offset,
#   so an arm's differences from the control vary a little from seed to seed, as real ones do.
# Every run takes ITERATIONS steps at 6000 ms/step (60 s a run at ITERATIONS=10) as far as the budget knows.
# Calls go to <script>.calls, each run's env to <RUN_ID>.env.json beside the script.
FAKE_TRAINER = r'''
import json, os, sys, time
from pathlib import Path
here, env = Path(__file__), os.environ
start = time.time()
with here.with_suffix(".calls").open("a") as fh:
    fh.write(env["RUN_ID"] + "\n")
here.with_name(env["RUN_ID"] + ".env.json").write_text(json.dumps(dict(env)))
logs = Path(env["LOG_DIR"])
logs.mkdir(parents=True, exist_ok=True)
(logs / (env["RUN_ID"] + ".txt")).write_text("the trainer's log\n")
print("step:1/10 train_loss:6.9", flush=True)
if env.get("LOGIT_SOFTCAP") == "13":
    print("Traceback (most recent call last):", file=sys.stderr)
    print("RuntimeError: boom: the fake trainer was told to fail", file=sys.stderr)
    sys.exit(1)
if env.get("LOGIT_SOFTCAP") == "14":
    sys.exit(0)
flaky = here.with_suffix(".fail_once")
if env.get("QK_GAIN_INIT") == "5" and flaky.exists():
    flaky.unlink()
    print("error: transient failure", file=sys.stderr)
    sys.exit(1)
q, seed, steps = float(env.get("QK_GAIN_INIT", "4.0")), int(env["SEED"]), int(env["ITERATIONS"])
bpb = 2.5 + (q - 4.0) / 100 * {1337: 1.0, 42: 1.1, 7: 0.9}[seed] + {1337: 0.0, 42: 0.002, 7: -0.001}[seed]
curve = [{"step": s, "train_seconds": 6.0 * s, "val_bpb": bpb + 0.5 * (1 - s / steps) + 0.01, "val_loss": 4.0}
         for s in (0, steps // 2, steps)]
result = {"run_id": env["RUN_ID"], "commit": "fake", "device": "cpu_fake", "torch": "0", "hp": {"QK_GAIN_INIT": q},
          "val_bpb": bpb, "val_loss": 4.2, "post_quant_val_bpb": bpb + 0.003, "pre_quant_val_bpb": bpb + 0.002,
          "bytes_total": 600308, "bytes_code": 100, "bytes_model": 600208, "steps": steps,
          "train_seconds": 6.0 * steps, "step_ms": 6000.0, "unique_params": 4321,
          "phase_seconds": {"train": 6.0 * steps, "export": 0.1}, "curve": curve}
if env.get("LOGIT_SOFTCAP") == "15":
    time.sleep(1.0)
    here.with_name(env["RUN_ID"] + ".span").write_text(f"{start} {time.time()}")
(logs / (env["RUN_ID"] + ".json")).write_text(json.dumps(result))
'''


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def make_experiment(tmp_path: Path, rows: list[str], name: str = "exp") -> Path:
    d = tmp_path / "experiments" / name
    d.mkdir(parents=True)
    (d / "arms.tsv").write_text("arm\tdescription\toverrides\n" + "".join(r + "\n" for r in rows))
    return d


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    return script


def calls(script: Path) -> list[str]:
    f = script.with_suffix(".calls")
    return f.read_text().split() if f.is_file() else []


def env_for(script: Path, **extra: str) -> dict:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "TRAIN_CMD": f"{sys.executable} {script}", "SEEDS": "1337", "ITERATIONS": "10",
           "MAX_WALLCLOCK_SECONDS": "0",
           # a small model: validation builds each arm's model once to count its parameters
           "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "ROPE_DIMS": "8"}
    env.update(extra)
    return env


def sweep(exp: Path, env: dict, *args: str) -> tuple[int, list[str]]:
    lines: list[str] = []
    rc = ablate.main([str(exp), *args], environ=env, say=lines.append)
    return rc, lines


def rows_of(exp: Path) -> dict[tuple[str, int], pd.Series]:
    rows = pd.read_csv(exp / "results" / "results.tsv", sep="\t")      # pandas reads it as it is
    return {(r.arm, r.seed): r for _, r in rows.iterrows()}


def table_row(markdown: str, arm: str) -> list[str]:
    line = next(ln for ln in markdown.splitlines() if f"| `{arm}` " in ln)
    return [cell.strip() for cell in line.strip("|").split("|")]


# ----------------------------------------------------------------------------
# arms.tsv
# ----------------------------------------------------------------------------

GOOD_ARMS = """# a comment, then the header
arm\tdescription\toverrides

control\tthe baseline\t-
wide\twider model\tMODEL_DIM=${ABLATE_WIDE} NUM_HEADS=8
rtn\tround to nearest # not a comment\tQUANT=rtn
bare\tno overrides column
"""


def test_parse_arms_good_file():
    arms = ablate.parse_arms_text(GOOD_ARMS)
    assert [a.name for a in arms] == ["control", "wide", "rtn", "bare"]
    assert arms[0].overrides == () and arms[0].description == "the baseline"
    assert arms[1].overrides == (("MODEL_DIM", "${ABLATE_WIDE}"), ("NUM_HEADS", "8"))
    assert arms[2].overrides == (("QUANT", "rtn"),) and arms[2].description == "round to nearest # not a comment"
    assert arms[3].overrides == () and arms[1].line == 5


@pytest.mark.parametrize("rows, message", [
    (["wide\tw\tMODEL_DIM=128"], "first arm must be 'control'"),
    (["wide\tw\tMODEL_DIM=128", "control\tc\t-"], "it is on line 3"),
])
def test_parse_arms_missing_control(rows, message):
    with pytest.raises(ablate.ValidationError, match=message):
        ablate.parse_arms_text("arm\tdescription\toverrides\n" + "\n".join(rows))


def test_parse_arms_duplicate_ids():
    text = "arm\tdescription\toverrides\ncontrol\tc\t-\nrtn\ta\tQUANT=rtn\nrtn\tb\tQUANT=gptq\n"
    with pytest.raises(ablate.ValidationError, match=r"arms.tsv:4: duplicate arm id 'rtn' \(first on line 3\)"):
        ablate.parse_arms_text(text)


@pytest.mark.parametrize("overrides, message", [
    ("MODEL_DIM", "malformed override 'MODEL_DIM'"),
    ("model_dim=64", "malformed override"),
    ("MODEL_DIM=", "malformed override"),
    ("MODEL_DIM=64,NUM_HEADS=4", None),            # one token, the value "64,NUM_HEADS=4": from_env rejects it later
    ("MODEL_DIM=64 MODEL_DIM=96", "MODEL_DIM is set twice"),
    ("MODEL_DIM=${WIDE", "malformed override 'MODEL_DIM=${WIDE'"),     # an unclosed reference
    ("MODEL_DIM=6$", "malformed override"),
])
def test_parse_arms_malformed_overrides(overrides, message):
    text = f"arm\tdescription\toverrides\ncontrol\tc\t-\nx\tdesc\t{overrides}\n"
    if message is None:
        assert ablate.parse_arms_text(text)[1].overrides == (("MODEL_DIM", "64,NUM_HEADS=4"),)
        return
    with pytest.raises(ablate.ValidationError, match=re.escape(message)):
        ablate.parse_arms_text(text)


@pytest.mark.parametrize("text, message", [
    ("", "header"),
    ("arm\tdescription\n", "header"),
    ("arm\tdescription\toverrides\n", "no arms"),
    ("arm\tdescription\toverrides\ncontrol\tc\t-\textra\n", "expected 3 tab-separated columns"),
    ("arm\tdescription\toverrides\ncontrol\t\t-\n", "no description"),
    ("arm\tdescription\toverrides\ncontrol\tc\t-\nbad id\td\t-\n", "bad arm id"),
])
def test_parse_arms_malformed_file(text, message):
    with pytest.raises(ablate.ValidationError, match=message):
        ablate.parse_arms_text(text)


# ----------------------------------------------------------------------------
# validation before any run
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("row, extra, named", [
    ("typo\tt\tMODEL_DIMM=96", {}, "MODEL_DIMM is not a knob"),
    ("alien\ta\tFOO_BAR=1", {}, "FOO_BAR is not a knob"),
    ("bad\tb\tMODEL_DIM=abc", {}, "MODEL_DIM='abc'"),
    ("odd\to\tMODEL_DIM=60", {}, "MODEL_DIM"),                       # head dim 15: not even
    ("seed\ts\tSEED=3", {}, "SEED is set by the runner"),
    ("runner\tr\tTHRESHOLD=1", {}, "THRESHOLD is a runner variable"),
    ("helper\th\tABLATE_WIDE=1", {}, "ABLATE_WIDE is a runner variable"),
    ("ref\tr\tMODEL_DIM=${ABLATE_NOPE}", {}, "ABLATE_NOPE"),
    ("ok\to\tQUANT=rtn", {"CRAWLER_LOPS": "3"}, "CRAWLER_LOPS"),     # a typo in the experiment env
    ("ok\to\tQUANT=rtn", {"SEEDS": "1337,x"}, "SEEDS"),
    ("ok\to\tQUANT=rtn", {"SEEDS": "1337,1337"}, "SEEDS"),
    ("ok\to\tQUANT=rtn", {"THRESHOLD": "-1"}, "THRESHOLD"),
    ("ok\to\tQUANT=rtn", {"MIN_SEEDS": "0"}, "MIN_SEEDS"),
    ("ok\to\tQUANT=rtn", {"PROXY": "yes"}, "PROXY"),
    ("ok\to\tQUANT=rtn", {"TRAIN_CMD": "no-such-trainer x.py"}, "no-such-trainer not found"),
])
def test_bad_knob_rejected_before_any_run(tmp_path, fake, capsys, row, extra, named):
    exp = make_experiment(tmp_path, ["control\tc\t-", row])
    rc, _ = sweep(exp, env_for(fake, **extra))
    assert rc == 2
    assert named in capsys.readouterr().err
    assert calls(fake) == []
    assert not (exp / "results" / "results.tsv").exists()


def test_budget_must_be_positive(tmp_path, fake, capsys):
    exp = make_experiment(tmp_path, ["control\tc\t-"])
    assert sweep(exp, env_for(fake), "--budget-minutes", "0")[0] == 2
    assert "--budget-minutes" in capsys.readouterr().err and calls(fake) == []


def test_dry_run_validates_and_runs_nothing(tmp_path, fake):
    exp = make_experiment(tmp_path, ["control\tc\t-", "wide\tw\tMODEL_DIM=${ABLATE_WIDE}"])
    rc, lines = sweep(exp, env_for(fake, ABLATE_WIDE="96", SEEDS="1,2"), "--dry-run")
    assert rc == 0 and calls(fake) == []
    assert any("wide" in ln and "MODEL_DIM=96" in ln and "vs control" in ln for ln in lines)
    assert not (exp / "results").exists()


# ----------------------------------------------------------------------------
# sweeps with the fake trainer
# ----------------------------------------------------------------------------


def test_failing_arm_is_recorded_and_the_sweep_continues(tmp_path, fake):
    exp = make_experiment(tmp_path, ["control\tc\t-", "broken\tb\tLOGIT_SOFTCAP=13", "silent\ts\tLOGIT_SOFTCAP=14",
                                     "good\tg\tQK_GAIN_INIT=3.5"])
    rc, lines = sweep(exp, env_for(fake))
    assert rc == 1
    assert calls(fake) == ["exp_control_s1337", "exp_broken_s1337", "exp_silent_s1337", "exp_good_s1337"]
    rows = rows_of(exp)
    assert rows["control", 1337].status == "ok" and rows["good", 1337].status == "ok"
    broken = rows["broken", 1337]
    assert broken.status == "failed" and pd.isna(broken.val_bpb)
    assert broken.error.startswith("exit 1:") and "boom" in broken.error
    silent = rows["silent", 1337].error
    assert silent.startswith("exit 0 but no ") and silent.endswith("logs/exp_silent_s1337.json")
    assert (exp / "results" / "logs" / "exp_broken_s1337.console.txt").is_file()
    assert any("broken seed 1337: FAILED" in ln for ln in lines)
    summary = (exp / "results" / "summary.md").read_text()
    assert "failed run** broken/s1337" in summary and "boom" in summary
    assert table_row(summary, "broken")[2] == "0 (+1 failed)" and table_row(summary, "broken")[-3] == "no data"
    log_md = (exp.parent / "LOG.md").read_text()
    assert "failed run** broken/s1337" in log_md and "failed run** silent/s1337" in log_md


def test_resume_skips_finished_pairs_and_retries_failed(tmp_path, fake):
    exp = make_experiment(tmp_path, ["control\tc\t-", "flaky\tf\tQK_GAIN_INIT=5"])
    env = env_for(fake, SEEDS="1337,42")
    fake.with_suffix(".fail_once").write_text("")
    rc, _ = sweep(exp, env)
    assert rc == 1 and len(calls(fake)) == 4          # seed-major: control, flaky, control, flaky
    assert calls(fake)[:2] == ["exp_control_s1337", "exp_flaky_s1337"]
    assert rows_of(exp)["flaky", 1337].status == "failed"

    rc, lines = sweep(exp, env)                        # retries only the failed pair
    assert rc == 0 and calls(fake)[4:] == ["exp_flaky_s1337"]
    assert any("3 run(s) finished" in ln and "1 to run" in ln for ln in lines)
    assert all(r.status == "ok" for r in rows_of(exp).values()) and len(rows_of(exp)) == 4
    assert (exp / "results" / "logs" / "exp_flaky_s1337.attempt1.txt").is_file()  # the failed attempt's log is kept

    rc, _ = sweep(exp, env)                            # nothing left to run
    assert rc == 0 and len(calls(fake)) == 5

    tsv = exp / "results" / "results.tsv"              # an interrupted sweep: a row never written
    lines_tsv = tsv.read_text().splitlines()
    tsv.write_text("\n".join(line for line in lines_tsv if not line.startswith("control\t42\t")) + "\n")
    rc, _ = sweep(exp, env)
    assert rc == 0 and calls(fake)[5:] == ["exp_control_s42"]
    assert (exp / "results" / "logs" / "exp_control_s42.attempt1.json").is_file()  # the stale JSON set aside
    # one LOG.md entry per sweep that ran something and left every pair with a row
    assert (exp.parent / "LOG.md").read_text().count("\n## ") == 3


def test_resume_refuses_a_changed_config(tmp_path, fake, capsys):
    exp = make_experiment(tmp_path, ["control\tc\t-", "rtn\tr\tQUANT=rtn"])
    assert sweep(exp, env_for(fake))[0] == 0
    rc, _ = sweep(exp, env_for(fake, MODEL_DIM="96"))
    assert rc == 2 and "MODEL_DIM: 64 -> 96" in capsys.readouterr().err
    assert len(calls(fake)) == 2
    rc, _ = sweep(exp, env_for(fake, SEEDS="1337,42"))  # more seeds with the same config: fine
    assert rc == 0 and len(calls(fake)) == 4


def test_resume_ignores_a_deleted_knob_that_was_off(tmp_path, fake, capsys):
    assert ablate.REMOVED_OFF["DELTA_NET_HEADS"] == "0" and set(ablate.REMOVED_OFF) == set(train_gpt.REMOVED_KNOBS)
    exp = make_experiment(tmp_path, ["control\tc\t-", "rtn\tr\tQUANT=rtn"])
    assert sweep(exp, env_for(fake))[0] == 0
    meta_path = exp / "results" / "sweep.json"
    meta = json.loads(meta_path.read_text())
    for value, resumes in (("0", True), ("4", False)):   # the runs were made when DELTA_NET_HEADS existed
        meta["arms"]["control"]["env"]["DELTA_NET_HEADS"] = value
        meta_path.write_text(json.dumps(meta))
        rc, _ = sweep(exp, env_for(fake, SEEDS="1337,42"))
        assert (rc == 0) == resumes
    assert "DELTA_NET_HEADS: 4 -> None" in capsys.readouterr().err
    assert calls(fake)[2:] == ["exp_control_s42", "exp_rtn_s42"]


@pytest.mark.parametrize("question", ["demo", "pod", None])
def test_a_flop_budget_sets_each_arms_iterations_by_the_question(tmp_path, fake, question):
    """TRAIN_TFLOPS (the CPU proxy's budget) is the runner's, never passed on. QUESTION=demo (equal compute): each
    arm's child gets the ITERATIONS the budget buys at that arm's FLOPs (experiments/cost_model.budget_steps).
    QUESTION=pod, the default (equal steps, the proxy that ranked published scripts closest to the pod;
    experiments/proxy_fidelity): every arm runs the control's steps. LOG.md's entry says which."""
    from experiments.cost_model import budget_steps
    exp = make_experiment(tmp_path, ["control\tc\t-", "deep\td\tCRAWLER_LOOPS=4"])
    env = env_for(fake, TRAIN_TFLOPS="0.05", TRAIN_SEQ_LEN="128", TRAIN_BATCH_TOKENS="4096", ACCUM_SPLITS="1",
                  **({"QUESTION": question} if question else {}))
    assert sweep(exp, env)[0] == 0
    child = {arm: json.loads((fake.parent / f"exp_{arm}_s1337.env.json").read_text()) for arm in ("control", "deep")}
    hp = {arm: train_gpt.Hyperparameters.from_env({k: v for k, v in e.items() if k in train_gpt.knob_names()})
          for arm, e in child.items()}
    steps = {arm: budget_steps(hp[arm], 0.05) for arm in hp}
    assert steps["deep"] < steps["control"] and not any("TRAIN_TFLOPS" in e or "QUESTION" in e for e in child.values())
    want = [steps["control"], steps["deep"]] if question == "demo" else [steps["control"]] * 2
    assert [int(child[a]["ITERATIONS"]) for a in ("control", "deep")] == want
    entry = (exp.parent / "LOG.md").read_text() if (exp.parent / "LOG.md").exists() else \
        (exp / "results" / "summary.md").read_text()
    assert f"- question: {question or 'pod'} ({'equal compute' if question == 'demo' else 'equal steps'}" in entry


def test_a_bad_question_is_one_error(tmp_path, fake, capsys):
    exp = make_experiment(tmp_path, ["control\tc\t-"])
    assert sweep(exp, env_for(fake, QUESTION="pods"))[0] == 2
    assert "QUESTION='pods': expected pod or demo" in capsys.readouterr().err


def test_child_env_progress_and_proxy(tmp_path, fake, capsys):
    exp = make_experiment(tmp_path, ["control\tc\t-", "arm\ta\tQK_GAIN_INIT=3 ITERATIONS=7"])
    env = env_for(fake, PROXY="1", THRESHOLD="0.01", PROFILE="cpu", ABLATE_HELPER="x", ITERATIONS="20",
                  MIN_SEEDS="1", ABLATE_CALLER_VARS="PROFILE SEEDS ITERATIONS")
    rc, lines = sweep(exp, env)
    assert rc == 0
    child = json.loads((fake.parent / "exp_control_s1337.env.json").read_text())
    assert not {"SEEDS", "PROXY", "THRESHOLD", "PROFILE", "TRAIN_CMD", "MIN_SEEDS", "ABLATE_HELPER",
                "ABLATE_CALLER_VARS"} & set(child)
    assert child["SEED"] == "1337" and child["RUN_ID"] == "exp_control_s1337"
    assert child["ITERATIONS"] == "500" and child["MAX_WALLCLOCK_SECONDS"] == "0"      # PROXY wins over the env
    assert Path(child["LOG_DIR"]) == exp / "results" / "logs"
    assert Path(child["ARTIFACT_DIR"]).parent == exp / "results" / "work"
    assert Path(child["RECORDS_DIR"]).parent == exp / "results" / "work"
    arm = json.loads((fake.parent / "exp_arm_s1337.env.json").read_text())
    assert arm["ITERATIONS"] == "7" and arm["QK_GAIN_INIT"] == "3"                   # the arm wins over PROXY
    # the first run times the sweep (nothing measured yet); the bar covers the rest, with an ETA
    assert any("nothing measured yet" in ln for ln in lines)
    assert any("1 run(s) finished" in ln and "1 to run, about 00:42" in ln for ln in lines)  # 7 steps x 6 s
    bar = capsys.readouterr().err
    assert "run 1/1 arm s1337 100%" in bar and "ETA" in bar
    entry = (exp.parent / "LOG.md").read_text()
    assert "`PROFILE=cpu SEEDS=1337 PROXY=1 THRESHOLD=0.01" in entry and "ITERATIONS=20 bash" in entry


def test_jobs_run_side_by_side_on_shared_cores(tmp_path, fake, capsys):
    """ABLATE_JOBS=2: two runs at once (their spans overlap), every row written, the cores split between them."""
    exp = make_experiment(tmp_path, ["control\tc\t-", "a\ta\tQK_GAIN_INIT=3.5", "b\tb\tQK_GAIN_INIT=4.5"])
    rc, lines = sweep(exp, env_for(fake, SEEDS="1337,42", LOGIT_SOFTCAP="15", ABLATE_JOBS="2"))
    assert any("5 to run, about 02:30" in ln for ln in lines)   # 5 runs of 60 s, two at a time
    assert rc == 0 and len(rows_of(exp)) == 6 and all(r.status == "ok" for r in rows_of(exp).values())
    spans = sorted(tuple(map(float, p.read_text().split())) for p in fake.parent.glob("*.span"))
    assert len(spans) == 6 and any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
    child = json.loads((fake.parent / "exp_a_s42.env.json").read_text())
    assert child["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert sweep(exp, env_for(fake, ABLATE_JOBS="2", ABLATE_GPUS="1", TRAIN_CMD=""))[0] == 2
    assert "ABLATE_JOBS='2': expected 1, or CPU runs side by side" in capsys.readouterr().err


def test_outputs_summary_plots_and_log(tmp_path, fake):
    exp = make_experiment(tmp_path, ["control\tthe control\t-", "better\tlower bpb\tQK_GAIN_INIT=3",
                                     "same\tno change\tQK_GAIN_INIT=4.01", "worse\thigher bpb\tQK_GAIN_INIT=5.5"])
    rc, _ = sweep(exp, env_for(fake, SEEDS="1337,42,7"))
    assert rc == 0
    res = exp / "results"
    rows = pd.read_csv(res / "results.tsv", sep="\t")
    assert list(rows.columns[:4]) == ["arm", "seed", "status", "val_bpb"] and len(rows) == 12
    assert list(rows.arm[:4]) == ["control", "better", "same", "worse"] and list(rows.seed[::4]) == [1337, 42, 7]
    r = rows_of(exp)["control", 42]                    # the JSON's scalars, as the trainer wrote them
    assert (r.val_bpb, r.pre_quant_val_bpb, r.post_quant_val_bpb) == pytest.approx((2.502, 2.504, 2.505))
    assert (r.bytes_total, r.step_ms, r.steps, r.train_seconds, r.unique_params) == (600308, 6000, 10, 60, 4321)
    assert r.device == "cpu_fake" and r.wallclock_s >= 0 and "curve" not in rows and "hp" not in rows
    summary = (res / "summary.md").read_text()
    ranking = [m.group(1) for m in re.finditer(r"^\| +\d+ +\| `(\w+)`", summary, re.M)]
    assert ranking == ["better", "control", "same", "worse"]
    # better: differences -0.010, -0.011, -0.009: mean -0.01, sd 0.001, t = -17.3 on 2 df;
    # CI = mean -+ 4.303 * 0.001 / sqrt(3); MDE = (4.303 + 1.061) * 0.001 / sqrt(3) (t table, 2 df)
    rank, arm, seeds, bpb, delta, ci, p, welch, mde, verdict, ms, size = table_row(summary, "better")
    assert (seeds, delta, ci, p, mde, verdict) == ("3", "-0.01000", "[-0.01248, -0.00752]", "0.003", "0.00310",
                                                   "**promote**")
    assert 0 < float(welch) < 0.05 and (ms, size) == ("6000.0", "600,308")
    assert table_row(summary, "worse")[9] == "**worse**" and table_row(summary, "same")[9] == "no signal"
    assert table_row(summary, "control")[4:10] == ["0 (control)", "—", "—", "—", "—", "control"]
    for png in ("curves.png", "bars.png"):
        assert (res / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log_md = (exp.parent / "LOG.md").read_text()
    assert f"- commit: `{train_gpt.git_commit()}`" in log_md and "- device: cpu_" in log_md
    assert "Decision:" in log_md and "| `better` " in log_md and "paired t-test" in log_md and "MDE" in log_md
    summary_before = summary
    (res / "summary.md").unlink()
    assert sweep(exp, env_for(fake, SEEDS="1337,42,7"))[0] == 0      # nothing to run: the outputs again
    assert (res / "summary.md").read_text() == summary_before and log_md == (exp.parent / "LOG.md").read_text()


# ----------------------------------------------------------------------------
# the budget
# ----------------------------------------------------------------------------


def test_budget_cuts_seeds_then_refuses_then_fits(tmp_path, fake, capsys):
    exp = make_experiment(tmp_path, ["control\tc\t-", "arm\ta\tQK_GAIN_INIT=3"])
    env = env_for(fake, SEEDS="1337,42,7", MIN_SEEDS="2")
    # Nothing measured: the first run times the sweep at 60 s a run; 3.5 min leave room for 1337 and 42 only.
    rc, lines = sweep(exp, env, "--budget-minutes", "3.5")
    assert rc == 0 and calls(fake) == ["exp_control_s1337", "exp_arm_s1337", "exp_control_s42", "exp_arm_s42"]
    assert any("SEEDS=1337,42,7 does not fit --budget-minutes 3.5: running SEEDS=1337,42" in ln for ln in lines)
    assert "`PROFILE=pod SEEDS=1337,42 MIN_SEEDS=2" in (exp.parent / "LOG.md").read_text()
    # Seed 7 needs 2 more runs (2 min); with MIN_SEEDS=3 one minute is refused before anything runs.
    rc, _ = sweep(exp, {**env, "MIN_SEEDS": "3"}, "--budget-minutes", "1")
    assert rc == 2 and "3 seed(s) (1337,42,7) need about 02:00" in capsys.readouterr().err and len(calls(fake)) == 4
    rc, lines = sweep(exp, {**env, "MIN_SEEDS": "3"}, "--budget-minutes", "2.5")
    assert rc == 0 and calls(fake)[4:] == ["exp_control_s7", "exp_arm_s7"]
    assert any("2 to run, about 02:00 of the 2.5 min budget" in ln for ln in lines)


def test_fit_seeds_and_run_seconds():
    arm = ablate.Arm("a", "d", (), 2)
    todo = [ablate.Run(arm, seed, f"r{seed}", {}) for seed in (1, 2, 2, 3)]
    assert ablate.fit_seeds(todo, (1, 2, 3), {"a": 10.0}, 30.0, 1) == (1, 2)
    assert ablate.fit_seeds(todo, (1, 2, 3), {"a": 10.0}, 40.0, 3) == (1, 2, 3)
    assert ablate.fit_seeds(todo[:1], (1,), {"a": 10.0}, 10.0, 3) == (1,)      # one seed asked: one is enough
    with pytest.raises(ablate.ValidationError, match="2 seed"):
        ablate.fit_seeds(todo, (1, 2, 3), {"a": 10.0}, 25.0, 2)
    rows = pd.DataFrame({"arm": ["a", "a", "b"], "status": ["ok", "ok", "failed"], "step_ms": [100.0, 300.0, None],
                         "wallclock_s": [50.0, 70.0, 1.0], "train_seconds": [20.0, 40.0, None]})
    hps = {"a": train_gpt.Hyperparameters.from_env({"ITERATIONS": "100", "MAX_WALLCLOCK_SECONDS": "0"}),
           "b": train_gpt.Hyperparameters.from_env({"ITERATIONS": "1000", "MAX_WALLCLOCK_SECONDS": "60"})}
    # a: 100 steps x 200 ms + 30 s overhead; b (not measured): a's figures, its steps capped at 60 s
    assert ablate.run_seconds(rows, hps) == {"a": 50.0, "b": 90.0}
    assert ablate.run_seconds(rows[rows.status == "failed"], hps) is None


# ----------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------


def test_paired_stats_on_fixed_numbers():
    control = np.array([2.80, 2.81, 2.82, 2.79])
    arm = control + np.array([-0.010, -0.012, -0.008, -0.010])   # mean -0.010, sd sqrt(8e-6 / 3)
    s = ablate.paired_stats(arm, control)
    sd = math.sqrt(8e-6 / 3)
    assert s["n"] == 4 and s["delta"] == pytest.approx(-0.010)
    # 3 df from a t table: t(0.975) = 3.182, t(0.8) = 0.978; t = -0.010 / (sd / 2) = -12.25: p = 0.0012
    assert (s["ci_lo"], s["ci_hi"]) == pytest.approx((-0.010 - 3.182 * sd / 2, -0.010 + 3.182 * sd / 2), abs=2e-6)
    assert s["mde"] == pytest.approx((3.182 + 0.978) * sd / 2, abs=2e-6)
    assert s["p"] == pytest.approx(0.0012, abs=1e-4)
    assert s["welch_p"] > 0.1                     # the seeds' spread hides the same shift from an unpaired test
    one = ablate.paired_stats(np.array([2.5]), np.array([2.6]))
    assert one["delta"] == pytest.approx(-0.1) and all(math.isnan(one[k]) for k in ("p", "ci_lo", "mde", "welch_p"))
    tie = ablate.paired_stats(control.copy(), control)   # an export-only arm: the very same numbers
    assert tie["delta"] == 0 and math.isnan(tie["p"]) and tie["mde"] == 0


def test_arm_table_pairs_by_seed():
    def rows(arm, values, seeds=(1337, 42, 7)):
        return [{"arm": arm, "seed": s, "status": "ok", "val_bpb": v} for s, v in zip(seeds, values)]
    data = pd.DataFrame(rows("control", [2.80, 2.81, 2.82]) + rows("lost_seed", [2.78, 2.79], seeds=(1337, 42))
                        + [{"arm": "lost_seed", "seed": 7, "status": "failed", "val_bpb": None}]
                        + rows("extra_seed", [2.70, 2.80, 2.90, 2.50], seeds=(1337, 42, 7, 99))
                        + [{"arm": "dead", "seed": 1337, "status": "failed", "val_bpb": None}])
    data = data.assign(step_ms=1.0, bytes_total=1)
    table = ablate.arm_table(data, ["control", "lost_seed", "extra_seed", "dead"], 0.005)
    assert table.loc["lost_seed", "n"] == 2 and table.loc["lost_seed", "failed"] == 1
    assert table.loc["lost_seed", "delta"] == pytest.approx(-0.02)
    assert table.loc["extra_seed", "n"] == 3 and table.loc["extra_seed", "delta"] == pytest.approx(-0.01)  # no 99
    assert table.loc["dead", "verdict"] == "no data" and table.loc["dead", "n"] == 0
    assert table.loc["control", "verdict"] == "control" and table.loc["control", "delta"] == 0
    assert table.loc["control", "val_bpb"] == pytest.approx(2.81)


def test_verdict_rule():
    assert ablate.verdict(-0.006, 0.01, 0.005) == "promote"
    assert ablate.verdict(-0.006, 0.20, 0.005) == "no signal"     # big delta, but noise
    assert ablate.verdict(-0.006, math.nan, 0.005) == "no signal"  # one seed: no test, no promotion
    assert ablate.verdict(-0.004, 0.001, 0.005) == "no signal"     # significant, but below the threshold
    assert ablate.verdict(0.005, 0.01, 0.005) == "worse"
    assert ablate.verdict(0.006, 0.5, 0.005) == "worse?"
    assert ablate.verdict(0.006, math.nan, 0.005) == "worse?"
    assert ablate.verdict(math.nan, math.nan, 0.005) == "no data"


def test_results_from_before_the_json_are_read(tmp_path):
    tsv = tmp_path / "results.tsv"
    tsv.write_text("arm\tseed\tstatus\tsliding_bpb\tms_per_step\ttrain_s\nctl\t1\tok\t2.5\t400.0\t32.0\n")
    rows = ablate.read_results(tsv)
    assert (rows.val_bpb[0], rows.step_ms[0], rows.train_seconds[0]) == (2.5, 400.0, 32.0)
    assert list(rows.columns[:4]) == ["arm", "seed", "status", "val_bpb"] and pd.isna(rows.error[0])


# ----------------------------------------------------------------------------
# the shipped experiments
# ----------------------------------------------------------------------------

ASSIGN = re.compile(r"(?:^|[\s;)])(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=")


def shell_assignments(path: Path) -> set[str]:
    """Names a script assigns, its sourced experiments/*.sh helpers included (profile.sh is checked on its own)."""
    names = set()
    for line in path.read_text().splitlines():
        code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        names |= {n for n in ASSIGN.findall(code) if n == n.upper()}
        if (m := re.match(r"\s*source (experiments/\w+\.sh)", code)) and m[1] != "experiments/profile.sh":
            names |= shell_assignments(ROOT / m[1])
    return names


def check_names(names: set[str], where: str) -> None:
    known = set(train_gpt.knob_names())
    unknown = {n for n in names if n not in known and not ablate.runner_only(n) and n not in ("PYTHON", "OMP_NUM_THREADS")}
    owned = names & set(ablate.PER_RUN_VARS)
    assert not owned, f"{where} sets {owned}: the runner sets these per run"
    strict = unknown - PENDING
    assert not strict, f"{where} sets {sorted(strict)}: not knobs of train_gpt.py"
    if unknown:
        pytest.xfail(f"{where} uses {sorted(unknown)}, pending in train_gpt.py")


def test_git_keeps_the_sweeps_logs_but_not_their_work_folder():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0
    assert not ignored("experiments/new/results/logs/new_control_s1337.json")   # despite the repo-wide logs/ rule
    assert ignored("experiments/new/results/work/console/new_control_s1337.txt") and ignored("logs/run.txt")


def test_there_are_experiments():
    assert {p.name for p in EXPERIMENT_DIRS} >= {"crawler_vs_flat", "cadence", "quant", "xsa_coverage", "quant_budget",
                                                  "crawler_arms", "cpu_profile"}
    for deleted in ("helix_steps", "arms_9seeds", "train_sampling"):   # their arms are gone; their results and LOG.md entries stay
        assert not (EXPERIMENTS / deleted / "run.sh").exists() and (EXPERIMENTS / deleted / "results").is_dir()


def test_profile_sets_only_knobs():
    names = shell_assignments(EXPERIMENTS / "profile.sh")
    assert {"MODEL_DIM", "ITERATIONS", "DATA_PATH"} <= names
    check_names(names, "experiments/profile.sh")


@pytest.mark.parametrize("exp", EXPERIMENT_DIRS, ids=lambda p: p.name)
def test_run_sh_and_arms_set_only_knobs(exp):
    text = (exp / "run.sh").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert "train_gpt" not in code, "run.sh calls the shared runner, never the trainer"
    assert re.search(r'exec "\$\{PYTHON:-python3\}" experiments/ablate\.py experiments/' + exp.name + r' "\$@"', text)
    assert "source experiments/profile.sh" in text
    assert not list(exp.glob("*.py")), "an experiment is env vars and arms, never a copy of a script"
    arms = ablate.parse_arms_text((exp / "arms.tsv").read_text())
    names = shell_assignments(exp / "run.sh") | {k for a in arms for k, _ in a.overrides}
    refs = {ref for a in arms for _, v in a.overrides for ref in Template(v).get_identifiers()}
    assert refs <= shell_assignments(exp / "run.sh"), f"arms.tsv uses {refs}: run.sh must define them"
    check_names(names, f"experiments/{exp.name}")


def run_sh_env(exp: Path, profile: str, tmp_path: Path) -> dict:
    """The environment run.sh hands to the runner, without running it (PYTHON points at an env dump)."""
    dump = tmp_path / "dump_env.sh"
    dump.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import json, os; print(json.dumps(dict(os.environ)))'\n")
    dump.chmod(0o755)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "PROFILE": profile,
           "PYTHON": str(dump)}
    out = subprocess.run(["bash", str(exp / "run.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("profile", ["cpu", "pod"])
@pytest.mark.parametrize("exp", EXPERIMENT_DIRS, ids=lambda p: p.name)
def test_experiment_validates(exp, profile, tmp_path):
    env = run_sh_env(exp, profile, tmp_path)
    env.pop("PYTHON")
    sweep = ablate.Sweep(exp, env)
    try:
        sweep.validate()                       # data may be missing here: only a real run refuses that
    except ablate.ValidationError as err:
        if any(k in str(err) for k in PENDING if k not in train_gpt.knob_names()):
            pytest.xfail(f"pending knob: {err}")
        raise
    arms = sweep.records
    assert list(arms)[0] == "control" and sweep.settings.seeds == (1337,)
    if re.search(r"^source experiments/second_corpus.sh", (exp / "run.sh").read_text(), re.M):   # on vimdoc always
        assert arms["control"]["env"]["DATA_PATH"] == "data/datasets/vimdoc_sp1024"
    elif profile == "cpu":
        assert arms["control"]["env"]["DATA_PATH"] == "data/datasets/local_sp1024"
    else:
        assert "DATA_PATH" not in arms["control"]["env"]         # the production default: FineWeb
    if exp.name == "crawler_vs_flat":   # equal bytes: every arm fits the same binding cap with its own grid
        assert {(a["env"]["SIZE_TARGET"], a["env"]["SIZE_LIMIT"]) for a in arms.values()} == \
            {("fit", arms["control"]["env"]["SIZE_LIMIT"])} and int(arms["control"]["env"]["SIZE_LIMIT"]) < 16_000_000
        assert arms["control"]["env"]["NUM_CRAWLER_LAYERS"] == "0"
        assert len({a["effective_depth"] for a in arms.values()}) >= 3


def test_significance_is_the_rules_one_sided_welch_test_by_hand(tmp_path):
    """records.significance against Welch's t and Satterthwaite's df written out, in nats; and every upstream
    shape of an earlier result that baseline() reads."""
    from experiments import records
    ours_bpb = [1.0500, 1.0505, 1.0498]
    ratio = 2.19   # nats per bpb unit of "our" tokenizer: val_loss = ratio x val_bpb, as in a real run
    ours = [b * ratio for b in ours_bpb]
    base_bpb = [1.0611, 1.0625, 1.0599]
    path = tmp_path / "sub.json"
    path.write_text(json.dumps({"name": "rec", "seed_results": {s: {"val_bpb": b, "val_loss": 9.9}
                                                                for s, b in zip("abc", base_bpb)}}))
    sig = records.significance(ours, ours_bpb, records.baseline(path))
    x, y = np.array(ours), np.array(base_bpb) * ratio - 0.005
    vx, vy = x.var(ddof=1) / 3, y.var(ddof=1) / 3
    t = (x.mean() - y.mean()) / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / 2 + vy ** 2 / 2)
    from scipy.stats import t as student
    assert sig["p"] == pytest.approx(student.cdf(t, df), rel=1e-9)
    assert sig["delta_nats"] == pytest.approx(x.mean() - np.mean(base_bpb) * ratio)
    assert sig["passed"] == (sig["delta_nats"] <= -0.005 and sig["p"] < 0.01)
    assert sig["delta_nats"] < -0.02 and sig["passed"]   # ~0.024 nats better with a small spread
    near = [np.mean(ours_bpb) + 0.0035 + d for d in (-0.002, 0, 0.002)]   # ~0.0077 nats worse, noisier
    close = records.significance(ours, ours_bpb, records.baseline(path) | {"per_seed": near, "val_bpb": np.mean(near)})
    assert close["delta_nats"] < -0.005 and not close["passed"]   # past the margin, but not at p < 0.01
    shapes = {"seeds_mapping": {"seeds": {"0": {"val_bpb": 1.08}, "42": {"val_bpb": 1.09}}},
              "seed_scores": {"seeds": [0, 1], "seed_scores": [1.08, 1.09]},
              "mean_only": {"val_bpb": 1.085, "val_bpb_std": 0.007, "seeds": [0, 1, 2]},
              "one_value": {"val_bpb": 1.085}}
    for name, sub in shapes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "submission.json").write_text(json.dumps(sub))
        base = records.baseline(tmp_path / name)
        assert base["val_bpb"] == pytest.approx(1.085) and base["name"] == name
        assert base["n"] == {"mean_only": 3, "one_value": 1}.get(name, 2)
    assert records.significance(ours, ours_bpb, records.baseline(tmp_path / "one_value"))["test"].startswith("one-sample")
    (tmp_path / "bad.json").write_text(json.dumps({"name": "no score"}))
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(train_gpt.DataError, match="COMPARE_TO="):
            records.baseline(bad)
    ok = subprocess.run([sys.executable, "experiments/records.py", "--check-baseline", str(path)], cwd=ROOT,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "val_bpb 1.061167 over 3 seed(s)" in ok.stdout
    bad = subprocess.run([sys.executable, "experiments/records.py", "--check-baseline", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: COMPARE_TO=")
