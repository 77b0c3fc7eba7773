"""The crawler research arms (issue 6): off = the plain crawler bit for bit, on = a different model,
causal, trained by the right optimizer and quantized by the export."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import train_gpt as tg
from make_plain_golden import BASE, CONFIGS
from test_model import assert_causal, ids, make_model, small_hp

# One small configuration per arm (and per mode where an arm has several).
ARMS = {
    "helix_linear": {"HELIX": 1, "HELIX_DIM": 8},
    "helix_cross_attn": {"HELIX": 1, "HELIX_MODE": "cross_attn", "HELIX_DIM": 8, "NUM_FLAT_LAYERS": 4, "HELIX_STRIDE": 2},
    "loop_smear": {"LOOP_SMEAR": 1},
    "taps": {"TAP_DIM": 8},
    "taps_shared_bottleneck": {"TAP_DIM": 8, "TAP_PER_LOOP": 0, "TAP_LAYERS": "1", "NUM_FLAT_LAYERS": 4,
                               "CRAWLER_POSITION": "bottleneck"},
    "choke_flat": {"CRAWLER_MLP": "choke_flat", "CHOKE_DIM": 8},
    "pyramid": {"CRAWLER_MLP": "pyramid", "CHOKE_DIM": 8},
    "pyramid_res": {"CRAWLER_MLP": "pyramid_res", "CHOKE_DIM": 8},
    "grouped": {"CRAWLER_MLP": "grouped", "CHOKE_DIM": 8, "CHOKE_GROUPS": 2},
    "residual": {"CRAWLER_MLP": "residual", "CHOKE_DIM": 8},
    "loop_rope_scales": {"CRAWLER_LOOP_ROPE_SCALES": "1,4"},
    "deliberation": {"DELIBERATION": 1},
    "loop_dt": {"LOOP_DT": 0.5},
}
# Arms whose new parameters start at zero: with the plain model's weights they compute the plain model.
STARTS_AS_PLAIN = [a for a in ARMS if a not in ("loop_rope_scales", "loop_dt")]


def wake(model: nn.Module, seed: int = 3) -> nn.Module:
    """Give every all-zero parameter (write-backs, gates, smear, consensus) a random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def plain_and_arm(arm: str, fresh: bool) -> tuple[tg.CrawlerGPT, tg.CrawlerGPT]:
    """The plain model and the arm's model holding the plain model's weights wherever they share a name."""
    overrides = dict(ARMS[arm])
    shape = {k: overrides.pop(k) for k in ("NUM_FLAT_LAYERS", "CRAWLER_POSITION") if k in overrides}
    torch.manual_seed(0)
    plain = tg.CrawlerGPT(small_hp(**shape)) if fresh else make_model(**shape)
    torch.manual_seed(0)
    on = tg.CrawlerGPT(small_hp(**shape, **overrides))
    on.load_state_dict(plain.state_dict(), strict=False)
    return plain, on


# Where the model before the arms kept what the LoopAdapter now owns.
OLD_NAMES = {"loop_embed": "loops.embed", "inst_down.": "loops.inst_down.", "inst_up.": "loops.inst_up."}


