"""crawler-golf: one self-contained trainer for the Parameter Golf challenge.

F unique flat blocks (U-Net skips) run once; C shared crawler blocks run N loops.
Configured only through environment variables (see README or Hyperparameters).
Run: `python train_gpt.py` (1 process) or `torchrun --nproc_per_node=K train_gpt.py`.
Importing this module has no side effects: no device is touched, no process group.
"""
from __future__ import annotations

import ast
import base64
import contextlib
import copy
import dataclasses
import difflib
import functools
import glob
import hashlib
import io
import json
import lzma
import math
import os
import platform
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# Optional GPU kernels, imported once; the fallbacks compute the same maths in PyTorch.
try:  # FlashAttention 3 (Hopper)
    from flash_attn_interface import flash_attn_func as fa3_attention
except Exception:  # noqa: BLE001 - any import failure means "not available"
    fa3_attention = None

# ============================================================================
# Hyperparameters
# ============================================================================


class GolfError(Exception):
    """An expected failure: main() prints `error: <message>` and exits with exit_code, no traceback."""
    exit_code = 2


class HyperparameterError(GolfError, ValueError):
    """A bad or unknown environment variable; the message names it."""


class DataError(GolfError, ValueError):
    """Shards, tokenizer or output folders are missing, malformed or inconsistent."""


class ArtifactError(GolfError, ValueError):
    """A malformed, truncated, tampered or foreign artifact; the message names the file."""


class ArtifactTooLarge(GolfError):
    """Code + model bytes over SIZE_LIMIT: not a valid submission."""
    exit_code = 3


class Diverged(GolfError, FloatingPointError):
    """A non-finite training loss."""
    exit_code = 4


def require(ok: bool, subject: str, what: str, cls: type[GolfError] = HyperparameterError) -> None:
    if not ok:
        raise cls(f"{subject}: {what}")


