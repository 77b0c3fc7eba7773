"""Model-level export: storage kinds, loop-aware GPTQ calibration by module membership, SDClip's fit to the
cap, Hessian allocation, the artifact round trip."""
import copy

import pytest
import torch

import train_gpt as tg
from test_model import ids, make_model

CPU = tg.DistInfo()


def batches(n=3, seed=5):
    return [ids(batch=2, seq=16, seed=seed + i) for i in range(n)]


def test_storage_kinds_follow_the_knobs():
    model = make_model()
    kinds = tg.storage_plan(model, model.hp).kinds
    assert kinds["tok_emb.weight"] == "int8"
    assert kinds["flat.0.attn.q.weight"] == kinds["crawler.0.mlp.up.weight"] == "int6"
    assert kinds["crawler.0.attn.q_gain"] == kinds["loop_embed"] == kinds["skip_weights"] == "fp32"
    fp16 = make_model(EMBED_QUANT="fp16")
    assert tg.storage_plan(fp16, fp16.hp).kinds["tok_emb.weight"] == "fp16"


def test_loop_aware_phase_is_decided_by_module_membership_not_names():
    """A new per-loop module with an unrelated name, living in a crawler block, is quantized in the
    loop-aware phase with a Hessian summed over every loop."""
    model = make_model(GPTQ_LOOP_AWARE=1)
    block = model.crawler[0]
    block.zebra = tg.CastedLinear(48, 48)
    run = block.forward
    block.forward = lambda x, *args: run(x, *args) + 0.1 * block.zebra(x)
    plan = tg.storage_plan(model, model.hp)
    assert "crawler.0.zebra.weight" in plan.looped and "flat.0.attn.q.weight" not in plan.looped
    calls = []
    block.zebra.register_forward_pre_hook(lambda m, a: calls.append(1))
    calib = batches()
    entries, used = tg.quantize_model_(model, model.hp, "gptq", calib, CPU)
    assert entries["crawler.0.zebra.weight"]["kind"] == "int6" and "crawler.0.zebra.weight" in used
    assert len(calls) == 2 * len(calib) * 2   # phase 1 pass, then phase 2: every batch, every loop


def test_loop_aware_phase_two_sees_the_quantized_flat_section():
    model = make_model(CRAWLER_LOOPS=2, GPTQ_LOOP_AWARE=1)
    float_model = copy.deepcopy(model)
    seen = []
    model.crawler[0].attn.q.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    calib = batches()
    entries, _ = tg.quantize_model_(model, model.hp, "gptq", calib, CPU)
    calls_per_pass = len(calib) * 2          # every batch fires the crawler once per loop
    assert len(seen) == 2 * calls_per_pass   # phase 1 pass, then the phase 2 re-collection
    # Reference: the float model with only phase 1 (everything that runs once) replaced by its quantized values.
    reference = copy.deepcopy(float_model)
    plan = tg.storage_plan(reference, reference.hp)
    state = reference.state_dict()
    for name, e in entries.items():
        if e["kind"] in tg.QUANT_KINDS and name not in plan.looped:
            state[name] = tg.dequantize_rows(e["q"], e["scale"]).reshape(e["shape"])
    reference.load_state_dict(state)
    expected = []
    hook = reference.crawler[0].attn.q.register_forward_pre_hook(lambda m, a: expected.append(a[0].detach().clone()))
    reference.hidden(calib[0])
    hook.remove()
    torch.testing.assert_close(seen[calls_per_pass], expected[0])          # phase 2, batch 0, loop 0
    torch.testing.assert_close(seen[calls_per_pass + 1], expected[1])      # ... and loop 1
    assert not torch.allclose(seen[0], seen[calls_per_pass])               # phase 1 saw float activations


def test_loop_aware_changes_the_crawler_quantization_only():
    aware, plain = make_model(GPTQ_LOOP_AWARE=1), make_model(GPTQ_LOOP_AWARE=0)
    calib = batches()
    e_aware, _ = tg.quantize_model_(aware, aware.hp, "gptq", calib, CPU)
    e_plain, _ = tg.quantize_model_(plain, plain.hp, "gptq", calib, CPU)
    assert torch.equal(e_aware["flat.0.mlp.up.weight"]["q"], e_plain["flat.0.mlp.up.weight"]["q"])
    assert not torch.equal(e_aware["crawler.0.mlp.up.weight"]["q"], e_plain["crawler.0.mlp.up.weight"]["q"])


