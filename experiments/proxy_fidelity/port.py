#!/usr/bin/env python3
"""Run a published record's own train_gpt.py on this CPU, ported by patches applied at run time.

The record's code is read from a clone of openai/parameter-golf (PG_REPO, or the library's mirror), decoded
if it ships as an lzma stub, patched in memory (fp32 for bf16, SDPA for FlashAttention 3, eager for
torch.compile, CPU for CUDA), configured through its own environment variables at a proxy's scale, and run
in a scratch directory whose data/ links one of our prepared corpora under the names the record expects.
Nothing of the record is copied into this project.

    python experiments/proxy_fidelity/port.py --script r0405 --proxy wall --seed 1337 --out DIR

prints one JSON line (script, proxy, seed, steps, final val_bpb, the val curve, seconds); the run's own log
lands in DIR. `calibrate.py` runs the set and scores each proxy against the pod."""
from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import lzma
import math
import os
import re
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECORDS = "records/track_10min_16mb"
DEFAULT_REPO = Path("/work/.mirror/openai+parameter-golf/repo")


@dataclass(frozen=True)
class Script:
    """One published script: where it lives, its pod result, and how our scale maps onto its knobs."""
    folder: str
    file: str
    pod_bpb: float          # the record's published 3-seed mean (its README / submission.json)
    pod_steps: int          # steps its pod run took (its log), for scaling step-counted schedules
    pod_layers: int
    final: str              # the log label of its quantized score, plain (not sliding), before any TTT
    layer_env: dict = field(default_factory=dict)  # layer indices as fractions of depth (loop ends: "=LOOP_START+n")
    env: dict = field(default_factory=dict)        # fixed settings (e.g. TTT off); see script_env
    step_env: dict = field(default_factory=dict)   # env var -> pod value of a step-counted schedule
    ema: str = ""           # "env" (EMA_DECAY), "text" (hard-coded 0.997) or "" (no EMA)
    pod_ema: float = 0.997  # the EMA decay its pod run used
    pod_vocab: int = 1024   # the tokenizer's vocabulary on the pod (8192: sp8192, CaseOps for r0427)
    patches: tuple = ()     # script-specific (old, new) text replacements, each must match
    extra: str = ""         # a sibling module with more: PATCHES, MODULES (name -> fake) and ENV (like env)


SCRIPTS: dict[str, Script] = {
    "naive": Script("2026-03-17_NaiveBaseline", "train_gpt.py", 1.2244, 13780, 9, "final_int8_zlib_roundtrip_exact",
                    step_env={"WARMDOWN_ITERS": 1200, "MUON_MOMENTUM_WARMUP_STEPS": 500}),
    "r0322": Script("2026-03-22_11L_EMA_GPTQ-lite_warmdown3500_QAT015_1.1233", "train_gpt.py", 1.1233, 7096, 11,
                    "final_int6_roundtrip_exact",
                    env={"XSA_LAST_N": "@4/11", "VE_LAYERS": "=f'{NUM_LAYERS - 2},{NUM_LAYERS - 1}'"},
                    step_env={"WARMDOWN_ITERS": 3500, "MUON_MOMENTUM_WARMUP_STEPS": 1500, "SWA_EVERY": 50},
                    ema="text"),
    "r0405": Script("2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2", "train_gpt_human.py", 1.0856, 4988, 11,
                    "quantized", pod_vocab=8192, layer_env={"LOOP_START": (4 / 11,)}, env={"LOOP_END": "=LOOP_START+1"},
                    step_env={"MUON_MOMENTUM_WARMUP_STEPS": 1500}, ema="env"),
    "r0409": Script("2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT", "train_gpt.py", 1.0810, 4557, 11,
                    "quantized", pod_vocab=8192,
                    layer_env={"LOOP_START": (3 / 11,), "PARALLEL_RESIDUAL_START": (7 / 11,)},
                    env={"TTT_ENABLED": "0", "LOOP_END": "=LOOP_START+2"}, step_env={"MUON_MOMENTUM_WARMUP_STEPS": 1500},
                    ema="env", pod_ema=0.9965),
    "r0427": Script("2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611", "train_gpt.py", 1.0611, 4945, 11,
                    "diagnostic quantized", pod_vocab=8192,
                    layer_env={"LOOP_START": (3 / 11,), "PARALLEL_START_LAYER": (8 / 11,)},
                    # the lanes start after the loop, as on the pod (8 > 5): at 6 layers round(8/11*6) = 4 fell inside
                    # it, and the record's decoder then drops the output of each plain call between two lane calls
                    env={"LOOP_END": "=LOOP_START+2", "PARALLEL_START_LAYER": "=max(PARALLEL_START_LAYER, LOOP_END+1)"},
                    # and ports_r0427.ENV: the pod run's settings
                    step_env={"MUON_MOMENTUM_WARMUP_STEPS": 1500}, ema="env", pod_ema=0.9965, extra="ports_r0427"),
}