def knob(default: Any, doc: str, *, choices: tuple = (), lo: float | None = None, hi: float | None = None,
         model: bool = False) -> Any:
    """model=True: the knob shapes the network, so the artifact stores it to rebuild the model."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "lo": lo, "hi": hi, "model": model})


@dataclass(frozen=True)
class Hyperparameters:
    """Every knob of the script. The env var of a field is its name upper-cased.
    Defaults are the production 8xH100 configuration."""
    # --- run and data
    run_id: str = knob("", "name of the run (logs/<RUN_ID>.txt); empty = timestamp + random suffix")
    seed: int = knob(1337, "random seed", lo=0)
    data_path: str = knob("data/datasets/fineweb10B_sp1024", "folder holding the token shards")
    tokenizer_path: str = knob("data/tokenizers/fineweb_1024_bpe.model", "SentencePiece model used for the byte LUTs")
    train_files: str = knob("*_train_*.bin", "glob of training shards, relative to DATA_PATH")
    val_files: str = knob("*_val_*.bin", "glob of validation shards, relative to DATA_PATH")
    log_dir: str = knob("logs", "folder for logs/<RUN_ID>.txt and <RUN_ID>.json")
    # --- model shape
    vocab_size: int = knob(1024, "vocabulary size (must match the tokenizer)", lo=2, model=True)
    model_dim: int = knob(640, "residual width", lo=8, model=True)
    num_heads: int = knob(10, "attention heads", lo=1, model=True)
    num_kv_heads: int = knob(5, "key/value heads (GQA); divides NUM_HEADS", lo=1, model=True)
    num_flat_layers: int = knob(4, "unique flat blocks, run once, with U-Net skips", lo=0, model=True)
    num_crawler_layers: int = knob(2, "shared crawler blocks (0 = plain GPT)", lo=0, model=True)
    crawler_loops: int = knob(2, "times the crawler blocks run", lo=1, model=True)
    crawler_position: str = knob("end", "where the crawler runs: after the flat stack, or at the U-Net bottleneck",
                                 choices=("end", "bottleneck"), model=True)
    inst_dim: int = knob(0, "flow-instruction bottleneck width (0 = off)", lo=0, model=True)
    loop_embed_scale: float = knob(0.01, "norm of each QR-orthogonal loop embedding at init", lo=0.0, model=True)
    mlp_mult: float = knob(4.0, "flat MLP hidden = MLP_MULT * MODEL_DIM (fractional allowed)", lo=0.25, model=True)
    crawler_mlp_mult: float = knob(4.0, "crawler MLP hidden multiple", lo=0.25, model=True)
    mlp_act: str = knob("leaky_relu2", "MLP activation", choices=("relu2", "leaky_relu2"), model=True)
    mlp_leaky_slope: float = knob(0.5, "negative slope of leaky_relu2 in flat blocks", lo=0.0, hi=1.0, model=True)
    crawler_mlp_leaky_slope: float = knob(0.5, "negative slope of leaky_relu2 in crawler blocks", lo=0.0, hi=1.0, model=True)
    rope_base: float = knob(10000.0, "RoPE base", lo=1.0, model=True)
    rope_dims: int = knob(16, "rotary dims per head (0 = the whole head; partial RoPE)", lo=0, model=True)
    qk_gain_init: float = knob(4.0, "initial per-head query gain", lo=0.0, model=True)
    logit_softcap: float = knob(30.0, "tanh soft cap on logits (0 = off)", lo=0.0, model=True)
    tied_embed_init_std: float = knob(0.005, "std of the tied embedding at init", lo=0.0, model=True)
    ln_scale: bool = knob(True, "scale block i's normed input by 1/sqrt(i+1) (i = effective depth)", model=True)
    xsa_last_n: int = knob(-1, "exclusive self attention on the last N blocks of effective depth (-1 = all, 0 = off)",
                           lo=-1, model=True)
    ngram_hash: str = knob("trigram", "hashed n-gram embedding added to the token embedding",
                           choices=("none", "bigram", "trigram"), model=True)
    ngram_buckets: int = knob(4096, "n-gram hash buckets", lo=2, model=True)
    ngram_dim: int = knob(128, "n-gram table width", lo=1, model=True)
    smear_gate: bool = knob(False, "add a gated copy of the previous token's embedding (zero-init, BOS-aware)", model=True)
    ve_dim: int = knob(128, "value-embedding table width (0 = off)", lo=0, model=True)
    ve_layers: str = knob("crawler", "blocks whose attention values get the value embedding: crawler | flat | all | "
                          "comma list of unique-block indices (flat blocks first)", model=True)
    crawler_cadence: int = knob(1, "all crawler loops fire on every k-th step, one loop otherwise (1 = always)", lo=1)
    crawler_loops_schedule: str = knob("", "progressive recurrence, f:n,...: n crawler loops from fraction f of the training "
                                       "(time when capped, else steps), e.g. 0:1,0.5:2; empty = CRAWLER_LOOPS throughout; "
                                       "evaluation always runs every loop")
    # --- crawler research arms: each is off by default, and off is the plain crawler bit for bit
    helix: bool = knob(False, "Helix: the crawler also fires on a stream of its own after every HELIX_STRIDE flat "
                       "layers, with gated cross-injection both ways (firing k reuses loop k mod CRAWLER_LOOPS)", model=True)
    helix_stride: int = knob(1, "flat layers between two Helix firings", lo=1, model=True)
    helix_dim: int = knob(32, "width of the Helix bridges", lo=1, model=True)
    helix_mode: str = knob("linear", "Helix bridge: gated low-rank projection, or single-head causal cross-attention",
                           choices=("linear", "cross_attn"), model=True)
    loop_smear: bool = knob(False, "blend each loop's output with the previous loop's (loop 0: the encoder output), "
                            "per channel, zero-init", model=True)
    tap_dim: int = knob(0, "encoder taps: flat-layer outputs projected to TAP_DIM and injected into every loop (0 = off)",
                        lo=0, model=True)
    tap_layers: str = knob("all", "flat layers tapped: all (those before the crawler) or a comma list of flat indices",
                           model=True)
    tap_per_loop: bool = knob(True, "one tap write-back per loop (else one shared by all loops)", model=True)
    crawler_mlp: str = knob("standard", "crawler MLP shape; the others add per-loop CHOKE_DIM bottlenecks",
                            choices=("standard", "choke_flat", "pyramid", "pyramid_res", "grouped", "residual"), model=True)
    choke_dim: int = knob(64, "width of the per-loop choke bottleneck", lo=1, model=True)
    choke_groups: int = knob(4, "block-diagonal groups of CRAWLER_MLP=grouped", lo=1, model=True)
    crawler_loop_rope_scales: str = knob("", "per-loop RoPE wavelength multipliers, one per loop, e.g. 1,2,4 "
                                         "(inv_freq is divided by them; empty = off)", model=True)
    deliberation: bool = knob(False, "persistent deliberation: a learned consensus state, gated by every firing "
                              "and pulled into every firing's output", model=True)
    loop_dt: float = knob(1.0, "contractive loops: x <- (1-dt)*x + dt*F(x) per loop (1 = off)", lo=0.01, hi=1.0, model=True)
    # --- training
    iterations: int = knob(20000, "training steps (upper bound; the wallclock cap usually ends first)", lo=0)
    max_wallclock_seconds: float = knob(600.0, "training time cap in seconds (0 = none)", lo=0.0)
    train_tflops: float = knob(0.0, "training compute budget in TFLOPs (> 0 sets ITERATIONS to the steps it buys at "
                               "this config's FLOPs: equal-compute arms, whatever the machine's speed or load)", lo=0.0)
    train_batch_tokens: int = knob(786432, "tokens per optimizer step, all ranks together", lo=1)
    train_seq_len: int = knob(2048, "training sequence length", lo=2)
    accum_splits: int = knob(8, "micro-batches per step summed over ranks; 1 and 8 GPUs do the same maths", lo=1)
    warmup_steps: int = knob(20, "compile-priming steps, undone before training (only with COMPILE on)", lo=0)
    warmdown_iters: int = knob(3500, "linear LR decay over the last N steps (wallclock-estimated)", lo=0)
    compile: str = knob("auto", "torch.compile the model: auto = on for CUDA, off on CPU", choices=("auto", "0", "1"))
    compile_backend: str = knob("inductor", "torch.compile backend (aot_eager/eager: the CPU tests, or to debug a compile "
                                "problem)", choices=("inductor", "aot_eager", "eager"))
    matrix_lr: float = knob(0.025, "Muon learning rate (block matrices)", lo=0.0)
    scalar_lr: float = knob(0.025, "Adam learning rate (vectors, gains, loop embeddings)", lo=0.0)
    tied_embed_lr: float = knob(0.035, "Adam learning rate (tied embedding)", lo=0.0)
    muon_momentum: float = knob(0.99, "Muon momentum after warm-up", lo=0.0, hi=1.0)
    muon_momentum_warmup_start: float = knob(0.92, "Muon momentum at step 0", lo=0.0, hi=1.0)
    muon_momentum_warmup_steps: int = knob(1500, "steps to ramp the Muon momentum", lo=0)
    muon_backend_steps: int = knob(5, "Newton-Schulz iterations", lo=1)
    muon_wd: float = knob(0.04, "Muon decoupled weight decay", lo=0.0)
    adam_wd: float = knob(0.04, "AdamW decoupled weight decay", lo=0.0)
    beta1: float = knob(0.9, "Adam beta1", lo=0.0, hi=1.0)
    beta2: float = knob(0.95, "Adam beta2", lo=0.0, hi=1.0)
    adam_eps: float = knob(1e-8, "Adam epsilon", lo=0.0)
    grad_clip_norm: float = knob(0.3, "global grad-norm clip (0 = off)", lo=0.0)
    warmdown_frac: float = knob(0.0, "warmdown as a fraction of the run's estimated steps (> 0 overrides WARMDOWN_ITERS)",
                                lo=0.0, hi=1.0)
    min_lr_scale: float = knob(0.0, "floor of the LR scale in the warmdown", lo=0.0, hi=1.0)
    ema_decay: float = knob(0.997, "EMA of the weights (0 = off), warmed up as min(decay, (1+t)/(10+t))", lo=0.0, hi=0.999999)
    swa_every: int = knob(50, "SWA: average the weights every k steps once the LR scale < SWA_START_SCALE (0 = off)", lo=0)
    swa_start_scale: float = knob(0.2, "LR scale below which SWA collects", lo=0.0, hi=1.0)
    export_weights: str = knob("ema", "weights that are exported and scored", choices=("raw", "ema", "swa"))
    late_qat_threshold: float = knob(0.15, "int6 fake quantization (straight-through) once the LR scale < this (0 = off)",
                                     lo=0.0, hi=1.0)
    qat_crawler_only: bool = knob(False, "late QAT on the crawler only, as calibrated uniform noise instead of rounding")
    replay_batches: int = knob(0, "keep the last K training steps' batches and replay them after the loop (0 = off)", lo=0)
    replay_epochs: int = knob(2, "passes over the replay buffer", lo=1)
    replay_lr_scale: float = knob(0.1, "LR multiple during replay", lo=0.0)
    distill_steps: int = knob(0, "self-distillation steps from the EMA teacher after the loop (0 = off)", lo=0)
    distill_temperature: float = knob(2.0, "distillation softmax temperature", lo=0.01)
    distill_alpha: float = knob(0.7, "weight of the distillation KL (1 - alpha on the plain loss)", lo=0.0, hi=1.0)
    distill_lr_scale: float = knob(0.05, "LR multiple during distillation", lo=0.0)
    checkpoint_every: int = knob(0, "write a resumable checkpoint every N steps (0 = off)", lo=0)
    resume: bool = knob(False, "continue RUN_ID from its last checkpoint in ARTIFACT_DIR")
    dry_run: bool = knob(False, "build the model, print parameters, depth, the k the cap implies, estimated artifact "
                         "bytes and the pod cost model (FLOPs, ms/step, steps, memory, eval and export seconds), then exit")
    rehearsal: bool = knob(False, "pod rehearsal: the production code path at production shapes for 2 steps of one "
                           "sequence per micro-batch, compile warm-up with QAT, the full-size export with the real "
                           "compressor, a reload and an 8-window eval; prints each phase's seconds")
    pod_gpus: int = knob(8, "H100s the DRY_RUN cost model projects for", lo=1)
    # --- evaluation and logging
    val_loss_every: int = knob(1000, "validate every N steps (0 = only at the end)", lo=0)
    val_batch_size: int = knob(524288, "tokens per validation batch, all ranks together", lo=1)
    val_max_tokens: int = knob(0, "cap on validation tokens for periodic checks (0 = all)", lo=0)
    train_log_every: int = knob(100, "progress line every N steps", lo=1)
    eval_seq_len: int = knob(2048, "evaluation window length", lo=2)
    eval_stride: int = knob(64, "sliding-window stride of the final evaluation", lo=1)
    eval_only: str = knob("", "path of an artifact to evaluate without training (eval settings from the artifact)")
    # --- export
    quant: str = knob("gptq", "quantizer of the block matrices", choices=("rtn", "gptq"))
    quant_clip: str = knob("sdclip", "per-row clip: the row's absmax, or SDClip's k row stds (may lie beyond the absmax)",
                           choices=("absmax", "sdclip"))
    quant_k: float = knob(12.85, "SDClip: matrix clip in row stds (SIZE_TARGET=fit starts its search here)", lo=0.5, hi=64.0)
    embed_quant_k: float = knob(20.0, "SDClip: clip of the embedding tables in row stds (scaled with QUANT_K by the fit)",
                                lo=0.5, hi=64.0)
    quant_alloc: str = knob("uniform", "SDClip k per group: one k for all, or per group (embedding, each block, the rest) "
                            "from the Hessian traces at the byte target", choices=("uniform", "hessian"))
    quant_compare: bool = knob(False, "also score the other export variants (RTN, one-pass and loop-aware GPTQ) from the "
                               "same weights (plain eval) and log the bytes under every compressor")
    gptq_damp: float = knob(0.01, "GPTQ damping, relative to the mean Hessian diagonal", lo=0.0)
    gptq_block_size: int = knob(128, "GPTQ columns per lazy-update block", lo=1)
    gptq_act_order: bool = knob(True, "GPTQ column order: descending Hessian diagonal (else natural)")
    gptq_calib_batches: int = knob(16, "training micro-batches (all ranks) used for the GPTQ Hessians", lo=1)
    gptq_loop_aware: str = knob("auto", "two-phase GPTQ: crawler Hessians on the quantized flat section "
                                "(auto = when there is a crawler)", choices=("auto", "0", "1"))
    gptq_reserve_seconds: float = knob(30.0, "seconds of MAX_WALLCLOCK_SECONDS kept for GPTQ calibration", lo=0.0)
    crawler_quant_int8: bool = knob(False, "store the shared crawler matrices as int8 (flat ones stay int6)")
    embed_quant: str = knob("int8", "storage of the tied embedding", choices=("int8", "int6", "fp16"))
    compressor: str = knob("brotli", "artifact compressor", choices=("zstd", "brotli", "lzma"))
    compress_level: int = knob(-1, "compressor level; -1 = its best (zstd 22, brotli 11, lzma 9e)", lo=-1)
    byte_shuffle: bool = knob(True, "store multi-byte floats byte-plane by byte-plane (compresses better)")
    size_limit: int = knob(16_000_000, "cap on code + model bytes", lo=1)
    size_target: str = knob("fit", "fit: choose the SDClip k so code + model lands in [SIZE_LIMIT - SIZE_MARGIN, SIZE_LIMIT]; "
                            "prune: fixed k, then zero the cheapest +-1 values if over; none: fixed k, fail if over "
                            "(fit and prune also prune as a last resort)", choices=("none", "fit", "prune"))
    size_margin: int = knob(20_000, "SIZE_TARGET=fit aims at most this many bytes under SIZE_LIMIT", lo=0)
    artifact_dir: str = knob("artifacts", "folder for <RUN_ID>.ptz")
    records_dir: str = knob("records", "folder for records/<date>_<RUN_ID>/")
    submit_author: str = knob("", "submission.json author")
    submit_github_id: str = knob("", "submission.json github_id")
    submit_name: str = knob("", "submission.json name")
    submit_blurb: str = knob("", "submission.json blurb")
    # knobs the environment set explicitly (not a knob itself): EVAL_ONLY keeps these over the artifact's
    explicit: frozenset = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        for f in knob_fields():
            _check_range(f, getattr(self, f.name))
        require(self.model_dim % self.num_heads == 0, "MODEL_DIM", f"{self.model_dim} is not divisible by NUM_HEADS={self.num_heads}")
        require(self.num_heads % self.num_kv_heads == 0, "NUM_KV_HEADS", f"{self.num_kv_heads} does not divide NUM_HEADS={self.num_heads}")
        head_dim = self.model_dim // self.num_heads
        require(head_dim % 2 == 0, "MODEL_DIM", f"head dim {head_dim} must be even for RoPE")
        require(self.rope_dims % 2 == 0 and self.rope_dims <= head_dim, "ROPE_DIMS", f"{self.rope_dims} must be even and <= head dim {head_dim}")
        require(self.num_flat_layers + self.num_crawler_layers > 0, "NUM_FLAT_LAYERS", "the model needs at least one block")
        require(self.train_batch_tokens % (self.accum_splits * self.train_seq_len) == 0, "TRAIN_BATCH_TOKENS",
                f"{self.train_batch_tokens} must be a multiple of ACCUM_SPLITS*TRAIN_SEQ_LEN={self.accum_splits * self.train_seq_len}")
        require(self.max_wallclock_seconds == 0 or self.train_time_cap > 0, "GPTQ_RESERVE_SECONDS",
                f"{self.gptq_reserve_seconds} leaves no training time in MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds}")
        require(self.ema_decay > 0 or (self.export_weights != "ema" and not self.distill_steps), "EMA_DECAY",
                "EXPORT_WEIGHTS=ema and DISTILL_STEPS need EMA_DECAY > 0")
        require(self.swa_every > 0 or self.export_weights != "swa", "SWA_EVERY", "EXPORT_WEIGHTS=swa needs SWA_EVERY > 0")
        require(not self.resume or bool(self.run_id), "RESUME", "RESUME=1 needs the RUN_ID of the run to continue")
        require(self.eval_stride <= self.eval_seq_len, "EVAL_STRIDE", f"{self.eval_stride} exceeds EVAL_SEQ_LEN={self.eval_seq_len}")
        require(self.size_target != "fit" or self.quant_clip == "sdclip", "SIZE_TARGET",
                "fit chooses the SDClip k; it needs QUANT_CLIP=sdclip (or use SIZE_TARGET=prune/none with absmax)")
        self.loops_schedule()  # raises on a malformed CRAWLER_LOOPS_SCHEDULE
        self.ve_block_ids()  # raises on a malformed VE_LAYERS
        self._check_arms()

    def _check_arms(self) -> None:
        arms = {"HELIX": self.helix, "LOOP_SMEAR": self.loop_smear,
                "TAP_DIM": self.tap_dim > 0, "CRAWLER_MLP": self.crawler_mlp != "standard",
                "CRAWLER_LOOP_ROPE_SCALES": bool(self.crawler_loop_rope_scales),
                "DELIBERATION": self.deliberation, "LOOP_DT": self.loop_dt < 1.0}
        for var, on in arms.items():
            require(not on or self.num_crawler_layers > 0, var, "is a crawler arm; NUM_CRAWLER_LAYERS is 0")
        if self.helix:
            require(self.helix_firings > 0, "HELIX_STRIDE", f"{self.helix_stride} exceeds NUM_FLAT_LAYERS={self.num_flat_layers}: "
                    "the crawler would never fire beside them")
            require(self.tap_dim == 0, "TAP_DIM", "taps read the finished encoder; Helix firings run inside it")
        self.tap_layer_ids()
        if self.crawler_mlp == "grouped":
            hidden = int(round(self.crawler_mlp_mult * self.model_dim))
            require(hidden % self.choke_groups == 0 and self.choke_dim % self.choke_groups == 0, "CHOKE_GROUPS",
                    f"{self.choke_groups} must divide CHOKE_DIM={self.choke_dim} and the crawler MLP width {hidden}")
        self.loop_rope_scales()

    def tap_layer_ids(self) -> list[int]:
        """Flat layers whose outputs the taps read: those that run before the crawler."""
        if not self.tap_dim:
            return []
        before = self.num_flat_layers if self.crawler_position == "end" else self.num_flat_layers // 2
        ids = _number_list(self.tap_layers, "TAP_LAYERS", int) if self.tap_layers != "all" else list(range(before))
        require(bool(ids) and all(0 <= i < before for i in ids), "TAP_LAYERS",
                f"{ids} must be non-empty and within the {before} flat layers that run before the crawler")
        return sorted(set(ids))

    def loop_rope_scales(self) -> list[float]:
        if not self.crawler_loop_rope_scales:
            return []
        scales = _number_list(self.crawler_loop_rope_scales, "CRAWLER_LOOP_ROPE_SCALES", float)
        require(len(scales) == self.crawler_loops and min(scales) > 0, "CRAWLER_LOOP_ROPE_SCALES",
                f"{scales}: need CRAWLER_LOOPS={self.crawler_loops} positive values")
        return scales

    def loops_schedule(self) -> list[tuple[float, int]]:
        """[(from fraction, loops)] in order; [(0, CRAWLER_LOOPS)] when no schedule is set."""
        if not self.crawler_loops_schedule:
            return [(0.0, self.crawler_loops)]
        try:
            steps = [(float(f), int(n)) for f, n in (item.split(":") for item in self.crawler_loops_schedule.split(","))]
        except ValueError:
            raise HyperparameterError(f"CRAWLER_LOOPS_SCHEDULE={self.crawler_loops_schedule!r}: expected f:n,... "
                                      "e.g. 0:1,0.5:2") from None
        fracs = [f for f, _ in steps]
        require(fracs[0] == 0 and fracs == sorted(set(fracs)) and fracs[-1] < 1, "CRAWLER_LOOPS_SCHEDULE",
                f"{self.crawler_loops_schedule!r}: fractions must start at 0, rise, and stay below 1")
        require(all(1 <= n <= self.crawler_loops for _, n in steps), "CRAWLER_LOOPS_SCHEDULE",
                f"{self.crawler_loops_schedule!r}: loop counts must lie in 1..CRAWLER_LOOPS={self.crawler_loops}")
        return steps

    def ve_block_ids(self) -> set[int]:
        """Unique-block indices (flat blocks first, then crawler blocks) that add value embeddings."""
        n_flat, n_all = self.num_flat_layers, self.num_flat_layers + self.num_crawler_layers
        named = {"crawler": range(n_flat, n_all), "flat": range(n_flat), "all": range(n_all)}
        if self.ve_dim == 0:
            return set()
        if self.ve_layers in named:
            return set(named[self.ve_layers])
        ids = set(_number_list(self.ve_layers, "VE_LAYERS", int))
        require(all(0 <= i < n_all for i in ids), "VE_LAYERS", f"{sorted(ids)} outside the {n_all} unique blocks")
        return ids

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Hyperparameters":
        reject_unknown_knobs(env)
        values = {f.name: parse_knob(f, env[f.name.upper()]) for f in knob_fields() if f.name.upper() in env}
        return cls(**values, explicit=frozenset(values))

    def model_knobs(self) -> dict[str, Any]:
        """What the artifact stores to rebuild the network (no paths, run ids or blurbs)."""
        return {f.name: getattr(self, f.name) for f in knob_fields() if f.metadata["model"]}

    @property
    def helix_firings(self) -> int:
        return self.num_flat_layers // self.helix_stride if self.helix else 0

    @property
    def effective_depth(self) -> int:
        return self.num_flat_layers + self.num_crawler_layers * (self.crawler_loops + self.helix_firings)

    @property
    def post_loop_steps(self) -> float:
        """Step-equivalents of the work after the loop (replay; distillation adds a teacher forward)."""
        return self.replay_batches * self.replay_epochs + 1.5 * self.distill_steps

    @property
    def train_time_cap(self) -> float:
        """Seconds the training loop may use: the cap less what GPTQ calibration needs after it."""
        if self.max_wallclock_seconds <= 0:
            return 0.0
        return self.max_wallclock_seconds - (self.gptq_reserve_seconds if self.quant == "gptq" else 0.0)

    def use_compile(self, device: torch.device) -> bool:
        return self.compile == "1" or (self.compile == "auto" and device.type == "cuda")


def knob_fields() -> list[dataclasses.Field]:
    return [f for f in fields(Hyperparameters) if "doc" in f.metadata]


def knob_names() -> list[str]:
    return sorted(f.name.upper() for f in knob_fields())


def _number_list(text: str, var: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HyperparameterError(f"{var}={text!r}: expected a comma list of {kind.__name__}s") from None
    require(all(math.isfinite(v) for v in values), var, f"{text!r}: values must be finite")
    return values


def _check_range(f: dataclasses.Field, value: Any) -> None:
    meta, var = f.metadata, f.name.upper()
    if meta["choices"] and value not in meta["choices"]:
        raise HyperparameterError(f"{var}={value!r}: expected one of {', '.join(map(str, meta['choices']))}")
    if isinstance(value, float) and not math.isfinite(value):
        raise HyperparameterError(f"{var}={value!r}: must be a finite number")
    if meta["lo"] is not None and value < meta["lo"]:
        raise HyperparameterError(f"{var}={value!r}: must be >= {meta['lo']}")
    if meta["hi"] is not None and value > meta["hi"]:
        raise HyperparameterError(f"{var}={value!r}: must be <= {meta['hi']}")


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def parse_knob(f: dataclasses.Field, raw: str) -> Any:
    var, kind, text = f.name.upper(), type(f.default), raw.strip()
    try:
        if kind is bool:
            if text.lower() not in _TRUE | _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if kind is int:
            number = float(text.replace("_", ""))  # accepts 786_432 and 1e6
            if not number.is_integer():
                raise ValueError
            return int(number)
        if kind is float:
            return float(text)
        return text
    except (ValueError, OverflowError):
        raise HyperparameterError(f"{var}={raw!r}: expected {kind.__name__}") from None


# Variables set by torchrun that share our prefixes.
FOREIGN_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_NAME",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID"}
# Names other scripts (the seeds', nanoGPT's, upstream's) use for what is spelled differently here.
ALIASES = {
    "NUM_LAYERS": "NUM_FLAT_LAYERS", "USE_CRAWLER": "NUM_CRAWLER_LAYERS (0 = no crawler)",
    "LOOP_AWARE_GPTQ": "GPTQ_LOOP_AWARE", "SKIP_GPTQ": "QUANT=rtn", "TORCH_COMPILE": "COMPILE",
    "BIGRAM_VOCAB_SIZE": "NGRAM_HASH=bigram with NGRAM_BUCKETS", "TRIGRAM_VOCAB_SIZE": "NGRAM_HASH=trigram with NGRAM_BUCKETS",
    "BIGRAM_DIM": "NGRAM_DIM", "TRIGRAM_DIM": "NGRAM_DIM",
    "TTT_BURST_ENABLED": "REPLAY_BATCHES (> 0 turns replay on: it replays training data, it is not test-time training)",
    "TTT_BURST_STEPS": "REPLAY_BATCHES", "TTT_BURST_EPOCHS": "REPLAY_EPOCHS", "TTT_BURST_LR_FACTOR": "REPLAY_LR_SCALE",
    "DISTILL_TEMP": "DISTILL_TEMPERATURE", "CRAWLER_QUANT": "CRAWLER_QUANT_INT8",
    "HELIX_CROSS_ATTN": "HELIX_MODE=cross_attn", "CRAWLER_CHOKE_DIM": "CHOKE_DIM (with CRAWLER_MLP)",
    "TRAIN_BATCH_SIZE": "TRAIN_BATCH_TOKENS", "BATCH_SIZE": "TRAIN_BATCH_TOKENS", "TRAIN_SEQ_LENGTH": "TRAIN_SEQ_LEN",
    "SEQ_LEN": "TRAIN_SEQ_LEN", "MAX_WALLCLOCK_SECS": "MAX_WALLCLOCK_SECONDS", "WALLCLOCK_SECONDS": "MAX_WALLCLOCK_SECONDS",
    "ITERS": "ITERATIONS", "NUM_ITERATIONS": "ITERATIONS", "MAX_STEPS": "ITERATIONS", "NUM_STEPS": "ITERATIONS",
    "CHECKPOINT": "CHECKPOINT_EVERY", "SAVE_EVERY": "CHECKPOINT_EVERY", "RESUME_FROM": "RESUME=1 with RUN_ID",
    "WARMUP_ITERS": "WARMUP_STEPS", "WARMDOWN_STEPS": "WARMDOWN_ITERS", "LR": "MATRIX_LR / SCALAR_LR / TIED_EMBED_LR",
    "LEARNING_RATE": "MATRIX_LR / SCALAR_LR / TIED_EMBED_LR", "EMBED_LR": "TIED_EMBED_LR", "WEIGHT_DECAY": "MUON_WD / ADAM_WD",
    "VAL_EVERY": "VAL_LOSS_EVERY", "EVAL_EVERY": "VAL_LOSS_EVERY", "LOG_EVERY": "TRAIN_LOG_EVERY",
    "N_EMBD": "MODEL_DIM", "D_MODEL": "MODEL_DIM", "DIM": "MODEL_DIM", "N_HEAD": "NUM_HEADS", "N_LAYER": "NUM_FLAT_LAYERS",
    "OUTPUT_DIR": "LOG_DIR / ARTIFACT_DIR", "GRAD_CLIP": "GRAD_CLIP_NORM", "EVAL_SEQ_LENGTH": "EVAL_SEQ_LEN",
}
# Knobs of arms that lost and were deleted, with the value that meant off: setting one is an error, never a
# silent no-op (experiments/ablate.py resumes a sweep whose stored runs had it off).
REMOVED_KNOBS = {"DELTA_NET_HEADS": ("0", "the DeltaNet arm, experiments/LOG.md crawler_arms 2026-11-24")}
# Prefixes too generic to claim: an unrelated variable may start with them.
_GENERIC_PREFIXES = {"RUN", "DATA", "LOG", "MODEL", "MAX", "VAL", "TRAIN", "SEED", "COMPILE", "ITERATIONS",
                     "SIZE", "RECORDS", "ARTIFACT", "SUBMIT", "EMBED", "BYTE", "COMPRESS", "COMPRESSOR", "QUANT", "EVAL"}


def edits(a: str, b: str) -> int:
    """Characters changed between two names, from difflib's opcodes (a swap of neighbours counts 2)."""
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in ops if op != "equal")


