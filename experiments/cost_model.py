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
import functools
import heapq
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
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
CASEOPS_VAL_TOKENS = 47_851_520   # VARIANT=caseops (the 2026-04-27 record's data): its README's val targets
# TTT=lora, a work model: a document costs the LoRA pass rows x window tokens, a row a chunk while it is open, at
# the chunk's window (work_ours mirrors train_gpt.lora_batch, work_record the record's own batches). Each rank's
# seconds are its work at LORA_MFU of a GPU's peak (training FLOPs a token at EVAL_SEQ_LEN); the pass takes its
# critical path: the slowest rank of each phase segment (the phases wait for every rank), summed.
# LORA_MFU is the 2026-04-27 record's: its LoRA pass took 424.4 s (508.8 s of phased TTT less its three global
# SGD phases, 16.6 + 29.8 + 38.0 s by its ttpp/ttpr lines) on 47,851,520 tokens, its own schedule (record_path:
# one longest-first queue of 64-document batches that the 8 ranks claim, every row of a batch run at each chunk
# until its longest document ends, 48-token chunks, windows up to 2048, a pause at each phase boundary) on the
# length model; tests/test_cost_model.py refits it. Its phases trained 20.9M tokens (639 chunks of 32,768) in
# 84.4 s: PHASE_MFU 1.39% of peak (the 2026-04-13 record's one phase: 49.8 s measured, 28 s projected).
LORA_MFU, PHASE_MFU, VAL_DOCS = 0.1170, 0.0139, 50_000
RECORD_LORA_SECONDS, RECORD_PHASE_DOCS = 424.4, 2500
# The length model, without a val shard: 50,000 log-normal document lengths (seeded) scaled to the val tokens
# (CaseOps: 957 a document). Sigma 0.8 is the one the 2026-04-27 record's phases imply: its prefix, the 2,500
# longest documents, held ~20% of the tokens, and its three phases trained 639 chunks of 32,768 tokens (the
# longest 833, 1,666 and 2,500 documents); sigma 0.8 gives 20.0% and 648 chunks (0.7: 17.3%, 553; 0.9: 22.9%,
# 754). The tail matters: the longest document (~30k tokens) is the one batch a rank cannot share.
DOC_SIGMA = 0.8
# The compile warm-up runs before the scored pass, off its clock, as the records' did: theirs took 137-156 s
# (the 2026-04-27 record's logs; their figure, not a projection of ours), so DRY_RUN prints their worst.
TTT_WARMUP_SECONDS = 156.0
# Trained rows compress better than Gaussian ones at the same SDClip k (heavier tails: more values near 0). One
# real artifact sets the ratio: the 2026-04-05 record (k 12.85 matrices, 20 for its int8 GPTQ'd embedding, sp8192)
# packed 15,970,162 model bytes (mean of its 5 logs); at its knobs (tests/test_cost_model.py) the Gaussian rows
# give 16,658,992. Out of sample: 2026-04-09 (3 looped layers, parallel residuals) within 0.1%; 2026-04-27
# (int7 embedding, per-role clips, LQER, its own per-group compressor) +2.0%.
TRAINED_OVER_GAUSSIAN = 15_970_162 / 16_658_992
TOOL_VARS = ("DRY_RUN", "POD_GPUS", "VARIANT")   # this tool's own variables (run.sh's VARIANT: the data)


def meta_model(hp: tg.Hyperparameters) -> tg.CrawlerGPT:
    """The model on the meta device, attention replaced by a stand-in: the flop counter sees the linear maps,
    and the T^2 attention matmuls are added by hand (causal: half the scores)."""
    with torch.device("meta"):
        return tg.CrawlerGPT(hp)


