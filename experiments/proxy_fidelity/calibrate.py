#!/usr/bin/env python3
"""Score CPU proxies by how they rank published scripts against the pod.

    python experiments/proxy_fidelity/calibrate.py run --proxy steps200 --scripts naive,r0405 --seeds 1337,42,7
    python experiments/proxy_fidelity/calibrate.py report [--results FILE]
    python experiments/proxy_fidelity/calibrate.py pairs [--pairs pairs.tsv]

`run` calls port.py for every (script, seed) not yet in the results file (JSON lines), --jobs at a time, one
thread each. `report` prints the table script x proxy -> final val_bpb (mean ± std over seeds) and each proxy's
Kendall tau against the pod scores; `pairs` scores the proxy's verdicts on single changes against published pod
ablations (pairs.tsv: each pair's pod Δ with its source, the CPU Δ per seed or as mean and p): sign agreement
where the CPU is significant and over all, and the rank correlation of the two Δs. The derived proxy "extrapolate:<proxy>" fits each run's validation curve
with L(s) = a + b * s^-c and reads it at the step where the run would have seen the pod's tokens."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize, stats

sys.path.insert(0, str(Path(__file__).parent))
import port  # noqa: E402

HERE = Path(__file__).parent
RESULTS = HERE / "results.jsonl"
POD_BATCH_TOKENS = {"naive": 524_288}   # every other script: 786,432 tokens a step (their logs)


def read(path: Path) -> pd.DataFrame:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")] if path.exists() else []
    return pd.DataFrame(rows, columns=["script", "proxy", "seed", "final_bpb", "steps", "seconds", "curve", "pod_bpb"]
                        if not rows else None)


def power_law(s, a, b, c):
    return a + b * np.power(s, -c)


def extrapolate(curve: list, script: str, proxy: port.Proxy) -> float:
    """The fitted val curve at the step where this run would have seen the pod run's tokens."""
    s, y = np.array([p[0] for p in curve if p[0] > 0], float), np.array([p[1] for p in curve if p[0] > 0], float)
    spec = port.spec(script)
    target = spec.pod_steps * POD_BATCH_TOKENS.get(script, 786_432) / proxy.batch_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (a, b, c), _ = optimize.curve_fit(power_law, s, y, p0=(y[-1] * 0.8, y[0], 0.5),
                                          bounds=([0, 0, 0.01], [10, 1e3, 3]), maxfev=20000)
    return float(power_law(target, a, b, c))


def with_derived(df: pd.DataFrame) -> pd.DataFrame:
    """The measured proxies plus, for each, its curve read out at the pod's token count. A proxy at the scripts'
    own vocabularies runs the sp1024 scripts exactly as its sp1024 twin did: their rows are shared."""
    for name, proxy in port.PROXIES.items():
        twin = next((t for t, p in port.PROXIES.items() if p == replace(proxy, own_vocab=False)), None)
        if proxy.own_vocab and twin:
            same = df[(df.proxy == twin) & df.script.map(lambda s: port.spec(s).pod_vocab == 1024)]
            df = pd.concat([df, same.assign(proxy=name)], ignore_index=True)
    ext = df[df.curve.map(lambda c: isinstance(c, list) and len(c) >= 4)].copy()
    ext["final_bpb"] = [extrapolate(c, s, port.PROXIES[p]) for c, s, p in zip(ext.curve, ext.script, ext.proxy)]
    ext["proxy"] = "extrapolate:" + ext.proxy
    return pd.concat([df, ext], ignore_index=True)


def kendall(pod: pd.Series, cpu: pd.Series) -> float:
    return float(stats.kendalltau(pod, cpu).statistic) if len(pod) >= 2 else float("nan")


