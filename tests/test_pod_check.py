"""experiments/pod_check.sh: its CPU mode runs every phase of the one-GPU check end to end and writes the JSON
with every field; a failed or timed-out phase is one line and the next phase still runs; the cost model reads
the JSON and sets its projections beside the measurements."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import cost_model  # noqa: E402
import pod_check  # noqa: E402


def run_check(out: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "experiments/pod_check.sh", "--cpu", "--out", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "pod_check.json").read_text())


def record_available() -> bool:
    try:
        pod_check.record_source(type("Args", (), {"record": None})())
        return True
    except SystemExit:
        return False


def test_cpu_mode_runs_every_phase_and_writes_every_field(tmp_path, local_corpus):
    report = run_check(tmp_path)
    assert list(report["phases"]) == list(pod_check.PHASES)
    assert report["mode"] == "cpu" and report["commit"] and report["elapsed_seconds"] > 0
    for phase, res in report["phases"].items():
        if phase == "train_record" and not record_available():
            # CI has no copy of the record's script (the project may not commit it): one line that says where
            # it is looked for, and the phases after it still ran
            assert res["status"] == "failed" and "bash experiments/pod_check.sh prepare" in res["error"]
            continue
        assert res["status"] == "ok", (phase, res.get("error"))
        missing = [f for f in pod_check.FIELDS[phase] if f not in res]
        assert not missing, (phase, missing)
    ours = report["phases"]["train_ours"]
    assert ours["micro_batches"] == 8 and ours["ms_per_step_loops1"] > 0 and ours["ms_per_step_loops3"] > 0
    assert len(ours["ms_steps_loops3"]) == pod_check.TIMED_STEPS["cpu"]
    if record_available():   # the same model through the record's own code: the same parameter count
        assert report["phases"]["train_record"]["model_params"] == ours["unique_params"]
    ttt = report["phases"]["ttt"]
    assert [c["docs"] for c in ttt["calls"]] == [4, 4, 3, 1] and ttt["graphs_compiled"] >= 1
    assert report["phases"]["export"]["calibration_batches"] == 4
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert len(summary) == 1 + len(pod_check.PHASES) and summary[1].startswith("env: ok")


def test_a_failed_phase_is_one_line_and_the_next_phase_runs(tmp_path):
    report = run_check(tmp_path, "--phases", "train_record,env", "--record", str(tmp_path / "missing.py"))
    record, env = report["phases"]["train_record"], report["phases"]["env"]
    assert record["status"] == "failed" and record["error"] == f"error: --record {tmp_path / 'missing.py'}: no such file"
    assert env["status"] == "ok" and env["torch"]


CHILD = """
import json, sys, time
json.dump({"shape": 8}, open(sys.argv[1], "w"))   # a figure, then a hang (or a failure)
print("working", flush=True)
if sys.argv[2] == "hang":
    time.sleep(600)
print("RuntimeError: CUDA out of memory", flush=True)
sys.exit(1)
"""


@pytest.mark.parametrize("how", ["hang", "fail"])
def test_a_phase_that_hangs_or_fails_keeps_its_figures_and_says_why_in_one_line(tmp_path, how):
    (tmp_path / "child.py").write_text(CHILD)
    cmd = [sys.executable, str(tmp_path / "child.py"), str(tmp_path / "ttt.json"), how]
    res = pod_check.run_phase("ttt", cmd, 3.0, tmp_path)
    assert res["shape"] == 8 and res["budget_seconds"] == 3.0   # what it wrote before it stopped
    if how == "hang":   # killed at its budget, not after the child's 600 s
        assert res["status"] == "timeout" and "3 s budget" in res["error"] and res["seconds"] < 10
    else:
        assert res["status"] == "failed" and res["error"] == "RuntimeError: CUDA out of memory"


def test_cost_model_sets_projections_beside_a_gpu_runs_figures(tmp_path):
    measured = {"mode": "gpu", "commit": "abc1234", "date": "2026-12-08", "device": "NVIDIA H100 80GB HBM3",
                "phases": {"train_ours": {"status": "ok", "ms_per_step_loops1": 800.0, "ms_per_step_loops3": 1100.0,
                                          "peak_allocated_gib": 40.0},
                           "train_record": {"status": "ok", "ms_per_step_loops1": 760.0,
                                            "ms_per_step_loops3": 1000.0, "peak_allocated_gib": 38.0},
                           "ttt": {"status": "failed", "error": "CUDA out of memory"},
                           "eval": {"status": "ok", "tokens_per_second": 2.0e6}}}
    path = tmp_path / "pod_check.json"
    path.write_text(json.dumps(measured))
    lines = []
    rows = cost_model.pod_check_report(path, log=lines.append)
    by = {r["figure"]: r for r in rows}
    step = by["train ms/step, 3 loops (1 GPU, 8 micro-batches)"]
    assert step["measured"] == 1100.0 and step["projected"] > 0
    assert step["ratio"] == pytest.approx(1100.0 / step["projected"])
    assert by["ours / record ms/step, 3 loops"]["measured"] == pytest.approx(1.1)
    assert by["ours / record peak memory"]["measured"] == pytest.approx(40 / 38)
    assert by["TTT batch seconds (64 x 2048)"]["measured"] is None     # failed: no figure, the line says why
    assert any("ttt: failed: CUDA out of memory" in line for line in lines)


def test_sdpa_stand_in_for_fa3_is_causal_attention_per_window():
    import torch

    fa = pod_check.sdpa_fa3_module()
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 12, 4, 8), torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8)
    dense = fa.flash_attn_func(q, k, v, causal=True)
    # GQA by repeated heads: query head h reads key head h // 2, causally
    scores = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(2, 2)) / 8 ** 0.5
    scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v.repeat_interleave(2, 2))
    assert torch.allclose(dense, want, atol=1e-5)
    # varlen over uniform windows of 4 (what NO_DOC_STARTS leaves): each window alone
    cu = torch.tensor([0, 4, 8, 12, 12, 12], dtype=torch.int32)
    packed = fa.flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4,
                                       max_seqlen_k=4, causal=True, window_size=(-1, -1))
    for w in range(3):
        part = slice(4 * w, 4 * w + 4)
        alone = fa.flash_attn_func(q[:, part], k[:, part], v[:, part], causal=True)[0]
        assert torch.allclose(packed[part], alone, atol=1e-6)


@pytest.mark.skipif(not record_available(), reason="the record's script is not here (bash experiments/pod_check.sh prepare)")
def test_measurement_patches_match_the_records_script_once():
    src = pod_check.record_source(type("Args", (), {"record": None})())
    for old, new in (pod_check.ENTRY, pod_check.STEP, pod_check.NO_DOC_STARTS):
        assert src.count(old) == 1
        assert old.strip() in pod_check.patch(src, old, new) or new.strip() in pod_check.patch(src, old, new)
