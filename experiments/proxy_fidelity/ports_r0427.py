"""CPU port of the 2026-04-27 record (SP8192 LQER SparseGate BOS-SmearFix 9-hparam stack, 1.0611).

Loaded by port.py as the `extra` module of the "r0427" entry. What it does to the record's code:

- MODULES fakes `triton` (its kernels are defined but never launched here; under a private name the
  script's imports are patched to) and `flash_attn_interface` (dense FA3 via port.sdpa_flash_attn,
  varlen FA3 via SDPA per document segment).
- PATCHES route the fused LeakyReLU^2 matmul kernel to the same maths in torch, replace the CUDA side
  stream of the optimizer step by plain sequential steps, drop pinned memory, give the plain (non-CaseOps)
  validation set a per-token byte budget from the SentencePiece LUTs (the script's eval reads only a
  byte sidecar). (GPTQ's 65,536-value passthrough threshold is scaled with the width by port.py itself.)
- ENV is the pod run's configuration (README / train_seed42.log), minus what this machine cannot do:
  fused softcapped CE off (its own eager path, same maths), CaseOps off (sp1024 + LUT bytes), TTT off,
  brotli instead of the lrzip per-group compressor (size only; the scored weights are the same).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

import port

# ---------------------------------------------------------------------------------------------- triton


class _Placeholder:
    """Stands for any triton attribute used at definition time (dtypes, constexpr annotations)."""

    def __init__(self, name: str):
        self._name = name

    def __repr__(self):
        return f"<fake triton {self._name}>"

    def __call__(self, *a, **k):
        raise RuntimeError(f"triton is not available on this machine: {self._name} was called")


def _fake_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    def lookup(attr):   # PEP 562: unknown public names resolve to placeholders; dunders stay absent
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{name}.{attr}")
    mod.__getattr__ = lookup
    return mod


def _jit(fn=None, **_):
    """triton.jit: the kernel stays a plain function; launching it (kernel[grid](...)) fails loudly."""
    return fn if fn is not None else (lambda f: f)


class _TensorDescriptor:
    @staticmethod
    def from_tensor(*a, **k):
        raise RuntimeError("triton TensorDescriptor is not available on this machine")


_tl = _fake_module("triton.language", constexpr=_Placeholder("triton.language.constexpr"))
_td = _fake_module("triton.tools.tensor_descriptor", TensorDescriptor=_TensorDescriptor)
_tools = _fake_module("triton.tools", tensor_descriptor=_td)
_triton = _fake_module("triton", jit=_jit, language=_tl, tools=_tools,
                       cdiv=lambda a, b: (a + b - 1) // b)

# ------------------------------------------------------------------------------------ flash attention


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    """FA3's packed varlen layout: q [T, H, D], k/v [T, Hkv, D], documents delimited by cu_seqlens.

    Each segment [cu[i], cu[i+1]) attends only within itself (causally if asked), computed by SDPA one
    segment at a time; empty segments (the bucket padding repeats the total length) are skipped.
    Rows past cu[-1] get zeros (FA3 leaves them undefined; the record always ends cu at T)."""
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"flash_attn_varlen_func: window_size={window_size}")
    bounds = cu_seqlens_q.tolist()
    if cu_seqlens_k is not cu_seqlens_q and cu_seqlens_k.tolist() != bounds:
        raise NotImplementedError("flash_attn_varlen_func: different q and k segments")
    gqa = k.shape[1] != q.shape[1]
    pieces = []
    end = 0
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop <= start:
            continue
        if start != end:
            raise ValueError(f"flash_attn_varlen_func: cu_seqlens not contiguous at {start}")
        qs, ks, vs = (t[start:stop].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale,
                                           enable_gqa=gqa)
        pieces.append(y[0].transpose(0, 1))
        end = stop
    if end < q.shape[0]:
        pieces.append(q.new_zeros((q.shape[0] - end, *q.shape[1:])))
    return torch.cat(pieces, dim=0)


_fa = types.ModuleType("flash_attn_interface")
_fa.flash_attn_func = port.sdpa_flash_attn
_fa.flash_attn_varlen_func = flash_attn_varlen_func

# The fake triton goes in under private names the script's imports are patched to (PATCHES): a module named
# "triton" in sys.modules makes torch (torch._dynamo -> torch._inductor's has_triton_package) believe triton
# is installed and import triton.backends, which fails.
MODULES = {
    "_port_fake_triton": _triton,
    "_port_fake_triton.language": _tl,
    "_port_fake_triton.tools": _tools,
    "_port_fake_triton.tools.tensor_descriptor": _td,
    "flash_attn_interface": _fa,
}

# -------------------------------------------------------------------------------------------- patches

PATCHES = (
    # triton from the fakes in MODULES (see there why not under its own name).
    ("import triton\nimport triton.language as tl\nfrom triton.tools.tensor_descriptor import TensorDescriptor\n",
     "import _port_fake_triton as triton\nimport _port_fake_triton.language as tl\n"
     "from _port_fake_triton.tools.tensor_descriptor import TensorDescriptor\n"),
    # The fused LeakyReLU(0.5)^2 matmul kernel (forward: pre = a @ b.T and post = leaky(pre)^2; backward:
    # a @ b.T times d(post)/d(pre) read from the saved pre) as torch ops; its autograd.Function is unchanged.
    ("def linear_leaky_relu_square(a, b, aux=None):\n",
     "def _port_linear_leaky_relu_square(a, b, aux=None):\n"
     "    c = a @ b.T\n"
     "    if aux is None:\n"
     "        return c, F.leaky_relu(c, negative_slope=0.5).square()\n"
     "    return c * torch.where(aux > 0, 2.0 * aux, 0.5 * aux)\n"
     "\n\n"
     "def linear_leaky_relu_square(a, b, aux=None):\n"
     "    return _port_linear_leaky_relu_square(a, b, aux)\n"),
    # The optimizer step overlaps the Adam steps on a CUDA side stream with Muon; here they run in turn.
    ("self._aux_stream = torch.cuda.Stream()", "self._aux_stream = None"),
    ("        self._aux_stream.wait_stream(torch.cuda.current_stream())\n"
     "        with torch.cuda.stream(self._aux_stream):\n"
     "            self.optimizer_tok.step()\n"
     "            self.optimizer_scalar.step()\n"
     "        self.optimizer_muon.step()\n"
     "        torch.cuda.current_stream().wait_stream(self._aux_stream)\n",
     "        self.optimizer_tok.step()\n"
     "        self.optimizer_scalar.step()\n"
     "        self.optimizer_muon.step()\n"),
    # Pinned host memory needs an accelerator.
    ("pin_memory=True", "pin_memory=False"),
    ("        cu_seqlens = cu_seqlens.pin_memory()\n", ""),
    # eval_val reads each target's byte count from the CaseOps sidecar only. Without CaseOps, build that
    # per-token array from the LUTs the script already made: bytes(y) + leading space unless prev is a
    # boundary -- the same count as the script's own LUT path (_accumulate_bpb).
    ("        self.val_bytes = None\n        if self.caseops_enabled:\n",
     "        self.val_bytes = None\n"
     "        if not self.caseops_enabled:\n"
     "            _tok = self.val_tokens.to(torch.int64)\n"
     "            _nb = self.base_bytes_lut[_tok].to(torch.int32)\n"
     "            _nb[1:] += (self.has_leading_space_lut[_tok[1:]]\n"
     "                        & ~self.is_boundary_token_lut[_tok[:-1]]).to(torch.int32)\n"
     "            self.val_bytes = _nb\n"
     "        if self.caseops_enabled:\n"),
)

# ------------------------------------------------------------------------------------------------ env

# The pod run's settings (README's command, train_seed42.log's hyperparameters) where they differ from
# the script's defaults, and what this machine changes; port.py adds them to SCRIPTS["r0427"].env.
ENV = {
    "CASEOPS_ENABLED": "0", "FUSED_CE_ENABLED": "0", "TTT_ENABLED": "0", "COMPRESSOR": "brotli",
    "SMEAR_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_SCALE": "0.5",
    "GATE_WINDOW": "12", "GATED_ATTN_QUANT_GATE": "1", "EMBED_BITS": "7", "MIN_LR": "0.1",
    "MATRIX_LR": "0.026", "WARMDOWN_FRAC": "0.85", "BETA2": "0.99", "GRAD_CLIP_NORM": "0.3",
    "MUON_BACKEND_STEPS": "5", "MLP_CLIP_SIGMAS": "11.5", "ATTN_CLIP_SIGMAS": "13.0",
    "EMBED_CLIP_SIGMAS": "14.0", "GPTQ_CALIBRATION_BATCHES": "16", "LQER_ENABLED": "1",
    "LQER_ASYM_ENABLED": "1", "LQER_RANK": "4", "LQER_FACTOR_BITS": "4", "LQER_ASYM_GROUP": "64",
    "LQER_TOP_K": "3",
}
