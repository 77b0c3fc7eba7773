"""crawler-golf: the Parameter Golf submission, one self-contained script configured by environment variables.

What the defaults do on 8xH100, under `torchrun --standalone --nproc_per_node=8 train_gpt.py` (bash run.sh):
- Train: a crawler transformer on FineWeb sp1024. 4 unique flat blocks (U-Net skips) run once, then 2 shared
  crawler blocks run twice, each loop marked by a QR-orthogonal loop embedding; dim 640, MLP 4x leaky-relu^2,
  XSA on every block, a hashed trigram embedding and value embeddings on the crawler. Muon for matrices,
  AdamW for tables and gains, 786,432 tokens a step for 600 s less the GPTQ reserve; late int6 QAT, EMA.
- Export: per-row int6 GPTQ on an SDClip grid (clip = k row stds), loop-aware: the crawler's Hessians are
  taken through the already-quantized flat blocks across every loop. k is chosen so the packed script plus
  the brotli-compressed artifact lands just under 16,000,000 bytes. The artifact carries a checksum.
- Score: the artifact reloaded from disk, val_bpb by sliding windows (stride 64) on the whole val split;
  the last line is `final val_bpb:... bytes_total:...`, and logs/<RUN_ID>.json holds every figure.
`EVAL_ONLY=<artifact>` scores an artifact instead of training. Everything that can fail is checked before the
first step; an expected failure is one `error:` line and exit 2 (bad input), 3 (over the cap), 4 (divergence).
The knobs are the Hyperparameters fields (README has the table); tools that plan or report (the cost model,
DRY_RUN, the records writer, the ablation runner) live in experiments/ and import this file.
"""
from __future__ import annotations

import ast, contextlib, copy, dataclasses, difflib, errno, functools, glob, hashlib  # noqa: E401
import io, itertools, json, math, os, platform, re, shutil, subprocess, sys, tempfile, time, uuid  # noqa
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

try:  # FlashAttention 3 on Hopper, optional: PyTorch SDPA computes the same maths (the log says which ran)
    from flash_attn_interface import flash_attn_func as fa3_attention
except Exception:  # noqa: BLE001 - any import failure means "not available"
    fa3_attention = None

# ======================================================================================================
# Config. Every knob is a field below, read from the environment variable of its upper-cased name; the
# `#:` comment is its documentation (README's table is generated from it; comments cost no packed bytes).
# A name that looks like a knob but is not one is an error, and so is a value out of its range.

def knob(default: Any, lo: float | None = None, hi: float | None = None, choices: tuple = (),
         model: bool = False) -> Any:
    """model=True: the knob shapes the network, so the artifact stores it to rebuild the model."""
    return field(default=default, metadata={"choices": choices, "lo": lo, "hi": hi, "model": model})

BIG = 2**31 - 1   # the upper bound of counts that have no natural one

@dataclass(frozen=True)
class Hyperparameters:
    run_id: str = knob("")  #: name of the run (logs/<RUN_ID>.txt); empty = timestamp + random suffix
    seed: int = knob(1337, 0, 2**32 - 1)  #: random seed
    data_path: str = knob("data/datasets/fineweb10B_sp1024")  #: folder holding the token shards
    tokenizer_path: str = knob("data/tokenizers/fineweb_1024_bpe.model")  #: SentencePiece model of the shards
    train_files: str = knob("*_train_*.bin")  #: glob of training shards, relative to DATA_PATH
    val_files: str = knob("*_val_[0-9]*.bin")  #: glob of val shards in DATA_PATH (not *_val_bytes_*)
    log_dir: str = knob("logs")  #: folder for <RUN_ID>.txt and <RUN_ID>.json
    artifact_dir: str = knob("artifacts")  #: folder for <RUN_ID>.ptz and checkpoints
    records_dir: str = knob("records")  #: folder of experiments/records.py's <date>_<RUN_ID>/ (kept unused)
    vocab_size: int = knob(1024, 2, 65536, model=True)  #: vocabulary size (must match the tokenizer)
    model_dim: int = knob(640, 8, 16384, model=True)  #: residual width
    num_heads: int = knob(10, 1, 256, model=True)  #: attention heads
    num_kv_heads: int = knob(5, 1, 256, model=True)  #: key/value heads (GQA); divides NUM_HEADS
    num_flat_layers: int = knob(4, 0, 256, model=True)  #: unique flat blocks, run once, with U-Net skips
    num_crawler_layers: int = knob(2, 0, 64, model=True)  #: shared crawler blocks (0 = plain GPT)
    crawler_loops: int = knob(2, 1, 64, model=True)  #: times the crawler blocks run
    #: where the crawler runs: after the flat stack (end), at the U-Net bottleneck, or after N flat blocks
    crawler_position: str = knob("end", model=True)
    #: U-Net skips join the flat blocks, or every block call (virtual, the records': split anew per loops)
    skips: str = knob("flat", choices=("flat", "virtual"), model=True)
    skip_gates: bool = knob(False, model=True)  #: gated skips: x <- lerp(w * skip, x, sigmoid(g)), g from 0
    loop_embed_scale: float = knob(0.01, 0, model=True)  #: each loop embedding's norm (0: none, no parameter)
    loop_dt: float = knob(1.0, 0.01, 1, model=True)  #: contractive loops: x <- (1-dt) x + dt F(x) (1 = off)
    mlp_mult: float = knob(4.0, 0.25, 64, model=True)  #: flat MLP hidden = MLP_MULT * MODEL_DIM
    crawler_mlp_mult: float = knob(4.0, 0.25, 64, model=True)  #: crawler MLP hidden multiple
    mlp_act: str = knob("leaky_relu2", choices=("relu2", "leaky_relu2"), model=True)  #: MLP activation
    mlp_leaky_slope: float = knob(0.5, 0, 1, model=True)  #: negative slope of leaky_relu2 in flat blocks
    crawler_mlp_leaky_slope: float = knob(0.5, 0, 1, model=True)  #: the same in crawler blocks
    #: crawler MLP: standard, or choke_flat (a per-loop CHOKE_DIM bottleneck for its way out: ChokeMLP)
    crawler_mlp: str = knob("standard", choices=("standard", "choke_flat"), model=True)
    choke_dim: int = knob(64, 1, 16384, model=True)  #: width of the per-loop choke bottleneck
    rope_base: float = knob(10000.0, 1, model=True)  #: RoPE base
    rope_dims: int = knob(16, 0, 1024, model=True)  #: rotary dims per head (0 = the whole head)
    qk_gain_init: float = knob(4.0, 0, model=True)  #: initial per-head query gain
    logit_softcap: float = knob(30.0, 0, model=True)  #: tanh soft cap on logits (0 = off)
    tied_embed_init_std: float = knob(0.005, 0, model=True)  #: std of the tied embedding at init
    matrix_init: str = knob("default", choices=("default", "orthogonal"))  #: orthogonal: the records' init
    ln_scale: bool = knob(True, model=True)  #: block i's normed input times 1/sqrt(i+1) (i: LN_SCALE_DEPTH)
    #: LN_SCALE's i: the call's position (virtual), or the block's in the one-loop order (unique, the records)
    ln_scale_depth: str = knob("virtual", choices=("virtual", "unique"), model=True)
    #: blocks from this position of the one-loop order on run attention and MLP on one input (-1 = off)
    parallel_start: int = knob(-1, -1, 4096, model=True)
    #: 2: PARALLEL_START's blocks keep two lanes (the 04-27 record's): attention reads lane 0, the MLP lane 1,
    #: each lane adds both outputs by learned weights (1; itself by 1.1 at init), the head reads their mean
    parallel_lanes: int = knob(1, 1, 2, model=True)
    xsa_last_n: int = knob(-1, -1, 4096, model=True)  #: exclusive self attn, last N blocks (-1 all, 0 off)
    ngram_hash: str = knob("trigram", choices=("none", "bigram", "trigram"), model=True)  #: n-gram table
    ngram_buckets: int = knob(4096, 2, 2**24, model=True)  #: n-gram hash buckets
    ngram_dim: int = knob(128, 1, 16384, model=True)  #: n-gram table width
    smear_gate: bool = knob(False, model=True)  #: add a gated copy of the previous token's embedding
    smear_scalar: bool = knob(False, model=True)  #: SmearGate: one gate a token, from GATE_WINDOW dims
    attn_gate: float = knob(0.0, 0, model=True)  #: head h's output * sigmoid(ATTN_GATE W_h x[:GATE_WINDOW])
    gate_window: int = knob(12, 1, 4096, model=True)  #: input dims of ATTN_GATE's and SMEAR_SCALAR's gates
    ve_dim: int = knob(128, 0, 16384, model=True)  #: value-embedding table width (0 = off)
    #: blocks whose attention values get the value embedding: crawler, flat, all, or unique-block indices
    ve_layers: str = knob("crawler", model=True)
    iterations: int = knob(20000, 0, BIG)  #: training steps (the wallclock cap usually ends training first)
    max_wallclock_seconds: float = knob(600.0, 0)  #: training time cap in seconds (0 = none)
    train_batch_tokens: int = knob(786432, 1, BIG)  #: tokens per optimizer step, all ranks together
    train_seq_len: int = knob(2048, 2, 2**20)  #: training sequence length
    accum_splits: int = knob(8, 1, 65536)  #: micro-batches a step over all ranks (1 or 8 GPUs: same maths)
    warmup_steps: int = knob(20, 0, 10000)  #: compile-priming steps, undone before training (with COMPILE on)
    warmdown_iters: int = knob(3500, 0, BIG)  #: linear LR decay over the last N steps (wallclock-estimated)
    warmdown_frac: float = knob(0.0, 0, 1)  #: warmdown, as a fraction of the steps (> 0 wins)
    min_lr_scale: float = knob(0.0, 0, 1)  #: floor of the LR scale in the warmdown
    #: progressive recurrence, f:n,...: n crawler loops from fraction f of the training (of the time when
    #: capped, else of the steps), e.g. 0:1,0.5:2; empty = CRAWLER_LOOPS throughout; eval runs every loop
    crawler_loops_schedule: str = knob("")
    crawler_cadence: int = knob(1, 1, 1000)  #: all crawler loops on every k-th step, one loop otherwise
    compile: str = knob("auto", choices=("auto", "0", "1"))  #: torch.compile the model: auto = on for CUDA
    compile_backend: str = knob("inductor", choices=("inductor", "aot_eager", "eager"))  #: torch.compile's
    matrix_lr: float = knob(0.025, 0)  #: Muon learning rate (block matrices)
    scalar_lr: float = knob(0.025, 0)  #: Adam learning rate (vectors, gains, loop embeddings)
    tied_embed_lr: float = knob(0.035, 0)  #: Adam learning rate (embedding tables)
    muon_momentum: float = knob(0.99, 0, 1)  #: Muon momentum after warm-up
    muon_momentum_warmup_start: float = knob(0.92, 0, 1)  #: Muon momentum at step 0
    muon_momentum_warmup_steps: int = knob(1500, 0, BIG)  #: steps to ramp the Muon momentum
    muon_backend_steps: int = knob(5, 1, 100)  #: Newton-Schulz iterations
    #: Muon's Newton-Schulz coefficients: its fixed quintic, or Polar Express's minimax ones per step
    muon_ns: str = knob("quintic", choices=("quintic", "polar"))
    muon_row_norm: bool = knob(False)  #: MuonEq-R: the update's rows set to unit norm before Newton-Schulz
    muon_wd: float = knob(0.04, 0)  #: Muon decoupled weight decay
    adam_wd: float = knob(0.04, 0)  #: AdamW decoupled weight decay
    embed_wd: float = knob(-1.0, -1)  #: AdamW weight decay of the embedding tables (-1 = ADAM_WD)
    beta1: float = knob(0.9, 0, 1)  #: Adam beta1
    beta2: float = knob(0.95, 0, 1)  #: Adam beta2
    adam_eps: float = knob(1e-8, 0, 1)  #: Adam epsilon
    grad_clip_norm: float = knob(0.3, 0)  #: global grad-norm clip (0 = off)
    ema_decay: float = knob(0.997, 0, 0.999999)  #: EMA of the weights, warmed up as min(decay, (1+t)/(10+t))
    export_weights: str = knob("ema", choices=("raw", "ema"))  #: weights exported and scored
    late_qat_threshold: float = knob(0.15, 0, 1)  #: int6 fake quantization once the LR scale < this (0 = off)
    checkpoint_every: int = knob(0, 0, BIG)  #: write a resumable checkpoint every N steps (0 = off)
    resume: bool = knob(False)  #: continue RUN_ID from its last checkpoint in ARTIFACT_DIR
    val_loss_every: int = knob(1000, 0, BIG)  #: validate every N steps (0 = only at the end)
    val_batch_size: int = knob(524288, 1, BIG)  #: tokens per validation batch, all ranks together
    val_max_tokens: int = knob(0, 0, BIG)  #: cap on validation tokens of the periodic checks (0 = all)
    train_log_every: int = knob(100, 1, BIG)  #: progress line every N steps
    eval_seq_len: int = knob(2048, 2, 2**20)  #: evaluation window length
    eval_stride: int = knob(64, 1, 2**20)  #: sliding-window stride of the final evaluation
    eval_only: str = knob("")  #: artifact to score without training (eval settings from the artifact)
    #: score-first test-time training: sgd = each chunk of the sliding-scored val stream, then trained on
    #: (TTT_EPOCHS of SGD with momentum over all weights, cosine LR over the chunks); lora = each document
    #: alone, TTT_LORA_CHUNK tokens scored, then a step of its own LoRA; +phased: SGD on the scored prefix
    ttt: str = knob("off", choices=("off", "sgd", "lora", "lora+phased"))
    ttt_lr: float = knob(0.005, 0)  #: TTT's SGD learning rate (the records')
    ttt_epochs: int = knob(3, 0, 1000)  #: passes over each scored chunk
    ttt_momentum: float = knob(0.9, 0, 1)  #: TTT's SGD momentum
    ttt_chunk_tokens: int = knob(32768, 1, BIG)  #: tokens scored before each round of training
    ttt_batch_seqs: int = knob(32, 1, 65536)  #: sequences (EVAL_SEQ_LEN) a TTT step, all ranks together
    ttt_lora_rank: int = knob(96, 1, 4096)  #: LoRA rank on each block's Q/K/V/O/MLP and the head
    ttt_lora_lr: float = knob(1e-4, 0)  #: the LoRAs' AdamW LR (betas 0, 0.999; their output scale 144/rank)
    ttt_lora_wd: float = knob(1.0, 0)  #: the LoRAs' decoupled weight decay
    ttt_lora_chunk: int = knob(48, 1, 2**20)  #: tokens of a document scored before each LoRA step
    ttt_lora_docs: int = knob(64, 1, 65536)  #: documents adapted at once on each rank (a batch)
    ttt_lora_per_loop: bool = knob(False)  #: a crawler block's LoRA per loop (else one for all its loops)
    ttt_phase_docs: int = knob(2000, 0, BIG)  #: lora+phased: the documents that the phases split
    ttt_phases: int = knob(3, 1, 100)  #: SGD phases, after each 1/TTT_PHASES of the prefix is scored
    ttt_phase_lr: float = knob(0.001, 0)  #: their SGD LR (one epoch, TTT_CHUNK_TOKENS chunks, cosine)
    quant: str = knob("gptq", choices=("rtn", "gptq"))  #: quantizer of the block matrices
    quant_k: float = knob(12.85, 0.5, 64)  #: SDClip: matrix clip in row stds (SIZE_TARGET=fit starts here)
    embed_quant_k: float = knob(20.0, 0.5, 64)  #: SDClip k of tables (the fit scales it as QUANT_K)
    #: SDClip k: one for all, or per group (embedding, each block, the rest) from the Hessian traces
    quant_alloc: str = knob("uniform", choices=("uniform", "hessian"))
    #: SDClip k per role, e.g. attn:13,mlp:11.5,embed:14 (the 04-27 record's); the fit scales them together
    quant_roles: str = knob("")
    gptq_damp: float = knob(0.01, 0)  #: GPTQ damping, relative to the mean Hessian diagonal
    #: GPTQ'd rows' clip * (1 + HESSIAN_CLIP (r - 1)), r: a row's Hessian-weighted |w|, mean 1 (04-06: 0.175)
    hessian_clip: float = knob(0.0, 0, 1)
    #: LQER: the LQER_TOP matrices of largest quantization error add its rank-r SVD, int4 factors (04-27: 4)
    lqer_rank: int = knob(0, 0, 4096)
    lqer_top: int = knob(3, 0, 4096)  #: how many matrices LQER_RANK corrects
    gptq_block_size: int = knob(128, 1, 65536)  #: GPTQ columns per lazy-update block
    gptq_act_order: bool = knob(True)  #: GPTQ column order: descending Hessian diagonal (else natural)
    gptq_calib_batches: int = knob(16, 1, 4096)  #: training micro-batches (all ranks) for the GPTQ Hessians
    gptq_loop_aware: str = knob("auto", choices=("auto", "0", "1"))  #: loop-aware GPTQ (auto: with a crawler)
    gptq_reserve_seconds: float = knob(30.0, 0)  #: seconds of MAX_WALLCLOCK_SECONDS kept for calibration
    embed_quant: str = knob("int8", choices=("int8", "int7", "int6", "fp16"))  #: the tied embedding's storage
    embed_gptq: bool = knob(False)  #: GPTQ the tied embedding as the head, on the final hidden states' H
    compress_level: int = knob(11, 0, 11)  #: brotli quality of the artifact (11: the smallest, the slowest)
    byte_shuffle: bool = knob(True)  #: store multi-byte floats byte-plane by byte-plane (compresses better)
    size_limit: int = knob(16_000_000, 1, 10**12)  #: cap on code + model bytes
    #: fit: choose the SDClip k so code + model lands in [SIZE_LIMIT - SIZE_MARGIN, SIZE_LIMIT] (zeroing the
    #: cheapest +-1 values if the search still misses); none: QUANT_K as it is, fail if over the cap
    size_target: str = knob("fit", choices=("fit", "none"))
    size_margin: int = knob(20_000, 0, 10**12)  #: SIZE_TARGET=fit aims at most this many bytes under the cap
    submit_author: str = knob("")  #: submission.json author (experiments/records.py)
    submit_github_id: str = knob("")  #: submission.json github_id
    submit_name: str = knob("")  #: submission.json name
    submit_blurb: str = knob("")  #: submission.json blurb
    explicit: frozenset = field(default=frozenset(), compare=False, repr=False)  # set by the env (not a knob)

    def __post_init__(self) -> None:
        for f in knob_fields():
            check_range(f, getattr(self, f.name))
        heads, dim = self.num_heads, self.model_dim
        require(dim % heads == 0, "MODEL_DIM", f"{dim} is not divisible by NUM_HEADS={heads}")
        require(heads % self.num_kv_heads == 0, "NUM_KV_HEADS", f"{self.num_kv_heads} must divide {heads}")
        head_dim = dim // heads
        require(head_dim % 2 == 0, "MODEL_DIM", f"head dim {head_dim} must be even for RoPE")
        require(self.rope_dims % 2 == 0 and self.rope_dims <= head_dim, "ROPE_DIMS",
                f"{self.rope_dims} must be even and <= head dim {head_dim}")
        require(self.num_flat_layers + self.num_crawler_layers, "NUM_FLAT_LAYERS", "the model has no block")
        micro = self.accum_splits * self.train_seq_len
        require(self.train_batch_tokens % micro == 0, "TRAIN_BATCH_TOKENS",
                f"{self.train_batch_tokens} must be a multiple of ACCUM_SPLITS*TRAIN_SEQ_LEN={micro}")
        require(self.max_wallclock_seconds == 0 or self.train_time_cap > 0, "GPTQ_RESERVE_SECONDS",
                f"{self.gptq_reserve_seconds} leaves no training time in MAX_WALLCLOCK_SECONDS")
        export = self.export_weights
        for ok, var, what in ((self.ema_decay or export != "ema", "EMA_DECAY", "EXPORT_WEIGHTS=ema needs it"),
                              (not self.resume or self.run_id, "RESUME", "RESUME=1 needs RUN_ID"),
                              (self.eval_stride <= self.eval_seq_len, "EVAL_STRIDE", "exceeds EVAL_SEQ_LEN"),
                              (self.crawler_mlp == "standard" or self.num_crawler_layers, "CRAWLER_MLP",
                               "needs a crawler"), (self.embed_wd == -1 or self.embed_wd >= 0, "EMBED_WD",
                                                    "must be -1 (= ADAM_WD) or >= 0"),
                              (self.smear_gate or not self.smear_scalar, "SMEAR_SCALAR", "needs SMEAR_GATE"),
                              (self.parallel_lanes < 2 or self.parallel_start >= 0, "PARALLEL_LANES",
                               "needs PARALLEL_START >= 0")):
            require(ok, var, what)
        self.loops_schedule(), self.ve_block_ids(), self.crawler_at, self.role_ks   # raise if malformed

    def loops_schedule(self) -> list[tuple[float, int]]:
        """[(from fraction, loops)] in order; [(0, CRAWLER_LOOPS)] when no schedule is set."""
        text, var = self.crawler_loops_schedule, "CRAWLER_LOOPS_SCHEDULE"
        if not text:
            return [(0.0, self.crawler_loops)]
        try:
            steps = [(float(f), int(n)) for f, n in (item.split(":") for item in text.split(","))]
        except ValueError:
            raise HyperparameterError(f"{var}={text!r}: expected f:n,... e.g. 0:1,0.5:2") from None
        fracs = [f for f, _ in steps]
        require(fracs[0] == 0 and fracs == sorted(set(fracs)) and fracs[-1] < 1, var,
                f"{text!r}: fractions must start at 0, rise, and stay below 1")
        require(all(1 <= n <= self.crawler_loops for _, n in steps), var,
                f"{text!r}: loop counts must lie in 1..CRAWLER_LOOPS={self.crawler_loops}")
        return steps

    def ve_block_ids(self) -> set[int]:
        """Unique-block indices (flat blocks first, then crawler blocks) that add value embeddings."""
        n_flat, n_all = self.num_flat_layers, self.num_flat_layers + self.num_crawler_layers
        named = {"crawler": range(n_flat, n_all), "flat": range(n_flat), "all": range(n_all)}
        if self.ve_dim == 0:
            return set()
        if self.ve_layers in named:
            return set(named[self.ve_layers])
        try:
            ids = {int(v) for v in self.ve_layers.split(",") if v.strip()}
        except ValueError:
            raise HyperparameterError(f"VE_LAYERS={self.ve_layers!r}: expected crawler, flat, all or "
                                      "indices") from None
        require(all(0 <= i < n_all for i in ids), "VE_LAYERS", f"{sorted(ids)} outside the {n_all} blocks")
        return ids

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Hyperparameters:
        reject_unknown_knobs(env)
        values = {f.name: parse_knob(f, env[f.name.upper()]) for f in knob_fields() if f.name.upper() in env}
        return cls(**values, explicit=frozenset(values))

    def model_knobs(self) -> dict[str, Any]:
        """What the artifact stores to rebuild the network (no paths, run ids or blurbs)."""
        return {f.name: getattr(self, f.name) for f in knob_fields() if f.metadata["model"]}

    @property
    def crawler_at(self) -> int:
        """Flat blocks that run before the crawler."""
        pos, n = self.crawler_position, self.num_flat_layers
        at = n if pos == "end" else n // 2 if pos == "bottleneck" else int(pos) if pos.isdigit() else -1
        require(0 <= at <= n, "CRAWLER_POSITION", f"{pos!r}: expected end, bottleneck or 0..{n} flat blocks")
        return at

    @property
    def role_ks(self) -> dict[str, float]:
        try:
            ks = {r: float(k) for r, k in (item.split(":") for item in self.quant_roles.split(",") if item)}
        except ValueError:
            ks = {"?": 0.0}
        require(set(ks) <= {"attn", "mlp", "embed"} and all(0.5 <= k <= 64 for k in ks.values()),
                "QUANT_ROLES", f"{self.quant_roles!r}: expected role:k,... (attn, mlp, embed; k in 0.5..64)")
        return ks

    @property
    def effective_depth(self) -> int:
        return self.num_flat_layers + self.num_crawler_layers * self.crawler_loops

    @property
    def train_time_cap(self) -> float:
        """Seconds the training loop may use: the cap less what GPTQ calibration needs after it."""
        reserve = self.gptq_reserve_seconds if self.quant == "gptq" else 0.0
        return self.max_wallclock_seconds - reserve if self.max_wallclock_seconds > 0 else 0.0

    def use_compile(self, device: torch.device) -> bool:
        return self.compile == "1" or (self.compile == "auto" and device.type == "cuda")

