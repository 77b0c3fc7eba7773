#!/usr/bin/env python3
"""The CPU demo beside the naive baseline and the 2026-04-05 record's script at equal wallclock (issue 25).

    python experiments/proxy_fidelity/demo_side_by_side.py run [--seeds 1337] [--jobs 2]
    python experiments/proxy_fidelity/demo_side_by_side.py report

`run` trains each of port.DEMO (train_gpt.py as `bash run.sh` ships it on CPU), naive and r0405 (their own
code, ported by port.py at the proxies' scale) for the demo's clock (331 s of training) and for half of it (a
machine twice as slow), on the bundled corpus and on vimdoc: port.py's wall, wall_half, wall_vimdoc and
wall_half_vimdoc. One thread a run, --jobs at a time, every run timed in its own CPU seconds, so each gets the
same compute whatever else shares the machine; runs already in the results file are skipped. `report` prints,
per corpus and clock, each one's plain post-quantization val_bpb (the scripts' compared score; ours also its
sliding one, the demo's own) and steps, and the demo's margin over the better of the two."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
import calibrate  # noqa: E402
import port  # noqa: E402

PROXIES = ("wall", "wall_half", "wall_vimdoc", "wall_half_vimdoc")
SCRIPTS = (port.DEMO, "naive", "r0405")
RESULTS = Path(__file__).parent / "demo_side_by_side.jsonl"


def report(df: pd.DataFrame) -> str:
    """One row per (corpus, clock): every script's plain score and steps (means over the seeds run)."""
    df = df.assign(plain=df.plain_bpb.fillna(df.final_bpb) if "plain_bpb" in df else df.final_bpb)
    lines = ["| corpus | clock (s) | seeds | naive | r0405 (2026-04-05) | demo, plain | demo, sliding | "
             "demo − best other (plain) |", "|---|---|---|---|---|---|---|---|"]
    for proxy in PROXIES:
        got = df[df.proxy == proxy].groupby("script")
        if not set(SCRIPTS) <= set(got.groups):
            continue
        m, steps = got[["plain", "final_bpb"]].mean(), got.steps.mean()
        cell = {s: f"{m.at[s, 'plain']:.4f} ({steps[s]:.0f} st)" for s in SCRIPTS}
        margin = m.at[port.DEMO, "plain"] - min(m.at["naive", "plain"], m.at["r0405", "plain"])
        p = port.PROXIES[proxy]
        lines.append(f"| {p.corpus} | {p.seconds:g} | {got.size().min()} | {cell['naive']} | {cell['r0405']} | "
                     f"{cell[port.DEMO]} | {m.at[port.DEMO, 'final_bpb']:.4f} | {margin:+.4f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["run", "report"])
    ap.add_argument("--seeds", default="1337")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=Path("/tmp/demo_side_by_side"))
    a = ap.parse_args(argv)
    if a.command == "run":
        calibrate.run_all(list(PROXIES), list(SCRIPTS), [int(s) for s in a.seeds.split(",")], a.jobs, a.results,
                          a.out)
    print(report(pd.read_json(a.results, lines=True)))


if __name__ == "__main__":
    main()