@dataclass(frozen=True)
class Proxy:
    """How a script is scaled and how long it trains: by wallclock, or by a fixed number of steps."""
    dim: int = 128
    heads: int = 4
    kv_heads: int = 2
    depth: float = 6 / 11          # fraction of the pod's layer count kept (rounded)
    seq_len: int = 256
    batch_tokens: int = 8192
    seconds: float = 0.0           # train wallclock cap (0: none)
    steps: int = 0                 # fixed steps (0: until the wallclock cap)
    corpus: str = "local"
    val_every: int = 50
    clock: str = "cpu"             # the scripts' timer: this process's CPU seconds (load-proof) or "wall"
    own_vocab: bool = False        # each script at its pod vocabulary (a corpus tokenized so), else sp1024


PROXIES: dict[str, Proxy] = {
    "wall": Proxy(seconds=331.0),                     # today's: the demo's wallclock at the demo's scale
    "steps200": Proxy(steps=200, val_every=25),       # equal steps (1.6M tokens each), schedules scaled to 200
    "steps200v": Proxy(steps=200, val_every=25, own_vocab=True),   # the same, each at its own vocabulary
    "steps200_vimdoc": Proxy(steps=200, val_every=25, corpus="vimdoc"),   # the same two on the second corpus
    "steps200v_vimdoc": Proxy(steps=200, val_every=25, corpus="vimdoc", own_vocab=True),
    "smoke": Proxy(steps=6, val_every=3),             # a port check and a ms/step timing
    # the CPU demo's side by side (demo_side_by_side.py): its clock and half of it (a machine twice as slow)
    "wall_half": Proxy(seconds=165.5),
    "wall_vimdoc": Proxy(seconds=331.0, corpus="vimdoc"),
    "wall_half_vimdoc": Proxy(seconds=165.5, corpus="vimdoc"),
}


def read_source(script: Script, repo: Path | None = None) -> str:
    """The record's train_gpt.py as published, decoded when it ships as an lzma+base85 stub."""
    repo = Path(os.environ.get("PG_REPO", repo or DEFAULT_REPO))
    path = f"{RECORDS}/{script.folder}/{script.file}"
    git_dir = repo if (repo / "HEAD").exists() and not (repo / ".git").exists() else repo / ".git"
    try:
        src = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"HEAD:{path}"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"error: cannot read {path} from {repo} ({e}) — clone openai/parameter-golf and set "
                         f"PG_REPO to it") from None
    return decode_stub(src)


def decode_stub(src: str) -> str:
    """`exec(lzma.decompress(b85decode("...")))` stubs hold the readable source; anything else is it."""
    m = re.search(r'b85decode\("([^"]+)"\)', src)
    if not m or len(src) - len(m.group(1)) > 400:
        return src
    raw = base64.b85decode(m.group(1))
    if "FORMAT_RAW" in src:
        return lzma.decompress(raw, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]).decode()
    return lzma.decompress(raw).decode()


# Text patches every script gets: CPU for CUDA, fp32 for bf16. Each is a regex; scripts vary in spelling.
COMMON_PATCHES = (
    (r'torch\.device\(\s*["\']cuda["\'][^)]*\)', 'torch.device("cpu")'),
    (r'device\s*=\s*["\']cuda["\']', 'device="cpu"'),
    (r'\.cuda\(\)', ''),
    (r'torch\.cuda\.is_available\(\)', 'True'),
    (r'torch\.bfloat16', 'torch.float32'),
    (r'\.bfloat16\(\)', '.float()'),
    (r'device_ids=\[[^\]]*\]', 'device_ids=None'),
    (r'\[\s*["\']nvidia-smi["\']\s*\]', '["true"]'),
)


