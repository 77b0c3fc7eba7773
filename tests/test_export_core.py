import json
import math
import pickle
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st

from train_gpt import (
    ARTIFACT_MAGIC, ARTIFACT_VERSION, COMPRESSOR_IDS, ArtifactError, compress_bytes,
    decompress_bytes, dequantize_rows, gptq_quantize, pack_artifact, pack_int6, prune_to_fit,
    quantize_rows, row_clip, unpack_artifact, unpack_int6,
)

COMPRESSORS = ["zstd", "brotli", "lzma"]


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


def test_row_clip_modes():
    w = awkward_matrix(2)
    absmax = w.abs().amax(1)
    assert torch.equal(row_clip(w, 6, "absmax"), absmax)
    std_clip = row_clip(w, 6, "std", std_k=2.0)
    assert (std_clip <= absmax).all() and (std_clip[absmax > 0] > 0).all()
    search = row_clip(w, 6, "search")
    assert (search <= absmax).all() and (search >= 0.5 * absmax - 1e-6).all()

    def row_mse(clip):
        q, s = quantize_rows(w, 6, clip)
        return (dequantize_rows(q, s) - w).square().sum(1)

    assert (row_mse(search) <= row_mse(absmax) + 1e-9).all()
    with pytest.raises(ValueError):
        row_clip(w, 6, "bogus")


# ---------------------------------------------------------------- int6 packing
@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.integers(-32, 31), min_size=0, max_size=300))
def test_pack_int6_roundtrip(values):
    q = torch.tensor(values, dtype=torch.int8)
    data = pack_int6(q)
    assert len(data) == math.ceil(len(values) / 4) * 3
    out = unpack_int6(data, len(values))
    assert out.dtype == torch.int8 and out.tolist() == values
    assert pack_int6(out) == data


@pytest.mark.parametrize("shape", [(0,), (1,), (5,), (7, 9), (3, 4, 5), (1023,)])
def test_pack_int6_shapes(shape):
    q = torch.randint(-32, 32, shape, generator=gen(3), dtype=torch.int8)
    out = unpack_int6(pack_int6(q), q.numel())
    assert torch.equal(out, q.reshape(-1))


def test_pack_int6_rejects():
    for bad in ([32], [-33], [0, 1, 100]):
        with pytest.raises(ValueError):
            pack_int6(torch.tensor(bad, dtype=torch.int16))
    with pytest.raises(ValueError):
        pack_int6(torch.zeros(4))
    with pytest.raises(ValueError):
        unpack_int6(b"\x00" * 4, 4)


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
    clip = row_clip(w, bits, "absmax")
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
        "emb": {"kind": "bf16", "shape": [3, 4], "data": torch.randn(3, 4, generator=g).bfloat16()},
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


def split_blob(blob: bytes) -> tuple[str, dict, bytes]:
    comp = {v: k for k, v in COMPRESSOR_IDS.items()}[blob[5]]
    payload = decompress_bytes(blob[6:], comp)
    hlen = struct.unpack_from("<I", payload)[0]
    return comp, json.loads(payload[4: 4 + hlen]), payload[4 + hlen:]


def build_blob(comp: str, header_bytes: bytes, data: bytes) -> bytes:
    payload = struct.pack("<I", len(header_bytes)) + header_bytes + data
    prefix = ARTIFACT_MAGIC + bytes([ARTIFACT_VERSION, COMPRESSOR_IDS[comp]])
    return prefix + compress_bytes(payload, comp, None)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("comp", COMPRESSORS)
def test_container_roundtrip(comp, shuffle):
    entries = sample_entries()
    blob = pack_artifact(entries, META, comp, byte_shuffle=shuffle)
    assert blob[:4] == ARTIFACT_MAGIC
    out, meta = unpack_artifact(blob)
    assert meta == META
    assert_entries_equal(entries, out)
    assert split_blob(blob)[1]["byte_shuffle"] is shuffle


def test_container_int6_bitpack_roundtrip():
    entries = sample_entries()
    blob = pack_artifact(entries, META, "zstd", level=3, int6_bitpack=True)
    assert_entries_equal(entries, unpack_artifact(blob)[0])


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
            pack_artifact({"x": entry}, {}, "zstd", level=1)
    with pytest.raises(ValueError):
        pack_artifact(entries, {"bad": object()}, "zstd", level=1)
    with pytest.raises(ValueError):
        pack_artifact(entries, {}, "gzip")


