"""The pod's bill for a config, without a pod or data: `DRY_RUN=1 bash run.sh` runs this (any knob of
train_gpt.py may be set alongside it: `DRY_RUN=1 MODEL_DIM=512 bash run.sh`).

    python experiments/cost_model.py [--gpus 8]

It prints unique parameters, effective depth, the SDClip k the cap implies and the artifact bytes it predicts
(SDClip's fit on Gaussian rows, scaled to trained rows by one real artifact, the packed script counted), the
relative quantization MSE, training FLOPs per token (torch's flop counter on the meta device, causal attention
added by hand), projected ms/step and steps in the budget on N H100s, the sliding-eval, TTT and export seconds
(a warning when the evaluation would exceed its 600 s), and each GPU's peak memory in training and in the LoRA
TTT pass (memory_census: the saved-for-backward census at CUDA's autocast dtypes, plus weights, optimizer
state and a loss chunk; an `error:` line past 72 GiB, 90% of the card).

A step costs FLOPs / (GPUs * peak * POD_MFU) + POD_STEP_OVERHEAD_S (optimizer, collectives, launches, and the
memory-bound work the FLOPs miss). The two constants are the least-squares fit (relative error) to six measured
8xH100 step times (tests/test_cost_model.py refits them and checks each): the upstream baseline (9 x 512,
524,288 tokens a step, 43.5 ms), the seeds' 4 flat + 2 crawler x 2 at dim 640 (786,432 tokens, 78-85 ms), and
the 2026-04-05 and 2026-04-27 records with their loops off and on (101.8/140.0 and 95.9/141.7 ms, from their
logs' tok/s before the switch and the train_time after it). The records' code runs at a lower MFU than the
seeds' at the same FLOPs (96-102 ms against 78-85), which one line cannot follow: the fit sits within 13% of
every record anchor and 18% over the seeds' stack, and projects the records' mean step within 10%.
pod_ms_per_step is that mean over the run: a loop schedule switches by wallclock fraction (as train_gpt.py
does under MAX_WALLCLOCK_SECONDS), so each stage buys its share of the clock at its own step time.
experiments/ablate.py uses `budget_steps` to turn a FLOP budget (TRAIN_TFLOPS) into ITERATIONS.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

H100_BF16_FLOPS, POD_MFU, POD_STEP_OVERHEAD_S = 989e12, 0.3764, 0.01846
FINEWEB_VAL_TOKENS = 62_000_000   # the first 50,000 validation documents at sp1024 (40,540,160 at sp8192)
VAL_TOKENS = {1024: FINEWEB_VAL_TOKENS, 8192: 40_540_160}   # the records' logs; others: sp1024's (more)
# The evaluation runs far below training's MFU. Sliding windows (stride 64): the 2026-04-06 and -09 records'
# logs measured 83.6 and 121.2 s where their FLOPs at 100% take 20.7 and 23.3 s (0.248, 0.192): 0.22. Their
# score-first TTT (3 epochs, chunks of 32,768 tokens, 3,714 steps of 16 sequences) trained for 209.8 and 246.9 s
# beyond the scoring, where the FLOPs take 6.07 and 6.83 s: 0.0289 and 0.0277 of peak, 0.0283 (small steps,
# an all-reduce of every weight each). tests/test_cost_model.py checks both records within 10%.
EVAL_MFU, TTT_MFU = 0.22, 0.0283
# TTT=lora: the 2026-04-27 record's per-document LoRA pass took 424.4 s (508.8 s of phased TTT less its three
# global SGD phases, 16.6 + 29.8 + 38.0 s by its ttpp/ttpr lines) for 47,851,520 val tokens: 158 times the
# seconds its training FLOPs at the val tokens take at 100% (windows re-read as they slide by 48-token chunks).
# Out of sample, the 2026-04-10 record's LoRA pass (338.2 s, 40,540,160 tokens, 32-token chunks) is projected
# within 7% (tests/test_cost_model.py). Its phases trained 20.9M tokens (639 chunks of 32,768) in 84.4 s: 1.39%
# of peak (the 2026-04-13 record's one phase: 49.8 s measured, 28 s projected). Both rates are the records'
# compiled code: this script's LoRA pass runs eagerly (experiments/LOG.md, issue 24), so they are a lower bound.
LORA_TTT_RATE, PHASE_MFU, VAL_DOCS = 158.0, 0.0139, 50_000
# Trained rows compress better than Gaussian ones at the same SDClip k (heavier tails: more values near 0). One
# real artifact sets the ratio: the 2026-04-05 record (k 12.85 matrices, 20 for its int8 GPTQ'd embedding, sp8192)
# packed 15,970,162 model bytes (mean of its 5 logs); at its knobs (tests/test_cost_model.py) the Gaussian rows
# give 16,658,992. Out of sample: 2026-04-09 (3 looped layers, parallel residuals) within 0.1%; 2026-04-27
# (int7 embedding, per-role clips, LQER, its own per-group compressor) +2.0%.
TRAINED_OVER_GAUSSIAN = 15_970_162 / 16_658_992
TOOL_VARS = ("DRY_RUN", "POD_GPUS")   # this tool's own variables, never train_gpt.py's knobs


def meta_model(hp: tg.Hyperparameters) -> tg.CrawlerGPT:
    """The model on the meta device, attention replaced by a stand-in: the flop counter sees the linear maps,
    and the T^2 attention matmuls are added by hand (causal: half the scores)."""
    with torch.device("meta"):
        return tg.CrawlerGPT(hp)


def counted_attention(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    return q + 0 * (k.mean() + v.mean())   # k and v stay in the graph


def flops_per_token(hp: tg.Hyperparameters, seq_len: int, train: bool = True, loops: int | None = None) -> float:
    """Training (forward + backward) or forward FLOPs per token; FlashAttention's backward at 2.5x its forward."""
    model, real = meta_model(hp), tg.causal_attention
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    tg.causal_attention = counted_attention
    try:
        with counter:
            loss = model(ids, ids, loops=loops)
            if train:
                loss.backward()
    finally:
        tg.causal_attention = real
    depth = hp.effective_depth - hp.num_crawler_layers * (hp.crawler_loops - (loops or hp.crawler_loops))
    return counter.get_total_flops() / seq_len + depth * 2 * seq_len * hp.model_dim * (3.5 if train else 1.0)