def renamed(name: str) -> str:
    return next((new + name[len(old):] for old, new in OLD_NAMES.items() if name.startswith(old)), name)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_every_arm_off_is_the_plain_crawler_bit_for_bit(config):
    """tests/data/plain_crawler_golden.pt holds weights, ids and logits of the model as it was before the
    arms existed (make_plain_golden.py): today's model, every arm off, computes the same logits."""
    golden = torch.load(Path(__file__).parent / "data" / "plain_crawler_golden.pt")[config]
    model = tg.CrawlerGPT(tg.Hyperparameters.from_env({**BASE, **CONFIGS[config]}))
    model.load_state_dict({renamed(k): v for k, v in golden["state"].items()}, strict=True)
    with torch.no_grad():
        logits = model.logits(golden["ids"])
    torch.testing.assert_close(logits, golden["logits"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arm", STARTS_AS_PLAIN)
def test_zero_init_arm_starts_as_the_plain_model(arm):
    plain, on = plain_and_arm(arm, fresh=True)
    x = ids()
    torch.testing.assert_close(on.logits(x), plain.logits(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_arm_on_changes_the_output(arm):
    plain, on = plain_and_arm(arm, fresh=False)
    wake(on)
    x = ids()
    assert (on.logits(x) - plain.logits(x)).abs().max() > 1e-5   # float noise here is ~1e-8


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_arm_is_causal(arm):
    assert_causal(wake(make_model(**ARMS[arm])), seq=72, cuts=(0, 7, 63, 70))


def arm_param_names(arm: str) -> set[str]:
    plain, on = plain_and_arm(arm, fresh=True)
    return set(dict(on.named_parameters())) - set(dict(plain.named_parameters()))


@pytest.mark.parametrize("arm", sorted(a for a in ARMS if a not in ("loop_rope_scales", "loop_dt")))
def test_arm_parameters_are_trained_and_quantized(arm):
    model = wake(make_model(**ARMS[arm]))
    hp = model.hp
    new = arm_param_names(arm)
    assert new, "an arm with parameters adds some"
    groups = {name: g for g, members in tg.route_params(model).items() for name, _ in members}
    plan = tg.storage_plan(model, hp)
    for name in new:
        p = dict(model.named_parameters())[name]
        assert name in plan.looped, f"{name} must be quantized in the loop-aware phase 2"
        assert groups[name] == ("muon" if p.ndim == 2 else "scalar"), name
        assert plan.kinds[name] == ("int6" if p.ndim == 2 else "fp16"), name
    # One training step moves every new parameter.
    x = ids(batch=2, seq=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in new}
    opts = tg.build_optimizers(model, hp, tg.DistInfo())
    model(x, x).backward()
    for opt in opts:
        opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in new)
    # The loop-aware GPTQ quantizes the new matrices with a Hessian (every one is reached by the forward).
    entries, cost = tg.quantize_model_(model, hp, "gptq", [ids(batch=2, seq=16, seed=s) for s in range(3)], tg.DistInfo())
    matrices = {n for n in new if plan.kinds[n] == "int6"}
    assert matrices <= set(cost), matrices - set(cost)
    assert new <= set(entries)


def test_arm_parameter_counts():
    dim, hidden, loops = 48, 96, 2
    assert arm_param_names("loop_smear") == {"loops.smear"}
    assert arm_param_names("deliberation") == {"loops.consensus", "loops.delib_gate", "loops.delib_pull"}
    plain = tg.count_unique_params(make_model())
    assert tg.count_unique_params(make_model(**ARMS["taps"])) - plain == 2 * dim * 8 + loops * 8 * dim
    shared = make_model(**ARMS["taps_shared_bottleneck"])   # TAP_PER_LOOP=0, TAP_LAYERS=1: one read, one write
    assert len(shared.loops.tap_down) == 1 and len(shared.loops.tap_up) == 1
    assert [f.block for f in shared.schedules[2] if f.tap] == [1]
    # choke_flat drops the shared down projection and adds per-loop hidden->C->dim.
    assert tg.count_unique_params(make_model(**ARMS["choke_flat"])) - plain == loops * (hidden * 8 + 8 * dim) - hidden * dim
    assert tg.count_unique_params(make_model(**ARMS["grouped"])) - plain == loops * (hidden * 8 // 2 + 8 * dim) - hidden * dim
    linear = tg.count_unique_params(make_model(**ARMS["helix_linear"])) - plain
    assert linear == 2 * (dim * 8 + 8 * dim + dim)
    assert make_model(**ARMS["helix_linear"]).hp.effective_depth == 2 + 1 * (2 + 2)


def test_helix_fires_after_every_stride_and_keeps_the_sequential_loops():
    model = make_model(NUM_FLAT_LAYERS=4, HELIX=1, HELIX_STRIDE=2)
    order = []
    for name, block in [(f"flat{i}", b) for i, b in enumerate(model.flat)] + [("crawler", model.crawler[0])]:
        block.register_forward_hook(lambda *a, name=name: order.append(name))
    model.logits(ids())
    assert order == ["flat0", "flat1", "crawler", "flat2", "flat3", "crawler", "crawler", "crawler"]


def test_loop_rope_scales_divide_inv_freq():
    rot = tg.Rotary(16, 0, 10000.0)
    cos1, _ = rot(8, torch.device("cpu"))
    cos4, _ = rot(8, torch.device("cpu"), 4.0)
    pos = torch.arange(8.0)[:, None]
    torch.testing.assert_close(cos4[0, :, 0], torch.cos(pos * rot.inv_freq / 4))
    torch.testing.assert_close(cos1[0, :, 0], torch.cos(pos * rot.inv_freq))


def one_firing(model: tg.CrawlerGPT, x: torch.Tensor) -> torch.Tensor:
    """The crawler's loop 0 on x alone, as the forward runs it: enter, the crawler blocks, leave."""
    rope = model.rotary(x.size(1), x.device)
    carry = model.loops.start(x, rope, model.rotary)
    firings = [f for f in model.schedules[1] if f.loop == 0]
    anchor, h = model.loops.enter(x, firings[0], carry)
    for f in firings:
        h = model.blocks[f.block](h, x, carry.ropes[0], model.ln_scales[f.depth], model.xsa_at[f.depth], None, 0)
    return model.loops.leave(h, anchor, firings[-1], carry)


def test_contractive_loop_and_loop_smear_blend_the_firing_with_its_input():
    """One loop, F = the plain crawler firing: LOOP_DT=dt gives (1-dt) x + dt F(x); LOOP_SMEAR with
    gate g gives (1-g) F(x) + g x."""
    x = torch.randn(2, 8, 48)
    full = one_firing(make_model(CRAWLER_LOOPS=1), x)
    torch.testing.assert_close(one_firing(make_model(CRAWLER_LOOPS=1, LOOP_DT=0.25), x), 0.75 * x + 0.25 * full)
    smear = make_model(CRAWLER_LOOPS=1, LOOP_SMEAR=1)
    smear.loops.smear.data.fill_(0.3)
    torch.testing.assert_close(one_firing(smear, x), 0.7 * full + 0.3 * x)


def test_deliberation_consensus_gets_gradients_from_both_firings():
    model = wake(make_model(DELIBERATION=1))
    consensus = model.loops.consensus
    assert isinstance(consensus, nn.Parameter) and consensus.requires_grad
    x = ids()
    model(x, x).backward()
    assert consensus.grad is not None and consensus.grad.abs().sum() > 0
    # The consensus carries the first firing's output into the second: cutting it changes the gradient.
    grads = {}
    for pull in (0.3, 0.0):
        model.zero_grad()
        model.loops.delib_pull.data.fill_(pull)
        model(x, x).backward()
        grads[pull] = model.loops.delib_gate.grad.abs().sum()
    assert grads[0.3] > 0 and grads[0.0] == 0


def test_arm_knob_errors_name_the_variable():
    cases = [({"NUM_CRAWLER_LAYERS": 0, "LOOP_SMEAR": 1}, "LOOP_SMEAR"),
             ({"HELIX": 1, "HELIX_STRIDE": 3}, "HELIX_STRIDE"),
             ({"HELIX": 1, "TAP_DIM": 4}, "TAP_DIM"),
             ({"TAP_DIM": 4, "TAP_LAYERS": "2"}, "TAP_LAYERS"),
             ({"TAP_DIM": 4, "TAP_LAYERS": "0,x"}, "TAP_LAYERS"),
             ({"CRAWLER_MLP": "grouped", "CHOKE_DIM": 9, "CHOKE_GROUPS": 2}, "CHOKE_GROUPS"),
             ({"CRAWLER_LOOP_ROPE_SCALES": "1,2,4"}, "CRAWLER_LOOP_ROPE_SCALES"),
             ({"CRAWLER_LOOP_ROPE_SCALES": "1,a"}, "CRAWLER_LOOP_ROPE_SCALES"),
             ({"LOOP_DT": 0}, "LOOP_DT"),
             ({"CRAWLER_MLP": "choke"}, "CRAWLER_MLP"),
             ({"DELTA_NET_HEADS": 4}, "DELTA_NET_HEADS: removed")]   # a deleted arm's knob is an error
    for overrides, var in cases:
        with pytest.raises(tg.HyperparameterError, match=var):
            small_hp(**overrides)
    with pytest.raises(tg.HyperparameterError, match="HELIX_MODE=cross_attn"):
        tg.Hyperparameters.from_env({"HELIX_CROSS_ATTN": "1"})
