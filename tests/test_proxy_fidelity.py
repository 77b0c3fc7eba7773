"""experiments/proxy_fidelity: the run-time port of published scripts to CPU, and the proxies' scoring.
The records' code is not needed: each patch is checked on small sources that use the same constructs."""
import base64
import lzma
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "proxy_fidelity"))
import calibrate  # noqa: E402
import port  # noqa: E402
import ports_r0427  # noqa: E402


def test_py311_fstrings_leaves_valid_code_alone_and_fixes_312_quotes():
    for path in (ROOT / "train_gpt.py", ROOT / "experiments" / "proxy_fidelity" / "port.py"):
        src = path.read_text()
        assert port.py311_fstrings(src) == src
    src = 'a = [1, 2]\nx = f"<{", ".join(map(str, a))}>" + f\'{ {"k": 1}["k"] }\'  # f"{"\ny = "{"\n'
    fixed = port.py311_fstrings(src)
    scope = {}
    exec(compile(fixed, "<t>", "exec"), scope)
    assert scope["x"] == "<1, 2>1" and scope["y"] == "{" and fixed.endswith('# f"{"\ny = "{"\n')


@pytest.mark.parametrize("raw", [True, False])
def test_decode_stub_returns_the_readable_source(raw):
    src = "print('hello')\n" * 50
    if raw:
        blob = lzma.compress(src.encode(), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
        stub = (f'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("{base64.b85encode(blob).decode()}")'
                ',format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]))\n')
    else:
        stub = f'import lzma,base64\nexec(lzma.decompress(base64.b85decode("{base64.b85encode(lzma.compress(src.encode())).decode()}")))\n'
    assert port.decode_stub(stub) == src
    assert port.decode_stub(src) == src


def test_patch_source_ports_cuda_bf16_and_scales_the_float_threshold():
    script = port.Script("f", "train_gpt.py", 1.0, 1000, 11, "final", ema="text")
    src = textwrap.dedent("""\
        device = torch.device("cuda", local_rank)
        x = torch.zeros(2, device="cuda").bfloat16()
        y = x.to(dtype=torch.bfloat16).cuda()
        ok = torch.cuda.is_available()
        keep = t.numel() <= 65536 or n > 65_536
        ema_decay = 0.997
        """)
    out = port.patch_source(src, script, dim=128)
    assert "cuda" not in out.replace("torch.cuda", "")
    assert "bfloat16" not in out and 'torch.device("cpu")' in out and "ok = True" in out
    assert "<= 4096 or n > 4096" in out                      # 65,536 at width 512 -> (128/512)^2 of it
    assert 'ema_decay = float(os.environ["EMA_DECAY"])' in out
    with pytest.raises(SystemExit, match="no longer matches"):
        port.patch_source(src, port.Script("f", "t.py", 1.0, 1, 1, "x", patches=(("absent", ""),)))


def _reference_attention(q, k, v, mask):
    """[B, T, H, D] attention with repeated KV heads and an explicit boolean mask [T, T]."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhts,bshd->bthd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


def test_sdpa_flash_attn_is_causal_gqa_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    ref = _reference_attention(q, k, v, torch.ones(7, 7, dtype=torch.bool).tril())
    torch.testing.assert_close(port.sdpa_flash_attn(q, k, v, causal=True), ref)


def test_varlen_attention_keeps_documents_apart():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(10, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    cu = torch.tensor([0, 3, 3, 10, 10])                      # an empty segment and the padding repeat
    doc = torch.tensor([0] * 3 + [1] * 7)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(10, 10, dtype=torch.bool).tril()
    ref = _reference_attention(q[None], k[None], v[None], mask)[0]
    got = ports_r0427.flash_attn_varlen_func(q, k, v, cu, cu, causal=True)
    torch.testing.assert_close(got, ref)


def test_fused_leaky_relu_square_patch_is_the_unfused_maths():
    scope = {"torch": torch, "F": F}
    exec(ports_r0427.PATCHES[1][1] + "    pass\n", scope)
    fused = scope["_port_linear_leaky_relu_square"]
    g = torch.Generator().manual_seed(2)
    a, b, up = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((5, 4), (6, 4), (5, 3)))
    pre, post = fused(a, b)                                   # forward: pre = a b^T, post = leaky(pre, 0.5)^2
    torch.testing.assert_close(post, F.leaky_relu(a @ b.T, 0.5).square())
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)   # backward: the upstream grad times d post / d pre
    x = pre.clone().requires_grad_()
    (ref,) = torch.autograd.grad(F.leaky_relu(x, 0.5).square(), x, up @ w)
    torch.testing.assert_close(fused(up, w.T, aux=pre), ref)


def test_cpu_runtime_fakes_gpu_calls_and_restores_them():
    script = port.SCRIPTS["r0405"]
    compile_before, fa_before = torch.compile, sys.modules.get("flash_attn_interface")
    src = port.patch_source(textwrap.dedent("""\
        import torch
        from flash_attn_interface import flash_attn_func
        f = torch.compile(lambda x: x * 2, dynamic=False, fullgraph=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            q = torch.randn(1, 4, 2, 8).bfloat16()
            out = f(flash_attn_func(q, q, q, causal=True))
        torch.cuda.synchronize()
        with torch.inference_mode():
            cache = torch.ones(3)
        w = torch.ones(3, requires_grad=True)
        (w * cache).sum().backward()
        mem = torch.cuda.max_memory_allocated()
        """), script, 128)
    scope = {"__name__": "__main__"}
    with port.cpu_runtime(script):
        exec(compile(src, "<fake record>", "exec"), scope)
    assert scope["out"].dtype == torch.float32 and scope["mem"] == 0 and scope["w"].grad.tolist() == [1.0] * 3
    assert torch.compile is compile_before and sys.modules.get("flash_attn_interface") is fa_before


def test_script_env_scales_depth_loops_and_step_schedules_like_the_pod():
    proxy = port.PROXIES["steps200"]
    env = port.script_env("r0409", proxy, 7, Path("/data"), 200)
    assert env["NUM_LAYERS"] == "6" and env["MODEL_DIM"] == "128" and env["SEED"] == "7"
    assert (int(env["LOOP_START"]), int(env["LOOP_END"])) == (2, 4)      # three looped layers, as layers 3-5 of 11
    assert env["PARALLEL_RESIDUAL_START"] == "4" and env["ROPE_DIMS"] == "8" and env["TTT_ENABLED"] == "0"
    assert env["MUON_MOMENTUM_WARMUP_STEPS"] == str(round(1500 * 200 / 4557))
    span = 1 / (1 - float(env["EMA_DECAY"])) / 200                       # the EMA covers the same share of the run
    assert span == pytest.approx(1 / (1 - 0.9965) / 4557, rel=1e-3)
    r0322 = port.script_env("r0322", proxy, 7, Path("/data"), 200)
    assert r0322["VE_LAYERS"] == "4,5" and r0322["XSA_LAST_N"] == "2"    # the last two of six, as 9,10 of 11
    assert port.script_env("r0427", proxy, 7, Path("/data"), 200)["LQER_TOP_K"] == "3"   # ports_r0427.ENV


def test_parse_log_reads_both_log_styles():
    text = textwrap.dedent("""\
        step:0/200 val_loss:6.9 val_bpb:3.9 train_time:0ms
        step:100/200 val_loss:4.1 val_bpb:2.4 train_time:1ms
        final_int8_zlib_roundtrip val_loss:4.0 val_bpb:2.35 eval_time:1ms
        final_int8_zlib_roundtrip_exact val_loss:4.01234567 val_bpb:2.34567891
        """)
    got = port.parse_log(text, "final_int8_zlib_roundtrip_exact")
    assert got["final_bpb"] == 2.34567891 and got["curve"] == [(0, 3.9), (100, 2.4)] and got["steps"] == 100
    text2 = "50/200 val_loss: 4.5 val_bpb: 2.6\nquantized_sliding_window val_loss:3.9 val_bpb:2.30\n" \
            "quantized val_loss:3.95 val_bpb:2.31\n"
    assert port.parse_log(text2, "quantized")["final_bpb"] == 2.31
    text3 = "200/200 train_loss: 2.9 train_time: 9.6m tok/s: 2835\n200/200 val_loss: 3.19 val_bpb: 1.80\n" \
            "diagnostic pre-quantization post-ema val_loss:3.18 val_bpb:1.79\ndiagnostic quantized val_loss:3.2 val_bpb:1.81\n"
    got = port.parse_log(text3, "diagnostic quantized")   # 2026-04-27's labels: the pre-quant score, train minutes
    assert (got["final_bpb"], got["pre_quant_bpb"], got["train_seconds"]) == (1.81, 1.79, 576.0)
    assert got["steps"] == 200 and port.parse_log(text, "x")["pre_quant_bpb"] is None


def test_extrapolate_recovers_a_power_law():
    a, b, c = 1.3, 3.0, 0.4
    curve = [(s, a + b * s ** -c) for s in range(25, 225, 25)]
    got = calibrate.extrapolate(curve, "r0405", port.PROXIES["steps200"])
    target = port.SCRIPTS["r0405"].pod_steps * 786_432 / 8192
    assert got == pytest.approx(a + b * target ** -c, abs=1e-3)


def test_report_scores_rank_agreement_with_the_pod():
    rows = []
    for proxy, sign in (("same", 1), ("reversed", -1)):
        for name, spec in port.SCRIPTS.items():
            for seed in (1, 2):
                rows.append({"script": name, "proxy": proxy, "seed": seed, "final_bpb": 2 + sign * spec.pod_bpb,
                             "steps": 100, "seconds": 1.0, "curve": None, "pod_bpb": spec.pod_bpb})
    text = calibrate.report(pd.DataFrame(rows))
    assert "| same |" in text and text.split("| same |")[1].splitlines()[0].endswith("+1.00 |")
    assert text.split("| reversed |")[1].splitlines()[0].endswith("-1.00 |")


def test_own_vocab_proxy_shares_its_twins_sp1024_runs():
    """steps200v runs only the sp8192 scripts; naive and r0322 run there exactly as under steps200."""
    rows = [{"script": name, "proxy": proxy, "seed": 1, "final_bpb": spec.pod_bpb, "steps": 200, "seconds": 1.0,
             "curve": None, "pod_bpb": spec.pod_bpb}
            for name, spec in port.SCRIPTS.items() for proxy in ("steps200", "steps200v")
            if proxy == "steps200" or spec.pod_vocab != 1024]
    line = calibrate.report(pd.DataFrame(rows)).split("| steps200v |")[1].splitlines()[0]
    assert "—" not in line and line.endswith("+1.00 |")
    env = port.script_env("r0405", port.PROXIES["steps200v"], 1, Path("/d"), 200)
    assert env["VOCAB_SIZE"] == "8192" and env["TOKENIZER_PATH"].endswith("fineweb_8192_bpe.model")
    assert port.script_env("naive", port.PROXIES["steps200v"], 1, Path("/d"), 200) == \
        port.script_env("naive", port.PROXIES["steps200"], 1, Path("/d"), 200)


def test_ours_runs_the_record_profile_at_its_twins_scale():
    """ours_r0405 is train_gpt.py under PROFILE=record_0405, scaled as port.py scales the 2026-04-05 script:
    the same width, data, steps and schedules, and the same model: the twin's log printed model_params:1216792
    and encoder:[0, 1, 2, 3, 2] decoder:[3, 2, 3, 4, 5] at this scale (steps200, seed 1337, 2026-12-03)."""
    import train_gpt as tg
    proxy, data = port.PROXIES["steps200"], Path("/d")
    ours, theirs = port.ours_env("ours_r0405", proxy, 7, data, 200, Path("/w")), port.script_env("r0405", proxy, 7,
                                                                                                  data, 200)
    for k in ("MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "ROPE_DIMS", "TRAIN_SEQ_LEN", "TRAIN_BATCH_TOKENS",
              "ITERATIONS", "DATA_PATH", "TOKENIZER_PATH", "EMA_DECAY", "MUON_MOMENTUM_WARMUP_STEPS", "SEED"):
        assert ours[k] == theirs[k], k
    assert ours["EVAL_STRIDE"] == ours["EVAL_SEQ_LEN"] and ours["SIZE_TARGET"] == "none"   # its plain fixed-clip score
    hp = tg.Hyperparameters.from_env({k: v for k, v in ours.items() if k in set(tg.knob_names())})
    assert tg.count_unique_params(tg.CrawlerGPT(hp)) == 1_216_792
    one = [f.block for f in tg.build_schedule(hp, 1)]
    looped = [(one.index(f.block), f.skip_out) for f in tg.build_schedule(hp, hp.crawler_loops)]
    assert [b for b, push in looped if push] == [0, 1, 2, 3, 2]
    assert [b for b, push in looped if not push] == [3, 2, 3, 4, 5]
    assert port.spec("ours_r0405") is port.SCRIPTS["r0405"]
    # the 2026-04-27 twin at this scale printed model_params:1217385 and "layer_loop:enabled step:70 frac:0.350
    # encoder:[0, 1, 2, 3, 4, 2] decoder:[3, 4, 2, 3, 4, 5]" (steps200, seed 1337); its lanes start after the loop
    assert port.script_env("r0427", proxy, 7, data, 200)["PARALLEL_START_LAYER"] == "5"
    ours = port.ours_env("ours_r0427", proxy, 7, data, 200, Path("/w"))
    hp = tg.Hyperparameters.from_env({k: v for k, v in ours.items() if k in set(tg.knob_names())})
    assert tg.count_unique_params(tg.CrawlerGPT(hp)) == 1_217_385
    one = [f.block for f in tg.build_schedule(hp, 1)]
    looped = [(one.index(f.block), f.skip_out, f.parallel) for f in tg.build_schedule(hp, hp.crawler_loops)]
    assert [b for b, push, _ in looped if push] == [0, 1, 2, 3, 4, 2]
    assert [b for b, push, _ in looped if not push] == [3, 4, 2, 3, 4, 5]
    assert [b for b, _, parallel in looped if parallel] == [5] and hp.loops_schedule()[1] == (0.35, 3)
    rows = [{"script": s, "proxy": "p", "seed": 1, "final_bpb": port.spec(s).pod_bpb, "steps": 200, "seconds": 1.0,
             "curve": None, "pod_bpb": port.spec(s).pod_bpb} for s in [*port.SCRIPTS, "ours_r0405"]]
    rows[-1]["final_bpb"] = 9.0   # ours is shown beside its twin but does not count in tau
    assert calibrate.report(pd.DataFrame(rows)).split("| p |")[1].splitlines()[0].endswith("+1.00 |")


def test_dataseed_variant_draws_the_records_data_order_from_the_seed():
    """r0405_dataseed: 2026-04-05's script with its loader seeded by (rank, SEED) instead of the rank alone, the one
    difference; it is shown in the report but, standing in for r0405, never counted in tau."""
    src = ("import numpy as np\nclass H:\n    rank = 0\n    def __init__(self, seed):\n        self.seed = seed\n"
           "def order(h):\n    return np.random.Generator(np.random.PCG64(h.rank)).permutation(10).tolist()\n")
    orders = {}
    for name in ("r0405", "r0405_dataseed"):
        scope = {}
        exec(compile(port.patch_source(src, port.spec(name), 128), "<t>", "exec"), scope)
        orders[name] = [scope["order"](scope["H"](seed)) for seed in (1337, 42)]
    assert orders["r0405"][0] == orders["r0405"][1] and orders["r0405_dataseed"][0] != orders["r0405_dataseed"][1]
    assert port.spec("r0405_dataseed").folder == port.SCRIPTS["r0405"].folder
    rows = [{"script": s, "proxy": "p", "seed": 1, "final_bpb": port.spec(s).pod_bpb, "steps": 200, "seconds": 1.0,
             "curve": None, "pod_bpb": port.spec(s).pod_bpb} for s in [*port.SCRIPTS, "r0405_dataseed"]]
    rows[-1]["final_bpb"] = 9.0
    assert calibrate.report(pd.DataFrame(rows)).split("| p |")[1].splitlines()[0].endswith("+1.00 |")


def test_demo_runs_as_run_sh_ships_it_on_the_proxys_corpus_and_clock():
    """The demo member is PROFILE=demo untouched (its own width, sequence and sliding score) but for the data the
    proxy stages and the clock: the proxy's seconds of training plus the demo's GPTQ reserve, as run.sh's 345 s
    hold 330 of training."""
    env = port.demo_env(port.PROXIES["wall_half_vimdoc"], 7, Path("/d"), Path("/w"))
    demo = port.profile_env("demo")
    assert {k: v for k, v in env.items() if k in demo and demo[k] != v} == {
        "DATA_PATH": "/d/datasets/fineweb10B_sp1024", "TOKENIZER_PATH": "/d/tokenizers/fineweb_1024_bpe.model",
        "MAX_WALLCLOCK_SECONDS": "180.5"}
    assert demo["MAX_WALLCLOCK_SECONDS"] == str(330 + int(demo["GPTQ_RESERVE_SECONDS"]))
    assert env["SEED"] == "7" and env["LOG_DIR"] == "/w/logs"
    assert "EVAL_STRIDE" not in env and env["COMPILE"] == "1" and "PYTHON" not in env   # sliding: its own score
    assert port.PROXIES["wall_half"].seconds == port.PROXIES["wall"].seconds / 2


def test_demo_side_by_side_reports_plain_scores_and_the_demos_margin():
    import demo_side_by_side as sbs
    rows = [{"script": s, "proxy": p, "seed": seed, "final_bpb": f, "plain_bpb": pl, "steps": st}
            for p in ("wall", "wall_half") for seed in (1, 2)
            for s, f, pl, st in (("demo", 1.70, 1.75, 300), ("naive", 2.00, None, 220), ("r0405", 2.10, None, 120))]
    rows[0]["plain_bpb"] = 1.77                        # the demo at wall, seed 1: mean plain 1.76
    rows = [r for r in rows if not (r["proxy"] == "wall_half" and r["script"] == "r0405")]   # not run yet: no row
    table = sbs.report(pd.DataFrame(rows)).splitlines()
    assert len(table) == 3 and table[2] == ("| local | 331 | 2 | 2.0000 (220 st) | 2.1000 (120 st) | 1.7600 (300 st) "
                                            "| 1.7000 | -0.2400 |")


def test_pairs_report_tallies_sign_agreement_and_rank_correlation(tmp_path):
    """A pair's CPU Δ and p come from its per-seed Δs when given (paired t against 0), else from its columns; only
    pairs with p < 0.05 count in the first tally; the rank correlation runs over all."""
    rows = ["pair\tchange\tpod_delta\tpod_source\tcpu_delta\tcpu_p\tcpu_per_seed\tcpu_source",
            "1\ta\t-0.01\ts\t-0.05\t0.01\t\tc",          # agree, counted
            "2\tb\t+0.02\ts\t-0.03\t0.02\t\tc",          # disagree, counted
            "3\tc\t-0.003\ts\t\t\t-0.010,-0.012,-0.011\tc",   # agree, counted: p from the seeds
            "4\td\t+0.001\ts\t+0.002\t\t\tc"]            # agree, one seed: not counted
    path = tmp_path / "pairs.tsv"
    path.write_text("\n".join(rows) + "\n")
    out = calibrate.pairs_report(path)
    p3 = scipy.stats.ttest_1samp([-0.010, -0.012, -0.011], 0).pvalue
    assert f"| 3 | c | -0.00300 | -0.0110 | {p3:.3f} | agree |" in out and p3 < 0.05
    assert "| 4 | d | +0.00100 | +0.0020 | — | agree (CPU no signal) |" in out
    assert "p < 0.05: 2 of 3 (67%); over all 4 pairs: 3 (75%)" in out
    # ranks: pod 1,4,2,3 and CPU 1,2,3,4: Spearman 1 - 6 * (0+4+1+1) / (4 * 15) = 0.4; Kendall (4 - 2) / 6
    assert "Spearman +0.40" in out and "Kendall +0.33" in out
