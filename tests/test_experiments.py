"""The ablation harness: experiments/ablate.py and every experiments/<slug>/ (CPU, a fake trainer, fast)."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))

import ablate  # noqa: E402
import train_gpt  # noqa: E402

# Knobs an experiment may use before train_gpt.py has them: the check is strict once they exist.
PENDING = {"XSA_LAST_N", "CRAWLER_CADENCE"}
EXPERIMENT_DIRS = sorted(p for p in EXPERIMENTS.iterdir() if (p / "run.sh").is_file())

# A stand-in for train_gpt.py: writes the log lines the runner reads, fast. Its behaviour is keyed on
# knob values (the runner validates every override, so a test can only steer it through real knobs):
#   LOGIT_SOFTCAP=13  always fails;  QK_GAIN_INIT=5 fails once while <script>.fail_once exists.
# sliding bpb = 2.5 + (QK_GAIN_INIT - 4) / 100 + a per-seed offset; calls go to <script>.calls.
FAKE_TRAINER = r'''
import json, os, sys
from pathlib import Path
here = Path(__file__)
env = os.environ
with here.with_suffix(".calls").open("a") as fh:
    fh.write(env["RUN_ID"] + "\n")
here.with_name(env["RUN_ID"] + ".env.json").write_text(json.dumps(dict(env)))
log = Path(env["LOG_DIR"]) / (env["RUN_ID"] + ".txt")
log.parent.mkdir(parents=True, exist_ok=True)
log.write_text("")
def say(line):
    print(line, flush=True)
    with log.open("a") as fh:
        fh.write(line + "\n")
say("crawler-golf train_gpt.py commit:fake bytes_code:100")
say("hp QK_GAIN_INIT=" + env.get("QK_GAIN_INIT", "4.0"))
say("unique_params:4321 effective_depth:8 flat:4 crawler:2x2")
if env.get("LOGIT_SOFTCAP") == "13":
    say("step:1/10 train_loss:6.9 lr_scale:1.000 tok_s:100 step_avg:10.0ms eta:1s")
    print("Traceback (most recent call last):", file=sys.stderr)
    print("RuntimeError: boom: the fake trainer was told to fail", file=sys.stderr)
    sys.exit(1)
flaky = here.with_suffix(".fail_once")
if env.get("QK_GAIN_INIT") == "5" and flaky.exists():
    flaky.unlink()
    print("error: transient failure", file=sys.stderr)
    sys.exit(1)
q = float(env.get("QK_GAIN_INIT", "4.0"))
seed = int(env["SEED"])
bpb = 2.5 + (q - 4.0) / 100 + {1337: 0.0, 42: 0.002, 7: -0.001}.get(seed, 0.0)
say("step:0 val_loss:6.9 val_bpb:3.9 train_time:0.0s")
say("step:5/10 train_loss:4.5 lr_scale:1.000 tok_s:8199 step_avg:12.5ms eta:3s")
say(f"step:5 val_loss:4.6 val_bpb:{bpb + 0.3:.4f} train_time:0.1s")
say("step:10/10 train_loss:4.2 lr_scale:0.000 tok_s:8199 step_avg:12.0ms eta:0s")
say(f"step:10 val_loss:4.3 val_bpb:{bpb + 0.01:.4f} train_time:0.2s")
say("quant:gptq loop_aware:1 compressor:brotli quantize_seconds:0.1 pack_seconds:0.0 bytes_code:100 bytes_model:600208 bytes_total:600308")
say(f"quant_gap:0.001000 pre_quant_val_bpb:{bpb + 0.002:.6f} rtn_val_bpb:{bpb + 0.004:.6f} post_quant_val_bpb:{bpb + 0.003:.6f}")
say(f"sliding_val_loss:4.2 sliding_val_bpb:{bpb:.6f} sliding_eval_seconds:0.1")
say("time_checks:0.0s time_train:0.2s time_calibration:0.0s time_export:0.1s time_eval:0.1s")
say(f"final val_bpb:{bpb:.6f} val_loss:4.2 bytes_total:600308 bytes_code:100 bytes_model:600208")
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
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1",
           "TRAIN_CMD": f"{sys.executable} {script}", "SEEDS": "1337",
           # a small model: validation builds each arm's model once to count its parameters
           "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "ROPE_DIMS": "8"}
    env.update(extra)
    return env


def sweep(exp: Path, env: dict, *args: str) -> tuple[int, list[str]]:
    lines: list[str] = []
    rc = ablate.main([str(exp), *args], environ=env, say=lines.append)
    return rc, lines


def rows_of(exp: Path) -> dict[tuple[str, str], dict]:
    return {(r["arm"], r["seed"]): r for r in ablate.read_results(exp / "results" / "results.tsv")}


# ----------------------------------------------------------------------------
# arms.tsv
# ----------------------------------------------------------------------------

GOOD_ARMS = """# a comment, then the header
arm\tdescription\toverrides

