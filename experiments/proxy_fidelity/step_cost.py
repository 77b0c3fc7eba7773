#!/usr/bin/env python3
"""Where a training step's milliseconds go: a record's own model and optimizer (port.py's CPU port of its
code) against ours under the PROFILE twin (port.OURS), in one process on one thread, their steps interleaved
so the shared machine's load falls on both alike.

    python experiments/proxy_fidelity/step_cost.py --ours ours_r0405 --steps 12 [--looped] [--profile]

Prints, for each, the median milliseconds of forward+backward and of the optimizer step on random tokens at
the steps200 proxy's scale (dim 128, 8,192 tokens a step, sp1024), and with --profile torch.profiler's
operators ranked by their self CPU time over three more steps. --looped times the loops-on phase."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import port  # noqa: E402

ROOT = port.ROOT
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


def theirs(name: str, env: dict[str, str], looped: bool):
    """The record's GPT and Optimizers from its patched source, imported (its main() does not run)."""
    os.environ.update(env)
    script = port.SCRIPTS[name]
    src = port.patch_source(port.read_source(script), script, int(env["MODEL_DIM"]))
    module = types.ModuleType(f"{name}_port")
    with port.cpu_runtime(script):
        exec(compile(src, f"{name}_patched.py", "exec"), module.__dict__)
        h = module.Hyperparameters()
        if getattr(module, "BOS_ID", 1) is None:   # 2026-04-27 sets it in main(), from its tokenizer: <s> is 1
            module.BOS_ID = 1
        model = module.GPT(h).float()
        model.looping_active = looped
        opts = module.Optimizers(h, model)
    def step(x, y):
        loss = model(x, y)
        loss.backward()
        return loss
    def opt():
        torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip_norm)
        opts.step()
    return model, step, opt


def ours(name: str, env: dict[str, str], looped: bool):
    hp = tg.Hyperparameters.from_env({k: v for k, v in env.items() if k in set(tg.knob_names())})
    model = tg.CrawlerGPT(hp)
    opts = tg.build_optimizers(model, hp, tg.DistInfo())
    loops = hp.crawler_loops if looped else 1
    def step(x, y):
        loss = model(x, y, loops=loops)
        loss.backward()
        return loss
    def opt():
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip_norm)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    return model, step, opt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", default="ours_r0405", choices=sorted(port.OURS))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--looped", action="store_true")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    proxy, twin = port.PROXIES["steps200"], port.OURS[a.ours][1]
    data, work = ROOT / "data", Path("/tmp/step_cost")
    their_env = port.script_env(twin, proxy, 1337, data, 200)
    our_env = port.ours_env(a.ours, proxy, 1337, data, 200, work)
    runs = {twin: theirs(twin, their_env, a.looped), a.ours: ours(a.ours, our_env, a.looped)}
    gen = torch.Generator().manual_seed(0)
    rows = proxy.batch_tokens // proxy.seq_len
    batches = [torch.randint(1, 1024, (rows, proxy.seq_len + 1), generator=gen) for _ in range(a.steps + 4)]
    times = {n: ([], []) for n in runs}
    for i, b in enumerate(batches[:a.steps]):
        for n, (_, step, opt) in runs.items():
            t0 = time.perf_counter()
            step(b[:, :-1], b[:, 1:])
            t1 = time.perf_counter()
            opt()
            t2 = time.perf_counter()
            if i >= 2:   # the first steps allocate the optimizers' state
                times[n][0].append(1000 * (t1 - t0))
                times[n][1].append(1000 * (t2 - t1))
    phase = "loops on" if a.looped else "one loop"
    for n, (model, _, _) in runs.items():
        fb, op = (statistics.median(t) for t in times[n])
        params = sum(p.numel() for p in model.parameters())
        print(f"{n:12s} {phase}: forward+backward {fb:7.1f} ms  optimizer {op:6.1f} ms  total {fb + op:7.1f} ms  "
              f"params {params:,}")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        for n, (_, step, opt) in runs.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for b in batches[a.steps:a.steps + 3]:
                    step(b[:, :-1], b[:, 1:])
                    opt()
            print(f"--- {n}: top operators by self CPU time over 3 steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))


if __name__ == "__main__":
    main()
