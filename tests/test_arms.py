"""The crawler research arms (issue 6): off = the plain crawler bit for bit, on = a different model,
causal, trained by the right optimizer and quantized by the export. Helix, loop smear and per-loop RoPE were
deleted after crawler_arms, taps and deliberation after arms_9seeds (issue 21; experiments/LOG.md); the choke
MLP stays (it won on the seeds' pod), and so do contractive loops (LOOP_DT: a gain on the CPU proxy)."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import train_gpt as tg
from make_plain_golden import BASE, CONFIGS
from test_model import assert_causal, ids, make_model, small_hp

# One small configuration per arm (and per mode where an arm has several).
ARMS = {"choke_flat": {"CRAWLER_MLP": "choke_flat", "CHOKE_DIM": 8}, "loop_dt": {"LOOP_DT": 0.5}}
# Arms whose new parameters start at zero: with the plain model's weights they compute the plain model.
STARTS_AS_PLAIN = ["choke_flat"]
WITH_PARAMETERS = ["choke_flat"]


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


# The golden model's parameter names are today's (the loop embedding kept its name through the arms' era).
OLD_NAMES: dict[str, str] = {}


def renamed(name: str) -> str:
    return next((new + name[len(old):] for old, new in OLD_NAMES.items() if name.startswith(old)), name)


# bottleneck_inst used the flow instructions (INST_DIM), deleted in issue 21: no gain shown anywhere.
@pytest.mark.parametrize("config", sorted(c for c in CONFIGS if "INST_DIM" not in CONFIGS[c]))
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


@pytest.mark.parametrize("arm", WITH_PARAMETERS)
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
    plain = tg.count_unique_params(make_model())
    # choke_flat drops the shared down projection and adds per-loop hidden->C->dim.
    assert tg.count_unique_params(make_model(**ARMS["choke_flat"])) - plain == loops * (hidden * 8 + 8 * dim) - hidden * dim


def test_a_contractive_loop_steps_dt_of_the_way_from_its_input_to_the_firing():
    """LOOP_DT=dt, one crawler block run once on the embedding: the stream is (1-dt) x + dt F(x + e_loop)."""
    model = make_model(NUM_FLAT_LAYERS=0, NUM_CRAWLER_LAYERS=1, CRAWLER_LOOPS=1, LOOP_DT=0.25)
    fired = []
    model.crawler[0].register_forward_hook(lambda mod, args, out: fired.append(out))
    x = ids(batch=2, seq=16)
    with torch.no_grad():
        hidden, x0 = model.hidden(x), model.embed(x)
    torch.testing.assert_close(hidden, tg.rms_norm(0.75 * x0 + 0.25 * fired[0]))


def test_arm_knob_errors_name_the_variable():
    cases = [({"LOOP_DT": 0}, "LOOP_DT"), ({"LOOP_DT": 1.5}, "LOOP_DT"), ({"CRAWLER_MLP": "choke"}, "CRAWLER_MLP"), ({"CRAWLER_MLP": "pyramid"}, "CRAWLER_MLP"),
             ({"CHOKE_GROUPS": 2}, "CHOKE_GROUPS: not a knob"),
             ({"NUM_CRAWLER_LAYERS": 0, "CRAWLER_MLP": "choke_flat"}, "CRAWLER_MLP"),
             ({"DELTA_NET_HEADS": 4}, "DELTA_NET_HEADS: not a knob of train_gpt.py; its arm was deleted")]
    for overrides, var in cases:
        with pytest.raises(tg.HyperparameterError, match=var):
            small_hp(**overrides)
    for deleted in ("HELIX", "HELIX_DIM", "HELIX_MODE", "LOOP_SMEAR", "CRAWLER_LOOP_ROPE_SCALES", "TAP_DIM",
                    "TAP_LAYERS", "DELIBERATION"):   # issue 21
        with pytest.raises(tg.HyperparameterError, match=f"{deleted}: not a knob.*LOG.md"):
            tg.Hyperparameters.from_env({deleted: "1"})