def py311_fstrings(src: str) -> str:
    """Python 3.12 lets an f-string reuse its own quote inside {}; 3.11 does not. Swap those inner quotes.
    A scanner over comments and string literals: valid 3.11 code comes back unchanged."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if c == "#":
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(src[i:j]); i = j
            continue
        m = re.match(r"([rRbBuUfF]{0,2})('''|\"\"\"|'|\")", src[i:i + 5])
        if not m or (i and (src[i - 1].isalnum() or src[i - 1] == "_") and m.group(1)):
            out.append(c); i += 1
            continue
        prefix, q = m.groups()
        j, depth, body = i + len(m.group(0)), 0, []
        fmt = "f" in prefix.lower() and len(q) == 1
        while j < n:
            ch = src[j]
            if ch == "\\" and depth == 0:
                body.append(src[j:j + 2]); j += 2
                continue
            if depth == 0 and src.startswith(q, j):
                break
            if fmt and ch == "{":
                depth = depth + 1 if not (depth == 0 and src.startswith("{{", j)) else depth
                if src.startswith("{{", j) and depth == 0:
                    body.append("{{"); j += 2
                    continue
            elif fmt and ch == "}" and depth:
                depth -= 1
            elif fmt and depth and ch == q:
                ch = "'" if q == '"' else '"'
            body.append(ch); j += 1
        out.append(m.group(0) + "".join(body) + q)
        i = j + len(q)
    return "".join(out)


def patch_source(src: str, script: Script, dim: int = 512) -> str:
    src = py311_fstrings(src)
    for pattern, repl in COMMON_PATCHES:
        src = re.sub(pattern, repl, src)
    # "Tensors up to 65,536 values stay float": a rule written for width 512. Scaled with the width's square,
    # the same matrices are quantized at the proxy's width as on the pod.
    src = re.sub(r"(?<![\w.])65_?536(?![\w.])", str(65536 * dim * dim // 512 // 512), src)
    for old, new in (*script.patches, *getattr(extra_module(script), "PATCHES", ())):
        if old not in src:
            raise SystemExit(f"error: patch for {script.folder} no longer matches: {old[:60]!r}")
        src = src.replace(old, new)
    if script.ema == "text":
        src, n = re.subn(r"ema_decay\s*=\s*0\.997\b", 'ema_decay = float(os.environ["EMA_DECAY"])', src)
        if n != 1:
            raise SystemExit(f"error: {script.folder}: expected one hard-coded EMA decay, found {n}")
    return src


def extra_module(script: Script):
    if not script.extra:
        return None
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        return __import__(script.extra)
    finally:
        sys.path.pop(0)


def sdpa_flash_attn(q, k, v, causal=True, **_):
    """FlashAttention 3's layout [B, T, H, D] and GQA, computed by torch's SDPA."""
    import torch.nn.functional as F
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
    return y.transpose(1, 2).contiguous()


@contextlib.contextmanager
def cpu_runtime(script: Script):
    """Fake GPU-only modules and make CUDA-only calls harmless, for the duration of one script."""
    import torch
    fa = types.ModuleType("flash_attn_interface")
    fa.flash_attn_func = sdpa_flash_attn
    fakes = {"flash_attn_interface": fa, **getattr(extra_module(script), "MODULES", {})}
    saved_mods = {m: sys.modules.get(m) for m in fakes}
    sys.modules.update(fakes)
    saved = {}
    def swap(obj, name, value):     # a fresh function per name: torch's dynamo rejects one object twice
        saved[(obj, name)] = getattr(obj, name)
        setattr(obj, name, value)
    def eager(fn=None, **_):
        return fn if fn is not None else (lambda f: f)
    swap(torch, "compile", eager)
    swap(torch, "autocast", lambda *a, **k: contextlib.nullcontext())
    # Eager mode keeps caches (rotary tables) built under inference_mode, which autograd then refuses;
    # compiled graphs on the pod never see that. no_grad computes the same values.
    swap(torch, "inference_mode", lambda mode=True: torch.no_grad() if mode else contextlib.nullcontext())
    for name in ("synchronize", "set_device", "reset_peak_memory_stats", "empty_cache"):
        swap(torch.cuda, name, lambda *a, **k: None)
    for name in ("max_memory_allocated", "max_memory_reserved", "memory_allocated"):
        swap(torch.cuda, name, lambda *a, **k: 0)
    try:
        yield
    finally:
        for (obj, name), value in saved.items():
            setattr(obj, name, value)
        for m, mod in saved_mods.items():
            sys.modules.pop(m, None) if mod is None else sys.modules.__setitem__(m, mod)


def stage_data(workdir: Path, corpus: str, vocab: int = 1024) -> Path:
    """data/ in the records' layout, linking one of our prepared corpora (train, val, tokenizer)."""
    src = ROOT / "data" / "datasets" / f"{corpus}_sp{vocab}"
    tok = ROOT / "data" / "tokenizers" / f"{corpus}_{vocab}_bpe.model"
    if not (src.is_dir() and tok.is_file()):
        raise SystemExit(f"error: corpus {corpus!r} at vocab {vocab} is not prepared ({src}) — run "
                         f"data/prepare_local.py --vocab-size {vocab} (add --text-dir ... --name {corpus} for others)")
    data = workdir / "data"
    (data / "datasets" / f"fineweb10B_sp{vocab}").mkdir(parents=True, exist_ok=True)
    (data / "tokenizers").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        for f in sorted(src.glob(f"{corpus}_{split}_*.bin")):
            link = data / "datasets" / f"fineweb10B_sp{vocab}" / f.name.replace(f"{corpus}_", "fineweb_")
            link.unlink(missing_ok=True)
            link.symlink_to(f)
    link = data / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    link.unlink(missing_ok=True)
    link.symlink_to(tok)
    return data