def reject_unknown_knobs(env: Mapping[str, str]) -> None:
    """A variable that looks like one of ours but is not one is an error, not a silent no-op: any case,
    within two edits of a knob (short names too), one of our prefixes, or another script's name for a knob.
    Unrelated names (HOME, OMP_NUM_THREADS, TORCH_LOGS ...) stay more than two edits away (tests/test_hparams.py)."""
    known = set(knob_names())
    prefixes = {n.split("_")[0] for n in known if "_" in n} - _GENERIC_PREFIXES
    for var in sorted(env):
        if var in known or var in FOREIGN_VARS:
            continue
        name = var.upper()
        if name in ALIASES:
            raise HyperparameterError(f"{var}: not a knob of train_gpt.py; here it is {ALIASES[name]}")
        if name in REMOVED_KNOBS:
            raise HyperparameterError(f"{var}: removed from train_gpt.py ({REMOVED_KNOBS[name][1]})")
        distance, closest = min((edits(name, k), k) for k in known)
        if distance <= 2 or ("_" in name and name.split("_")[0] in prefixes):
            hint = closest if distance <= len(closest) // 2 else None
            raise HyperparameterError(f"{var}: not a knob of train_gpt.py" +
                                      (f"; did you mean {hint}?" if hint else "; see the README's knob table"))


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "DistInfo":
        try:
            return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
        except ValueError:
            raise HyperparameterError("RANK/WORLD_SIZE/LOCAL_RANK: must be integers (torchrun sets them)") from None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


# ============================================================================
# Logging
# ============================================================================


class Logger:
    """Rank 0 prints and appends to logs/<RUN_ID>.txt; other ranks stay quiet."""

    def __init__(self, path: Path | None, append: bool = False):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not append:
                path.write_text("")

    def __call__(self, msg: str) -> None:
        if self.path is None:
            return
        print(msg, flush=True)
        with self.path.open("a") as fh:
            fh.write(msg + "\n")

    def kv(self, **pairs: Any) -> None:
        self(" ".join(f"{k}:{_fmt(v)}" for k, v in pairs.items()))


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


class PhaseTimer:
    """Wall time per named phase, summed, for the final timing line."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def summary(self) -> str:
        return " ".join(f"time_{k}:{v:.1f}s" for k, v in self.seconds.items())


class Clock:
    """The training clock: it runs inside running() and stops inside paused() (validation, checkpoints)."""

    def __init__(self, seconds: float = 0.0):
        self.banked, self.since = seconds, None

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


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return f"cpu_{platform.machine()}_{os.cpu_count()}cores"


def log_startup(log: Logger, hp: Hyperparameters, dinfo: DistInfo, device: torch.device) -> None:
    log(f"crawler-golf train_gpt.py commit:{git_commit()} bytes_code_source:{len(source_bytes())} "
        f"bytes_code:{len(packed_code())}")
    log(f"python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__} "
        f"device:{device_name(device)} world_size:{dinfo.world_size}")
    for f in sorted(knob_fields(), key=lambda f: f.name):
        log(f"hp {f.name.upper()}={getattr(hp, f.name)}")


@functools.lru_cache(maxsize=1)
def source_bytes() -> bytes:
    """The script as it was when first asked (start-up), even if the file changes during the run."""
    return Path(__file__).read_bytes()


PACKED_PREFIX = b"import lzma,base64;exec(lzma.decompress(base64.b85decode("


@functools.lru_cache(maxsize=1)
def packed_code() -> bytes:
    """The submission's train_gpt.py, what the cap counts: this source without docstrings and comments
    (ast.unparse: the same program), lzma-compressed, base85-encoded and exec'd by a one-line stub.
    A script that is already packed is its own packing."""
    src = source_bytes()
    if src.startswith(PACKED_PREFIX):
        return src
    tree = ast.parse(src)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    packed = base64.b85encode(lzma.compress(ast.unparse(tree).encode(), preset=9 | lzma.PRESET_EXTREME))
    return PACKED_PREFIX + b'"' + packed + b'")))\n'


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ============================================================================
# Data
# ============================================================================

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_FIX = "rebuild it (python data/prepare_local.py --force, or re-download with data/cached_challenge_fineweb.py)"


def shard_num_tokens(path: str | Path) -> int:
    """Validate a shard's header and size without reading its tokens."""
    path = Path(path)
    size = path.stat().st_size
    require(size >= SHARD_HEADER_INTS * 4, str(path), f"{size} bytes is shorter than the {SHARD_HEADER_INTS * 4}-byte "
            f"header — {SHARD_FIX}", DataError)
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    require(header[0] == SHARD_MAGIC, str(path), f"bad magic {header[0]} (expected {SHARD_MAGIC}), not a token shard "
            f"— {SHARD_FIX}", DataError)
    require(header[1] == SHARD_VERSION, str(path), f"unsupported version {header[1]} (expected {SHARD_VERSION}) "
            f"— {SHARD_FIX}", DataError)
    num_tokens = int(header[2])
    expected = SHARD_HEADER_INTS * 4 + 2 * num_tokens
    require(num_tokens >= 0 and size == expected, str(path), f"size {size} != header + 2*{num_tokens} tokens "
            f"({expected}), truncated or corrupt — {SHARD_FIX}", DataError)
    return num_tokens


def load_data_shard(path: str | Path, vocab_size: int | None = None) -> Tensor:
    """Read one challenge shard: 256 int32 header, then uint16 tokens (ids checked against the vocab)."""
    num_tokens = shard_num_tokens(path)
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=SHARD_HEADER_INTS * 4)
    if vocab_size is not None and tokens.size:
        top = int(tokens.max())
        require(top < vocab_size, str(path), f"token id {top} >= VOCAB_SIZE={vocab_size} — the shards were made with "
                "another tokenizer; set VOCAB_SIZE/TOKENIZER_PATH to match them", DataError)
    return torch.from_numpy(tokens.astype(np.uint16))


def shard_files(data_path: str, pattern: str, var: str) -> list[Path]:
    folder = Path(data_path)
    files = sorted(Path(p) for p in glob.glob(str(Path(glob.escape(str(folder))) / pattern)))
    require(bool(files), var, f"no shards match {folder.resolve() / pattern} (DATA_PATH is relative to {Path.cwd()}) "
            "— run from the repo root, set DATA_PATH, or fetch them with bash setup_pod.sh (FineWeb) or "
            "python data/prepare_local.py (bundled corpus)", DataError)
    return files


class TokenStream:
    """Reads shards in order, wrapping around; its position is two ints so a run can resume."""

    def __init__(self, files: list[Path], vocab_size: int | None = None):
        self.files, self.vocab_size, self.file_idx, self.pos = files, vocab_size, 0, 0
        self.tokens = load_data_shard(files[0], vocab_size)

    def position(self) -> tuple[int, int]:
        return self.file_idx, self.pos

    def seek(self, file_idx: int, pos: int) -> None:
        if file_idx != self.file_idx:
            self.tokens = load_data_shard(self.files[file_idx], self.vocab_size)
        self.file_idx, self.pos = file_idx, pos

    def take(self, n: int) -> Tensor:
        parts = []
        while n > 0:
            if self.pos >= self.tokens.numel():
                self.seek((self.file_idx + 1) % len(self.files), 0)
            chunk = self.tokens[self.pos:self.pos + n]
            parts.append(chunk)
            self.pos += chunk.numel()
            n -= chunk.numel()
        return torch.cat(parts)