@pytest.mark.parametrize("level", [1, 11])
def test_artifact_round_trip_rebuilds_the_quantized_model(tmp_path, level):
    model = make_model(CRAWLER_MLP="choke_flat", CHOKE_DIM=8, COMPRESS_LEVEL=level)
    entries, _ = tg.quantize_model_(model, model.hp, "gptq", batches(), CPU)
    path = tmp_path / "model.ptz"
    tg.write_atomic(path, tg.pack_artifact(entries, tg.artifact_meta(model.hp), level))
    fresh, meta = tg.load_artifact(path)
    assert fresh is not model and fresh.hp.model_knobs() == model.hp.model_knobs()
    assert "run_id" not in meta["model"] and "data_path" not in str(meta)   # counted bytes hold no paths or ids
    x = ids()
    torch.testing.assert_close(fresh.logits(x), model.logits(x), rtol=1e-5, atol=1e-5)


def test_foreign_or_mismatched_artifacts_are_refused(tmp_path):
    entries = {"w": {"kind": "fp32", "shape": [2], "data": torch.zeros(2)}}
    path = tmp_path / "foreign.ptz"
    path.write_bytes(tg.pack_artifact(entries, {"format": "other"}, 1))
    with pytest.raises(tg.ArtifactError, match="not a crawler-golf"):
        tg.load_artifact(path)
    model = make_model()
    path.write_bytes(tg.pack_artifact(entries, tg.artifact_meta(model.hp), 1))
    with pytest.raises(tg.ArtifactError, match="do not fit"):
        tg.load_artifact(path)
    with pytest.raises(tg.ArtifactError, match="not an artifact file"):
        tg.load_artifact(tmp_path)


def test_hessian_allocation_with_equal_importance_is_uniform():
    """Every group with the same Hessian trace per weight and the same row spread gets the same k."""
    model = make_model(NUM_FLAT_LAYERS=2, EMBED_QUANT="fp16", QUANT_ALLOC="hessian")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    plan = tg.storage_plan(model, model.hp)
    params = dict(model.named_parameters())
    # H = c * I scaled so tr(H) * rows is the same per weight for every matrix: cost/n is equal
    hessians = {n: torch.eye(params[n].shape[1]) / params[n].shape[1] for n in plan.linear}
    rel = tg.relative_ks(model, model.hp, hessians)
    spread = {round(v, 2) for v in rel.values()}
    assert spread == {1.0}, spread
    # Ten times the importance in one crawler block: that block gets a finer grid, the rest coarser.
    boosted = {n: h * (10.0 if n.startswith("crawler.0.") else 1.0) for n, h in hessians.items()}
    rel = tg.relative_ks(model, model.hp, boosted)
    assert rel["crawler.0.mlp.up.weight"] < 1.0 < rel["flat.0.mlp.up.weight"]
    assert rel["crawler.0.mlp.up.weight"] == pytest.approx(rel["flat.0.mlp.up.weight"] / 10 ** 0.5, rel=1e-6)


def test_fit_search_lands_in_the_window(tmp_path):
    """SIZE_TARGET=fit with a cap that binds: the real packed bytes land in [limit - margin, limit], no pruning."""
    torch.manual_seed(0)
    hp = tg.Hyperparameters.from_env({"VOCAB_SIZE": "96", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                                      "ROPE_DIMS": "8", "NUM_FLAT_LAYERS": "2", "NUM_CRAWLER_LAYERS": "1",
                                      "NGRAM_HASH": "none", "VE_DIM": "0", "QUANT": "rtn", "COMPRESS_LEVEL": "5",
                                      "SIZE_TARGET": "none"})
    model = tg.CrawlerGPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                torch.nn.init.normal_(p, std=0.02)
    meta = tg.artifact_meta(hp)
    at_default = tg.export_model(model, hp, [], CPU, tg.Logger(None), meta)   # fixed k = QUANT_K
    code = len(tg.packed_code())
    limit = code + int(len(at_default.blob) * 0.8)
    fit_hp = tg.Hyperparameters.from_env({**{f.name.upper(): str(getattr(hp, f.name)) for f in tg.knob_fields()
                                             if getattr(hp, f.name) != f.default},
                                          "SIZE_TARGET": "fit", "SIZE_LIMIT": str(limit), "SIZE_MARGIN": "2000"})
    out = tg.export_model(model, fit_hp, [], CPU, tg.Logger(None), meta)
    assert limit - 2000 <= code + len(out.blob) <= limit and out.pruned == 0
    assert out.quant_k > hp.quant_k and out.passes <= 3
    roomy = tg.export_model(model, tg.Hyperparameters(**{**fit_hp.__dict__, "size_limit": 16_000_000}), [], CPU,
                            tg.Logger(None), meta)
    assert roomy.quant_k == tg.K_MIN   # room to spare: the finest grid the search allows