def schedule_stages(hp: tg.Hyperparameters, cost) -> list[tuple[float, float]]:
    """(share of training, mean cost a step) per stage of the loop schedule, `cost(loops)` a step's cost at
    that many crawler loops; a cadence's beats (one full step, then cadence - 1 one-loop steps) are averaged."""
    schedule = hp.loops_schedule()
    at = {n: cost(n) for n in {1, *(n for _, n in schedule)}}
    ends = [f for f, _ in schedule[1:]] + [1.0]
    return [(end - start, (at[n] + (hp.crawler_cadence - 1) * at[1]) / hp.crawler_cadence)
            for (start, n), end in zip(schedule, ends)]


def budget_steps(hp: tg.Hyperparameters, tflops: float) -> int:
    """The steps `tflops` buy at this config's mean FLOPs a step (a cadence's or a loop schedule's cheaper
    steps buy more): a stopping rule that charges each arm its own FLOPs without a clock's noise."""
    stages = schedule_stages(hp, lambda n: flops_per_token(hp, hp.train_seq_len, loops=n))
    return max(1, int(tflops * 1e12 / (sum(share * f for share, f in stages) * hp.train_batch_tokens)))


def step_seconds(hp: tg.Hyperparameters, gpus: int = 8, loops: int | None = None) -> float:
    """One step on the pod at `loops` crawler loops (default: all of them)."""
    flops = flops_per_token(hp, hp.train_seq_len, loops=loops)
    return flops * hp.train_batch_tokens / (gpus * H100_BF16_FLOPS * POD_MFU) + POD_STEP_OVERHEAD_S