control\tthe baseline\t-
wide\twider model\tMODEL_DIM=${ABLATE_WIDE} NUM_HEADS=8
rtn\tround to nearest\tQUANT=rtn
bare\tno overrides column
"""


def test_parse_arms_good_file():
    arms = ablate.parse_arms_text(GOOD_ARMS)
    assert [a.name for a in arms] == ["control", "wide", "rtn", "bare"]
    assert arms[0].overrides == () and arms[0].description == "the baseline"
    assert arms[1].overrides == (("MODEL_DIM", "${ABLATE_WIDE}"), ("NUM_HEADS", "8"))
    assert arms[2].overrides_text == "QUANT=rtn"
    assert arms[3].overrides == () and arms[1].line == 5


@pytest.mark.parametrize("rows, message", [
    (["wide\tw\tMODEL_DIM=128"], "first arm must be 'control'"),
    (["wide\tw\tMODEL_DIM=128", "control\tc\t-"], "it is on line 3"),
])
def test_parse_arms_missing_control(rows, message):
    with pytest.raises(ablate.ArmsError, match=message):
        ablate.parse_arms_text("arm\tdescription\toverrides\n" + "\n".join(rows))


def test_parse_arms_duplicate_ids():
    text = "arm\tdescription\toverrides\ncontrol\tc\t-\nrtn\ta\tQUANT=rtn\nrtn\tb\tQUANT=gptq\n"
    with pytest.raises(ablate.ArmsError, match=r"arms.tsv:4: duplicate arm id 'rtn' \(first on line 3\)"):
        ablate.parse_arms_text(text)


@pytest.mark.parametrize("overrides, message", [
    ("MODEL_DIM", "malformed override 'MODEL_DIM'"),
    ("model_dim=64", "malformed override"),
    ("MODEL_DIM=", "malformed override"),
    ("MODEL_DIM=64,NUM_HEADS=4", None),            # one token, the value "64,NUM_HEADS=4": from_env rejects it later
    ("MODEL_DIM=64 MODEL_DIM=96", "MODEL_DIM is set twice"),
    ("MODEL_DIM=$WIDE", "bare \\$"),
])
def test_parse_arms_malformed_overrides(overrides, message):
    text = f"arm\tdescription\toverrides\ncontrol\tc\t-\nx\tdesc\t{overrides}\n"
    if message is None:
        assert ablate.parse_arms_text(text)[1].overrides == (("MODEL_DIM", "64,NUM_HEADS=4"),)
        return
    with pytest.raises(ablate.ArmsError, match=message):
        ablate.parse_arms_text(text)


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("arm\tdescription\n", "header"),
    ("arm\tdescription\toverrides\n", "no arms"),
    ("arm\tdescription\toverrides\ncontrol\tc\t-\textra\n", "expected 3 tab-separated columns"),
    ("arm\tdescription\toverrides\ncontrol\t\t-\n", "no description"),
    ("arm\tdescription\toverrides\ncontrol\tc\t-\nbad id\td\t-\n", "bad arm id"),
])
def test_parse_arms_malformed_file(text, message):
    with pytest.raises(ablate.ArmsError, match=message):
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
    ("ref\tr\tMODEL_DIM=${ABLATE_NOPE}", {}, "ABLATE_NOPE"),
    ("ok\to\tQUANT=rtn", {"CRAWLER_LOPS": "3"}, "CRAWLER_LOPS"),     # a typo in the experiment env
    ("ok\to\tQUANT=rtn", {"SEEDS": "1337,x"}, "SEEDS"),
    ("ok\to\tQUANT=rtn", {"THRESHOLD": "-1"}, "THRESHOLD"),
])
def test_bad_knob_rejected_before_any_run(tmp_path, fake, capsys, row, extra, named):
    exp = make_experiment(tmp_path, ["control\tc\t-", row])
    rc, _ = sweep(exp, env_for(fake, **extra))
    assert rc == 2
    assert named in capsys.readouterr().err
    assert calls(fake) == []
    assert not (exp / "results" / "results.tsv").exists()


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
    exp = make_experiment(tmp_path, ["control\tc\t-", "broken\tb\tLOGIT_SOFTCAP=13", "good\tg\tQK_GAIN_INIT=3.5"])
    rc, lines = sweep(exp, env_for(fake))
    assert rc == 1
    assert calls(fake) == ["exp_control_s1337", "exp_broken_s1337", "exp_good_s1337"]
    rows = rows_of(exp)
    assert rows["control", "1337"]["status"] == "ok" and rows["good", "1337"]["status"] == "ok"
    broken = rows["broken", "1337"]
    assert broken["status"] == "failed" and broken["sliding_bpb"] == ""
    assert broken["error"].startswith("exit 1:") and "boom" in broken["error"]
    assert (exp / "results" / "logs" / "exp_broken_s1337.console.txt").is_file()
    assert any("broken: FAILED" in ln for ln in lines)
    summary = (exp / "results" / "summary.md").read_text()
    assert "## Failed runs" in summary and "boom" in summary
    log_md = (exp.parent / "LOG.md").read_text()
    assert "1 failed run(s)" in log_md and "broken/s1337" in log_md


def test_resume_skips_finished_pairs_and_retries_failed(tmp_path, fake):
    exp = make_experiment(tmp_path, ["control\tc\t-", "flaky\tf\tQK_GAIN_INIT=5"])
    env = env_for(fake, SEEDS="1337,42")
    fake.with_suffix(".fail_once").write_text("")
    rc, _ = sweep(exp, env)
    assert rc == 1 and len(calls(fake)) == 4          # seed-major: control, flaky, control, flaky
    assert calls(fake)[:2] == ["exp_control_s1337", "exp_flaky_s1337"]
    assert rows_of(exp)["flaky", "1337"]["status"] == "failed"

    rc, lines = sweep(exp, env)                        # retries only the failed pair
    assert rc == 0 and calls(fake)[4:] == ["exp_flaky_s1337"]
    assert any("3 run(s) already finished" in ln for ln in lines)
    assert all(r["status"] == "ok" for r in rows_of(exp).values()) and len(rows_of(exp)) == 4
    assert (exp / "results" / "logs" / "exp_flaky_s1337.attempt1.txt").is_file()  # the failed attempt's log is kept

    rc, _ = sweep(exp, env)                            # nothing left to run
    assert rc == 0 and len(calls(fake)) == 5

    tsv = exp / "results" / "results.tsv"              # an interrupted sweep: a row never written
    lines_tsv = tsv.read_text().splitlines()
    tsv.write_text("\n".join(l for l in lines_tsv if not l.startswith("control\t42\t")) + "\n")
    rc, _ = sweep(exp, env)
    assert rc == 0 and calls(fake)[5:] == ["exp_control_s42"]
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


def test_child_env_progress_and_proxy(tmp_path, fake):
    exp = make_experiment(tmp_path, ["control\tc\t-", "arm\ta\tQK_GAIN_INIT=3 ITERATIONS=7"])
    env = env_for(fake, PROXY="1", THRESHOLD="0.01", PROFILE="cpu", ABLATE_HELPER="x", ITERATIONS="20",
                  ABLATE_CALLER_VARS="PROFILE SEEDS ITERATIONS")
    rc, lines = sweep(exp, env)
    assert rc == 0
    child = json.loads((fake.parent / "exp_control_s1337.env.json").read_text())
    assert not {"SEEDS", "PROXY", "THRESHOLD", "PROFILE", "TRAIN_CMD", "ABLATE_HELPER", "ABLATE_CALLER_VARS"} & set(child)
    assert child["SEED"] == "1337" and child["RUN_ID"] == "exp_control_s1337"
    assert child["ITERATIONS"] == "500" and child["MAX_WALLCLOCK_SECONDS"] == "0"      # PROXY wins over the env
    assert Path(child["LOG_DIR"]) == exp / "results" / "logs"
    assert Path(child["ARTIFACT_DIR"]).parent == exp / "results" / "work"
    assert Path(child["RECORDS_DIR"]).parent == exp / "results" / "work"
    arm = json.loads((fake.parent / "exp_arm_s1337.env.json").read_text())
    assert arm["ITERATIONS"] == "7" and arm["QK_GAIN_INIT"] == "3"                   # the arm wins over PROXY
    assert "[arm 1/2 seed 1337] control: step 5/10 eta 3s" in lines
    assert "[arm 2/2 seed 1337] arm: step 10/10 eta 0s" in lines
    gitignore = (exp / "results" / ".gitignore").read_text().split()
    assert "work/" in gitignore and "!logs/" in gitignore
    entry = (exp.parent / "LOG.md").read_text()
    assert "`PROFILE=cpu SEEDS=1337 PROXY=1 THRESHOLD=0.01" in entry and "ITERATIONS=20 bash" in entry


def test_outputs_summary_plots_and_log(tmp_path, fake):
    exp = make_experiment(tmp_path, ["control\tthe control\t-", "better\tlower bpb\tQK_GAIN_INIT=3",
                                     "same\tno change\tQK_GAIN_INIT=4.01", "worse\thigher bpb\tQK_GAIN_INIT=5.5"])
    rc, _ = sweep(exp, env_for(fake, SEEDS="1337,42,7"))
    assert rc == 0
    res = exp / "results"
    rows = ablate.read_results(res / "results.tsv")
    assert list(rows[0]) == list(ablate.RESULT_COLUMNS) and len(rows) == 12
    r = rows_of(exp)["control", "42"]
    assert (r["sliding_bpb"], r["pre_quant_bpb"], r["post_quant_bpb"]) == ("2.502000", "2.504000", "2.505000")
    assert (r["quant_gap"], r["bytes_total"], r["ms_per_step"], r["steps"]) == ("0.001000", "600308", "12.0", "10")
    assert r["unique_params"] == "4321" and float(r["wallclock_s"]) >= 0
    summary = (res / "summary.md").read_text()
    ranking = [m.group(1) for m in re.finditer(r"^\| \d+ \| `(\w+)`", summary, re.M)]
    assert ranking == ["better", "control", "same", "worse"]
    better = next(l for l in summary.splitlines() if l.startswith("| 1 | `better`"))
    assert "| -0.01000 | 0.001 | **promote** |" in better          # t = -8.0, df = 4
    assert "**worse**" in next(l for l in summary.splitlines() if "`worse`" in l and l.startswith("|"))
    assert "no signal" in next(l for l in summary.splitlines() if "`same`" in l and l.startswith("|"))
    assert "±0.00153 (2.49900–2.50200)" in summary                    # control spread over seeds 7, 1337, 42
    for png in ("curves.png", "bars.png"):
        assert (res / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log_md = (exp.parent / "LOG.md").read_text()
    assert log_md.startswith("# Experiment log")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert f"- commit: `{head or 'unknown'}`" in log_md
    assert "Decision:" in log_md and "`better`" in log_md
    before = (res / "summary.md").read_text()
    (res / "summary.md").unlink()
    assert sweep(exp, env_for(fake), "--summarize")[0] == 0
    assert (res / "summary.md").read_text().split("- updated:")[0] == before.split("- updated:")[0]


# ----------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------


def _t_pdf(x, df):
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(logc - (df + 1) / 2 * np.log1p(x * x / df))


def _p_by_integration(t, df):
    """Two-sided p by integrating the Student-t density numerically: an independent check."""
    x = np.linspace(0.0, abs(t), 200_001)
    y = _t_pdf(x, df)
    inner = float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)
    return 1.0 - 2.0 * inner


@pytest.mark.parametrize("a, b, x, expected", [
    (2.0, 3.0, 0.4, 0.5248),                   # 1 - sum_{j<2} C(4,j) .4^j .6^(4-j): binomial identity
    (0.5, 0.5, 0.5, 0.5),                      # symmetric
    (7.0, 7.0, 0.5, 0.5),
    (3.0, 1.0, 0.3, 0.3 ** 3),                 # I_x(a, 1) = x^a
    (1.0, 4.0, 0.2, 1 - 0.8 ** 4),             # I_x(1, b) = 1 - (1-x)^b
    (0.5, 0.5, 0.25, 2 / math.pi * math.asin(0.5)),   # arcsine law
    (50.0, 40.0, 0.9, None),
])
def test_betainc_known_values(a, b, x, expected):
    got = ablate.betainc(a, b, x)
    if expected is None:                       # far tail: just the symmetry relation
        assert got == pytest.approx(1 - ablate.betainc(b, a, 1 - x), abs=1e-12)
        assert got == pytest.approx(1.0, abs=1e-6)
    else:
        assert got == pytest.approx(expected, abs=1e-12)
    assert ablate.betainc(a, b, 0.0) == 0.0 and ablate.betainc(a, b, 1.0) == 1.0


@pytest.mark.parametrize("t, df, p", [
    (2.0, 10, 0.07339),                        # textbook table value
    (1.0, 1, 0.5),                             # Cauchy: P(|T| > 1) = 1/2
    (12.706, 1, 0.05), (4.303, 2, 0.05), (2.228, 10, 0.05), (2.086, 20, 0.05), (2.845, 20, 0.01),
    (2.0, 2, 1 - 2 / math.sqrt(6)),            # df = 2 closed form: 1 - t / sqrt(2 + t^2)
    (1.959964, 1e7, 0.05),                     # the normal limit
    (0.0, 5, 1.0),
])
def test_student_t_two_sided_p(t, df, p):
    assert ablate.t_two_sided_p(t, df) == pytest.approx(p, abs=5e-5 if p < 1 else 1e-12)
    assert ablate.t_two_sided_p(-t, df) == pytest.approx(ablate.t_two_sided_p(t, df), abs=1e-15)


@pytest.mark.parametrize("t, df", [(0.7, 3.3), (1.9, 5.882), (3.1, 17.25), (2.5, 1.5)])
def test_student_t_matches_numerical_integration(t, df):
    assert ablate.t_two_sided_p(t, df) == pytest.approx(_p_by_integration(t, df), abs=1e-7)
    assert ablate.t_cdf(t, df) == pytest.approx(1 - ablate.t_two_sided_p(t, df) / 2)


def test_welch_on_fixed_numbers():
    w = ablate.welch_test([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    # by hand: means 3 and 6, variances 2.5 and 10; se^2 = 0.5 + 2 = 2.5; t = -3 / sqrt(2.5);
    # df = 2.5^2 / (0.5^2/4 + 2^2/4) = 6.25 / 1.0625
    assert w.t == pytest.approx(-3 / math.sqrt(2.5), rel=1e-12)
    assert w.df == pytest.approx(6.25 / 1.0625, rel=1e-12)
    assert w.se == pytest.approx(math.sqrt(2.5), rel=1e-12)
    assert w.p == pytest.approx(_p_by_integration(w.t, w.df), abs=1e-7)
    assert 0.10 < w.p < 0.11
    assert ablate.welch_test([1.0], [1.0, 2.0]) is None
    assert ablate.welch_test([2.0, 2.0], [2.0, 2.0]).p == 1.0
    assert ablate.welch_test([1.0, 1.0], [2.0, 2.0]).p == 0.0


def _rows(arm, values, seeds=(1337, 42, 7)):
    return [{"arm": arm, "seed": str(s), "status": "ok", "sliding_bpb": f"{v:.6f}"} for s, v in zip(seeds, values)]


def test_arm_stats_delta_spread_p_and_verdicts():
    rows = (_rows("control", [2.80, 2.81, 2.82]) + _rows("better", [2.78, 2.79, 2.80])
            + _rows("noisy", [2.70, 2.81, 2.92]) + _rows("worse", [2.83, 2.84, 2.85])
            + _rows("tiny", [2.799, 2.809, 2.819]) + _rows("clear", [2.775, 2.78, 2.785])
            + [{"arm": "dead", "seed": "1337", "status": "failed", "sliding_bpb": ""}])
    stats = {s.arm: s for s in ablate.arm_stats(rows, ["control", "better", "noisy", "worse", "tiny", "clear", "dead"], 0.005)}
    c = stats["control"]
    assert c.mean == pytest.approx(2.81) and c.std == pytest.approx(0.01) and (c.lo, c.hi) == (2.80, 2.82)
    assert c.verdict == "control" and c.delta == 0.0
    b = stats["better"]
    assert b.delta == pytest.approx(-0.02)
    # equal variances 1e-4, n = 3: t = -0.02 / sqrt(2e-4 / 3), df = 4
    assert b.p == pytest.approx(ablate.t_two_sided_p(-0.02 / math.sqrt(2e-4 / 3), 4.0), rel=1e-9)
    assert b.p == pytest.approx(_p_by_integration(0.02 / math.sqrt(2e-4 / 3), 4.0), abs=1e-7)
    assert b.p == pytest.approx(0.0705, abs=5e-4)
    assert b.verdict == "no signal"              # 0.02 better, but 3 seeds this noisy cannot tell
    k = stats["clear"]                           # t = -0.03 / sqrt((1e-4 + 2.5e-5) / 3), Welch df = 2.94
    assert k.se == pytest.approx(math.sqrt(1.25e-4 / 3)) and k.p < 0.05 and k.verdict == "promote"
    n = stats["noisy"]                           # same mean, wide spread: no signal
    assert n.delta == pytest.approx(0.0, abs=1e-12) and n.std == pytest.approx(0.11) and n.verdict == "no signal"
    assert stats["worse"].verdict == "worse" and stats["worse"].delta == pytest.approx(0.03)
    assert stats["tiny"].verdict == "no signal"  # below the threshold
    d = stats["dead"]
    assert d.n == 0 and d.failed == 1 and d.verdict == "no data" and d.delta is None


def test_verdict_rule():
    assert ablate.verdict(-0.006, 0.01, True, 0.005) == "promote"
    assert ablate.verdict(-0.006, 0.20, True, 0.005) == "no signal"     # big delta, but noise
    assert ablate.verdict(-0.006, None, False, 0.005) == "promote"      # one seed: the delta alone
    assert ablate.verdict(-0.004, 0.001, True, 0.005) == "no signal"
    assert ablate.verdict(0.005, 0.5, True, 0.005) == "worse"
    assert ablate.verdict(None, None, False, 0.005) == "no data"


def test_parse_log_reads_the_trainers_lines():
    text = "\n".join([
        "hp QUANT_GAP=not-a-metric",
        "unique_params:201676 effective_depth:4 flat:2 crawler:1x2",
        "step:0 val_loss:6.9 val_bpb:3.91866 train_time:0.0s",
        "step:50/400 train_loss:4.5336 lr_scale:1.000 tok_s:8199 step_avg:999.1ms eta:280s",
        "step:100 val_loss:4.21 val_bpb:2.38 train_time:101.2s",
        "step:100 val_loss:4.20 val_bpb:2.37 train_time:101.2s",
        "quant_gap:-0.000036 pre_quant_val_bpb:2.810516 rtn_val_bpb:2.810409 post_quant_val_bpb:2.810480",
        "sliding_val_loss:4.9 sliding_val_bpb:2.810172 sliding_eval_seconds:8.2",
        "time_checks:0.0s time_train:28.9s time_calibration:0.0s time_export:4.0s time_eval:8.0s",
        "final val_bpb:2.810172 val_loss:4.969534 bytes_total:600308 bytes_code:85937 bytes_model:514371",
    ])
    facts = ablate.parse_log(text)
    assert facts.curve == [(0, 0.0, 3.91866), (100, 101.2, 2.37)]
    assert facts.metrics == {"unique_params": 201676, "ms_per_step": 999.1, "steps": 100, "train_s": 101.2,
                             "quant_gap": -0.000036, "pre_quant_bpb": 2.810516, "post_quant_bpb": 2.810480,
                             "sliding_bpb": 2.810172, "bytes_total": 600308}
    m = ablate.PROGRESS.search("step:50/400 train_loss:4.5336 lr_scale:1.000 tok_s:8199 step_avg:999.1ms eta:280s")
    assert m.groups() == ("50", "400", "280")


# ----------------------------------------------------------------------------
# the shipped experiments
# ----------------------------------------------------------------------------

ASSIGN = re.compile(r"(?:^|[\s;)])(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=")


def shell_assignments(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        names |= {n for n in ASSIGN.findall(code) if n == n.upper()}
    return names


def check_names(names: set[str], where: str) -> None:
    known = set(train_gpt.knob_names())
    unknown = {n for n in names if n not in known and not ablate.runner_only(n) and n != "PYTHON"}
    owned = names & set(ablate.PER_RUN_VARS)
    assert not owned, f"{where} sets {owned}: the runner sets these per run"
    strict = unknown - PENDING
    assert not strict, f"{where} sets {sorted(strict)}: not knobs of train_gpt.py"
    if unknown:
        pytest.xfail(f"{where} uses {sorted(unknown)}, pending in train_gpt.py")


def test_there_are_experiments():
    assert {p.name for p in EXPERIMENT_DIRS} >= {"crawler_vs_flat", "cadence", "quant", "xsa_coverage"}


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
    arms = ablate.parse_arms(exp / "arms.tsv")
    names = shell_assignments(exp / "run.sh") | {k for a in arms for k, _ in a.overrides}
    refs = {m for a in arms for _, v in a.overrides for m in ablate.REF.findall(v)}
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
def test_experiment_validates(exp, profile, tmp_path, capsys):
    env = run_sh_env(exp, profile, tmp_path)
    env.pop("PYTHON")
    lines: list[str] = []
    rc = ablate.main([str(exp), "--dry-run", "--json"], environ=env, say=lines.append)
    err = capsys.readouterr().err
    if rc == 2 and any(k in err for k in PENDING if k not in train_gpt.knob_names()):
        pytest.xfail(f"pending knob: {err.strip()}")
    assert rc == 0, err
    plan = json.loads(lines[-1])
    arms = {a["arm"]: a for a in plan["arms"]}
    assert list(arms)[0] == "control" and plan["seeds"] == [1337]
    if profile == "cpu":
        assert arms["control"]["env"]["DATA_PATH"] == "data/datasets/local_sp1024"
    else:
        assert "DATA_PATH" not in arms["control"]["env"]         # the production default: FineWeb
    if exp.name == "crawler_vs_flat":
        ctrl = arms["control"]["unique_params"]
        for name, arm in arms.items():
            assert abs(arm["unique_params"] / ctrl - 1) <= 0.03, f"{name}: {arm['unique_params']} vs control {ctrl}"
        assert arms["control"]["env"]["NUM_CRAWLER_LAYERS"] == "0"
        assert {a["effective_depth"] for a in arms.values()} == {6, 8, 12}