class DistributedTokenLoader:
    """Each call takes one micro-batch for every rank from the shared stream, so the tokens a
    step sees depend only on ACCUM_SPLITS, never on how many processes share it."""

    def __init__(self, files: list[Path], dinfo: DistInfo, device: torch.device, vocab_size: int | None = None):
        self.stream, self.dinfo, self.device = TokenStream(files, vocab_size), dinfo, device

    def next_batch(self, micro_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        span = micro_tokens + 1
        chunk = self.stream.take(span * self.dinfo.world_size)
        local = chunk[self.dinfo.rank * span:(self.dinfo.rank + 1) * span].to(torch.int64)
        x, y = local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# ============================================================================
# Model
# ============================================================================


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Weights stay fp32 for the optimizer; the matmul runs in the activation dtype. Late QAT puts the
    weight on its export grid: qat_bits is fixed before compiling and the 0/1 buffer qat_on switches it,
    so turning QAT on changes a tensor, never the graph (no recompile on the training clock)."""

    def __init__(self, fan_in: int, fan_out: int, zero_init: bool = False):
        super().__init__(fan_in, fan_out, bias=False)
        self.qat_bits, self.qat_noise, self.qat_clip = 0, False, ("absmax", 0.0)
        self.register_buffer("qat_on", torch.zeros(()), persistent=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.qat_bits:
            w = w + self.qat_on * fake_quant_delta(w, self.qat_bits, self.qat_noise, *self.qat_clip)
        return F.linear(x, w.to(x.dtype))


def fake_quant_delta(w: Tensor, bits: int, noise: bool, clip_mode: str, k: float) -> Tensor:
    """The step from w to its export grid (same fp16 row scales), detached: adding it passes gradients
    straight through. Noise mode: uniform noise of one quantization step instead of rounding."""
    qmax = 2 ** (bits - 1) - 1
    wd = w.detach().float()
    scale = _row_scales(wd, row_clip(wd, clip_mode, k), qmax).float()[:, None]
    if noise:
        return ((torch.rand_like(wd) - 0.5) * scale).to(w.dtype)
    return (torch.round(wd / scale).clamp(-qmax, qmax) * scale - wd).to(w.dtype)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, rope_dims: int, base: float):
        super().__init__()
        dims = rope_dims or head_dim
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dims, 2).float() / dims), persistent=False)

    def forward(self, seq_len: int, device: torch.device, wavelength: float = 1.0) -> tuple[Tensor, Tensor]:
        inv_freq = self.inv_freq.to(device) if wavelength == 1.0 else self.inv_freq.to(device) / wavelength
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
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
    if backend == "count":   # the cost model counts attention's T^2 matmuls itself; k and v stay in the graph
        return q + 0 * (k.mean() + v.mean())
    if backend == "fa3":
        out = fa3_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
        return (out[0] if isinstance(out, tuple) else out).to(q.dtype)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, qk_gain_init: float, ve_dim: int = 0):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = CastedLinear(dim, heads * self.head_dim)
        self.k = CastedLinear(dim, kv_heads * self.head_dim)
        self.v = CastedLinear(dim, kv_heads * self.head_dim)
        self.proj = CastedLinear(heads * self.head_dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((heads,), qk_gain_init))
        self.backend = "sdpa"
        self.ve_proj = CastedLinear(ve_dim, kv_heads * self.head_dim, zero_init=True) if ve_dim else None
        self.ve_scale = nn.Parameter(torch.ones(1)) if ve_dim else None

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
        return self.proj(y.reshape(B, T, -1))


def exclusive(y: Tensor, v: Tensor) -> Tensor:
    """XSA: remove from each head's output its component along the token's own value direction.
    Heads are grouped per KV head, so v is broadcast rather than repeated."""
    B, T, H, D = y.shape
    y = y.view(B, T, v.size(2), H // v.size(2), D)
    v_hat = F.normalize(v.float(), dim=-1).to(y.dtype).unsqueeze(3)
    return (y - (y * v_hat).sum(-1, keepdim=True) * v_hat).view(B, T, H, D)


@contextlib.contextmanager
def own_rng(stream: int) -> Iterator[None]:
    """An arm's weights draw from a stream of their own (seeded from the global one, which is left as it was),
    so every weight the control has starts the same with the arm on or off: a paired arm differs by the arm."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (), device="cpu")) ^ stream)   # cpu: models are also built on meta
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
    """Crawler MLP with a per-loop bottleneck of width C (#1308), h = act(up x):
    choke_flat  out = up_l(act(down_l h))                 down_l: hidden -> C
    grouped     the same with down_l block-diagonal in G groups
    pyramid     out = up_l(act(down_l s)), s = down h     down_l: dim -> C
    pyramid_res out = s + up_l(act(down_l s))
    residual    out = down h + up_l(act(down_l h))
    Every up_l starts at zero, like the plain MLP's down projection."""

    def __init__(self, dim: int, hp: Hyperparameters):
        super().__init__(dim, hp.crawler_mlp_mult, hp.mlp_act, hp.crawler_mlp_leaky_slope)
        self.shape, hidden, c = hp.crawler_mlp, self.up.out_features, hp.choke_dim
        groups = hp.choke_groups if self.shape == "grouped" else 1
        if self.shape in ("choke_flat", "grouped"):
            self.down = None                    # the per-loop bottleneck is the only way out
        choke_in = dim if self.shape.startswith("pyramid") else hidden
        with own_rng(2):
            if self.shape == "pyramid":
                nn.init.normal_(self.down.weight, std=hidden ** -0.5)   # two zero factors in a row would never train
            self.loop_down = nn.ModuleList(
                nn.ModuleList(CastedLinear(choke_in // groups, c // groups) for _ in range(groups))
                for _ in range(hp.crawler_loops))
            self.loop_up = nn.ModuleList(CastedLinear(c, dim, zero_init=True) for _ in range(hp.crawler_loops))

    def choke(self, h: Tensor, loop: int) -> Tensor:
        parts = self.loop_down[loop]
        pieces = h.chunk(len(parts), dim=-1)
        return self.loop_up[loop](relu2(torch.cat([d(x) for d, x in zip(parts, pieces)], -1), self.slope))

    def forward(self, x: Tensor, loop: int = 0) -> Tensor:
        h = relu2(self.up(x), self.slope)
        if self.down is None:
            return self.choke(h, loop)
        if self.shape == "residual":
            return self.down(h) + self.choke(h, loop)
        s = self.down(h)
        return self.choke(s, loop) + (s if self.shape == "pyramid_res" else 0)


class Block(nn.Module):
    def __init__(self, hp: Hyperparameters, make_mlp: Callable[[], nn.Module], ve_dim: int = 0):
        super().__init__()
        self.attn = Attention(hp.model_dim, hp.num_heads, hp.num_kv_heads, hp.qk_gain_init, ve_dim)
        self.mlp = make_mlp()   # built after attention: the order the RNG has always been drawn in
        self.attn_scale = nn.Parameter(torch.ones(hp.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(hp.model_dim))
        # resid_mix[0] weighs the running stream, resid_mix[1] the embedding x0.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(hp.model_dim), torch.zeros(hp.model_dim))))

    def forward(self, x: Tensor, x0: Tensor, rope: tuple[Tensor, Tensor], ln_scale: float, xsa: bool = False,
                ve: Tensor | None = None, loop: int = 0) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * ln_scale, rope, xsa, ve)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * ln_scale, loop)


BOS_ID = 1
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
        return self.scale * self.proj(F.embedding(ngram_buckets(ids, self.order, self.buckets, self.vocab), self.table))


class SmearGate(nn.Module):
    """x_t += lam * sigmoid(W x_t[:k]) * x_{t-1}; lam starts at 0; nothing crosses into a new document."""

    def __init__(self, dim: int, k: int = 32):
        super().__init__()
        self.k = min(k, dim)
        self.gate = CastedLinear(self.k, dim)
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        prev = F.pad(x, (0, 0, 1, 0))[:, :-1] * (ids != BOS_ID).unsqueeze(-1).to(x.dtype)
        return x + self.lam.to(x.dtype) * torch.sigmoid(self.gate(x[..., :self.k])) * prev


class HelixBridge(nn.Module):
    """Gated low-rank injection of a source stream into a target stream: linear, or a single-head causal
    cross-attention (query from the target, key and value from the source; no RoPE, it routes by content).
    The write-back starts at zero, so a new bridge leaves both streams as they were."""

    def __init__(self, dim: int, width: int, mode: str):
        super().__init__()
        self.read = CastedLinear(dim, width)
        self.query = CastedLinear(dim, width) if mode == "cross_attn" else None
        self.key = CastedLinear(dim, width) if mode == "cross_attn" else None
        self.write = CastedLinear(width, dim, zero_init=True)
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        src = rms_norm(source)
        v = self.read(src)
        if self.query is not None:
            q, k = self.query(rms_norm(target)), self.key(src)
            v = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0]
        gate = torch.sigmoid((src * self.gate.to(src.dtype)).sum(-1, keepdim=True))
        return gate * self.write(v)


def orthonormal_rows(n: int, dim: int, seed: int) -> Tensor:
    """n orthonormal vectors of length dim from the QR of a seeded Gaussian matrix."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, max(n, 1), generator=gen))
    return q[:, :n].T.contiguous()


@dataclass(frozen=True)
class Firing:
    """One block call of the forward pass, in order. loop < 0: a flat block."""
    block: int               # index into CrawlerGPT.blocks (flat blocks first, then crawler blocks)
    depth: int               # effective depth: picks the LN scale and whether XSA is on
    loop: int = -1
    enter: bool = False      # first crawler block of a loop: the LoopAdapter opens the loop
    leave: bool = False      # last crawler block of a loop: the LoopAdapter closes it
    skip_in: int = -1        # U-Net skip weight added (from the last pushed skip) before the block
    skip_out: bool = False   # push the block's output as a U-Net skip
    tap: bool = False        # the LoopAdapter reads this flat block's output (encoder taps)
    helix: bool = False      # a Helix firing: it runs on the Helix stream, beside the flat stack


def build_schedule(hp: Hyperparameters, loops: int) -> tuple[Firing, ...]:
    """The forward pass as data: flat encoder half (pushing skips), [crawler loops at the bottleneck],
    flat decoder half (popping skips), [crawler loops at the end]; Helix firings after every stride."""
    n_flat, n_crawl, out = hp.num_flat_layers, hp.num_crawler_layers, []
    n_enc = n_flat // 2
    n_skip, taps = min(n_enc, n_flat - n_enc), set(hp.tap_layer_ids())

    def crawl(loop: int, helix: bool = False) -> None:
        for c in range(n_crawl):
            out.append(Firing(n_flat + c, len(out), loop, c == 0, c == n_crawl - 1, helix=helix))

    def flat(i: int, **kw) -> None:
        out.append(Firing(i, len(out), tap=i in taps, **kw))
        if hp.helix and (i + 1) % hp.helix_stride == 0:
            crawl(((i + 1) // hp.helix_stride - 1) % hp.crawler_loops, helix=True)

    for i in range(n_enc):
        flat(i, skip_out=True)
    for loop in range(loops if n_crawl and hp.crawler_position == "bottleneck" else 0):
        crawl(loop)
    for j in range(n_flat - n_enc):
        flat(n_enc + j, skip_in=j if j < n_skip else -1)
    for loop in range(loops if n_crawl and hp.crawler_position == "end" else 0):
        crawl(loop)
    return tuple(out)


@dataclass
class LoopCarry:
    """What the LoopAdapter keeps across the firings of one forward pass."""
    ropes: list                       # one (cos, sin) per loop
    tapped: list = field(default_factory=list)
    tap: Tensor | None = None         # the projected taps, read once: every loop sees the encoder as it was
    consensus: Tensor | None = None   # deliberation
    helix: Tensor | None = None       # the Helix stream
    parked: Tensor | None = None      # the main stream while a Helix firing runs


class LoopAdapter(nn.Module):
    """Everything per loop, in one place: the loop embedding, and the arms that open a loop (flow
    instructions, taps) or close it (contractive dt, loop smear, deliberation, Helix bridges), plus
    per-loop RoPE scales. It fires in every loop, so the export quantizes all of it in the loop-aware
    phase. A new per-loop arm is a knob plus its lines here."""

    def __init__(self, hp: Hyperparameters):
        super().__init__()
        dim, loops = hp.model_dim, hp.crawler_loops
        self.embed = nn.Parameter(orthonormal_rows(loops, dim, hp.seed) * hp.loop_embed_scale)
        self.inst_down = self.inst_up = None
        if hp.inst_dim:   # flow instructions: a shared read-out, one zero-init write-back per loop
            self.inst_down = CastedLinear(dim, hp.inst_dim)
            nn.init.normal_(self.inst_down.weight, std=0.01)
            self.inst_up = nn.ModuleList(CastedLinear(hp.inst_dim, dim, zero_init=True) for _ in range(loops))
        self.bridge_out = HelixBridge(dim, hp.helix_dim, hp.helix_mode) if hp.helix else None  # crawler -> flat
        self.bridge_in = HelixBridge(dim, hp.helix_dim, hp.helix_mode) if hp.helix else None   # flat -> crawler
        self.smear = nn.Parameter(torch.zeros(dim)) if hp.loop_smear else None
        self.tap_down = self.tap_up = None
        if hp.tap_dim:
            self.tap_down = nn.ModuleList(CastedLinear(dim, hp.tap_dim) for _ in hp.tap_layer_ids())
            self.tap_up = nn.ModuleList(CastedLinear(hp.tap_dim, dim, zero_init=True)
                                        for _ in range(loops if hp.tap_per_loop else 1))
        self.consensus = self.delib_gate = self.delib_pull = None
        if hp.deliberation:
            self.consensus = nn.Parameter(torch.zeros(dim))    # the persistent reference
            self.delib_gate = nn.Parameter(torch.zeros(dim))   # how much a firing moves the consensus
            self.delib_pull = nn.Parameter(torch.zeros(dim))   # how much the consensus moves a firing
        self.rope_scales, self.dt = hp.loop_rope_scales(), hp.loop_dt

    def start(self, x0: Tensor, rope: tuple[Tensor, Tensor], rotary: Rotary) -> LoopCarry:
        T, device = x0.size(1), x0.device
        ropes = [rotary(T, device, s) for s in self.rope_scales] or [rope] * self.embed.size(0)
        return LoopCarry(ropes, helix=x0)

    def enter(self, x: Tensor, f: Firing, carry: LoopCarry) -> tuple[Tensor, Tensor]:
        """Open loop f.loop: returns (anchor, the stream the crawler blocks run on)."""
        if f.helix:   # a Helix firing runs on its own stream; the main one waits
            carry.parked, x = x, carry.helix
        anchor = x
        x = x + self.embed[f.loop].to(x.dtype)
        if self.inst_up is not None:
            x = x + self.inst_up[f.loop](self.inst_down(anchor))
        if self.tap_up is not None:
            if carry.tap is None:
                carry.tap = sum(down(rms_norm(h)) for down, h in zip(self.tap_down, carry.tapped))
            x = x + self.tap_up[f.loop if len(self.tap_up) > 1 else 0](carry.tap).to(x.dtype)
        return anchor, x

    def leave(self, x: Tensor, anchor: Tensor, f: Firing, carry: LoopCarry) -> Tensor:
        """Close loop f.loop: returns the main stream."""
        if self.dt < 1.0:   # contractive: a step of size dt towards F(x) instead of a jump
            x = (1 - self.dt) * anchor + self.dt * x
        if self.smear is not None:
            x = x + self.smear.to(x.dtype) * (anchor - x)
        if self.consensus is not None:
            x = self.deliberate(x, carry)
        if not f.helix:
            return x
        main = carry.parked   # each stream reads the other through a gated bridge
        carry.helix = x + self.bridge_in(main, x)
        return main + self.bridge_out(x, main)

    def deliberate(self, x: Tensor, carry: LoopCarry) -> Tensor:
        """The consensus starts as a learned Parameter and absorbs each firing by a content gate; each
        firing's output is pulled towards it. Nothing is detached: the loss reaches the consensus
        through every later firing, and the consensus reaches every firing's blocks."""
        ref = self.consensus.to(x.dtype) if carry.consensus is None else carry.consensus
        gate = torch.sigmoid((rms_norm(x) * self.delib_gate.to(x.dtype)).sum(-1, keepdim=True))
        carry.consensus = ref + gate * (x - ref)
        return x + self.delib_pull.to(x.dtype) * (carry.consensus - x)


class CrawlerGPT(nn.Module):
    """Embedding -> flat encoder half -> [crawler] -> flat decoder half -> [crawler] -> tied head,
    walked as a schedule of firings built once per loop count."""

    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.hp = hp
        self.tok_emb = nn.Embedding(hp.vocab_size, hp.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=hp.tied_embed_init_std)
        ve, dim = hp.ve_block_ids(), hp.model_dim
        flat_mlp = functools.partial(MLP, dim, hp.mlp_mult, hp.mlp_act, hp.mlp_leaky_slope)
        self.flat = nn.ModuleList(Block(hp, flat_mlp, hp.ve_dim if i in ve else 0) for i in range(hp.num_flat_layers))
        self.crawler = nn.ModuleList(Block(hp, functools.partial(self.crawler_mlp, hp), hp.ve_dim if hp.num_flat_layers + i in ve
                                           else 0) for i in range(hp.num_crawler_layers))
        self.ve_table = nn.Parameter(torch.randn(hp.vocab_size, hp.ve_dim) * 0.02) if ve else None
        order = {"bigram": 2, "trigram": 3}.get(hp.ngram_hash)
        self.ngram = NGramHash(order, hp.ngram_buckets, hp.ngram_dim, dim, hp.vocab_size) if order else None
        self.smear = SmearGate(dim) if hp.smear_gate else None
        self.skip_weights = nn.Parameter(torch.ones(min(hp.num_flat_layers // 2, hp.num_flat_layers - hp.num_flat_layers // 2), dim))
        self.rotary = Rotary(dim // hp.num_heads, hp.rope_dims, hp.rope_base)
        self.loops = LoopAdapter(hp) if hp.num_crawler_layers else None
        self.blocks = [*self.flat, *self.crawler]   # a plain list: the ModuleLists above own the modules
        self.schedules = {n: build_schedule(hp, n) for n in range(1, hp.crawler_loops + 1)}
        depth, n_xsa = hp.effective_depth, hp.effective_depth if hp.xsa_last_n < 0 else hp.xsa_last_n
        self.ln_scales = [1.0 / math.sqrt(i + 1) if hp.ln_scale else 1.0 for i in range(depth)]
        self.xsa_at = [i >= depth - n_xsa for i in range(depth)]

    @staticmethod
    def crawler_mlp(hp: Hyperparameters) -> MLP:
        if hp.crawler_mlp == "standard":
            return MLP(hp.model_dim, hp.crawler_mlp_mult, hp.mlp_act, hp.crawler_mlp_leaky_slope)
        return ChokeMLP(hp.model_dim, hp)

    def looped_modules(self) -> list[nn.Module]:
        """Modules that run in more than one loop: their weights are quantized in the loop-aware phase."""
        return [m for m in (self.crawler, self.loops) if m is not None]

    def tables(self) -> list[nn.Parameter]:
        """Embedding tables: their own Adam, their own storage kind."""
        return [p for p in (self.tok_emb.weight, self.ve_table, self.ngram.table if self.ngram else None) if p is not None]

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
        return x.to(torch.get_autocast_dtype(kind)) if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind) else x

    def hidden(self, ids: Tensor, loops: int | None = None) -> Tensor:
        """loops < CRAWLER_LOOPS runs a shortened crawler (the cadence's single-loop steps)."""
        x = x0 = self.embed(ids)
        rope = self.rotary(ids.size(1), ids.device)
        ve = F.embedding(ids, self.ve_table) if self.ve_table is not None else None  # deterministic backward
        carry = self.loops.start(x0, rope, self.rotary) if self.loops is not None else None
        skips, anchor = [], x
        for f in self.schedules[loops or self.hp.crawler_loops]:
            if f.skip_in >= 0:
                x = x + self.skip_weights[f.skip_in].to(x.dtype) * skips.pop()
            if f.enter:
                anchor, x = self.loops.enter(x, f, carry)
            block_rope = rope if f.loop < 0 else carry.ropes[f.loop]
            x = self.blocks[f.block](x, x0, block_rope, self.ln_scales[f.depth], self.xsa_at[f.depth], ve, max(f.loop, 0))
            if f.leave:
                x = self.loops.leave(x, anchor, f, carry)
            if f.skip_out:
                skips.append(x)
            if f.tap:
                carry.tapped.append(x)
        return rms_norm(x)

    def logits(self, ids: Tensor, loops: int | None = None) -> Tensor:
        logits = F.linear(self.hidden(ids, loops), self.tok_emb.weight).float()
        cap = self.hp.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, ids: Tensor, targets: Tensor, per_token: bool = False, loops: int | None = None,
                teacher_logits: Tensor | None = None) -> Tensor:
        """Mean loss (per-token NLL with per_token). With teacher_logits: the self-distillation loss
        alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * NLL. One entry point,
        so a compiled or DDP-wrapped model serves training, evaluation and distillation."""
        logits = self.logits(ids, loops)
        nll = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)
        if teacher_logits is None:
            return nll if per_token else nll.mean()
        temp, alpha = self.hp.distill_temperature, self.hp.distill_alpha
        kl = F.kl_div(F.log_softmax(logits / temp, -1), F.log_softmax(teacher_logits.float() / temp, -1),
                      log_target=True, reduction="none").sum(-1).mean()
        return alpha * temp * temp * kl + (1 - alpha) * nll.mean()

    def setup_qat(self, hp: Hyperparameters) -> None:
        """Fix each matrix's fake-quant grid before compiling; Trainer.set_qat flips the qat_on buffers."""
        looped = {id(m) for group in self.looped_modules() for m in group.modules()}
        for m in self.modules():
            if isinstance(m, CastedLinear):
                crawler = id(m) in looped
                m.qat_bits = 8 if crawler and hp.crawler_quant_int8 else 6
                m.qat_noise = crawler and hp.qat_crawler_only
                m.qat_clip = (hp.quant_clip, hp.quant_k)
                if hp.qat_crawler_only and not crawler:
                    m.qat_bits = 0

    def set_qat(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, CastedLinear):
                m.qat_on.fill_(float(on))


def count_unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() visits a shared tensor once


def arm_param_counts(model: CrawlerGPT) -> dict[str, int]:
    """Parameters each active research arm adds: the LoopAdapter's members beyond the loop embedding
    and the choke MLPs' per-loop bottlenecks."""
    counts: dict[str, int] = {}
    if model.loops is not None:
        for name, p in model.loops.named_parameters():
            arm = name.split(".")[0]
            if arm != "embed":
                counts[arm] = counts.get(arm, 0) + p.numel()
    for block in model.crawler:
        if isinstance(block.mlp, ChokeMLP):
            n = sum(p.numel() for name, p in block.mlp.named_parameters() if name.startswith("loop_"))
            counts["crawler_mlp"] = counts.get("crawler_mlp", 0) + n
    return counts


# ============================================================================
# Optimizers
# ============================================================================

NS5_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(grad: Tensor, steps: int, eps: float = 1e-7, dtype: torch.dtype | None = None) -> Tensor:
    """Approximately orthogonalise a matrix (all singular values pushed near 1); bf16 on a GPU."""
    a, b, c = NS5_COEFFS
    x = grad.to(dtype or (torch.bfloat16 if grad.is_cuda else torch.float32))
    x = x / (x.norm() + eps)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Momentum + Newton-Schulz orthogonalised updates for 2-D matrices. Ranks share the work:
    parameter i is orthogonalised on rank i % world_size, then one all-reduce spreads the updates."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 rank: int = 0, world_size: int = 1, orthogonalize=newton_schulz5):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay, nesterov=True))
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
        g = self.orthogonalize(g, group["backend_steps"])
        return g * max(1.0, p.size(0) / p.size(1)) ** 0.5


def route_params(model: CrawlerGPT) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Weights of linear maps -> Muon; embedding tables -> their own Adam; gains, vectors and the
    loop embeddings -> scalar Adam. Decided by what owns the parameter, not by its name."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, CastedLinear)}
    tables = {id(p) for p in model.tables()}
    groups: dict[str, list] = {"muon": [], "embed": [], "scalar": []}
    for name, p in model.named_parameters():
        groups["embed" if id(p) in tables else "muon" if id(p) in linear else "scalar"].append((name, p))
    return groups


def build_optimizers(model: CrawlerGPT, hp: Hyperparameters, dinfo: DistInfo, compiled: bool = False) -> list[torch.optim.Optimizer]:
    groups = route_params(model)
    cuda = next(model.parameters()).is_cuda
    adam = dict(betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, weight_decay=hp.adam_wd, fused=cuda)
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW([p for _, p in groups["embed"]], lr=hp.tied_embed_lr, **adam),
        torch.optim.AdamW([p for _, p in groups["scalar"]], lr=hp.scalar_lr, **adam),
    ]
    if groups["muon"]:
        ortho = torch.compile(newton_schulz5, backend=hp.compile_backend, fullgraph=True, dynamic=True) if compiled \
            else newton_schulz5
        opts.append(Muon([p for _, p in groups["muon"]], hp.matrix_lr, hp.muon_momentum, hp.muon_backend_steps,
                         hp.muon_wd, dinfo.rank, dinfo.world_size, ortho))
    for opt in opts:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return opts


# ============================================================================
# Export (quantize, pack)
# ============================================================================

FLOAT_KINDS = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
QUANT_KINDS = {"int6": 6, "int8": 8}
COMPRESSOR_IDS = {"zstd": 1, "brotli": 2, "lzma": 3}
ARTIFACT_MAGIC, ARTIFACT_VERSION, DIGEST_BYTES = b"CGLF", 2, 32
# Gains that multiply the residual stream keep fp32; other vectors are stored as fp16.
CONTROL_PATTERNS = ("q_gain", "attn_scale", "mlp_scale", "resid_mix", "skip_weights", "loops.embed")
# The fit search's range for k (clip in row stds). Below about 4 std an int6 grid clips so much of a
# Gaussian row that it gets worse *and* larger; beyond 64 there is nothing left to save.
K_MIN, K_MAX = 4.0, 64.0


def _qmax(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    return 2 ** (bits - 1) - 1


def _as_2d_float(w: Tensor) -> Tensor:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(w.shape)}")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("tensor contains NaN/inf")
    return w


def _absmax(w: Tensor) -> Tensor:
    return w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])