def mean_step_seconds(hp: tg.Hyperparameters, gpus: int = 8) -> float:
    """The run's mean step: the schedule's stages weighted by the wallclock they get under
    MAX_WALLCLOCK_SECONDS (a stage's steps are its share of the time over its step), or by their share of
    ITERATIONS without it."""
    stages = schedule_stages(hp, lambda n: step_seconds(hp, gpus, n))
    if hp.train_time_cap:
        return 1 / sum(share / s for share, s in stages)
    return sum(share * s for share, s in stages)


# What CUDA's bf16 autocast does to the ops this model calls, emulated on any device (autocast itself acts
# only on CUDA tensors), wherever CUDA's autocast is on (train_gpt.rms_norm turns it off around F.rms_norm):
# torch's lower-precision list for CUDA (matmuls, linear, SDPA: inputs cast to bf16) and its fp32 list (norms,
# softmax and log_softmax, the losses, exp/log/pow/rsqrt: inputs cast to fp32), the ops this model reaches.
# CPU's autocast differs: it keeps F.rms_norm, softmax and log_softmax in bf16 (train_gpt.py runs the CPU
# without autocast, in fp32). Everything else runs in its inputs' dtype.
CUDA_BF16_OPS = {F.linear, torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, torch.bmm, torch.addmm,
                 torch.baddbmm, F.scaled_dot_product_attention}
CUDA_FP32_OPS = {F.rms_norm, F.layer_norm, F.softmax, F.log_softmax, Tensor.softmax, Tensor.log_softmax,
                 F.cross_entropy, F.nll_loss, F.normalize, torch.norm, Tensor.norm, torch.linalg.vector_norm,
                 torch.rsqrt, Tensor.rsqrt, torch.exp, Tensor.exp, torch.log, Tensor.log, torch.pow, Tensor.pow,
                 torch.logsumexp, Tensor.logsumexp}
CARD_GIB, OVER_GIB = 80.0, 72.0   # an H100's memory; DRY_RUN's error line past 90% of it
TTT_LORA_SEQ = 2048               # a LoRA batch's longest window (EVAL_SEQ_LEN at the records' settings)


class FusedRMSNormStandIn(torch.autograd.Function):
    """F.rms_norm as CUDA runs it (torch's fused kernel): computed in fp32, output in its input's dtype,
    saving its input and an fp32 rstd a row. (The CPU's decomposition saves two fp32 copies of the input.)"""
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x, x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


class CudaAutocast(TorchFunctionMode):
    """CUDA's bf16 autocast cast lists (above), applied where autograd sees them (a cast copy is what it saves)
    while CUDA's autocast flag is on (set here for the census; torch.autocast("cuda", enabled=False) clears it),
    and F.rms_norm as CUDA's kernel saves. Shapes only: for meta tensors."""
    def __torch_function__(self, func, types, args=(), kwargs=None):
        on = torch.is_autocast_enabled("cuda")
        to = torch.bfloat16 if func in CUDA_BF16_OPS else torch.float32 if func in CUDA_FP32_OPS else None

        def cast(t):
            return t.to(to) if isinstance(t, Tensor) and t.dtype in (torch.float32, torch.bfloat16) else t
        if on and to is not None:
            args, kwargs = tree_map(cast, (args, kwargs or {}))
        if func is F.rms_norm:
            return FusedRMSNormStandIn.apply(args[0])
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.was = torch.is_autocast_enabled("cuda")
        torch.set_autocast_enabled("cuda", True)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.set_autocast_enabled("cuda", self.was)
        return super().__exit__(*exc)


class FlashStandIn(torch.autograd.Function):
    """FlashAttention's saved tensors without its maths: q, k, v, the output and an fp32 log-sum-exp a head
    and position (FA3's backward input); no T x T scores."""
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:3], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None, None