def test_compress_helpers():
    data = bytes(range(256)) * 50
    for comp in COMPRESSORS:
        assert decompress_bytes(compress_bytes(data, comp, None), comp) == data
        assert decompress_bytes(compress_bytes(data, comp, 1), comp) == data
    with pytest.raises(ValueError):
        compress_bytes(data, "gzip", None)


@pytest.mark.parametrize("comp", COMPRESSORS)
def test_container_truncation_and_bitflips(comp):
    blob = pack_artifact(sample_entries(), META, comp, level=None)
    for cut in sorted(set(torch.linspace(0, len(blob) - 1, 80).long().tolist())):
        with pytest.raises(ArtifactError):
            unpack_artifact(blob[:cut])
    g = gen(6)
    for _ in range(150):
        mutated = bytearray(blob)
        for pos in torch.randint(0, len(blob), (int(torch.randint(1, 4, (1,), generator=g)),),
                                 generator=g).tolist():
            mutated[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
        try:
            unpack_artifact(bytes(mutated))
        except ArtifactError:
            pass
    for bad in (b"", b"CGLF", b"XXXX\x01\x01" + blob[6:], blob[:4] + b"\x09" + blob[5:],
                blob[:5] + b"\x07" + blob[6:], blob + b"trailing-garbage"):
        with pytest.raises(ArtifactError):
            unpack_artifact(bad)


def test_container_payload_fuzz():
    """Corrupt the *decompressed* payload, so the header/table validation itself is fuzzed."""
    comp, header, data = split_blob(pack_artifact(sample_entries(), META, "zstd", level=1))
    payload = struct.pack("<I", 0) + json.dumps(header).encode() + data
    payload = struct.pack("<I", len(payload) - 4 - len(data)) + payload[4:]
    rebuild = lambda p: ARTIFACT_MAGIC + bytes([ARTIFACT_VERSION, 1]) + compress_bytes(p, comp, 1)
    hend = len(payload) - len(data)
    for cut in range(0, len(payload), 7):
        with pytest.raises(ArtifactError):
            unpack_artifact(rebuild(payload[:cut]))
    g = gen(10)
    for _ in range(400):
        p = bytearray(payload)
        pos = int(torch.randint(0, hend + 16, (1,), generator=g))
        p[pos] = int(torch.randint(0, 256, (1,), generator=g))
        try:
            unpack_artifact(rebuild(bytes(p)))
        except ArtifactError:
            pass


PWNED = []


class Evil:
    def __reduce__(self):
        return (PWNED.append, ("executed",))


def test_tampered_header_executes_nothing():
    blob = pack_artifact(sample_entries(), META, "zstd", level=3)
    comp, header, data = split_blob(blob)

    def load(hdr) -> None:
        raw = hdr if isinstance(hdr, bytes) else json.dumps(hdr).encode()
        unpack_artifact(build_blob(comp, raw, data))

    def tamper(fn) -> dict:
        h = json.loads(json.dumps(header))
        fn(h)
        return h

    def rec(h, name):
        return next(r for r in h["tensors"] if r["name"] == name)

    load(header)  # the rebuilt blob itself is valid
    evil_cases = [
        pickle.dumps(Evil()),
        pickle.dumps({"meta": Evil()}),
        b"\xff\xfe not utf8",
        b"[" * 100_000 + b"]" * 100_000,
        b"[1, 2, 3]",
        tamper(lambda h: rec(h, "head.w").update(shape=[10**12, 10**12])),
        tamper(lambda h: rec(h, "head.w").update(shape=[16, -33])),
        tamper(lambda h: rec(h, "head.w").update(shape=[16.0, 33])),
        tamper(lambda h: rec(h, "head.w").update(shape=[True, 528])),
        tamper(lambda h: rec(h, "head.w").update(kind="pickle")),
        tamper(lambda h: rec(h, "norm")["parts"].update(data=[len(data), 70])),
        tamper(lambda h: rec(h, "norm")["parts"].update(data=[-5, 70])),
        tamper(lambda h: rec(h, "norm")["parts"].update(data=[0, 71])),
        tamper(lambda h: rec(h, "norm")["parts"].update(data="0:70")),
        tamper(lambda h: rec(h, "head.w")["parts"].pop("scale")),
        tamper(lambda h: h["tensors"].append(h["tensors"][0])),
        tamper(lambda h: h.pop("meta")),
        tamper(lambda h: h.update(byte_shuffle="yes")),
        tamper(lambda h: h.update(tensors={"a": 1})),
        tamper(lambda h: h["tensors"].append("not a record")),
    ]
    for hdr in evil_cases:
        with pytest.raises(ArtifactError):
            load(hdr)
    # int6 storage holding a value outside [-32, 31]
    q_off = rec(header, "blocks.0.attn.w")["parts"]["q"][0]
    with pytest.raises(ArtifactError):
        unpack_artifact(build_blob(comp, json.dumps(header).encode(),
                                   data[:q_off] + b"\x64" + data[q_off + 1:]))
    with pytest.raises(ArtifactError):  # header length field pointing past the payload
        unpack_artifact(ARTIFACT_MAGIC + bytes([ARTIFACT_VERSION, 1])
                        + compress_bytes(struct.pack("<I", 2**31) + b"{}", "zstd", 3))
    # Pickle bytes smuggled as a JSON string stay inert data.
    sneaky = tamper(lambda h: h["meta"].update(payload=pickle.dumps(Evil()).decode("latin-1")))
    _, meta = unpack_artifact(build_blob(comp, json.dumps(sneaky).encode(), data))
    assert isinstance(meta["payload"], str)
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


@pytest.mark.parametrize("comp,level,use_cost", [("zstd", 19, False), ("zstd", 22, True),
                                                 ("lzma", None, False)])
def test_prune_to_fit(comp, level, use_cost):
    entries = prune_entries()
    before = {n: e["q"].clone() for n, e in entries.items() if "q" in e}
    full = len(pack_artifact(entries, META, comp, level))
    floor = len(pack_artifact(zero_all_pm1(entries), META, comp, level))
    assert floor < full
    budget = (full + floor) // 2
    cost = None
    if use_cost:
        cost = {n: torch.rand(e["q"].shape[1], generator=gen(8)) + 0.1
                for n, e in entries.items() if "q" in e}
    new, changed, blob = prune_to_fit(entries, META, comp, level, True, budget, cost)
    size = len(blob)
    assert size <= budget and size == len(pack_artifact(new, META, comp, level))
    diff = 0
    for n, q0 in before.items():
        assert torch.equal(entries[n]["q"], q0)  # input untouched
        d = new[n]["q"] != q0
        diff += int(d.sum())
        assert (q0[d].abs() == 1).all() and (new[n]["q"][d] == 0).all()
        assert torch.equal(new[n]["scale"], entries[n]["scale"])
    assert changed == diff > 0
    assert new["norm"] is entries["norm"]
    if use_cost:  # cheapest first: every zeroed value costs <= every surviving +-1
        zeroed, kept = [], []
        for n, q0 in before.items():
            c = entries[n]["scale"].float()[:, None] ** 2 * cost[n][None, :]
            zeroed.append(c[new[n]["q"] != q0])
            kept.append(c[new[n]["q"].abs() == 1])
        assert torch.cat(zeroed).max() <= torch.cat(kept).min()


def test_prune_noop_and_impossible():
    entries = prune_entries()
    full = len(pack_artifact(entries, META, "zstd", 19))
    new, changed, blob = prune_to_fit(entries, META, "zstd", 19, True, full)
    size = len(blob)
    assert changed == 0 and size == full and all(new[n] is entries[n] for n in entries)
    floor = len(pack_artifact(zero_all_pm1(entries), META, "zstd", 19))
    with pytest.raises(ValueError, match=f"{100} bytes over"):
        prune_to_fit(entries, META, "zstd", 19, True, floor - 100)


@pytest.mark.parametrize("margin", [-0.2, 0.2])
def test_prune_survives_a_bad_size_proxy(margin):
    """A negative margin makes the fast proxy over-optimistic, exercising the step-up path."""
    entries = prune_entries()
    full = len(pack_artifact(entries, META, "zstd", 19))
    floor = len(pack_artifact(zero_all_pm1(entries), META, "zstd", 19))
    budget = (full + floor) // 2
    new, changed, blob = prune_to_fit(entries, META, "zstd", 19, False, budget, margin=margin)
    size = len(blob)
    assert 0 < changed and size <= budget
    assert size == len(pack_artifact(new, META, "zstd", 19, byte_shuffle=False))


# ---------------------------------------------------------------- compression sanity
@pytest.mark.parametrize("bitpack", [False, True])
def test_int6_gaussian_compresses_below_075_bytes_per_value(bitpack):
    w = torch.randn(512, 2048, generator=gen(9))
    q, s = quantize_rows(w, 6)
    entries = {"w": {"kind": "int6", "shape": [512, 2048], "q": q, "scale": s}}
    blob = pack_artifact(entries, {}, "zstd", 22, int6_bitpack=bitpack)
    bpv = len(blob) / q.numel()
    print(f"int6 gaussian, zstd-22, bitpack={bitpack}: {bpv:.4f} bytes/value")
    assert bpv < 0.75