def counted_attention(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    return q + 0 * (k.mean() + v.mean())   # k and v stay in the graph


def flops_per_token(hp: tg.Hyperparameters, seq_len: int, train: bool = True, loops: int | None = None) -> float:
    """Training (forward + backward) or forward FLOPs per token; FlashAttention's backward at 2.5x its forward.
    The model's FLOPs: the loss chunks' checkpointed recompute is left out (the anchors' codes do none; it is
    recompute_flops_per_token, which step_seconds adds for ours)."""
    model, real, real_checkpoint = meta_model(hp), tg.causal_attention, tg.checkpoint
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    tg.causal_attention = counted_attention
    tg.checkpoint = lambda fn, *args, **_: fn(*args)
    try:
        with counter:
            loss = model(ids, ids, loops=loops)
            if train:
                loss.backward()
    finally:
        tg.causal_attention, tg.checkpoint = real, real_checkpoint
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


def recompute_flops_per_token(hp: tg.Hyperparameters) -> float:
    """train_gpt's loss rebuilds each chunk's logits in the backward: one more head matmul a token."""
    return 2.0 * hp.vocab_size * hp.model_dim


def step_seconds(hp: tg.Hyperparameters, gpus: int = 8, loops: int | None = None, ours: bool = True) -> float:
    """One step on the pod at `loops` crawler loops (default: all of them); ours: with train_gpt's loss
    recompute (an anchor of another code: without)."""
    flops = flops_per_token(hp, hp.train_seq_len, loops=loops) + ours * recompute_flops_per_token(hp)
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


def val_token_count(hp: tg.Hyperparameters, variant: str = "") -> int:
    """The val targets the pod scores: CaseOps' for VARIANT=caseops, else the vocabulary's (the records' logs)."""
    return CASEOPS_VAL_TOKENS if variant == "caseops" else VAL_TOKENS.get(hp.vocab_size, FINEWEB_VAL_TOKENS)


@functools.lru_cache(maxsize=8)
def length_model(val_tokens: int, docs: int = VAL_DOCS, sigma: float = DOC_SIGMA) -> tuple[int, ...]:
    """`docs` log-normal document lengths (targets; seed 0) that sum to about val_tokens, in stream order."""
    x = np.random.default_rng(0).lognormal(0.0, sigma, docs)
    return tuple(int(n) for n in np.maximum(1, np.round(x * val_tokens / x.sum())))


def doc_lengths(hp: tg.Hyperparameters, val_tokens: int) -> tuple[tuple[int, ...], str]:
    """The val documents' lengths in stream order (targets, as train_gpt.documents), and where they come from:
    the val shards at DATA_PATH when they are here, else the length model at val_tokens."""
    files = sorted(Path(hp.data_path).glob(hp.val_files))
    if not files:
        return length_model(val_tokens), f"lognormal_sigma{DOC_SIGMA}"
    tokens = torch.cat([tg.load_data_shard(f) for f in files])
    return tuple(b - a for a, b in tg.documents(tokens)), "val_shards"


def work_ours(lengths: list[int], size: int, seq: int) -> int:
    """Rows x window tokens of one batch in train_gpt.lora_batch: each chunk runs the documents still open, at
    the longest open window (its targets so far, at most seq)."""
    n = np.sort(np.asarray(lengths))[::-1]
    c = np.arange(-(-int(n[0]) // size))
    rows = (-(-n[:, None] // size) > c).sum(0)
    return int((rows * np.minimum(np.minimum((c + 1) * size, int(n[0])), seq)).sum())


def work_record(lengths: list[int], size: int, seq: int) -> int:
    """Rows x window tokens of one batch in the 2026-04-27 record's eval_val_ttt_phased: every row, finished
    or not, at every chunk up to its longest document's last, at a window of min((chunk + 1) size, seq)."""
    c = np.arange(-(-max(lengths) // size))
    return len(lengths) * int(np.minimum((c + 1) * size, seq).sum())


def ttt_segments(hp: tg.Hyperparameters, docs: int) -> list[tuple[int, int]]:
    """The phase segments [a, b) of the stream's documents, as train_gpt.lora_ttt cuts them."""
    n = min(hp.ttt_phase_docs, docs) if hp.ttt == "lora+phased" else 0
    cuts = sorted({n * k // hp.ttt_phases for k in range(1, hp.ttt_phases + 1)} - {0, docs})
    return list(zip([0, *cuts], [*cuts, docs]))


def ttt_shares(docs: list[tuple[int, int]], world: int) -> list[list[tuple[int, int]]]:
    """Each rank's documents as train_gpt.lora_ttt deals them: one longest-first order for all ranks (ties in
    stream order), dealt back and forth (ranks 0..W-1, then W-1..0)."""
    order, w = sorted(docs, key=lambda d: d[0] - d[1]), 2 * world
    return [[d for i, d in enumerate(order) if r in (i % w, w - 1 - i % w)] for r in range(world)]


def ours_path(hp: tg.Hyperparameters, lengths: tuple[int, ...], gpus: int) -> tuple[float, float]:
    """(critical path, ideal) in rows x window tokens of our LoRA pass: in each phase segment the documents go
    to the ranks by ttt_shares, each rank's in batches of TTT_LORA_DOCS; the segment takes its slowest rank
    (the phase after it waits for all). Ideal: all the work over the ranks."""
    ends = np.cumsum(lengths).tolist()
    docs = list(zip([0, *ends[:-1]], ends))
    size, batch, crit, total = hp.ttt_lora_chunk, hp.ttt_lora_docs, 0, 0
    for a, b in ttt_segments(hp, len(docs)):
        loads = [sum(work_ours([e - f for f, e in mine[i:i + batch]], size, hp.eval_seq_len)
                     for i in range(0, len(mine), batch))
                 for mine in ttt_shares(docs[a:b], gpus)]
        crit, total = crit + max(loads), total + sum(loads)
    return crit, total / gpus


def record_path(lengths: tuple[int, ...], gpus: int = 8, size: int = 48, seq: int = 2048, batch: int = 64,
                prefix: int = RECORD_PHASE_DOCS, phases: int = 3) -> tuple[float, float]:
    """(critical path, ideal) in rows x window tokens of the 2026-04-27 record's LoRA pass: its documents
    sorted by length into batches of 64, longest batch first, claimed from one queue by whichever rank is free;
    once `prefix` * k / phases documents are scored, each rank finishes its batch and all wait (the phase)."""
    order = sorted(lengths)
    batches = sorted((order[i:i + batch] for i in range(0, len(order), batch)), key=lambda b: -b[-1])
    cost = [work_record(b, size, seq) for b in batches]
    bounds = [prefix * (k + 1) // phases for k in range(phases)] if prefix else []   # no prefix: no pauses
    phases = len(bounds)
    busy = [(cost[r], r, r) for r in range(min(gpus, len(cost)))]   # (ends at, rank, batch)
    free, claimed, done, phase = [], len(busy), 0, 0
    heapq.heapify(busy)
    clock = 0.0
    while busy:
        clock, r, b = heapq.heappop(busy)
        if phase < phases:
            done += len(batches[b])
        if phase < phases and done >= bounds[phase]:   # the pause flag: ranks stop as their batch ends
            free.append(r)
            if busy:
                continue
            phase += 1
            waiting, free = free, []
        else:
            waiting = [r]
        for r in waiting:
            if claimed < len(cost):
                heapq.heappush(busy, (clock + cost[claimed], r, claimed))
                claimed += 1
    return clock, sum(cost) / gpus


def lora_seconds(hp: tg.Hyperparameters, work: float) -> float:
    """Seconds of `work` rows x window tokens on one GPU at LORA_MFU (training FLOPs a token at EVAL_SEQ_LEN)."""
    return work * flops_per_token(hp, hp.eval_seq_len) / (H100_BF16_FLOPS * LORA_MFU)


def pod_cost(hp: tg.Hyperparameters, gpus: int = 8, variant: str = "") -> dict:
    """ms/step, steps in the budget, activation memory per GPU, eval seconds: the plain and sliding passes,
    and with TTT its scored pass (sgd: its scoring plus TTT_EPOCHS of training over the val tokens; lora: the
    work model's critical path plus the phases), its compile warm-up beside it (off the clock). Memory:
    memory_census."""
    train_flops = flops_per_token(hp, hp.train_seq_len)
    step_s = mean_step_seconds(hp, gpus)
    val_tokens = val_token_count(hp, variant)
    windows = val_tokens / hp.eval_stride
    eval_flops = flops_per_token(hp, hp.eval_seq_len, train=False) * hp.eval_seq_len * windows
    out = {"flops_per_token": train_flops, "pod_ms_per_step": 1000 * step_s,
           "pod_steps": int(hp.train_time_cap / step_s) if hp.train_time_cap else hp.iterations,
           "pod_eval_seconds": eval_flops / (gpus * H100_BF16_FLOPS * EVAL_MFU),
           "pod_ttt_seconds": 0.0}
    if hp.ttt == "sgd":
        out["pod_ttt_seconds"] = ttt_seconds(hp, val_tokens, eval_flops, gpus)
    elif hp.ttt != "off":
        lengths, source = doc_lengths(hp, val_tokens)
        crit, ideal = ours_path(hp, lengths, gpus)
        lora, phases = lora_seconds(hp, crit), phase_seconds(hp, sum(lengths), gpus)
        out.update(pod_ttt_seconds=lora + phases, pod_ttt_lora_seconds=lora, pod_ttt_phase_seconds=phases,
                   ttt_critical_over_ideal=crit / ideal, ttt_val_tokens=sum(lengths), ttt_doc_lengths=source,
                   pod_ttt_warmup_seconds=TTT_WARMUP_SECONDS)
    return out


def phase_seconds(hp: tg.Hyperparameters, val_tokens: int, gpus: int = 8) -> float:
    """lora+phased: one epoch of SGD over the scored prefix after each phase (TTT_PHASE_DOCS of the 50,000)."""
    prefix = val_tokens * min(hp.ttt_phase_docs, VAL_DOCS) / VAL_DOCS if hp.ttt == "lora+phased" else 0
    phases = sum(prefix * k / hp.ttt_phases for k in range(1, hp.ttt_phases + 1))
    return phases * flops_per_token(hp, hp.eval_seq_len) / (gpus * H100_BF16_FLOPS * PHASE_MFU)


def ttt_seconds(hp: tg.Hyperparameters, val_tokens: int, eval_flops: float, gpus: int) -> float:
    """TTT=sgd: its scoring pass plus TTT_EPOCHS of training over the val tokens. TTT=lora: the work model on
    the length model at val_tokens, plus the phases."""
    if hp.ttt == "off":
        return 0.0
    if hp.ttt == "sgd":
        peak, train = gpus * H100_BF16_FLOPS, flops_per_token(hp, hp.eval_seq_len)
        return eval_flops / (peak * EVAL_MFU) + hp.ttt_epochs * val_tokens * train / (peak * TTT_MFU)
    return lora_seconds(hp, ours_path(hp, length_model(val_tokens), gpus)[0]) + phase_seconds(hp, val_tokens, gpus)


def raw_model_bytes(model: tg.CrawlerGPT, hp: tg.Hyperparameters) -> int:
    """The artifact's payload before compression (one byte per quantized value plus fp16 row scales)."""
    plan, total = tg.storage_plan(model, hp), 0
    for name, p in model.named_parameters():
        kind = plan.kinds[name]
        total += p.numel() + 2 * p.size(0) if kind in tg.QUANT_KINDS else p.numel() * tg.FLOAT_KINDS[kind].itemsize
    return total


def dry_run(hp: tg.Hyperparameters, gpus: int = 8, log=print, variant: str = "") -> dict:
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
    # one core's seconds for the whole payload, then the busiest rank's share of its PACK_STREAMS pieces
    pack_s = (time.perf_counter() - t_pack) * raw_model_bytes(model, hp) / len(sample)
    pack_s *= -(-tg.PACK_STREAMS // gpus) / tg.PACK_STREAMS
    model_bytes = round(tg.along_log_k(curve, k, "bytes"))
    code = len(tg.packed_code())
    out = {"unique_params": tg.count_unique_params(model), "effective_depth": hp.effective_depth, "quant_k": k,
           "relative_mse": mse, "bytes_model_estimate": model_bytes, "bytes_code": code,
           "bytes_code_source": len(tg.source_bytes()), "bytes_total_estimate": model_bytes + code,
           **pod_cost(hp, gpus, variant), **memory_census(hp), "export_seconds_estimate": curve_s + 2 * pack_s}
    for what in ("train", "ttt"):
        if out[f"{what}_peak_gib"] > OVER_GIB:
            log(f"error: {what} is projected at {out[f'{what}_peak_gib']:.1f} GiB a GPU, over {OVER_GIB:.0f} of "
                f"the card's {CARD_GIB:.0f} (memory_census) — a smaller micro-batch (ACCUM_SPLITS, TTT_LORA_DOCS) "
                "or model")
    out["fits"] = out["bytes_total_estimate"] <= hp.size_limit
    plain = hp.eval_stride / hp.eval_seq_len if hp.eval_stride < hp.eval_seq_len else 0.0   # its share of windows
    eval_s = out["pod_eval_seconds"] * (1 + plain) + out["pod_ttt_seconds"]
    warmup = out.pop("pod_ttt_warmup_seconds", 0.0)
    out.update(pod_scored_eval_seconds=eval_s, pod_ttt_warmup_seconds=warmup)   # printed side by side
    if eval_s > EVAL_BUDGET_S:
        log(f"error: the evaluation is projected at {eval_s:.0f} s, over the {EVAL_BUDGET_S:.0f} s budget "
            f"(plain + sliding + TTT, scored; the {warmup:.0f} s compile warm-up before it is off the clock) — "
            "fewer TTT_EPOCHS, a larger EVAL_STRIDE or a smaller model")
    log(" ".join(f"{k}:{v:.4g}" if isinstance(v, float) else f"{k}:{v}" for k, v in {
        "dry_run": 1, **out, "cap": hp.size_limit, "headroom": hp.size_limit - out["bytes_total_estimate"],
        "estimate": f"gaussian_rows_x{TRAINED_OVER_GAUSSIAN:.4f}_trained", "pod": f"{gpus}xH100_mfu{POD_MFU}_overhead"
        f"{1000 * POD_STEP_OVERHEAD_S:.1f}ms", "seconds": f"{time.perf_counter() - t0:.1f}"}.items()))
    return out


def pod_check_hp() -> tg.Hyperparameters:
    """The config experiments/pod_check.py measures on one GPU: PROFILE=record_0427 at its GPU shape."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import pod_check

    sys.path.insert(0, str(pod_check.PORT_DIR))
    import port

    env = {k: v for k, v in port.profile_env("record_0427").items() if k not in ("VARIANT", "PROFILE",
                                                                                 "ABLATE_CALLER_VARS")}
    return tg.Hyperparameters.from_env({**env, **pod_check.GPU_SHAPE})


def pod_check_report(path: Path, log=print) -> list[dict]:
    """The one-GPU check's figures (experiments/pod_check.py's JSON) beside this model's projections for the
    same work on one H100: (figure, projected, measured, measured / projected); a phase that did not run
    through gives no figure, and a line says why. The ours / record rows are measured against measured."""
    report = json.loads(Path(path).read_text())
    phases = report["phases"]
    hp = pod_check_hp()

    def got(phase: str, key: str):
        res = phases.get(phase, {})
        return res.get(key) if res.get("status") == "ok" else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    rows = []
    for loops in (1, hp.crawler_loops):   # one GPU runs the pod's 8 micro-batches of a step in turn
        rows.append(("train ms/step, %d loop%s (1 GPU, 8 micro-batches)" % (loops, "s" * (loops > 1)),
                     1000 * step_seconds(hp, gpus=1, loops=loops), got("train_ours", f"ms_per_step_loops{loops}")))
    census = memory_census(hp)   # at the per-GPU micro-batch, as the check runs it
    rows.append(("train peak GiB (memory_census)", census["train_peak_gib"], got("train_ours", "peak_allocated_gib")))
    rows.append(("TTT peak GiB, 64 x 2048 (memory_census)", census["ttt_peak_gib"], got("ttt", "peak_allocated_gib")))
    rows.append(("TTT batch seconds (64 x 2048)", lora_seconds(hp, work_ours([2048] * 64, hp.ttt_lora_chunk,
                                                                         hp.eval_seq_len)),
                 got("ttt", "batch_seconds")))
    rows.append(("eval tokens/s", H100_BF16_FLOPS * EVAL_MFU / flops_per_token(hp, hp.eval_seq_len, train=False),
                 got("eval", "tokens_per_second")))
    out = [{"figure": f, "projected": p, "measured": m, "ratio": ratio(m, p)} for f, p, m in rows]
    for loops in (1, hp.crawler_loops):
        key = f"ms_per_step_loops{loops}"
        out.append({"figure": f"ours / record ms/step, {loops} loop{'s' * (loops > 1)}", "projected": None,
                    "measured": ratio(got("train_ours", key), got("train_record", key)), "ratio": None})
    out.append({"figure": "ours / record peak memory", "projected": None, "ratio": None,
                "measured": ratio(got("train_ours", "peak_allocated_gib"), got("train_record", "peak_allocated_gib"))})
    log(f"pod_check {report.get('mode')} commit:{report.get('commit')} date:{report.get('date')} "
        f"device:{report.get('device')}")
    if report.get("mode") != "gpu":
        log("a CPU-mode run: the projections are an H100's, so its ratios only show that every figure is read")
    for phase, res in phases.items():
        if res.get("status") != "ok":
            log(f"{phase}: {res.get('status')}: {res.get('error', '')}")
    for r in out:
        cells = [f"{r[k]:.4g}" if isinstance(r[k], (int, float)) else "-" for k in ("projected", "measured", "ratio")]
        log(f"{r['figure']:<62} projected {cells[0]:>9}  measured {cells[1]:>9}  measured/projected {cells[2]}")
    return out


def main(argv: list[str] | None = None, environ: dict | None = None) -> dict:
    env = dict(os.environ if environ is None else environ)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=int(env.get("POD_GPUS", 8)), help="H100s to project for (POD_GPUS)")
    p.add_argument("--pod-check", type=Path, help="experiments/pod_check.py's JSON: projections beside its figures")
    args = p.parse_args(argv)
    if args.pod_check:
        return {"pod_check": pod_check_report(args.pod_check)}
    try:
        hp = tg.Hyperparameters.from_env({k: v for k, v in env.items() if k not in TOOL_VARS})
    except tg.GolfError as err:
        raise SystemExit(f"error: {err}") from None
    return dry_run(hp, args.gpus, variant=env.get("VARIANT", ""))


if __name__ == "__main__":
    main()
