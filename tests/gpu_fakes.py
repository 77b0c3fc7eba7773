"""Stand-ins for GPU-only code that are as strict as the GPU: they refuse what the GPU refuses.

FlashAttention 3 (`flash_attn_interface.flash_attn_func`) is a custom op with kernels for CUDA alone: called with
CPU tensors it raises NotImplementedError from the dispatcher. A numeric fake that computes on CPU hides every
path that sends it a CPU tensor (issue 40: DDP's unused-parameter probe ran the model on the CPU with FA3 and
killed every multi-GPU run before step 1). `fa3_module()` is the strict stand-in; a test that must compute on
CPU uses a numeric fake and says so.
"""
import types

import torch
import torch.nn.functional as F

_LIB = torch.library.Library("golf_test", "DEF")   # one definition a process: this module is imported once
_LIB.define("fa3(Tensor q, Tensor k, Tensor v, bool causal) -> Tensor")


def _fa3_cuda(q, k, v, causal):
    """What FA3 computes, [B, T, H, D] with GQA; registered for the CUDA dispatch key only."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, enable_gqa=q.size(2) != k.size(2))
    return out.transpose(1, 2).contiguous()


_LIB.impl("fa3", _fa3_cuda, "CUDA")


@torch.library.register_fake("golf_test::fa3", lib=_LIB)
def _fa3_shape(q, k, v, causal):
    """Shapes for tracing (Dynamo, meta tensors), as the real op has; no kernel runs."""
    return torch.empty_like(q)


def fa3_op(q, k, v, causal):
    return torch.ops.golf_test.fa3(q, k, v, causal)


def fa3_module(returns_tuple: bool = False) -> types.ModuleType:
    """A `flash_attn_interface` module whose flash_attn_func(q, k, v, causal=True) takes FA3's [B, T, H, D]
    layout and returns out, or (out, softmax_lse) as some releases do. On a CPU tensor it raises
    NotImplementedError, as the real one does."""
    module = types.ModuleType("flash_attn_interface")

    def flash_attn_func(q, k, v, causal=False):
        out = fa3_op(q, k, v, causal)
        return (out, out.new_zeros(q.shape[:3]).float()) if returns_tuple else out

    module.flash_attn_func = flash_attn_func
    return module
