"""Model, optimizer and eval-arithmetic contracts (CPU, deterministic)."""
import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

import train_gpt as tg

VOCAB = 96


def small_hp(**overrides) -> tg.Hyperparameters:
    env = {"VOCAB_SIZE": VOCAB, "MODEL_DIM": 48, "NUM_HEADS": 4, "NUM_KV_HEADS": 2, "ROPE_DIMS": 8,
           "NUM_FLAT_LAYERS": 2, "NUM_CRAWLER_LAYERS": 1, "CRAWLER_LOOPS": 2, "MLP_MULT": 2, "CRAWLER_MLP_MULT": 2,
           "LOGIT_SOFTCAP": 30, "TRAIN_SEQ_LEN": 16, "TRAIN_BATCH_TOKENS": 64, "ACCUM_SPLITS": 1,
           # the bare architecture; the training-stack features have their own tests
           "NGRAM_HASH": "none", "VE_DIM": 0, "XSA_LAST_N": 0}
    env.update(overrides)
    return tg.Hyperparameters.from_env({k: str(v) for k, v in env.items()})


def make_model(seed=0, **overrides) -> tg.CrawlerGPT:
    torch.manual_seed(seed)
    model = tg.CrawlerGPT(small_hp(**overrides))
    for p in model.parameters():  # zero-init projections would hide most of the wiring from the tests
        if p.ndim == 2 and not p.abs().sum():
            nn.init.normal_(p, std=0.05)
    return model


