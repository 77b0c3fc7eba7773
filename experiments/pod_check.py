"""The one-GPU check: what a pod run of the default recipe would spend, measured on one H100 in under 8
minutes with no network, side by side with the 2026-04-27 record's own script on the same GPU.

    bash experiments/pod_check.sh prepare      # here, with the registry: wheels, data sample, record's source
    bash experiments/pod_check.sh --out DIR    # there: the phases below, DIR/pod_check.json + summary.txt
    bash experiments/pod_check.sh --cpu        # anywhere: the same phases at tiny shapes (the suite runs it)

Each phase runs in its own process under its own time budget (PHASE_BUDGETS; the whole check stops itself at
TOTAL_BUDGET_S) and writes what it has measured as it goes, so a phase that fails or runs out of time is one
line in the JSON (`status`, `error`) with its figures so far, and the next phase still runs.

- env: torch, CUDA and driver versions, the GPU's name, whether flash_attn_interface imports against this
  torch, and the attention backend train_gpt.py picks.
- train_ours: train_gpt.py under PROFILE=record_0427 (what `bash run.sh` trains on a pod) at the per-GPU
  production shape: 8 micro-batches of 98,304 tokens a step (786,432 tokens, as one GPU of the pod's eight
  runs them with ACCUM_SPLITS=8), seq 2048, compiled, bf16. The compile warm-up's seconds (the production
  prime_compile), then ms/step at one crawler loop and at three (median of 10 warm steps each), and the peak
  memory (allocated and reserved) over those steps.
- train_record: the record's own train_gpt.py at the same shape on the same GPU (its grad accumulation on one
  GPU is the same 8 x 98,304), on the same data, patched only where it must be: its entry calls its own
  train_model with a timer after each step, and where FA3 is absent its attention goes to SDPA (as ours
  does) with its packing loader's document starts dropped, so its varlen windows are the 2048-token windows
  SDPA computes exactly. Its first step at each loop count carries its compile: that step less the median.
- ttt: one LoRA TTT batch (TTT=lora) of 64 documents x 2,048 tokens: peak memory and seconds a chunk (the
  second call's scored pass), the first call's warm-up (lora_ttt's compile, off its clock), and the graphs
  compiled over three batch sizes (64, 23 and 7 documents), each call's own.
- export: GPTQ calibration seconds at the record's size (16 micro-batches of 98,304 tokens on one rank) and the
  whole export's seconds (Hessians, quantization, LQER, the fit's passes, brotli packing).
- eval: the compiled eval forward's compile seconds and its warm tokens a second at the profile's windows.

`python experiments/cost_model.py --pod-check DIR/pod_check.json` prints the cost model's projection beside
each measured figure. The CPU mode (`--cpu`) runs every phase at tiny shapes (eager compile backend, dim 64),
the record's script through its CPU port (experiments/proxy_fidelity/port.py), so this file cannot rot
before a GPU comes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PORT_DIR = ROOT / "experiments" / "proxy_fidelity"
# What `prepare` writes and the device command carries (git-ignored): wheels, the data sample, the record's source.
CARRY = ROOT / ".pod_check"
RECORD_SOURCE = CARRY / "record" / "r0427_train_gpt.py"
CARRY_LIMIT_MIB = 60

PHASES = ("env", "train_ours", "train_record", "ttt", "export", "eval")
TOTAL_BUDGET_S = 480.0
# Seconds each phase may take on the GPU, process start and imports included (the trainings' compiles, ~1-2
# minutes each at these shapes, are most of them). The CPU mode doubles them: a shared 2-core machine is slow,
# and there the budgets only bound a hang.
PHASE_BUDGETS = {"env": 15, "train_ours": 120, "train_record": 120, "ttt": 80, "export": 100, "eval": 35}
# Every phase's figures when it ran through (tests/test_pod_check.py holds the CPU mode to them).
FIELDS = {
    "env": ("python", "torch", "cuda", "driver", "gpu_name", "flash_attn_interface", "flash_attn_error",
            "attention_backend"),
    "train_ours": ("unique_params", "attention", "micro_batch_tokens", "micro_batches", "seq_len", "warmup_seconds",
                   "compile_seconds", "ms_per_step_loops1", "ms_per_step_loops3", "peak_allocated_gib",
                   "peak_reserved_gib"),
    "train_record": ("model_params", "attention", "micro_batch_tokens", "micro_batches", "seq_len",
                     "ms_per_step_loops1", "ms_per_step_loops3", "compile_seconds_loops1", "compile_seconds_loops3",
                     "peak_allocated_gib", "peak_reserved_gib"),
    "ttt": ("docs", "doc_tokens", "chunks", "batch_seconds", "seconds_per_chunk", "compile_seconds",
            "graphs_compiled", "peak_allocated_gib", "calls"),
    "export": ("calibration_batches", "calibration_tokens", "calibration_seconds", "export_seconds", "passes",
               "bytes_model", "quant_k"),
    "eval": ("seq_len", "stride", "windows", "tokens", "compile_seconds", "warm_seconds", "tokens_per_second"),
}
TIMED_STEPS = {"gpu": 10, "cpu": 3}   # warm steps timed at each loop count (the median is reported)

# The shapes: production on the GPU (PROFILE=record_0427 leaves them at the pod's), tiny on the CPU.
GPU_SHAPE = {"TRAIN_BATCH_TOKENS": "786432", "ACCUM_SPLITS": "8", "TRAIN_SEQ_LEN": "2048", "EVAL_SEQ_LEN": "2048"}
CPU_SHAPE = {"TRAIN_BATCH_TOKENS": "1024", "ACCUM_SPLITS": "8", "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128",
             "EVAL_STRIDE": "128",
             "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "VOCAB_SIZE": "1024",
             "COMPILE_BACKEND": "eager", "TTT_LORA_DOCS": "4", "GPTQ_CALIB_BATCHES": "4",
             # 3 unique blocks, the middle one looped 3 times, lanes from the last: 5 block calls, not 17
             "NUM_FLAT_LAYERS": "2", "NUM_CRAWLER_LAYERS": "1", "CRAWLER_POSITION": "1", "PARALLEL_START": "2"}
# The record's CPU port at the same tiny structure (its NUM_LOOPS=2 is three passes of LOOP_START..LOOP_END).
CPU_RECORD_SHAPE = {"NUM_LAYERS": "3", "LOOP_START": "1", "LOOP_END": "1", "PARALLEL_START_LAYER": "2"}
# TTT's calls: documents each (the first call compiles, the second is the same batch warm; all of them count
# the graphs compiled over three batch sizes), at doc_tokens for the first two, small_doc_tokens after.
GPU_TTT = {"batches": (64, 64, 23, 7), "doc_tokens": 2048, "small_doc_tokens": 512}
CPU_TTT = {"batches": (4, 4, 3, 1), "doc_tokens": 128, "small_doc_tokens": 64}


# ------------------------------------------------------------------------------------------------ the runner


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader (or a killed writer) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def child_command(phase: str, args: argparse.Namespace, work: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--work", str(work)]
    return cmd + ["--cpu"] * args.cpu + (["--record", str(args.record)] if args.record else [])


def run_phase(phase: str, cmd: list[str], budget: float, work: Path) -> dict:
    """One phase, `cmd`, in a child process of its own session (a timeout kills all it started): the figures
    it wrote to work/<phase>.json, then `status` ok / failed / timeout, its seconds and budget, and on
    failure one `error` line (its output's last line)."""
    fragment = work / f"{phase}.json"
    log = work / f"{phase}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    seconds = time.perf_counter() - t0
    result = json.loads(fragment.read_text()) if fragment.exists() else {}
    result.update(seconds=round(seconds, 1), budget_seconds=round(budget, 1))
    if rc == 0:
        result["status"] = "ok"
    elif rc is None:
        result.update(status="timeout", error=f"stopped at its {budget:.0f} s budget; figures so far kept")
    else:
        error = last_line(log.read_text(errors="replace")) or f"exit code {rc}"
        result.update(status="failed", error=error)
    return result


def summary(report: dict) -> str:
    """One line a phase: its status, seconds and figures (lists left out)."""
    lines = [f"pod_check {report['mode']} commit:{report['commit']} date:{report['date']} "
             f"device:{report['device']} seconds:{report['elapsed_seconds']}"]
    for phase, res in report["phases"].items():
        figures = " ".join(f"{k}:{v:.4g}" if isinstance(v, float) else f"{k}:{v}" for k, v in res.items()
                           if k not in ("status", "error", "seconds", "budget_seconds") and
                           not isinstance(v, (list, dict)))
        tail = f" error: {res['error']}" if res.get("error") else ""
        lines.append(f"{phase}: {res['status']} {res.get('seconds', 0)}s {figures}{tail}")
    return "\n".join(lines) + "\n"


def main_runner(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pod_check_"))
    t0, scale = time.perf_counter(), args.budget_scale
    report = {"schema": 1, "mode": "cpu" if args.cpu else "gpu", "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "device": "unknown",
              "budget_seconds": TOTAL_BUDGET_S * scale, "phases": {}}
    try:
        for phase in args.phases:
            left = TOTAL_BUDGET_S * scale - (time.perf_counter() - t0) - 2
            if left < 5:
                report["phases"][phase] = {"status": "skipped", "error": "no time left in the check's budget"}
            else:
                budget = min(PHASE_BUDGETS[phase] * scale, left)
                report["phases"][phase] = run_phase(phase, child_command(phase, args, work), budget, work)
            report["device"] = report["phases"].get("env", {}).get("gpu_name", report["device"])
            report["elapsed_seconds"] = round(time.perf_counter() - t0, 1)
            write_json(out / "pod_check.json", report)
            (out / "summary.txt").write_text(summary(report))
            print(summary(report).splitlines()[-1], flush=True)
    finally:
        for log in sorted(work.glob("*.log")):   # the phases' own output beside the JSON, for a failure's story
            shutil.copy(log, out / f"pod_check_{log.name}")
        shutil.rmtree(work, ignore_errors=True)
    return report


# ------------------------------------------------------------------------------------------------ the phases


class Fragment:
    """A phase's figures, written to its JSON after every put: what a killed phase measured survives."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def put(self, **figures) -> None:
        self.data.update(figures)
        write_json(self.path, self.data)


def gib(n: int) -> float:
    return round(n / 2**30, 3)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0}
    return {"peak_allocated_gib": gib(torch.cuda.max_memory_allocated(device)),
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved(device))}


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def local_data(cpu: bool) -> dict[str, str]:
    """Our knobs' paths to the data sample: on the GPU the carried CaseOps sp8192 sample (the pod default's
    tokenizer), on the CPU the shipped demo corpus at sp1024 (the record's CPU port runs without CaseOps)."""
    if cpu:
        subprocess.run([sys.executable, str(ROOT / "data" / "prepare_local.py")], check=True,
                       stdout=subprocess.DEVNULL)
        return {"DATA_PATH": str(ROOT / "data" / "datasets" / "local_sp1024"),
                "TOKENIZER_PATH": str(ROOT / "data" / "tokenizers" / "local_1024_bpe.model")}
    data = CARRY / "data"
    folder, tokenizer = data / "datasets" / "local_caseops_sp8192", data / "tokenizers" / "local_caseops_8192_bpe.model"
    if not (folder.is_dir() and tokenizer.is_file()):
        raise SystemExit(f"error: no data sample at {folder} — run `bash experiments/pod_check.sh prepare` where "
                         "the package registry is reachable, and carry .pod_check")
    return {"DATA_PATH": str(folder), "TOKENIZER_PATH": str(tokenizer)}


def ours_env(cpu: bool, work: Path, phase: str) -> dict[str, str]:
    """What PROFILE=record_0427 resolves to (experiments/profile.sh, as run.sh applies it on a pod), at the
    check's shape, with no wallclock cap and its outputs in the phase's scratch folder."""
    sys.path.insert(0, str(PORT_DIR))
    import port

    env = port.profile_env("record_0427")
    for tool_var in ("VARIANT", "PROFILE", "ABLATE_CALLER_VARS"):   # run.sh's, not train_gpt.py's
        env.pop(tool_var, None)
    env.update(CPU_SHAPE if cpu else GPU_SHAPE)
    env.update(local_data(cpu))
    env.update(MAX_WALLCLOCK_SECONDS="0", ITERATIONS="100000", VAL_LOSS_EVERY="0", WARMUP_STEPS="2",
               COMPILE="1", RUN_ID=f"pod_check_{phase}", LOG_DIR=str(work / phase / "logs"),
               ARTIFACT_DIR=str(work / phase / "artifacts"), RECORDS_DIR=str(work / phase / "records"))
    return env


def ours_setup(args: argparse.Namespace, phase: str):
    """(train_gpt, its knobs, world, device, the preflight's data, a logger) for one of our phases."""
    sys.path.insert(0, str(ROOT))
    import torch

    import train_gpt as tg

    hp = tg.Hyperparameters.from_env(ours_env(args.cpu, Path(args.work), phase))
    dinfo = tg.DistInfo()
    device = torch.device("cpu") if args.cpu else tg.setup_distributed(dinfo)
    data = tg.preflight(hp, dinfo, device, hp.run_id)
    log = tg.Logger(Path(hp.log_dir) / f"{hp.run_id}.txt")
    return tg, hp, dinfo, device, data, log


def phase_env(args: argparse.Namespace, out: Fragment) -> None:
    import torch

    out.put(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
            cuda_available=torch.cuda.is_available())
    try:
        import flash_attn_interface  # noqa: F401

        out.put(flash_attn_interface=True, flash_attn_error="")
    except Exception as exc:  # noqa: BLE001 - any failure to import is the answer
        out.put(flash_attn_interface=False, flash_attn_error=last_line(f"{type(exc).__name__}: {exc}"))
    smi = shutil.which("nvidia-smi")
    driver = ""
    if smi:
        query = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30)
        driver = query.stdout.strip().splitlines()[0] if query.stdout.strip() else ""
    out.put(driver=driver or "none")
    sys.path.insert(0, str(ROOT))
    import train_gpt as tg

    device = torch.device("cuda") if torch.cuda.is_available() and not args.cpu else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else tg.device_name(device)
    out.put(gpu_name=name, attention_backend=tg.attention_backend(device))
    if not args.cpu and device.type != "cuda":
        raise SystemExit("error: torch sees no CUDA device here: the GPU phases need one (run with --cpu to "
                         "check the script itself)")


def phase_train_ours(args: argparse.Namespace, out: Fragment) -> None:
    tg, hp, dinfo, device, data, log = ours_setup(args, "train_ours")
    trainer = tg.build_training(hp, data, dinfo, device, log, hp.run_id)
    out.put(unique_params=tg.count_unique_params(trainer.model), attention=data.backend,
            micro_batch_tokens=hp.train_batch_tokens // hp.accum_splits, micro_batches=hp.accum_splits,
            seq_len=hp.train_seq_len, loop_counts=trainer.loop_counts())
    synchronize(device)
    t0 = time.perf_counter()
    trainer.prime_compile()   # production: every loop count's graph, off the clock
    synchronize(device)
    out.put(warmup_seconds=round(time.perf_counter() - t0, 2),
            warmup_steps=max(hp.warmup_steps, 2 * len(trainer.loop_counts())))
    reset_peak(device)
    momentum = tg.muon_momentum(hp, 0)
    for loops in sorted({1, hp.crawler_loops}):
        times = []
        for _ in range(timed_steps(args.cpu)):   # as Trainer.train's loop: data, step, EMA
            synchronize(device)
            t = time.perf_counter()
            trainer.train_step(trainer.next_batches(), 1.0, momentum, loops)
            trainer.ema.update(trainer.model)
            synchronize(device)
            times.append(1000 * (time.perf_counter() - t))
        out.put(**{f"ms_per_step_loops{loops}": round(statistics.median(times), 2),
                   f"ms_steps_loops{loops}": [round(x, 2) for x in times]})
        out.put(**peak_memory(device))
    warm = statistics.median(out.data[f"ms_steps_loops{min(trainer.loop_counts())}"]) / 1000
    out.put(compile_seconds=round(out.data["warmup_seconds"] - out.data["warmup_steps"] * warm, 2))


class RecordDone(BaseException):
    """Raised by the step timer once every timed step ran: the record's run stops there, before its eval."""


def timed_steps(cpu: bool) -> int:
    return TIMED_STEPS["cpu" if cpu else "gpu"]


def record_env(cpu: bool, work: Path) -> dict[str, str]:
    """The record's own knobs as its pod run set them (its log's Hyperparameters: ports_r0427.ENV), at the
    check's shape: loops on for the second half of ITERATIONS, no warm-up (its first step at each loop count
    compiles), no wallclock cap, no TTT."""
    sys.path.insert(0, str(PORT_DIR))
    import port

    steps = 2 * (timed_steps(cpu) + 1)
    if cpu:
        proxy = port.Proxy(dim=64, heads=2, kv_heads=1, depth=1.0, seq_len=128, batch_tokens=1024, steps=steps)
        data = port.stage_data(work / "record", "local", 1024)
        env = {**port.script_env("r0427", proxy, 1337, data, steps), **CPU_RECORD_SHAPE}
    else:
        import ports_r0427

        data = stage_caseops(work / "record")
        env = {**ports_r0427.ENV, "CASEOPS_ENABLED": "1", "FUSED_CE_ENABLED": "1", "COMPRESSOR": "brotli",
               "DATA_PATH": str(data), "TOKENIZER_PATH": str(data / "tokenizer.model"), "SEED": "1337",
               "TRAIN_BATCH_TOKENS": GPU_SHAPE["TRAIN_BATCH_TOKENS"], "TRAIN_SEQ_LEN": GPU_SHAPE["TRAIN_SEQ_LEN"]}
    env.update(ITERATIONS=str(steps), ENABLE_LOOPING_AT="0.5", WARMUP_STEPS="0", MAX_WALLCLOCK_SECONDS="0",
               VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="100000", TTT_ENABLED="0", RUN_ID="pod_check_record",
               ARTIFACT_DIR=str(work / "record" / "artifacts"))
    return env


def stage_caseops(folder: Path) -> Path:
    """The CaseOps sample under the record's file names (fineweb_{train,val,val_bytes}_*.bin)."""
    src = Path(local_data(cpu=False)["DATA_PATH"])
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("local_caseops_*.bin")):
        split = f.name.removeprefix("local_caseops_")
        if split.startswith(("train_", "val_")):
            link = folder / f"fineweb_{split}"
            link.unlink(missing_ok=True)
            link.symlink_to(f)
    tok = folder / "tokenizer.model"
    tok.unlink(missing_ok=True)
    tok.symlink_to(local_data(cpu=False)["TOKENIZER_PATH"])
    return folder


