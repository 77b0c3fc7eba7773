"""Where a training step's milliseconds go in train_gpt.py, component by component: the real Trainer,
each part wrapped in a wall-clock timer (CPU ops are synchronous, so wall time is the cost).
    python experiments/overhead/profile_step.py        (env vars as for train_gpt.py; ITERATIONS steps)
Prints ms/step per component; `forward+backward` is the step minus everything timed separately."""
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt as tg  # noqa: E402

SPENT: dict[str, float] = defaultdict(float)
PARTS = {"data": (tg.Trainer, "next_batches"), "muon": (tg.Muon, "step"), "adam": (torch.optim.AdamW, "step"),
         "averages (EMA)": (tg.EMA, "update"), "sync (loss, clock)": (tg.Trainer, "sync"),
         "logging": (tg.Trainer, "log_progress"), "step total": (tg.Trainer, "train_step")}


def timed(owner, name: str, label: str) -> None:
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - t0
    setattr(owner, name, wrapper)


def main() -> None:
    for label, (owner, name) in PARTS.items():
        timed(owner, name, label)
    timed(torch.nn.utils, "clip_grad_norm_", "grad clip")
    env = {**os.environ, "VAL_LOSS_EVERY": "0", "MAX_WALLCLOCK_SECONDS": "0", "RUN_ID": f"profile_{os.getpid()}",
           "LOG_DIR": "/tmp/profile_step_logs", "ARTIFACT_DIR": "/tmp/profile_step_art", "RECORDS_DIR": "/tmp/profile_step_rec"}
    out = tg.main(env)
    steps = out["steps"]
    inside = sum(SPENT[k] for k in ("muon", "adam", "grad clip", "sync (loss, clock)"))
    SPENT["forward+backward"] = SPENT["step total"] - inside
    loop = 1000 * out["train_seconds"] / steps
    for label in ("data", "forward+backward", "muon", "adam", "grad clip", "sync (loss, clock)", "averages (EMA)",
                  "logging"):
        print(f"{label:>20}: {1000 * SPENT[label] / steps:8.2f} ms/step")
    print(f"{'main loop':>20}: {loop:8.2f} ms/step  (steps {steps})")


if __name__ == "__main__":
    main()
