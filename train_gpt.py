"""crawler-golf: one self-contained trainer for the Parameter Golf challenge.

F unique flat blocks (U-Net skips) run once; C shared crawler blocks run N loops.
Configured only through environment variables (see README or Hyperparameters).
Run: `python train_gpt.py` (1 process) or `torchrun --nproc_per_node=K train_gpt.py`.
Importing this module has no side effects: no device is touched, no process group.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import glob
import hashlib
import json
import lzma
import math
import shutil
import struct
import os
import platform
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# ============================================================================
# Hyperparameters
# ============================================================================


class HyperparameterError(ValueError):
    """A bad or unknown environment variable; the message names it."""


def knob(default: Any, doc: str, *, choices: tuple = (), lo: float | None = None,
         hi: float | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "choices": choices, "lo": lo, "hi": hi})


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
    log_dir: str = knob("logs", "folder for logs/<RUN_ID>.txt")
    # --- model shape
    vocab_size: int = knob(1024, "vocabulary size (must cover the tokenizer)", lo=2)
    model_dim: int = knob(640, "residual width", lo=8)
    num_heads: int = knob(10, "attention heads", lo=1)
    num_kv_heads: int = knob(5, "key/value heads (GQA); divides NUM_HEADS", lo=1)
    num_flat_layers: int = knob(4, "unique flat blocks, run once, with U-Net skips", lo=0)
    num_crawler_layers: int = knob(2, "shared crawler blocks (0 = plain GPT)", lo=0)
    crawler_loops: int = knob(2, "times the crawler blocks run", lo=1)
    crawler_position: str = knob("end", "where the crawler runs: after the flat stack, or at the U-Net bottleneck",
                                 choices=("end", "bottleneck"))
    inst_dim: int = knob(0, "flow-instruction bottleneck width (0 = off)", lo=0)
    loop_embed_scale: float = knob(0.01, "norm of each QR-orthogonal loop embedding at init", lo=0.0)
    mlp_mult: float = knob(4.0, "flat MLP hidden = MLP_MULT * MODEL_DIM (fractional allowed)", lo=0.25)
    crawler_mlp_mult: float = knob(4.0, "crawler MLP hidden multiple", lo=0.25)
    mlp_act: str = knob("leaky_relu2", "MLP activation", choices=("relu2", "leaky_relu2"))
    mlp_leaky_slope: float = knob(0.5, "negative slope of leaky_relu2 in flat blocks", lo=0.0, hi=1.0)
    crawler_mlp_leaky_slope: float = knob(0.5, "negative slope of leaky_relu2 in crawler blocks", lo=0.0, hi=1.0)
    rope_base: float = knob(10000.0, "RoPE base", lo=1.0)
    rope_dims: int = knob(16, "rotary dims per head (0 = the whole head; partial RoPE)", lo=0)
    qk_gain_init: float = knob(4.0, "initial per-head query gain", lo=0.0)
    logit_softcap: float = knob(30.0, "tanh soft cap on logits (0 = off)", lo=0.0)
    tied_embed_init_std: float = knob(0.005, "std of the tied embedding at init", lo=0.0)
    ln_scale: bool = knob(True, "scale block i's normed input by 1/sqrt(i+1) (i = effective depth)")
    xsa_last_n: int = knob(-1, "exclusive self attention on the last N blocks of effective depth (-1 = all, 0 = off)", lo=-1)
    ngram_hash: str = knob("trigram", "hashed n-gram embedding added to the token embedding", choices=("none", "bigram", "trigram"))
    ngram_buckets: int = knob(4096, "n-gram hash buckets", lo=2)
    ngram_dim: int = knob(128, "n-gram table width", lo=1)
    smear_gate: bool = knob(False, "add a gated copy of the previous token's embedding (zero-init, BOS-aware)")
    ve_dim: int = knob(128, "value-embedding table width (0 = off)", lo=0)
    ve_layers: str = knob("crawler", "blocks whose attention values get the value embedding: crawler | flat | all | "
                          "comma list of unique-block indices (flat blocks first)")
    crawler_cadence: int = knob(1, "all crawler loops fire on every k-th step, one loop otherwise (1 = always)", lo=1)
    # --- crawler research arms: each is off by default, and off is the plain crawler bit for bit
    delta_net_heads: int = knob(0, "DeltaNet: a delta-rule linear-attention sublayer with this many heads in every "
                                "crawler block (0 = off)", lo=0)
    helix: bool = knob(False, "Helix: the crawler also fires on a stream of its own after every HELIX_STRIDE flat "
                       "layers, with gated cross-injection both ways (firing k reuses loop k mod CRAWLER_LOOPS)")
    helix_stride: int = knob(1, "flat layers between two Helix firings", lo=1)
    helix_dim: int = knob(32, "width of the Helix bridges", lo=1)
    helix_mode: str = knob("linear", "Helix bridge: gated low-rank projection, or single-head causal cross-attention",
                           choices=("linear", "cross_attn"))
    loop_smear: bool = knob(False, "blend each loop's output with the previous loop's (loop 0: the encoder output), "
                            "per channel, zero-init")
    tap_dim: int = knob(0, "encoder taps: flat-layer outputs projected to TAP_DIM and injected into every loop (0 = off)", lo=0)
    tap_layers: str = knob("all", "flat layers tapped: all (those before the crawler) or a comma list of flat indices")
    tap_per_loop: bool = knob(True, "one tap write-back per loop (else one shared by all loops)")
    crawler_mlp: str = knob("standard", "crawler MLP shape; the others add per-loop CHOKE_DIM bottlenecks",
                            choices=("standard", "choke_flat", "pyramid", "pyramid_res", "grouped", "residual"))
    choke_dim: int = knob(64, "width of the per-loop choke bottleneck", lo=1)
    choke_groups: int = knob(4, "block-diagonal groups of CRAWLER_MLP=grouped", lo=1)
    crawler_loop_rope_scales: str = knob("", "per-loop RoPE wavelength multipliers, one per loop, e.g. 1,2,4 "
                                         "(inv_freq is divided by them; empty = off)")
    deliberation: bool = knob(False, "persistent deliberation: a learned consensus state, gated by every firing "
                              "and pulled into every firing's output")
    loop_dt: float = knob(1.0, "contractive loops: x <- (1-dt)*x + dt*F(x) per loop (1 = off)", lo=0.01, hi=1.0)
    # --- training
    iterations: int = knob(20000, "training steps (upper bound; the wallclock cap usually ends first)", lo=0)
    max_wallclock_seconds: float = knob(600.0, "training time cap in seconds (0 = none)", lo=0.0)
    train_batch_tokens: int = knob(786432, "tokens per optimizer step, all ranks together", lo=1)
    train_seq_len: int = knob(2048, "training sequence length", lo=2)
    accum_splits: int = knob(8, "micro-batches per step summed over ranks; 1 and 8 GPUs do the same maths", lo=1)
    warmup_steps: int = knob(20, "compile-priming steps, undone before training (only with COMPILE on)", lo=0)
    warmdown_iters: int = knob(3500, "linear LR decay over the last N steps (wallclock-estimated)", lo=0)
    compile: str = knob("auto", "torch.compile the model: auto = on for CUDA, off on CPU", choices=("auto", "0", "1"))
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
    warmdown_frac: float = knob(0.0, "warmdown as a fraction of the run's estimated steps (> 0 overrides WARMDOWN_ITERS)", lo=0.0, hi=1.0)
    min_lr_scale: float = knob(0.0, "floor of the LR scale in the warmdown", lo=0.0, hi=1.0)
    ema_decay: float = knob(0.997, "EMA of the weights (0 = off), warmed up as min(decay, (1+t)/(10+t))", lo=0.0, hi=0.999999)
    swa_every: int = knob(50, "SWA: average the weights every k steps once the LR scale < SWA_START_SCALE (0 = off)", lo=0)
    swa_start_scale: float = knob(0.2, "LR scale below which SWA collects", lo=0.0, hi=1.0)
    export_weights: str = knob("ema", "weights that are exported and scored", choices=("raw", "ema", "swa"))
    late_qat_threshold: float = knob(0.15, "int6 fake quantization (straight-through) once the LR scale < this (0 = off)", lo=0.0, hi=1.0)
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
    dry_run: bool = knob(False, "build the model, print parameters, depth and estimated artifact bytes, then exit")
    # --- evaluation and logging
    val_loss_every: int = knob(1000, "validate every N steps (0 = only at the end)", lo=0)
    val_batch_size: int = knob(524288, "tokens per validation batch, all ranks together", lo=1)
    val_max_tokens: int = knob(0, "cap on validation tokens for periodic checks (0 = all)", lo=0)
    train_log_every: int = knob(100, "progress line every N steps", lo=1)
    eval_seq_len: int = knob(2048, "evaluation window length", lo=2)
    eval_stride: int = knob(64, "sliding-window stride of the final evaluation", lo=1)
    eval_only: str = knob("", "path of an artifact to evaluate without training")
    # --- export
    quant: str = knob("gptq", "quantizer of the block matrices", choices=("rtn", "gptq"))
    quant_clip: str = knob("absmax", "per-row clip of the quantizer", choices=("absmax", "std", "search"))
    quant_compare: bool = knob(False, "also score the other export variants (RTN, one-pass and loop-aware GPTQ) from the "
                               "same weights (plain eval) and log the bytes under every compressor")
    gptq_damp: float = knob(0.01, "GPTQ damping, relative to the mean Hessian diagonal", lo=0.0)
    gptq_block_size: int = knob(128, "GPTQ columns per lazy-update block", lo=1)
    gptq_act_order: bool = knob(True, "GPTQ column order: descending Hessian diagonal (else natural)")
    gptq_calib_batches: int = knob(16, "training micro-batches (all ranks) used for the GPTQ Hessians", lo=1)
    gptq_loop_aware: str = knob("auto", "two-phase GPTQ: crawler Hessians on the quantized flat section (auto = when there is a crawler)",
                                choices=("auto", "0", "1"))
    gptq_reserve_seconds: float = knob(30.0, "seconds of MAX_WALLCLOCK_SECONDS kept for GPTQ calibration", lo=0.0)
    crawler_quant_int8: bool = knob(False, "store the shared crawler matrices as int8 (flat ones stay int6)")
    embed_quant: str = knob("int8", "storage of the tied embedding", choices=("int8", "int6", "fp16"))
    compressor: str = knob("brotli", "artifact compressor", choices=("zstd", "brotli", "lzma"))
    compress_level: int = knob(-1, "compressor level; -1 = its best (zstd 22, brotli 11, lzma 9e)", lo=-1)
    byte_shuffle: bool = knob(True, "store multi-byte floats byte-plane by byte-plane (compresses better)")
    int6_bitpack: bool = knob(False, "store int6 as 4 values in 3 bytes (measured: compresses worse than 1 byte each)")
    size_limit: int = knob(16_000_000, "cap on code + model bytes", lo=1)
    size_target: str = knob("prune", "over the cap: zero the cheapest +-1 values until it fits (prune), or fail (none)",
                            choices=("none", "prune"))
    artifact_dir: str = knob("artifacts", "folder for <RUN_ID>.ptz")
    records_dir: str = knob("records", "folder for records/<date>_<RUN_ID>/")
    submit_author: str = knob("", "submission.json author")
    submit_github_id: str = knob("", "submission.json github_id")
    submit_name: str = knob("", "submission.json name")
    submit_blurb: str = knob("", "submission.json blurb")

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_range(f, getattr(self, f.name))
        _require(self.model_dim % self.num_heads == 0, "MODEL_DIM", f"{self.model_dim} is not divisible by NUM_HEADS={self.num_heads}")
        _require(self.num_heads % self.num_kv_heads == 0, "NUM_KV_HEADS", f"{self.num_kv_heads} does not divide NUM_HEADS={self.num_heads}")
        head_dim = self.model_dim // self.num_heads
        _require(head_dim % 2 == 0, "MODEL_DIM", f"head dim {head_dim} must be even for RoPE")
        _require(self.rope_dims % 2 == 0 and self.rope_dims <= head_dim, "ROPE_DIMS", f"{self.rope_dims} must be even and <= head dim {head_dim}")
        _require(self.num_flat_layers + self.num_crawler_layers > 0, "NUM_FLAT_LAYERS", "the model needs at least one block")
        _require(self.train_batch_tokens % (self.accum_splits * self.train_seq_len) == 0, "TRAIN_BATCH_TOKENS",
                 f"{self.train_batch_tokens} must be a multiple of ACCUM_SPLITS*TRAIN_SEQ_LEN={self.accum_splits * self.train_seq_len}")
        _require(self.max_wallclock_seconds == 0 or self.train_time_cap > 0, "GPTQ_RESERVE_SECONDS",
                 f"{self.gptq_reserve_seconds} leaves no training time in MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds}")
        _require(self.ema_decay > 0 or (self.export_weights != "ema" and not self.distill_steps), "EMA_DECAY",
                 "EXPORT_WEIGHTS=ema and DISTILL_STEPS need EMA_DECAY > 0")
        _require(self.swa_every > 0 or self.export_weights != "swa", "SWA_EVERY", "EXPORT_WEIGHTS=swa needs SWA_EVERY > 0")
        _require(not self.resume or bool(self.run_id), "RESUME", "RESUME=1 needs the RUN_ID of the run to continue")
        self.ve_block_ids()  # raises on a malformed VE_LAYERS
        _require(self.eval_stride <= self.eval_seq_len, "EVAL_STRIDE", f"{self.eval_stride} exceeds EVAL_SEQ_LEN={self.eval_seq_len}")
        self._check_arms()

    def _check_arms(self) -> None:
        arms = {"DELTA_NET_HEADS": self.delta_net_heads > 0, "HELIX": self.helix, "LOOP_SMEAR": self.loop_smear,
                "TAP_DIM": self.tap_dim > 0, "CRAWLER_MLP": self.crawler_mlp != "standard",
                "CRAWLER_LOOP_ROPE_SCALES": bool(self.crawler_loop_rope_scales),
                "DELIBERATION": self.deliberation, "LOOP_DT": self.loop_dt < 1.0}
        for var, on in arms.items():
            _require(not on or self.num_crawler_layers > 0, var, "is a crawler arm; NUM_CRAWLER_LAYERS is 0")
        _require(self.model_dim % max(self.delta_net_heads, 1) == 0, "DELTA_NET_HEADS",
                 f"{self.delta_net_heads} does not divide MODEL_DIM={self.model_dim}")
        if self.helix:
            _require(self.helix_firings > 0, "HELIX_STRIDE", f"{self.helix_stride} exceeds NUM_FLAT_LAYERS={self.num_flat_layers}: "
                     "the crawler would never fire beside them")
            _require(self.tap_dim == 0, "TAP_DIM", "taps read the finished encoder; Helix firings run inside it")
        self.tap_layer_ids()
        if self.crawler_mlp == "grouped":
            hidden = int(round(self.crawler_mlp_mult * self.model_dim))
            _require(hidden % self.choke_groups == 0 and self.choke_dim % self.choke_groups == 0, "CHOKE_GROUPS",
                     f"{self.choke_groups} must divide CHOKE_DIM={self.choke_dim} and the crawler MLP width {hidden}")
        self.loop_rope_scales()

    def tap_layer_ids(self) -> list[int]:
        """Flat layers whose outputs the taps read: those that run before the crawler."""
        if not self.tap_dim:
            return []
        before = self.num_flat_layers if self.crawler_position == "end" else self.num_flat_layers // 2
        ids = _int_list(self.tap_layers, "TAP_LAYERS") if self.tap_layers != "all" else list(range(before))
        _require(bool(ids) and all(0 <= i < before for i in ids), "TAP_LAYERS",
                 f"{ids} must be non-empty and within the {before} flat layers that run before the crawler")
        return sorted(set(ids))

    def loop_rope_scales(self) -> list[float]:
        if not self.crawler_loop_rope_scales:
            return []
        try:
            scales = [float(v) for v in self.crawler_loop_rope_scales.split(",")]
        except ValueError:
            raise HyperparameterError(f"CRAWLER_LOOP_ROPE_SCALES={self.crawler_loop_rope_scales!r}: expected a comma "
                                      "list of numbers") from None
        _require(len(scales) == self.crawler_loops and min(scales) > 0, "CRAWLER_LOOP_ROPE_SCALES",
                 f"{scales}: need CRAWLER_LOOPS={self.crawler_loops} positive values")
        return scales

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Hyperparameters":
        reject_unknown_knobs(env)
        values = {f.name: parse_knob(f, env[f.name.upper()]) for f in fields(cls) if f.name.upper() in env}
        return cls(**values)

    @property
    def helix_firings(self) -> int:
        return self.num_flat_layers // self.helix_stride if self.helix else 0

    @property
    def effective_depth(self) -> int:
        return self.num_flat_layers + self.num_crawler_layers * (self.crawler_loops + self.helix_firings)

    def ve_block_ids(self) -> set[int]:
        """Unique-block indices (flat blocks first, then crawler blocks) that add value embeddings."""
        n_flat, n_all = self.num_flat_layers, self.num_flat_layers + self.num_crawler_layers
        named = {"crawler": range(n_flat, n_all), "flat": range(n_flat), "all": range(n_all)}
        if self.ve_dim == 0:
            return set()
        if self.ve_layers in named:
            return set(named[self.ve_layers])
        ids = set(_int_list(self.ve_layers, "VE_LAYERS"))
        _require(all(0 <= i < n_all for i in ids), "VE_LAYERS", f"{sorted(ids)} outside the {n_all} unique blocks")
        return ids

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


def _require(ok: bool, var: str, msg: str) -> None:
    if not ok:
        raise HyperparameterError(f"{var}: {msg}")


def _int_list(text: str, var: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HyperparameterError(f"{var}={text!r}: expected a comma list of ints") from None


def _check_range(f: dataclasses.Field, value: Any) -> None:
    meta, var = f.metadata, f.name.upper()
    if meta["choices"] and value not in meta["choices"]:
        raise HyperparameterError(f"{var}={value!r}: expected one of {', '.join(map(str, meta['choices']))}")
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
    except ValueError:
        raise HyperparameterError(f"{var}={raw!r}: expected {kind.__name__}") from None


# Variables set by torchrun or the shell that are not knobs but share our prefixes.
FOREIGN_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_NAME",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID"}
# Names the seeds' scripts used for things that are spelled differently here.
RENAMED_KNOBS = {
    "NUM_LAYERS": "NUM_FLAT_LAYERS", "USE_CRAWLER": "NUM_CRAWLER_LAYERS (0 = no crawler)",
    "LOOP_AWARE_GPTQ": "GPTQ_LOOP_AWARE", "SKIP_GPTQ": "QUANT=rtn", "TORCH_COMPILE": "COMPILE",
    "BIGRAM_VOCAB_SIZE": "NGRAM_HASH=bigram with NGRAM_BUCKETS", "TRIGRAM_VOCAB_SIZE": "NGRAM_HASH=trigram with NGRAM_BUCKETS",
    "BIGRAM_DIM": "NGRAM_DIM", "TRIGRAM_DIM": "NGRAM_DIM",
    "TTT_BURST_ENABLED": "REPLAY_BATCHES (> 0 turns replay on: it replays training data, it is not test-time training)",
    "TTT_BURST_STEPS": "REPLAY_BATCHES", "TTT_BURST_EPOCHS": "REPLAY_EPOCHS", "TTT_BURST_LR_FACTOR": "REPLAY_LR_SCALE",
    "DISTILL_TEMP": "DISTILL_TEMPERATURE", "CRAWLER_QUANT": "CRAWLER_QUANT_INT8",
    "HELIX_CROSS_ATTN": "HELIX_MODE=cross_attn", "CRAWLER_CHOKE_DIM": "CHOKE_DIM (with CRAWLER_MLP)",
}
# Prefixes too generic to claim: an unrelated variable may start with them.
_GENERIC_PREFIXES = {"RUN", "DATA", "LOG", "MODEL", "MAX", "VAL", "TRAIN", "SEED", "COMPILE", "ITERATIONS",
                     "SIZE", "RECORDS", "ARTIFACT", "SUBMIT", "EMBED", "BYTE", "COMPRESS", "COMPRESSOR", "QUANT"}


def knob_names() -> list[str]:
    return sorted(f.name.upper() for f in fields(Hyperparameters))


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def reject_unknown_knobs(env: Mapping[str, str]) -> None:
    """A variable that looks like one of ours but is not one is an error, not a silent no-op."""
    known = set(knob_names())
    prefixes = {n.split("_")[0] for n in known if "_" in n} - _GENERIC_PREFIXES
    for var in sorted(env):
        if var in known or var in FOREIGN_VARS:
            continue
        if var in RENAMED_KNOBS:
            raise HyperparameterError(f"{var} is a name from the seeds' scripts; here it is {RENAMED_KNOBS[var]}")
        typo = len(var) >= 6 and min(edit_distance(var, k) for k in known) <= 2
        if typo or ("_" in var and var.split("_")[0] in prefixes):
            close = difflib.get_close_matches(var, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else "; see the README's knob table"
            raise HyperparameterError(f"{var} is not a knob of train_gpt.py{hint}")


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
            raise HyperparameterError("RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun)") from None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def renamed_table_markdown() -> str:
    rows = ["| the seeds' scripts | here |", "| --- | --- |"]
    rows += [f"| `{old}` | `{new}` |" for old, new in sorted(RENAMED_KNOBS.items())]
    return "\n".join(rows)


def knob_table_markdown() -> str:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for f in sorted(fields(Hyperparameters), key=lambda f: f.name):
        choices = f" ({' / '.join(map(str, f.metadata['choices']))})" if f.metadata["choices"] else ""
        rows.append(f"| `{f.name.upper()}` | `{f.default}` | {f.metadata['doc']}{choices} |")
    return "\n".join(rows)


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

    def phase(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t0
        return _Phase()

    def summary(self) -> str:
        return " ".join(f"time_{k}:{v:.1f}s" for k, v in self.seconds.items())


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_startup(log: Logger, hp: Hyperparameters, dinfo: DistInfo, device: torch.device) -> None:
    log(f"crawler-golf train_gpt.py commit:{git_commit()} bytes_code:{len(code_bytes())}")
    log(f"python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__} "
        f"device:{device_name(device)} world_size:{dinfo.world_size}")
    for f in sorted(fields(hp), key=lambda f: f.name):
        log(f"hp {f.name.upper()}={getattr(hp, f.name)}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return f"cpu_{platform.machine()}_{os.cpu_count()}cores"


@functools.lru_cache(maxsize=1)
def code_bytes() -> bytes:
    """The script as it was when first asked (start-up), even if the file changes during the run."""
    return Path(__file__).read_bytes()


# ============================================================================
# Data
# ============================================================================

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256


def load_data_shard(path: str | Path) -> Tensor:
    """Read one challenge shard: 256 int32 header, then uint16 tokens."""
    num_tokens = shard_num_tokens(path)
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=SHARD_HEADER_INTS * 4)
    return torch.from_numpy(tokens.astype(np.uint16))


def shard_num_tokens(path: str | Path) -> int:
    """Validate a shard's header and size without reading its tokens."""
    path = Path(path)
    fix = "rebuild it (python data/prepare_local.py --force, or re-download with data/cached_challenge_fineweb.py)"
    size = path.stat().st_size
    if size < SHARD_HEADER_INTS * 4:
        raise ValueError(f"{path}: {size} bytes is shorter than the {SHARD_HEADER_INTS * 4}-byte header; {fix}")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a token shard; {fix}")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported version {header[1]} (expected {SHARD_VERSION}); {fix}")
    num_tokens = int(header[2])
    if size != SHARD_HEADER_INTS * 4 + 2 * num_tokens:
        raise ValueError(f"{path}: size {size} != header + 2*{num_tokens} tokens "
                         f"({SHARD_HEADER_INTS * 4 + 2 * num_tokens}); truncated or corrupt; {fix}")
    return num_tokens