def record_source(args: argparse.Namespace) -> str:
    """The record's readable train_gpt.py: --record, the carried copy, else the openai/parameter-golf mirror."""
    sys.path.insert(0, str(PORT_DIR))
    import port

    if args.record and not args.record.is_file():
        raise SystemExit(f"error: --record {args.record}: no such file")
    for path in (args.record, RECORD_SOURCE):
        if path and Path(path).is_file():
            return port.decode_stub(Path(path).read_text())

    try:
        return port.read_source(port.SCRIPTS["r0427"])
    except SystemExit:
        raise SystemExit(f"error: the record's script is not at {RECORD_SOURCE} nor in a clone of "
                         "openai/parameter-golf (PG_REPO) — run `bash experiments/pod_check.sh prepare` "
                         "where one is") from None


# Measurement-only patches: the entry calls train_model through the harness, and a timer follows every step.
ENTRY = ("    train_and_eval(h, device)\n", "    _pod_check_train(h, device)\n")
STEP = ("        train_loss = step_fn(step, scale)\n",
        "        train_loss = step_fn(step, scale)\n        _pod_check_step(step, base_model.looping_active)\n")
# Without FA3 (GPU only): its packing loader's document starts dropped, so every varlen segment is one
# TRAIN_SEQ_LEN window, which the fake's SDPA computes exactly (ours attends the same windows).
NO_DOC_STARTS = ("        starts = self._local_doc_starts(local_start, inputs.numel())\n", "        starts = []\n")