def ids(batch=2, seq=16, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("flat, crawler, loops, position", [
    (0, 1, 1, "end"), (2, 1, 2, "end"), (3, 2, 3, "bottleneck"), (4, 0, 1, "end"), (4, 1, 4, "bottleneck")])
def test_forward_shapes_and_depth(flat, crawler, loops, position):
    model = make_model(NUM_FLAT_LAYERS=flat, NUM_CRAWLER_LAYERS=crawler, CRAWLER_LOOPS=loops,
                       CRAWLER_POSITION=position)
    x = ids()
    assert model.logits(x).shape == (2, 16, VOCAB)
    assert model(x, x, per_token=True).shape == (2, 16)
    assert model.hp.effective_depth == flat + crawler * loops
    calls = []
    for block in list(model.flat) + list(model.crawler):
        block.register_forward_hook(lambda *a: calls.append(1))
    model(x, x)
    assert len(calls) == flat + crawler * loops


def test_crawler_weights_are_shared_not_copied():
    one, three = make_model(CRAWLER_LOOPS=1), make_model(CRAWLER_LOOPS=3)
    dim = one.hp.model_dim
    # Extra loops add only their loop embeddings, never block weights.
    assert tg.count_unique_params(three) - tg.count_unique_params(one) == 2 * dim
    block_params = sum(p.numel() for b in list(three.flat) + list(three.crawler) for p in b.parameters())
    others = three.tok_emb.weight.numel() + three.skip_weights.numel() + three.loop_embed.numel()
    assert tg.count_unique_params(three) == block_params + others


def untie_loops(model: tg.CrawlerGPT) -> tg.CrawlerGPT:
    """A copy of the model in which loop k runs its own untied copy of the crawler blocks: the schedule
    is data, so re-pointing its crawler firings at per-loop copies is all it takes."""
    untied, n_flat, n_crawl = copy.deepcopy(model), model.hp.num_flat_layers, model.hp.num_crawler_layers
    copies = [copy.deepcopy(model.crawler) for _ in range(model.hp.crawler_loops)]
    untied.loop_copies = nn.ModuleList(copies)
    untied.blocks = [*untied.flat, *(b for c in copies for b in c)]
    untied.schedules = {n: tuple(dataclasses.replace(f, block=n_flat + f.loop * n_crawl + f.block - n_flat) if f.loop >= 0 else f
                                 for f in sched) for n, sched in untied.schedules.items()}
    return untied


def test_shared_gradient_is_the_sum_over_loops():
    loops = 3
    tied = make_model(CRAWLER_LOOPS=loops)
    untied = untie_loops(tied)
    x = ids()
    loss_tied, loss_untied = tied(x, x), untied(x, x)
    torch.testing.assert_close(loss_tied, loss_untied)
    loss_tied.backward()
    loss_untied.backward()
    copies = list(untied.loop_copies)
    for name, p in tied.crawler.named_parameters():
        summed = sum(dict(c.named_parameters())[name].grad for c in copies)
        torch.testing.assert_close(p.grad, summed, rtol=1e-4, atol=1e-6)
        per_loop = [dict(c.named_parameters())[name].grad.abs().sum() for c in copies]
        if "q_gain" not in name:
            assert all(g > 0 for g in per_loop), f"{name}: some loop sent no gradient"


def test_loop_embeddings_are_orthonormal():
    model = make_model(CRAWLER_LOOPS=5)
    rows = model.loop_embed.detach() / model.hp.loop_embed_scale
    torch.testing.assert_close(rows @ rows.T, torch.eye(5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", [
    {}, {"CRAWLER_POSITION": "bottleneck", "CRAWLER_MLP": "choke_flat", "CHOKE_DIM": 4}, {"NUM_CRAWLER_LAYERS": 0}, {"ROPE_DIMS": 0, "LN_SCALE": 0}])
def test_causality(overrides):
    assert_causal(make_model(**overrides), seq=16, cuts=(0, 5, 14))


def assert_causal(model, seq, cuts):
    """Changing the tokens after t leaves the loss at <= t exactly as it was (on CPU, masked positions add
    exact zeros, so any dependence at all shows), and moves it after t."""
    x = ids(batch=1, seq=seq)
    base = model(x, x, per_token=True)
    for t in cuts:
        changed = x.clone()
        changed[0, t + 1:] = (changed[0, t + 1:] + 7) % VOCAB
        after = model(changed, x, per_token=True)
        assert torch.equal(after[0, :t + 1], base[0, :t + 1]), (after[0, :t + 1] - base[0, :t + 1]).abs().max()
        assert not torch.allclose(after[0, t + 1:], base[0, t + 1:])


class Leaky(nn.Module):
    """A planted leak: the loss at position i also depends on token i+1."""

    def __init__(self, model, how):
        super().__init__()
        self.model, self.how = model, how

    def forward(self, x, y, per_token=False):
        if self.how == "embedding":   # 1e-4 x the next token's embedding added to the stream
            real = self.model.embed
            self.model.embed = lambda ids: real(ids) + 1e-4 * real(torch.roll(ids, -1, dims=1))
            try:
                return self.model(x, y, per_token)
            finally:
                self.model.embed = real
        loss = self.model(x, y, per_token)   # "ulp": one float32 ulp up where the next token is odd
        return torch.where(torch.roll(x, -1, dims=1) % 2 == 1, torch.nextafter(loss, loss + 1), loss)


@pytest.mark.parametrize("how", ["embedding", "ulp"])
def test_causality_probe_catches_the_smallest_planted_leaks(how):
    """The probe's own tolerance: a leak of 1e-4 x the next token's embedding, or one float32 ulp chosen by
    the next token, must be caught. The ulp leak moves the earlier losses by < 1e-6: the old probe's
    atol=1e-6 let it through; exact equality does not."""
    leaky = Leaky(make_model(), how)
    with pytest.raises(AssertionError):
        assert_causal(leaky, seq=32, cuts=(3, 17))
    x = ids(batch=1, seq=32)
    changed = x.clone()
    changed[0, 4:] = (changed[0, 4:] + 7) % VOCAB
    moved = (leaky(changed, x, per_token=True) - leaky(x, x, per_token=True))[0, :4].abs().max().item()
    assert 0 < moved < (1e-5 if how == "embedding" else 1e-6), moved


def test_newton_schulz_pushes_singular_values_near_one():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 3.0
    s = torch.linalg.svdvals(tg.newton_schulz5(g, 5))
    assert s.min() > 0.5 and s.max() < 1.5, s
    s_wide = torch.linalg.svdvals(tg.newton_schulz5(g.T, 5))
    torch.testing.assert_close(s_wide, s, atol=1e-4, rtol=1e-4)


def test_muon_step_maths():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 4))
    grad = torch.randn(8, 4)
    start = p.detach().clone()
    opt = tg.Muon([p], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.5)
    p.grad = grad.clone()
    opt.step()
    nesterov = grad + 0.9 * grad        # momentum buffer = grad after the first step
    update = tg.newton_schulz5(nesterov, 5) * math.sqrt(8 / 4)
    expected = start * (1 - 0.1 * 0.5) - 0.1 * update
    torch.testing.assert_close(p.detach(), expected)