@pytest.mark.parametrize("bits_kind", ["int8", "int7"])
def test_embed_gptq_quantizes_the_head_on_the_final_hidden_states(bits_kind):
    """EMBED_GPTQ=1: the tied embedding is GPTQ'd as the head (its input: the final hidden states, whose Hessian
    it gets), the rest exactly as before; its head-output error on the calibration states is below rounding's.
    EMBED_QUANT=int7 stores it on a 7-bit grid (|q| <= 63), which packs and reloads."""
    calib = batches()
    plain, gptq = make_model(EMBED_QUANT=bits_kind), make_model(EMBED_QUANT=bits_kind, EMBED_GPTQ=1)
    float_model = copy.deepcopy(plain)
    e_plain, used_plain = tg.quantize_model_(plain, plain.hp, "gptq", calib, CPU)
    e_gptq, used = tg.quantize_model_(gptq, gptq.hp, "gptq", calib, CPU)
    assert tg.HEAD in used and tg.HEAD not in used_plain
    looped = tg.storage_plan(plain, plain.hp).looped   # (the crawler's Hessians see the quantized embedding)
    assert all(torch.equal(e_plain[n]["q"], e_gptq[n]["q"]) for n in e_plain
               if n != tg.HEAD and n not in looped and "q" in e_plain[n])
    assert e_gptq[tg.HEAD]["kind"] == bits_kind
    assert e_gptq[tg.HEAD]["q"].abs().max() <= tg._qmax(tg.QUANT_KINDS[bits_kind])
    with torch.no_grad():
        h = torch.cat([float_model.hidden(x).reshape(-1, 48) for x in calib])
        w = float_model.tok_emb.weight
        err = {name: ((w - m.tok_emb.weight) @ h.T).square().sum().item()
               for name, m in (("rtn", plain), ("gptq", gptq))}
    assert err["gptq"] < err["rtn"]
    blob = tg.pack_as(gptq.hp, e_gptq, tg.artifact_meta(gptq.hp))
    entries, _ = tg.unpack_artifact(blob)
    assert torch.equal(entries[tg.HEAD]["q"], e_gptq[tg.HEAD]["q"])


def test_quant_roles_set_each_roles_k_and_the_fit_scales_them_together():
    """QUANT_ROLES=attn:13,mlp:11.5,embed:14 (the 2026-04-27 record's clips): with SIZE_TARGET=none and QUANT_K
    12.85 each tensor gets its role's k exactly; whatever the fit's multiplier, the ratios between roles hold.
    Roles come from the owning module (attention, MLP, embedding tables), not from names."""
    model = make_model(QUANT_ROLES="attn:13,mlp:11.5,embed:14", QUANT_K=12.85)
    rel = tg.relative_ks(model, model.hp, {})
    ks = tg.ks_at(rel, model.hp.quant_k)
    assert ks["flat.0.attn.q.weight"] == pytest.approx(13) and ks["crawler.0.attn.proj.weight"] == pytest.approx(13)
    assert ks["flat.1.mlp.down.weight"] == pytest.approx(11.5) and ks["tok_emb.weight"] == pytest.approx(14)
    scaled = tg.ks_at(rel, 2 * model.hp.quant_k)
    assert scaled["flat.0.attn.q.weight"] / scaled["flat.0.mlp.up.weight"] == pytest.approx(13 / 11.5)
    plain = make_model()
    assert tg.relative_ks(plain, plain.hp, {})["flat.0.attn.q.weight"] == 1.0
    for bad in ("attn:13,head:2", "mlp:0.1", "attn=13", "mlp:x"):
        with pytest.raises(tg.HyperparameterError, match="QUANT_ROLES"):
            make_model(QUANT_ROLES=bad)