def saved_census(model: tg.CrawlerGPT, ids: Tensor, head=None) -> int:
    """Bytes the backward keeps after one forward pass of `model` (on the meta device: shapes only) on `ids`,
    at CUDA's autocast dtypes: every tensor saved for backward, counted once a storage (a tensor saved twice,
    or views of one storage, count once), less the weights (parameters and, with `head`, the LoRA's leaves,
    counted with the weights); a checkpoint's inputs count (it keeps them), its insides not (rebuilt in the
    backward). The residual stream enters in bf16, as embed() casts it under autocast."""
    leaves = {p.untyped_storage()._cdata for p in model.parameters()}
    leaves |= {t.untyped_storage()._cdata for a in (head or []) for t in (*a.A, *a.B)}
    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        key = t.untyped_storage()._cdata
        if key not in leaves:
            kept[key] = t.untyped_storage().nbytes()
        return t

    def checkpoint(fn, *args, **kwargs):
        for t in args:
            if isinstance(t, Tensor) and t.requires_grad:
                pack(t)
        return real_checkpoint(fn, *args, **kwargs)
    real_attention, real_checkpoint, embed = tg.causal_attention, tg.checkpoint, model.embed
    tg.causal_attention, tg.checkpoint = lambda q, k, v, backend: FlashStandIn.apply(q, k, v), checkpoint
    model.embed = lambda x: embed(x).bfloat16()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), CudaAutocast():
            model(ids, ids, per_token=head is not None, head=head[0] if head else None)
    finally:
        tg.causal_attention, tg.checkpoint = real_attention, real_checkpoint
        del model.embed
    return sum(kept.values())