def expected_steps(script: str, proxy: Proxy) -> int:
    """Steps the run will take: fixed, or the wallclock over this machine's measured ms/step (MS_PER_STEP)."""
    if proxy.steps:
        return proxy.steps
    ms = MS_PER_STEP.get((OURS[script][1] if script in OURS else script, proxy.dim, proxy.batch_tokens))
    if ms is None:
        raise SystemExit(f"error: no measured ms/step for {script} at dim {proxy.dim} — run its smoke proxy and "
                         f"add its step_avg to MS_PER_STEP")
    return max(1, int(proxy.seconds * 1000 / ms))


# Single-thread eager CPU-milliseconds per step (2-core x86_64, torch 2.13 CPU, dim 128, 8,192 tokens, sp1024):
# train_time / steps of each script's steps200 run, seed 1337, loops on for their scheduled share, 2026-12-03.
MS_PER_STEP: dict[tuple, float] = {("naive", 128, 8192): 1212, ("r0322", 128, 8192): 1641,
                                   ("r0405", 128, 8192): 2550, ("r0409", 128, 8192): 3060,
                                   ("r0427", 128, 8192): 3000}


def vocab(name: str, proxy: Proxy) -> int:
    return spec(name).pod_vocab if proxy.own_vocab else 1024


# Our train_gpt.py under a record's PROFILE, as a member of the set: scaled exactly as that record's own script
# (its twin) is, so the two runs differ only where our code does. Its pod score is the twin's, not a result.
OURS: dict[str, tuple[str, str]] = {"ours_r0405": ("record_0405", "r0405"), "ours_r0427": ("record_0427", "r0427")}


