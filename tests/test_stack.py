"""The training stack: each knob changes the computation when on and leaves it alone when off."""
import torch
from torch import nn

import pytest
import train_gpt as tg
from test_model import VOCAB, ids, make_model, small_hp


def shared_pair(on: dict, neutral=None):
    """(model without the feature, model with it), sharing every weight they have in common."""
    off = make_model()
    torch.manual_seed(0)
    with_feature = tg.CrawlerGPT(small_hp(**on))
    missing = with_feature.load_state_dict(off.state_dict(), strict=False).missing_keys
    assert missing, "the feature adds parameters"
    if neutral:
        neutral(with_feature)
    return off, with_feature


def assert_same(a, b, x):
    torch.testing.assert_close(a.logits(x), b.logits(x), rtol=0, atol=0)


def assert_differs(a, b, x):
    assert not torch.allclose(a.logits(x), b.logits(x))


def test_xsa_changes_output_and_off_is_identity():
    x = ids()
    off, on = make_model(XSA_LAST_N=0), make_model(XSA_LAST_N=-1)
    assert_differs(off, on, x)
    xsa_at = lambda n: [f.xsa for f in make_model(XSA_LAST_N=n).schedules[2]]   # noqa: E731
    assert xsa_at(2) == [False, False, True, True] and xsa_at(0) == [False] * 4   # last 2 of depth 4
    assert [f.xsa for f in make_model(XSA_LAST_N=2).schedules[1]] == [False, False, True]   # one loop: by depth


def test_xsa_is_gqa_aware_and_removes_the_self_value_component():
    g = torch.Generator().manual_seed(0)
    y, v = torch.randn(2, 5, 4, 8, generator=g), torch.randn(2, 5, 2, 8, generator=g)
    out = tg.exclusive(y, v)
    v_rep = v.repeat_interleave(2, dim=2)                   # the naive reference repeats v per head
    v_hat = nn.functional.normalize(v_rep, dim=-1)
    torch.testing.assert_close(out, y - (y * v_hat).sum(-1, keepdim=True) * v_hat)
    assert (out * v_hat).sum(-1).abs().max() < 1e-5


def test_ngram_hash_off_is_identity_and_on_changes_output():
    x = ids()
    off, on = shared_pair({"NGRAM_HASH": "trigram", "NGRAM_BUCKETS": 64, "NGRAM_DIM": 8},
                          neutral=lambda m: m.ngram.scale.data.zero_())
    assert_same(off, on, x)
    on.ngram.scale.data.fill_(0.05)
    assert_differs(off, on, x)


def test_ngram_equal_context_tokens_do_not_cancel():
    a = torch.arange(2, 60)
    rows = torch.stack([torch.full_like(a, 7), a, a, torch.full_like(a, 9)], dim=1)   # (7, a, a, 9)
    last = tg.ngram_buckets(rows, 3, 4096, VOCAB)[:, -1]
    assert last.unique().numel() > 0.9 * len(a), "equal tokens at t-1 and t-2 collapsed to one bucket"


def test_ngram_never_hashes_across_a_document_boundary():
    seq = torch.tensor([[5, 6, 7, 1, 8, 9, 10]])
    other = torch.tensor([[11, 12, 13, 1, 8, 9, 10]])        # a different previous document
    for order in (2, 3):
        b1, b2 = tg.ngram_buckets(seq, order, 512, VOCAB), tg.ngram_buckets(other, order, 512, VOCAB)
        assert torch.equal(b1[:, 3:], b2[:, 3:])
        assert not torch.equal(b1[:, :3], b2[:, :3])
    assert tg.ngram_buckets(seq, 2, 512, VOCAB)[0, 0] == 511   # no context at position 0


def test_smear_gate_zero_init_and_bos_aware():
    x = ids()
    off, on = shared_pair({"SMEAR_GATE": 1})
    assert_same(off, on, x)
    on.smear.lam.data.fill_(0.5)
    assert_differs(off, on, x)
    emb = torch.randn(1, 4, 48)
    tokens = torch.tensor([[5, 6, 1, 7]])
    out = on.smear(emb, tokens)
    torch.testing.assert_close(out[0, 2], emb[0, 2])          # the BOS takes nothing from the old document
    assert not torch.allclose(out[0, 3], emb[0, 3])


def test_value_embeddings_zero_init_and_routed_to_the_right_blocks():
    x = ids()
    off, on = shared_pair({"VE_DIM": 8, "VE_LAYERS": "crawler"})
    assert_same(off, on, x)
    assert on.crawler[0].attn.ve_proj is not None and on.flat[0].attn.ve_proj is None
    nn.init.normal_(on.crawler[0].attn.ve_proj.weight, std=0.1)
    assert_differs(off, on, x)
    assert small_hp(VE_DIM=8, VE_LAYERS="0,2").ve_block_ids() == {0, 2}