def test_polar_express_orthogonalises_closer_than_the_fixed_quintic():
    """The records' Newton-Schulz: per-step minimax coefficients leave the singular values nearer 1 in the
    same 5 steps, over a spread spectrum (condition number 100): 0.14 from 1 against 0.32."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 32, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen))
    g = u @ torch.diag(torch.logspace(-2, 0, 32)) @ v.T * 5.0
    err = {name: (torch.linalg.svdvals(tg.newton_schulz5(g, 5, coeffs=c)) - 1).abs().max().item()
           for name, c in tg.NS_COEFFS.items()}
    assert err["polar"] < 0.5 * err["quintic"], err
    assert torch.equal(tg.newton_schulz5(g, 7, coeffs=tg.NS_COEFFS["quintic"]), tg.newton_schulz5(g, 7))
    # steps past the list repeat its last (a converged) quintic
    a, b, c = tg.NS_COEFFS["polar"][-1]
    x = tg.newton_schulz5(g, 5, coeffs=tg.NS_COEFFS["polar"])
    gram = x.T @ x   # g is tall, so x is too: the iteration runs on x.T
    torch.testing.assert_close(tg.newton_schulz5(g, 6, coeffs=tg.NS_COEFFS["polar"]),
                               a * x + x @ (b * gram + c * gram @ gram), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ns", ["quintic", "polar"])
def test_muon_row_norm_maths(ns):
    """MuonEq-R: the Nesterov update's rows are set to unit norm, then orthogonalised; off, Muon as before."""
    torch.manual_seed(0)
    model = make_model(MUON_ROW_NORM=1, MUON_NS=ns)
    muon = tg.build_optimizers(model, model.hp, tg.DistInfo())[-1]
    p = muon.param_groups[0]["params"][0]
    grad = torch.randn(p.shape) * torch.linspace(0.1, 10, p.size(0))[:, None]   # rows of unequal norm
    start, p.grad = p.detach().clone(), grad.clone()
    for q in muon.param_groups[0]["params"][1:]:
        q.grad = None
    muon.step()
    nesterov = grad * (1 + muon.param_groups[0]["momentum"])
    rows = nesterov / nesterov.norm(dim=-1, keepdim=True)
    update = tg.newton_schulz5(rows, 5, coeffs=tg.NS_COEFFS[ns]) * max(1, p.size(0) / p.size(1)) ** 0.5
    lr, wd = muon.param_groups[0]["lr"], muon.param_groups[0]["weight_decay"]
    torch.testing.assert_close(p.detach(), start * (1 - lr * wd) - lr * update)
    plain = tg.newton_schulz5(nesterov, 5, coeffs=tg.NS_COEFFS[ns]) * max(1, p.size(0) / p.size(1)) ** 0.5
    assert (update - plain).abs().max() > 1e-3