# A published script with one change, to test what explains a difference (shown, never counted in tau).
VARIANTS: dict[str, Script] = {
    # 2026-04-05's loader draws its data order from the rank alone (np.random.PCG64(h.rank)), the same for every
    # SEED; here from (rank, SEED), so that its seeds vary the data as ours do.
    "r0405_dataseed": dataclasses.replace(SCRIPTS["r0405"], patches=(
        ("np.random.PCG64(h.rank)", "np.random.PCG64((h.rank, h.seed))"),)),
    # 2026-04-27 without its two gates (the scalar SmearGate, the sparse attention gate), and without its lanes
    "r0427_nogates": dataclasses.replace(SCRIPTS["r0427"], env={
        **SCRIPTS["r0427"].env, "SMEAR_GATE_ENABLED": "0", "SPARSE_ATTN_GATE_ENABLED": "0"}),
    "r0427_nolanes": dataclasses.replace(SCRIPTS["r0427"], env={**SCRIPTS["r0427"].env, "PARALLEL_START_LAYER": "-1"}),
    # ... and with its loader's cursor jumping to a random place each batch instead of streaming the shard in order
    "r0427_shuffled": dataclasses.replace(SCRIPTS["r0427"], patches=((
        "        self.cursor += global_span\n",
        "        self.cursor = int(np.random.randint(0, max(1, self.shard_size - 2 * global_span)))\n"),)),
    # ... shuffled, and without document masking: attention spans each train_seq_len window whole, as ours does
    "r0427_shuffled_nodoc": dataclasses.replace(SCRIPTS["r0427"], patches=((
        "        self.cursor += global_span\n",
        "        self.cursor = int(np.random.randint(0, max(1, self.shard_size - 2 * global_span)))\n"), (
        "        starts = self._local_doc_starts(local_start, inputs.numel())\n", "        starts = []\n"))),
    # ... trained on the record's own ShuffledSequenceLoader (defined in its file, unused there; the 04-05 and
    # 04-09 records' loader): each micro-batch 4 independent 256-token windows, every window once an epoch, as
    # ours; dense causal attention per window (no document masking). Diagnostic only: while the loop is off, a
    # second validation with it on (ours validates every loop), logged as "looped_eval", not in the curve.
    "r0427_seqloader": dataclasses.replace(SCRIPTS["r0427"], patches=((
        "class RMSNorm(nn.Module):\n",
        "class _PortSequenceLoader(ShuffledSequenceLoader):\n"
        "    def next_batch(self, global_tokens, grad_accum_steps):\n"
        "        x, y = super().next_batch(global_tokens, grad_accum_steps)\n"
        "        return x, y, None, self.seq_len\n\n\n"
        "class RMSNorm(nn.Module):\n"), (
        "    optimizers = Optimizers(h, base_model)\n    train_loader = DocumentPackingLoader(h, device)\n",
        "    optimizers = Optimizers(h, base_model)\n    train_loader = _PortSequenceLoader(h, device)\n"), (
        '                f"{step}/{h.iterations} val_loss: {val_loss:.4f} val_bpb: {val_bpb:.4f}"\n            )\n',
        '                f"{step}/{h.iterations} val_loss: {val_loss:.4f} val_bpb: {val_bpb:.4f}"\n            )\n'
        "            if h.num_loops > 0 and step > 0 and not base_model.looping_active:\n"
        "                base_model.looping_active = True\n"
        "                _lv = eval_val(h, device, val_data, model, compiled_forward_logits)\n"
        "                base_model.looping_active = False\n"
        '                log(f"looped_eval step:{step} val_loss:{_lv[0]:.4f} val_bpb:{_lv[1]:.4f}")\n'))),
    # ... its own loader again, shuffled and unmasked as r0427_shuffled_nodoc, but each micro-batch's 4 windows
    # drawn independently (a random start each, with replacement), not one contiguous 1,025-token span: splits
    # r0427_seqloader's gain into the windows' independence (this) and sampling without replacement (the rest)
    "r0427_randwindows": dataclasses.replace(SCRIPTS["r0427"], patches=((
        "        self.cursor += global_span\n",
        "        self.cursor = int(np.random.randint(0, max(1, self.shard_size - 2 * global_span)))\n"), (
        "        starts = self._local_doc_starts(local_start, inputs.numel())\n", "        starts = []\n"), (
        "        inputs.copy_(buf[:-1])\n        targets.copy_(buf[1:])\n",
        "        _s = np.random.randint(0, self.shard_size - max_seq_len - 1, size=inputs.numel() // max_seq_len)\n"
        "        _w = torch.stack([self.tokens[int(s):int(s) + max_seq_len + 1].to(torch.int64) for s in _s])\n"
        "        inputs.copy_(_w[:, :-1].reshape(-1))\n"
        "        targets.copy_(_w[:, 1:].reshape(-1))\n"))),
}
STANDINS = (*OURS, *VARIANTS)