def patch(src: str, old: str, new: str) -> str:
    if src.count(old) != 1:
        raise SystemExit(f"error: the record's script no longer has exactly one {old.strip()[:50]!r}")
    return src.replace(old, new)


def sdpa_fa3_module():
    """flash_attn_interface computed by SDPA on CUDA: dense causal attention in FA3's [B, T, H, D] layout, and
    varlen attention over uniform windows of max_seqlen (what NO_DOC_STARTS leaves), both traceable."""
    import types

    import torch.nn.functional as F

    def flash_attn_func(q, k, v, causal=True, **_):
        # k and v's heads repeated for GQA: the record's entry leaves SDPA's flash kernel alone enabled
        group = q.shape[2] // k.shape[2]
        k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=causal)
        return y.transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                               **_):
        t, window = q.shape[0], max_seqlen_q
        windows = [x.reshape(t // window, window, *x.shape[1:]) for x in (q, k, v)]
        return flash_attn_func(*windows, causal=causal).reshape(q.shape)

    fa = types.ModuleType("flash_attn_interface")
    fa.flash_attn_func, fa.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return fa


def phase_train_record(args: argparse.Namespace, out: Fragment) -> None:
    work = Path(args.work)
    src = record_source(args)
    env = record_env(args.cpu, work)
    os.environ.update(env)   # the record reads its knobs from the process environment (this child's own)
    (work / "record").mkdir(parents=True, exist_ok=True)
    os.chdir(work / "record")   # its logs/ land in the scratch folder
    sys.path.insert(0, str(PORT_DIR))
    import port
    import torch

    runtime = contextlib.nullcontext()
    if args.cpu:
        spec = port.SCRIPTS["r0427"]
        src = port.patch_source(src, spec, int(env["MODEL_DIM"]))
        runtime = port.cpu_runtime(spec)
        out.put(attention="sdpa (CPU port)")
    else:
        try:
            import flash_attn_interface  # noqa: F401

            out.put(attention="fa3")
        except Exception:  # noqa: BLE001
            sys.modules["flash_attn_interface"] = sdpa_fa3_module()
            src = patch(src, *NO_DOC_STARTS)
            out.put(attention="sdpa (FA3 absent: 2048-token windows)")
    src = patch(patch(src, *ENTRY), *STEP)
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    stamps: list[tuple[bool, float]] = []
    clock = {"t": 0.0}

    def step_timer(step: int, looping: bool) -> None:
        synchronize(device)
        now = time.perf_counter()
        stamps.append((bool(looping), now - clock["t"]))
        clock["t"] = now
        report()
        if len(stamps) >= 2 * (timed_steps(args.cpu) + 1):
            raise RecordDone

    def report() -> None:
        figures = {}
        for looping, loops in ((False, 1), (True, 3)):
            seconds = [s for lp, s in stamps if lp == looping]
            if len(seconds) > 1:
                warm = statistics.median(seconds[1:])
                figures.update({f"ms_per_step_loops{loops}": round(1000 * warm, 2),
                                f"ms_steps_loops{loops}": [round(1000 * s, 2) for s in seconds[1:]],
                                f"first_step_seconds_loops{loops}": round(seconds[0], 2),
                                f"compile_seconds_loops{loops}": round(seconds[0] - warm, 2)})
        out.put(steps=len(stamps), **figures, **peak_memory(device))

    def harness(h, dev) -> None:
        val_data = glb["ValidationData"](h, dev)
        out.put(micro_batch_tokens=h.train_batch_tokens // h.grad_accum_steps, micro_batches=h.grad_accum_steps,
                seq_len=h.train_seq_len)
        reset_peak(dev)
        clock["t"] = time.perf_counter()
        try:
            glb["train_model"](h, dev, val_data)
        except RecordDone:
            pass
        report()
        out.put(model_params=sum(p.numel() for p in glb["GPT"](h).parameters()))

    path = work / "record" / "r0427_patched.py"
    path.write_text(src)
    glb = {"__name__": "__main__", "__file__": str(path), "_pod_check_train": harness,
           "_pod_check_step": step_timer}
    with runtime:
        exec(compile(src, str(path), "exec"), glb)
    if len(stamps) < 2 * (timed_steps(args.cpu) + 1):
        raise SystemExit(f"error: the record's training ran {len(stamps)} steps, not {2 * (timed_steps(args.cpu) + 1)}")


def synthetic_documents(tg, tokens, docs: int, doc_tokens: int):
    """`docs` documents of `doc_tokens` targets each, cut from training tokens: BOS, then doc_tokens - 1
    tokens, and one closing token (documents() ends a document at the next BOS)."""
    import torch

    body = tokens[: docs * (doc_tokens - 1)].reshape(docs, doc_tokens - 1).to(torch.int64)
    bos = torch.full((docs, 1), tg.BOS_ID, dtype=torch.int64)
    return torch.cat([torch.cat([bos, body], 1).reshape(-1), torch.tensor([tg.BOS_ID])])


def phase_ttt(args: argparse.Namespace, out: Fragment) -> None:
    import dataclasses

    import torch
    from torch._dynamo.utils import counters

    tg, hp, dinfo, device, data, log = ours_setup(args, "ttt")
    shape = CPU_TTT if args.cpu else GPU_TTT
    hp = dataclasses.replace(hp, ttt="lora", ttt_lora_docs=shape["batches"][0])
    torch.manual_seed(hp.seed)
    model = tg.CrawlerGPT(hp).to(device)
    model.set_backends(data.backend)
    model.eval()
    train = tg.load_data_shard(data.train_files[0], hp.vocab_size)
    out.put(docs=hp.ttt_lora_docs, doc_tokens=shape["doc_tokens"], chunk_tokens=hp.ttt_lora_chunk,
            lora_rank=hp.ttt_lora_rank, chunks=-(-shape["doc_tokens"] // hp.ttt_lora_chunk))
    graphs0, calls = counters["stats"]["unique_graphs"], []
    for i, docs in enumerate(shape["batches"]):
        length = shape["doc_tokens"] if i < 2 else shape["small_doc_tokens"]
        stream = synthetic_documents(tg, train, docs, length)
        tb = torch.ones(stream.numel() - 1, dtype=torch.int64, device=device)   # bytes do not change the cost
        reset_peak(device)
        graphs, clock = counters["stats"]["unique_graphs"], tg.Clock()   # lora_ttt pauses it for its warm-up
        synchronize(device)
        t = time.perf_counter()
        with clock.running():
            tg.lora_ttt(model, stream, tb, hp.eval_seq_len, hp, dinfo, device, log, clock)
            synchronize(device)
        wall = time.perf_counter() - t
        calls.append({"docs": docs, "doc_tokens": length, "seconds": round(wall, 3),
                      "scored_seconds": round(clock.seconds, 3), "warmup_seconds": round(wall - clock.seconds, 3),
                      "graphs": counters["stats"]["unique_graphs"] - graphs, **peak_memory(device)})
        figures = {"calls": calls, "graphs_compiled": counters["stats"]["unique_graphs"] - graphs0}
        if i == 0:   # the first warm-up compiles; the later ones find the graphs compiled
            figures.update(peak_memory(device), compile_seconds=calls[0]["warmup_seconds"])
        if i == 1:
            figures.update(seconds_per_chunk=round(calls[1]["scored_seconds"] / out.data["chunks"], 4),
                           batch_seconds=calls[1]["scored_seconds"])
        out.put(**figures)


def phase_export(args: argparse.Namespace, out: Fragment) -> None:
    import torch

    tg, hp, dinfo, device, data, log = ours_setup(args, "export")
    torch.manual_seed(hp.seed)
    model = tg.CrawlerGPT(hp).to(device)
    model.set_backends(data.backend)
    loader = tg.DistributedTokenLoader(data.train_files, dinfo, device, hp)
    batches = tg.calibration_batches(loader, hp, dinfo)
    out.put(calibration_batches=len(batches), calibration_tokens=sum(b.numel() for b in batches))
    spent, real = [0.0], tg.collect_hessians

    def timed_hessians(*a, **k):   # every call: the float Hessians, and each pass's loop-aware phase 2
        synchronize(device)
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            synchronize(device)
            spent[0] += time.perf_counter() - t

    real_pack, packs = tg.pack_as, []

    def timed_pack(*a, **k):   # each fit pass's brotli pack, reported as it ends: a timeout keeps them
        t = time.perf_counter()
        try:
            return real_pack(*a, **k)
        finally:
            packs.append(round(time.perf_counter() - t, 2))
            out.put(pack_seconds=packs, hessian_seconds_so_far=round(spent[0], 2))

    tg.collect_hessians, tg.pack_as = timed_hessians, timed_pack
    t0 = time.perf_counter()
    try:
        synchronize(device)
        t = time.perf_counter()
        real(model, batches, tg.gptq_targets(tg.storage_plan(model, hp), hp, hp.quant), dinfo)
        synchronize(device)
        out.put(calibration_seconds=round(time.perf_counter() - t, 3))
        t0 = time.perf_counter()
        final = tg.export_model(model, hp, batches, dinfo, log, tg.artifact_meta(hp))
    finally:
        tg.collect_hessians, tg.pack_as = real, real_pack
    out.put(export_seconds=round(time.perf_counter() - t0, 2), hessian_seconds_in_export=round(spent[0], 2),
            passes=final.passes, bytes_model=final.size, quant_k=round(final.quant_k, 3))


def phase_eval(args: argparse.Namespace, out: Fragment) -> None:
    import torch

    tg, hp, dinfo, device, data, log = ours_setup(args, "eval")
    torch.manual_seed(hp.seed)
    model = tg.CrawlerGPT(hp).to(device)
    model.set_backends(data.backend)
    compiled = tg.compile_model(model, hp, device)
    seq, stride = hp.eval_seq_len, min(hp.eval_stride, hp.eval_seq_len)
    # Training tokens, as many windows as a full eval batch holds: the sample's val split is shorter than one
    # batch at seq 2048. The bytes do not change the cost.
    # The pod's per-GPU batch of windows (VAL_BATCH_SIZE is all 8 ranks' together), four batches of them
    batch = max(1, min(hp.val_batch_size // (seq * 8), 4 if args.cpu else 2**20))
    tokens = tg.load_data_shard(data.train_files[0], hp.vocab_size)[: seq + (4 * batch - 1) * stride + 1]
    windows = len(tg.sliding_windows(tokens.numel(), seq, stride))
    tb = torch.ones(tokens.numel(), dtype=torch.int64)
    passes = []
    for _ in range(2):   # the first compiles
        synchronize(device)
        t = time.perf_counter()
        tg.evaluate(compiled, tokens, tb, seq, stride, batch * seq, dinfo, device)
        synchronize(device)
        passes.append(time.perf_counter() - t)
    out.put(seq_len=seq, stride=stride, batch_windows=batch, windows=windows, tokens=tokens.numel() - 1, compile_seconds=round(passes[0] - passes[1], 2),
            warm_seconds=round(passes[1], 3), tokens_per_second=round((tokens.numel() - 1) / passes[1]),
            **peak_memory(device))


CHILDREN = {"env": phase_env, "train_ours": phase_train_ours, "train_record": phase_train_record,
            "ttt": phase_ttt, "export": phase_export, "eval": phase_eval}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (the suite's check of this file)")
    p.add_argument("--out", default=os.environ.get("OUT") or "pod_check_out", help="folder for the JSON")
    p.add_argument("--record", type=Path, help="the record's train_gpt.py (default: carried, else the mirror)")
    p.add_argument("--phases", type=lambda s: s.split(","), default=list(PHASES),
                   help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--budget-scale", type=float, help="multiply every time budget (default 1, 2 with --cpu)")
    p.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.budget_scale = args.budget_scale or (2.0 if args.cpu else 1.0)
    unknown = [ph for ph in args.phases if ph not in PHASES]
    if unknown:
        p.error(f"unknown phase {unknown[0]!r}: expected some of {','.join(PHASES)}")
    if args.child:
        if args.cpu:   # one thread a phase: a shared machine's other work then slows it least
            import torch

            torch.set_num_threads(1)
        out = Fragment(Path(args.work) / f"{args.child}.json")
        CHILDREN[args.child](args, out)
        return
    report = main_runner(args)
    failed = [ph for ph, res in report["phases"].items() if res["status"] != "ok"]
    print(f"pod_check: {len(report['phases']) - len(failed)} of {len(report['phases'])} phases ok; "
          f"{Path(args.out) / 'pod_check.json'}" + (f"; not ok: {','.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
