"""The loop records' model knobs (issue 22): where the crawler runs, U-Net skips over the block calls and their
gates, the LN scale by unique position, parallel blocks and two lanes, the sparse attention gate, the scalar
SmearGate, no loop embedding; and PROFILE=record_0405 and record_0427, checked against the figures their
records' logs print. Each knob off is today's model (test_arms.py's golden logits)."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from test_model import assert_causal, ids, make_model, small_hp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "proxy_fidelity"))
import port  # noqa: E402
# 2026-04-05's train_seed1337.log: "model_params:35943512" and, once looping is on,
# "loop_warmup:enabled encoder:[0, 1, 2, 3, 4, 5, 4] decoder:[5, 4, 5, 6, 7, 8, 9, 10]"
R0405_PARAMS = 35_943_512
R0405_ENCODER, R0405_DECODER = [0, 1, 2, 3, 4, 5, 4], [5, 4, 5, 6, 7, 8, 9, 10]
# 2026-04-27's train_seed42.log: "model_params:35945671" and "loop_warmup:enabled encoder:[0, 1, 2, 3, 4, 5, 3, 4]
# decoder:[5, 3, 4, 5, 6, 7, 8, 9, 10]"; parallel_start_layer 8, enable_looping_at 0.35
R0427_PARAMS = 35_945_671
R0427_ENCODER, R0427_DECODER = [0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10]
LOOPED = dict(NUM_FLAT_LAYERS=5, NUM_CRAWLER_LAYERS=2, CRAWLER_LOOPS=3, CRAWLER_POSITION=2)


def profile_env(profile: str) -> dict[str, str]:
    """The knobs experiments/profile.sh exports for a profile (port.profile_env), as run.sh would pass them."""
    known = set(tg.knob_names())
    return {k: v for k, v in port.profile_env(profile).items() if k in known}


def unique_order(hp: tg.Hyperparameters, schedule) -> list[int]:
    """Each call's block numbered as the records number their layers (its position in the one-loop order)."""
    one = [f.block for f in tg.build_schedule(hp, 1)]
    return [one.index(f.block) for f in schedule]


def test_record_0405_profile_is_the_record_model():
    hp = tg.Hyperparameters.from_env({**profile_env("record_0405"), "VOCAB_SIZE": "8192"})   # the log's vocabulary
    assert tg.count_unique_params(tg.CrawlerGPT(hp)) == R0405_PARAMS
    looped = tg.build_schedule(hp, hp.crawler_loops)
    order = unique_order(hp, looped)
    assert [o for o, f in zip(order, looped) if f.skip_out] == R0405_ENCODER
    assert [o for o, f in zip(order, looped) if not f.skip_out] == R0405_DECODER
    assert unique_order(hp, tg.build_schedule(hp, 1)) == list(range(11))   # before looping: 11 in order
    assert (hp.effective_depth, hp.loops_schedule()) == (15, [(0.0, 1), (0.5, 3)])
    assert hp.muon_row_norm and hp.embed_wd == hp.muon_wd == 0.085 and hp.adam_wd == 0.02


def test_record_0427_profile_is_the_record_model():
    hp = tg.Hyperparameters.from_env({**profile_env("record_0427"), "VOCAB_SIZE": "8192"})
    model = tg.CrawlerGPT(hp)
    assert tg.count_unique_params(model) == R0427_PARAMS
    looped = tg.build_schedule(hp, hp.crawler_loops)
    order = unique_order(hp, looped)
    assert [o for o, f in zip(order, looped) if f.skip_out] == R0427_ENCODER
    assert [o for o, f in zip(order, looped) if not f.skip_out] == R0427_DECODER
    assert [o for o, f in zip(order, looped) if f.parallel] == [8, 9, 10] and hp.parallel_lanes == 2
    assert (hp.effective_depth, hp.loops_schedule()) == (17, [(0.0, 1), (0.35, 3)])
    assert (hp.attn_gate, hp.gate_window, hp.smear_scalar, hp.muon_ns, hp.muon_momentum) == (0.5, 12, True, "polar", 0.97)
    groups = {name: group for group, named in tg.route_params(model).items() for name, _ in named}
    assert groups["flat.0.attn.gate_w"] == groups["smear.gate_w"] == groups["flat.0.lane_post"] == "scalar"