# The CPU demo (`bash run.sh` without CUDA: PROFILE=demo) as it ships, at its own scale and schedule, on the
# proxy's corpus and clock (its GPTQ reserve added, as run.sh's 345 s hold 330 of training): the member that
# the published scripts are put beside at equal wallclock (demo_side_by_side.py). No twin, no pod score.
DEMO = "demo"


def demo_env(proxy: Proxy, seed: int, data: Path, work: Path) -> dict[str, str]:
    env = profile_env("demo")
    return {**env, "SEED": str(seed), "DATA_PATH": f"{data}/datasets/fineweb10B_sp1024",
            "TOKENIZER_PATH": f"{data}/tokenizers/fineweb_1024_bpe.model",
            "MAX_WALLCLOCK_SECONDS": str(proxy.seconds + float(env["GPTQ_RESERVE_SECONDS"])),
            "RUN_ID": f"{DEMO}_s{seed}", "LOG_DIR": str(work / "logs"), "ARTIFACT_DIR": str(work / "artifacts")}


def spec(name: str) -> Script:
    """The published script, a variant of one, or for one of OURS its twin's."""
    return VARIANTS.get(name) or (SCRIPTS[OURS[name][1]] if name in OURS else SCRIPTS[name])


def profile_env(profile: str) -> dict[str, str]:
    """What experiments/profile.sh exports for PROFILE=profile, the environment's own variables left out."""
    out = subprocess.run(["bash", "-c", f"PROFILE={profile}; . experiments/profile.sh >&2; env -0"], cwd=ROOT,
                         env={"PATH": os.environ.get("PATH", ""), "PYTHON": sys.executable},
                         capture_output=True, text=True, check=True)
    return {k: v for k, v in (kv.split("=", 1) for kv in out.stdout.split("\0") if "=" in kv)
            if k not in ("PATH", "PYTHON", "PWD", "SHLVL", "_", "OLDPWD")}


def ours_env(name: str, proxy: Proxy, seed: int, data: Path, steps: int, work: Path) -> dict[str, str]:
    """The profile's knobs, then the twin's scale, schedules and clips in our knobs' names."""
    profile, twin = OURS[name]
    theirs = script_env(twin, proxy, seed, data, steps)
    start, end = int(theirs["LOOP_START"]), int(theirs["LOOP_END"])
    same = ("SEED", "VOCAB_SIZE", "DATA_PATH", "TOKENIZER_PATH", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS",
            "ROPE_DIMS", "TRAIN_SEQ_LEN", "EVAL_SEQ_LEN", "TRAIN_BATCH_TOKENS", "ITERATIONS",
            "MAX_WALLCLOCK_SECONDS", "VAL_LOSS_EVERY", "TRAIN_LOG_EVERY", "MUON_MOMENTUM_WARMUP_STEPS", "EMA_DECAY")
    return {**profile_env(profile), **{k: theirs[k] for k in same},
            "NUM_FLAT_LAYERS": str(int(theirs["NUM_LAYERS"]) - (end - start + 1)),
            "NUM_CRAWLER_LAYERS": str(end - start + 1), "CRAWLER_POSITION": str(start),
            **{"PARALLEL_START": theirs[k] for k in ("PARALLEL_START_LAYER",) if k in theirs},
            "EVAL_STRIDE": theirs["EVAL_SEQ_LEN"],      # plain windows, as the twin's compared score
            "TTT": "off",                               # the twins' ports run no test-time training
            "ACCUM_SPLITS": "1", "VAL_MAX_TOKENS": "0", "GPTQ_RESERVE_SECONDS": "0",
            "SIZE_TARGET": "none",                      # the record's fixed clips (QUANT_K 12.85, tables 20)
            "RUN_ID": f"{name}_s{seed}", "LOG_DIR": str(work / "logs"), "ARTIFACT_DIR": str(work / "artifacts")}