def shard_files(data_path: str, pattern: str, var: str) -> list[Path]:
    files = sorted(Path(p) for p in glob.glob(str(Path(data_path) / pattern)))
    if not files:
        raise FileNotFoundError(f"{var}: no shards match {Path(data_path) / pattern}; fetch them with "
                                "bash setup_pod.sh (FineWeb) or python data/prepare_local.py (bundled corpus)")
    return files


def load_tokens(files: list[Path]) -> Tensor:
    return torch.cat([load_data_shard(f) for f in files])


class TokenStream:
    """Reads shards in order, wrapping around; its position is two ints so a run can resume."""

    def __init__(self, files: list[Path]):
        self.files, self.file_idx, self.pos = files, 0, 0
        self.tokens = load_data_shard(files[0])

    def position(self) -> tuple[int, int]:
        return self.file_idx, self.pos

    def seek(self, file_idx: int, pos: int) -> None:
        if file_idx != self.file_idx:
            self.tokens = load_data_shard(self.files[file_idx])
        self.file_idx, self.pos = file_idx, pos

    def take(self, n: int) -> Tensor:
        parts = []
        while n > 0:
            if self.pos >= self.tokens.numel():
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = load_data_shard(self.files[self.file_idx]), 0
            chunk = self.tokens[self.pos:self.pos + n]
            parts.append(chunk)
            self.pos += chunk.numel()
            n -= chunk.numel()
        return torch.cat(parts)