def test_hessian_clip_widens_the_clip_of_rows_the_hessian_weighs_more():
    """HESSIAN_CLIP=lambda (the 2026-04-06 record's): a GPTQ'd row's clip is k std * (1 + lambda (r - 1)), r its
    Hessian-weighted mean |w| over the matrix's mean; 0 leaves the export as it was."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=gen)
    w[0] *= 3.0                                          # a row with more weight on every column
    h = torch.diag(torch.tensor([4.0, 1, 1, 1, 1, 1, 1, 1]))
    r = tg.row_importance(w, h)
    assert r.mean().item() == pytest.approx(1.0) and r.argmax().item() == 0
    expected = ((w.abs() * torch.tensor([4.0, 1, 1, 1, 1, 1, 1, 1]) / 1.375).mean(1))
    torch.testing.assert_close(r, expected / expected.mean())
    calib = batches()
    plain, off, on = make_model(), make_model(HESSIAN_CLIP=0), make_model(HESSIAN_CLIP=0.175)
    e_plain, _ = tg.quantize_model_(plain, plain.hp, "gptq", calib, CPU)
    e_off, _ = tg.quantize_model_(off, off.hp, "gptq", calib, CPU)
    e_on, used = tg.quantize_model_(on, on.hp, "gptq", calib, CPU)
    name = "flat.0.mlp.up.weight"
    assert torch.equal(e_off[name]["scale"], e_plain[name]["scale"])
    w0 = dict(make_model().named_parameters())[name].detach()
    want = tg.row_clip(w0, on.hp.quant_k) * (1 + 0.175 * (tg.row_importance(w0, used[name]) - 1))
    torch.testing.assert_close(e_on[name]["scale"].float(), (want / 31).half().float(), rtol=2e-3, atol=0)


def test_lqer_corrects_the_matrices_of_largest_error_and_the_artifact_holds_it(tmp_path):
    """LQER_RANK=r, LQER_TOP=n: the n quantized matrices with the largest ||W - deq(q)|| get int4 factors A, B of
    the error's rank-r SVD; the model and the reloaded artifact hold deq(q) + A @ B, closer to W than deq(q)."""
    calib = batches()
    plain, lqer = make_model(), make_model(LQER_RANK=2, LQER_TOP=3)
    float_w = dict(make_model().named_parameters())
    e_plain, _ = tg.quantize_model_(plain, plain.hp, "gptq", calib, CPU)
    e_lqer, _ = tg.quantize_model_(lqer, lqer.hp, "gptq", calib, CPU)
    plan = tg.storage_plan(plain, plain.hp)
    err = {n: (float_w[n] - p).norm().item() for n, p in plain.named_parameters() if n in plan.linear}
    top = sorted(err, key=err.get, reverse=True)[:3]
    assert sorted(n.removesuffix(".lqer_a") for n in e_lqer if n.endswith(".lqer_a")) == sorted(top)
    for n in top:
        a, b = e_lqer[n + ".lqer_a"], e_lqer[n + ".lqer_b"]
        assert a["kind"] == b["kind"] == "int4" and a["shape"][1] == b["shape"][0] == 2 and a["q"].abs().max() <= 7
        assert torch.equal(e_lqer[n]["q"], e_plain[n]["q"])          # the correction comes on top of the same q
        assert (float_w[n] - dict(lqer.named_parameters())[n]).norm().item() < 0.95 * err[n]
    path = tmp_path / "a.ptz"
    path.write_bytes(tg.pack_as(lqer.hp, e_lqer, tg.artifact_meta(lqer.hp)))
    reloaded, _ = tg.load_artifact(path)
    for (name, p), q in zip(lqer.named_parameters(), reloaded.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
    assert len(path.read_bytes()) > len(tg.pack_as(plain.hp, e_plain, tg.artifact_meta(plain.hp)))  # counted