def memory_census(hp: tg.Hyperparameters) -> dict:
    """GiB a GPU holds at its peak, training and TTT=lora. Training: the saved tensors of one micro-batch
    (TRAIN_BATCH_TOKENS / ACCUM_SPLITS tokens), fp32 weights and their grads, the EMA, Muon's momentum and
    Adam's two moments, and one loss chunk's transient fp32 logits in its backward (the logits, their tanh,
    log_softmax's output and its gradient: 4 copies). TTT: the LoRA pass at TTT_LORA_DOCS documents of
    TTT_LORA_SEQ tokens, its weights frozen (fp32, no grads), the adapters (fp32) and their AdamW state (x3);
    its head's logits are in the saved tensors. Not counted: NCCL/DDP buckets, the allocator's fragmentation,
    torch.compile's own choices (eager is the upper bound: inductor saves fewer, recomputing cheap ops)."""
    with torch.device("meta"):
        model = tg.CrawlerGPT(hp)
    n_params = sum(p.numel() for p in model.parameters())
    groups = tg.route_params(model)
    opt_bytes = 4 * sum(p.numel() for _, p in groups["muon"]) + \
        8 * sum(p.numel() for g in ("embed", "scalar") for _, p in groups[g])
    weights = 4 * n_params * (2 + bool(hp.ema_decay)) + opt_bytes
    micro = hp.train_batch_tokens // hp.accum_splits
    ids = torch.zeros(micro // hp.train_seq_len, hp.train_seq_len, dtype=torch.long, device="meta")
    train_saved = saved_census(model, ids)
    chunk = 4 * 4 * ids.size(0) * min(tg.LOSS_CHUNK, hp.train_seq_len) * hp.vocab_size
    model.requires_grad_(False)
    adapters, hooks = tg.attach_lora(model, hp.ttt_lora_docs, hp, torch.device("meta"))
    for a in adapters:
        a.reset()
    try:
        ttt_ids = torch.zeros(hp.ttt_lora_docs, TTT_LORA_SEQ, dtype=torch.long, device="meta")
        ttt_saved = saved_census(model, ttt_ids, adapters)
    finally:
        for h in hooks:
            h.remove()
    lora = 4 * 4 * sum(t.numel() for a in adapters for t in (*a.A, *a.B))
    gib = 2**30
    return {"train_saved_kb_per_token": train_saved / micro / 1e3, "train_saved_gib": train_saved / gib,
            "train_peak_gib": (train_saved + weights + chunk) / gib,
            "ttt_saved_kb_per_token": ttt_saved / ttt_ids.numel() / 1e3, "ttt_saved_gib": ttt_saved / gib,
            "ttt_peak_gib": (ttt_saved + 4 * n_params + lora) / gib}


EVAL_BUDGET_S = 600.0


def pod_cost(hp: tg.Hyperparameters, gpus: int = 8) -> dict:
    """ms/step, steps in the budget, eval seconds (memory: memory_census): the plain and sliding passes,
    and with TTT its scoring pass plus TTT_EPOCHS of training over the val tokens (at training FLOPs/token)."""
    train_flops = flops_per_token(hp, hp.train_seq_len)
    step_s = mean_step_seconds(hp, gpus)
    val_tokens = VAL_TOKENS.get(hp.vocab_size, FINEWEB_VAL_TOKENS)
    windows = val_tokens / hp.eval_stride
    eval_flops = flops_per_token(hp, hp.eval_seq_len, train=False) * hp.eval_seq_len * windows
    return {"flops_per_token": train_flops, "pod_ms_per_step": 1000 * step_s,
            "pod_steps": int(hp.train_time_cap / step_s) if hp.train_time_cap else hp.iterations,
            "pod_eval_seconds": eval_flops / (gpus * H100_BF16_FLOPS * EVAL_MFU),
            "pod_ttt_seconds": ttt_seconds(hp, val_tokens, eval_flops, gpus)}


def ttt_seconds(hp: tg.Hyperparameters, val_tokens: int, eval_flops: float, gpus: int) -> float:
    """TTT=sgd: its scoring pass plus TTT_EPOCHS of training over the val tokens. TTT=lora: the records' rate a
    val token; +phased: one epoch over the scored prefix after each phase (TTT_PHASE_DOCS of the 50,000)."""
    peak, train = gpus * H100_BF16_FLOPS, flops_per_token(hp, hp.eval_seq_len)
    if hp.ttt == "sgd":
        return eval_flops / (peak * EVAL_MFU) + hp.ttt_epochs * val_tokens * train / (peak * TTT_MFU)
    prefix = val_tokens * min(hp.ttt_phase_docs, VAL_DOCS) / VAL_DOCS if hp.ttt == "lora+phased" else 0
    phases = sum(prefix * k / hp.ttt_phases for k in range(1, hp.ttt_phases + 1))
    return 0.0 if hp.ttt == "off" else LORA_TTT_RATE * val_tokens * train / peak + phases * train / (peak * PHASE_MFU)


def raw_model_bytes(model: tg.CrawlerGPT, hp: tg.Hyperparameters) -> int:
    """The artifact's payload before compression (one byte per quantized value plus fp16 row scales)."""
    plan, total = tg.storage_plan(model, hp), 0
    for name, p in model.named_parameters():
        kind = plan.kinds[name]
        total += p.numel() + 2 * p.size(0) if kind in tg.QUANT_KINDS else p.numel() * tg.FLOAT_KINDS[kind].itemsize
    return total


def dry_run(hp: tg.Hyperparameters, gpus: int = 8, log=print) -> dict:
    """The artifact the cap implies and the pod's bill. Bytes: SDClip's fit on Gaussian rows (an SDClip grid's
    bytes depend on the shape of a row's distribution, not its scale; trained rows are a little heavier-tailed,
    which compresses a little better at the same k)."""
    t0 = time.perf_counter()
    torch.manual_seed(hp.seed)
    model = tg.CrawlerGPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=p.size(1) ** -0.5)
    plan, meta, budget = tg.storage_plan(model, hp), tg.artifact_meta(hp), hp.size_limit - len(tg.packed_code())
    rel, target = tg.relative_ks(model, hp, {}), budget - hp.size_margin / 2
    t_curve = time.perf_counter()
    curve = [(k, b * TRAINED_OVER_GAUSSIAN) for k, b in tg.rtn_curve(model, hp, rel, meta,
                                                                      target / TRAINED_OVER_GAUSSIAN)]
    curve_s = time.perf_counter() - t_curve
    k = tg.clamp_k(tg.along_log_k(curve, target, "k")) if hp.size_target == "fit" else hp.quant_k
    probe = copy.deepcopy(model)
    entries, _ = tg.quantize_model_(probe, hp, "rtn", [], tg.DistInfo(), tg.ks_at(rel, k))
    quantized = [n for n, kind in plan.kinds.items() if kind in tg.QUANT_KINDS]
    before, after = dict(model.named_parameters()), dict(probe.named_parameters())
    mse = sum((before[n] - after[n]).square().sum().item() for n in quantized) / \
        sum(before[n].square().sum().item() for n in quantized)
    sample = next(e["q"] for n, e in entries.items() if n in quantized).reshape(-1)[:2**20].numpy().tobytes()
    t_pack = time.perf_counter()
    tg.compress_bytes(sample, hp.compress_level)
    pack_s = (time.perf_counter() - t_pack) * raw_model_bytes(model, hp) / len(sample)
    model_bytes = round(tg.along_log_k(curve, k, "bytes"))
    code = len(tg.packed_code())
    out = {"unique_params": tg.count_unique_params(model), "effective_depth": hp.effective_depth, "quant_k": k,
           "relative_mse": mse, "bytes_model_estimate": model_bytes, "bytes_code": code,
           "bytes_code_source": len(tg.source_bytes()), "bytes_total_estimate": model_bytes + code,
           **pod_cost(hp, gpus), **memory_census(hp), "export_seconds_estimate": curve_s + 2 * pack_s}
    for what in ("train", "ttt"):
        if out[f"{what}_peak_gib"] > OVER_GIB:
            log(f"error: {what} is projected at {out[f'{what}_peak_gib']:.1f} GiB a GPU, over {OVER_GIB:.0f} of the "
                f"card's {CARD_GIB:.0f} (memory_census) — a smaller micro-batch (ACCUM_SPLITS, TTT_LORA_DOCS) or model")
    out["fits"] = out["bytes_total_estimate"] <= hp.size_limit
    plain = hp.eval_stride / hp.eval_seq_len if hp.eval_stride < hp.eval_seq_len else 0.0   # its share of windows
    eval_s = out["pod_eval_seconds"] * (1 + plain) + out["pod_ttt_seconds"]
    if eval_s > EVAL_BUDGET_S:
        log(f"warning: the evaluation is projected at {eval_s:.0f} s, over the {EVAL_BUDGET_S:.0f} s budget "
            "(plain + sliding + TTT) — fewer TTT_EPOCHS, a larger EVAL_STRIDE or a smaller model")
    log(" ".join(f"{k}:{v:.4g}" if isinstance(v, float) else f"{k}:{v}" for k, v in {
        "dry_run": 1, **out, "cap": hp.size_limit, "headroom": hp.size_limit - out["bytes_total_estimate"],
        "estimate": f"gaussian_rows_x{TRAINED_OVER_GAUSSIAN:.4f}_trained", "pod": f"{gpus}xH100_mfu{POD_MFU}_overhead"
        f"{1000 * POD_STEP_OVERHEAD_S:.1f}ms", "seconds": f"{time.perf_counter() - t0:.1f}"}.items()))
    return out


def main(argv: list[str] | None = None, environ: dict | None = None) -> dict:
    env = dict(os.environ if environ is None else environ)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=int(env.get("POD_GPUS", 8)), help="H100s to project for (POD_GPUS)")
    args = p.parse_args(argv)
    try:
        hp = tg.Hyperparameters.from_env({k: v for k, v in env.items() if k not in TOOL_VARS})
    except tg.GolfError as err:
        raise SystemExit(f"error: {err}") from None
    return dry_run(hp, args.gpus)


if __name__ == "__main__":
    main()
