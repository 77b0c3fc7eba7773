import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg

from train_gpt import (
    ARTIFACT_MAGIC, ARTIFACT_VERSION, BROTLI_ID, ArtifactError, ArtifactTooLarge, DistInfo, Hyperparameters,
    compress_bytes, decompress_bytes, dequantize_rows, gptq_quantize, pack_artifact, prune_to_fit, quantize_rows,
    row_clip, unpack_artifact,
)

LEVELS = [1, 11]   # brotli quality: fast, and the artifact's best


ROOT = Path(__file__).resolve().parents[1]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def awkward_matrix(seed: int = 0) -> torch.Tensor:
    w = torch.randn(40, 77, generator=gen(seed))
    w[3] = 0.0  # zero row
    w[5, 7] = 40.0  # outlier
    w[6] *= 1e-6  # tiny row: exercises the fp16 scale floor/rounding
    w[7, :10] = -25.0
    return w


# ---------------------------------------------------------------- RTN
@pytest.mark.parametrize("bits", [6, 8])
def test_rtn_error_at_most_half_step(bits):
    w = awkward_matrix()
    q, s = quantize_rows(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and q.shape == w.shape
    assert q.abs().max() <= qmax and (s > 0).all()
    err = (dequantize_rows(q, s) - w).abs()
    assert (err <= s.float()[:, None] / 2 * (1 + 1e-6) + 1e-12).all()
    assert (q[3] == 0).all()


@pytest.mark.parametrize("bits", [6, 8])
def test_rtn_with_clip_below_absmax(bits):
    w = awkward_matrix(1)
    clip = w.abs().amax(1) * 0.6
    q, s = quantize_rows(w, bits, clip)
    err = (dequantize_rows(q, s) - w).abs()
    inside = w.abs() <= clip[:, None]
    assert (err[inside] <= (s.float()[:, None] / 2 * (1 + 1e-6)).expand_as(w)[inside]).all()
    normal = torch.ones_like(inside)
    normal[6] = False  # 1e-6 row: scale hits the fp16 floor, so nothing saturates there
    assert (q[~inside & normal].abs() == 2 ** (bits - 1) - 1).all()


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError):
        quantize_rows(torch.randn(3, 4, 5), 6)
    with pytest.raises(ValueError):
        quantize_rows(torch.tensor([[1.0, float("nan")]]), 6)
    with pytest.raises(ValueError):
        quantize_rows(torch.randn(3, 4), 12)
    with pytest.raises(ValueError):
        quantize_rows(torch.randn(3, 4), 6, clip=torch.ones(4))


def test_row_clip_is_k_row_stds():
    w = awkward_matrix(2)
    absmax = w.abs().amax(1)
    std = w.std(dim=1, correction=0)
    sd = row_clip(w, 12.85)
    torch.testing.assert_close(sd[std > 0], 12.85 * std[std > 0])
    assert (sd[std == 0] == absmax[std == 0]).all()           # a constant row keeps its absmax
    assert (sd > absmax)[std > 0].any() and (row_clip(w, 1.0) < absmax)[std > 0].any()


def bits_per_weight(w: torch.Tensor, k: float | None) -> float:
    q, s = quantize_rows(w, 6, None if k is None else row_clip(w, k))   # None: the row's absmax
    blob = pack_artifact({"w": {"kind": "int6", "shape": list(w.shape), "q": q, "scale": s}}, {}, 11)
    return 8 * len(blob) / w.numel()


def test_sdclip_wider_than_absmax_costs_fewer_bits():
    """The entropy of an int6 grid of k row stds is about 6 - log2 k + 1.05 bits, whatever the row's scale."""
    w = torch.randn(256, 640, generator=gen(11))
    absmax, k8, k16 = bits_per_weight(w, None), bits_per_weight(w, 8.0), bits_per_weight(w, 16.0)
    assert k16 < k8 < absmax
    assert k8 - k16 == pytest.approx(1.0, abs=0.25)
    assert bits_per_weight(w * 1e-3, 8.0) == pytest.approx(k8, abs=0.02)