def row_clip(w: Tensor, mode: str, k: float = 12.85) -> Tensor:
    """Per-row clip: the row's absmax, or SDClip's k row stds, which may lie beyond the absmax (a
    coarser grid: fewer bytes) or inside it (values beyond are clipped). Constant rows use absmax."""
    if mode == "absmax":
        return _absmax(w)
    if mode != "sdclip":
        raise ValueError(f"unknown clip mode {mode!r}")
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
    """GPTQ for y = x @ w.T; H = X^T X [in, in]. Same (q, scale) format as quantize_rows.

    Scales are fixed up front from clip (default: row absmax after dead inputs are zeroed);
    damp is relative to mean(diag(H)) and is raised automatically if H will not factor.
    """
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


def compress_bytes(data: bytes, compressor: str, level: int | None = None) -> bytes:
    """level: zstd 1..22 (default 22), brotli quality 0..11 (11), lzma preset 0..9 (9, +EXTREME)."""
    if compressor == "zstd":
        import zstandard  # optional dependency: imported only when chosen
        return zstandard.ZstdCompressor(level=22 if level is None else level).compress(data)
    if compressor == "brotli":
        import brotli
        return brotli.compress(data, quality=11 if level is None else level)
    if compressor == "lzma":
        return lzma.compress(data, preset=(9 if level is None else level) | lzma.PRESET_EXTREME)
    raise ValueError(f"unknown compressor {compressor!r}")


def decompress_bytes(data: bytes, compressor: str) -> bytes:
    """Strict inverse of compress_bytes: truncated streams and trailing bytes raise ValueError."""
    if compressor == "brotli":
        import brotli
        return brotli.decompress(data)
    if compressor == "zstd":
        import zstandard
        dec = zstandard.ZstdDecompressor().decompressobj()
    elif compressor == "lzma":
        dec = lzma.LZMADecompressor()
    else:
        raise ValueError(f"unknown compressor {compressor!r}")
    out = dec.decompress(data)
    if not dec.eof or dec.unused_data:
        raise ValueError(f"{compressor} stream is truncated or has trailing bytes")
    return out


def _shuffled(t: Tensor, shuffle: bool) -> Tensor:
    """A tensor's bytes as uint8, byte-plane by byte-plane: exponent/high bytes cluster together."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
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
        lo, hi = torch.aminmax(q.reshape(-1)) if q.numel() and q.dtype == torch.int8 else (torch.zeros(()), torch.zeros(()))
        if not shape or q.dtype != torch.int8 or q.numel() != numel or lo < -qmax - 1 or hi > qmax:
            raise ValueError(f"{name}: q must be int8 with {numel} values in the {kind} range")
        if scale.dtype != torch.float16 or tuple(scale.shape) != (shape[0],):
            raise ValueError(f"{name}: scale must be fp16 [{shape[0]}]")
    else:
        raise ValueError(f"{name}: unknown kind {kind!r}")
    return kind, list(shape)


def pack_artifact(entries: dict[str, dict], meta: dict, compressor: str, level: int | None = None,
                  byte_shuffle: bool = True) -> bytes:
    """MAGIC | version u8 | compressor u8 | sha256 of everything else | compressed torch.save payload.

    Entries: {"kind": "int6"|"int8", "shape", "q": int8 tensor, "scale": fp16 [rows]} or
    {"kind": "fp16"|"fp32"|"bf16", "shape", "data"}. The payload concatenates like data (all q, then
    all scales, then all floats) so the coder sees one regime at a time, and is loaded back with
    torch.load(weights_only=True): loading never runs code."""
    if compressor not in COMPRESSOR_IDS:
        raise ValueError(f"unknown compressor {compressor!r}")
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
    torch.save({"meta": meta, "tensors": table, "byte_shuffle": bool(byte_shuffle), "sha256": digest, **blobs}, buf)
    prefix = ARTIFACT_MAGIC + bytes([ARTIFACT_VERSION, COMPRESSOR_IDS[compressor]])
    body = compress_bytes(buf.getvalue(), compressor, level)
    return prefix + hashlib.sha256(prefix + body).digest() + body


def unpack_artifact(blob: bytes, source: str = "artifact") -> tuple[dict[str, dict], dict]:
    """Inverse of pack_artifact. Any change to any byte of the file is an ArtifactError naming `source`."""
    def corrupt(what: str) -> ArtifactError:
        return ArtifactError(f"{source}: {what} — export it again or fetch an intact copy")
    head = len(ARTIFACT_MAGIC) + 2
    if len(blob) < head + DIGEST_BYTES or blob[:4] != ARTIFACT_MAGIC:
        raise corrupt("not a crawler-golf artifact (bad magic or too short)")
    names = {v: k for k, v in COMPRESSOR_IDS.items()}
    if blob[4] != ARTIFACT_VERSION or blob[5] not in names:
        raise corrupt(f"unsupported artifact version {blob[4]} or compressor id {blob[5]}")
    body = blob[head + DIGEST_BYTES:]
    if hashlib.sha256(blob[:head] + body).digest() != blob[head:head + DIGEST_BYTES]:
        raise corrupt("checksum mismatch: the file is corrupt or was modified")
    try:
        payload = torch.load(io.BytesIO(decompress_bytes(body, names[blob[5]])), weights_only=True)
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
                             "scale": _unshuffled(take("scale", 2 * shape[0]), torch.float16, [shape[0]], shuffle)}
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
    looped_ids = {id(p) for m in model.looped_modules() for p in m.parameters()}
    linear_ids = {id(m.weight) for m in model.modules() if isinstance(m, CastedLinear)}
    table_ids = {id(p) for p in model.tables()}
    plan = StoragePlan({}, set(), set(), set(), {})
    for name, p in model.named_parameters():
        looped, linear, table = id(p) in looped_ids, id(p) in linear_ids, id(p) in table_ids
        if looped:
            plan.looped.add(name)
        if linear:
            plan.linear.add(name)
            plan.kinds[name] = "int8" if looped and hp.crawler_quant_int8 else "int6"
        elif table:
            plan.tables.add(name)
            plan.kinds[name] = hp.embed_quant
        else:
            plan.kinds[name] = "fp32" if any(c in name for c in CONTROL_PATTERNS) else "fp16"
        block = name.split(".")[:2] if name.startswith(("flat.", "crawler.")) else None
        plan.groups[name] = ".".join(block) if block else "embed" if name == "tok_emb.weight" else "other"
    return plan


HEAD = "tok_emb.weight"   # the tied head: its Hessian is taken on the final hidden states


@torch.no_grad()
def collect_hessians(model: CrawlerGPT, batches: list[Tensor], names: set[str], dinfo: DistInfo) -> dict[str, Tensor]:
    """H = X^T X of each named weight's input over the calibration batches. A shared crawler
    module fires once per loop, so its H is summed over every loop."""
    hessians: dict[str, Tensor] = {}
    modules = dict(model.named_modules())

    def add(key: str, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.size(-1)).float()
        hessians[key] = hessians[key] + x.T @ x if key in hessians else x.T @ x
    handles = [modules[n.rsplit(".", 1)[0]].register_forward_pre_hook(lambda m, a, n=n: add(n, a[0]))
               for n in names if n != HEAD]
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


def loop_aware(hp: Hyperparameters) -> bool:
    return hp.gptq_loop_aware == "1" or (hp.gptq_loop_aware == "auto" and hp.num_crawler_layers > 0)


@torch.no_grad()
def quantize_model_(model: CrawlerGPT, hp: Hyperparameters, quant: str, batches: list[Tensor], dinfo: DistInfo,
                    ks: dict[str, float] | None = None, float_hessians: dict[str, Tensor] | None = None) -> tuple[dict, dict]:
    """Quantize `model` IN PLACE (each weight replaced by its dequantized value) and return the artifact
    entries and the Hessians used. ks: SDClip k per name (default QUANT_K, EMBED_QUANT_K for tables).
    float_hessians: phase-1 Hessians already taken on this float model (the fit search reuses them).
    Loop-aware GPTQ: phase 1 quantizes everything that runs once; phase 2 re-collects the looped
    modules' Hessians on activations that flow through the already-quantized phase 1."""
    plan, params = storage_plan(model, hp), dict(model.named_parameters())
    quantized = [n for n, kind in plan.kinds.items() if kind in QUANT_KINDS]
    late = {n for n in quantized if n in plan.looped} if quant == "gptq" and loop_aware(hp) else set()
    entries, used = {}, {}
    for phase, names in enumerate((set(quantized) - late, late)):
        need = {n for n in names if n in plan.linear} if quant == "gptq" else set()
        if phase == 0 and float_hessians is not None:
            hessians = {n: float_hessians[n] for n in need}
        else:
            hessians = collect_hessians(model, batches, need, dinfo) if need else {}
        used.update(hessians)
        for name in sorted(names):
            p, bits = params[name], QUANT_KINDS[plan.kinds[name]]
            k = (ks or {}).get(name, hp.embed_quant_k if name in plan.tables else hp.quant_k)
            clip = row_clip(_as_2d_float(p), hp.quant_clip, k)
            if name in hessians:
                q, scale = gptq_quantize(p, hessians[name], bits, clip, hp.gptq_damp, hp.gptq_block_size, hp.gptq_act_order)
            else:
                q, scale = quantize_rows(p, bits, clip)
            entries[name] = {"kind": plan.kinds[name], "shape": list(p.shape), "q": q.cpu(), "scale": scale.cpu()}
            p.copy_(dequantize_rows(q, scale).to(p))
    for name, p in params.items():
        if plan.kinds[name] in FLOAT_KINDS:
            stored = p.detach().to(FLOAT_KINDS[plan.kinds[name]])
            p.copy_(stored.to(p.dtype))          # the model now holds exactly what the artifact holds
            entries[name] = {"kind": plan.kinds[name], "shape": list(p.shape), "data": stored.cpu()}
    return entries, used


def relative_ks(model: CrawlerGPT, hp: Hyperparameters, hessians: dict[str, Tensor]) -> dict[str, float]:
    """Each quantized tensor's k as a multiple of the searched matrix k. uniform: 1 for matrices,
    EMBED_QUANT_K/QUANT_K for tables. hessian: per group, minimise the predicted loss increase at a
    fixed byte count. Rounding noise of step 2c/(2^b-1), c = k*std_r, raises a matrix's output error by
    tr(H) * sum_r step_r^2/12 = k^2 * C, and bytes fall by log2 k bits per weight; the Lagrangian
    optimum is k_g^2 proportional to n_g / C_g. Groups are normalised to a weighted geometric mean of
    1, so with equal C_g/n_g every group gets k = 1 (uniform). Tensors without a Hessian stay at 1."""
    plan, params = storage_plan(model, hp), dict(model.named_parameters())
    quantized = [n for n, kind in plan.kinds.items() if kind in QUANT_KINDS]
    base = {n: hp.embed_quant_k / hp.quant_k if n in plan.tables else 1.0 for n in quantized}
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
    return {n: math.exp(log_k[plan.groups[n]] - center) if n in hessians and plan.groups[n] in log_k else base[n]
            for n in quantized}


def ks_at(rel: dict[str, float], m: float) -> dict[str, float]:
    return {n: min(max(m * r, K_MIN), K_MAX) for n, r in rel.items()}