@pytest.mark.parametrize("overrides", [
    {"XSA_LAST_N": -1, "NGRAM_HASH": "trigram", "SMEAR_GATE": 1, "VE_DIM": 8},
    {"NGRAM_HASH": "bigram", "CRAWLER_POSITION": "bottleneck", "CRAWLER_MLP": "choke_flat"}])
def test_causality_with_the_stack_on(overrides):
    model = make_model(**overrides)
    if model.smear is not None:
        model.smear.lam.data.fill_(0.5)
    x = ids(batch=1, seq=16)
    base = model(x, x, per_token=True)
    for t in (0, 6, 13):
        changed = x.clone()
        changed[0, t + 1:] = (changed[0, t + 1:] + 5) % VOCAB
        torch.testing.assert_close(model(changed, x, per_token=True)[0, :t + 1], base[0, :t + 1], rtol=0, atol=1e-6)


def fake_quantized(w, bits=6, k=12.85):
    return w + tg.fake_quant_delta(w, bits, k)


@pytest.mark.parametrize("k", [12.85, 3.0])
def test_fake_quant_is_the_export_grid_with_straight_through_gradients(k):
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(1), requires_grad=True)
    fq = fake_quantized(w, k=k)
    export = tg.quantize_rows(w.detach(), 6, tg.row_clip(w.detach(), k))
    torch.testing.assert_close(fq.detach(), tg.dequantize_rows(*export), rtol=0, atol=0)
    g = torch.randn_like(w)
    (fq * g).sum().backward()
    torch.testing.assert_close(w.grad, g)


def test_qat_switch_changes_the_forward_only_where_asked():
    model, x = make_model(), ids()
    before = model.logits(x)
    model.setup_qat(small_hp(QUANT_K=8.0))
    model.set_qat(False)
    torch.testing.assert_close(model.logits(x), before, rtol=0, atol=0)   # set up but off: the same model
    assert model.flat[0].attn.q.qat_bits == model.crawler[0].attn.q.qat_bits == 6
    assert model.crawler[0].mlp.up.qat_k == 8.0
    model.set_qat(True)
    assert not torch.allclose(model.logits(x), before)
    model.set_qat(False)
    torch.testing.assert_close(model.logits(x), before, rtol=0, atol=0)


def test_cadence_single_loop_steps_run_fewer_blocks():
    model, x = make_model(CRAWLER_LOOPS=3), ids()
    calls = []
    model.crawler[0].register_forward_hook(lambda *a: calls.append(1))
    model(x, x, loops=1)
    assert len(calls) == 1
    assert not torch.allclose(model(x, x, loops=1), model(x, x))


def test_lr_schedule_warmdown_frac_and_floor():
    hp = small_hp(ITERATIONS=100, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=0)
    assert tg.lr_scale(hp, 70, 0.0) == 1.0 and tg.lr_scale(hp, 90, 0.0) == pytest.approx(0.5)
    frac = small_hp(ITERATIONS=100, WARMDOWN_FRAC=0.5, MIN_LR_SCALE=0.1, MAX_WALLCLOCK_SECONDS=0)
    assert tg.lr_scale(frac, 75, 0.0) == pytest.approx(0.5) and tg.lr_scale(frac, 99, 0.0) == pytest.approx(0.1)
    timed = small_hp(ITERATIONS=10_000, WARMDOWN_ITERS=10, MAX_WALLCLOCK_SECONDS=100, GPTQ_RESERVE_SECONDS=10)
    # 1 s per step, 100 s cap less the 10 s kept for GPTQ calibration: the warmdown ends at step 90.
    assert tg.lr_scale(timed, 85, 85.0) == pytest.approx(0.5)
    assert tg.steps_left(timed, 90, 90.0) == pytest.approx(0.0)


def test_ema_warms_up():
    model = make_model()
    ema = tg.EMA(model, 0.997)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)        # first update: decay min(0.997, 2/11)
    key = "flat.0.attn.q.weight"
    torch.testing.assert_close(ema.weights[key], start[key] + 1.0 * (1 - 2 / 11))
    ema.update(model)        # second: min(0.997, 3/12)
    torch.testing.assert_close(ema.weights[key], start[key] + 1.0 - (2 / 11) * (3 / 12))
    assert tg.EMA(model, 0.0).weights == {}