# ---------------------------------------------------------------- GPTQ
def correlated_layer():
    g = gen(4)
    mix = torch.randn(24, 256, generator=g)
    x = torch.randn(4096, 24, generator=g) @ mix + 0.1 * torch.randn(4096, 256, generator=g)
    return torch.randn(64, 256, generator=g), x


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("bits", [6, 8])
def test_gptq_beats_rtn(act_order, bits):
    w, x = correlated_layer()
    clip = w.abs().amax(1)
    q_rtn, s_rtn = quantize_rows(w, bits, clip)
    q_g, s_g = gptq_quantize(w, x.T @ x, bits, clip, act_order=act_order, block_size=64)
    assert torch.equal(s_g, s_rtn) and q_g.dtype == torch.int8
    assert q_g.abs().max() <= 2 ** (bits - 1) - 1

    def out_err(q, s):
        return ((w - dequantize_rows(q, s)) @ x.T).norm().item()

    ratio = out_err(q_g, s_g) / out_err(q_rtn, s_rtn)
    print(f"GPTQ/RTN output error ratio (bits={bits}, act_order={act_order}): {ratio:.3f}")
    assert ratio < 0.8


def test_gptq_dead_inputs_and_singular_hessian():
    w, x = correlated_layer()
    x[:, 10:20] = 0.0  # dead inputs; H is also rank-deficient-ish without damping
    q, s = gptq_quantize(w, x.T @ x, 6, damp=0.0)
    assert (q[:, 10:20] == 0).all() and torch.isfinite(s.float()).all()
    q0, _ = gptq_quantize(w, torch.zeros(256, 256), 6)  # no calibration at all
    assert (q0 == 0).all()
    with pytest.raises(ValueError):
        gptq_quantize(w, torch.full((256, 256), float("nan")), 6)
    with pytest.raises(ValueError):
        gptq_quantize(w, torch.eye(255), 6)


# ---------------------------------------------------------------- container
def sample_entries() -> dict:
    g = gen(5)
    q6, s6 = quantize_rows(torch.randn(48, 80, generator=g), 6)
    q8, s8 = quantize_rows(torch.randn(16, 33, generator=g), 8)
    qe, se = quantize_rows(torch.zeros(0, 8), 6)
    special = torch.tensor([0.0, -0.0, float("inf"), float("nan"), 1e-40, -3.5])
    return {
        "blocks.0.attn.w": {"kind": "int6", "shape": [48, 80], "q": q6, "scale": s6},
        "head.w": {"kind": "int8", "shape": [16, 33], "q": q8, "scale": s8},
        "empty": {"kind": "int6", "shape": [0, 8], "q": qe, "scale": se},
        "norm": {"kind": "fp16", "shape": [7, 5], "data": torch.randn(7, 5, generator=g).half()},
        "special": {"kind": "fp32", "shape": [6], "data": special},
        "scalar": {"kind": "fp32", "shape": [], "data": torch.tensor(2.5)},
        "emb": {"kind": "fp16", "shape": [3, 4], "data": torch.randn(3, 4, generator=g).half()},
    }


META = {"step": 1234, "config": {"d_model": 512, "vocab": 1024}, "note": "ünïcode"}


def bits_of(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_entries_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name]["kind"] == b[name]["kind"] and list(a[name]["shape"]) == b[name]["shape"]
        for key in ("q", "scale", "data"):
            if key in a[name]:
                x, y = a[name][key], b[name][key]
                assert x.dtype == y.dtype and x.shape == y.shape, (name, key)
                assert bits_of(x) == bits_of(y), (name, key)


def reseal(raw: bytes) -> bytes:
    """A valid envelope (magic, version, compressor, checksum) around arbitrary payload bytes, so the
    validation behind the checksum is reachable by the fuzzers."""
    prefix = ARTIFACT_MAGIC + bytes([ARTIFACT_VERSION, BROTLI_ID])
    body = tg.compress_streams(raw, 3)
    return prefix + hashlib.sha256(prefix + body).digest() + body


def payload_of(blob: bytes) -> dict:
    return torch.load(io.BytesIO(tg.decompress_streams(blob[6 + 32:])), weights_only=True)


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("level", LEVELS)
def test_container_roundtrip(level, shuffle):
    entries = sample_entries()
    blob = pack_artifact(entries, META, level, byte_shuffle=shuffle)
    assert blob[:4] == ARTIFACT_MAGIC
    out, meta = unpack_artifact(blob)
    assert meta == META
    assert_entries_equal(entries, out)
    assert payload_of(blob)["byte_shuffle"] is shuffle
    assert pack_artifact(entries, META, level, byte_shuffle=shuffle) == blob   # deterministic bytes