class DistributedTokenLoader:
    """Each call takes one micro-batch for every rank from the shared stream, so the tokens a
    step sees depend only on ACCUM_SPLITS, never on how many processes share it."""

    def __init__(self, files: list[Path], dinfo: DistInfo, device: torch.device):
        self.stream, self.dinfo, self.device = TokenStream(files), dinfo, device

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
    """Weights stay fp32 for the optimizer; the matmul runs in the activation dtype.
    qat_bits > 0 puts the weight on its export grid in the forward pass (late QAT)."""

    def __init__(self, fan_in: int, fan_out: int, zero_init: bool = False):
        super().__init__(fan_in, fan_out, bias=False)
        self.qat_bits, self.qat_noise = 0, False
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        w = fake_quant(self.weight, self.qat_bits, self.qat_noise) if self.qat_bits else self.weight
        return F.linear(x, w.to(x.dtype))


def fake_quant(w: Tensor, bits: int, noise: bool) -> Tensor:
    """The export's per-row absmax grid (same fp16 scales). Rounding passes gradients straight
    through; noise mode adds uniform noise of one quantization step instead (differentiable)."""
    qmax = 2 ** (bits - 1) - 1
    scale = _row_scales(w.detach().float(), None, qmax).float()[:, None]
    if noise:
        return w + (torch.rand_like(w) - 0.5) * scale
    return w + (torch.round(w.detach() / scale).clamp(-qmax, qmax) * scale - w).detach()


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


def _load_fa3():
    try:
        import flash_attn_interface  # noqa: PLC0415 - optional, Hopper only
        return flash_attn_interface.flash_attn_func
    except ImportError:
        return None


def select_attention_backend(device: torch.device) -> str:
    """FlashAttention 3 on a Hopper GPU when importable, else PyTorch SDPA."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9 and _load_fa3() is not None:
        return "fa3"
    return "sdpa"


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    """q [B,T,H,D], k/v [B,T,Hkv,D] -> [B,T,H,D]; GQA without repeating k/v."""
    if backend == "fa3":
        out = _load_fa3()(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
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
        if ve_dim:
            self.ve_proj = CastedLinear(ve_dim, kv_heads * self.head_dim, zero_init=True)
            self.ve_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], xsa: bool, ve: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = rms_norm(self.q(x).view(B, T, self.heads, self.head_dim))
        k = rms_norm(self.k(x).view(B, T, self.kv_heads, self.head_dim))
        v = self.v(x)
        if ve is not None and hasattr(self, "ve_proj"):
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


def _load_fla_delta_rule():
    try:
        from fla.ops.delta_rule import chunk_delta_rule  # noqa: PLC0415 - optional, GPU only
        return chunk_delta_rule
    except ImportError:
        return None


def select_delta_backend(device: torch.device) -> str:
    """fla's Triton chunk_delta_rule on a GPU when importable, else the PyTorch chunked reference."""
    return "fla" if device.type == "cuda" and _load_fla_delta_rule() is not None else "torch"


def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, chunk: int = 64) -> Tensor:
    """The delta rule S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = S_t^T q_t, computed a chunk at a
    time (the WY form: inside a chunk the pseudo-values U solve (I + tril(beta K K^T, -1)) U = beta (V - K S)).
    q, k, v [B,T,H,D] (q pre-scaled, q and k unit-norm), beta [B,T,H]. Zero padding at the end is inert
    (beta = 0 there), and every output depends on positions <= t only."""
    B, T, H, D = q.shape
    pad = (-T) % chunk
    q, k, v = (F.pad(t.float(), (0, 0, 0, 0, 0, pad)).transpose(1, 2) for t in (q, k, v))
    beta = F.pad(beta.float(), (0, 0, 0, pad)).transpose(1, 2)
    n = (T + pad) // chunk
    q, k, v = (t.reshape(B, H, n, chunk, D) for t in (q, k, v))
    beta = beta.reshape(B, H, n, chunk, 1)
    eye = torch.eye(chunk, device=q.device)
    lower = eye + (beta * k @ k.transpose(-1, -2)).tril(-1)
    w = torch.linalg.solve_triangular(lower, beta * k, upper=False, unitriangular=True)
    u = torch.linalg.solve_triangular(lower, beta * v, upper=False, unitriangular=True)
    qk = (q @ k.transpose(-1, -2)).tril()
    state, out = q.new_zeros(B, H, D, D), []
    for i in range(n):
        pseudo_v = u[:, :, i] - w[:, :, i] @ state
        out.append(q[:, :, i] @ state + qk[:, :, i] @ pseudo_v)
        state = state + k[:, :, i].transpose(-1, -2) @ pseudo_v
    return torch.stack(out, 2).reshape(B, H, n * chunk, D)[:, :, :T].transpose(1, 2)


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, backend: str) -> Tensor:
    if backend == "fla":
        out = _load_fla_delta_rule()(q.bfloat16(), k.bfloat16(), v.bfloat16(), beta.bfloat16(), scale=1.0)
        return out[0].to(v.dtype)
    return delta_rule_chunked(q, k, v, beta).to(v.dtype)


class DeltaNet(nn.Module):
    """Canonical DeltaNet mixer (Yang et al. 2024): SiLU + L2-normed q/k, sigmoid write strength beta,
    per-head output RMSNorm, zero-init output projection (no short convolution)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = CastedLinear(dim, dim), CastedLinear(dim, dim), CastedLinear(dim, dim)
        self.beta = CastedLinear(dim, heads)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.backend = "torch"

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        shape = (B, T, self.heads, self.head_dim)
        q = F.normalize(F.silu(self.q(x)).view(shape).float(), dim=-1) * self.head_dim ** -0.5
        k = F.normalize(F.silu(self.k(x)).view(shape).float(), dim=-1)
        o = delta_rule(q, k, self.v(x).view(shape), torch.sigmoid(self.beta(x).float()), self.backend)
        return self.proj(rms_norm(o).reshape(B, T, -1))


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
        if self.shape == "choke_flat" or self.shape == "grouped":
            del self.down                       # the per-loop bottleneck is the only way out
        elif self.shape == "pyramid":
            nn.init.normal_(self.down.weight, std=hidden ** -0.5)   # two zero factors in a row would never train
        choke_in = dim if self.shape.startswith("pyramid") else hidden
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
        if self.shape in ("choke_flat", "grouped"):
            return self.choke(h, loop)
        if self.shape == "residual":
            return self.down(h) + self.choke(h, loop)
        s = self.down(h)
        return self.choke(s, loop) + (s if self.shape == "pyramid_res" else 0)


class Block(nn.Module):
    def __init__(self, hp: Hyperparameters, make_mlp: Callable[[], nn.Module], ve_dim: int = 0, delta_heads: int = 0):
        super().__init__()
        self.attn = Attention(hp.model_dim, hp.num_heads, hp.num_kv_heads, hp.qk_gain_init, ve_dim)
        if delta_heads:
            self.delta = DeltaNet(hp.model_dim, delta_heads)
        self.mlp = make_mlp()
        self.attn_scale = nn.Parameter(torch.ones(hp.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(hp.model_dim))
        # resid_mix[0] weighs the running stream, resid_mix[1] the embedding x0.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(hp.model_dim), torch.zeros(hp.model_dim))))

    def forward(self, x: Tensor, x0: Tensor, rope: tuple[Tensor, Tensor], ln_scale: float, xsa: bool = False,
                ve: Tensor | None = None, loop: int = 0) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * ln_scale, rope, xsa, ve)
        if hasattr(self, "delta"):
            x = x + self.delta(rms_norm(x) * ln_scale)
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
        if mode == "cross_attn":
            self.query, self.key = CastedLinear(dim, width), CastedLinear(dim, width)
        self.write = CastedLinear(width, dim, zero_init=True)
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        src = rms_norm(source)
        v = self.read(src)
        if hasattr(self, "query"):
            q, k = self.query(rms_norm(target)), self.key(src)
            v = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0]
        gate = torch.sigmoid((src * self.gate.to(src.dtype)).sum(-1, keepdim=True))
        return gate * self.write(v)


def orthonormal_rows(n: int, dim: int, seed: int) -> Tensor:
    """n orthonormal vectors of length dim from the QR of a seeded Gaussian matrix."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, max(n, 1), generator=gen))
    return q[:, :n].T.contiguous()