def knob_fields() -> list[dataclasses.Field]:
    return [f for f in fields(Hyperparameters) if "model" in f.metadata]

def knob_names() -> list[str]:
    return sorted(f.name.upper() for f in knob_fields())

def check_range(f: dataclasses.Field, value: Any) -> None:
    meta, var = f.metadata, f.name.upper()
    if meta["choices"] and value not in meta["choices"]:
        raise HyperparameterError(f"{var}={value!r}: expected one of {', '.join(map(str, meta['choices']))}")
    lo, hi = meta["lo"], meta["hi"] if meta["hi"] is not None else math.inf
    if isinstance(value, float) and not math.isfinite(value) or lo is not None and not lo <= value <= hi:
        raise HyperparameterError(f"{var}={value!r}: must be a finite number in [{lo}, {hi}]")

def parse_knob(f: dataclasses.Field, raw: str) -> Any:
    var, kind, text = f.name.upper(), type(f.default), raw.strip()
    try:
        if kind is bool:
            if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError
            return text.lower() in ("1", "true", "yes", "on")
        if kind is int:
            number = float(text.replace("_", ""))  # accepts 786_432 and 1e6
            if not number.is_integer():
                raise ValueError
            return int(number)
        return float(text) if kind is float else text
    except (ValueError, OverflowError):
        raise HyperparameterError(f"{var}={raw!r}: expected {kind.__name__}") from None

# Names other training scripts use (nanoGPT, Hugging Face's Trainer, upstream's and the seeds' train_gpt.py),
# each with what this script uses instead, or why it has none: setting one is an error, not a silent no-op.
_RENAMED = """ITERATIONS: ITERS NUM_ITERATIONS MAX_STEPS NUM_STEPS MAX_ITERS; NUM_HEADS: N_HEAD
VOCAB_SIZE: VOCAB; SKIP_GATES: SKIP_GATES_ENABLED; MUON_ROW_NORM: MUON_ROW_NORMALIZE
SMEAR_GATE: SMEAR_GATE_ENABLED; ATTN_GATE: SPARSE_ATTN_GATE_ENABLED SPARSE_ATTN_GATE_SCALE
TRAIN_BATCH_TOKENS: TRAIN_BATCH_SIZE BATCH_SIZE PER_DEVICE_TRAIN_BATCH_SIZE; WARMUP_STEPS: WARMUP_ITERS
TRAIN_SEQ_LEN: TRAIN_SEQ_LENGTH SEQ_LEN BLOCK_SIZE CONTEXT_LENGTH MAX_SEQ_LENGTH; COMPILE: TORCH_COMPILE
VAL_LOSS_EVERY: VAL_EVERY EVAL_EVERY EVAL_INTERVAL EVAL_STEPS; MODEL_DIM: N_EMBD D_MODEL DIM HIDDEN_SIZE
NUM_FLAT_LAYERS: NUM_LAYERS N_LAYER; CHECKPOINT_EVERY: CHECKPOINT SAVE_EVERY SAVE_STEPS; MIN_LR_SCALE: MIN_LR
ACCUM_SPLITS: GRADIENT_ACCUMULATION_STEPS; WARMDOWN_ITERS: WARMDOWN_STEPS LR_DECAY_ITERS; QUANT=rtn: SKIP_GPTQ
TRAIN_LOG_EVERY: LOG_EVERY LOG_INTERVAL LOGGING_STEPS; PARALLEL_START: PARALLEL_RESIDUAL_START
MAX_WALLCLOCK_SECONDS: MAX_WALLCLOCK_SECS WALLCLOCK_SECONDS
GRAD_CLIP_NORM: GRAD_CLIP MAX_GRAD_NORM; EVAL_SEQ_LEN: EVAL_SEQ_LENGTH; TIED_EMBED_LR: EMBED_LR HEAD_LR
NGRAM_DIM: BIGRAM_DIM TRIGRAM_DIM; CRAWLER_QUANT_INT8: CRAWLER_QUANT; GPTQ_LOOP_AWARE: LOOP_AWARE_GPTQ
CHOKE_DIM (with CRAWLER_MLP): CRAWLER_CHOKE_DIM; NUM_CRAWLER_LAYERS (0 = no crawler): USE_CRAWLER
NGRAM_HASH=bigram with NGRAM_BUCKETS: BIGRAM_VOCAB_SIZE
NGRAM_HASH=trigram with NGRAM_BUCKETS: TRIGRAM_VOCAB_SIZE
RESUME=1 with RUN_ID: RESUME_FROM INIT_FROM; LOG_DIR / ARTIFACT_DIR: OUTPUT_DIR OUT_DIR
MATRIX_LR / SCALAR_LR / TIED_EMBED_LR: LR LEARNING_RATE; MUON_WD / ADAM_WD: WEIGHT_DECAY
CRAWLER_POSITION / CRAWLER_LOOPS / CRAWLER_LOOPS_SCHEDULE: LOOP_START LOOP_END NUM_LOOPS ENABLE_LOOPING_AT"""
ALIASES = {old: f"here it is {new}" for pair in _RENAMED.replace("\n", "; ").split("; ")
           for new, olds in [pair.split(": ")] for old in olds.split()} | dict.fromkeys(
    "TTT_BURST_ENABLED TTT_BURST_STEPS TTT_BURST_EPOCHS TTT_BURST_LR_FACTOR DISTILL_TEMP".split(),
    "the seeds' replay and self-distillation were deleted: no gain shown (experiments/LOG.md)") | {
    "DEVICE": "CUDA when torch sees a GPU, else the CPU; CUDA_VISIBLE_DEVICES= (empty) forces the CPU",
    "DROPOUT": "there is no dropout", "BIAS": "linear maps have no bias", "TIE_EMBEDDINGS": "always tied",
    "NUM_TRAIN_EPOCHS": "ITERATIONS and MAX_WALLCLOCK_SECONDS bound training",
    **dict.fromkeys(("DTYPE", "FP16", "BF16"), "bf16 autocast on CUDA, fp32 on the CPU"),
    "DRY_RUN": "DRY_RUN=1 bash run.sh runs the cost model", "REHEARSAL": "REHEARSAL=1 bash run.sh rehearses",
    "TRAIN_TFLOPS": "experiments/ablate.py turns it into ITERATIONS",
    "QUANT_COMPARE": "see experiments/compare_exports.py"}
# Knobs of arms that lost and were deleted (experiments/LOG.md has each decision: DELTA_NET_HEADS
# crawler_arms 2026-11-24; HELIX*, LOOP_SMEAR, CRAWLER_LOOP_ROPE_SCALES issue 21, crawler_arms; REPLAY_*,
# DISTILL_*, INST_DIM, QAT_CRAWLER_ONLY, CRAWLER_QUANT_INT8, CHOKE_GROUPS issue 21, no gain shown;
# TRAIN_SAMPLING issue 28, train_sampling; TAP_*, DELIBERATION issue 21, arms_9seeds; SWA_* issue 21, the
# records replaced it by the EMA; QUANT_CLIP, COMPRESSOR quant_budget and quant, 2026-11-23). The value that
# meant off, which experiments/ablate.py needs to resume a sweep whose stored runs had them off, is
# ablate.py's REMOVED_OFF.
REMOVED_KNOBS = dict.fromkeys("""DELTA_NET_HEADS HELIX HELIX_STRIDE HELIX_DIM HELIX_MODE LOOP_SMEAR
CRAWLER_LOOP_ROPE_SCALES REPLAY_BATCHES REPLAY_EPOCHS REPLAY_LR_SCALE DISTILL_STEPS DISTILL_TEMPERATURE
DISTILL_ALPHA DISTILL_LR_SCALE INST_DIM QAT_CRAWLER_ONLY CRAWLER_QUANT_INT8 CHOKE_GROUPS TRAIN_SAMPLING
TAP_DIM TAP_LAYERS TAP_PER_LOOP DELIBERATION SWA_EVERY SWA_START_SCALE QUANT_CLIP COMPRESSOR""".split(),
                              "its arm was deleted: its decision is in experiments/LOG.md")
# Set by platforms (schedulers, Kubernetes' downward API) with one of our prefixes: never knobs. (torchrun's
# RANK, WORLD_SIZE, MASTER_ADDR ... look like none of ours: tests/test_hparams.py passes them.)
FOREIGN_VARS = set("NUM_GPUS NUM_WORKERS NUM_NODES".split())
# Prefixes too generic to claim: an unrelated variable may start with them.
_GENERIC = set("RUN DATA LOG MODEL MAX VAL TRAIN SEED COMPILE ITERATIONS SIZE RECORDS ARTIFACT SUBMIT EMBED "
               "BYTE COMPRESS COMPRESSOR QUANT EVAL POD".split())

def edits(a: str, b: str) -> int:
    """Characters changed between two names, from difflib's opcodes (a swap of neighbours counts 2)."""
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in ops if op != "equal")

def reject_unknown_knobs(env: Mapping[str, str]) -> None:
    """A variable that looks like one of ours but is not one is an error: any case, within two edits of a
    knob, one of our prefixes, another script's name for a knob, or a deleted knob. Unrelated names (HOME,
    OMP_NUM_THREADS, POD_NAME ...) pass (tests/test_hparams.py)."""
    known = set(knob_names())
    prefixes = {n.split("_")[0] for n in known if "_" in n} - _GENERIC
    for var in sorted(env):
        name = var.upper()
        if var in known or var in FOREIGN_VARS:
            continue
        if name in ALIASES or name in REMOVED_KNOBS:
            why = ALIASES.get(name) or REMOVED_KNOBS[name]
            raise HyperparameterError(f"{var}: not a knob of train_gpt.py; {why}")
        distance, closest = min((edits(name, k), k) for k in known)   # a 3-letter knob (TTT): one edit
        if distance <= (1 if len(closest) <= 3 else 2) or "_" in name and name.split("_")[0] in prefixes:
            hint = f"did you mean {closest}?" if distance <= len(closest) // 2 else "see README's knob table"
            raise HyperparameterError(f"{var}: not a knob of train_gpt.py; {hint}")

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed = property(lambda self: self.world_size > 1)
    master = property(lambda self: self.rank == 0)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DistInfo:
        try:
            return cls(*(int(env.get(k, v)) for k, v in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))))
        except ValueError:
            raise HyperparameterError("RANK/WORLD_SIZE/LOCAL_RANK: must be integers (torchrun sets them)") \
                from None

# ======================================================================================================
# Errors, logs and files. An expected failure is a GolfError: main() prints `error: <message>` (rank 0) and
# exits with its code, no traceback. Files are written to a temporary name and renamed; a write that fails
# (a full disk) removes its temporary and leaves the old file as it was.

class GolfError(Exception):
    exit_code = 2

class HyperparameterError(GolfError, ValueError):
    """A bad or unknown environment variable; the message names it."""

class DataError(GolfError, ValueError):
    """Shards, tokenizer, folders or disk: missing, malformed, inconsistent or full."""

class ArtifactError(GolfError, ValueError):
    """A malformed, truncated, tampered or foreign artifact; the message names the file."""

class ArtifactTooLarge(GolfError):
    exit_code = 3

class Diverged(GolfError, FloatingPointError):
    exit_code = 4

def require(ok: bool, subject: str, what: str, cls: type[GolfError] = HyperparameterError) -> None:
    if not ok:
        raise cls(f"{subject}: {what}")

@contextlib.contextmanager
def disk_errors(path: Path, fix: str = "") -> Iterator[None]:
    """An OSError while writing `path` (a full disk, a lost mount) becomes one error line naming it."""
    try:
        yield
    except OSError as err:
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        raise DataError(f"{path}: cannot write ({'disk full' if full else err.strerror or err}) — "
                        f"{fix or 'free space there or point the folder elsewhere'}") from None

def write_atomic(path: Path, data: bytes, fix: str = "") -> None:
    """Write a temporary, then rename it: a reader never sees half a file, a failure keeps the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with disk_errors(path, fix):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

class Logger:
    """Rank 0 prints and appends to logs/<RUN_ID>.txt; other ranks stay quiet."""
    def __init__(self, path: Path | None, append: bool = False):
        self.path = path
        if path is not None and not append:
            write_atomic(path, b"")

    def __call__(self, msg: str) -> None:
        if self.path is None:  # a non-zero rank logs nothing
            return
        print(msg, flush=True)
        with disk_errors(self.path), self.path.open("a") as fh:
            fh.write(msg + "\n")

    def kv(self, **pairs: Any) -> None:
        self(" ".join(f"{k}:{v:.6g}" if isinstance(v, float) else f"{k}:{v}" for k, v in pairs.items()))

class Clock:
    """Seconds per named phase; the training phase's clock stops inside paused() (validation, checkpoints)."""
    def __init__(self, seconds: float = 0.0):
        self.banked, self.since, self.phases = seconds, None, {}

    @property
    def seconds(self) -> float:
        return self.banked + (time.perf_counter() - self.since if self.since is not None else 0.0)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self.since = time.perf_counter()
        try:
            yield
        finally:
            self.banked, self.since = self.seconds, None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        was_running = self.since is not None
        self.banked, self.since = self.seconds, None
        try:
            yield
        finally:
            self.since = time.perf_counter() if was_running else None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0

def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"

def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else \
        f"cpu_{platform.machine()}_{os.cpu_count()}cores"

@functools.lru_cache(maxsize=1)
def source_bytes() -> bytes:
    """The script as it was when first asked (start-up), even if the file changes during the run."""
    return Path(__file__).read_bytes()

# The packed script: `import brotli`, then the compressed code as a string of the 93 printable ASCII
# characters a "..." literal can hold (all but " and \), 38 characters (a base-93 number, lowest digit
# first) for each 31 bytes (93**38 >= 256**31): 1.226 characters a byte where base85 takes 1.25, ~600
# fewer for this script; decoding takes ~0.1 s.
PACKED_PREFIX = b'import brotli\ns="'
PACK_CHARS, PACK_BYTES = 38, 31
# The stub's decoder, after the string: c's digit is its code less 32, less one past " and one past \; the
# last chunk's padding is cut off at the blob's length n.
PACKED_SUFFIX = ('"\nexec(brotli.decompress(b"".join(sum((ord(c)-32-(c>\'"\')-(c>"\\\\"))*93**i for i,c in '
                 'enumerate(s[j:j+{k}])).to_bytes({m},"little")for j in range(0,len(s),{k}))[:{n}]))\n')

@functools.lru_cache(maxsize=1)
def packed_code() -> bytes:
    """The submission's train_gpt.py, what the cap counts: this source without docstrings, comments and
    function annotations, each variable's and field's annotation a bare 0 (ast.unparse: the same program),
    its function locals renamed short (python-minifier), brotli-compressed, written in base 93
    (PACKED_PREFIX) and exec'd by a two-line stub. A script that is already packed is its own packing."""
    src = source_bytes()
    if src.startswith(PACKED_PREFIX):
        return src
    tree = ast.parse(src)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        if isinstance(node, ast.FunctionDef):   # with postponed annotations they are never evaluated
            node.returns = None
            for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs, node.args.vararg,
                        node.args.kwarg]:
                if arg is not None:
                    arg.annotation = None
        if isinstance(node, ast.AnnAssign):   # dataclasses read no field's type (postponed: never evaluated)
            node.annotation = ast.Constant(0)
    try:
        import python_minifier  # noqa: PLC0415
    except ImportError:
        raise GolfError("python-minifier is not installed: the packed script (what the cap counts) needs "
                        "it — pip install -r requirements.txt") from None
    # Function locals get short names (globals, arguments, attributes and fields keep theirs): ~2.3 kB fewer
    # packed bytes; one space an indent level. The readable file is the one runs and tracebacks name.
    code = python_minifier.minify(ast.unparse(tree), remove_annotations=False, hoist_literals=False,
                                  remove_literal_statements=False, rename_globals=False,
                                  constant_folding=False)
    blob = compress_bytes(code.encode())
    digits = "".join(chr(c) for c in range(32, 127) if chr(c) not in '"\\')
    chunks = []
    for j in range(0, len(blob), PACK_BYTES):
        n = int.from_bytes(blob[j:j + PACK_BYTES], "little")
        for _ in range(PACK_CHARS):
            n, d = divmod(n, 93)
            chunks.append(digits[d])
    stub = PACKED_SUFFIX.format(k=PACK_CHARS, m=PACK_BYTES, n=len(blob))
    return PACKED_PREFIX + "".join(chunks).encode() + stub.encode()