def test_pack_artifact_rejects_inconsistent_entries():
    entries = sample_entries()
    bad = [
        {**entries["norm"], "data": entries["norm"]["data"].float()},  # dtype != kind
        {**entries["norm"], "shape": [7, 6]},
        {**entries["norm"], "kind": "fp8"},
        {**entries["head.w"], "scale": entries["head.w"]["scale"].float()},
        {**entries["blocks.0.attn.w"], "q": entries["head.w"]["q"]},
        {**entries["blocks.0.attn.w"], "q": torch.full((48, 80), 40, dtype=torch.int8)},
    ]
    for entry in bad:
        with pytest.raises(ValueError):
            pack_artifact({"x": entry}, {}, level=1)


def test_compress_helpers():
    data = bytes(range(256)) * 50
    for level in LEVELS:
        assert decompress_bytes(compress_bytes(data, level)) == data
    with pytest.raises(Exception):   # trailing bytes are refused
        decompress_bytes(compress_bytes(data) + b"x")


def small_artifact(level: int) -> bytes:
    g = gen(12)
    q, s = quantize_rows(torch.randn(6, 10, generator=g), 6)
    entries = {"w": {"kind": "int6", "shape": [6, 10], "q": q, "scale": s},
               "g": {"kind": "fp32", "shape": [3], "data": torch.randn(3, generator=g)}}
    return pack_artifact(entries, {"format": "test"}, level)


@pytest.mark.parametrize("level", LEVELS)
def test_every_single_byte_flip_is_detected(level):
    """Each byte of the file, flipped (all 8 bits), is an ArtifactError naming the file: 100%."""
    blob = small_artifact(level)
    for pos in range(len(blob)):
        mutated = bytearray(blob)
        mutated[pos] ^= 0xFF
        with pytest.raises(ArtifactError, match="model.ptz"):
            unpack_artifact(bytes(mutated), "model.ptz")


@pytest.mark.parametrize("level", LEVELS)
def test_random_bit_flips_and_truncation_are_detected(level):
    blob = pack_artifact(sample_entries(), META, level)
    g = gen(6)
    for _ in range(200):
        mutated = bytearray(blob)
        mutated[int(torch.randint(0, len(blob), (1,), generator=g))] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
        with pytest.raises(ArtifactError):
            unpack_artifact(bytes(mutated))
    for cut in sorted(set(torch.linspace(0, len(blob) - 1, 60).long().tolist())):
        with pytest.raises(ArtifactError):
            unpack_artifact(blob[:cut])
    for bad in (b"", b"CGLF", b"XXXX" + blob[4:], blob + b"trailing-garbage"):
        with pytest.raises(ArtifactError):
            unpack_artifact(bad)


PWNED = []


class Evil:
    def __reduce__(self):
        return (PWNED.append, ("executed",))


def test_payload_validation_behind_the_checksum():
    """A correctly sealed but malformed payload is refused, and a pickle inside executes nothing."""
    good = payload_of(pack_artifact(sample_entries(), META, 3))
    unpack_artifact(reseal(saved(good)))   # the resealed original is valid

    def tampered(**changes) -> bytes:
        return reseal(saved({**good, **changes}))

    table = [list(r) for r in good["tensors"]]
    cases = [reseal(pickle.dumps(Evil())), reseal(saved({"meta": {}})), reseal(b"not a zip"),
             tampered(sha256="0" * 64), tampered(q=good["q"][:-1]), tampered(data=torch.cat([good["data"], good["data"][:1]])),
             tampered(tensors=table + [table[0]]), tampered(tensors=[[n, "pickle", sh] for n, _, sh in table]),
             tampered(tensors=[[n, k, [10**6, 10**6]] for n, k, _ in table]), reseal(saved({**good, "meta": Evil()}))]
    for blob in cases:
        with pytest.raises(ArtifactError):
            unpack_artifact(blob)
    assert PWNED == []


# ---------------------------------------------------------------- pruning
def prune_entries() -> dict:
    g = gen(7)
    out = {}
    for i, shape in enumerate([(96, 256), (64, 192)]):
        q, s = quantize_rows(torch.randn(*shape, generator=g) * (1 + i), 6)
        out[f"w{i}"] = {"kind": "int6", "shape": list(shape), "q": q, "scale": s}
    out["norm"] = {"kind": "fp16", "shape": [256], "data": torch.randn(256, generator=g).half()}
    return out


def zero_all_pm1(entries: dict) -> dict:
    return {n: ({**e, "q": torch.where(e["q"].abs() == 1, 0, e["q"]).to(torch.int8)}
                if "q" in e else e) for n, e in entries.items()}