class CrawlerGPT(nn.Module):
    """Embedding -> flat encoder half -> [crawler] -> flat decoder half -> [crawler] -> tied head."""

    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.hp = hp
        self.tok_emb = nn.Embedding(hp.vocab_size, hp.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=hp.tied_embed_init_std)
        ve, dim = hp.ve_block_ids(), hp.model_dim
        flat_mlp = lambda: MLP(dim, hp.mlp_mult, hp.mlp_act, hp.mlp_leaky_slope)  # noqa: E731
        self.flat = nn.ModuleList(Block(hp, flat_mlp, hp.ve_dim if i in ve else 0) for i in range(hp.num_flat_layers))
        self.crawler = nn.ModuleList(Block(hp, lambda: self.crawler_mlp(hp), hp.ve_dim if hp.num_flat_layers + i in ve else 0,
                                           hp.delta_net_heads)
                                     for i in range(hp.num_crawler_layers))
        if ve:
            self.ve_table = nn.Parameter(torch.randn(hp.vocab_size, hp.ve_dim) * 0.02)
        if hp.ngram_hash != "none":
            self.ngram = NGramHash(2 if hp.ngram_hash == "bigram" else 3, hp.ngram_buckets, hp.ngram_dim,
                                   hp.model_dim, hp.vocab_size)
        if hp.smear_gate:
            self.smear = SmearGate(hp.model_dim)
        self.num_enc = hp.num_flat_layers // 2
        self.num_skips = min(self.num_enc, hp.num_flat_layers - self.num_enc)
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, hp.model_dim))
        self.rotary = Rotary(hp.model_dim // hp.num_heads, hp.rope_dims, hp.rope_base)
        if self.crawler:
            self.loop_embed = nn.Parameter(orthonormal_rows(hp.crawler_loops, hp.model_dim, hp.seed) * hp.loop_embed_scale)
        if self.crawler and hp.inst_dim:
            # Flow instructions: a shared read-out, one zero-init write-back per loop.
            self.inst_down = CastedLinear(hp.model_dim, hp.inst_dim)
            nn.init.normal_(self.inst_down.weight, std=0.01)
            self.inst_up = nn.ModuleList(CastedLinear(hp.inst_dim, hp.model_dim, zero_init=True)
                                         for _ in range(hp.crawler_loops))
        self.build_arms(hp)
        depth, n_xsa = hp.effective_depth, hp.effective_depth if hp.xsa_last_n < 0 else hp.xsa_last_n
        self.depth_scales = [1.0 / math.sqrt(i + 1) if hp.ln_scale else 1.0 for i in range(depth)]
        self.xsa_at = [i >= depth - n_xsa for i in range(depth)]
        self.tap_ids = set(hp.tap_layer_ids())
        self.loop_rope_scales = hp.loop_rope_scales()

    @staticmethod
    def crawler_mlp(hp: Hyperparameters) -> MLP:
        if hp.crawler_mlp == "standard":
            return MLP(hp.model_dim, hp.crawler_mlp_mult, hp.mlp_act, hp.crawler_mlp_leaky_slope)
        return ChokeMLP(hp.model_dim, hp)

    def build_arms(self, hp: Hyperparameters) -> None:
        """The research arms' own parameters. All are crawler-side (named crawler_*), so the
        loop-aware GPTQ quantizes them in its second phase; write-backs start at zero."""
        dim = hp.model_dim
        if hp.helix:
            self.crawler_bridge_out = HelixBridge(dim, hp.helix_dim, hp.helix_mode)   # crawler -> flat stream
            self.crawler_bridge_in = HelixBridge(dim, hp.helix_dim, hp.helix_mode)    # flat -> crawler stream
        if hp.loop_smear:
            self.crawler_smear = nn.Parameter(torch.zeros(dim))
        if hp.tap_dim:
            self.crawler_tap_down = nn.ModuleList(CastedLinear(dim, hp.tap_dim) for _ in hp.tap_layer_ids())
            self.crawler_tap_up = nn.ModuleList(CastedLinear(hp.tap_dim, dim, zero_init=True)
                                                for _ in range(hp.crawler_loops if hp.tap_per_loop else 1))
        if hp.deliberation:
            self.crawler_consensus = nn.Parameter(torch.zeros(dim))    # the persistent reference
            self.crawler_delib_gate = nn.Parameter(torch.zeros(dim))   # how much a firing moves the consensus
            self.crawler_delib_pull = nn.Parameter(torch.zeros(dim))   # how much the consensus moves a firing

    def set_backends(self, attention: str, delta: str = "torch") -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = attention
            elif isinstance(m, DeltaNet):
                m.backend = delta

    def run_block(self, block: Block, x: Tensor, ctx: dict, depth: int, loop: int = 0, rope: tuple | None = None) -> Tensor:
        return block(x, ctx["x0"], rope or ctx["rope"], self.depth_scales[depth], self.xsa_at[depth], ctx["ve"], loop)

    def crawl(self, x: Tensor, ctx: dict, depth: int, loops: int) -> tuple[Tensor, int]:
        if self.hp.tap_dim:   # read once: every loop sees the encoder as it was, not as the loops drift
            ctx["tap"] = sum(down(rms_norm(h)) for down, h in zip(self.crawler_tap_down, ctx["tapped"]))
        for loop in range(loops):
            x, depth = self.crawl_step(x, ctx, depth, loop)
        return x, depth

    def crawl_step(self, x: Tensor, ctx: dict, depth: int, loop: int) -> tuple[Tensor, int]:
        """One firing of the shared crawler blocks, with every per-loop arm. Sequential loops and
        Helix firings both come through here."""
        hp, anchor = self.hp, x
        x = x + self.loop_embed[loop].to(x.dtype)
        if hp.inst_dim:
            x = x + self.inst_up[loop](self.inst_down(anchor))
        if hp.tap_dim:
            x = x + self.crawler_tap_up[loop if hp.tap_per_loop else 0](ctx["tap"]).to(x.dtype)
        rope = ctx["loop_rope"][loop] if "loop_rope" in ctx else ctx["rope"]
        for block in self.crawler:
            x = self.run_block(block, x, ctx, depth, loop, rope)
            depth += 1
        if hp.loop_dt < 1.0:   # contractive: a step of size dt towards F(x) instead of a jump
            x = (1 - hp.loop_dt) * anchor + hp.loop_dt * x
        if hp.loop_smear:
            x = x + self.crawler_smear.to(x.dtype) * (anchor - x)
        if hp.deliberation:
            x = self.deliberate(x, ctx)
        return x, depth

    def deliberate(self, x: Tensor, ctx: dict) -> Tensor:
        """The consensus starts as a learned Parameter and absorbs each firing by a content gate; each
        firing's output is pulled towards it. Nothing is detached: the loss reaches the consensus
        through every later firing, and the consensus reaches every firing's blocks."""
        ref = ctx.get("consensus", self.crawler_consensus.to(x.dtype))
        gate = torch.sigmoid((rms_norm(x) * self.crawler_delib_gate.to(x.dtype)).sum(-1, keepdim=True))
        ref = ref + gate * (x - ref)
        ctx["consensus"] = ref
        return x + self.crawler_delib_pull.to(x.dtype) * (ref - x)

    def helix_fire(self, flat_idx: int, x: Tensor, ctx: dict, depth: int) -> tuple[Tensor, int]:
        """After every HELIX_STRIDE-th flat layer the crawler fires once on its own stream (which starts
        at the embedding); then each stream reads the other through a gated bridge."""
        firing, rest = divmod(flat_idx + 1, self.hp.helix_stride)
        if rest:
            return x, depth
        stream, depth = self.crawl_step(ctx["helix"], ctx, depth, (firing - 1) % self.hp.crawler_loops)
        ctx["helix"] = stream + self.crawler_bridge_in(x, stream)
        return x + self.crawler_bridge_out(stream, x), depth

    def after_flat(self, i: int, x: Tensor, ctx: dict, depth: int) -> tuple[Tensor, int]:
        if i in self.tap_ids:
            ctx["tapped"].append(x)
        if self.hp.helix:
            x, depth = self.helix_fire(i, x, ctx, depth)
        return x, depth

    def embed(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids)
        if self.hp.ngram_hash != "none":
            x = x + self.ngram(ids).to(x.dtype)
        if self.hp.smear_gate:
            x = self.smear(x, ids)
        return rms_norm(x)

    def hidden(self, ids: Tensor, loops: int | None = None) -> Tensor:
        """loops < CRAWLER_LOOPS runs a shortened crawler (the cadence's single-loop steps)."""
        loops = self.hp.crawler_loops if loops is None else loops
        x = self.embed(ids)
        ve = F.embedding(ids, self.ve_table) if hasattr(self, "ve_table") else None  # deterministic backward
        ctx = {"x0": x, "rope": self.rotary(ids.size(1), ids.device), "ve": ve, "tapped": [], "helix": x}
        if self.loop_rope_scales:
            ctx["loop_rope"] = [self.rotary(ids.size(1), ids.device, s) for s in self.loop_rope_scales]
        skips, depth = [], 0
        for i in range(self.num_enc):
            x = self.run_block(self.flat[i], x, ctx, depth)
            skips.append(x)
            depth += 1
            x, depth = self.after_flat(i, x, ctx, depth)
        if self.crawler and self.hp.crawler_position == "bottleneck":
            x, depth = self.crawl(x, ctx, depth, loops)
        for j, block in enumerate(self.flat[self.num_enc:]):
            if j < self.num_skips:
                x = x + self.skip_weights[j].to(x.dtype) * skips.pop()
            x = self.run_block(block, x, ctx, depth)
            depth += 1
            x, depth = self.after_flat(self.num_enc + j, x, ctx, depth)
        if self.crawler and self.hp.crawler_position == "end":
            x, depth = self.crawl(x, ctx, depth, loops)
        return rms_norm(x)

    def logits(self, ids: Tensor, loops: int | None = None) -> Tensor:
        logits = F.linear(self.hidden(ids, loops), self.tok_emb.weight).float()
        cap = self.hp.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def token_nll(self, ids: Tensor, targets: Tensor, loops: int | None = None) -> Tensor:
        logits = self.logits(ids, loops)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)

    def forward(self, ids: Tensor, targets: Tensor, per_token: bool = False, loops: int | None = None,
                teacher_logits: Tensor | None = None) -> Tensor:
        """Mean loss (per-token NLL with per_token). With teacher_logits: the self-distillation loss
        alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * NLL. One entry point,
        so a compiled or DDP-wrapped model serves training, evaluation and distillation."""
        if teacher_logits is None:
            nll = self.token_nll(ids, targets, loops)
            return nll if per_token else nll.mean()
        logits, temp, alpha = self.logits(ids), self.hp.distill_temperature, self.hp.distill_alpha
        nll = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        kl = F.kl_div(F.log_softmax(logits / temp, -1), F.log_softmax(teacher_logits.float() / temp, -1),
                      log_target=True, reduction="none").sum(-1).mean()
        return alpha * temp * temp * kl + (1 - alpha) * nll

    def set_qat(self, bits_flat: int, bits_crawler: int, crawler_noise: bool) -> None:
        for name, m in self.named_modules():
            if isinstance(m, CastedLinear):
                on_crawler = name.startswith(CRAWLER_PREFIXES)
                m.qat_bits = bits_crawler if on_crawler else bits_flat
                m.qat_noise = crawler_noise and on_crawler


def count_unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() visits a shared tensor once


ARM_PARAMS = {".delta.": "delta_net", ".mlp.loop_": "crawler_mlp", "crawler_bridge": "helix", "crawler_smear": "loop_smear",
              "crawler_tap": "taps", "crawler_consensus": "deliberation", "crawler_delib": "deliberation"}


def arm_param_counts(model: nn.Module) -> dict[str, int]:
    """Parameters each active research arm adds (choke MLPs: their per-loop bottlenecks)."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        for pattern, arm in ARM_PARAMS.items():
            if pattern in name:
                counts[arm] = counts.get(arm, 0) + p.numel()
    return counts


# ============================================================================
# Optimizers
# ============================================================================

NS5_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(grad: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise a matrix (all singular values pushed near 1)."""
    a, b, c = NS5_COEFFS
    x = grad.bfloat16() if grad.is_cuda else grad.float()
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
                 rank: int = 0, world_size: int = 1):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay, nesterov=True))
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device,
                               dtype=torch.bfloat16 if params[0].is_cuda else torch.float32)
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
        buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
        buf.mul_(group["momentum"]).add_(p.grad)
        g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        g = newton_schulz5(g, group["backend_steps"])
        return g * max(1.0, p.size(0) / p.size(1)) ** 0.5


EMBED_TABLES = ("tok_emb.weight", "ngram.table", "ve_table")
ADAM_MATRICES = ("loop_embed", "skip_weights", "resid_mix")   # 2-D, but per-channel gains, not maps