@pytest.mark.parametrize("profile", ["record_0405", "record_0427"])
def test_record_profiles_validate_only_after_training(profile):
    """Issue 40: VAL_LOSS_EVERY at the knob default (1000) gave the pod's ~4,900 steps five full-split validations
    before the final one; the record profiles validate only after training."""
    hp = tg.Hyperparameters.from_env(profile_env(profile))
    assert hp.val_loss_every == 0 and hp.val_max_tokens == 0


def test_crawler_position_names_are_counts_of_flat_blocks():
    for name, count in (("end", "4"), ("bottleneck", "2")):
        named = small_hp(NUM_FLAT_LAYERS=4, CRAWLER_POSITION=name)
        assert tg.build_schedule(named, 2) == tg.build_schedule(small_hp(NUM_FLAT_LAYERS=4, CRAWLER_POSITION=count), 2)
    hp = small_hp(**LOOPED)
    assert [f.block for f in tg.build_schedule(hp, 3)] == [0, 1, 5, 6, 5, 6, 5, 6, 2, 3, 4]
    for bad in ("6", "-1", "middle"):
        with pytest.raises(tg.HyperparameterError, match="CRAWLER_POSITION"):
            small_hp(**{**LOOPED, "CRAWLER_POSITION": bad})


def test_virtual_skips_pair_calls_and_resplit_as_loops_switch_on():
    flat, virtual = small_hp(**LOOPED), small_hp(**LOOPED, SKIPS="virtual")
    for loops, n_pairs in ((1, 3), (2, 4), (3, 5)):   # 7, 9 and 11 calls
        sched = tg.build_schedule(virtual, loops)
        pushed = [d for d, f in enumerate(sched) if f.skip_out]
        popped = [(d, f.skip_in) for d, f in enumerate(sched) if f.skip_in >= 0]
        assert pushed == list(range(len(sched) // 2)) and len(popped) == n_pairs
        assert [j for _, j in popped] == list(range(n_pairs)) and all(d >= len(sched) // 2 for d, _ in popped)
    assert all(f.loop < 0 for f in tg.build_schedule(flat, 3) if f.skip_out or f.skip_in >= 0)
    assert make_model(**LOOPED, SKIPS="virtual").skip_weights.shape == (5, 48)
    assert make_model(**LOOPED).skip_weights.shape == (2, 48)


def test_skip_gates_start_halfway_and_learn():
    assert torch.equal(tg.CrawlerGPT(small_hp(**LOOPED, SKIPS="virtual", SKIP_GATES=1)).skip_gates, torch.zeros(5, 48))
    plain, gated = make_model(**LOOPED, SKIPS="virtual"), make_model(**LOOPED, SKIPS="virtual", SKIP_GATES=1)
    gated.load_state_dict(plain.state_dict() | {"skip_gates": torch.zeros(5, 48)})
    x = ids()
    assert not torch.allclose(gated(x, x), plain(x, x))   # lerp(w*skip, x, 1/2), not x + w*skip
    with torch.no_grad():
        gated.skip_gates.fill_(40.0)   # sigmoid -> 1: the skip is gated out, so skip_weights no longer matter
        out = gated(x, x)
        gated.skip_weights.mul_(3.0)
        torch.testing.assert_close(gated(x, x), out)
    gated.skip_gates.data.zero_()
    gated(x, x).backward()
    assert gated.skip_gates.grad.abs().sum() > 0


def test_ln_scale_by_unique_position_repeats_across_loops():
    virtual, unique = (tg.build_schedule(small_hp(**LOOPED, LN_SCALE_DEPTH=d), 3) for d in ("virtual", "unique"))
    assert [round(f.ln ** -2) for f in virtual] == list(range(1, 12))
    assert [round(f.ln ** -2) for f in unique] == [1, 2, 3, 4, 3, 4, 3, 4, 5, 6, 7]
    x = ids()
    assert not torch.allclose(make_model(**LOOPED)(x, x), make_model(**LOOPED, LN_SCALE_DEPTH="unique")(x, x))


def test_parallel_blocks_read_one_input():
    hp = small_hp(**LOOPED, PARALLEL_START=5)
    assert [f.parallel for f in tg.build_schedule(hp, 3)] == [False] * 9 + [True] * 2   # unique blocks 5 and 6
    model = make_model(**LOOPED, PARALLEL_START=5)
    block, f = model.flat[4], tg.build_schedule(hp, 3)[-1]
    x, x0 = torch.randn(2, 16, 48), torch.randn(2, 16, 48)
    rope = model.rotary(16, x.device)
    mixed = block.resid_mix[0] * x + block.resid_mix[1] * x0
    attn = block.attn(tg.rms_norm(mixed) * f.ln, rope, f.xsa, None)
    expected = mixed + block.attn_scale * attn + block.mlp_scale * block.mlp(tg.rms_norm(mixed) * f.ln)
    torch.testing.assert_close(block(x, x0, rope, f, None), expected)
    serial = block(x, x0, rope, dataclasses.replace(f, parallel=False), None)
    assert not torch.allclose(serial, expected)


def test_two_lanes_mix_both_outputs_and_the_head_reads_their_mean():
    """PARALLEL_LANES=2: attention reads lane 0 (mixed with x0), the MLP lane 1; each lane is r * itself + the
    outputs weighted by its column of lane_post; skips and the loop embedding join lane 0; the head takes the mean."""
    env = dict(LOOPED, PARALLEL_START=5, PARALLEL_LANES=2)
    model = make_model(**env)
    block, f = model.flat[4], tg.build_schedule(small_hp(**env), 3)[-1]
    with torch.no_grad():
        block.lane_post.copy_(torch.tensor([[0.5, 2.0], [3.0, 0.25]]))
        block.lane_resid.copy_(torch.tensor([0.9, 1.2]))
    x, lane, x0 = torch.randn(2, 16, 48), torch.randn(2, 16, 48), torch.randn(2, 16, 48)
    rope = model.rotary(16, x.device)
    mixed = block.resid_mix[0] * x + block.resid_mix[1] * x0
    a = block.attn_scale * block.attn(tg.rms_norm(mixed) * f.ln, rope, f.xsa, None)
    m = block.mlp_scale * block.mlp(tg.rms_norm(lane) * f.ln)
    out0, out1 = block(x, x0, rope, f, None, lane)
    torch.testing.assert_close(out0, 0.9 * x + 0.5 * a + 3.0 * m)
    torch.testing.assert_close(out1, 1.2 * lane + 2.0 * a + 0.25 * m)
    one_lane = make_model(**dict(LOOPED, PARALLEL_START=5))
    one_lane.load_state_dict({k: v for k, v in model.state_dict().items() if "lane_" not in k})
    x = ids()
    assert not torch.allclose(model.logits(x), one_lane.logits(x))
    model(x, x).backward()
    assert model.flat[4].lane_post.grad.abs().sum() > 0 and model.flat[0].lane_post.grad is None
    unused = tg.unused_at_one_loop(model, None)   # DDP is told: the lanes' weights before PARALLEL_START never train
    assert "flat.0.lane_post" in unused and "flat.4.lane_post" not in unused


def test_sparse_attention_gate_halves_each_head_at_init_then_learns_per_head():
    plain, gated = make_model(**LOOPED), tg.CrawlerGPT(small_hp(**LOOPED, ATTN_GATE=0.5))
    attn, ref = gated.flat[0].attn, plain.flat[0].attn
    assert attn.gate_w.shape == (4, 12) and not attn.gate_w.any()
    attn.load_state_dict(ref.state_dict() | {"gate_w": attn.gate_w.detach()})
    x, rope = torch.randn(2, 16, 48), plain.rotary(16, torch.device("cpu"))
    torch.testing.assert_close(attn(x, rope, False, None), ref(x, rope, False, None) / 2)   # sigmoid(0)
    with torch.no_grad():
        attn.gate_w[1, 0] = 100.0   # head 1 opens where x[..., 0] > 0 and shuts where it is negative
    y, y_ref = attn(x, rope, False, None), ref(x, rope, False, None)
    assert not torch.allclose(y, y_ref / 2)
    attn.gate_w.data.zero_()
    attn(x, rope, False, None).sum().backward()
    assert attn.gate_w.grad[:, :12].abs().sum() > 0


def test_scalar_smear_gate_is_one_gate_a_token_from_zero():
    hp = small_hp(**LOOPED, SMEAR_GATE=1, SMEAR_SCALAR=1, GATE_WINDOW=5)
    smear = tg.CrawlerGPT(hp).smear
    assert smear.gate is None and smear.gate_w.shape == (1, 5) and not smear.gate_w.any()
    x, tokens = torch.randn(1, 6, 48), torch.tensor([[3, 4, tg.BOS_ID, 5, 6, 7]])
    torch.testing.assert_close(smear(x, tokens), x)   # lam starts at 0
    with torch.no_grad():
        smear.lam.fill_(0.8)
    expected = x.clone()
    expected[0, 1:] += 0.4 * x[0, :-1]                 # 0.8 * sigmoid(0) * the previous token
    expected[0, 2] = x[0, 2]                           # a BOS takes nothing from the document before it
    torch.testing.assert_close(smear(x, tokens), expected)
    channel = tg.CrawlerGPT(small_hp(**LOOPED, SMEAR_GATE=1)).smear
    assert channel.gate_w is None and channel.gate.weight.shape == (48, 32)   # SMEAR_GATE=1 alone: as before


def test_record_gate_and_lane_knobs_need_their_partners():
    for bad, match in ((dict(SMEAR_SCALAR=1), "SMEAR_SCALAR"), (dict(PARALLEL_LANES=2), "PARALLEL_LANES"),
                       (dict(PARALLEL_LANES=3, PARALLEL_START=1), "PARALLEL_LANES"), (dict(ATTN_GATE=-1), "ATTN_GATE")):
        with pytest.raises(tg.HyperparameterError, match=match):
            small_hp(**bad)


def test_orthogonal_init_is_the_records():
    """MATRIX_INIT=orthogonal: every matrix of at least 64 x 64 orthogonal, zero-init projections still zero,
    smaller matrices as before; the model computes something else from the start."""
    env = dict(LOOPED, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=8)
    torch.manual_seed(0)
    plain = tg.CrawlerGPT(small_hp(**env))
    torch.manual_seed(0)
    ortho = tg.CrawlerGPT(small_hp(**env, MATRIX_INIT="orthogonal"))
    changed = 0
    for (name, a), b in zip(plain.named_parameters(), ortho.parameters()):
        if a.ndim == 2 and min(a.shape) >= 64 and a.any() and "tok_emb" not in name and "table" not in name:
            w = b.detach() if b.size(0) <= b.size(1) else b.detach().T
            torch.testing.assert_close(w @ w.T, torch.eye(w.size(0)), atol=1e-5, rtol=0)
            changed += 1
        elif not a.any():
            assert not b.any(), name
    assert changed == 7 * 2   # q and the MLP's up in 7 blocks (k and v are 32 x 64; proj and down start at 0)
    for model in (plain, ortho):   # wake the zero-init projections alike, so the blocks' outputs count
        gen = torch.Generator().manual_seed(1)
        for p in (p for p in model.parameters() if p.ndim == 2 and not p.any()):
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    x = ids()
    assert not torch.allclose(plain(x, x), ortho(x, x))
    with torch.device("meta"):   # the preflight's check_room builds the model here: nothing to initialise
        tg.CrawlerGPT(small_hp(**env, MATRIX_INIT="orthogonal"))


def test_no_loop_embedding_means_no_parameter():
    with_it, without = make_model(**LOOPED), make_model(**LOOPED, LOOP_EMBED_SCALE=0)
    assert without.loop_embed is None and "loop_embed" not in dict(without.named_parameters())
    assert tg.count_unique_params(with_it) - tg.count_unique_params(without) == 3 * 48
    x = ids()
    without(x, x).backward()


@pytest.mark.parametrize("overrides", [
    dict(LOOPED, SKIPS="virtual", SKIP_GATES=1), dict(LOOPED, LN_SCALE_DEPTH="unique", LOOP_EMBED_SCALE=0),
    dict(LOOPED, PARALLEL_START=3, XSA_LAST_N=-1),
    dict(LOOPED, PARALLEL_START=3, PARALLEL_LANES=2, ATTN_GATE=0.5, SMEAR_GATE=1, SMEAR_SCALAR=1, SKIPS="virtual")])
def test_causality_of_the_record_knobs(overrides):
    assert_causal(make_model(**overrides), seq=16, cuts=(0, 5, 14))