# ======================================================================================================
# Data. A shard is 256 little-endian int32 (magic, version, token count) then uint16 tokens; documents start
# with BOS. Training samples windows of the train shards in a seeded random order, a new one each epoch (as
# the records' loader; experiments/LOG.md, train_sampling); the val split is scored whole.
# val_bpb charges each target token its UTF-8 bytes, read from the tokenizer's pieces (byte LUTs).

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
DATA_FIX = "fetch FineWeb: bash setup_pod.sh, or build a local corpus: python data/prepare_local.py --force"
BOS_ID = 1

def shard_tokens(path: str | Path, vocab_size: int | None = None) -> np.ndarray:
    """A shard's tokens, memory-mapped (uint16), with every id checked against the vocabulary; first its
    header and size, without reading its tokens."""
    path = Path(path)
    size = path.stat().st_size
    header = np.fromfile(path, "<i4", SHARD_HEADER_INTS) if size >= 4 * SHARD_HEADER_INTS else None
    n = int(header[2]) if header is not None else 0
    for ok, what in ((header is not None, f"{size} bytes is shorter than the header"),
                     (header is None or header[0] == SHARD_MAGIC, "bad magic: not a token shard"),
                     (header is None or header[1] == SHARD_VERSION, "unsupported version"),
                     (n >= 0 and size == SHARD_HEADER_INTS * 4 + 2 * n,
                      f"size {size} != header + 2*{n} tokens, truncated or corrupt")):
        require(ok, str(path), f"{what} — {DATA_FIX}", DataError)
    tokens = np.memmap(path, "<u2", "r", SHARD_HEADER_INTS * 4, (n,)) if n else np.zeros(0, "<u2")
    top = int(tokens.max()) if n and vocab_size else -1
    require(top < (vocab_size or 1), str(path), f"token id {top} >= VOCAB_SIZE={vocab_size} — set "
            "VOCAB_SIZE/TOKENIZER_PATH to the shards' tokenizer", DataError)
    return tokens

def load_data_shard(path: str | Path, vocab_size: int | None = None) -> Tensor:
    return torch.from_numpy(np.array(shard_tokens(path, vocab_size)))

def shard_files(data_path: str, pattern: str, var: str) -> list[Path]:
    folder = Path(data_path)
    files = sorted(Path(p) for p in glob.glob(str(Path(glob.escape(str(folder))) / pattern)))
    require(bool(files), var, f"no shards match {folder.resolve() / pattern} (DATA_PATH is relative to "
            f"{Path.cwd()}) — set DATA_PATH, or {DATA_FIX}", DataError)
    return files

