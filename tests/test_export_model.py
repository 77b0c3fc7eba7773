"""Model-level export: storage kinds, loop-aware GPTQ calibration, artifact round trip."""
import copy

import pytest
import torch

import train_gpt as tg
from test_model import ids, make_model

CPU = tg.DistInfo()


def batches(n=3, seed=5):
    return [ids(batch=2, seq=16, seed=seed + i) for i in range(n)]


def test_storage_kinds_follow_the_knobs():
    model = make_model(INST_DIM=4)
    kinds = {n: tg.storage_kind(n, p, model.hp) for n, p in model.named_parameters()}
    assert kinds["tok_emb.weight"] == "int8"
    assert kinds["flat.0.attn.q.weight"] == kinds["crawler.0.mlp.up.weight"] == "int6"
    assert kinds["inst_down.weight"] == "int6"
    assert kinds["crawler.0.attn.q_gain"] == kinds["loop_embed"] == kinds["skip_weights"] == "fp32"
    int8 = make_model(CRAWLER_QUANT_INT8=1)
    assert tg.storage_kind("crawler.0.mlp.up.weight", int8.crawler[0].mlp.up.weight, int8.hp) == "int8"
    assert tg.storage_kind("flat.0.mlp.up.weight", int8.flat[0].mlp.up.weight, int8.hp) == "int6"


def test_loop_aware_phase_two_sees_the_quantized_flat_section():
    model = make_model(CRAWLER_LOOPS=2, GPTQ_LOOP_AWARE=1)
    float_model = copy.deepcopy(model)
    seen = []
    model.crawler[0].attn.q.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    calib = batches()
    entries, _ = tg.quantize_model_(model, model.hp, "gptq", calib, CPU)
    calls_per_pass = len(calib) * 2          # every batch fires the crawler once per loop
    assert len(seen) == 2 * calls_per_pass   # phase 1 pass, then the phase 2 re-collection
    # Reference: the float model with only phase 1 (embedding + flat) replaced by its quantized values.
    reference = copy.deepcopy(float_model)
    state = reference.state_dict()
    for name, e in entries.items():
        if e["kind"] in tg.QUANT_KINDS and not name.startswith(tg.CRAWLER_PREFIXES):
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


@pytest.mark.parametrize("compressor", ["zstd", "brotli", "lzma"])
def test_artifact_round_trip_rebuilds_the_quantized_model(tmp_path, compressor):
    model = make_model(INST_DIM=4, COMPRESSOR=compressor)
    entries, cost = tg.quantize_model_(model, model.hp, "gptq", batches(), CPU)
    path = tmp_path / "model.ptz"
    tg.write_atomic(path, tg.pack_model(entries, cost, model.hp, tg.Logger(None)))
    fresh = tg.load_artifact(path)
    assert fresh is not model and fresh.hp == model.hp
    x = ids()
    torch.testing.assert_close(fresh.logits(x), model.logits(x), rtol=1e-5, atol=1e-5)


def test_foreign_or_mismatched_artifacts_are_refused(tmp_path):
    entries = {"w": {"kind": "fp32", "shape": [2], "data": torch.zeros(2)}}
    path = tmp_path / "foreign.ptz"
    path.write_bytes(tg.pack_artifact(entries, {"format": "other"}, "zstd"))
    with pytest.raises(tg.ArtifactError, match="not a crawler-golf"):
        tg.load_artifact(path)
    model = make_model()
    path.write_bytes(tg.pack_artifact(entries, tg.artifact_meta(model.hp), "zstd"))
    with pytest.raises(tg.ArtifactError, match="do not fit"):
        tg.load_artifact(path)