def route_params(model: CrawlerGPT) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Weight matrices -> Muon; embedding tables -> their own Adam; gains and vectors -> scalar Adam."""
    groups: dict[str, list] = {"muon": [], "embed": [], "scalar": []}
    for name, p in model.named_parameters():
        if name in EMBED_TABLES:
            groups["embed"].append((name, p))
        elif p.ndim == 2 and not name.endswith(ADAM_MATRICES):
            groups["muon"].append((name, p))
        else:
            groups["scalar"].append((name, p))
    routed = [id(p) for g in groups.values() for _, p in g]
    assert len(routed) == len(set(routed)) == len(list(model.parameters())), "every parameter in exactly one group"
    return groups


def build_optimizers(model: CrawlerGPT, hp: Hyperparameters, dinfo: DistInfo) -> list[torch.optim.Optimizer]:
    groups = route_params(model)
    adam = dict(betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, weight_decay=hp.adam_wd, fused=False)
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW([p for _, p in groups["embed"]], lr=hp.tied_embed_lr, **adam),
        torch.optim.AdamW([p for _, p in groups["scalar"]], lr=hp.scalar_lr, **adam),
    ]
    if groups["muon"]:
        opts.append(Muon([p for _, p in groups["muon"]], hp.matrix_lr, hp.muon_momentum, hp.muon_backend_steps,
                         hp.muon_wd, dinfo.rank, dinfo.world_size))
    for opt in opts:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return opts


# ============================================================================
# Export (quantize, pack)
# ============================================================================

# Quantization (RTN / GPTQ), int6 bit-packing and a pickle-free compressed artifact.

ARTIFACT_MAGIC = b"CGLF"
ARTIFACT_VERSION = 1
COMPRESSOR_IDS = {"zstd": 1, "brotli": 2, "lzma": 3}
FLOAT_KINDS = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
QUANT_KINDS = {"int6": 6, "int8": 8}
# "std" clip k, measured on int6 RTN of 512x1024 rows: on Gaussian rows the best k (3.5) beats
# absmax by only 2% MSE; on heavy-tailed rows (Student-t5/t3) every k in 2.5..12.85 is worse
# than absmax (1.02x-14x MSE), and a smaller clip also costs bytes (finer steps, more levels).
# So the default only trims rows with >12.85-sigma outliers; "search" is the MSE-optimal mode.
DEFAULT_STD_K = 12.85


class ArtifactError(ValueError):
    """Malformed, truncated or tampered artifact."""


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


def row_clip(w: Tensor, bits: int, mode: str, std_k: float = DEFAULT_STD_K) -> Tensor:
    """Per-row clip values for quantize_rows / gptq_quantize: "absmax" | "std" | "search"."""
    w = _as_2d_float(w)
    absmax = _absmax(w)
    if mode == "absmax":
        return absmax
    if mode == "std":
        clip = torch.minimum(std_k * w.std(dim=1, correction=0), absmax)
        return torch.where(clip > 0, clip, absmax)  # constant rows have std 0
    if mode != "search":
        raise ValueError(f"unknown clip mode {mode!r}")
    best, best_err = absmax, torch.full_like(absmax, math.inf)
    for frac in torch.linspace(1.0, 0.5, 11).tolist():  # descending: ties keep the larger clip
        clip = absmax * frac
        q, s = quantize_rows(w, bits, clip)
        err = (dequantize_rows(q, s) - w).square().sum(dim=1)
        better = err < best_err
        best, best_err = torch.where(better, clip, best), torch.where(better, err, best_err)
    return best


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


def pack_int6(q: Tensor) -> bytes:
    """Bit-pack values in [-32, 31], 4 values -> 3 bytes (zero-padded to a multiple of 4)."""
    if q.is_floating_point() or q.is_complex():
        raise ValueError(f"pack_int6 needs an integer tensor, got {q.dtype}")
    v = q.detach().cpu().reshape(-1).to(torch.int64).numpy()
    if v.size and (v.min() < -32 or v.max() > 31):
        raise ValueError(f"int6 value out of range [-32, 31]: min {v.min()}, max {v.max()}")
    u = np.zeros(-(-v.size // 4) * 4, dtype=np.uint32)
    u[: v.size] = v + 32
    u = u.reshape(-1, 4)
    x = u[:, 0] | (u[:, 1] << 6) | (u[:, 2] << 12) | (u[:, 3] << 18)
    return np.stack([x & 255, (x >> 8) & 255, x >> 16], axis=1).astype(np.uint8).tobytes()


def unpack_int6(data: bytes, numel: int) -> Tensor:
    if numel < 0 or len(data) != -(-numel // 4) * 3:
        raise ValueError(f"int6 data of {len(data)} bytes does not hold {numel} values")
    b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.uint32)
    x = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    u = np.stack([x & 63, (x >> 6) & 63, (x >> 12) & 63, x >> 18], axis=1).reshape(-1)[:numel]
    return torch.from_numpy((u.astype(np.int16) - 32).astype(np.int8))


def compress_bytes(data: bytes, compressor: str, level: int | None = None) -> bytes:
    """level: zstd 1..22 (default 22), brotli quality 0..11 (11), lzma preset 0..9 (9, +EXTREME)."""
    if compressor == "zstd":
        import zstandard  # optional dependency: imported only when chosen
        # checksum: a corrupted artifact fails loudly instead of loading altered weights
        zc = zstandard.ZstdCompressor(level=22 if level is None else level, write_checksum=True)
        return zc.compress(data)
    if compressor == "brotli":
        import brotli
        return brotli.compress(data, quality=11 if level is None else level)
    if compressor == "lzma":
        return lzma.compress(data, preset=(9 if level is None else level) | lzma.PRESET_EXTREME)
    raise ValueError(f"unknown compressor {compressor!r}")


def decompress_bytes(data: bytes, compressor: str) -> bytes:
    """Strict inverse of compress_bytes: truncated streams and trailing bytes raise ValueError
    (zstd and lzma would silently accept both)."""
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


def _tensor_bytes(t: Tensor, shuffle: bool) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    raw, es = t.view(torch.uint8).numpy(), t.element_size()
    # byte shuffle: exponent/high bytes cluster together, which LZ/entropy coders exploit
    return (raw.reshape(-1, es).T if shuffle and es > 1 else raw).tobytes()


def _bytes_tensor(raw: bytes, dtype: torch.dtype, shape: list[int], shuffle: bool) -> Tensor:
    es = torch.empty((), dtype=dtype).element_size()
    a = np.frombuffer(raw, dtype=np.uint8)
    if a.size == 0:  # torch refuses dtype views of empty, stride-0 buffers
        return torch.empty(shape, dtype=dtype)
    a = np.array(a.reshape(es, -1).T if shuffle and es > 1 else a, order="C")
    return torch.from_numpy(a).view(dtype).reshape(shape)


def _in_range(q: Tensor, kind: str) -> bool:
    lo = -(2 ** (QUANT_KINDS[kind] - 1))
    return q.numel() == 0 or (lo <= q.min().item() and q.max().item() <= -lo - 1)


def _entry_parts(name: str, e: dict, int6_bitpack: bool, shuffle: bool) -> dict[str, bytes]:
    kind, shape = e.get("kind"), e.get("shape")
    if not (isinstance(shape, (list, tuple)) and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"{name}: bad shape {shape!r}")
    numel = math.prod(shape)
    if kind in FLOAT_KINDS:
        d = e["data"]
        if d.dtype != FLOAT_KINDS[kind] or d.numel() != numel:
            raise ValueError(f"{name}: data {d.dtype}{tuple(d.shape)} does not match {kind}{shape}")
        return {"data": _tensor_bytes(d, shuffle)}
    if kind not in QUANT_KINDS:
        raise ValueError(f"{name}: unknown kind {kind!r}")
    q, scale = e["q"], e["scale"]
    if not shape or q.dtype != torch.int8 or q.numel() != numel or not _in_range(q, kind):
        raise ValueError(f"{name}: q must be int8 with {numel} values in the {kind} range")
    if scale.dtype != torch.float16 or tuple(scale.shape) != (shape[0],):
        raise ValueError(f"{name}: scale must be fp16 [{shape[0]}]")
    qb = pack_int6(q) if kind == "int6" and int6_bitpack else _tensor_bytes(q, False)
    return {"q": qb, "scale": _tensor_bytes(scale, shuffle)}


def pack_artifact(entries: dict[str, dict], meta: dict, compressor: str, level: int | None = None,
                  byte_shuffle: bool = True, int6_bitpack: bool = False) -> bytes:
    """Serialize quantized tensors into MAGIC | version u8 | compressor u8 | compressed payload.

    Entry layout: {"kind": "int6"|"int8", "shape": [rows, ...], "q": int8 tensor of `shape`,
    "scale": fp16 [rows]} or {"kind": "fp16"|"fp32"|"bf16", "shape": [...], "data": tensor of
    that dtype}. Payload: u32 LE header length | JSON {meta, byte_shuffle, int6_bitpack,
    tensors: [{name, kind, shape, parts: {part: [offset, length]}}]} | raw LE part bytes.
    int6 q is stored as int8 bytes by default: that compresses ~9% better than bit-packing,
    since byte-aligned symbols suit the byte-oriented entropy coders.
    """
    if compressor not in COMPRESSOR_IDS:
        raise ValueError(f"unknown compressor {compressor!r}")
    parts = {n: _entry_parts(n, e, int6_bitpack, byte_shuffle) for n, e in entries.items()}
    table = [{"name": n, "kind": e["kind"], "shape": list(e["shape"]), "parts": {}}
             for n, e in entries.items()]
    chunks, offset = [], 0
    for key in ("q", "scale", "data"):  # like data together: the coder sees one regime at a time
        for rec in table:
            if (raw := parts[rec["name"]].get(key)) is not None:
                rec["parts"][key] = [offset, len(raw)]
                chunks.append(raw)
                offset += len(raw)
    header = {"meta": meta, "byte_shuffle": bool(byte_shuffle), "int6_bitpack": bool(int6_bitpack),
              "tensors": table}
    try:
        hj = json.dumps(header, separators=(",", ":")).encode()
    except TypeError as exc:
        raise ValueError(f"meta is not JSON-serializable: {exc}") from exc
    payload = struct.pack("<I", len(hj)) + hj + b"".join(chunks)
    prefix = ARTIFACT_MAGIC + bytes([ARTIFACT_VERSION, COMPRESSOR_IDS[compressor]])
    return prefix + compress_bytes(payload, compressor, level)


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ArtifactError(msg)


def _decode_entry(rec: object, data: bytes, shuffle: bool, bitpack: bool) -> tuple[str, dict]:
    _need(isinstance(rec, dict), "tensor table record is not an object")
    name, kind, shape, parts = (rec.get(k) for k in ("name", "kind", "shape", "parts"))
    _need(isinstance(name, str), f"bad tensor name {name!r}")
    _need(kind in QUANT_KINDS or kind in FLOAT_KINDS, f"{name}: unknown kind {kind!r}")
    _need(isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape),
          f"{name}: bad shape")
    _need(isinstance(parts, dict), f"{name}: bad parts")
    numel = math.prod(shape)

    def part(key: str, expected: int) -> bytes:
        span = parts.get(key)
        _need(isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span),
              f"{name}: bad span for part {key!r}")
        off, length = span
        _need(length == expected, f"{name}.{key}: length {length} != {expected} implied by shape")
        _need(0 <= off and off + length <= len(data), f"{name}.{key}: span outside the payload")
        return data[off: off + length]

    if kind in FLOAT_KINDS:
        dt = FLOAT_KINDS[kind]
        raw = part("data", numel * torch.empty((), dtype=dt).element_size())
        return name, {"kind": kind, "shape": shape, "data": _bytes_tensor(raw, dt, shape, shuffle)}
    _need(len(shape) >= 1, f"{name}: quantized tensor needs at least one dimension")
    if kind == "int6" and bitpack:
        q = unpack_int6(part("q", -(-numel // 4) * 3), numel).reshape(shape)
    else:
        q = _bytes_tensor(part("q", numel), torch.int8, shape, False)
    _need(_in_range(q, kind), f"{name}: value out of {kind} range")
    scale = _bytes_tensor(part("scale", 2 * shape[0]), torch.float16, [shape[0]], shuffle)
    return name, {"kind": kind, "shape": shape, "q": q, "scale": scale}


def unpack_artifact(blob: bytes) -> tuple[dict[str, dict], dict]:
    """Inverse of pack_artifact; data-only (JSON + raw bytes), so loading never executes code."""
    _need(isinstance(blob, (bytes, bytearray, memoryview)), "artifact must be bytes")
    blob = bytes(blob)
    _need(len(blob) >= 6 and blob[:4] == ARTIFACT_MAGIC, "bad magic: not a CGLF artifact")
    _need(blob[4] == ARTIFACT_VERSION, f"unsupported artifact version {blob[4]}")
    names = {v: k for k, v in COMPRESSOR_IDS.items()}
    _need(blob[5] in names, f"unknown compressor id {blob[5]}")
    try:
        payload = decompress_bytes(blob[6:], names[blob[5]])
    except Exception as exc:  # each codec has its own error types; all mean "corrupt"
        raise ArtifactError(f"{names[blob[5]]} decompression failed: {exc}") from exc
    _need(len(payload) >= 4, "payload truncated before header length")
    hlen = struct.unpack_from("<I", payload)[0]
    _need(4 + hlen <= len(payload), "header length points past the payload")
    try:
        header = json.loads(payload[4: 4 + hlen].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"header is not valid JSON: {exc}") from exc
    _need(isinstance(header, dict), "header is not an object")
    meta, shuffle, bitpack, table = (header.get(k) for k in
                                     ("meta", "byte_shuffle", "int6_bitpack", "tensors"))
    _need(isinstance(meta, dict) and isinstance(table, list), "header lacks meta/tensors")
    _need(isinstance(shuffle, bool) and isinstance(bitpack, bool), "header lacks flags")
    data, entries = payload[4 + hlen:], {}
    for rec in table:
        name, entry = _decode_entry(rec, data, shuffle, bitpack)
        _need(name not in entries, f"duplicate tensor name {name!r}")
        entries[name] = entry
    return entries, meta


def _prune_candidates(entries: dict, cost: dict[str, Tensor] | None) -> list[tuple]:
    """Per quantized entry: (name, flat positions of its +-1 values, their global cost ranks), both
    in ascending-cost order, so "zero the k cheapest" is one searchsorted per entry."""
    found = []
    for name, e in entries.items():
        if e.get("kind") not in QUANT_KINDS or e["q"].numel() == 0:
            continue
        q = e["q"].detach().cpu().reshape(e["q"].shape[0], -1)
        r, c = (q.abs() == 1).nonzero(as_tuple=True)
        # zeroing a +-1 adds ~scale^2 squared error, weighted by how much that input is used
        w = e["scale"].detach().cpu().float()[r].square()
        if cost is not None and name in cost:
            w = w * cost[name].detach().cpu().float().reshape(-1)[c]
        found.append((name, r * q.shape[1] + c, w))
    if not found:
        return []
    order = torch.argsort(torch.cat([f[2] for f in found]), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    out, start = [], 0
    for name, pos, _ in found:
        rk, idx = torch.sort(rank[start: start + len(pos)])
        out.append((name, pos[idx], rk))
        start += len(pos)
    return out


def prune_to_fit(entries: dict, meta: dict, compressor: str, level: int | None, byte_shuffle: bool,
                 budget_bytes: int, cost: dict[str, Tensor] | None = None,
                 int6_bitpack: bool = False, margin: float = 0.003) -> tuple[dict, int, bytes]:
    """Zero the k cheapest +-1 quantized values, with k just large enough to fit the budget.

    margin: fraction of the budget the fast size proxy must leave free. Returns (new_entries, k,
    packed blob); input entries are never mutated (changed entries get a new q tensor).
    """
    cands = _prune_candidates(entries, cost)
    total = sum(len(pos) for _, pos, _ in cands)

    def zeroed(k: int) -> dict:
        out = dict(entries)
        for name, pos, rank in cands:
            n = int(torch.searchsorted(rank, k))
            if n:
                q = entries[name]["q"].detach().cpu().reshape(-1).clone()
                q[pos[:n]] = 0
                out[name] = {**entries[name], "q": q.reshape(entries[name]["q"].shape)}
        return out

    def packed(es: dict, fast: bool = False) -> bytes:
        args = ("zstd", 3) if fast else (compressor, level)
        return pack_artifact(es, meta, *args, byte_shuffle=byte_shuffle, int6_bitpack=int6_bitpack)

    def size(es: dict, fast: bool = False) -> int:
        return len(packed(es, fast))

    blob0 = packed(entries)
    real0 = len(blob0)
    if real0 <= budget_bytes:
        return dict(entries), 0, blob0
    # Bisect with a cheap proxy (zstd-3 scaled by the k=0 ratio); only verify with the real codec.
    ratio, lo, hi = real0 / size(entries, fast=True), 0, total
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(zeroed(mid), fast=True) * ratio <= budget_bytes * (1 - margin):
            hi = mid
        else:
            lo = mid
    k, attempt = hi, 0
    while True:
        new = zeroed(k)
        blob = packed(new)
        real = len(blob)
        if real <= budget_bytes:
            return new, k, blob
        if k >= total:
            raise ValueError(f"artifact is {real - budget_bytes} bytes over the budget of "
                             f"{budget_bytes} even with all {total} +-1 values zeroed")
        # The proxy was optimistic: extrapolate bytes saved per value; after 3 misses zero them all.
        step = math.ceil(1.25 * (real - budget_bytes) * k / max(real0 - real, 1))
        k = total if attempt >= 3 else min(total, k + max(1, step))
        attempt += 1

# --- the model's tensors: which kind each is stored as, and the loop-aware quantization order.
CONTROL_PATTERNS = ("q_gain", "attn_scale", "mlp_scale", "resid_mix", "skip_weights", "loop_embed")
CRAWLER_PREFIXES = ("crawler", "inst_")   # crawler.<i>, crawler_<arm>, inst_*


def storage_kind(name: str, tensor: Tensor, hp: Hyperparameters) -> str:
    if name in EMBED_TABLES:
        return hp.embed_quant
    if any(p in name for p in CONTROL_PATTERNS) or tensor.ndim != 2:
        return "fp32" if any(p in name for p in CONTROL_PATTERNS) else "fp16"
    return "int8" if hp.crawler_quant_int8 and name.startswith(CRAWLER_PREFIXES) else "int6"


@torch.no_grad()
def collect_hessians(model: CrawlerGPT, batches: list[Tensor], names: set[str], dinfo: DistInfo) -> dict[str, Tensor]:
    """H = X^T X of each named weight's input over the calibration batches. A shared crawler
    module fires once per loop, so its H is summed over every loop."""
    hessians: dict[str, Tensor] = {}
    modules = dict(model.named_modules())

    def hook(key: str):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, args[0].size(-1)).float()
            hessians[key] = hessians[key] + x.T @ x if key in hessians else x.T @ x
        return accumulate
    handles = [modules[n.rsplit(".", 1)[0]].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for x in batches:
            with autocast(x.device):
                model.hidden(x)
    finally:
        for h in handles:
            h.remove()
    if dinfo.distributed:
        for key in sorted(hessians):
            dist.all_reduce(hessians[key])
    return hessians


def loop_aware(hp: Hyperparameters) -> bool:
    return hp.gptq_loop_aware == "1" or (hp.gptq_loop_aware == "auto" and hp.num_crawler_layers > 0)


@torch.no_grad()
def quantize_model_(model: CrawlerGPT, hp: Hyperparameters, quant: str, batches: list[Tensor],
                    dinfo: DistInfo) -> tuple[dict, dict]:
    """Quantize `model` IN PLACE (each weight replaced by its dequantized value) and return the
    artifact entries and the per-column Hessian diagonals (the pruning cost).
    Loop-aware GPTQ: phase 1 quantizes the embedding and flat blocks; phase 2 re-collects the
    crawler's Hessians on activations that flow through the already-quantized phase 1."""
    params = dict(model.named_parameters())
    kinds = {n: storage_kind(n, p, hp) for n, p in params.items()}
    quantized = [n for n, k in kinds.items() if k in QUANT_KINDS]
    late = {n for n in quantized if n.startswith(CRAWLER_PREFIXES)} if quant == "gptq" and loop_aware(hp) else set()
    entries, cost = {}, {}
    for phase in (set(quantized) - late, late):
        hessians = collect_hessians(model, batches, {n for n in phase if n not in EMBED_TABLES}, dinfo) \
            if quant == "gptq" and phase else {}
        for name in sorted(phase):
            p, bits = params[name], QUANT_KINDS[kinds[name]]
            clip = row_clip(p, bits, hp.quant_clip)
            if name in hessians:
                q, scale = gptq_quantize(p, hessians[name], bits, clip, hp.gptq_damp, hp.gptq_block_size, hp.gptq_act_order)
                cost[name] = torch.diagonal(hessians[name]).cpu()
            else:
                q, scale = quantize_rows(p, bits, clip)
            entries[name] = {"kind": kinds[name], "shape": list(p.shape), "q": q.cpu(), "scale": scale.cpu()}
            p.copy_(dequantize_rows(q, scale).to(p))
    for name, p in params.items():
        if kinds[name] in FLOAT_KINDS:
            stored = p.detach().to(FLOAT_KINDS[kinds[name]])
            p.copy_(stored.to(p.dtype))          # the model now holds exactly what the artifact holds
            entries[name] = {"kind": kinds[name], "shape": list(p.shape), "data": stored.cpu()}
    return entries, cost