class ShuffledWindows:
    """As the records' loader: each epoch visits every (seq_len+1)-token window of every train shard once, at
    a phase and in an order drawn from (SEED, epoch); its position is two ints (epoch, index): resumable."""
    def __init__(self, files: list[Path], seq_len: int, seed: int):
        self.maps, self.seq_len, self.seed = [shard_tokens(f) for f in files], seq_len, seed
        self.seek(0, 0)

    def seek(self, epoch: int, pos: int) -> None:
        rng = np.random.default_rng((self.seed, epoch))
        self.phase = int(rng.integers(self.seq_len))
        self.counts = np.array([max((len(m) - 1 - self.phase) // self.seq_len, 0) for m in self.maps])
        self.ends, self.order = np.cumsum(self.counts), rng.permutation(int(self.counts.sum()))
        require(len(self.order) > 0, "TRAIN_SEQ_LEN", f"no shard holds {self.seq_len + 1} tokens", DataError)
        self.epoch, self.pos = epoch, pos

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next n windows, as (shard, start)."""
        out = []
        while len(out) < n:
            if self.pos >= len(self.order):
                self.seek(self.epoch + 1, 0)
            g = self.order[self.pos:self.pos + n - len(out)]
            self.pos += len(g)
            i = np.searchsorted(self.ends, g, "right")
            out += zip(i.tolist(), (self.phase + (g - self.ends[i] + self.counts[i]) * self.seq_len).tolist())
        return out

class DistributedTokenLoader:
    """One micro-batch for every rank from the shared window order: a step's tokens depend on ACCUM_SPLITS
    alone, never on how many processes share it (each rank reads only its own windows)."""
    def __init__(self, files: list[Path], dinfo: DistInfo, device: torch.device, hp: Hyperparameters):
        self.files, self.vocab_size, self.dinfo, self.device = files, hp.vocab_size, dinfo, device
        self.windows = ShuffledWindows(files, hp.train_seq_len, hp.seed)

    def next_batch(self, micro_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        rows, rank, maps = micro_tokens // seq_len, self.dinfo.rank, self.windows.maps
        mine = self.windows.take(rows * self.dinfo.world_size)[rank * rows:(rank + 1) * rows]
        local = torch.stack([torch.from_numpy(maps[i][s:s + seq_len + 1].astype(np.int64)) for i, s in mine])
        if int(local.max()) >= self.vocab_size:   # a shard changed on disk after the preflight: name it
            for i in sorted({i for i, _ in mine}):
                shard_tokens(self.files[i], self.vocab_size)
        local = local.to(self.device, non_blocking=True)
        return local[:, :-1], local[:, 1:]

@dataclass
class ByteLUTs:
    base_bytes: Tensor   # UTF-8 bytes of each piece, without its leading "▁"
    has_space: Tensor    # piece starts with "▁" (one more byte unless it follows a boundary)
    is_boundary: Tensor  # control / unknown / unused pieces: count 0 bytes, no space after them

def build_byte_luts(sp, vocab_size: int) -> ByteLUTs:
    base, space = torch.zeros(vocab_size, dtype=torch.int64), torch.zeros(vocab_size, dtype=torch.bool)
    boundary = torch.ones(vocab_size, dtype=torch.bool)
    for i in range(sp.vocab_size()):
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
            piece, byte = sp.id_to_piece(i), sp.is_byte(i)
            boundary[i], space[i] = False, piece.startswith("▁") and not byte
            base[i] = 1 if byte else len(piece.removeprefix("▁").encode("utf-8"))
    return ByteLUTs(base, space, boundary)

def target_bytes(prev: Tensor, tgt: Tensor, luts: ByteLUTs) -> Tensor:
    lut = {k: v.to(tgt.device) for k, v in dataclasses.asdict(luts).items()}
    return lut["base_bytes"][tgt] + (lut["has_space"][tgt] & ~lut["is_boundary"][prev]).long()

def load_tokenizer(path: str):
    import sentencepiece as spm  # noqa: PLC0415 - only needed once data exists
    require(Path(path).is_file(), "TOKENIZER_PATH", f"{path} does not exist — {DATA_FIX}", DataError)
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except Exception as exc:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError for garbage
        raise DataError(f"TOKENIZER_PATH: {path} is not a SentencePiece model ({exc}) — {DATA_FIX}") \
            from None

def check_tokenizer_fits_shards(sp, val_tokens: Tensor, hp: Hyperparameters) -> None:
    """The tokenizer must be the one that made the shards: the manifest names its sha256 when
    data/prepare_local.py built them; otherwise a few validation documents, decoded and re-encoded, must
    give back their own ids (a different tokenizer of the same size agrees on ~0.9 of them, ours on 1.0)."""
    path, fix = hp.tokenizer_path, "use the tokenizer the shards were made with"
    top = int(val_tokens.int().max())
    require(top < sp.vocab_size(), "TOKENIZER_PATH", f"{path} has {sp.vocab_size()} pieces but the val "
            f"shards hold token id {top} — {fix}", DataError)
    manifest = Path(hp.data_path) / "manifest.json"   # the dataset's, when it has one
    try:
        expected = manifest.is_file() and json.loads(manifest.read_text()).get("tokenizer", {}).get("sha256")
    except (OSError, ValueError) as err:
        raise DataError(f"{manifest}: not readable JSON ({err}) — {DATA_FIX}") from None
    if expected:
        actual = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        require(actual == expected, "TOKENIZER_PATH", f"{path} (sha256 {actual[:12]}…) is not the "
                f"tokenizer the dataset's manifest names ({expected[:12]}…) — {fix}", DataError)
        return
    samples = [val_tokens[a + 1:b].tolist()[:512] for a, b in documents(val_tokens[:65536])[:8]]
    ratios = [difflib.SequenceMatcher(None, s, sp.encode(sp.decode(s))[:len(s)], autojunk=False).ratio()
              for s in samples if s]
    agreement = sum(ratios) / max(len(ratios), 1)
    require(not ratios or agreement >= 0.99, "TOKENIZER_PATH", f"{path} re-encodes the val shards' text to "
            f"other ids (agreement {agreement:.3f}) — {fix}", DataError)

# ======================================================================================================
# Model. Embedding (+ hashed n-grams, SmearGate) -> flat blocks up to CRAWLER_POSITION -> the crawler blocks,
# looped -> the other flat blocks -> tied head, logit soft cap; U-Net skips from the first half of the flat
# blocks (or of all calls) to the second. The forward pass walks a schedule of firings built per loop count,
# so "loops" is data: a crawler block is one module called once per loop; its gradient sums over the loops.

def rms_norm(x: Tensor) -> Tensor:
    """In the input's dtype on every device: CUDA's autocast would run F.rms_norm in fp32, keeping an fp32
    copy of each normed input for the backward, its fp32 output, and a bf16 cast of that for each of q, k and
    v (CPU's autocast keeps bf16). CUDA's kernel computes in fp32 and saves its input and an fp32 scale a
    row."""
    with torch.autocast("cuda", enabled=False):
        return F.rms_norm(x, (x.size(-1),))

class CastedLinear(nn.Linear):
    """Weights stay fp32 for the optimizer; the matmul runs in the activation dtype. Late QAT puts the
    weight on its export grid: qat_bits is fixed before compiling and the 0/1 buffer qat_on switches it,
    so turning QAT on changes a tensor, never the graph (no recompile on the training clock)."""
    def __init__(self, fan_in: int, fan_out: int, zero_init: bool = False):
        super().__init__(fan_in, fan_out, bias=False)
        self.qat_bits, self.qat_k = 0, 0.0
        self.register_buffer("qat_on", torch.zeros(()), persistent=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.qat_bits:
            w = w + self.qat_on * fake_quant_delta(w, self.qat_bits, self.qat_k)
        return F.linear(x, w.to(x.dtype))

def fake_quant_delta(w: Tensor, bits: int, k: float) -> Tensor:
    """The step from w to its export grid (same fp16 row scales), detached: gradients go straight through."""
    qmax = 2 ** (bits - 1) - 1
    wd = w.detach().float()
    scale = _row_scales(wd, row_clip(wd, k), qmax).float()[:, None]
    return (torch.round(wd / scale).clamp(-qmax, qmax) * scale - wd).to(w.dtype)

class Rotary(nn.Module):
    def __init__(self, head_dim: int, rope_dims: int, base: float):
        super().__init__()
        dims = rope_dims or head_dim
        inv_freq = 1.0 / base ** (torch.arange(0, dims, 2).float() / dims)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.to(device))
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)

def attention_backend(device: torch.device) -> str:
    """FlashAttention 3 on a Hopper GPU when importable, else PyTorch SDPA."""
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    return "fa3" if hopper and fa3_attention is not None else "sdpa"

def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    """q [B,T,H,D], k/v [B,T,Hkv,D] -> [B,T,H,D]; GQA without repeating k/v."""
    if backend == "fa3":
        out = fa3_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
        return (out[0] if isinstance(out, tuple) else out).to(q.dtype)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)

class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, qk_gain_init: float, ve_dim: int = 0,
                 gate: tuple[float, int] = (0.0, 12)):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = CastedLinear(dim, heads * self.head_dim)
        self.k, self.v = (CastedLinear(dim, kv_heads * self.head_dim) for _ in "kv")
        self.proj = CastedLinear(heads * self.head_dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((heads,), qk_gain_init))
        self.backend = "sdpa"
        self.ve_proj = CastedLinear(ve_dim, kv_heads * self.head_dim, zero_init=True) if ve_dim else None
        self.ve_scale = nn.Parameter(torch.ones(1)) if ve_dim else None
        self.gate_scale, window = gate   # ATTN_GATE: the records' sparse gate, one sigmoid a head
        self.gate_w = nn.Parameter(torch.zeros(heads, min(window, dim))) if self.gate_scale else None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], xsa: bool, ve: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = rms_norm(self.q(x).view(B, T, self.heads, self.head_dim))
        k = rms_norm(self.k(x).view(B, T, self.kv_heads, self.head_dim))
        v = self.v(x)
        if ve is not None and self.ve_proj is not None:
            v = v + self.ve_scale.to(v.dtype) * self.ve_proj(ve)
        v = v.view(B, T, self.kv_heads, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = causal_attention(q, k, v, self.backend)
        if xsa:
            y = exclusive(y, v)
        if self.gate_w is not None:
            g = F.linear(x[..., :self.gate_w.size(1)], self.gate_w.to(x.dtype))
            y = y * torch.sigmoid(self.gate_scale * g)[..., None]
        return self.proj(y.reshape(B, T, -1))

def exclusive(y: Tensor, v: Tensor) -> Tensor:
    """XSA: remove from each head's output its component along the token's own value (GQA: v broadcast)."""
    B, T, H, D = y.shape
    y = y.view(B, T, v.size(2), H // v.size(2), D)
    v_hat = F.normalize(v.float(), dim=-1).to(y.dtype).unsqueeze(3)
    return (y - (y * v_hat).sum(-1, keepdim=True) * v_hat).view(B, T, H, D)

@contextlib.contextmanager
def own_rng(stream: int) -> Iterator[None]:
    """An arm's weights draw from a stream of their own (seeded from the global one, left as it was), so
    every weight the control has starts the same with the arm on or off: a paired arm differs by the arm."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (), device="cpu")) ^ stream)   # cpu: also for meta models
        yield

def relu2(h: Tensor, slope: float) -> Tensor:
    return (F.leaky_relu(h, slope) if slope else F.relu(h)).square()

class MLP(nn.Module):
    def __init__(self, dim: int, mult: float, act: str, slope: float):
        super().__init__()
        hidden = int(round(mult * dim))
        self.up, self.down = CastedLinear(dim, hidden), CastedLinear(hidden, dim, zero_init=True)
        self.slope = slope if act == "leaky_relu2" else 0.0

    def forward(self, x: Tensor, loop: int = 0) -> Tensor:
        return self.down(relu2(self.up(x), self.slope))

class ChokeMLP(MLP):
    """The crawler MLP with a per-loop bottleneck as its only way out (#1308's flat choke, the shape that won
    on the seeds' pod): out = up_l(act(down_l(act(up x)))), down_l: hidden -> CHOKE_DIM, up_l zero-init."""
    def __init__(self, dim: int, hp: Hyperparameters):
        super().__init__(dim, hp.crawler_mlp_mult, hp.mlp_act, hp.crawler_mlp_leaky_slope)
        self.down, loops = None, range(hp.crawler_loops)
        with own_rng(2):
            self.loop_down = nn.ModuleList(CastedLinear(self.up.out_features, hp.choke_dim) for _ in loops)
            self.loop_up = nn.ModuleList(CastedLinear(hp.choke_dim, dim, True) for _ in loops)

    def forward(self, x: Tensor, loop: int = 0) -> Tensor:
        return self.loop_up[loop](relu2(self.loop_down[loop](relu2(self.up(x), self.slope)), self.slope))

class Block(nn.Module):
    def __init__(self, hp: Hyperparameters, make_mlp: Callable[[], nn.Module], ve_dim: int = 0):
        super().__init__()
        self.attn = Attention(hp.model_dim, hp.num_heads, hp.num_kv_heads, hp.qk_gain_init, ve_dim,
                              (hp.attn_gate, hp.gate_window))
        self.mlp = make_mlp()   # built after attention: the order the RNG has always been drawn in
        self.attn_scale = nn.Parameter(torch.ones(hp.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(hp.model_dim))
        # resid_mix[0] weighs the running stream, resid_mix[1] the embedding x0.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(hp.model_dim), torch.zeros(hp.model_dim))))
        if hp.parallel_lanes == 2:   # every block has them, as the record's: [attn, mlp][lane], [lane]
            self.lane_post = nn.Parameter(torch.ones(2, 2))
            self.lane_resid = nn.Parameter(torch.full((2,), 1.1))

    def forward(self, x: Tensor, x0: Tensor, rope: tuple[Tensor, Tensor], f: Firing, ve: Tensor | None,
                lane: Tensor | None = None):
        """lane: the MLP's lane of PARALLEL_LANES=2 (x is attention's); then both lanes are returned."""
        mixed = self.resid_mix[0].to(x.dtype) * x + self.resid_mix[1].to(x.dtype) * x0
        a = self.attn_scale.to(x.dtype) * self.attn(rms_norm(mixed) * f.ln, rope, f.xsa, ve)
        if lane is not None:
            m = self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(lane) * f.ln, f.loop)
            p, r = self.lane_post.to(x.dtype), self.lane_resid.to(x.dtype)
            return r[0] * x + p[0, 0] * a + p[1, 0] * m, r[1] * lane + p[0, 1] * a + p[1, 1] * m
        y = mixed + a
        return y + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(mixed if f.parallel else y) * f.ln, f.loop)

NGRAM_PRIMES = (36313, 27191, 51647)  # one distinct prime per context position: equal tokens never cancel

def ngram_buckets(ids: Tensor, order: int, buckets: int, vocab: int) -> Tensor:
    """Bucket of (t-order+1 .. t) for every position. A context token from another document (across
    a BOS) or before the sequence start is replaced by `vocab`; with no context at all -> buckets-1."""
    doc = torch.cumsum(ids == BOS_ID, dim=1)
    h = ids * NGRAM_PRIMES[0]
    any_context = torch.zeros_like(ids, dtype=torch.bool)
    for j in range(1, order):
        prev = F.pad(ids, (j, 0), value=vocab)[:, :-j]
        same_doc = F.pad(doc, (j, 0), value=-1)[:, :-j] == doc
        h = h ^ (torch.where(same_doc, prev, vocab) * NGRAM_PRIMES[j])
        any_context |= same_doc
    return torch.where(any_context, h % (buckets - 1), buckets - 1)

class NGramHash(nn.Module):
    def __init__(self, order: int, buckets: int, dim: int, model_dim: int, vocab: int):
        super().__init__()
        self.order, self.buckets, self.vocab = order, buckets, vocab
        self.table = nn.Parameter(torch.randn(buckets, dim) * 0.02)
        self.proj = CastedLinear(dim, model_dim)
        self.scale = nn.Parameter(torch.full((1,), 0.05))

    def forward(self, ids: Tensor) -> Tensor:
        buckets = ngram_buckets(ids, self.order, self.buckets, self.vocab)
        return self.scale * self.proj(F.embedding(buckets, self.table))

class SmearGate(nn.Module):
    """x_t += lam * sigmoid(W x_t[:k]) * x_{t-1}; lam starts at 0; nothing crosses into a new document.
    W: one gate a channel from 32 dims (a matrix, Muon's), or scalar (the records'): one gate, from zero."""
    def __init__(self, dim: int, scalar: bool = False, window: int = 12):
        super().__init__()
        self.k = min(window if scalar else 32, dim)
        self.gate = None if scalar else CastedLinear(self.k, dim)
        self.gate_w = nn.Parameter(torch.zeros(1, self.k)) if scalar else None   # Adam's, as the records'
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        prev = F.pad(x, (0, 0, 1, 0))[:, :-1] * (ids != BOS_ID).unsqueeze(-1).to(x.dtype)
        h = x[..., :self.k]
        g = self.gate(h) if self.gate_w is None else F.linear(h, self.gate_w.to(x.dtype))
        return x + self.lam.to(x.dtype) * torch.sigmoid(g) * prev

@dataclass(frozen=True)
class Firing:
    """One block call of the forward pass, in order. loop < 0: a flat block."""
    block: int               # index into CrawlerGPT.blocks (flat blocks first, then crawler blocks)
    loop: int = -1
    enter: bool = False      # first crawler block of a loop: the loop embedding goes in
    leave: bool = False      # last crawler block of a loop: LOOP_DT steps from the loop's input towards it
    skip_in: int = -1        # U-Net skip weight added (from the last pushed skip) before the block
    skip_out: bool = False   # push the block's output as a U-Net skip
    ln: float = 1.0          # LN_SCALE's factor on the block's normed inputs
    xsa: bool = False        # exclusive self attention
    parallel: bool = False   # attention and MLP read the same input

def build_schedule(hp: Hyperparameters, loops: int) -> tuple[Firing, ...]:
    """The forward pass as data: flat blocks up to CRAWLER_POSITION, the crawler `loops` times, the other flat
    blocks. The U-Net joins the flat calls (SKIPS=flat) or all: the first half push skips, the rest pop."""
    n_flat, n_crawl, at, depth = hp.num_flat_layers, hp.num_crawler_layers, hp.crawler_at, hp.effective_depth
    crawl = [(n_flat + c, loop) for loop in range(loops) for c in range(n_crawl)]
    calls = [(b, -1) for b in range(at)] + crawl + [(b, -1) for b in range(at, n_flat)]
    joined = [d for d, (_, loop) in enumerate(calls) if hp.skips == "virtual" or loop < 0]
    n_enc, n_xsa = len(joined) // 2, depth if hp.xsa_last_n < 0 else hp.xsa_last_n
    pops = {d: j for j, d in enumerate(joined[n_enc:]) if j < n_enc}
    out = []
    for d, (b, loop) in enumerate(calls):
        unique = b if b < at else b + n_crawl if b < n_flat else at + b - n_flat
        i = d if hp.ln_scale_depth == "virtual" else unique
        ln = 1.0 / math.sqrt(i + 1) if hp.ln_scale else 1.0
        out.append(Firing(b, loop, loop >= 0 and b == n_flat, loop >= 0 and b == n_flat + n_crawl - 1,
                          pops.get(d, -1), d in joined[:n_enc], ln, d >= depth - n_xsa,
                          0 <= hp.parallel_start <= unique))
    return tuple(out)

LOSS_CHUNK = 256   # positions of the loss at a time: 48 x 256 x 8192 fp32 logits are 0.4 GB a copy

class CrawlerGPT(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.hp = hp
        self.tok_emb = nn.Embedding(hp.vocab_size, hp.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=hp.tied_embed_init_std)
        ve, dim = hp.ve_block_ids(), hp.model_dim
        n_flat = hp.num_flat_layers
        flat_mlp = functools.partial(MLP, dim, hp.mlp_mult, hp.mlp_act, hp.mlp_leaky_slope)
        self.flat = nn.ModuleList(Block(hp, flat_mlp, hp.ve_dim if i in ve else 0) for i in range(n_flat))
        crawler_mlp = functools.partial(ChokeMLP, dim, hp) if hp.crawler_mlp != "standard" else \
            functools.partial(MLP, dim, hp.crawler_mlp_mult, hp.mlp_act, hp.crawler_mlp_leaky_slope)
        self.crawler = nn.ModuleList(Block(hp, crawler_mlp, hp.ve_dim if n_flat + i in ve else 0)
                                     for i in range(hp.num_crawler_layers))
        self.ve_table = nn.Parameter(torch.randn(hp.vocab_size, hp.ve_dim) * 0.02) if ve else None
        order = {"bigram": 2, "trigram": 3}.get(hp.ngram_hash)
        self.ngram = NGramHash(order, hp.ngram_buckets, hp.ngram_dim, dim, hp.vocab_size) if order else None
        self.smear = SmearGate(dim, hp.smear_scalar, hp.gate_window) if hp.smear_gate else None
        self.schedules = {n: build_schedule(hp, n) for n in range(1, hp.crawler_loops + 1)}
        n_skip = max(f.skip_in for f in self.schedules[hp.crawler_loops]) + 1
        self.skip_weights = nn.Parameter(torch.ones(n_skip, dim))
        self.skip_gates = nn.Parameter(torch.zeros(n_skip, dim)) if hp.skip_gates else None
        self.rotary = Rotary(dim // hp.num_heads, hp.rope_dims, hp.rope_base)
        # one orthonormal vector a loop (the QR of a seeded Gaussian matrix), added to the crawler's input as
        # the loop starts
        gauss = torch.randn(dim, hp.crawler_loops, generator=torch.Generator().manual_seed(hp.seed))
        embeds = torch.linalg.qr(gauss)[0].T.contiguous() * hp.loop_embed_scale
        self.loop_embed = nn.Parameter(embeds) if hp.num_crawler_layers and hp.loop_embed_scale else None
        self.blocks = [*self.flat, *self.crawler]   # a plain list: the ModuleLists above own the modules
        mats = [m.weight for m in self.modules() if isinstance(m, CastedLinear) and min(m.weight.shape) >= 64]
        for w in mats if hp.matrix_init == "orthogonal" and not self.tok_emb.weight.is_meta else []:
            if w.any():   # as the records: each matrix of at least 64 x 64; zero-init projections stay zero
                nn.init.orthogonal_(w)

    def tables(self) -> list[nn.Parameter]:
        """Embedding tables: their own Adam, their own storage kind."""
        return [p for p in (self.tok_emb.weight, self.ve_table, self.ngram.table if self.ngram else None)
                if p is not None]

    def set_backends(self, attention: str) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = attention

    def embed(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids)
        if self.ngram is not None:
            x = x + self.ngram(ids).to(x.dtype)
        if self.smear is not None:
            x = self.smear(x, ids)
        x = rms_norm(x)
        # Under autocast the residual stream lives in the compute dtype (half the activation memory).
        kind = x.device.type
        autocasting = kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind)
        return x.to(torch.get_autocast_dtype(kind)) if autocasting else x

    def hidden(self, ids: Tensor, loops: int | None = None) -> Tensor:
        """loops < CRAWLER_LOOPS runs a shortened crawler (a schedule's or a cadence's single-loop steps)."""
        x = x0 = self.embed(ids)
        rope = self.rotary(ids.size(1), ids.device)
        ve = F.embedding(ids, self.ve_table) if self.ve_table is not None else None  # deterministic backward
        skips, lane = [], None   # lane: the MLP's, from the first block of PARALLEL_LANES=2 on
        for f in self.schedules[loops or self.hp.crawler_loops]:
            if f.skip_in >= 0:
                skip, gates = self.skip_weights[f.skip_in].to(x.dtype) * skips.pop(), self.skip_gates
                x = x + skip if gates is None else torch.lerp(skip, x, gates[f.skip_in].sigmoid().to(x.dtype))
            if f.enter:
                anchor, x = x, x if self.loop_embed is None else x + self.loop_embed[f.loop].to(x.dtype)
            if f.parallel and self.hp.parallel_lanes == 2:
                x, lane = self.blocks[f.block](x, x0, rope, f, ve, x if lane is None else lane)
            else:
                x = self.blocks[f.block](x, x0, rope, f, ve)
            if f.leave and self.hp.loop_dt < 1:   # contractive: a step of size dt towards F(x), not a jump
                x = (1 - self.hp.loop_dt) * anchor + self.hp.loop_dt * x
            if f.skip_out:
                skips.append(x)
        return rms_norm(x if lane is None else (x + lane) / 2)

    def logits(self, ids: Tensor, loops: int | None = None, head: Callable | None = None) -> Tensor:
        """Soft-capped fp32 logits; ids: token ids, or hidden states (the loss's chunks); head: a LoRA of the
        tied head (TTT=lora), added."""
        h = ids if ids.is_floating_point() else self.hidden(ids, loops)
        logits = F.linear(h, self.tok_emb.weight).float()
        logits = logits + head(h).float() if head else logits
        cap = self.hp.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def nll(self, logits: Tensor, targets: Tensor) -> Tensor:
        nll = F.cross_entropy(logits.flatten(0, -2), targets.reshape(-1), reduction="none")
        return nll.view(targets.shape)

    def forward(self, ids: Tensor, targets: Tensor, per_token: bool = False, loops: int = None,
                head: Callable | None = None) -> Tensor:
        """Mean loss (per-token NLL with per_token): one entry point for training and eval, compiled too.
        Without a LoRA head the loss goes LOSS_CHUNK positions at a time, each chunk's logits rebuilt in the
        backward (checkpointed): the micro-batch's fp32 logits (3.2 GB a copy at the pod's) never exist at
        once. With one (TTT=lora: its calls counted, its batch small) it takes one pass, through logits()."""
        if head:
            nll = self.nll(self.logits(ids, loops, head), targets)
        else:
            h = self.hidden(ids, loops)
            nll = torch.cat([checkpoint(lambda h, y: self.nll(self.logits(h), y), h[:, t:t + LOSS_CHUNK],
                                        targets[:, t:t + LOSS_CHUNK], use_reentrant=False)
                             for t in range(0, h.size(1), LOSS_CHUNK)], 1)
        return nll if per_token else nll.mean()

    def setup_qat(self, hp: Hyperparameters) -> None:
        """Fix each matrix's fake-quant grid (int6, SDClip QUANT_K) before compiling; set_qat flips it on."""
        for m in self.modules():
            if isinstance(m, CastedLinear):
                m.qat_bits, m.qat_k = 6, hp.quant_k

    def set_qat(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, CastedLinear):
                m.qat_on.fill_(float(on))

def count_unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() visits a shared tensor once

# ======================================================================================================
# Optimizers. Matrices of linear maps: Muon (momentum, then Newton-Schulz orthogonalisation; each rank
# orthogonalises a share and one all-reduce spreads the updates). Embedding tables: AdamW at their own LR.
# Gains, vectors and loop embeddings: AdamW. Routing is by what owns a parameter, never by its name.

# (a, b, c) of x <- a x + (b G + c G^2) x, step by step; the last repeats. Polar Express (arXiv:2505.16932):
# each step's minimax quintic, as PR #1344 and the records since 2026-04 (theirs, to float32 precision).
NS_COEFFS = {"quintic": ((3.4445, -4.7750, 2.0315),),
             "polar": ((8.156554, -22.483294, 15.87877), (4.04293, -2.8089175, 0.5000178),
                       (3.8916678, -2.772484, 0.50606483), (3.2857537, -2.3681295, 0.46449023),
                       (2.3465414, -1.7097828, 0.4232355))}

def newton_schulz5(grad: Tensor, steps: int, eps: float = 1e-7, dtype: torch.dtype | None = None,
                   coeffs: tuple = NS_COEFFS["quintic"]) -> Tensor:
    """Approximately orthogonalise a matrix (all singular values pushed near 1); bf16 on a GPU."""
    x = grad.to(dtype or (torch.bfloat16 if grad.is_cuda else torch.float32))
    x = x / (x.norm() + eps)
    transposed = x.size(0) > x.size(1)
    x = x.T if transposed else x
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x

class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 rank: int = 0, world_size: int = 1, orthogonalize=newton_schulz5, row_norm: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay, nesterov=True, row_norm=row_norm))
        self.rank, self.world_size, self.orthogonalize = rank, world_size, orthogonalize
        self.flat = []   # buffers allocated once, not on every step
        for group in self.param_groups:
            first = group["params"][0]
            self.flat.append(torch.zeros(sum(p.numel() for p in group["params"]), device=first.device,
                                         dtype=torch.bfloat16 if first.is_cuda else torch.float32))
            for i, p in enumerate(group["params"]):
                if i % world_size == rank:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self):
        for group, flat in zip(self.param_groups, self.flat):
            params = group["params"]
            flat.zero_()
            offset = 0
            for i, p in enumerate(params):
                if i % self.world_size == self.rank and p.grad is not None:
                    flat[offset:offset + p.numel()] = self._update(p, group).flatten()
                offset += p.numel()
            if self.world_size > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()

    def _update(self, p: Tensor, group: dict) -> Tensor:
        buf = self.state[p]["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        g = g / g.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(g.dtype) if group["row_norm"] else g
        g = self.orthogonalize(g, group["backend_steps"])
        return g * max(1.0, p.size(0) / p.size(1)) ** 0.5

def route_params(model: CrawlerGPT) -> dict[str, list[tuple[str, nn.Parameter]]]:
    linear = {id(m.weight) for m in model.modules() if isinstance(m, CastedLinear)}
    tables = {id(p) for p in model.tables()}
    groups: dict[str, list] = {"muon": [], "embed": [], "scalar": []}
    for name, p in model.named_parameters():
        groups["embed" if id(p) in tables else "muon" if id(p) in linear else "scalar"].append((name, p))
    return groups

def build_optimizers(model: CrawlerGPT, hp: Hyperparameters, dinfo: DistInfo, compiled: bool = False) -> list:
    groups = route_params(model)
    adam = dict(betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, fused=next(model.parameters()).is_cuda)
    wd = {"embed": hp.adam_wd if hp.embed_wd < 0 else hp.embed_wd, "scalar": hp.adam_wd}
    opts: list = [torch.optim.AdamW([p for _, p in groups[g]], lr=lr, weight_decay=wd[g], **adam)
                  for g, lr in (("embed", hp.tied_embed_lr), ("scalar", hp.scalar_lr))]
    if groups["muon"]:
        ortho = torch.compile(newton_schulz5, backend=hp.compile_backend, fullgraph=True, dynamic=True) \
            if compiled else newton_schulz5
        opts.append(Muon([p for _, p in groups["muon"]], hp.matrix_lr, hp.muon_momentum,
                         hp.muon_backend_steps, hp.muon_wd, dinfo.rank, dinfo.world_size,
                         functools.partial(ortho, coeffs=NS_COEFFS[hp.muon_ns]), hp.muon_row_norm))
    for opt in opts:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return opts

# ======================================================================================================
# Training. The clock runs only inside the step loop (validation and checkpoints pause it) and stops
# GPTQ_RESERVE_SECONDS short of the cap, keeping time for calibration. The LR holds, then decays linearly
# over the warmdown; late QAT switches on below its threshold; an EMA averages the weights. A
# checkpoint holds everything a resumed run needs to continue bit for bit.

def steps_left(hp: Hyperparameters, step: int, elapsed_s: float) -> float:
    """Steps still to run: bounded by ITERATIONS and by the wallclock cap at the current step rate."""
    left = hp.iterations - step
    if hp.train_time_cap > 0 and step > 0:
        left = min(left, (hp.train_time_cap - elapsed_s) / (elapsed_s / step))
    return left

def lr_scale(hp: Hyperparameters, step: int, elapsed_s: float) -> float:
    """1, then a linear warmdown to MIN_LR_SCALE over the last WARMDOWN_ITERS (or WARMDOWN_FRAC) steps."""
    left = steps_left(hp, step, elapsed_s)
    warmdown = hp.warmdown_frac * (step + left) if hp.warmdown_frac else hp.warmdown_iters
    return max(hp.min_lr_scale, min(1.0, left / warmdown)) if warmdown > 0 else 1.0

def muon_momentum(hp: Hyperparameters, step: int) -> float:
    frac = min(step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * hp.muon_momentum_warmup_start + frac * hp.muon_momentum

class EMA:
    """The exported average of the state dict, warmed up as min(EMA_DECAY, (1+t)/(10+t)) for short runs."""
    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.weights = {k: v.detach().float().clone() for k, v in model.state_dict().items()} if decay else {}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items() if self.weights else ():
            self.weights[k].lerp_(v.float(), 1 - decay)

@dataclass
class Trainer:
    hp: Hyperparameters
    dinfo: DistInfo
    device: torch.device
    model: CrawlerGPT          # the raw module (weights live here)
    step_model: nn.Module      # compiled and/or DDP-wrapped view used for training steps
    optimizers: list
    loader: DistributedTokenLoader
    log: Logger
    checkpoint_path: Path

    def __post_init__(self):
        self.ema = EMA(self.model, self.hp.ema_decay)
        self.step, self.clock, self.qat_on, self.elapsed = 0, Clock(), False, 0.0
        self.curve, self.last_good = [], None   # validation curve; the last checkpoint written (a Path)

    def next_batches(self) -> list[tuple[Tensor, Tensor]]:
        micro = self.hp.train_batch_tokens // self.hp.accum_splits
        return [self.loader.next_batch(micro, self.hp.train_seq_len)
                for _ in range(self.hp.accum_splits // self.dinfo.world_size)]

    def train_step(self, batches: list[tuple[Tensor, Tensor]], lr_mult: float, momentum: float,
                   loops: int | None = None) -> float:
        total = torch.zeros((), device=self.device)
        for micro, (x, y) in enumerate(batches):
            if isinstance(self.step_model, nn.parallel.DistributedDataParallel):
                self.step_model.require_backward_grad_sync = micro == len(batches) - 1
            with autocast(self.device):
                loss = self.step_model(x, y, loops=loops)
            (loss / len(batches)).backward()
            total += loss.detach()
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult
                if isinstance(opt, Muon):
                    g["momentum"] = momentum
        if self.hp.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.hp.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return self.sync(total, len(batches))

    def sync(self, loss_sum: Tensor, n_micro: int) -> float:
        """The step's one host-device sync: the mean loss, and rank 0's clock for every rank's schedule."""
        shared = torch.stack([loss_sum.float(), torch.tensor(self.clock.seconds if self.dinfo.master else 0.0,
                                                              device=self.device)])
        if self.dinfo.distributed:
            dist.all_reduce(shared, op=dist.ReduceOp.SUM)
        loss_total, self.elapsed = shared.tolist()
        loss = loss_total / (n_micro * self.dinfo.world_size)
        if not math.isfinite(loss):
            saved = str(self.last_good) if self.last_good else "none"
            raise Diverged(f"train loss: {loss} at step {self.step + 1}; last good checkpoint: {saved}; "
                           "nothing exported — lower the LRs or GRAD_CLIP_NORM")
        return loss

    def loops_for(self, step: int) -> int:
        """The schedule's loop count at this point of training; cadence runs one loop off its beat."""
        hp = self.hp
        progress = self.elapsed / hp.train_time_cap if hp.train_time_cap > 0 else step / max(hp.iterations, 1)
        loops = [n for f, n in hp.loops_schedule() if progress >= f][-1]
        return loops if hp.crawler_cadence == 1 or step % hp.crawler_cadence == 0 else 1

    def loop_counts(self) -> list[int]:
        """Every loop count the run will train with: each is a graph to compile before the clock starts."""
        counts = {n for _, n in self.hp.loops_schedule()} | ({1} if self.hp.crawler_cadence > 1 else set())
        return sorted(counts, reverse=True)

    def set_qat(self, scale: float) -> None:
        """Late QAT switches on once, when the LR scale first drops below the threshold."""
        if self.qat_on or not (self.hp.late_qat_threshold and scale < self.hp.late_qat_threshold):
            return
        self.qat_on = True
        self.model.set_qat(True)
        self.log.kv(late_qat="on", step=self.step, lr_scale=f"{scale:.3f}")

    def prime_compile(self) -> None:
        """Run WARMUP_STEPS real steps so compilation happens off the clock, then undo them. The last
        steps run with late QAT on and at every loop count the run will use, so no graph is compiled on
        the training clock (QAT flips a buffer; it needs no graph of its own, but warming it proves so)."""
        if not (self.hp.warmup_steps and self.hp.use_compile(self.device)):
            self.log("warmup:skipped (compile off)")
            return
        saved, t0, counts = self.snapshot(), time.perf_counter(), self.loop_counts()
        for s in range(max(self.hp.warmup_steps, 2 * len(counts))):
            self.model.set_qat(self.hp.late_qat_threshold > 0 and s % 2 == 1)
            loops = counts[(s // 2) % len(counts)]
            self.train_step(self.next_batches(), 1.0, muon_momentum(self.hp, 0), loops)
        self.model.set_qat(False)
        self.restore(saved)
        self.log(f"warmup:done steps:{self.hp.warmup_steps} seconds:{time.perf_counter() - t0:.1f}")

    def validate(self, val_tokens: Tensor, luts: ByteLUTs | Tensor, full: bool) -> dict:
        hp = self.hp
        check = val_tokens if full or not hp.val_max_tokens else val_tokens[: hp.val_max_tokens + 1]
        with self.clock.paused():
            loss, bpb = evaluate(self.model, check, luts, hp.train_seq_len, hp.train_seq_len,
                                 hp.val_batch_size, self.dinfo, self.device)
        self.log.kv(step=self.step, val_loss=loss, val_bpb=bpb, train_time=f"{self.clock.seconds:.1f}s")
        if not full:   # the curve is one slice throughout: the full split's score is a step, not progress
            self.curve.append({"step": self.step, "train_seconds": self.clock.seconds, "val_loss": loss,
                               "val_bpb": bpb})
        return {"val_loss": loss, "val_bpb": bpb}

    def train(self, data: RunData) -> dict:
        """The step loop, then the export weights and their pre-quant score."""
        hp = self.hp
        self.resume() if hp.resume else self.prime_compile()
        with self.clock.running():
            while steps_left(hp, self.step, self.elapsed) > 0:
                if hp.val_loss_every and self.step % hp.val_loss_every == 0:
                    self.validate(data.val_tokens, data.luts, full=False)
                scale = lr_scale(hp, self.step, self.elapsed)
                self.set_qat(scale)
                try:
                    batches = self.next_batches()
                except DataError:   # a shard changed after the preflight: keep the run resumable
                    with self.clock.paused():
                        self.save_checkpoint()
                    raise
                loops = self.loops_for(self.step)
                loss = self.train_step(batches, scale, muon_momentum(hp, self.step), loops)
                self.step += 1
                self.ema.update(self.model)
                if self.step % hp.train_log_every == 0 or self.step == 1:
                    self.log_progress(loss, scale)
                last = steps_left(hp, self.step, self.elapsed) <= 0   # checkpointed: an export can redo it
                if hp.checkpoint_every and (self.step % hp.checkpoint_every == 0 or last):
                    with self.clock.paused():
                        self.save_checkpoint()
        result = {"steps": self.step, "train_seconds": self.clock.seconds,
                  "step_ms": 1000 * self.clock.seconds / max(self.step, 1), "curve": self.curve}
        if self.device.type == "cuda":
            result["peak_memory_mib"] = torch.cuda.max_memory_allocated() // 2**20
        result["export_weights"] = self.use_export_weights()
        pre = self.validate(data.val_tokens, data.luts, full=True)
        result["pre_quant_val_bpb"] = pre["val_bpb"]
        self.log.kv(export_weights=result["export_weights"], pre_quant_val_bpb=f"{pre['val_bpb']:.6f}")
        return result

    def log_progress(self, loss: float, scale: float) -> None:
        hp, elapsed = self.hp, max(self.elapsed, 1e-9)
        step_ms = 1000 * elapsed / self.step
        eta = max(0.0, min(hp.iterations - self.step, steps_left(hp, self.step, elapsed))) * step_ms / 1000
        self.log.kv(step=f"{self.step}/{hp.iterations}", train_loss=f"{loss:.5f}", lr_scale=f"{scale:.3f}",
                    tok_s=f"{hp.train_batch_tokens * self.step / elapsed:.0f}", step_avg=f"{step_ms:.1f}ms",
                    eta=f"{eta:.0f}s")

    def use_export_weights(self) -> str:
        """Load the EXPORT_WEIGHTS into the model (returns which); fake quantization goes off for good."""
        self.model.set_qat(False)
        if self.hp.export_weights == "raw":
            return "raw"
        own = self.model.state_dict()
        self.model.load_state_dict({k: v.to(own[k].dtype) for k, v in self.ema.weights.items()})
        return "ema"

    def snapshot(self) -> dict:
        """Everything a resumed run needs to continue bit for bit."""
        state = {"step": self.step, "train_seconds": self.clock.seconds, "model": self.model.state_dict(),
                 "optimizers": [o.state_dict() for o in self.optimizers], "qat_on": self.qat_on,
                 "ema": (self.ema.weights, self.ema.updates), "rng_cpu": torch.get_rng_state(),
                 "windows": torch.tensor([self.loader.windows.epoch, self.loader.windows.pos])}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return copy.deepcopy(state)

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for opt, st in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(st)
        self.ema.weights, self.ema.updates = state["ema"]
        self.loader.windows.seek(*state["windows"].tolist())
        self.step, self.clock = state["step"], Clock(state["train_seconds"])
        self.elapsed = state["train_seconds"]
        torch.set_rng_state(state["rng_cpu"].cpu())
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        if state["qat_on"]:
            self.set_qat(0.0)

    def save_checkpoint(self) -> None:
        """One file a rank (Muon keeps momenta where it computes them), never one with a non-finite tensor."""
        state = self.snapshot()
        tensors = [*state["model"].values(), *(t for o in state["optimizers"] for s in o["state"].values()
                                               for t in s.values() if isinstance(t, Tensor))]
        if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
            self.log.kv(checkpoint="skipped_non_finite", step=self.step, last_good=str(self.last_good))
            return
        buf = io.BytesIO()
        torch.save(state, buf)
        write_atomic(self.checkpoint_path, buf.getvalue(), "free space there; the last checkpoint is intact")
        self.last_good = self.checkpoint_path
        self.log.kv(checkpoint=str(self.checkpoint_path), step=self.step)

    def resume(self) -> None:
        path = self.checkpoint_path
        require(path.exists(), "RESUME", f"no checkpoint {path} for RUN_ID={self.hp.run_id} — drop "
                "RESUME to start afresh", DataError)
        self.restore(torch.load(path, map_location=self.device, weights_only=True))
        self.last_good = path
        self.log.kv(resumed_from=str(path), step=self.step, train_seconds=f"{self.clock.seconds:.1f}")

def compile_model(model: nn.Module, hp: Hyperparameters, device: torch.device) -> nn.Module:
    """fullgraph: a graph break is an error, not a silent slowdown. Inductor must keep the fp16 round
    trip of the fake-quant scales, or QAT trains toward another grid than the export's."""
    if not hp.use_compile(device):
        return model
    import torch._dynamo  # noqa: PLC0415
    import torch._inductor.config  # noqa: PLC0415
    torch._inductor.config.emulate_precision_casts = True
    torch._dynamo.config.recompile_limit = COMPILE_GRAPH_BUDGET
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(model, backend=hp.compile_backend, dynamic=False, fullgraph=True)

# Graphs one CrawlerGPT.forward may compile: training at each loop count (cadence, schedules) and eval.
# Past it Dynamo would silently run eagerly; we fail instead.
COMPILE_GRAPH_BUDGET = 16

def build_training(hp: Hyperparameters, data: RunData, dinfo: DistInfo, device: torch.device, log: Logger,
                   run_id: str) -> Trainer:
    torch.manual_seed(hp.seed)   # the init depends on SEED alone, not on what the preflight probes drew
    model = CrawlerGPT(hp).to(device)
    model.set_backends(data.backend)
    if hp.late_qat_threshold:
        model.setup_qat(hp)
    log.kv(unique_params=count_unique_params(model), effective_depth=hp.effective_depth,
           flat=hp.num_flat_layers, crawler=f"{hp.num_crawler_layers}x{hp.crawler_loops}")
    step_model = compile_model(model, hp, device)
    if dinfo.distributed:   # unused: by one-loop steps or ever (lanes' weights before PARALLEL_START)
        fewer = hp.crawler_cadence > 1 or min(n for _, n in hp.loops_schedule()) < hp.crawler_loops
        unused = unused_at_one_loop(model, 1 if fewer else None)
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[dinfo.local_rank] if device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=bool(unused))
    log.kv(compile=int(hp.use_compile(device)), accum_steps=hp.accum_splits // dinfo.world_size)
    loader = DistributedTokenLoader(data.train_files, dinfo, device, hp)
    optimizers = build_optimizers(model, hp, dinfo, compiled=hp.use_compile(device))
    checkpoint = Path(hp.artifact_dir) / f"{run_id}.r{dinfo.rank}.ckpt"   # one a rank
    return Trainer(hp, dinfo, device, model, step_model, optimizers, loader, log, checkpoint)

def unused_at_one_loop(model: CrawlerGPT, loops: int | None = 1) -> list[str]:
    """Parameters a single-loop step (or one of `loops`) leaves without a gradient: DDP must expect them."""
    probe = copy.deepcopy(model).cpu().float()
    probe.set_backends("sdpa")   # a CPU copy: FA3 has CUDA kernels alone (issue 40: it killed every DDP run)
    ids = torch.zeros(1, 4, dtype=torch.long)
    probe(ids, ids, loops=loops).backward()
    return [n for n, p in probe.named_parameters() if p.grad is None]

# ======================================================================================================
# Export. Each matrix becomes per-row int6 (int8 for tables) on an SDClip grid: clip c = k * std(row), scale
# c / qmax, fp16 row scales; GPTQ feeds each column's rounding error forward through the inverse Hessian of
# its inputs. Loop-aware: what runs in every loop is quantized second, on Hessians taken through the
# already-quantized rest. SIZE_TARGET=fit searches k so the packed bytes land under the cap. The container
# is checksummed and loads with torch.load(weights_only=True): loading never runs code.

FLOAT_KINDS = {"fp16": torch.float16, "fp32": torch.float32}
QUANT_KINDS = {"int4": 4, "int6": 6, "int7": 7, "int8": 8}
LQER = (".lqer_a", ".lqer_b")   # an LQER'd matrix W is stored as q, scale and W - deq(q) ~ A @ B (int4 rows)
ARTIFACT_MAGIC, ARTIFACT_VERSION, BROTLI_ID, DIGEST_BYTES = b"CGLF", 3, 2, 32   # 3: the payload in pieces
# Gains that multiply the residual stream keep fp32; other vectors are stored as fp16.
CONTROL_PATTERNS = ("q_gain", "attn_scale", "mlp_scale", "resid_mix", "skip_", "loop_embed", "lane_")
# The fit search's range for k (clip in row stds). Below about 4 std an int6 grid clips so much of a
# Gaussian row that it gets worse *and* larger; beyond 64 there is nothing left to save.
K_MIN, K_MAX = 4.0, 64.0
FIT_PASSES = 3   # GPTQ passes the fit may take (the rehearsal takes one)

def _qmax(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    return 2 ** (bits - 1) - 1

def _as_2d_float(w: Tensor) -> Tensor:
    if w.dim() != 2 or not torch.isfinite(w).all():
        raise ValueError(f"expected a finite 2-D tensor, got {tuple(w.shape)} (or NaN/inf)")
    return w.detach().float()

def _absmax(w: Tensor) -> Tensor:
    return w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])

def row_importance(w: Tensor, h: Tensor) -> Tensor:
    """Each row's mean |w|, each column weighted by its input's Hessian diagonal over the mean; mean 1."""
    r = (_as_2d_float(w).abs() * (h.diagonal() / h.diagonal().mean()).to(w.device)).mean(dim=1)
    return r / r.mean()

def row_clip(w: Tensor, k: float = 12.85) -> Tensor:
    """SDClip: k row stds, possibly beyond the absmax (a coarser grid: fewer bytes); constant rows: absmax."""
    clip = k * w.std(dim=1, correction=0)
    return torch.where(clip > 0, clip, _absmax(w))

def _row_scales(w: Tensor, clip: Tensor | None, qmax: int) -> Tensor:
    clip = _absmax(w) if clip is None else clip.detach().to(w.device).float()
    if clip.shape != (w.shape[0],):
        raise ValueError(f"clip must have shape [{w.shape[0]}], got {tuple(clip.shape)}")
    exact = (clip / qmax).clamp(2.0**-24, 65504.0)
    scale = exact.to(torch.float16)
    # Round the fp16 scale up, never down: then |w| <= clip never saturates, so the
    # RTN error bound |w - q*s| <= s/2 holds exactly for every non-clipped element.
    bumped = (scale.view(torch.int16) + 1).view(torch.float16)
    return torch.where(scale.float() < exact, bumped, scale)

def quantize_rows(w: Tensor, bits: int, clip: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-row symmetric RTN. Returns (q int8 [rows, cols], scale fp16 [rows])."""
    qmax, w = _qmax(bits), _as_2d_float(w)
    scale = _row_scales(w, clip, qmax)
    q = torch.round(w / scale.float()[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale

def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float().reshape(-1, *([1] * (q.dim() - 1)))

def _inverse_hessian_factor(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + lambda*I)^-1, raising lambda until it factors."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    base = torch.diagonal(H).mean().clamp_min(1e-12)
    for attempt in range(7):
        lam = damp if attempt == 0 else max(damp, 1e-3) * 10.0**attempt
        L, info = torch.linalg.cholesky_ex(H + lam * base * eye)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U
    raise ValueError("GPTQ: Hessian is not factorizable even with heavy damping")

def gptq_quantize(w: Tensor, H: Tensor, bits: int, clip: Tensor | None = None, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = True) -> tuple[Tensor, Tensor]:
    """GPTQ for y = x @ w.T, H = X^T X [in, in], in quantize_rows' format. Scales are fixed up front from clip
    (default: row absmax, dead inputs zeroed); damp is relative to mean(diag(H)), raised if H won't factor."""
    qmax, W = _qmax(bits), _as_2d_float(w).clone()
    cols = W.shape[1]
    if H.shape != (cols, cols) or not torch.isfinite(H).all():
        raise ValueError(f"H must be a finite [{cols}, {cols}] matrix, got {tuple(H.shape)}")
    H = H.detach().to(W.device, torch.float64).clone()  # fp64: the inverse is ill-conditioned
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0  # inputs that never fire: their weights are free, zero compresses best
    scale = _row_scales(W, clip, qmax)
    s = scale.float()
    # act_order: settle high-activation columns first, while most columns can still absorb error
    perm = (torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order
            else torch.arange(cols, device=W.device))
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_hessian_factor(H, damp).float()
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Wb, Ub = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err = torch.zeros_like(Wb)
        for j in range(i2 - i1):
            q = torch.round(Wb[:, j] / s).clamp_(-qmax, qmax)
            Q[:, i1 + j] = q
            err[:, j] = (Wb[:, j] - q * s) / Ub[j, j]
            Wb[:, j:] -= err[:, j, None] * Ub[j, None, j:]
        W[:, i2:] -= err @ U[i1:i2, i2:]  # lazy batch update: one matmul per block
    return Q[:, torch.argsort(perm)].to(torch.int8), scale

def compress_bytes(data: bytes, level: int = 11) -> bytes:
    """brotli, the artifact's and the packed script's compressor (window 16 MB: the whole artifact)."""
    import brotli  # noqa: PLC0415
    return brotli.compress(data, quality=level, lgwin=24)

def decompress_bytes(data: bytes) -> bytes:
    """Strict inverse of compress_bytes: a truncated stream or trailing bytes raise."""
    import brotli  # noqa: PLC0415
    return brotli.decompress(data)

# The artifact's payload is compressed in PACK_STREAMS pieces, each its own brotli stream, the ranks sharing
# them (rank r the pieces r, r + world, ...): one pack of a record-size artifact takes ~60 s on one core at
# quality 11, and the pieces cost +0.002% bytes (a 8.4M-value int6 sample, LOG.md). Fixed, so the bytes do not
# depend on the number of GPUs.
PACK_STREAMS = 8

def compress_streams(data: bytes, level: int, dinfo: DistInfo = DistInfo()) -> bytes:
    """Each piece's length (u32) | the pieces. Every rank passes the same data; rank 0 gets the whole, the
    other ranks b"" (pack_as's contract)."""
    cuts = np.linspace(0, len(data), PACK_STREAMS + 1).astype(int)
    shares = [{i: compress_bytes(data[cuts[i]:cuts[i + 1]], level)
               for i in range(dinfo.rank, PACK_STREAMS, dinfo.world_size)}] * dinfo.world_size
    if dinfo.distributed:
        dist.all_gather_object(shares, shares[0])
    pieces = [d[i] for i in range(PACK_STREAMS) for d in shares if i in d]
    return np.array([len(p) for p in pieces], "<u4").tobytes() + b"".join(pieces) if dinfo.master else b""

def decompress_streams(body: bytes) -> bytes:
    """Strict inverse of compress_streams: a wrong length, a truncated piece or trailing bytes raise."""
    head = 4 * PACK_STREAMS
    ends = np.cumsum(np.frombuffer(body[:head], "<u4"), dtype=np.int64) + head
    if ends[-1] != len(body):
        raise ValueError("the pieces do not fill the body")
    return b"".join(decompress_bytes(body[a:b]) for a, b in zip([head, *ends[:-1]], ends))

def _shuffled(t: Tensor, shuffle: bool) -> Tensor:
    """A tensor's bytes as uint8, byte-plane by byte-plane: exponent/high bytes cluster together. (A clone:
    .contiguous() keeps the stride of a one-element slice of a strided tensor, which cannot be viewed.)"""
    raw = t.detach().cpu().reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)
    es = t.element_size()
    return raw.reshape(-1, es).T.reshape(-1) if shuffle and es > 1 and raw.numel() else raw

def _unshuffled(raw: Tensor, dtype: torch.dtype, shape: list[int], shuffle: bool) -> Tensor:
    es = torch.empty((), dtype=dtype).element_size()
    flat = raw.reshape(es, -1).T if shuffle and es > 1 and raw.numel() else raw
    return flat.reshape(-1).clone().view(dtype).reshape(shape)   # clone: fresh, aligned storage

def _check_entry(name: str, e: dict) -> tuple[str, list[int]]:
    kind, shape = e.get("kind"), e.get("shape")
    if not (isinstance(shape, (list, tuple)) and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"{name}: bad shape {shape!r}")
    numel = math.prod(shape)
    if kind in FLOAT_KINDS:
        d = e["data"]
        if d.dtype != FLOAT_KINDS[kind] or d.numel() != numel:
            raise ValueError(f"{name}: data {d.dtype}{tuple(d.shape)} does not match {kind}{list(shape)}")
    elif kind in QUANT_KINDS:
        q, scale, qmax = e["q"], e["scale"], _qmax(QUANT_KINDS[kind])
        lo, hi = torch.aminmax(q.reshape(-1)) if q.numel() and q.dtype == torch.int8 else (0, 0)
        if not shape or q.dtype != torch.int8 or q.numel() != numel or lo < -qmax - 1 or hi > qmax:
            raise ValueError(f"{name}: q must be int8 with {numel} values in the {kind} range")
        if scale.dtype != torch.float16 or tuple(scale.shape) != (shape[0],):
            raise ValueError(f"{name}: scale must be fp16 [{shape[0]}]")
    else:
        raise ValueError(f"{name}: unknown kind {kind!r}")
    return kind, list(shape)

def pack_artifact(entries: dict[str, dict], meta: dict, level: int = 11, byte_shuffle: bool = True,
                  dinfo: DistInfo = DistInfo()) -> bytes:
    """MAGIC | version u8 | compressor u8 (2: brotli) | sha256 of everything else | compressed payload (its
    PACK_STREAMS pieces compressed by the ranks together; rank 0 returns the artifact, the others b"").
    Entries: {"kind": "int6"|"int8", "shape", "q": int8, "scale": fp16 [rows]} or {"kind": "fp16"|"fp32",
    "shape", "data"}. The payload concatenates like data (all q, then all scales, then all floats) so the
    coder sees one regime at a time; torch.load(weights_only=True) reads it back: loading never runs code."""
    table, parts = [], {"q": [], "scale": [], "data": []}
    for name, e in entries.items():
        kind, shape = _check_entry(name, e)
        table.append([name, kind, shape])
        if kind in QUANT_KINDS:
            parts["q"].append(e["q"].detach().cpu().reshape(-1).view(torch.uint8))
            parts["scale"].append(_shuffled(e["scale"], byte_shuffle))
        else:
            parts["data"].append(_shuffled(e["data"], byte_shuffle))
    blobs = {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.uint8) for k, v in parts.items()}
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in blobs.values())).hexdigest()
    buf = io.BytesIO()
    payload = {"meta": meta, "tensors": table, "byte_shuffle": bool(byte_shuffle), "sha256": digest, **blobs}
    torch.save(payload, buf)
    prefix = ARTIFACT_MAGIC + bytes([ARTIFACT_VERSION, BROTLI_ID])
    body = compress_streams(buf.getvalue(), level, dinfo)
    return prefix + hashlib.sha256(prefix + body).digest() + body if dinfo.master else b""

def unpack_artifact(blob: bytes, source: str = "artifact") -> tuple[dict[str, dict], dict]:
    """Inverse of pack_artifact. Any change to any byte of the file is an ArtifactError naming `source`."""
    def corrupt(what: str) -> ArtifactError:
        return ArtifactError(f"{source}: {what} — export it again or fetch an intact copy")
    head = len(ARTIFACT_MAGIC) + 2
    if len(blob) < head + DIGEST_BYTES or blob[:4] != ARTIFACT_MAGIC:
        raise corrupt("not a crawler-golf artifact (bad magic or too short)")
    if blob[4] != ARTIFACT_VERSION or blob[5] != BROTLI_ID:
        raise corrupt(f"unsupported artifact version {blob[4]} or compressor id {blob[5]}")
    body = blob[head + DIGEST_BYTES:]
    if hashlib.sha256(blob[:head] + body).digest() != blob[head:head + DIGEST_BYTES]:
        raise corrupt("checksum mismatch: the file is corrupt or was modified")
    try:
        payload = torch.load(io.BytesIO(decompress_streams(body)), weights_only=True)
        blobs = [payload[k] for k in ("q", "scale", "data")]
        if hashlib.sha256(b"".join(t.numpy().tobytes() for t in blobs)).hexdigest() != payload["sha256"]:
            raise ValueError("decoded tensors do not match their checksum")
        return _entries_from(payload), payload["meta"]
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder and shape error means the same thing
        raise corrupt(f"cannot decode ({type(exc).__name__}: {exc})") from None

def _entries_from(payload: dict) -> dict[str, dict]:
    offsets, entries, shuffle = {"q": 0, "scale": 0, "data": 0}, {}, payload["byte_shuffle"]

    def take(part: str, n: int) -> Tensor:
        chunk = payload[part][offsets[part]:offsets[part] + n]
        if chunk.numel() != n:
            raise ValueError(f"{part} holds fewer bytes than the table says")
        offsets[part] += n
        return chunk

    for name, kind, shape in payload["tensors"]:
        if kind in QUANT_KINDS:
            q = take("q", math.prod(shape)).clone().view(torch.int8).reshape(shape)
            entries[name] = {"kind": kind, "shape": shape, "q": q,
                             "scale": _unshuffled(take("scale", 2 * shape[0]), torch.float16, [shape[0]],
                                                  shuffle)}
        else:
            dtype = FLOAT_KINDS[kind]
            raw = take("data", math.prod(shape) * torch.empty((), dtype=dtype).element_size())
            entries[name] = {"kind": kind, "shape": shape, "data": _unshuffled(raw, dtype, shape, shuffle)}
        _check_entry(name, entries[name])
    if any(offsets[k] != payload[k].numel() for k in offsets):
        raise ValueError("payload holds bytes the table does not name")
    return entries

@dataclass
class StoragePlan:
    """How each parameter is stored, decided once from what owns it (never from its name alone)."""
    kinds: dict[str, str]     # name -> int6 | int8 | fp16 | fp32
    looped: set[str]          # parameters of modules that run in every loop: the loop-aware phase
    linear: set[str]          # weights of linear maps: GPTQ gets a Hessian for these
    tables: set[str]          # embedding tables
    groups: dict[str, str]    # QUANT_ALLOC group: flat.i | crawler.i | embed | other

def storage_plan(model: CrawlerGPT, hp: Hyperparameters) -> StoragePlan:
    looped_ids = {id(p) for p in model.crawler.parameters()}   # they run in every loop
    linear_ids = {id(m.weight) for m in model.modules() if isinstance(m, CastedLinear)}
    table_ids = {id(p) for p in model.tables()}
    plan = StoragePlan({}, set(), set(), set(), {})
    for name, p in model.named_parameters():
        looped, linear, table = id(p) in looped_ids, id(p) in linear_ids, id(p) in table_ids
        if looped:
            plan.looped.add(name)
        if linear:
            plan.linear.add(name)
            plan.kinds[name] = "int6"
        elif table:
            plan.tables.add(name)
            plan.kinds[name] = hp.embed_quant
        else:  # control tensors stay fp32, other small floats fp16
            plan.kinds[name] = "fp32" if any(c in name for c in CONTROL_PATTERNS) else "fp16"
        block = name.split(".")[:2] if name.startswith(("flat.", "crawler.")) else None
        plan.groups[name] = ".".join(block) if block else "embed" if name == "tok_emb.weight" else "other"
    return plan

HEAD = "tok_emb.weight"   # the tied head: its Hessian is taken on the final hidden states

# Every Hessian collection's seconds (the float model's, and loop-aware phase 2's on each fit pass): the
# calibration the challenge counts inside the 600 s of training; export() logs it with the training time.
CALIBRATION = Clock()

@torch.no_grad()
def collect_hessians(model: CrawlerGPT, batches: list[Tensor], names: set[str], dinfo: DistInfo) -> dict:
    """H = X^T X of each named weight's input over the batches; a crawler weight's sums over every loop."""
    hessians: dict[str, Tensor] = {}
    modules = dict(model.named_modules())

    def add(key: str, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.size(-1)).float()
        hessians[key] = hessians[key] + x.T @ x if key in hessians else x.T @ x
    handles = [modules[n.rsplit(".", 1)[0]].register_forward_pre_hook(lambda m, a, n=n: add(n, a[0]))
               for n in names if n != HEAD]
    with CALIBRATION.running():
        try:
            for x in batches:
                with autocast(x.device):
                    h = model.hidden(x)
                if HEAD in names:
                    add(HEAD, h)
        finally:
            for handle in handles:
                handle.remove()
        if dinfo.distributed:
            for key in sorted(hessians):
                dist.all_reduce(hessians[key])
    return hessians

def gptq_targets(plan: StoragePlan, hp: Hyperparameters, quant: str) -> set[str]:
    """What QUANT=gptq quantizes by GPTQ: the linear maps' weights, and with EMBED_GPTQ the tied embedding as
    the head it also is (its input: the final hidden states), as the records since 2026-04-05 do."""
    head = {HEAD} if hp.embed_gptq and plan.kinds.get(HEAD) in QUANT_KINDS else set()
    return set(plan.linear) | head if quant == "gptq" else set()

def loop_aware(hp: Hyperparameters) -> bool:
    return hp.gptq_loop_aware == "1" or (hp.gptq_loop_aware == "auto" and hp.num_crawler_layers > 0)

@torch.no_grad()
def quantize_model_(model: CrawlerGPT, hp: Hyperparameters, quant: str, batches: list[Tensor],
                    dinfo: DistInfo, ks: dict = None, float_hessians: dict = None) -> tuple[dict, dict]:
    """Quantize `model` IN PLACE (each weight replaced by its dequantized value) and return the artifact
    entries and the Hessians used. ks: SDClip k per name (default QUANT_K, EMBED_QUANT_K for tables).
    float_hessians: phase-1 Hessians already taken on this float model (the fit search reuses them).
    Loop-aware GPTQ: phase 1 quantizes everything that runs once; phase 2 re-collects the looped
    modules' Hessians on activations that flow through the already-quantized phase 1."""
    plan, params = storage_plan(model, hp), dict(model.named_parameters())
    quantized = [n for n, kind in plan.kinds.items() if kind in QUANT_KINDS]
    late = {n for n in quantized if n in plan.looped} if quant == "gptq" and loop_aware(hp) else set()
    entries, used = {}, {}
    floats = {n: params[n].detach().clone() for n in quantized if n in plan.linear} if hp.lqer_rank else {}
    for phase, names in enumerate((set(quantized) - late, late)):
        need = names & gptq_targets(plan, hp, quant)
        hessians = ({n: float_hessians[n] for n in need} if phase == 0 and float_hessians is not None
                    else collect_hessians(model, batches, need, dinfo) if need else {})
        used.update(hessians)
        for name in sorted(names):
            p, bits = params[name], QUANT_KINDS[plan.kinds[name]]
            k = (ks or {}).get(name, hp.embed_quant_k if name in plan.tables else hp.quant_k)
            clip, h = row_clip(_as_2d_float(p), k), hessians.get(name)
            if h is not None and hp.hessian_clip:
                clip = clip * (1 + hp.hessian_clip * (row_importance(p, h) - 1))
            q, scale = (quantize_rows(p, bits, clip) if h is None else
                        gptq_quantize(p, h, bits, clip, hp.gptq_damp, hp.gptq_block_size, hp.gptq_act_order))
            entries[name] = {"kind": plan.kinds[name], "shape": list(p.shape), "q": q.cpu(),
                             "scale": scale.cpu()}
            p.copy_(dequantize_rows(q, scale).to(p))
    errors = {n: (w - params[n].detach()).float() for n, w in floats.items()}
    for name in sorted(errors, key=lambda n: -errors[n].norm().item())[:hp.lqer_top]:   # LQER, the largest
        u, sv, vh = torch.linalg.svd(errors[name], full_matrices=False)
        r = min(hp.lqer_rank, sv.numel())
        for suffix, f in zip(LQER, (u[:, :r] * sv[:r], vh[:r])):
            q, scale = quantize_rows(f, 4)
            entries[name + suffix] = {"kind": "int4", "shape": list(f.shape), "q": q.cpu(),
                                      "scale": scale.cpu()}
        params[name].add_(lqer_product(entries, name).to(params[name]))
    for name, p in params.items():
        if plan.kinds[name] in FLOAT_KINDS:
            stored = p.detach().to(FLOAT_KINDS[plan.kinds[name]])
            p.copy_(stored.to(p.dtype))          # the model now holds exactly what the artifact holds
            entries[name] = {"kind": plan.kinds[name], "shape": list(p.shape), "data": stored.cpu()}
    return entries, used

def relative_ks(model: CrawlerGPT, hp: Hyperparameters, hessians: dict[str, Tensor]) -> dict[str, float]:
    """Each quantized tensor's k as a multiple of the searched matrix k. uniform: 1 for matrices,
    EMBED_QUANT_K/QUANT_K for tables, or QUANT_ROLES' k of its role / QUANT_K. hessian: per group,
    minimise the predicted loss increase at a fixed byte count. Rounding noise of step 2c/(2^b-1),
    c = k*std_r, raises a matrix's output error by tr(H) * sum_r step_r^2/12 = k^2 * C, and bytes fall by
    log2 k bits per weight; the Lagrangian optimum is k_g^2 proportional to n_g / C_g. Groups are
    normalised to a weighted geometric mean of 1, so with equal C_g/n_g every group gets k = 1 (uniform).
    Tensors without a Hessian stay at their uniform value."""
    plan, params = storage_plan(model, hp), dict(model.named_parameters())
    quantized = [n for n, kind in plan.kinds.items() if kind in QUANT_KINDS]
    role = {id(p): r for r, kind in (("attn", Attention), ("mlp", MLP)) for m in model.modules()
            if isinstance(m, kind) for p in m.parameters()} | {id(params[n]): "embed" for n in plan.tables}
    ks = {"embed": hp.embed_quant_k, **hp.role_ks}
    base = {n: ks.get(role.get(id(params[n])), hp.quant_k) / hp.quant_k for n in quantized}
    if hp.quant_alloc == "uniform":
        return base
    cost: dict[str, float] = {}
    count: dict[str, int] = {}
    for n in quantized:
        if n in hessians:
            g, p, levels = plan.groups[n], params[n].detach().float(), 2 ** QUANT_KINDS[plan.kinds[n]] - 1
            row_var = p.var(dim=1, correction=0).sum().item()
            cost[g] = cost.get(g, 0.0) + torch.trace(hessians[n]).item() * row_var * 4 / (12 * levels ** 2)
            count[g] = count.get(g, 0) + p.numel()
    log_k = {g: 0.5 * math.log(count[g] / max(cost[g], 1e-30)) for g in cost}
    if not log_k:
        return base
    center = sum(count[g] * log_k[g] for g in log_k) / sum(count[g] for g in log_k)
    return {n: math.exp(log_k[plan.groups[n]] - center) if n in hessians and plan.groups[n] in log_k
            else base[n] for n in quantized}

def ks_at(rel: dict[str, float], m: float) -> dict[str, float]:
    return {n: min(max(m * r, K_MIN), K_MAX) for n, r in rel.items()}

def estimate_model_bytes(model: CrawlerGPT, hp: Hyperparameters, ks: dict[str, float], meta: dict) -> int:
    """An RTN export's bytes at these ks: the real pack of a ~1M-value row sample scaled up, plus floats."""
    probe = copy.deepcopy(model)
    entries, _ = quantize_model_(probe, hp, "rtn", [], DistInfo(), ks)
    quant = {n: e for n, e in entries.items() if e["kind"] in QUANT_KINDS}
    stride = max(1, sum(e["q"].numel() for e in quant.values()) // 2**20)
    sample = {n: {**e, "q": e["q"][::stride], "scale": e["scale"][::stride],
                  "shape": [len(e["q"][::stride]), *e["shape"][1:]]} for n, e in quant.items()}
    floats = {n: e for n, e in entries.items() if n not in quant}
    return stride * len(pack_as(hp, sample, meta)) + len(pack_as(hp, floats, meta))

def along_log_k(points: list[tuple[float, float]], x: float, want: str) -> float:
    """Bytes at k = x (want="bytes"), or the k whose bytes are x (want="k"): linear in log k on the segment
    of (k, bytes) points that holds x, else on the end segment nearest to it."""
    pts = sorted((math.log(k), b) for k, b in points)
    segments = list(zip(pts, pts[1:])) or [(pts[0], pts[0])]
    at = 0 if want == "bytes" else 1
    xv = math.log(x) if want == "bytes" else x
    inside = [s for s in segments if min(s[0][at], s[1][at]) <= xv <= max(s[0][at], s[1][at])]
    (l0, b0), (l1, b1) = inside[0] if inside else \
        min(segments, key=lambda s: min(abs(xv - s[0][at]), abs(xv - s[1][at])))
    if want == "bytes":
        return b0 + (xv - l0) / (l1 - l0) * (b1 - b0) if l1 != l0 else b0
    return math.exp(l0 + (xv - b0) / (b1 - b0) * (l1 - l0)) if b1 != b0 else math.exp(l0)

def clamp_k(k: float) -> float:
    return min(max(k, K_MIN), K_MAX)

def rtn_curve(model: CrawlerGPT, hp: Hyperparameters, rel: dict, meta: dict, target: float) -> list:
    """Estimated bytes at k = QUANT_K/2, QUANT_K, 2*QUANT_K, widened by factors of 2 until the target lies
    between two points (or k reaches K_MIN/K_MAX): interpolation, never a long extrapolation."""
    curve = [(k, estimate_model_bytes(model, hp, ks_at(rel, k), meta))
             for k in sorted({clamp_k(hp.quant_k * f) for f in (0.5, 1.0, 2.0)})]
    while target > curve[0][1] and curve[0][0] > K_MIN:
        k = clamp_k(curve[0][0] / 2)
        curve.insert(0, (k, estimate_model_bytes(model, hp, ks_at(rel, k), meta)))
    while target < curve[-1][1] and curve[-1][0] < K_MAX:
        k = clamp_k(curve[-1][0] * 2)
        curve.append((k, estimate_model_bytes(model, hp, ks_at(rel, k), meta)))
    return curve

@dataclass
class Export:
    entries: dict
    blob: bytes
    size: int                # the blob's bytes (every rank knows it; only rank 0 holds the blob)
    model: CrawlerGPT        # holds exactly the artifact's weights
    quant_k: float           # the matrix k (the searched multiplier)
    pruned: int = 0
    passes: int = 1

def export_model(model: CrawlerGPT, hp: Hyperparameters, batches: list[Tensor], dinfo: DistInfo, log: Logger,
                 meta: dict) -> Export:
    """Quantize and pack. SIZE_TARGET=fit chooses the SDClip k so that code + model lands in the window
    [SIZE_LIMIT - SIZE_MARGIN, SIZE_LIMIT]: a cheap RTN curve of bytes against log k predicts k, GPTQ runs
    at it and the real pack corrects it (at most three passes; the best that fits is kept); pruning covers
    the last few bytes only. Every rank quantizes identically (all-reduced Hessians); rank 0 packs."""
    budget, t0 = hp.size_limit - len(packed_code()), time.perf_counter()
    plan = storage_plan(model, hp)
    need = gptq_targets(plan, hp, hp.quant) | \
        ({HEAD} if hp.quant_alloc == "hessian" and plan.kinds[HEAD] in QUANT_KINDS else set())
    float_hessians = collect_hessians(model, batches, need, dinfo) if need and batches else {}
    rel = relative_ks(model, hp, float_hessians)
    tried: list[Export] = []

    def attempt(k: float) -> Export:
        trial = copy.deepcopy(model)
        entries, _ = quantize_model_(trial, hp, hp.quant, batches, dinfo, ks_at(rel, k), float_hessians)
        blob = pack_as(hp, entries, meta, dinfo)
        tried.append(Export(entries, blob, broadcast_int(len(blob), dinfo), trial, k, passes=len(tried) + 1))
        log.kv(export_pass=len(tried), quant_k=f"{k:.3f}", bytes_model=tried[-1].size,
               bytes_total=tried[-1].size + len(packed_code()), seconds=f"{time.perf_counter() - t0:.1f}")
        return tried[-1]

    if hp.size_target == "none":
        attempt(hp.quant_k)
    else:
        target = budget - hp.size_margin / 2
        curve = rtn_curve(model, hp, rel, meta, target)
        log.kv(fit_curve=",".join(f"{k:.2f}:{b}" for k, b in curve), budget_bytes_model=budget)
        k = clamp_k(along_log_k(curve, target, "k"))
        for _ in range(FIT_PASSES):
            size = attempt(k).size
            finest = k <= K_MIN * 1.0001 and size <= budget
            if budget - hp.size_margin <= size <= budget or finest or (k >= K_MAX * 0.9999 and size > budget):
                break
            # The real bytes re-anchor the estimated curve (GPTQ and the full pack differ from the RTN sample
            # by a nearly constant ratio); with two real passes, their own secant takes over.
            ratio = size / along_log_k(curve, k, "bytes")
            anchor = [(t.quant_k, t.size) for t in tried] if len(tried) > 1 else \
                [(c, b * ratio) for c, b in curve]
            k = clamp_k(along_log_k(anchor, target, "k"))
    fits = [t for t in tried if t.size <= budget]
    out = max(fits, key=lambda t: t.size) if fits else min(tried, key=lambda t: t.size)
    out.passes = len(tried)
    if out.size > budget and hp.size_target != "none":
        over = out.size - budget
        out.entries, out.pruned, out.blob = prune_to_fit(out.entries, meta, hp, budget, dinfo)
        out.size = broadcast_int(len(out.blob), dinfo)
        out.model.load_state_dict(entries_state(out.entries), strict=True)
        log.kv(prune_values_zeroed=out.pruned, prune_was_over_bytes=over, bytes_model=out.size)
    return out

def broadcast_int(value: int, dinfo: DistInfo) -> int:
    box = [value]   # rank 0's value on every rank
    if dinfo.distributed:
        dist.broadcast_object_list(box, src=0)
    return box[0]

def entries_state(entries: dict) -> dict[str, Tensor]:
    """The float weights an artifact's entries stand for (an LQER'd matrix with its A @ B added)."""
    return {name: (dequantize_rows(e["q"], e["scale"]) if e["kind"] in QUANT_KINDS else e["data"].float())
            .reshape(e["shape"]) + (lqer_product(entries, name) if name + LQER[0] in entries else 0)
            for name, e in entries.items() if not name.endswith(LQER)}

def lqer_product(entries: dict, name: str) -> Tensor:
    a, b = (entries[name + suffix] for suffix in LQER)
    return dequantize_rows(a["q"], a["scale"]) @ dequantize_rows(b["q"], b["scale"])

def prune_to_fit(entries: dict, meta: dict, hp: Hyperparameters, budget: int, dinfo: DistInfo) -> tuple:
    """Last resort for the final bytes: zero the +-1 quantized values with the smallest scale^2 (the
    error each adds), more each time, until the real pack fits. Input entries are not mutated."""
    names, positions, costs = [], [], []
    for name, e in entries.items():
        if e["kind"] in QUANT_KINDS:
            flat = e["q"].reshape(e["q"].shape[0], -1)
            r, c = (flat.abs() == 1).nonzero(as_tuple=True)
            names += [name] * len(r)
            positions.append(r * flat.shape[1] + c)
            costs.append(e["scale"].float()[r].square())
    order = torch.argsort(torch.cat(costs), stable=True) if costs else torch.zeros(0, dtype=torch.long)
    pos = torch.cat(positions)[order] if costs else order
    owner = [names[i] for i in order.tolist()] if costs else []
    blob = pack_as(hp, entries, meta, dinfo)
    full = broadcast_int(len(blob), dinfo)
    over, n, out = full - budget, 0, entries
    while over > 0:
        require(n < len(owner), "SIZE_LIMIT", f"the artifact is {over} bytes over even with every +-1 value "
                "zeroed — raise SIZE_LIMIT or shrink the model", ArtifactTooLarge)
        saved_per_value = (full - budget - over) / n if n else 1.0   # a byte a value at first, then measured
        more = max(1, math.ceil(1.2 * over / max(saved_per_value, 1e-3)))
        n = min(len(owner), 2 * n if n else len(owner), n + more)
        out = {name: dict(e) for name, e in entries.items()}
        for name in set(owner[:n]):
            out[name]["q"] = out[name]["q"].clone(memory_format=torch.contiguous_format)   # any q's layout
        for name, p in zip(owner[:n], pos[:n].tolist()):
            out[name]["q"].view(-1)[p] = 0
        blob = pack_as(hp, out, meta, dinfo)
        over = broadcast_int(len(blob), dinfo) - budget
    return out, n, blob

def pack_as(hp: Hyperparameters, entries: dict, meta: dict, dinfo: DistInfo = DistInfo()) -> bytes:
    """The run's artifact bytes (COMPRESS_LEVEL, BYTE_SHUFFLE), packed by every rank together for rank 0."""
    return pack_artifact(entries, meta, hp.compress_level, hp.byte_shuffle, dinfo)

def artifact_meta(hp: Hyperparameters, tokenizer_sha256: str = "") -> dict:
    """What rebuilds the model and scores it; run ids, paths and blurbs stay out of the counted bytes."""
    return {"format": "crawler-golf", "model": hp.model_knobs(), "tokenizer_sha256": tokenizer_sha256,
            "eval": {"eval_seq_len": hp.eval_seq_len, "eval_stride": hp.eval_stride}}

def load_artifact(path: str | Path) -> tuple[CrawlerGPT, dict]:
    """A fresh model from the artifact alone: shape from its header, weights dequantized."""
    path = Path(path)
    require(path.is_file(), str(path), "is not an artifact file (a folder, or missing) — point EVAL_ONLY "
            "at a .ptz file", ArtifactError)
    entries, meta = unpack_artifact(path.read_bytes(), str(path))
    require(isinstance(meta, dict) and meta.get("format") == "crawler-golf" and
            isinstance(meta.get("model"), dict), str(path), "not a crawler-golf artifact", ArtifactError)
    model_fields = {f.name for f in knob_fields() if f.metadata["model"]}
    try:
        model = CrawlerGPT(Hyperparameters(**{k: v for k, v in meta["model"].items() if k in model_fields}))
        model.load_state_dict(entries_state(entries), strict=True)
    except (HyperparameterError, RuntimeError, TypeError) as err:
        raise ArtifactError(f"{path}: its tensors do not fit the model in its header ({err})") from None
    return model, meta

# ======================================================================================================
# Evaluation. val_bpb = summed token NLL in nats / ln 2 / summed UTF-8 bytes of the targets, in float64,
# all-reduced over ranks. Sliding windows of EVAL_SEQ_LEN advance by EVAL_STRIDE; each target is scored
# once, by the window that gives it the most context.

def bits_per_byte(nll_nats: float, num_bytes: float) -> float:
    return nll_nats / math.log(2) / num_bytes

def sliding_windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) for each window over num_tokens tokens (num_tokens-1 targets).
    Every target is scored exactly once, by the earliest window holding it: the most context."""
    last_start = max(num_tokens - 1 - seq_len, 0)
    starts = sorted({*range(0, last_start + 1, stride), last_start})
    windows, scored_to = [], 0   # targets [0, scored_to) of the target sequence are done
    for s in starts:
        windows.append((s, scored_to - s))
        scored_to = s + min(seq_len, num_tokens - 1 - s)
    return windows

def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
        torch.autocast("cpu", enabled=False)

def evaluate(model: nn.Module, tokens: Tensor, luts: ByteLUTs | Tensor, seq_len: int, stride: int,
             batch_tokens: int, dinfo: DistInfo, device: torch.device, log: Logger | None = None,
             ttt: Hyperparameters | None = None, clock: Clock = Clock()) -> tuple:
    """(val_loss in nats/token, val_bpb) over `tokens`, windows split across ranks; with `ttt` (its TTT
    knobs), score-first test-time training. luts: the tokenizer's byte LUTs, or a byte sidecar: each
    token's bytes of the original text. clock: the caller's, paused for TTT=lora's compile warm-up."""
    seq_len = min(seq_len, tokens.numel() - 1)
    windows = sliding_windows(tokens.numel(), seq_len, stride)
    batch = max(1, min(batch_tokens // (seq_len * dinfo.world_size), len(windows)))
    ids = tokens.to(device, torch.int64)   # tb: the bytes of each target (target j is token j + 1)
    tb = (target_bytes(ids[:-1], ids[1:], luts) if isinstance(luts, ByteLUTs) else luts[1:]).to(device)
    if ttt is not None and ttt.ttt.startswith("lora"):
        sums = lora_ttt(model, tokens, tb, seq_len, ttt, dinfo, device, log, clock)
    elif ttt is not None:
        sums = score_first_ttt(model, tokens, tb, seq_len, windows, batch, ttt, dinfo, device, log)
    else:
        sums = score_windows(model, tokens, tb, seq_len, windows[dinfo.rank::dinfo.world_size], batch,
                             device, log)
    if dinfo.distributed:
        dist.all_reduce(sums)
    return (sums[0] / sums[2]).item(), bits_per_byte(sums[0].item(), sums[1].item())

def add_scores(sums: Tensor, nll: Tensor, targets: Tensor, tb: Tensor) -> None:
    """Add (nll, bytes, count) of the scored positions; targets: each position's target index, -1 unscored.
    Masks, not boolean indexing: no host sync."""
    keep = targets >= 0
    sums += torch.stack([nll.double().where(keep, 0).sum(), (tb[targets.clamp(min=0)] * keep).double().sum(),
                         keep.sum().double()])

def progress(log: Logger | None, what: str, done: int, total: int, sums: Tensor, t0: float) -> None:
    """A line at each tenth of the work: how far, scored tokens a second, the time left."""
    if log and done % max(1, total // 10) == 0:
        spent = time.perf_counter() - t0
        log.kv(**{what: f"{done}/{total}"}, scored_tok_s=f"{sums[2].item() / spent:.0f}",
               eta=f"{spent * (total - done) / done:.0f}s")

@torch.no_grad()
def score_windows(model: nn.Module, tokens: Tensor, tb: Tensor, seq_len: int, mine: list[tuple[int, int]],
                  batch: int, device: torch.device, log: Logger | None = None) -> Tensor:
    """(summed nll, bytes, tokens) of this rank's windows. Every batch has the same shape (the last is padded
    with windows that score nothing): one compiled graph. With a log: progress."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, bytes, tokens
    was_training, t0, starts = model.training, time.perf_counter(), range(0, max(len(mine), 1), batch)
    model.eval()
    offsets = torch.arange(seq_len)[None, :]
    for n, i in enumerate(starts, 1):
        chunk = mine[i:i + batch]
        firsts = torch.tensor([first for _, first in chunk] + [seq_len] * (batch - len(chunk)))[:, None]
        chunk = chunk + [(0, seq_len)] * (batch - len(chunk))                # padding scores nothing
        idx = torch.stack([tokens[s:s + seq_len + 1] for s, _ in chunk]).to(device=device, dtype=torch.int64)
        with autocast(device):
            nll = model(idx[:, :-1], idx[:, 1:], per_token=True)
        targets = torch.tensor([s for s, _ in chunk])[:, None] + offsets
        add_scores(sums, nll, torch.where(offsets >= firsts, targets, -1).to(device), tb)
        progress(log, "eval_batches", n, len(starts), sums, t0)
    model.train(was_training)
    return sums

def ttt_sequences(first: int, end: int, seq_len: int) -> list[int]:
    """Starts of the training sequences whose targets all lie in [first, end): target j is token j + 1."""
    return list(range(first, end - seq_len + 1, seq_len))

def sgd_ttt(model: nn.Module, tokens: Tensor, end: int, seq_len: int, lr: float, epochs: int,
            hp: Hyperparameters, dinfo: DistInfo, device: torch.device,
            score: Callable[[int], None] = lambda c: None) -> None:
    """SGD with momentum on all weights over the targets [0, end) in chunks of TTT_CHUNK_TOKENS: chunk c is
    first scored (score(c), TTT=sgd), then trained on for `epochs` at a cosine LR (0 at the last chunk: only
    scored). A step averages the gradient of TTT_BATCH_SEQS sequences of all ranks: any number of ranks, one
    maths."""
    chunk, params = hp.ttt_chunk_tokens, list(model.requires_grad_(True).parameters())
    opt, n = torch.optim.SGD(params, lr=lr, momentum=hp.ttt_momentum), -(-end // chunk)
    for p in params:   # zeros, not None: a rank with no sequence in a step still all-reduces
        p.grad = torch.zeros_like(p)
    for c in range(n):
        score(c)
        starts = ttt_sequences(c * chunk, (c + 1) * chunk, seq_len) if c < n - 1 else []
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * c / max(n - 1, 1)))
        for _, b in itertools.product(range(epochs), range(0, len(starts), hp.ttt_batch_seqs)):
            step = starts[b:b + hp.ttt_batch_seqs]
            opt.zero_grad(set_to_none=False)
            for a in step[dinfo.rank::dinfo.world_size]:
                idx = tokens[a:a + seq_len + 1].to(device=device, dtype=torch.int64)[None]
                with autocast(device):
                    (model(idx[:, :-1], idx[:, 1:], per_token=True).sum() / (len(step) * seq_len)).backward()
            if dinfo.distributed:
                for p in params:
                    dist.all_reduce(p.grad)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    model.zero_grad(set_to_none=True)

def score_first_ttt(model: nn.Module, tokens: Tensor, tb: Tensor, seq_len: int,
                    windows: list[tuple[int, int]], batch: int, hp: Hyperparameters, dinfo: DistInfo,
                    device: torch.device, log: Logger | None = None) -> Tensor:
    """TTT=sgd, legal by construction: a window belongs to the chunk of its first scored target, so every
    target is scored by then; chunk c's windows are scored (no gradient), and only then does the model train
    on sequences whose targets all lie in chunks <= c."""
    chunk, n_targets = hp.ttt_chunk_tokens, tokens.numel() - 1
    n_chunks = -(-n_targets // chunk)
    groups: list[list] = [[] for _ in range(n_chunks)]
    for s, first in windows:
        groups[min((s + first) // chunk, n_chunks - 1)].append((s, first))
    sums, t0 = torch.zeros(3, dtype=torch.float64, device=device), time.perf_counter()

    def score(c: int) -> None:
        sums.add_(score_windows(model, tokens, tb, seq_len, groups[c][dinfo.rank::dinfo.world_size], batch,
                                device))
        progress(log, "ttt_chunk", c + 1, n_chunks, sums, t0)
    sgd_ttt(model, tokens, n_targets, seq_len, hp.ttt_lr, hp.ttt_epochs, hp, dinfo, device, score)
    model.eval()
    return sums

def documents(tokens: Tensor) -> list[tuple[int, int]]:
    """Each document's targets [first, end) (target j is token j + 1): from its BOS up to the next BOS, its
    last target (as the records' TTT). Together they hold every target of the stream once."""
    cuts = sorted({0, *(tokens[:-1] == BOS_ID).nonzero()[:, 0].tolist(), tokens.numel() - 1})
    return list(zip(cuts, cuts[1:]))

class LoRA:
    """Low-rank adapters of one module for up to `docs` documents: out += x @ A @ B * 144 / r (the records'),
    row d of the batch by document d's A [in, r] and B [r, out]. reset(): A one seeded draw for all documents,
    B zero, so each starts from the model itself; off (`on` False) until then. With slots > 1
    (TTT_LORA_PER_LOOP, a crawler block) the calls of one forward pass (`calls` from 0) cycle through them."""
    def __init__(self, docs: int, fan_in: int, fan_out: int, rank: int, gen: torch.Generator, slots: int,
                 device: torch.device):
        self.A0 = ((torch.rand(slots, 1, fan_in, rank, generator=gen) * 2 - 1) * fan_in ** -0.5).to(device)
        self.A = [torch.empty(docs, fan_in, rank, device=device, requires_grad=True) for _ in range(slots)]
        self.B = [torch.empty(docs, rank, fan_out, device=device, requires_grad=True) for _ in range(slots)]
        self.scale, self.calls, self.on = 144 / rank, 0, False
        # weights of fixed shape: a compiled pass takes any batch of up to `docs` rows
        for t in (*self.A, *self.B):
            torch._dynamo.mark_static(t)

    @torch.no_grad()
    def reset(self) -> None:
        for a, b, a0 in zip(self.A, self.B, self.A0):
            a.copy_(a0.expand_as(a)), b.zero_()
        self.on = True

    def __call__(self, x: Tensor) -> Tensor:
        i, self.calls, n = self.calls % len(self.A), self.calls + 1, x.size(0)
        return (x @ self.A[i][:n].to(x.dtype)) @ self.B[i][:n].to(x.dtype) * self.scale

    def hook(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return out + self(args[0]).to(out.dtype) if self.on else out

def attach_lora(model: CrawlerGPT, docs: int, hp: Hyperparameters, device: torch.device) -> tuple:
    """(the adapters, the hooks) for batches of up to `docs` documents: LoRAs on the tied head (first), and on
    each block's q, k, v, on its attention output and its MLP output (each from that module's normed input, as
    the records')."""
    gen, mh, dim = torch.Generator().manual_seed(hp.seed), model.hp, model.hp.model_dim
    adapters, hooks = [LoRA(docs, dim, mh.vocab_size, hp.ttt_lora_rank, gen, 1, device)], []
    for b, block in enumerate(model.blocks):
        slots = mh.crawler_loops if hp.ttt_lora_per_loop and b >= mh.num_flat_layers else 1
        for m in (block.attn.q, block.attn.k, block.attn.v, block.attn, block.mlp):
            fan_out = getattr(m, "out_features", dim)
            adapters.append(LoRA(docs, dim, fan_out, hp.ttt_lora_rank, gen, slots, device))
            hooks.append(m.register_forward_hook(adapters[-1].hook))
    return adapters, hooks

def lora_batch(forward: Callable, adapters: list[LoRA], tokens: Tensor, tb: Tensor,
               batch: list[tuple[int, int]], seq_len: int, hp: Hyperparameters, device: torch.device
               ) -> Tensor:
    """(nll, bytes, tokens) of a batch of documents, TTT_LORA_CHUNK targets of each at a time: scored in a
    window of at most seq_len of the document's own tokens, then its LoRA takes an AdamW step on their mean
    loss. Rows go longest first, so the documents still open are the first n rows: each chunk runs only them
    (the LoRAs take their first n rows), at the longest open window, and the cost follows rows x window of
    open documents. The geometry comes from the documents' lengths on the CPU: no host sync."""
    for a in adapters:
        a.reset()
    params = [t for a in adapters for t in (*a.A, *a.B)]
    opt = torch.optim.AdamW(params, hp.ttt_lora_lr, (0.0, 0.999), 1e-10, hp.ttt_lora_wd)
    sums, size = torch.zeros(3, dtype=torch.float64, device=device), hp.ttt_lora_chunk
    firsts, ends = (torch.tensor(v)[:, None] for v in zip(*sorted(batch, key=lambda d: d[0] - d[1])))
    for c in range(-(-int(ends[0] - firsts[0]) // size)):
        n = int((ends - firsts > c * size).sum())                          # the documents still open
        firsts, ends = firsts[:n], ends[:n]
        lo, hi = firsts + c * size, torch.minimum(ends, firsts + (c + 1) * size)     # this chunk's targets
        start = torch.maximum(firsts, hi - seq_len)                          # each row's window of targets
        idx = start + torch.arange(int((hi - start).max()))
        x, y = (tokens[idx.clamp(max=tokens.numel() - 2) + k].to(device, torch.int64, non_blocking=True)
                for k in (0, 1))
        scored, train = (idx >= lo) & (idx < hi), hi < ends   # train: documents with targets to come
        for a in adapters:   # every forward pass starts at slot 0 (and a compiled one sees the same state)
            a.calls = 0
        with autocast(device):
            nll = forward(x, y, per_token=True, head=adapters[0])
        add_scores(sums, nll.detach(), torch.where(scored, idx, -1).to(device, non_blocking=True), tb)
        if train.any():   # a training row scores a whole chunk: its mean is its sum / size
            opt.zero_grad(set_to_none=True)
            (nll * (scored & train).to(device, non_blocking=True)).sum().div(size).backward()
            opt.step()
    return sums

def lora_ttt(model: nn.Module, tokens: Tensor, tb: Tensor, seq_len: int, hp: Hyperparameters, dinfo: DistInfo,
             device: torch.device, log: Logger | None, clock: Clock) -> Tensor:
    """TTT=lora, legal by construction: every document is scored alone by lora_batch, each target before any
    step on it. The documents go to the ranks in one longest-first order, in batches of similar length; as
    each starts from the same adapters, the score does not depend on the batching or the number of ranks.
    lora+phased: the first TTT_PHASE_DOCS documents are scored in TTT_PHASES segments, and after each one all
    ranks train the model itself by SGD on every target scored so far (all documents before the boundary: a
    prefix of the stream), then go on. With COMPILE on, the LoRA pass is compiled once for every batch and
    window size and warmed up on dummy tokens before the scored pass, the clock paused (as the records'
    warm-up, before their timer): lora_batch resets the adapters, so the warm-up leaves nothing behind."""
    raw, docs = getattr(model, "_orig_mod", model), documents(tokens)   # the module: hooks on its blocks
    n = min(hp.ttt_phase_docs, len(docs)) if hp.ttt == "lora+phased" else 0
    phases = sorted({n * k // hp.ttt_phases for k in range(1, hp.ttt_phases + 1)} - {0, len(docs)})
    adapters, hooks = attach_lora(raw, hp.ttt_lora_docs, hp, device)
    forward, size, t0 = raw, hp.ttt_lora_chunk, time.perf_counter()
    if hp.use_compile(device):
        forward = torch.compile(raw.requires_grad_(False), backend=hp.compile_backend, dynamic=True)
        # the warm-up, on zeros (not val tokens): one document of 4 chunks, the rest of 2, so every batch size
        # down to one open row, with and without a step
        with clock.paused():
            dummy = [(0, 4 * size)] + [(0, 2 * size)] * (hp.ttt_lora_docs - 1)
            lora_batch(forward, adapters, torch.zeros(4 * size + 1, dtype=torch.int64),
                       torch.zeros(4 * size, device=device), dummy, seq_len, hp, device)
        if log:
            log.kv(ttt_warmup_seconds=f"{time.perf_counter() - t0:.1f}")
    sums, t0 = torch.zeros(3, dtype=torch.float64, device=device), time.perf_counter()
    try:
        for a, b in zip([0, *phases], [*phases, len(docs)]):
            raw.requires_grad_(False)
            # one longest-first order for all ranks (stable: ties in stream order), dealt back and forth
            # (ranks 0..W-1, then W-1..0): the work, rows x window, falls off with length, so each pair of
            # rounds evens out
            w = 2 * dinfo.world_size
            mine = [d for i, d in enumerate(sorted(docs[a:b], key=lambda d: d[0] - d[1]))
                    if dinfo.rank in (i % w, w - 1 - i % w)]
            batches = [mine[i:i + hp.ttt_lora_docs] for i in range(0, len(mine), hp.ttt_lora_docs)]
            for i, batch in enumerate(batches, 1):
                sums += lora_batch(forward, adapters, tokens, tb, batch, seq_len, hp, device)
                progress(log, "ttt_batches", i, len(batches), sums, t0)
            if b < len(docs):   # a phase: an epoch of SGD on the targets scored so far, [0, docs[b - 1] end)
                end = docs[b - 1][1]
                for adapter in adapters:   # the model itself trains, not the last batch's adapters
                    adapter.on = False
                sgd_ttt(raw, tokens, end, seq_len, hp.ttt_phase_lr, 1, hp, dinfo, device)
                if log:
                    log.kv(ttt_phase_docs=b, trained_to=end, seconds=f"{time.perf_counter() - t0:.0f}")
    finally:
        for h in hooks:
            h.remove()
    raw.requires_grad_(True).eval()
    return sums

def eval_settings(hp: Hyperparameters, meta: dict) -> dict:
    """The artifact's EVAL_SEQ_LEN/EVAL_STRIDE, unless the environment set them."""
    stored = meta.get("eval") or {"eval_seq_len": hp.eval_seq_len, "eval_stride": hp.eval_stride}
    return {k: getattr(hp, k) if k in hp.explicit else v for k, v in stored.items()}

def score_artifact(path: Path, hp: Hyperparameters, data: RunData, dinfo: DistInfo, device: torch.device,
                   log: Logger) -> dict:
    """Reload the artifact from disk and score it: plain windows, then the sliding window (the score), then,
    with TTT, the sliding window with score-first test-time training (the score; it changes the model)."""
    model, meta = load_artifact(path)
    require(meta.get("tokenizer_sha256") in ("", data.tokenizer_sha256), "TOKENIZER_PATH",
            f"{hp.tokenizer_path} is not the tokenizer {path} was trained with — scores would not compare",
            DataError)
    settings = eval_settings(hp, meta)
    log.kv(eval_settings=",".join(f"{k}={v}" for k, v in settings.items()),
           from_artifact=",".join(k for k in settings if k not in hp.explicit) or "none")
    model.to(device).set_backends(data.backend)
    model = compile_model(model, hp, device)
    seq, out = settings["eval_seq_len"], {}
    stride = min(settings["eval_stride"], seq)
    for label, stride in (("post_quant", seq), ("sliding", stride), ("ttt", stride)):
        if label == "sliding" and stride == seq or label == "ttt" and hp.ttt == "off":
            continue
        clock = Clock()   # the scored seconds: TTT=lora's compile warm-up is off it (ttt_warmup_seconds)
        with clock.running():
            loss, bpb = evaluate(model, data.val_tokens, data.luts, seq, stride, hp.val_batch_size, dinfo,
                                 device, log, hp if label == "ttt" else None, clock)
        out.update({f"{label}_val_loss": loss, f"{label}_val_bpb": bpb})
        spent = clock.seconds
        log.kv(**{f"{label}_val_loss": loss, f"{label}_val_bpb": f"{bpb:.6f}",
                  f"{label}_eval_seconds": f"{spent:.1f}"})
    last = next(k for k in ("ttt", "sliding", "post_quant") if f"{k}_val_bpb" in out)
    return {"post_quant_val_bpb": out["post_quant_val_bpb"], "val_bpb": out[f"{last}_val_bpb"],
            "val_loss": out[f"{last}_val_loss"]}

# ======================================================================================================
# The run: checks, then train, export, score (or EVAL_ONLY: score). The preflight checks everything that
# can fail before the first step: knobs, data (every shard), tokenizer, folders and their free space, the
# cap against the packed script, the compressor and the attention backend.

@dataclass
class RunData:
    train_files: list[Path]
    val_tokens: Tensor
    luts: ByteLUTs | Tensor   # the val tokens' byte sidecar when the dataset has one (CaseOps), else the LUTs
    tokenizer_sha256: str
    backend: str
    seconds: float = 0.0

def setup_distributed(dinfo: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", dinfo.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Ranks sharing a CPU split its cores: oversubscribed OpenMP threads spin and crawl.
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // dinfo.world_size)))
    if dinfo.distributed:   # the export keeps ranks waiting on rank 0's packs: longer than the default 10 min
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=45))
    return device

def make_run_id(hp: Hyperparameters, dinfo: DistInfo) -> str:
    """Rank 0 picks the id and broadcasts it so every rank names the same files."""
    if hp.run_id:
        require("/" not in hp.run_id and hp.run_id not in (".", ".."), "RUN_ID",
                f"{hp.run_id!r} must be a plain file name — use a name such as run1")
        return hp.run_id
    ids = [time.strftime("%Y%m%d_%H%M%S") + "_" + uuid.uuid4().hex[:6]]
    if dinfo.distributed:
        dist.broadcast_object_list(ids, src=0)
    return ids[0]

def check_fresh_run(hp: Hyperparameters, run_id: str) -> None:
    """A new run never overwrites another run's artifact, records, log or checkpoint."""
    if hp.resume or not hp.run_id:
        return
    out, logs = Path(hp.artifact_dir), Path(hp.log_dir)
    taken = [p for p in (out / f"{run_id}.ptz", logs / f"{run_id}.txt", logs / f"{run_id}.json",
                         out / f"{run_id}.r0.ckpt", *Path(hp.records_dir).glob(f"*_{glob.escape(run_id)}"))
             if p.exists()]
    require(not taken, "RUN_ID", f"{run_id} already has {taken[0] if taken else ''} — choose another "
            "RUN_ID, or RESUME=1 to continue it")

def check_shards(files: list[Path], vocab_size: int, dinfo: DistInfo, device: torch.device) -> int:
    """Every shard's header and token ids (a memory-mapped max), each rank a share; returns the tokens."""
    bad, total = len(files), 0
    for i in range(dinfo.rank, len(files), dinfo.world_size):
        try:
            total += len(shard_tokens(files[i], vocab_size))
        except DataError:
            bad = min(bad, i)
    found, tokens = torch.tensor([bad], device=device), torch.tensor([total], device=device)
    if dinfo.distributed:
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
        dist.all_reduce(tokens)
    if int(found) < len(files):
        shard_tokens(files[int(found)], vocab_size)   # raises the same error on every rank
    return int(tokens)

def check_room(hp: Hyperparameters, dinfo: DistInfo) -> None:
    """The cap leaves room for the packed script and the model's float tensors and row scales; each output
    folder is writable, and its disk has room for what the run writes there: the artifact (up to the cap),
    its records copy, the logs and, when checkpoints are on, one checkpoint a rank."""
    with torch.device("meta"):
        model = CrawlerGPT(hp)
    kinds, code = storage_plan(model, hp).kinds, len(packed_code())
    floor = sum(p.numel() * FLOAT_KINDS[kinds[n]].itemsize if kinds[n] in FLOAT_KINDS else 2 * p.size(0)
                for n, p in model.named_parameters()) // 4
    room = hp.size_limit - code
    require(room >= floor, "SIZE_LIMIT", f"{hp.size_limit:,} leaves {room:,} bytes after the {code:,}-byte "
            f"packed script; this model needs at least {floor:,}")   # its float tensors and row scales
    ckpt = 4 * count_unique_params(model) * (4 + bool(hp.ema_decay)) * dinfo.world_size
    needs = {"ARTIFACT_DIR": hp.size_limit + (ckpt if hp.checkpoint_every else 0), "LOG_DIR": 2**20,
             "RECORDS_DIR": hp.size_limit}   # experiments/records.py copies the artifact there after the run
    folders = {var: Path(getattr(hp, var.lower())) for var in needs}
    for var, folder in folders.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()   # a nameless file: nothing to clean up
        except OSError as exc:
            raise DataError(f"{var}: cannot write to {folder} ({exc.strerror}) — point {var} at a writable "
                            "folder") from None
    for var, folder in folders.items():   # folders on one disk share its free space
        need = sum(needs[v] for v, f in folders.items() if f.stat().st_dev == folder.stat().st_dev)
        free = shutil.disk_usage(folder).free
        require(free >= need, var, f"{folder} has {free:,} bytes free; the run needs {need:,} on that disk "
                "— free space or point it elsewhere", DataError)   # artifact, records copy, logs, ckpts

def preflight(hp: Hyperparameters, dinfo: DistInfo, device: torch.device, run_id: str = "") -> RunData:
    """Everything that can fail, checked before the first step. EVAL_ONLY needs only val shards, tokenizer."""
    t0 = time.perf_counter()
    # compile_model's recompile_limit is torch 2.7's name (cache_size_limit before); a pod keeps its own torch
    require(not hp.use_compile(device) or hasattr(torch._dynamo.config, "recompile_limit"), "torch",
            f"{torch.__version__} is older than 2.7 — pip install 'torch>=2.7' (requirements.txt), or "
            "COMPILE=0")
    require(hp.accum_splits % dinfo.world_size == 0, "ACCUM_SPLITS",
            f"{hp.accum_splits} is not divisible by the world size {dinfo.world_size}")
    if dinfo.master and run_id:
        check_fresh_run(hp, run_id)
    sp = load_tokenizer(hp.tokenizer_path)
    require(sp.vocab_size() == hp.vocab_size, "VOCAB_SIZE", f"{hp.vocab_size} != the {sp.vocab_size()} "
            f"pieces of {hp.tokenizer_path} — set VOCAB_SIZE={sp.vocab_size()} or use the data's tokenizer")
    files = shard_files(hp.data_path, hp.val_files, "VAL_FILES")
    val_tokens = torch.cat([load_data_shard(f, hp.vocab_size) for f in files])
    window = eval_settings(hp, load_artifact(hp.eval_only)[1])["eval_seq_len"] if hp.eval_only else \
        max(hp.eval_seq_len, hp.train_seq_len)
    require(val_tokens.numel() > window, "EVAL_SEQ_LEN", f"windows of {window} tokens exceed the "
            f"{val_tokens.numel()} val tokens — lower EVAL_SEQ_LEN/TRAIN_SEQ_LEN or add validation data")
    check_tokenizer_fits_shards(sp, val_tokens, hp)
    train_files: list[Path] = []
    if not hp.eval_only:
        train_files = shard_files(hp.data_path, hp.train_files, "TRAIN_FILES")
        tokens = check_shards(train_files, hp.vocab_size, dinfo, device)
        require(tokens > hp.train_batch_tokens // hp.accum_splits * dinfo.world_size, "TRAIN_BATCH_TOKENS",
                f"one step needs {hp.train_batch_tokens} tokens; the train shards hold {tokens} — lower "
                "TRAIN_BATCH_TOKENS or add train shards")
        check_room(hp, dinfo)
    compress_bytes(b"probe", 1)          # the compressor's module imports
    backend = attention_backend(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, 8, hp.num_heads, hp.model_dim // hp.num_heads, device=device, dtype=dtype)
    causal_attention(q, q[:, :, :hp.num_kv_heads], q[:, :, :hp.num_kv_heads], backend)  # it runs our shapes
    sha = hashlib.sha256(Path(hp.tokenizer_path).read_bytes()).hexdigest()
    sidecar = val_bytes(files, val_tokens)
    luts = build_byte_luts(sp, hp.vocab_size) if sidecar is None else sidecar
    return RunData(train_files, val_tokens, luts, sha, backend, time.perf_counter() - t0)

def val_bytes(files: list[Path], val_tokens: Tensor) -> Tensor | None:
    """The byte sidecars <x>_bytes_<n>.bin of the val shards <x>_<n>.bin (all or none): the original text's
    UTF-8 bytes of each token (0 for CaseOps operators and BOS), which the LUTs cannot know."""
    sidecars = [f.with_name(re.sub(r"_(\d+)\.bin$", r"_bytes_\1.bin", f.name)) for f in files]
    if not any(p.exists() for p in sidecars):
        return None
    missing = next((str(p) for p in sidecars if not p.exists()), "")
    require(not missing, missing, "is missing: every val shard needs its byte sidecar, or none", DataError)
    counts = torch.cat([load_data_shard(p) for p in sidecars]).long()
    require(counts.numel() == val_tokens.numel(), str(sidecars[0]), f"holds {counts.numel()} byte counts "
            f"for {val_tokens.numel()} val tokens", DataError)
    return counts

def calibration_batches(loader: DistributedTokenLoader, hp: Hyperparameters, dinfo: DistInfo) -> list[Tensor]:
    n, micro = max(1, hp.gptq_calib_batches // dinfo.world_size), hp.train_batch_tokens // hp.accum_splits
    return [loader.next_batch(micro, hp.train_seq_len)[0] for _ in range(n)]

def export(trainer: Trainer, hp: Hyperparameters, data: RunData, run_id: str) -> dict:
    """Calibrate, quantize and pack to fit the cap, write the artifact (rank 0), and check the cap."""
    log, dinfo, t0 = trainer.log, trainer.dinfo, time.perf_counter()
    calibrate = hp.quant == "gptq" or hp.quant_alloc == "hessian"
    batches = calibration_batches(trainer.loader, hp, dinfo) if calibrate else []
    calib = time.perf_counter() - t0 - CALIBRATION.seconds   # drawing the batches, then the Hessians below
    final = export_model(trainer.model, hp, batches, dinfo, log, artifact_meta(hp, data.tokenizer_sha256))
    calib += CALIBRATION.seconds
    total, cap = trainer.clock.seconds + calib, hp.max_wallclock_seconds
    log.kv(train_plus_calibration_seconds=f"{total:.1f}", calibration_seconds=f"{calib:.1f}",
           budget_seconds=cap)
    if 0 < cap < total:   # the reserve (cap - train_time_cap) fell short: the measured need is the fix
        log(f"warning: {total - cap:.1f}s over MAX_WALLCLOCK_SECONDS: set GPTQ_RESERVE_SECONDS="
            f"{math.ceil(total - hp.train_time_cap)}")
    artifact = Path(hp.artifact_dir) / f"{run_id}.ptz"
    if dinfo.master:
        write_atomic(artifact, final.blob, f"free space, then export from a checkpoint: RUN_ID={run_id} "
                     "RESUME=1")
    if dinfo.distributed:
        dist.barrier()
    sizes = {"bytes_code": len(packed_code()), "bytes_model": final.size}   # the blob rank 0 wrote
    sizes["bytes_total"] = sizes["bytes_code"] + sizes["bytes_model"]
    log.kv(quant=hp.quant, loop_aware=int(hp.quant == "gptq" and loop_aware(hp)),
           quant_k=f"{final.quant_k:.3f}", passes=final.passes, **sizes)
    if sizes["bytes_total"] > hp.size_limit:
        kept = artifact.with_suffix(".over_cap.ptz")
        if dinfo.master:   # rank 0 alone moves it (it wrote it); every rank raises the same error
            os.replace(artifact, kept)
        raise ArtifactTooLarge(f"SIZE_LIMIT: the artifact is {sizes['bytes_total'] - hp.size_limit} bytes "
                               f"over the cap of {hp.size_limit} (kept as {kept}) — shrink the model, or "
                               "set SIZE_TARGET=fit")
    return {**sizes, "artifact": str(artifact), "pruned": final.pruned, "quant_k": final.quant_k}

def check_submission_hash(artifact: Path) -> None:
    """EVAL_ONLY on a records folder: the artifact must be the one submission.json describes."""
    sub = artifact.parent / "submission.json"
    expected = json.loads(sub.read_text()).get("artifact_sha256") if sub.is_file() else None
    actual = hashlib.sha256(artifact.read_bytes()).hexdigest()
    require(expected in (None, actual), str(artifact), f"sha256 {actual[:12]}… differs from {sub}'s "
            f"{str(expected)[:12]}… — the file was changed after submission", ArtifactError)

def finish(hp: Hyperparameters, out: dict, clock: Clock, log: Logger, device: torch.device) -> dict:
    """The timing line, the final line, and logs/<RUN_ID>.json (every figure, for experiments/ tools)."""
    out["phase_seconds"] = dict(clock.phases)
    log(" ".join(f"time_{k}:{v:.1f}s" for k, v in clock.phases.items()))
    log(f"final val_bpb:{out['val_bpb']:.6f} val_loss:{out['val_loss']:.6f} bytes_total:{out['bytes_total']} "
        f"bytes_code:{out['bytes_code']} bytes_model:{out['bytes_model']}" +
        (f" pruned_values:{out['pruned']}" if out.get("pruned") else ""))
    if log.path is not None:
        record = {**out, "commit": git_commit(), "device": device_name(device), "torch": torch.__version__,
                  "packed_code_sha256": hashlib.sha256(packed_code()).hexdigest(), "log": str(log.path),
                  "hp": {f.name.upper(): getattr(hp, f.name) for f in knob_fields()}}
        write_atomic(Path(hp.log_dir) / f"{out['run_id']}.json", json.dumps(record, indent=1).encode())
    return out

def run(hp: Hyperparameters, dinfo: DistInfo, device: torch.device) -> dict:
    """The pipeline. Each phase is timed; the training clock inside it is the one the cap counts."""
    run_id, clock, out = make_run_id(hp, dinfo), Clock(), {}
    torch.manual_seed(hp.seed)  # identical on every rank
    with clock.phase("checks"):
        data = preflight(hp, dinfo, device, run_id)
    log = Logger(Path(hp.log_dir) / f"{run_id}.txt" if dinfo.master else None, append=hp.resume)
    log(f"crawler-golf train_gpt.py commit:{git_commit()} bytes_code:{len(packed_code())} python:"
        f"{platform.python_version()} torch:{torch.__version__} device:{device_name(device)} "
        f"world:{dinfo.world_size}")
    log("env: " + " ".join(f"{k.upper()}={getattr(hp, k)}" for k in sorted(hp.explicit)))
    log.kv(train_shards=len(data.train_files), val_tokens=data.val_tokens.numel(), attention=data.backend,
           val_bytes="luts" if isinstance(data.luts, ByteLUTs) else "sidecar",
           preflight_seconds=f"{data.seconds:.1f}")
    if hp.eval_only:
        check_submission_hash(Path(hp.eval_only))
        size = Path(hp.eval_only).stat().st_size
        out.update(bytes_code=len(packed_code()), bytes_model=size, bytes_total=len(packed_code()) + size)
        with clock.phase("eval"):
            out.update(score_artifact(Path(hp.eval_only), hp, data, dinfo, device, log))
        return finish(hp, {"run_id": run_id, **out}, clock, log, device)
    trainer = build_training(hp, data, dinfo, device, log, run_id)
    with clock.phase("train"):
        out.update(trainer.train(data))
    with clock.phase("export"):
        out.update(export(trainer, hp, data, run_id), unique_params=count_unique_params(trainer.model))
    with clock.phase("eval"):
        out.update(score_artifact(Path(out["artifact"]), hp, data, dinfo, device, log))
    log.kv(quant_gap=f"{out['post_quant_val_bpb'] - out['pre_quant_val_bpb']:.6f}")
    return finish(hp, {"run_id": run_id, **out}, clock, log, device)

def main(env: Mapping[str, str]) -> dict:
    hp = Hyperparameters.from_env(env)
    dinfo = DistInfo.from_env(env)
    device = setup_distributed(dinfo)
    try:
        return run(hp, dinfo, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

def cli(entry: Callable[[], Any], rank: str = "0") -> None:
    """Run entry(); an expected failure is one `error:` line (rank 0 only) and its exit code."""
    try:
        entry()
    except GolfError as err:
        print(*[f"error: {err}"] * (rank == "0"), file=sys.stderr)
        sys.exit(err.exit_code)

if __name__ == "__main__":
    environment = dict(os.environ)   # the one place the process environment is read
    cli(lambda: main(environment), environment.get("RANK", "0"))