def script_env(name: str, proxy: Proxy, seed: int, data: Path, steps: int) -> dict[str, str]:
    """The script's own knobs at the proxy's scale; schedules counted in steps scale with the run's length."""
    s, v = spec(name), vocab(name, proxy)
    layers = max(2, round(s.pod_layers * proxy.depth))
    env = {
        "SEED": str(seed), "RUN_ID": f"{name}_s{seed}", "DATA_DIR": f"{data}/", "VOCAB_SIZE": str(v),
        "DATA_PATH": f"{data}/datasets/fineweb10B_sp{v}", "TOKENIZER_PATH": f"{data}/tokenizers/fineweb_{v}_bpe.model",
        "NUM_LAYERS": str(layers), "MODEL_DIM": str(proxy.dim), "EMBEDDING_DIM": str(proxy.dim),
        "NUM_HEADS": str(proxy.heads), "NUM_KV_HEADS": str(proxy.kv_heads),
        "TRAIN_SEQ_LEN": str(proxy.seq_len), "EVAL_SEQ_LEN": str(proxy.seq_len),
        "ROPE_TRAIN_SEQ_LEN": str(proxy.seq_len), "TRAIN_BATCH_TOKENS": str(proxy.batch_tokens),
        "VAL_BATCH_SIZE": str(proxy.batch_tokens), "VAL_BATCH_TOKENS": str(proxy.batch_tokens),
        "ITERATIONS": str(proxy.steps or 1_000_000), "MAX_WALLCLOCK_SECONDS": str(proxy.seconds or 0),
        "WARMUP_STEPS": "0", "TRAIN_LOG_EVERY": str(proxy.val_every), "VAL_LOSS_EVERY": str(proxy.val_every),
        "GPTQ_RESERVE_SECONDS": "0", "SLIDING_WINDOW_ENABLED": "0",   # the plain score is the one compared
        "ROPE_DIMS": str(16 * proxy.dim // proxy.heads // 64),       # 16 of 64 head dims on the pod: same share
    }
    for key, fracs in s.layer_env.items():
        env[key] = ",".join(str(min(layers - 1, round(f * layers))) for f in fracs)
    for key, value in {**getattr(extra_module(s), "ENV", {}), **s.env}.items():
        # "@f": a count of layers as a fraction of the depth; "=expr": computed from the knobs set above
        if value.startswith("@"):
            value = str(max(1, round(eval(value[1:]) * layers)))
        elif value.startswith("="):
            value = str(eval(value[1:], {}, {k: int(v) for k, v in env.items() if v.lstrip("-").isdigit()}))
        env[key] = value
    ratio = steps / s.pod_steps
    for key, pod_value in s.step_env.items():
        env[key] = str(max(1, round(pod_value * ratio)))
    if s.ema:   # the records' EMA (0.997 over ~5,000 steps) spans the same fraction of a short run
        span = 1 / (1 - s.pod_ema) / s.pod_steps
        env["EMA_DECAY"] = f"{1 - 1 / max(2.0, span * steps):.6f}"
    return env


CURVE = re.compile(r"^(?:step:)?(\d+)/\d+ val_loss:\s*([\d.]+) val_bpb:\s*([\d.]+)")


def parse_log(text: str, final: str) -> dict:
    """Steps, the val curve (step, bpb) and the final score the script printed under its own label."""
    curve = [(int(m.group(1)), float(m.group(3))) for m in map(CURVE.match, text.splitlines()) if m]
    finals = re.findall(rf"^{re.escape(final)} val_loss:\s*([\d.]+) val_bpb:\s*([\d.]+)", text, re.M)
    steps = re.findall(r"stopping_early: wallclock_cap train_time:\s*\d+ms step:\s*(\d+)", text)
    pre = re.findall(r"pre-quantization post-ema val_loss:\s*[\d.]+ val_bpb:\s*([\d.]+)", text)
    minutes = re.findall(r"^\d+/\d+ train_loss:.* train_time:\s*([\d.]+)m\b", text, re.M)   # printed at 0.1 min
    return {"final_bpb": float(finals[-1][1]) if finals else None,
            "final_loss": float(finals[-1][0]) if finals else None,
            "steps": int(steps[-1]) if steps else (curve[-1][0] if curve else None), "curve": curve,
            "pre_quant_bpb": float(pre[-1]) if pre else None,
            "train_seconds": 60 * float(minutes[-1]) if minutes else None}


def parse_ours(path: Path) -> dict:
    """The same figures from our run's logs/<RUN_ID>.json (the final score is the reloaded artifact's)."""
    if not path.exists():
        return {"final_bpb": None, "final_loss": None, "steps": None, "curve": [], "pre_quant_bpb": None,
                "train_seconds": None}
    js = json.loads(path.read_text())
    return {"final_bpb": js["val_bpb"], "final_loss": js["val_loss"], "steps": js["steps"],
            "plain_bpb": js.get("post_quant_val_bpb"),   # the plain windows' score (the final may be sliding)
            "curve": [(c["step"], c["val_bpb"]) for c in js["curve"]], "pre_quant_bpb": js.get("pre_quant_val_bpb"),
            "train_seconds": js.get("train_seconds")}


def run(name: str, proxy_name: str, seed: int, out: Path, threads: int = 1) -> dict:
    """One patched run in its own process (the scripts keep global state); returns parse_log's dict."""
    proxy, s = PROXIES[proxy_name], None if name == DEMO else spec(name)
    out.mkdir(parents=True, exist_ok=True)
    data = stage_data(out, proxy.corpus, 1024 if name == DEMO else vocab(name, proxy))
    steps = 0 if name == DEMO else expected_steps(name, proxy)
    knobs = (demo_env(proxy, seed, data, out) if name == DEMO else ours_env(name, proxy, seed, data, steps, out)
             if name in OURS else script_env(name, proxy, seed, data, steps))
    env = {**os.environ, **knobs, "OMP_NUM_THREADS": str(threads), "PORT_CLOCK": proxy.clock}
    log = out / f"{name}_{proxy_name}_s{seed}.txt"
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, __file__, "--exec", name], cwd=out, env=env, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    figures = parse_ours(out / "logs" / f"{name}_s{seed}.json") if s is None or name in OURS else \
        parse_log(log.read_text(errors="replace"), s.final)
    result = {"script": name, "proxy": proxy_name, "seed": seed, "seconds": round(time.time() - t0, 1),
              "rc": rc, "pod_bpb": s and s.pod_bpb, **figures}
    if rc != 0 or result["final_bpb"] is None:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty)"]
        raise SystemExit(f"error: {name} seed {seed} failed (rc {rc}); see {log}: {tail[0][:200]}")
    return result