def test_embed_wd_sets_the_tables_decay_alone():
    model = make_model()
    embed, scalar = (o.param_groups[0]["weight_decay"] for o in tg.build_optimizers(model, model.hp,
                                                                                   tg.DistInfo())[:2])
    assert embed == scalar == model.hp.adam_wd                  # -1: as ADAM_WD, today's behaviour
    model = make_model(EMBED_WD=0.085, ADAM_WD=0.02)
    embed_opt, scalar_opt = tg.build_optimizers(model, model.hp, tg.DistInfo())[:2]
    assert embed_opt.param_groups[0]["weight_decay"] == 0.085 and scalar_opt.param_groups[0]["weight_decay"] == 0.02
    assert embed_opt.param_groups[0]["params"][0] is model.tok_emb.weight


def test_every_parameter_routed_once():
    model = make_model(CRAWLER_MLP="choke_flat", CHOKE_DIM=4, NUM_FLAT_LAYERS=3)
    groups = tg.route_params(model)
    names = [n for g in groups.values() for n, _ in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(p.ndim == 2 for _, p in groups["muon"])
    assert [n for n, _ in groups["embed"]] == ["tok_emb.weight"]
    assert any(n.startswith("crawler.") for n, _ in groups["muon"])
    assert "loop_embed" in [n for n, _ in groups["scalar"]]
    opts = tg.build_optimizers(model, model.hp, tg.DistInfo())
    assert sum(len(g["params"]) for o in opts for g in o.param_groups) == len(list(model.parameters()))


class FakeSP:
    """A 7-piece vocabulary: <pad> <s> </s> <unk>, a byte piece, '▁ab', 'é'."""
    pieces = ["<pad>", "<s>", "</s>", "<unk>", "<0x41>", "▁ab", "é"]

    def vocab_size(self):
        return len(self.pieces)

    def is_control(self, i):
        return i in (0, 1, 2)

    def is_unknown(self, i):
        return i == 3

    def is_unused(self, i):
        return False

    def is_byte(self, i):
        return i == 4

    def id_to_piece(self, i):
        return self.pieces[i]


def test_byte_luts_and_bpb_by_hand():
    luts = tg.build_byte_luts(FakeSP(), 8)
    assert luts.base_bytes.tolist() == [0, 0, 0, 0, 1, 2, 2, 0]
    # <s> ▁ab é ▁ab <0x41>: '▁ab' after BOS has no space byte; after 'é' it has one.
    tokens = torch.tensor([1, 5, 6, 5, 4])
    per_target = tg.target_bytes(tokens[:-1], tokens[1:], luts)
    assert per_target.tolist() == [2, 2, 3, 1]
    nll = torch.tensor([1.0, 2.0, 0.5, 0.25])
    assert tg.bits_per_byte(nll.sum().item(), per_target.sum().item()) == pytest.approx(3.75 / math.log(2) / 8)


@pytest.mark.parametrize("num_tokens, seq_len, stride", [
    (101, 16, 16), (101, 16, 4), (101, 16, 1), (17, 16, 5), (50, 16, 7), (10, 16, 3), (1000, 64, 64)])
def test_sliding_windows_score_every_target_once(num_tokens, seq_len, stride):
    seq_len = min(seq_len, num_tokens - 1)
    counts = torch.zeros(num_tokens - 1, dtype=torch.int64)
    for start, first in tg.sliding_windows(num_tokens, seq_len, stride):
        assert 0 <= first < seq_len and start + seq_len <= num_tokens - 1
        counts[start + first:start + seq_len] += 1
        if start > 0:   # the scoring window leaves at least seq_len - stride tokens of context
            assert first >= min(seq_len - stride, first)
    assert counts.eq(1).all()


def test_sliding_eval_with_stride_equal_seq_len_is_plain_eval():
    model = make_model()
    tokens = torch.randint(0, VOCAB, (8 * 16 + 1,), generator=torch.Generator().manual_seed(3))
    luts = tg.build_byte_luts(FakeSP(), VOCAB)
    luts.base_bytes[:] = 2  # every token 2 bytes, no boundaries, so the bpb is simple
    luts.is_boundary[:] = False
    luts.has_space[:] = False
    loss, bpb = tg.evaluate(model, tokens, luts, 16, 16, 64, tg.DistInfo(), torch.device("cpu"))
    x, y = tokens[:-1].view(8, 16), tokens[1:].view(8, 16)
    plain = model(x, y, per_token=True).double().mean().item()
    assert loss == pytest.approx(plain, rel=1e-6)
    assert bpb == pytest.approx(plain / math.log(2) / 2, rel=1e-6)
    loss_sliding, _ = tg.evaluate(model, tokens, luts, 16, 4, 64, tg.DistInfo(), torch.device("cpu"))
    assert loss_sliding != pytest.approx(loss, rel=1e-9)   # more context, a different number


# ---------------------------------------------------------------------------- memory: the norm and the loss
def saved_for_backward(fn, *args):
    """(output, [(shape, dtype)] of every tensor autograd saves while fn runs)."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(*args), saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_keeps_the_inputs_dtype_under_cudas_autocast(dtype):
    """The norm's output in the compute dtype on every device: CUDA's autocast would run F.rms_norm in fp32
    (its fp32 list), keeping an fp32 copy of each normed input and handing fp32 to q, k and v (a bf16 cast for
    each). Under the cost model's emulation of CUDA's autocast (experiments/cost_model.py), what the backward
    keeps is the input itself and CUDA's fp32 rstd a row; on the CPU, F.rms_norm's values exactly."""
    from experiments import cost_model as cm
    x = (torch.randn(6, 5, 64, generator=torch.Generator().manual_seed(0)) * 3).to(dtype).requires_grad_()
    assert torch.equal(tg.rms_norm(x), torch.nn.functional.rms_norm(x, (64,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tg.rms_norm(x).dtype == dtype
    with cm.CudaAutocast():
        out, saved = saved_for_backward(tg.rms_norm, x)
        assert torch.is_autocast_enabled("cuda")
    assert not torch.is_autocast_enabled("cuda")
    assert out.dtype == dtype and saved == [((6, 5, 64), dtype), ((6, 5, 1), torch.float32)]


@pytest.mark.parametrize("chunk", [5, 16, 256])
def test_chunked_loss_is_the_full_softcapped_cross_entropy(monkeypatch, chunk):
    """forward() takes the loss LOSS_CHUNK positions at a time (the last chunk shorter), each chunk's logits
    rebuilt in the backward: per-token NLL and mean loss exactly the unchunked soft-capped cross-entropy, every
    gradient within fp32 rounding, and no [tokens x vocab] logits kept for the backward."""
    monkeypatch.setattr(tg, "LOSS_CHUNK", chunk, raising=False)   # (old code: no chunks)
    model, x = make_model(MLP_MULT=3, CRAWLER_MLP_MULT=3), ids(batch=3, seq=16)   # no hidden width = VOCAB
    y = torch.roll(x, -1, dims=1)
    reference = copy.deepcopy(model)
    logits = reference.logits(x)
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.reshape(-1), reduction="none").view_as(y)
    assert torch.equal(model(x, y, per_token=True), full)
    loss, saved = saved_for_backward(model, x, y)
    assert torch.equal(loss, full.mean())
    assert not [s for s, _ in saved if s and s[-1] == VOCAB], "logits kept for the backward"
    loss.backward()
    full.mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_lora_head_loss_takes_one_pass_and_its_head():
    """With a LoRA head (TTT=lora) forward adds it to the logits before the cap, in one pass."""
    model, x = make_model(), ids()
    bias = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    nll = model(x, x, per_token=True, head=lambda h: h[..., :1] * 0 + bias)
    raw = torch.nn.functional.linear(model.hidden(x), model.tok_emb.weight) + bias
    capped = 30 * torch.tanh(raw / 30)
    torch.testing.assert_close(nll, torch.nn.functional.cross_entropy(capped.flatten(0, 1), x.reshape(-1),
                                                                      reduction="none").view_as(x))