PRUNE_HP = Hyperparameters(compress_level=9)


def test_prune_to_fit_zeroes_the_cheapest_pm1_values():
    entries = prune_entries()
    before = {n: e["q"].clone() for n, e in entries.items() if "q" in e}
    full = len(pack_artifact(entries, META, 9))
    floor = len(pack_artifact(zero_all_pm1(entries), META, 9))
    assert floor < full
    budget = (full + floor) // 2
    new, changed, blob = prune_to_fit(entries, META, PRUNE_HP, budget, DistInfo())
    assert len(blob) <= budget and blob == pack_artifact(new, META, 9)
    diff, zeroed, kept = 0, [], []
    for n, q0 in before.items():
        assert torch.equal(entries[n]["q"], q0)  # input untouched
        d = new[n]["q"] != q0
        diff += int(d.sum())
        assert (q0[d].abs() == 1).all() and (new[n]["q"][d] == 0).all()
        cost = entries[n]["scale"].float()[:, None].square().expand_as(q0)
        zeroed.append(cost[d])
        kept.append(cost[new[n]["q"].abs() == 1])
    assert changed == diff > 0
    assert torch.cat(zeroed).max() <= torch.cat(kept).min()   # cheapest first


def test_prune_noop_and_impossible():
    entries = prune_entries()
    full = len(pack_artifact(entries, META, 9))
    new, changed, blob = prune_to_fit(entries, META, PRUNE_HP, full, DistInfo())
    assert changed == 0 and len(blob) == full
    floor = len(pack_artifact(zero_all_pm1(entries), META, 9))
    with pytest.raises(ArtifactTooLarge, match="SIZE_LIMIT"):
        prune_to_fit(entries, META, PRUNE_HP, floor - 100, DistInfo())


def test_a_one_row_slice_of_a_strided_tensor_packs():
    """The byte-model sample takes every n-th row; a 4-row LQER factor then becomes one row with stride n."""
    entries = {"b": {"kind": "int4", "shape": [1, 8], "q": torch.ones(34, 8, dtype=torch.int8)[::34],
                     "scale": torch.ones(34, dtype=torch.float16)[::34]}}
    out, _ = unpack_artifact(pack_artifact(entries, META, 1))
    assert out["b"]["q"].tolist() == [[1] * 8] and out["b"]["scale"].tolist() == [1.0]


def test_streams_roundtrip_and_refuse_a_changed_layout():
    data = bytes(range(256)) * 1000 + b"tail"
    body = tg.compress_streams(data, 5)
    assert tg.decompress_streams(body) == data and tg.decompress_streams(tg.compress_streams(b"", 5)) == b""
    for bad in (body[:-1], body + b"x", body[4:], b""):
        with pytest.raises(Exception):
            tg.decompress_streams(bad)


PACK_WORKER = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import train_gpt as tg
dist.init_process_group("gloo")
rank, compressed, real = dist.get_rank(), [], tg.compress_bytes
tg.compress_bytes = lambda data, level=11: compressed.append(len(data)) or real(data, level)
entries = torch.load(sys.argv[2], weights_only=True)
blob = tg.pack_artifact(entries, {"format": "test"}, 5, True, tg.DistInfo(rank, 2, rank))
open(f"{sys.argv[3]}/rank{rank}.bin", "wb").write(blob)
json.dump(compressed, open(f"{sys.argv[3]}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_two_ranks_share_the_pack_and_rank_0_gets_the_one_ranks_bytes(tmp_path):
    """The export's brotli packing is spread over the ranks (each compresses its pieces of the payload, rank 0
    joins them): on 8 GPUs a pack takes an eighth of one core's ~60 s, and the artifact's bytes are the same
    for any number of them."""
    entries = sample_entries()
    torch.save(entries, tmp_path / "entries.pt")
    (tmp_path / "worker.py").write_text(PACK_WORKER)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(tmp_path / "worker.py"), str(ROOT), str(tmp_path / "entries.pt"), str(tmp_path)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one = pack_artifact(entries, {"format": "test"}, 5)
    assert (tmp_path / "rank0.bin").read_bytes() == one and (tmp_path / "rank1.bin").read_bytes() == b""
    shares = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(s) for s in shares] == [tg.PACK_STREAMS // 2] * 2   # each rank its half of the pieces
    assert abs(sum(shares[0]) - sum(shares[1])) <= tg.PACK_STREAMS
    assert unpack_artifact(one)[1] == {"format": "test"}