def artifact_meta(hp: Hyperparameters) -> dict:
    return {"format": "crawler-golf", "hp": dataclasses.asdict(hp)}


def compressor_level(hp: Hyperparameters) -> int | None:
    return None if hp.compress_level < 0 else hp.compress_level


def pack_model(entries: dict, cost: dict, hp: Hyperparameters, log: Logger) -> bytes:
    """Pack; over the cap, prune when SIZE_TARGET=prune (else the caller fails loudly)."""
    args = (artifact_meta(hp), hp.compressor, compressor_level(hp), hp.byte_shuffle)
    blob = pack_artifact(entries, *args, int6_bitpack=hp.int6_bitpack)
    budget = hp.size_limit - len(code_bytes())
    if len(blob) > budget and hp.size_target == "prune":
        over = len(blob) - budget
        entries, changed, blob = prune_to_fit(entries, *args, budget, cost, int6_bitpack=hp.int6_bitpack)
        log.kv(prune_values_zeroed=changed, prune_was_over_bytes=over, prune_bytes_model=len(blob))
    return blob


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_artifact(path: str | Path) -> CrawlerGPT:
    """A fresh model from the artifact alone: shape from its header, weights dequantized."""
    entries, meta = unpack_artifact(Path(path).read_bytes())
    if meta.get("format") != "crawler-golf" or not isinstance(meta.get("hp"), dict):
        raise ArtifactError(f"{path}: not a crawler-golf model artifact")
    known = {f.name for f in fields(Hyperparameters)}
    model = CrawlerGPT(Hyperparameters(**{k: v for k, v in meta["hp"].items() if k in known}))
    state = {}
    for name, e in entries.items():
        t = dequantize_rows(e["q"], e["scale"]) if e["kind"] in QUANT_KINDS else e["data"].float()
        state[name] = t.reshape(e["shape"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ArtifactError(f"{path}: tensors do not fit the model in its header: {err}") from None
    return model

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
    """(val_loss in nats/token, val_bpb) over `tokens`, windows split across ranks, float64 sums."""
    seq_len = min(seq_len, tokens.numel() - 1)
    windows = sliding_windows(tokens.numel(), seq_len, stride)
    mine = windows[dinfo.rank::dinfo.world_size]
    batch = max(1, batch_tokens // (seq_len * dinfo.world_size))
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, bytes, tokens
    was_training = model.training
    model.eval()
    for i in range(0, len(mine), batch):
        chunk = mine[i:i + batch]
        idx = torch.stack([tokens[s:s + seq_len + 1] for s, _ in chunk]).to(device=device, dtype=torch.int64)
        x, y = idx[:, :-1], idx[:, 1:]
        with autocast(device):
            nll = model(x, y, per_token=True).double()
        offsets = torch.arange(seq_len, device=device)[None, :]
        keep = offsets >= torch.tensor([first for _, first in chunk], device=device)[:, None]
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
        for k, v in model.state_dict().items():
            if self.ema:
                self.ema[k].lerp_(v.float(), 1 - decay)
            if self.swa and scale < self.hp.swa_start_scale and step % self.hp.swa_every == 0:
                self.swa[k] += v.float()
        if self.swa and scale < self.hp.swa_start_scale and step % self.hp.swa_every == 0:
            self.swa_count += 1

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
        self.step, self.train_s, self.qat_on = 0, 0.0, False

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
        if self.dinfo.distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        loss = total.item() / (len(batches) * self.dinfo.world_size)
        if not math.isfinite(loss):
            saved = str(self.rank_checkpoint) if self.rank_checkpoint.exists() else "none yet"
            raise FloatingPointError(f"non-finite train loss {loss} at step {self.step + 1}; last good checkpoint: "
                                     f"{saved}; nothing was exported. Lower the LRs or GRAD_CLIP_NORM")
        return loss

    def loops_for(self, step: int) -> int:
        cadence = self.hp.crawler_cadence
        return self.hp.crawler_loops if cadence == 1 or step % cadence == 0 else 1

    def set_qat(self, scale: float) -> None:
        """Late QAT switches on once, when the LR scale first drops below the threshold."""
        if self.qat_on or not (self.hp.late_qat_threshold and scale < self.hp.late_qat_threshold):
            return
        self.qat_on = True
        crawler_bits = 8 if self.hp.crawler_quant_int8 else 6
        if self.hp.qat_crawler_only:
            self.model.set_qat(0, crawler_bits, crawler_noise=True)
        else:
            self.model.set_qat(6, crawler_bits, crawler_noise=False)
        self.log.kv(late_qat="on", step=self.step, lr_scale=f"{scale:.3f}", crawler_only=int(self.hp.qat_crawler_only))

    def prime_compile(self) -> None:
        """Run WARMUP_STEPS real steps so compilation happens off the clock, then undo them."""
        if not (self.hp.warmup_steps and self.hp.use_compile(self.device)):
            self.log("warmup:skipped (compile off)")
            return
        model_state = _clone_state(self.model.state_dict())
        opt_states = [_clone_state(opt.state_dict()) for opt in self.optimizers]
        stream_state = self.loader.stream.position()
        t0 = time.perf_counter()
        for s in range(self.hp.warmup_steps):
            self.train_step(self.next_batches(), 1.0, muon_momentum(self.hp, 0), self.loops_for(s))
        self.model.load_state_dict(model_state)
        for opt, state in zip(self.optimizers, opt_states):
            opt.load_state_dict(state)
        self.loader.stream.seek(*stream_state)
        self.log(f"warmup:done steps:{self.hp.warmup_steps} seconds:{time.perf_counter() - t0:.1f}")

    def time_is_up(self, elapsed_s: float) -> bool:
        """All ranks agree, so none waits in a collective the others skipped."""
        if self.hp.train_time_cap <= 0:
            return False
        flag = torch.tensor(float(steps_left(self.hp, self.step, elapsed_s) <= 0), device=self.device)
        if self.dinfo.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def validate(self, val_tokens: Tensor, luts: ByteLUTs, full: bool) -> dict:
        hp = self.hp
        check = val_tokens if full or not hp.val_max_tokens else val_tokens[: hp.val_max_tokens + 1]
        loss, bpb = evaluate(self.model, check, luts, hp.train_seq_len, hp.train_seq_len, hp.val_batch_size,
                             self.dinfo, self.device)
        self.log.kv(step=self.step, val_loss=loss, val_bpb=bpb, train_time=f"{self.train_s:.1f}s")
        return {"val_loss": loss, "val_bpb": bpb}

    def run(self, val_tokens: Tensor, luts: ByteLUTs) -> dict:
        hp, log, last_val = self.hp, self.log, {}
        t0 = time.perf_counter()
        while True:
            done = self.step >= hp.iterations or self.time_is_up(self.train_s + time.perf_counter() - t0)
            if done or (hp.val_loss_every and self.step % hp.val_loss_every == 0):
                self.train_s += time.perf_counter() - t0
                last_val = self.validate(val_tokens, luts, full=done)
                t0 = time.perf_counter()
            if done:
                break
            elapsed = self.train_s + time.perf_counter() - t0
            scale = lr_scale(hp, self.step, elapsed)
            self.set_qat(scale)
            batches = self.next_batches()
            if hp.replay_batches:
                self.replay = (self.replay + [[(x.cpu(), y.cpu()) for x, y in batches]])[-hp.replay_batches:]
            loss = self.train_step(batches, scale, muon_momentum(hp, self.step), self.loops_for(self.step))
            self.step += 1
            self.averages.update(self.model, self.step, scale)
            if self.step % hp.train_log_every == 0 or self.step == 1:
                elapsed = self.train_s + time.perf_counter() - t0
                step_ms = 1000 * elapsed / self.step
                eta = max(0.0, min(hp.iterations - self.step, steps_left(hp, self.step, elapsed))) * step_ms / 1000
                log.kv(step=f"{self.step}/{hp.iterations}", train_loss=f"{loss:.5f}", lr_scale=f"{scale:.3f}",
                       tok_s=f"{hp.train_batch_tokens * self.step / elapsed:.0f}", step_avg=f"{step_ms:.1f}ms", eta=f"{eta:.0f}s")
            if hp.checkpoint_every and self.step % hp.checkpoint_every == 0:
                self.train_s += time.perf_counter() - t0
                self.save_checkpoint()
                t0 = time.perf_counter()
        self.train_s += time.perf_counter() - t0
        main_seconds = self.train_s
        self.post_loop()
        return {"steps": self.step, "train_seconds": self.train_s, "main_loop_seconds": main_seconds, **last_val}

    def post_loop(self) -> None:
        """Replay, then distillation from the EMA teacher: each timed, each counted in the budget."""
        hp, t0 = self.hp, time.perf_counter()
        for epoch in range(hp.replay_epochs if self.replay else 0):
            for stored in self.replay:
                batches = [(x.to(self.device), y.to(self.device)) for x, y in stored]
                loss = self.train_step(batches, hp.replay_lr_scale, hp.muon_momentum)
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
        self.train_s += time.perf_counter() - t0
        self.log.kv(replay_seconds=f"{replay_s:.1f}", distill_seconds=f"{time.perf_counter() - t0 - replay_s:.1f}")

    def use_export_weights(self) -> str:
        """Load the weights chosen by EXPORT_WEIGHTS into the model; returns what was loaded.
        Fake quantization goes off: from here on the export's own grid is the only one."""
        self.model.set_qat(0, 0, crawler_noise=False)
        if self.hp.export_weights == "raw":
            return "raw"
        weights = self.averages.weights(self.hp.export_weights)
        if weights is None:
            self.log(f"export_weights:raw (no {self.hp.export_weights} snapshots were taken)")
            return "raw"
        self.model.load_state_dict({k: v.to(self.model.state_dict()[k].dtype) for k, v in weights.items()})
        return self.hp.export_weights

    def save_checkpoint(self) -> None:
        """Each rank writes its own file (Muon's momentum lives on the rank that owns the matrix)."""
        state = {"step": self.step, "train_seconds": self.train_s, "model": self.model.state_dict(),
                 "optimizers": [o.state_dict() for o in self.optimizers], "averages": self.averages.state(),
                 "stream": torch.tensor(self.loader.stream.position()), "qat_on": self.qat_on,
                 "replay": [[(x, y) for x, y in b] for b in self.replay], "rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        path = self.rank_checkpoint
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        self.log.kv(checkpoint=str(path), step=self.step)

    @property
    def rank_checkpoint(self) -> Path:
        return self.checkpoint_path.with_suffix(f".r{self.dinfo.rank}.ckpt")

    def resume(self) -> None:
        path = self.rank_checkpoint
        if not path.exists():
            raise FileNotFoundError(f"RESUME: no checkpoint {path} (was CHECKPOINT_EVERY set for this RUN_ID?)")
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        for opt, st in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(st)
        self.averages.load(state["averages"])
        self.loader.stream.seek(*state["stream"].tolist())
        self.replay = [[(x, y) for x, y in b] for b in state["replay"]]
        self.step, self.train_s = state["step"], state["train_seconds"]
        torch.set_rng_state(state["rng_cpu"].cpu())
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        if state["qat_on"]:
            self.set_qat(0.0)
        self.log.kv(resumed_from=str(path), step=self.step, train_seconds=f"{self.train_s:.1f}")


def _clone_state(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone_state(v) for v in state]
    return state


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
    if dinfo.distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def make_run_id(hp: Hyperparameters, dinfo: DistInfo) -> str:
    """Rank 0 picks the id and broadcasts it so every rank names the same files."""
    if hp.run_id:
        return hp.run_id
    ids = [time.strftime("%Y%m%d_%H%M%S") + "_" + uuid.uuid4().hex[:6]]
    if dinfo.distributed:
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


def load_tokenizer(path: str):
    import sentencepiece as spm  # noqa: PLC0415 - only needed once data exists
    if not Path(path).is_file():
        raise FileNotFoundError(f"TOKENIZER_PATH: {path} does not exist; fetch it with bash setup_pod.sh "
                                "or build the bundled one with python data/prepare_local.py")
    return spm.SentencePieceProcessor(model_file=str(path))


def main(env: Mapping[str, str] | None = None) -> dict:
    env = dict(os.environ) if env is None else env
    hp = Hyperparameters.from_env(env)
    dinfo = DistInfo.from_env(env)
    device = setup_distributed(dinfo)
    try:
        return run(hp, dinfo, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class ArtifactTooLarge(RuntimeError):
    """Code + model bytes over SIZE_LIMIT: the run is not a valid submission."""


@dataclass
class RunData:
    train_files: list[Path]
    val_tokens: Tensor
    luts: ByteLUTs
    backend: str
    delta_backend: str


def preflight(hp: Hyperparameters, dinfo: DistInfo, device: torch.device) -> RunData:
    """Everything that can fail, checked before a single training step."""
    _require(hp.accum_splits % dinfo.world_size == 0, "ACCUM_SPLITS",
             f"{hp.accum_splits} is not divisible by the world size {dinfo.world_size}")
    sp = load_tokenizer(hp.tokenizer_path)
    _require(sp.vocab_size() <= hp.vocab_size, "VOCAB_SIZE", f"{hp.vocab_size} < tokenizer vocab {sp.vocab_size()}")
    train_files = shard_files(hp.data_path, hp.train_files, "TRAIN_FILES")
    train_tokens = sum(shard_num_tokens(f) for f in train_files)
    micro = hp.train_batch_tokens // hp.accum_splits
    _require(hp.eval_only != "" or train_tokens > micro * dinfo.world_size, "TRAIN_BATCH_TOKENS",
             f"one step needs {hp.train_batch_tokens} tokens; the train shards hold {train_tokens}")
    val_tokens = load_tokens(shard_files(hp.data_path, hp.val_files, "VAL_FILES"))
    _require(val_tokens.numel() > max(hp.eval_seq_len, hp.train_seq_len), "EVAL_SEQ_LEN",
             f"EVAL_SEQ_LEN/TRAIN_SEQ_LEN exceed the {val_tokens.numel()} val tokens")
    compress_bytes(b"probe", hp.compressor, 1)          # the chosen compressor's module imports
    for folder in (hp.artifact_dir, hp.records_dir, hp.log_dir):
        probe = Path(folder) / f".probe_{dinfo.rank}"
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    backend = select_attention_backend(device)
    q = torch.randn(1, 8, 2, 16, device=device)
    causal_attention(q, q[:, :, :1], q[:, :, :1], backend)  # the backend really runs here
    delta_backend = select_delta_backend(device)
    if hp.delta_net_heads:
        delta_rule(F.normalize(q, dim=-1), F.normalize(q, dim=-1), q, torch.rand(1, 8, 2, device=device), delta_backend)
    if hp.eval_only:
        unpack_artifact(Path(hp.eval_only).read_bytes())
    return RunData(train_files, val_tokens, build_byte_luts(sp, hp.vocab_size), backend, delta_backend)


def score(model: nn.Module, hp: Hyperparameters, data: RunData, stride: int, dinfo: DistInfo,
          device: torch.device, log: Logger, label: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss, bpb = evaluate(model, data.val_tokens, data.luts, hp.eval_seq_len, stride, hp.val_batch_size, dinfo, device)
    log.kv(**{f"{label}_val_loss": loss, f"{label}_val_bpb": f"{bpb:.6f}", f"{label}_eval_seconds": f"{time.perf_counter() - t0:.1f}"})
    return loss, bpb


def eval_model_for(model: CrawlerGPT, hp: Hyperparameters, data: RunData, device: torch.device) -> nn.Module:
    model.to(device).set_backends(data.backend, data.delta_backend)
    return torch.compile(model, dynamic=False) if hp.use_compile(device) else model


def calibration_batches(loader: DistributedTokenLoader, hp: Hyperparameters, dinfo: DistInfo) -> list[Tensor]:
    n = max(1, hp.gptq_calib_batches // dinfo.world_size)
    return [loader.next_batch(hp.train_batch_tokens // hp.accum_splits, hp.train_seq_len)[0] for _ in range(n)]


def export(model: CrawlerGPT, hp: Hyperparameters, batches: list[Tensor], dinfo: DistInfo, path: Path,
           log: Logger) -> dict:
    """Quantize, pack, write (rank 0). Every rank quantizes identically from all-reduced Hessians."""
    t0 = time.perf_counter()
    entries, cost = quantize_model_(copy.deepcopy(model), hp, hp.quant, batches, dinfo)
    quant_s = time.perf_counter() - t0
    if dinfo.master:
        blob = pack_model(entries, cost, hp, log)
        write_atomic(path, blob)
    if dinfo.distributed:
        dist.barrier()
    sizes = {"bytes_code": len(code_bytes()), "bytes_model": path.stat().st_size}
    sizes["bytes_total"] = sizes["bytes_code"] + sizes["bytes_model"]
    log.kv(quant=hp.quant, loop_aware=int(hp.quant == "gptq" and loop_aware(hp)), compressor=hp.compressor,
           quantize_seconds=f"{quant_s:.1f}", pack_seconds=f"{time.perf_counter() - t0 - quant_s:.1f}", **sizes)
    return sizes


EXPORT_VARIANTS = {"rtn": ("rtn", "0"), "gptq_plain": ("gptq", "0"), "gptq_loop_aware": ("gptq", "1")}


def compare_exports(model: CrawlerGPT, hp: Hyperparameters, batches: list[Tensor], data: RunData,
                    dinfo: DistInfo, device: torch.device, log: Logger) -> dict:
    """Every export variant from the same trained weights (so the gaps carry no training noise),
    and the main variant's bytes under every compressor."""
    figures, calib = {}, batches or calibration_batches(DistributedTokenLoader(data.train_files, dinfo, device), hp, dinfo)
    for label, (quant, loop_aware_knob) in EXPORT_VARIANTS.items():
        if label == "gptq_plain" and not hp.num_crawler_layers:
            continue
        variant_hp = dataclasses.replace(hp, quant=quant, gptq_loop_aware=loop_aware_knob)
        copy_model = copy.deepcopy(model)
        entries, _ = quantize_model_(copy_model, variant_hp, quant, calib, dinfo)
        figures[f"{label}_val_bpb"] = score(copy_model, hp, data, hp.eval_seq_len, dinfo, device, log, label)[1]
        if label == ("rtn" if hp.quant == "rtn" else "gptq_loop_aware" if loop_aware(hp) else "gptq_plain") and dinfo.master:
            for compressor in COMPRESSOR_IDS:
                packed = pack_artifact(entries, artifact_meta(hp), compressor, None, hp.byte_shuffle, int6_bitpack=hp.int6_bitpack)
                log.kv(compare_compressor=compressor, bytes_model=len(packed), int6_bitpack=int(hp.int6_bitpack))
    return figures


def check_cap(hp: Hyperparameters, sizes: dict, log: Logger) -> None:
    over = sizes["bytes_total"] - hp.size_limit
    if over > 0:
        log(f"error: bytes_total {sizes['bytes_total']} is {over} bytes over SIZE_LIMIT={hp.size_limit}")
        raise ArtifactTooLarge(f"artifact over the cap by {over} bytes: shrink the model, or set SIZE_TARGET=prune")


def run(hp: Hyperparameters, dinfo: DistInfo, device: torch.device) -> dict:
    run_id = make_run_id(hp, dinfo)
    log_path = Path(hp.log_dir) / f"{run_id}.txt"
    log = Logger(log_path if dinfo.master else None, append=hp.resume)
    log_startup(log, hp, dinfo, device)
    timer = PhaseTimer()
    torch.manual_seed(hp.seed)  # identical init on every rank
    np.random.seed(hp.seed)
    if hp.dry_run:
        return dry_run(hp, log)
    with timer.phase("checks"):
        data = preflight(hp, dinfo, device)
    log.kv(train_shards=len(data.train_files), val_tokens=data.val_tokens.numel(), attention=data.backend,
           delta_rule=data.delta_backend if hp.delta_net_heads else "off",
           unigram_val_bpb=f"{unigram_bpb(data.val_tokens, data.luts):.4f}")
    if hp.eval_only:
        return evaluate_only(hp, data, dinfo, device, log, timer, run_id)

    model = CrawlerGPT(hp).to(device)
    model.set_backends(data.backend, data.delta_backend)
    log.kv(unique_params=count_unique_params(model), effective_depth=hp.effective_depth,
           flat=hp.num_flat_layers, crawler=f"{hp.num_crawler_layers}x{hp.crawler_loops}",
           arm_params=",".join(f"{k}={v}" for k, v in sorted(arm_param_counts(model).items())) or "none",
           bytes_model_raw=raw_model_bytes(model, hp))
    step_model: nn.Module = torch.compile(model, dynamic=False) if hp.use_compile(device) else model
    if dinfo.distributed:  # single-loop cadence steps leave later loops' parameters unused
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[dinfo.local_rank] if device.type == "cuda" else None,
            find_unused_parameters=hp.crawler_cadence > 1)
    log.kv(compile=int(hp.use_compile(device)), accum_steps=hp.accum_splits // dinfo.world_size)
    loader = DistributedTokenLoader(data.train_files, dinfo, device)
    trainer = Trainer(hp, dinfo, device, model, step_model, build_optimizers(model, hp, dinfo), loader, log,
                      Path(hp.artifact_dir) / f"{run_id}.ckpt")
    with timer.phase("train"):
        if hp.resume:
            trainer.resume()
        else:
            trainer.prime_compile()
        result = trainer.run(data.val_tokens, data.luts)
        exported = trainer.use_export_weights()
        if exported != "raw" or trainer.qat_on or hp.post_loop_steps:   # the weights changed since the last val
            result.update(trainer.validate(data.val_tokens, data.luts, full=True))
    log.kv(export_weights=exported, pre_quant_val_bpb=f"{result['val_bpb']:.6f}")
    if device.type == "cuda":
        log.kv(peak_memory_mib=torch.cuda.max_memory_allocated() // 2**20)
    with timer.phase("calibration"):
        batches = calibration_batches(loader, hp, dinfo) if hp.quant == "gptq" else []
    log.kv(train_plus_calibration_seconds=f"{result['train_seconds'] + timer.seconds['calibration']:.1f}",
           budget_seconds=hp.max_wallclock_seconds)
    artifact = Path(hp.artifact_dir) / f"{run_id}.ptz"
    with timer.phase("export"):
        sizes = export(model, hp, batches, dinfo, artifact, log)
    check_cap(hp, sizes, log)
    with timer.phase("eval"):
        figures = {"pre_quant_val_bpb": result["val_bpb"]}
        if hp.quant_compare:
            figures.update(compare_exports(model, hp, batches, data, dinfo, device, log))
        fresh = eval_model_for(load_artifact(artifact), hp, data, device)
        figures["post_quant_val_bpb"] = score(fresh, hp, data, hp.eval_seq_len, dinfo, device, log, "post_quant")[1]
        val_loss, val_bpb = score(fresh, hp, data, hp.eval_stride, dinfo, device, log, "sliding")
    log.kv(quant_gap=f"{figures['post_quant_val_bpb'] - figures['pre_quant_val_bpb']:.6f}",
           **{k: f"{v:.6f}" for k, v in figures.items()})
    log(timer.summary())
    final = {"val_bpb": val_bpb, "val_loss": val_loss, **sizes}
    log(final_line(final))
    out = {"run_id": run_id, **result, **figures, **final, "phase_seconds": dict(timer.seconds),
           "artifact": str(artifact)}
    if dinfo.master:
        out["records"] = str(write_records(hp, out, log_path, artifact))
    return out


def raw_model_bytes(model: CrawlerGPT, hp: Hyperparameters) -> int:
    """The artifact's payload before compression (one byte per int6/int8 value plus fp16 row scales):
    an instant upper bound; DRY_RUN=1 packs a random-weight model for the compressed estimate."""
    total = 0
    for name, p in model.named_parameters():
        kind = storage_kind(name, p, hp)
        total += p.numel() + 2 * p.size(0) if kind in QUANT_KINDS else p.numel() * FLOAT_KINDS[kind].itemsize
    return total


def estimate_artifact_bytes(model: CrawlerGPT, hp: Hyperparameters) -> int:
    """RTN-quantize a random-weight copy and pack it with the chosen compressor. Zero-init output
    projections get a Gaussian spread first; trained weights usually compress somewhat better."""
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p in probe.parameters():
            if p.ndim == 2 and not p.abs().any():
                nn.init.normal_(p, std=p.size(1) ** -0.5)
    entries, _ = quantize_model_(probe, hp, "rtn", [], DistInfo())
    return len(pack_artifact(entries, artifact_meta(hp), hp.compressor, compressor_level(hp), hp.byte_shuffle,
                             int6_bitpack=hp.int6_bitpack))


def dry_run(hp: Hyperparameters, log: Logger) -> dict:
    t0 = time.perf_counter()
    model = CrawlerGPT(hp)
    by_kind: dict[str, int] = {}
    for name, p in model.named_parameters():
        by_kind[storage_kind(name, p, hp)] = by_kind.get(storage_kind(name, p, hp), 0) + p.numel()
    model_bytes = estimate_artifact_bytes(model, hp)
    out = {"unique_params": count_unique_params(model), "effective_depth": hp.effective_depth,
           "bytes_model_estimate": model_bytes, "bytes_code": len(code_bytes()),
           "arm_params": ",".join(f"{k}={v}" for k, v in sorted(arm_param_counts(model).items())) or "none"}
    out["bytes_total_estimate"] = model_bytes + out["bytes_code"]
    log.kv(dry_run=1, **out, params_by_kind=",".join(f"{k}={v}" for k, v in sorted(by_kind.items())),
           cap=hp.size_limit, headroom=hp.size_limit - out["bytes_total_estimate"],
           estimate="random_weights_rtn", seconds=f"{time.perf_counter() - t0:.1f}")
    return out


def final_line(r: dict) -> str:
    return (f"final val_bpb:{r['val_bpb']:.6f} val_loss:{r['val_loss']:.6f} bytes_total:{r['bytes_total']} "
            f"bytes_code:{r['bytes_code']} bytes_model:{r['bytes_model']}")


def evaluate_only(hp: Hyperparameters, data: RunData, dinfo: DistInfo, device: torch.device, log: Logger,
                  timer: PhaseTimer, run_id: str) -> dict:
    path = Path(hp.eval_only)
    sizes = {"bytes_code": len(code_bytes()), "bytes_model": path.stat().st_size}
    sizes["bytes_total"] = sizes["bytes_code"] + sizes["bytes_model"]
    with timer.phase("eval"):
        fresh = eval_model_for(load_artifact(path), hp, data, device)
        post = score(fresh, hp, data, hp.eval_seq_len, dinfo, device, log, "post_quant")[1]
        val_loss, val_bpb = score(fresh, hp, data, hp.eval_stride, dinfo, device, log, "sliding")
    log(timer.summary())
    check_cap(hp, sizes, log)
    log(final_line({"val_bpb": val_bpb, "val_loss": val_loss, **sizes}))
    return {"run_id": run_id, "post_quant_val_bpb": post, "val_bpb": val_bpb, "val_loss": val_loss, **sizes}


def write_records(hp: Hyperparameters, out: dict, log_path: Path, artifact: Path) -> Path:
    """records/<date>_<RUN_ID>/ in the upstream layout: README, submission.json, log, script."""
    folder = Path(hp.records_dir) / f"{time.strftime('%Y-%m-%d')}_{out['run_id']}"
    folder.mkdir(parents=True, exist_ok=True)
    changed = [f for f in sorted(fields(hp), key=lambda f: f.name) if getattr(hp, f.name) != f.default]
    rows = "\n".join(f"| `{f.name.upper()}` | `{getattr(hp, f.name)}` |" for f in changed)
    phases = "\n".join(f"| {k} | {v:.1f} |" for k, v in out["phase_seconds"].items())
    figures = "\n".join(f"| {k} | {out[k]:.6f} |" for k in ("pre_quant_val_bpb", "rtn_val_bpb", "post_quant_val_bpb", "val_bpb") if k in out)
    (folder / "README.md").write_text(
        f"# {hp.submit_name or out['run_id']}\n\n{hp.submit_blurb}\n\n"
        f"Flat {hp.num_flat_layers} + crawler {hp.num_crawler_layers}x{hp.crawler_loops}, dim {hp.model_dim}, "
        f"{out['steps']} steps in {out['train_seconds']:.1f}s, QUANT={hp.quant}, COMPRESSOR={hp.compressor}.\n\n"
        f"## Scores (val_bpb is post-quant, sliding stride {hp.eval_stride})\n\n| figure | value |\n| --- | --- |\n{figures}\n\n"
        f"## Bytes\n\n| total | code | model | cap |\n| --- | --- | --- | --- |\n"
        f"| {out['bytes_total']} | {out['bytes_code']} | {out['bytes_model']} | {hp.size_limit} |\n\n"
        f"## Phase times (s)\n\n| phase | seconds |\n| --- | --- |\n{phases}\n\n"
        f"## Knobs that differ from the defaults\n\n| variable | value |\n| --- | --- |\n{rows}\n")
    submission = {"author": hp.submit_author, "github_id": hp.submit_github_id, "name": hp.submit_name,
                  "blurb": hp.submit_blurb, "date": time.strftime("%Y-%m-%d"), "val_loss": out["val_loss"],
                  "val_bpb": out["val_bpb"], "bytes_total": out["bytes_total"], "bytes_code": out["bytes_code"],
                  "seed": hp.seed, "hardware": device_name(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")),
                  "torch_version": torch.__version__, "artifact_sha256": hashlib.sha256(artifact.read_bytes()).hexdigest()}
    (folder / "submission.json").write_text(json.dumps(submission, indent=2) + "\n")
    shutil.copyfile(log_path, folder / "train.log")
    (folder / "train_gpt.py").write_bytes(code_bytes())
    return folder


if __name__ == "__main__":
    try:
        main()
    except (HyperparameterError, FileNotFoundError, ArtifactError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ArtifactTooLarge as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(4)