def estimate_model_bytes(model: CrawlerGPT, hp: Hyperparameters, ks: dict[str, float], meta: dict) -> int:
    """Artifact bytes of an RTN export at these ks, from the real compressor on a row sample of the
    quantized tensors (~1M values) scaled back up, plus the float tensors: fast at any model size."""
    probe = copy.deepcopy(model)
    entries, _ = quantize_model_(probe, hp, "rtn", [], DistInfo(), ks)
    quant = {n: e for n, e in entries.items() if e["kind"] in QUANT_KINDS}
    stride = max(1, sum(e["q"].numel() for e in quant.values()) // 2**20)
    sample = {n: {**e, "q": e["q"][::stride], "scale": e["scale"][::stride], "shape": [len(e["q"][::stride]), *e["shape"][1:]]}
              for n, e in quant.items()}
    floats = {n: e for n, e in entries.items() if n not in quant}
    pack = functools.partial(pack_artifact, meta=meta, compressor=hp.compressor, level=compressor_level(hp),
                             byte_shuffle=hp.byte_shuffle)
    return stride * len(pack(sample)) + len(pack(floats))


def along_log_k(points: list[tuple[float, float]], x: float, want: str) -> float:
    """Bytes at k = x (want="bytes"), or the k whose bytes are x (want="k"): linear in log k on the segment
    of (k, bytes) points that holds x, else on the end segment nearest to it."""
    pts = sorted((math.log(k), b) for k, b in points)
    segments = list(zip(pts, pts[1:])) or [(pts[0], pts[0])]
    at = 0 if want == "bytes" else 1
    xv = math.log(x) if want == "bytes" else x
    inside = [s for s in segments if min(s[0][at], s[1][at]) <= xv <= max(s[0][at], s[1][at])]
    (l0, b0), (l1, b1) = inside[0] if inside else min(segments, key=lambda s: min(abs(xv - s[0][at]), abs(xv - s[1][at])))
    if want == "bytes":
        return b0 + (xv - l0) / (l1 - l0) * (b1 - b0) if l1 != l0 else b0
    return math.exp(l0 + (xv - b0) / (b1 - b0) * (l1 - l0)) if b1 != b0 else math.exp(l0)


def clamp_k(k: float) -> float:
    return min(max(k, K_MIN), K_MAX)


def rtn_curve(model: CrawlerGPT, hp: Hyperparameters, rel: dict[str, float], meta: dict, target: float) -> list:
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
    need = (set(plan.linear) if hp.quant == "gptq" else set()) | \
        ({HEAD} if hp.quant_alloc == "hessian" and plan.kinds[HEAD] in QUANT_KINDS else set())
    float_hessians = collect_hessians(model, batches, need, dinfo) if need and batches else {}
    rel = relative_ks(model, hp, float_hessians)
    tried: list[Export] = []

    def attempt(k: float) -> Export:
        trial = copy.deepcopy(model)
        entries, _ = quantize_model_(trial, hp, hp.quant, batches, dinfo, ks_at(rel, k), float_hessians)
        blob = pack_artifact(entries, meta, hp.compressor, compressor_level(hp), hp.byte_shuffle) if dinfo.master else b""
        tried.append(Export(entries, blob, broadcast_int(len(blob), dinfo), trial, k, passes=len(tried) + 1))
        log.kv(export_pass=len(tried), quant_k=f"{k:.3f}", bytes_model=tried[-1].size,
               bytes_total=tried[-1].size + len(packed_code()), seconds=f"{time.perf_counter() - t0:.1f}")
        return tried[-1]

    if hp.size_target != "fit":
        attempt(hp.quant_k)
    else:
        target = budget - hp.size_margin / 2
        curve = rtn_curve(model, hp, rel, meta, target)
        log.kv(fit_curve=",".join(f"{k:.2f}:{b}" for k, b in curve), budget_bytes_model=budget)
        k = clamp_k(along_log_k(curve, target, "k"))
        for _ in range(1 if hp.rehearsal else 3):
            size = attempt(k).size
            finest = k <= K_MIN * 1.0001 and size <= budget
            if budget - hp.size_margin <= size <= budget or finest or (k >= K_MAX * 0.9999 and size > budget):
                break
            # The real bytes re-anchor the estimated curve (GPTQ and the full pack differ from the RTN sample
            # by a nearly constant ratio); with two real passes, their own secant takes over.
            ratio = size / along_log_k(curve, k, "bytes")
            anchor = [(t.quant_k, t.size) for t in tried] if len(tried) > 1 else [(c, b * ratio) for c, b in curve]
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
    """Rank 0's value on every rank."""
    if not dinfo.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def entries_state(entries: dict) -> dict[str, Tensor]:
    """The float weights an artifact's entries stand for."""
    return {name: (dequantize_rows(e["q"], e["scale"]) if e["kind"] in QUANT_KINDS else e["data"].float()).reshape(e["shape"])
            for name, e in entries.items()}


def prune_to_fit(entries: dict, meta: dict, hp: Hyperparameters, budget: int, dinfo: DistInfo) -> tuple[dict, int, bytes]:
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
    blob = pack_artifact(entries, meta, hp.compressor, compressor_level(hp), hp.byte_shuffle) if dinfo.master else b""
    full = broadcast_int(len(blob), dinfo)
    over, n, out = full - budget, 0, entries
    while over > 0:
        require(n < len(owner), "SIZE_LIMIT", f"the artifact is {over} bytes over even with every +-1 value zeroed — "
                "raise SIZE_LIMIT or shrink the model", ArtifactTooLarge)
        saved_per_value = (full - budget - over) / n if n else 1.0   # a byte a value at first (too hopeful), then measured
        n = min(len(owner), 2 * n if n else len(owner), n + max(1, math.ceil(1.2 * over / max(saved_per_value, 1e-3))))
        out = {name: dict(e) for name, e in entries.items()}
        for name in set(owner[:n]):
            out[name]["q"] = out[name]["q"].clone()
        for name, p in zip(owner[:n], pos[:n].tolist()):
            out[name]["q"].view(-1)[p] = 0
        blob = pack_artifact(out, meta, hp.compressor, compressor_level(hp), hp.byte_shuffle) if dinfo.master else b""
        over = broadcast_int(len(blob), dinfo) - budget
    return out, n, blob


def compressor_level(hp: Hyperparameters) -> int | None:
    return None if hp.compress_level < 0 else hp.compress_level


def artifact_meta(hp: Hyperparameters, tokenizer_sha256: str = "") -> dict:
    """What the artifact needs to rebuild the model and to be scored; run ids, paths and blurbs live
    in submission.json, not in counted bytes."""
    return {"format": "crawler-golf", "model": hp.model_knobs(), "tokenizer_sha256": tokenizer_sha256,
            "eval": {"eval_seq_len": hp.eval_seq_len, "eval_stride": hp.eval_stride}}


def load_artifact(path: str | Path) -> tuple[CrawlerGPT, dict]:
    """A fresh model from the artifact alone: shape from its header, weights dequantized."""
    path = Path(path)
    require(path.is_file(), str(path), "is not an artifact file (a folder, or missing) — point EVAL_ONLY at a .ptz file",
            ArtifactError)
    entries, meta = unpack_artifact(path.read_bytes(), str(path))
    require(isinstance(meta, dict) and meta.get("format") == "crawler-golf" and isinstance(meta.get("model"), dict),
            str(path), "not a crawler-golf model artifact", ArtifactError)
    model_fields = {f.name for f in knob_fields() if f.metadata["model"]}
    try:
        model = CrawlerGPT(Hyperparameters(**{k: v for k, v in meta["model"].items() if k in model_fields}))
        model.load_state_dict(entries_state(entries), strict=True)
    except (HyperparameterError, RuntimeError, TypeError) as err:
        raise ArtifactError(f"{path}: its tensors do not fit the model in its header ({err})") from None
    return model, meta


# ============================================================================
# Evaluation
# ============================================================================


@dataclass
class ByteLUTs:
    base_bytes: Tensor   # UTF-8 bytes of each piece, without its leading "▁"
    has_space: Tensor    # piece starts with "▁" (one more byte unless it follows a boundary)
    is_boundary: Tensor  # control / unknown / unused pieces: count 0 bytes, no space after them


def build_byte_luts(sp, vocab_size: int) -> ByteLUTs:
    base = torch.zeros(vocab_size, dtype=torch.int64)
    space = torch.zeros(vocab_size, dtype=torch.bool)
    boundary = torch.ones(vocab_size, dtype=torch.bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("▁"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteLUTs(base, space, boundary)


def target_bytes(prev: Tensor, tgt: Tensor, luts: ByteLUTs) -> Tensor:
    lut = {k: v.to(tgt.device) for k, v in dataclasses.asdict(luts).items()}
    return lut["base_bytes"][tgt] + (lut["has_space"][tgt] & ~lut["is_boundary"][prev]).long()


def bits_per_byte(nll_nats: float, num_bytes: float) -> float:
    return nll_nats / math.log(2) / num_bytes


def unigram_bpb(tokens: Tensor, luts: ByteLUTs) -> float:
    """Bits per byte of a model that knows only the split's own token frequencies: the bar to beat."""
    tgt, prev = tokens[1:].long(), tokens[:-1].long()
    counts = torch.bincount(tgt, minlength=luts.base_bytes.numel()).double()
    probs = counts / counts.sum()
    nll = -(counts[counts > 0] * probs[counts > 0].log()).sum().item()
    return bits_per_byte(nll, target_bytes(prev, tgt, luts).sum().item())


def sliding_windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) for each window over num_tokens tokens (num_tokens-1 targets).
    Every target is scored exactly once, by the earliest window holding it: the most context."""
    last_start = max(num_tokens - 1 - seq_len, 0)
    starts = list(range(0, last_start + 1, stride))
    if starts[-1] != last_start:
        starts.append(last_start)
    windows, scored_to = [], 0   # targets [0, scored_to) of the target sequence are done
    for s in starts:
        windows.append((s, scored_to - s))
        scored_to = s + min(seq_len, num_tokens - 1 - s)
    return windows


@torch.no_grad()
def evaluate(model: nn.Module, tokens: Tensor, luts: ByteLUTs, seq_len: int, stride: int, batch_tokens: int,
             dinfo: DistInfo, device: torch.device) -> tuple[float, float]:
    """(val_loss in nats/token, val_bpb) over `tokens`, windows split across ranks, float64 sums. Every
    batch has the same shape (the last is padded with scored-nothing windows): one compiled graph."""
    seq_len = min(seq_len, tokens.numel() - 1)
    windows = sliding_windows(tokens.numel(), seq_len, stride)
    mine = windows[dinfo.rank::dinfo.world_size]
    batch = max(1, min(batch_tokens // (seq_len * dinfo.world_size), len(windows)))
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, bytes, tokens
    was_training = model.training
    model.eval()
    offsets = torch.arange(seq_len, device=device)[None, :]
    for i in range(0, max(len(mine), 1), batch):
        chunk = mine[i:i + batch]
        firsts = [first for _, first in chunk] + [seq_len] * (batch - len(chunk))   # padding scores nothing
        chunk = chunk + [windows[0]] * (batch - len(chunk))
        idx = torch.stack([tokens[s:s + seq_len + 1] for s, _ in chunk]).to(device=device, dtype=torch.int64)
        x, y = idx[:, :-1], idx[:, 1:]
        with autocast(device):
            nll = model(x, y, per_token=True).double()
        keep = offsets >= torch.tensor(firsts, device=device)[:, None]
        sums[0] += nll[keep].sum()
        sums[1] += target_bytes(x[keep], y[keep], luts).double().sum()
        sums[2] += keep.sum()
    if dinfo.distributed:
        dist.all_reduce(sums)
    model.train(was_training)
    return (sums[0] / sums[2]).item(), bits_per_byte(sums[0].item(), sums[1].item())


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


# ============================================================================
# Training
# ============================================================================


def steps_left(hp: Hyperparameters, step: int, elapsed_s: float) -> float:
    """Main-loop steps still to run: bounded by ITERATIONS and by the wallclock cap at the current
    step rate, after keeping time for the post-loop phases (replay, distillation)."""
    left = hp.iterations - step
    if hp.train_time_cap > 0 and step > 0:
        left = min(left, (hp.train_time_cap - elapsed_s) / (elapsed_s / step) - hp.post_loop_steps)
    return left


def lr_scale(hp: Hyperparameters, step: int, elapsed_s: float) -> float:
    """1, then a linear warmdown to MIN_LR_SCALE over the last WARMDOWN_ITERS (or WARMDOWN_FRAC) steps."""
    left = steps_left(hp, step, elapsed_s)
    warmdown = hp.warmdown_frac * (step + left) if hp.warmdown_frac else hp.warmdown_iters
    if warmdown <= 0:
        return 1.0
    return max(hp.min_lr_scale, min(1.0, left / warmdown))


def muon_momentum(hp: Hyperparameters, step: int) -> float:
    frac = min(step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * hp.muon_momentum_warmup_start + frac * hp.muon_momentum


class WeightAverages:
    """EMA (warmed up so short runs are not dragged back to the init) and SWA snapshots."""

    def __init__(self, model: nn.Module, hp: Hyperparameters):
        self.hp, self.updates, self.swa_count = hp, 0, 0
        self.ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()} if hp.ema_decay else {}
        self.swa = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in model.state_dict().items()} if hp.swa_every else {}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, scale: float) -> None:
        self.updates += 1
        decay = min(self.hp.ema_decay, (1 + self.updates) / (10 + self.updates))
        collect = bool(self.swa) and scale < self.hp.swa_start_scale and step % self.hp.swa_every == 0
        if not (self.ema or collect):
            return
        for k, v in model.state_dict().items():
            if self.ema:
                self.ema[k].lerp_(v.float(), 1 - decay)
            if collect:
                self.swa[k] += v.float()
        self.swa_count += collect

    def weights(self, which: str) -> dict[str, Tensor] | None:
        if which == "ema":
            return self.ema
        if which == "swa" and self.swa_count:
            return {k: v / self.swa_count for k, v in self.swa.items()}
        return None

    def state(self) -> dict:
        return {"ema": self.ema, "swa": self.swa, "swa_count": self.swa_count, "updates": self.updates}

    def load(self, state: dict) -> None:
        self.ema, self.swa, self.swa_count, self.updates = state["ema"], state["swa"], state["swa_count"], state["updates"]


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


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
        self.averages = WeightAverages(self.model, self.hp)
        self.replay: list[list[tuple[Tensor, Tensor]]] = []
        self.step, self.clock, self.qat_on, self.elapsed = 0, Clock(), False, 0.0
        self.curve: list[dict] = []
        self.last_good: Path | None = None

    @property
    def accum_steps(self) -> int:
        return self.hp.accum_splits // self.dinfo.world_size

    def next_batches(self) -> list[tuple[Tensor, Tensor]]:
        micro = self.hp.train_batch_tokens // self.hp.accum_splits
        return [self.loader.next_batch(micro, self.hp.train_seq_len) for _ in range(self.accum_steps)]

    def train_step(self, batches: list[tuple[Tensor, Tensor]], lr_mult: float, momentum: float,
                   loops: int | None = None, teacher: nn.Module | None = None) -> float:
        total = torch.zeros((), device=self.device)
        for micro, (x, y) in enumerate(batches):
            if isinstance(self.step_model, nn.parallel.DistributedDataParallel):
                self.step_model.require_backward_grad_sync = micro == len(batches) - 1
            with autocast(self.device):
                if teacher is None:
                    loss = self.step_model(x, y, loops=loops)
                else:
                    with torch.no_grad():
                        teacher_logits = teacher.logits(x)
                    loss = self.step_model(x, y, teacher_logits=teacher_logits)
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
        """The step's one host-device sync: the mean loss over ranks, and rank 0's training clock, so
        every rank's LR schedule, QAT switch and stop decision use the same number."""
        shared = torch.stack([loss_sum.float(), torch.tensor(self.clock.seconds if self.dinfo.master else 0.0,
                                                              device=self.device)])
        if self.dinfo.distributed:
            dist.all_reduce(shared, op=dist.ReduceOp.SUM)
        loss_total, self.elapsed = shared.tolist()
        loss = loss_total / (n_micro * self.dinfo.world_size)
        if not math.isfinite(loss):
            saved = str(self.last_good) if self.last_good else "none"
            raise Diverged(f"train loss: {loss} at step {self.step + 1}; last good checkpoint: {saved}; nothing was "
                           "exported — lower the learning rates or GRAD_CLIP_NORM")
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
        self.log.kv(late_qat="on", step=self.step, lr_scale=f"{scale:.3f}", crawler_only=int(self.hp.qat_crawler_only))

    def prime_compile(self) -> None:
        """Run WARMUP_STEPS real steps so compilation happens off the clock, then undo them. The last
        steps run with late QAT on and at every loop count the run will use, so no graph is compiled on
        the training clock (QAT flips a buffer; it needs no graph of its own, but warming it proves so)."""
        if not (self.hp.warmup_steps and self.hp.use_compile(self.device)):
            self.log("warmup:skipped (compile off)")
            return
        saved = self.snapshot()
        t0 = time.perf_counter()
        counts = self.loop_counts()
        for s in range(max(self.hp.warmup_steps, 2 * len(counts))):
            self.model.set_qat(self.hp.late_qat_threshold > 0 and s % 2 == 1)
            self.train_step(self.next_batches(), 1.0, muon_momentum(self.hp, 0), counts[(s // 2) % len(counts)])
        if self.hp.distill_steps:   # the student's step with teacher logits is a graph of its own
            self.train_step(self.next_batches(), 1.0, muon_momentum(self.hp, 0), teacher=self.model)
        self.model.set_qat(False)
        self.restore(saved)
        self.log(f"warmup:done steps:{self.hp.warmup_steps} seconds:{time.perf_counter() - t0:.1f}")

    def time_is_up(self) -> bool:
        return self.hp.train_time_cap > 0 and steps_left(self.hp, self.step, self.elapsed) <= 0

    def validate(self, val_tokens: Tensor, luts: ByteLUTs, full: bool) -> dict:
        hp = self.hp
        check = val_tokens if full or not hp.val_max_tokens else val_tokens[: hp.val_max_tokens + 1]
        with self.clock.paused():
            loss, bpb = evaluate(self.model, check, luts, hp.train_seq_len, hp.train_seq_len, hp.val_batch_size,
                                 self.dinfo, self.device)
        self.log.kv(step=self.step, val_loss=loss, val_bpb=bpb, train_time=f"{self.clock.seconds:.1f}s")
        if not full:   # the curve is one slice throughout: the full split's score would be a step, not progress
            self.curve.append({"step": self.step, "train_seconds": self.clock.seconds, "val_loss": loss, "val_bpb": bpb})
        return {"val_loss": loss, "val_bpb": bpb}

    def run(self, val_tokens: Tensor, luts: ByteLUTs) -> dict:
        hp = self.hp
        with self.clock.running():
            while True:
                if self.step >= hp.iterations or self.time_is_up():
                    break   # the full validation comes once the export weights are in (run())
                if hp.val_loss_every and self.step % hp.val_loss_every == 0:
                    self.validate(val_tokens, luts, full=False)
                scale = lr_scale(hp, self.step, self.elapsed)
                self.set_qat(scale)
                batches = self.next_batches()
                if hp.replay_batches:
                    self.replay = (self.replay + [[(x.cpu(), y.cpu()) for x, y in batches]])[-hp.replay_batches:]
                loss = self.train_step(batches, scale, muon_momentum(hp, self.step), self.loops_for(self.step))
                self.step += 1
                self.averages.update(self.model, self.step, scale)
                if self.step % hp.train_log_every == 0 or self.step == 1:
                    self.log_progress(loss, scale)
                if hp.checkpoint_every and self.step % hp.checkpoint_every == 0:
                    with self.clock.paused():
                        self.save_checkpoint()
            main_seconds = self.clock.seconds
            self.post_loop()
        return {"steps": self.step, "train_seconds": self.clock.seconds, "main_loop_seconds": main_seconds}

    def log_progress(self, loss: float, scale: float) -> None:
        hp, elapsed = self.hp, max(self.elapsed, 1e-9)
        step_ms = 1000 * elapsed / self.step
        eta = max(0.0, min(hp.iterations - self.step, steps_left(hp, self.step, elapsed))) * step_ms / 1000
        self.log.kv(step=f"{self.step}/{hp.iterations}", train_loss=f"{loss:.5f}", lr_scale=f"{scale:.3f}",
                    tok_s=f"{hp.train_batch_tokens * self.step / elapsed:.0f}", step_avg=f"{step_ms:.1f}ms", eta=f"{eta:.0f}s")

    def post_loop(self) -> None:
        """Replay, then distillation from the EMA teacher: each timed, each counted in the budget."""
        hp, t0 = self.hp, time.perf_counter()
        for epoch in range(hp.replay_epochs if self.replay else 0):
            for stored in self.replay:
                batches = [(x.to(self.device), y.to(self.device)) for x, y in stored]
                loss = self.train_step(batches, hp.replay_lr_scale, hp.muon_momentum, self.loop_counts()[0])
                self.averages.update(self.model, self.step, 0.0)
            self.log.kv(replay_epoch=epoch + 1, batches=len(self.replay), train_loss=f"{loss:.5f}")
        replay_s = time.perf_counter() - t0
        if hp.distill_steps:
            teacher = copy.deepcopy(self.model).eval()
            teacher.load_state_dict(self.averages.weights("ema"))
            for _ in range(hp.distill_steps):
                loss = self.train_step(self.next_batches(), hp.distill_lr_scale, hp.muon_momentum, teacher=teacher)
                self.averages.update(self.model, self.step, 0.0)   # the EMA follows the distilled student
            self.log.kv(distill_steps=hp.distill_steps, distill_loss=f"{loss:.5f}")
            del teacher
        self.log.kv(replay_seconds=f"{replay_s:.1f}", distill_seconds=f"{time.perf_counter() - t0 - replay_s:.1f}")

    def use_export_weights(self) -> str:
        """Load the weights chosen by EXPORT_WEIGHTS into the model; returns what was loaded.
        Fake quantization goes off: from here on the export's own grid is the only one."""
        self.model.set_qat(False)
        if self.hp.export_weights == "raw":
            return "raw"
        weights = self.averages.weights(self.hp.export_weights)
        if weights is None:
            self.log(f"export_weights:raw (no {self.hp.export_weights} snapshots were taken)")
            return "raw"
        self.model.load_state_dict({k: v.to(self.model.state_dict()[k].dtype) for k, v in weights.items()})
        return self.hp.export_weights

    def snapshot(self) -> dict:
        """Everything a resumed run needs to continue bit for bit."""
        state = {"step": self.step, "train_seconds": self.clock.seconds, "model": self.model.state_dict(),
                 "optimizers": [o.state_dict() for o in self.optimizers], "averages": self.averages.state(),
                 "stream": torch.tensor(self.loader.stream.position()), "qat_on": self.qat_on,
                 "replay": self.replay, "rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return copy.deepcopy(state)

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for opt, st in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(st)
        self.averages.load(state["averages"])
        self.loader.stream.seek(*state["stream"].tolist())
        self.replay = state["replay"]
        self.step, self.clock = state["step"], Clock(state["train_seconds"])
        self.elapsed = state["train_seconds"]
        torch.set_rng_state(state["rng_cpu"].cpu())
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        if state["qat_on"]:
            self.set_qat(0.0)

    def save_checkpoint(self) -> None:
        """Each rank writes its own file (Muon's momentum lives on the rank that owns the matrix). A
        state with a non-finite weight or optimizer moment is never written: the last file stays good."""
        state = self.snapshot()
        tensors = [*state["model"].values(), *(t for o in state["optimizers"] for s in o["state"].values()
                                               for t in s.values() if isinstance(t, Tensor))]
        if not all_finite(tensors):
            self.log.kv(checkpoint="skipped_non_finite", step=self.step, last_good=str(self.last_good))
            return
        buf = io.BytesIO()
        torch.save(state, buf)
        write_atomic(self.rank_checkpoint, buf.getvalue())
        self.last_good = self.rank_checkpoint
        self.log.kv(checkpoint=str(self.rank_checkpoint), step=self.step)

    @property
    def rank_checkpoint(self) -> Path:
        return self.checkpoint_path.with_suffix(f".r{self.dinfo.rank}.ckpt")

    def resume(self) -> None:
        path = self.rank_checkpoint
        require(path.exists(), "RESUME", f"no checkpoint {path} for RUN_ID={self.hp.run_id} — was CHECKPOINT_EVERY "
                "set for that run? Drop RESUME to start afresh", DataError)
        self.restore(torch.load(path, map_location=self.device, weights_only=True))
        self.last_good = path
        self.log.kv(resumed_from=str(path), step=self.step, train_seconds=f"{self.clock.seconds:.1f}")


# ============================================================================
# main()
# ============================================================================


def setup_distributed(dinfo: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", dinfo.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Ranks sharing a CPU split its cores: oversubscribed OpenMP threads spin and crawl.
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // dinfo.world_size)))
    if dinfo.distributed:   # the export keeps ranks waiting on rank 0's packs: longer than the 10-minute default
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


@dataclass
class RunData:
    train_files: list[Path]
    val_tokens: Tensor
    luts: ByteLUTs
    tokenizer_sha256: str
    backend: str


def load_tokenizer(path: str):
    import sentencepiece as spm  # noqa: PLC0415 - only needed once data exists
    hint = "fetch it with bash setup_pod.sh, or build the bundled one with python data/prepare_local.py"
    require(Path(path).is_file(), "TOKENIZER_PATH", f"{path} does not exist — {hint}", DataError)
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except Exception as exc:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError for garbage
        raise DataError(f"TOKENIZER_PATH: {path} is not a SentencePiece model ({exc}) — {hint}") from None


def check_tokenizer_fits_shards(sp, val_tokens: Tensor, hp: Hyperparameters) -> None:
    """The tokenizer must be the one that made the shards: the dataset's manifest names its sha256 when
    data/prepare_local.py built it; otherwise a few validation documents, decoded and re-encoded, must
    give back their own ids (a different tokenizer of the same size agrees on ~0.9 of them, ours on 1.0)."""
    path, fix = hp.tokenizer_path, "use the tokenizer the shards were made with"
    top = int(val_tokens.int().max())
    require(top < sp.vocab_size(), "TOKENIZER_PATH", f"{path} has {sp.vocab_size()} pieces but the val shards hold token "
            f"id {top} — {fix}", DataError)
    manifest = Path(hp.data_path) / "manifest.json"
    expected = json.loads(manifest.read_text()).get("tokenizer", {}).get("sha256") if manifest.is_file() else None
    if expected:
        actual = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        require(actual == expected, "TOKENIZER_PATH", f"{path} (sha256 {actual[:12]}…) is not the tokenizer {manifest} "
                f"names ({expected[:12]}…) — {fix}", DataError)
        return
    docs = [d for d in " ".join(map(str, val_tokens[:65536].tolist())).split(f" {BOS_ID} ") if d.strip()][:8]
    ratios = []
    for doc in docs:
        sample = [int(t) for t in doc.split() if int(t) != BOS_ID][:512]
        again = sp.encode(sp.decode(sample))[:len(sample)]
        ratios.append(difflib.SequenceMatcher(None, sample, again, autojunk=False).ratio())
    agreement = sum(ratios) / max(len(ratios), 1)
    require(not ratios or agreement >= 0.99, "TOKENIZER_PATH", f"{path} re-encodes the val shards' text to other ids "
            f"(agreement {agreement:.3f}) — {fix}", DataError)


def probe_folder(folder: str, var: str, rank: int) -> None:
    probe = Path(folder) / f".probe_{rank}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(f"{var}: cannot write to {folder} ({exc.strerror}) — point {var} at a writable folder") from None


def preflight(hp: Hyperparameters, dinfo: DistInfo, device: torch.device) -> RunData:
    """Everything that can fail, checked before a single training step. EVAL_ONLY needs only the val
    shards and the tokenizer."""
    require(hp.accum_splits % dinfo.world_size == 0, "ACCUM_SPLITS",
            f"{hp.accum_splits} is not divisible by the world size {dinfo.world_size}")
    sp = load_tokenizer(hp.tokenizer_path)
    require(sp.vocab_size() == hp.vocab_size, "VOCAB_SIZE", f"{hp.vocab_size} != the tokenizer's {sp.vocab_size()} pieces "
            f"({hp.tokenizer_path}) — set VOCAB_SIZE={sp.vocab_size()} or use the matching tokenizer")
    val_tokens = torch.cat([load_data_shard(f, hp.vocab_size) for f in shard_files(hp.data_path, hp.val_files, "VAL_FILES")])
    window = eval_settings(hp, load_artifact(hp.eval_only)[1])["eval_seq_len"] if hp.eval_only else \
        max(hp.eval_seq_len, hp.train_seq_len)
    require(val_tokens.numel() > window, "EVAL_SEQ_LEN", f"windows of {window} tokens exceed the {val_tokens.numel()} val "
            "tokens — lower EVAL_SEQ_LEN/TRAIN_SEQ_LEN or use more validation data")
    check_tokenizer_fits_shards(sp, val_tokens, hp)
    train_files: list[Path] = []
    if not hp.eval_only:
        train_files = shard_files(hp.data_path, hp.train_files, "TRAIN_FILES")
        train_tokens = sum(shard_num_tokens(f) for f in train_files)
        require(train_tokens > hp.train_batch_tokens // hp.accum_splits * dinfo.world_size, "TRAIN_BATCH_TOKENS",
                f"one step needs {hp.train_batch_tokens} tokens; the train shards hold {train_tokens} — lower "
                "TRAIN_BATCH_TOKENS or add train shards")
        load_data_shard(train_files[0], hp.vocab_size)   # token ids in range (every later shard is checked on load)
    compress_bytes(b"probe", hp.compressor, 1)          # the chosen compressor's module imports
    for folder, var in ((hp.artifact_dir, "ARTIFACT_DIR"), (hp.records_dir, "RECORDS_DIR"), (hp.log_dir, "LOG_DIR")):
        probe_folder(folder, var, dinfo.rank)
    backend = attention_backend(device)
    dtype, head_dim = (torch.bfloat16 if device.type == "cuda" else torch.float32), hp.model_dim // hp.num_heads
    q = torch.randn(1, 8, hp.num_heads, head_dim, device=device, dtype=dtype)
    causal_attention(q, q[:, :, :hp.num_kv_heads], q[:, :, :hp.num_kv_heads], backend)  # the backend runs with our shapes
    sha = hashlib.sha256(Path(hp.tokenizer_path).read_bytes()).hexdigest()
    return RunData(train_files, val_tokens, build_byte_luts(sp, hp.vocab_size), sha, backend)


def check_fresh_run(hp: Hyperparameters, run_id: str, dinfo: DistInfo) -> None:
    """A new run never overwrites another run's log or checkpoint."""
    if hp.resume or not hp.run_id or not dinfo.master:
        return
    taken = [p for p in (Path(hp.log_dir) / f"{run_id}.txt", Path(hp.artifact_dir) / f"{run_id}.r0.ckpt") if p.exists()]
    if taken:
        raise HyperparameterError(f"RUN_ID: {run_id} already has {taken[0]} — choose another RUN_ID, or RESUME=1 to continue it")


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


# Graphs one CrawlerGPT.forward may compile: training at each loop count (cadence, schedules), the
# distillation student, and eval. Past it Dynamo would silently run eagerly; we fail instead.
COMPILE_GRAPH_BUDGET = 16


def build_training(hp: Hyperparameters, data: RunData, dinfo: DistInfo, device: torch.device, log: Logger,
                   run_id: str) -> Trainer:
    torch.manual_seed(hp.seed)   # the init depends on SEED alone, not on what the preflight probes drew
    model = CrawlerGPT(hp).to(device)
    model.set_backends(data.backend)
    if hp.late_qat_threshold:
        model.setup_qat(hp)
    log.kv(unique_params=count_unique_params(model), effective_depth=hp.effective_depth,
           flat=hp.num_flat_layers, crawler=f"{hp.num_crawler_layers}x{hp.crawler_loops}",
           arm_params=",".join(f"{k}={v}" for k, v in sorted(arm_param_counts(model).items())) or "none",
           bytes_model_raw=raw_model_bytes(model, hp))
    step_model = compile_model(model, hp, device)
    if dinfo.distributed:
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[dinfo.local_rank] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=bool(trainer_min_loops(hp) < hp.crawler_loops and unused_at_one_loop(model)))
    log.kv(compile=int(hp.use_compile(device)), accum_steps=hp.accum_splits // dinfo.world_size)
    loader = DistributedTokenLoader(data.train_files, dinfo, device, hp.vocab_size)
    optimizers = build_optimizers(model, hp, dinfo, compiled=hp.use_compile(device))
    return Trainer(hp, dinfo, device, model, step_model, optimizers, loader, log, Path(hp.artifact_dir) / f"{run_id}.ckpt")


def trainer_min_loops(hp: Hyperparameters) -> int:
    return 1 if hp.crawler_cadence > 1 else min(n for _, n in hp.loops_schedule())


def unused_at_one_loop(model: CrawlerGPT) -> list[str]:
    """Parameters a single-loop (cadence) step leaves without a gradient: DDP must be told to expect them."""
    probe = copy.deepcopy(model).cpu().float()
    ids = torch.zeros(1, 4, dtype=torch.long)
    probe(ids, ids, loops=1).backward()
    return [n for n, p in probe.named_parameters() if p.grad is None]


def raw_model_bytes(model: CrawlerGPT, hp: Hyperparameters) -> int:
    """The artifact's payload before compression (one byte per quantized value plus fp16 row scales)."""
    plan, total = storage_plan(model, hp), 0
    for name, p in model.named_parameters():
        kind = plan.kinds[name]
        total += p.numel() + 2 * p.size(0) if kind in QUANT_KINDS else p.numel() * FLOAT_KINDS[kind].itemsize
    return total


def calibration_batches(loader: DistributedTokenLoader, hp: Hyperparameters, dinfo: DistInfo) -> list[Tensor]:
    n = max(1, hp.gptq_calib_batches // dinfo.world_size)
    return [loader.next_batch(hp.train_batch_tokens // hp.accum_splits, hp.train_seq_len)[0] for _ in range(n)]


def score(model: nn.Module, hp: Hyperparameters, data: RunData, seq_len: int, stride: int, dinfo: DistInfo,
          device: torch.device, log: Logger, label: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss, bpb = evaluate(model, data.val_tokens, data.luts, seq_len, stride, hp.val_batch_size, dinfo, device)
    log.kv(**{f"{label}_val_loss": loss, f"{label}_val_bpb": f"{bpb:.6f}", f"{label}_eval_seconds": f"{time.perf_counter() - t0:.1f}"})
    return loss, bpb


def eval_settings(hp: Hyperparameters, meta: dict) -> dict:
    """The artifact's EVAL_SEQ_LEN/EVAL_STRIDE, unless the environment set them."""
    stored = meta.get("eval") or {"eval_seq_len": hp.eval_seq_len, "eval_stride": hp.eval_stride}
    return {k: getattr(hp, k) if k in hp.explicit else v for k, v in stored.items()}


def score_artifact(path: Path, hp: Hyperparameters, data: RunData, dinfo: DistInfo, device: torch.device,
                   log: Logger) -> dict:
    """Reload the artifact from disk and score it: plain windows, then the sliding window (the score).
    Eval settings come from the artifact unless the environment set them."""
    model, meta = load_artifact(path)
    require(meta.get("tokenizer_sha256") in ("", data.tokenizer_sha256), "TOKENIZER_PATH",
            f"{hp.tokenizer_path} is not the tokenizer {path} was trained with — scores would not be comparable", DataError)
    settings = eval_settings(hp, meta)
    log.kv(eval_settings=",".join(f"{k}={v}" for k, v in settings.items()),
           from_artifact=",".join(k for k in settings if k not in hp.explicit) or "none")
    model.to(device).set_backends(data.backend)
    model = compile_model(model, hp, device)
    seq, stride = settings["eval_seq_len"], settings["eval_stride"]
    post_loss, post = score(model, hp, data, seq, seq, dinfo, device, log, "post_quant")
    val_loss, val_bpb = score(model, hp, data, seq, stride, dinfo, device, log, "sliding") if stride < seq else (post_loss, post)
    return {"post_quant_val_bpb": post, "val_bpb": val_bpb, "val_loss": val_loss}


EXPORT_VARIANTS = {"rtn": ("rtn", "0"), "gptq_plain": ("gptq", "0"), "gptq_loop_aware": ("gptq", "1")}


def compare_exports(model: CrawlerGPT, hp: Hyperparameters, batches: list[Tensor], data: RunData, dinfo: DistInfo,
                    device: torch.device, log: Logger, final: Export, meta: dict) -> dict:
    """Every export variant from the same trained weights at the final k (so the gaps carry no training
    noise), and the artifact's bytes under every compressor."""
    figures, calib = {}, batches or calibration_batches(DistributedTokenLoader(data.train_files, dinfo, device), hp, dinfo)
    ks = ks_at(relative_ks(model, hp, {}), final.quant_k) if hp.quant_alloc == "uniform" else None
    for label, (quant, aware) in EXPORT_VARIANTS.items():
        if label == "gptq_plain" and not hp.num_crawler_layers:
            continue
        copy_model = copy.deepcopy(model)
        quantize_model_(copy_model, dataclasses.replace(hp, quant=quant, gptq_loop_aware=aware), quant, calib, dinfo, ks)
        figures[f"{label}_val_bpb"] = score(copy_model, hp, data, hp.eval_seq_len, hp.eval_seq_len, dinfo, device, log, label)[1]
    for compressor in COMPRESSOR_IDS if dinfo.master else ():
        log.kv(compare_compressor=compressor, bytes_model=len(pack_artifact(final.entries, meta, compressor, None, hp.byte_shuffle)))
    return figures


def final_line(r: dict) -> str:
    line = (f"final val_bpb:{r['val_bpb']:.6f} val_loss:{r['val_loss']:.6f} bytes_total:{r['bytes_total']} "
            f"bytes_code:{r['bytes_code']} bytes_model:{r['bytes_model']}")
    return line + (f" pruned_values:{r['pruned']}" if r.get("pruned") else "")


def sizes_of(artifact: Path) -> dict:
    sizes = {"bytes_code": len(packed_code()), "bytes_model": artifact.stat().st_size}
    return {**sizes, "bytes_total": sizes["bytes_code"] + sizes["bytes_model"]}


def check_cap(hp: Hyperparameters, sizes: dict, artifact: Path, log: Logger) -> None:
    over = sizes["bytes_total"] - hp.size_limit
    if over > 0:
        kept = artifact.with_suffix(".over_cap.ptz")
        os.replace(artifact, kept)
        log(f"error: bytes_total {sizes['bytes_total']} is {over} bytes over SIZE_LIMIT={hp.size_limit}")
        raise ArtifactTooLarge(f"SIZE_LIMIT: the artifact is {over} bytes over the cap (kept as {kept}) — shrink the "
                               "model, or set SIZE_TARGET=fit")


def run(hp: Hyperparameters, dinfo: DistInfo, device: torch.device) -> dict:
    run_id = make_run_id(hp, dinfo)
    log_path = Path(hp.log_dir) / f"{run_id}.txt"
    torch.manual_seed(hp.seed)  # identical init on every rank
    np.random.seed(hp.seed)
    if hp.dry_run:
        log = Logger(log_path if dinfo.master else None)
        log_startup(log, hp, dinfo, device)
        return dry_run(hp, log)
    timer = PhaseTimer()
    if hp.train_tflops:
        hp = dataclasses.replace(hp, iterations=budget_steps(hp))
    if hp.rehearsal:   # production shapes, two one-sequence steps per rank: the pod's first minute, run anywhere
        hp = dataclasses.replace(hp, iterations=2, warmup_steps=2, max_wallclock_seconds=0, val_loss_every=0,
                                 accum_splits=dinfo.world_size, train_batch_tokens=dinfo.world_size * hp.train_seq_len,
                                 gptq_calib_batches=2)
    with timer.phase("checks"):
        data = preflight(hp, dinfo, device)
        check_fresh_run(hp, run_id, dinfo)
    if hp.rehearsal:
        data.val_tokens = data.val_tokens[:hp.eval_seq_len + 8 * hp.eval_stride + 1]
    log = Logger(log_path if dinfo.master else None, append=hp.resume)
    log_startup(log, hp, dinfo, device)
    log.kv(rehearsal=int(hp.rehearsal), train_shards=len(data.train_files), val_tokens=data.val_tokens.numel(), attention=data.backend,
           unigram_val_bpb=f"{unigram_bpb(data.val_tokens, data.luts):.4f}")
    if hp.eval_only:
        artifact = Path(hp.eval_only)
        check_submission_hash(artifact)
        with timer.phase("eval"):
            out = {"run_id": run_id, **score_artifact(artifact, hp, data, dinfo, device, log), **sizes_of(artifact)}
        log(timer.summary())
        log(final_line(out))
        return out
    trainer = build_training(hp, data, dinfo, device, log, run_id)
    with timer.phase("train"):
        if hp.resume:
            trainer.resume()
        else:
            trainer.prime_compile()
        result = trainer.run(data.val_tokens, data.luts)
        exported = trainer.use_export_weights()
        result.update(trainer.validate(data.val_tokens, data.luts, full=True))
    log.kv(export_weights=exported, pre_quant_val_bpb=f"{result['val_bpb']:.6f}")
    if device.type == "cuda":
        log.kv(peak_memory_mib=torch.cuda.max_memory_allocated() // 2**20)
    with timer.phase("calibration"):
        batches = calibration_batches(trainer.loader, hp, dinfo) if hp.quant == "gptq" or hp.quant_alloc == "hessian" else []
    log.kv(train_plus_calibration_seconds=f"{result['train_seconds'] + timer.seconds['calibration']:.1f}",
           budget_seconds=hp.max_wallclock_seconds)
    model, meta = trainer.model, artifact_meta(hp, data.tokenizer_sha256)
    artifact = Path(hp.artifact_dir) / f"{run_id}.ptz"
    with timer.phase("export"):
        final = export_model(model, hp, batches, dinfo, log, meta)
        if dinfo.master:
            write_atomic(artifact, final.blob)
        if dinfo.distributed:
            dist.barrier()
    sizes = sizes_of(artifact)
    log.kv(quant=hp.quant, loop_aware=int(hp.quant == "gptq" and loop_aware(hp)), compressor=hp.compressor,
           quant_k=f"{final.quant_k:.3f}", passes=final.passes, bytes_code_source=len(source_bytes()), **sizes)
    check_cap(hp, sizes, artifact, log)
    with timer.phase("eval"):
        figures = {"pre_quant_val_bpb": result["val_bpb"]}
        if hp.quant_compare:
            figures.update(compare_exports(model, hp, batches, data, dinfo, device, log, final, meta))
        figures.update(score_artifact(artifact, hp, data, dinfo, device, log))
    log.kv(quant_gap=f"{figures['post_quant_val_bpb'] - figures['pre_quant_val_bpb']:.6f}",
           **{k: f"{v:.6f}" for k, v in figures.items() if k.endswith("bpb")})
    log(timer.summary())
    out = {"run_id": run_id, **result, **figures, **sizes, "pruned": final.pruned, "quant_k": final.quant_k,
           "phase_seconds": dict(timer.seconds), "artifact": str(artifact), "curve": trainer.curve,
           "unique_params": count_unique_params(model), "step_ms": 1000 * result["main_loop_seconds"] / max(result["steps"], 1)}
    log(final_line(out))
    if dinfo.master:
        out["records"] = str(write_records(hp, out, log_path, artifact))
        write_result_json(hp, out, device)
    return out


def write_result_json(hp: Hyperparameters, out: dict, device: torch.device) -> None:
    """<LOG_DIR>/<RUN_ID>.json: the run's figures for tools (experiments/ablate.py reads these)."""
    record = {**out, "commit": git_commit(), "device": device_name(device), "torch": torch.__version__,
              "hp": {f.name.upper(): getattr(hp, f.name) for f in knob_fields()}}
    write_atomic(Path(hp.log_dir) / f"{out['run_id']}.json", json.dumps(record, indent=1).encode())


def check_submission_hash(artifact: Path) -> None:
    """EVAL_ONLY on a records folder: the artifact must be the one submission.json describes."""
    sub = artifact.parent / "submission.json"
    if not sub.is_file():
        return
    expected = json.loads(sub.read_text()).get("artifact_sha256")
    actual = hashlib.sha256(artifact.read_bytes()).hexdigest()
    require(expected in (None, actual), str(artifact), f"sha256 {actual[:12]}… differs from {sub}'s {str(expected)[:12]}… "
            "— the file was changed after submission", ArtifactError)


# Pod cost anchors (8xH100 SXM, bf16 dense peak 989 TFLOP/s): the seeds' 4 flat + 2 crawler x 2, dim 640, at
# 786,432 tokens a step took 78-85 ms; the upstream baseline (9 x 512, MLP 2x, seq 1024) at 524,288 took 43.5 ms.
# A step costs FLOPs / (GPUs * peak * POD_MFU) + POD_STEP_OVERHEAD_S (optimizer, collectives, launches): the two
# constants are the exact fit to those two anchors (FLOPs as flops_per_token counts them; tests check it).
H100_BF16_FLOPS, POD_MFU, POD_STEP_OVERHEAD_S = 989e12, 0.536, 0.02678
FINEWEB_VAL_TOKENS = 62_000_000   # the first 50,000 validation documents


def flops_per_token(hp: Hyperparameters, seq_len: int, train: bool = True, loops: int | None = None) -> float:
    """Training (forward + backward) or forward FLOPs per token: torch's flop counter on the meta device, with
    attention's T^2 matmuls added by hand, causal (half the scores) and FlashAttention's backward at 2.5x."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415
    with torch.device("meta"):
        model = CrawlerGPT(hp)
    model.set_backends("count")
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        loss = model(ids, ids, loops=loops)
        if train:
            loss.backward()
    depth = hp.effective_depth - hp.num_crawler_layers * (hp.crawler_loops - (loops or hp.crawler_loops))
    attention = depth * 2 * seq_len * hp.model_dim * (3.5 if train else 1.0)
    return counter.get_total_flops() / seq_len + attention


def budget_steps(hp: Hyperparameters) -> int:
    """The steps TRAIN_TFLOPS buys at this config's mean FLOPs a step (a cadence's or a loop schedule's cheaper
    steps buy more): a stopping rule that charges each arm its own FLOPs without a clock's noise."""
    schedule = hp.loops_schedule()
    flops = {n: flops_per_token(hp, hp.train_seq_len, loops=n) for n in {1, *(n for _, n in schedule)}}
    ends = [f for f, _ in schedule[1:]] + [1.0]
    per_token = sum((end - start) * (flops[n] + (hp.crawler_cadence - 1) * flops[1]) / hp.crawler_cadence
                    for (start, n), end in zip(schedule, ends))
    return max(1, int(hp.train_tflops * 1e12 / (per_token * hp.train_batch_tokens)))


def activation_bytes_per_token(hp: Hyperparameters) -> float:
    """Bytes the backward keeps per training token (weights and attention scores excluded: FlashAttention
    keeps none), counted on the meta device in fp32; bf16 autocast stores most of them at half."""
    with torch.device("meta"):
        model = CrawlerGPT(hp)
    model.set_backends("count")
    params, saved = {id(p) for p in model.parameters()}, [0]

    def keep(t: Tensor) -> Tensor:
        saved[0] += 0 if id(t) in params else t.numel() * t.element_size()
        return t
    ids = torch.zeros(1, hp.train_seq_len, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(ids, ids)
    return saved[0] / hp.train_seq_len


def pod_cost(hp: Hyperparameters) -> dict:
    """The pod's bill for this config: ms/step, steps in the budget, memory, eval and export seconds."""
    train_flops = flops_per_token(hp, hp.train_seq_len)
    step_s = train_flops * hp.train_batch_tokens / (hp.pod_gpus * H100_BF16_FLOPS * POD_MFU) + POD_STEP_OVERHEAD_S
    windows = FINEWEB_VAL_TOKENS / hp.eval_stride
    eval_flops = flops_per_token(hp, hp.eval_seq_len, train=False) * hp.eval_seq_len * windows
    micro_tokens = hp.train_batch_tokens // hp.accum_splits
    return {"flops_per_token": train_flops, "pod_ms_per_step": 1000 * step_s,
            "pod_steps": int(hp.train_time_cap / step_s) if hp.train_time_cap else hp.iterations,
            "activation_gib_per_gpu": activation_bytes_per_token(hp) / 2 * micro_tokens / 2**30,
            "pod_eval_seconds": eval_flops / (hp.pod_gpus * H100_BF16_FLOPS * POD_MFU)}


def dry_run(hp: Hyperparameters, log: Logger) -> dict:
    """The artifact the cap implies and the pod's bill, without data or training. Bytes: SDClip's fit on
    Gaussian rows (an SDClip grid's bytes depend on the shape of a row's distribution, not its scale;
    trained rows are a little heavier-tailed, which compresses a little better at the same k)."""
    t0 = time.perf_counter()
    model = CrawlerGPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=p.size(1) ** -0.5)
    plan, meta, budget = storage_plan(model, hp), artifact_meta(hp), hp.size_limit - len(packed_code())
    rel = relative_ks(model, hp, {})
    t_curve = time.perf_counter()
    curve = rtn_curve(model, hp, rel, meta, budget - hp.size_margin / 2)
    curve_s = time.perf_counter() - t_curve
    m = clamp_k(along_log_k(curve, budget - hp.size_margin / 2, "k")) if hp.size_target == "fit" else hp.quant_k
    probe = copy.deepcopy(model)
    entries, _ = quantize_model_(probe, hp, "rtn", [], DistInfo(), ks_at(rel, m))
    quantized = [n for n, kind in plan.kinds.items() if kind in QUANT_KINDS]
    before, after = dict(model.named_parameters()), dict(probe.named_parameters())
    mse = sum((before[n] - after[n]).square().sum().item() for n in quantized) / sum(before[n].square().sum().item() for n in quantized)
    sample = next(e["q"] for n, e in entries.items() if n in quantized).reshape(-1)[:2**20].numpy().tobytes()
    t_pack = time.perf_counter()
    compress_bytes(sample, hp.compressor, compressor_level(hp))
    pack_s = (time.perf_counter() - t_pack) * raw_model_bytes(model, hp) / len(sample)
    model_bytes = round(along_log_k(curve, m, "bytes"))
    out = {"unique_params": count_unique_params(model), "effective_depth": hp.effective_depth, "quant_k": m,
           "relative_mse": mse, "bytes_model_estimate": model_bytes, "bytes_code": len(packed_code()),
           "bytes_code_source": len(source_bytes()), "bytes_total_estimate": model_bytes + len(packed_code()),
           **pod_cost(hp), "export_seconds_estimate": curve_s + 2 * pack_s}
    out["fits"] = out["bytes_total_estimate"] <= hp.size_limit
    log.kv(dry_run=1, **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in out.items()},
           cap=hp.size_limit, headroom=hp.size_limit - out["bytes_total_estimate"], estimate="gaussian_rows_sdclip_fit",
           pod=f"{hp.pod_gpus}xH100_mfu{POD_MFU}_overhead{1000 * POD_STEP_OVERHEAD_S:.1f}ms",
           seconds=f"{time.perf_counter() - t0:.1f}")
    return out


def write_records(hp: Hyperparameters, out: dict, log_path: Path, artifact: Path) -> Path:
    """records/<date>_<RUN_ID>/ in the upstream layout, plus the artifact: README, submission.json, the
    log, the packed script, final_model.ptz."""
    folder = Path(hp.records_dir) / f"{time.strftime('%Y-%m-%d')}_{out['run_id']}"
    folder.mkdir(parents=True, exist_ok=True)
    changed = [f for f in sorted(knob_fields(), key=lambda f: f.name) if getattr(hp, f.name) != f.default]
    rows = "\n".join(f"| `{f.name.upper()}` | `{getattr(hp, f.name)}` |" for f in changed)
    figures = "\n".join(f"| {k} | {out[k]:.6f} |" for k in ("pre_quant_val_bpb", "rtn_val_bpb", "post_quant_val_bpb", "val_bpb") if k in out)
    (folder / "README.md").write_text(
        f"# {hp.submit_name or out['run_id']}\n\n{hp.submit_blurb}\n\n"
        f"Flat {hp.num_flat_layers} + crawler {hp.num_crawler_layers}x{hp.crawler_loops}, dim {hp.model_dim}, "
        f"{out['steps']} steps in {out['train_seconds']:.1f}s, QUANT={hp.quant}, SDClip k {out['quant_k']:.3f}, "
        f"COMPRESSOR={hp.compressor}, pruned values {out['pruned']}.\n\n"
        f"## Scores (val_bpb is post-quant, sliding stride {hp.eval_stride})\n\n| figure | value |\n| --- | --- |\n{figures}\n\n"
        f"## Bytes\n\n| total | code (packed) | model | cap |\n| --- | --- | --- | --- |\n"
        f"| {out['bytes_total']} | {out['bytes_code']} | {out['bytes_model']} | {hp.size_limit} |\n\n"
        f"Re-score: `EVAL_ONLY=final_model.ptz DATA_PATH=... TOKENIZER_PATH=... python train_gpt.py` in this folder.\n\n"
        f"## Knobs that differ from the defaults\n\n| variable | value |\n| --- | --- |\n{rows}\n")
    write_atomic(folder / "final_model.ptz", artifact.read_bytes())
    submission = {"author": hp.submit_author, "github_id": hp.submit_github_id, "name": hp.submit_name,
                  "blurb": hp.submit_blurb, "date": time.strftime("%Y-%m-%d"), "run_id": out["run_id"],
                  "val_loss": out["val_loss"], "val_bpb": out["val_bpb"], "bytes_total": out["bytes_total"],
                  "bytes_code": out["bytes_code"], "pruned_values": out["pruned"], "seed": hp.seed,
                  "hardware": device_name(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")),
                  "torch_version": torch.__version__, "artifact_sha256": hashlib.sha256(artifact.read_bytes()).hexdigest()}
    write_atomic(folder / "submission.json", (json.dumps(submission, indent=2) + "\n").encode())
    write_atomic(folder / "train.log", log_path.read_bytes())
    write_atomic(folder / "train_gpt.py", packed_code())
    return folder


def main(env: Mapping[str, str]) -> dict:
    hp = Hyperparameters.from_env(env)
    dinfo = DistInfo.from_env(env)
    device = setup_distributed(dinfo)
    try:
        return run(hp, dinfo, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    environment = dict(os.environ)   # the one place the process environment is read
    try:
        main(environment)
    except GolfError as err:
        if environment.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