def exec_script(name: str) -> None:
    """Child process: patch and run the record's code as __main__."""
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if os.environ.get("PORT_CLOCK") == "cpu":   # every script times itself with time.perf_counter
        time.perf_counter = time.process_time
    if name in OURS or name == DEMO:   # ours needs no port: it runs on the CPU as it is
        import runpy
        sys.argv = [str(ROOT / "train_gpt.py")]
        return runpy.run_path(sys.argv[0], run_name="__main__")
    s = spec(name)
    src = patch_source(read_source(s), s, int(os.environ["MODEL_DIM"]))
    path = Path(f"{name}_patched.py").resolve()   # in the run's scratch directory: what ran, for the record
    path.write_text(src)
    with cpu_runtime(s):
        exec(compile(src, str(path), "exec"), {"__name__": "__main__", "__file__": str(path)})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--script", choices=sorted([*SCRIPTS, *STANDINS, DEMO]))
    ap.add_argument("--proxy", default="wall", choices=sorted(PROXIES))
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--out", type=Path, default=Path("/tmp/proxy_fidelity"))
    ap.add_argument("--exec", dest="exec_name", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.exec_name:
        return exec_script(a.exec_name)
    if not a.script:
        ap.error("--script is required")
    print(json.dumps(run(a.script, a.proxy, a.seed, a.out / f"{a.script}_{a.proxy}_s{a.seed}")))


if __name__ == "__main__":
    main()