def report(df: pd.DataFrame) -> str:
    df = with_derived(df)
    g = df.groupby(["proxy", "script"]).final_bpb
    table = pd.DataFrame({"mean": g.mean(), "std": g.std(), "n": g.size(), "steps": df.groupby(
        ["proxy", "script"]).steps.mean()}).reset_index()
    table["pod"] = table.script.map(lambda s: port.spec(s).pod_bpb)
    order = sorted(table.script.unique(), key=lambda s: (-port.spec(s).pod_bpb, s in port.STANDINS))
    lines = ["| proxy | " + " | ".join(f"{s} (pod {port.spec(s).pod_bpb})" for s in order) + " | tau |",
             "|---|" + "---|" * (len(order) + 1)]
    for proxy, t in table.groupby("proxy"):
        t = t.set_index("script")
        cells = [f"{t.at[s, 'mean']:.4f} ± {t.at[s, 'std']:.4f} (n {t.at[s, 'n']}, {t.at[s, 'steps']:.0f} st)"
                 if s in t.index else "—" for s in order]
        published = t[~t.index.isin(port.STANDINS)]   # ours and variants stand in for a script: no pod result
        lines.append(f"| {proxy} | " + " | ".join(cells) + f" | {kendall(published['pod'], published['mean']):+.2f} |")
    return "\n".join(lines)


def pairs_report(path: Path) -> str:
    """Each pair's CPU mean Δ and paired p (from its per-seed Δs when given), whether the signs agree, and the
    tallies: agreement where the CPU's p < 0.05, agreement over every pair, Spearman and Kendall of the Δs."""
    df = pd.read_csv(path, sep="\t", dtype={"cpu_per_seed": str})
    for i, v in df.cpu_per_seed.dropna().items():
        d = [float(x) for x in v.split(",")]
        df.loc[i, ["cpu_delta", "cpu_p"]] = np.mean(d), stats.ttest_1samp(d, 0).pvalue if len(d) > 1 else np.nan
    df["agree"] = np.sign(df.pod_delta) == np.sign(df.cpu_delta)
    counted = df[df.cpu_p < 0.05]
    lines = ["| # | change | pod Δ | CPU Δ | CPU p | signs |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.pair} | {r.change} | {r.pod_delta:+.5f} | {r.cpu_delta:+.4f} | "
              f"{'—' if np.isnan(r.cpu_p) else f'{r.cpu_p:.3f}'} | {'agree' if r.agree else 'disagree'}"
              f"{'' if r.cpu_p < 0.05 else ' (CPU no signal)'} |" for r in df.itertuples()]
    rho, tau = stats.spearmanr(df.pod_delta, df.cpu_delta), stats.kendalltau(df.pod_delta, df.cpu_delta)
    lines += ["", f"sign agreement where the CPU's p < 0.05: {counted.agree.sum()} of {len(counted)} "
              f"({counted.agree.mean():.0%}); over all {len(df)} pairs: {df.agree.sum()} ({df.agree.mean():.0%})",
              f"rank correlation of pod Δ and CPU Δ over all pairs: Spearman {rho.statistic:+.2f} (p {rho.pvalue:.3f}), "
              f"Kendall {tau.statistic:+.2f} (p {tau.pvalue:.3f})"]
    return "\n".join(lines)


def run_all(proxies: list[str], scripts: list[str], seeds: list[int], jobs: int, results: Path, out: Path) -> None:
    """Every (proxy, script, seed) not yet in results, one pool for all (no core idles between proxies)."""
    done = read(results)
    have = set(zip(done.script, done.proxy, done.seed)) if len(done) else set()
    todo = [(p, s, seed) for p in proxies for seed in seeds for s in scripts if (s, p, seed) not in have]
    def one(item):
        proxy, s, seed = item
        res = port.run(s, proxy, seed, out / f"{s}_{proxy}_s{seed}")
        with results.open("a") as fh:
            fh.write(json.dumps(res) + "\n")
        print(f"{s} {proxy} seed {seed}: {res['final_bpb']:.4f} in {res['steps']} steps, {res['seconds']:.0f} s",
              flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["run", "report", "pairs"])
    ap.add_argument("--pairs", type=Path, default=HERE / "pairs.tsv")
    ap.add_argument("--proxy", choices=sorted(port.PROXIES))
    ap.add_argument("--scripts", default=",".join(port.SCRIPTS))   # add ours_r0405 etc. (port.OURS) by name
    ap.add_argument("--seeds", default="1337,42,7")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=Path("/tmp/proxy_fidelity"))
    a = ap.parse_args(argv)
    if a.command == "pairs":
        return print(pairs_report(a.pairs))
    if a.command == "run":
        if not a.proxy:
            ap.error("run needs --proxy")
        run_all([a.proxy], a.scripts.split(","), [int(s) for s in a.seeds.split(",")], a.jobs, a.results, a.out)
    print(report(read(a.results)))


if __name__ == "__main__":
    main()
