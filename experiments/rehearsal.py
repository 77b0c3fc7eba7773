"""The pod rehearsal: train_gpt.py's whole production code path at production shapes, run anywhere in
minutes, so a broken path shows before a pod is paid for. `REHEARSAL=1 bash run.sh` runs it with
PROFILE=rehearsal (experiments/profile.sh: two one-sequence steps, the compile warm-up with late QAT, no
wallclock cap), on FineWeb if it is here, else on the demo corpus.

    PROFILE=rehearsal . experiments/profile.sh && python experiments/rehearsal.py

What this file adds to the profile: the validation split is cut to 8 sliding windows, and the fit to the
cap takes one GPTQ pass (the full-size export with the real compressor, a reload and the eval still run).
Each phase's seconds are in the last lines, as in any run.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

TOOL_VARS = ("REHEARSAL", "PROFILE", "ABLATE_CALLER_VARS")


def short_preflight(real):
    def preflight(hp: tg.Hyperparameters, *args, **kwargs) -> tg.RunData:
        data = real(hp, *args, **kwargs)
        data.val_tokens = data.val_tokens[:hp.eval_seq_len + 8 * hp.eval_stride + 1]
        return data
    return preflight


def main(environ: dict | None = None) -> dict:
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if k not in TOOL_VARS}
    real, passes = tg.preflight, tg.FIT_PASSES
    tg.preflight, tg.FIT_PASSES = short_preflight(real), 1
    try:
        return tg.main(env)
    finally:
        tg.preflight, tg.FIT_PASSES = real, passes


if __name__ == "__main__":
    tg.cli(main)
