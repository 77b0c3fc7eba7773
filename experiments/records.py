"""The records folder of finished runs, in the upstream layout plus the artifacts, written from each run's
logs/<RUN_ID>.json (train_gpt.py writes it; `bash run.sh` calls this after training):

    python experiments/records.py logs/<RUN_ID>.json
    python experiments/records.py logs/<A>.json logs/<B>.json logs/<C>.json --name NAME [--compare-to X]

One run: <RECORDS_DIR>/<date>_<RUN_ID>/ with README.md, submission.json (SUBMIT_* knobs of the run, the
scores, the bytes, the artifact's sha256), train.log, train_gpt.py (the packed script the cap counted) and
final_model.ptz. Several runs (`SEEDS=a,b,c bash run.sh`: one config, one seed each): <date>_<NAME>/ with
train_seed<S>.log and final_model_seed<S>.ptz per seed, and a submission.json holding the per-seed results,
their mean and sample std, as the upstream records do. With --compare-to (a records folder or a JSON file
of an earlier result) the README and submission.json carry the upstream rule's test: at least 0.005 nats
better at p < 0.01 (`significance`). It refuses a folder that exists, runs of different configs or
repeated seeds, and a train_gpt.py that is not the one the runs packed. `--check-baseline X` only reads X
and prints what the test would compare against (run.sh calls it before training: a typo costs no pod time).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import math
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402
from scipy import stats  # noqa: E402

FIGURES = ("pre_quant_val_bpb", "post_quant_val_bpb", "val_bpb")
MARGIN_NATS, ALPHA = 0.005, 0.01   # the upstream rule: beat the record by >= 0.005 nats, shown at p < 0.01
SEED_KNOBS = ("SEED", "RUN_ID")    # what may differ between the runs of one multi-seed folder


def baseline(path: Path) -> dict:
    """An earlier result's val_bpb (the one figure that compares across tokenizers), from a records folder's
    submission.json or a JSON file in any of the upstream shapes: per seed (seed_results / seeds as a mapping,
    seed_scores as a list), else the mean with its std and seed count, else one value."""
    file = Path(path) / "submission.json" if Path(path).is_dir() else Path(path)
    try:
        sub = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise tg.DataError(f"COMPARE_TO={path}: cannot read {file} ({err})") from None
    runs = next((v for v in (sub.get("seed_results"), sub.get("seeds")) if isinstance(v, dict)), None)
    per_seed = ([float(r["val_bpb"]) for r in runs.values()] if runs else
                [float(x) for x in sub.get("seed_scores") or []])
    tg.require(per_seed or isinstance(sub.get("val_bpb"), (int, float)), f"COMPARE_TO={path}",
               f"{file} has no val_bpb (per seed or mean)", tg.DataError)
    n = len(per_seed) or len(sub.get("seeds") or [None])
    mean = sum(per_seed) / len(per_seed) if per_seed else float(sub["val_bpb"])
    return {"source": str(path), "name": sub.get("name") or file.parent.name, "val_bpb": mean, "n": n,
            "per_seed": per_seed, "std": spread(per_seed) or sub.get("val_bpb_std")}


def significance(val_loss: list[float], val_bpb: list[float], base: dict) -> dict:
    """The upstream rule as a one-sided Welch t: H1 is mean(ours) < mean(baseline) - 0.005 nats, passed at
    p < 0.01. The baseline comes as bpb and is put in our nats by our runs' own ratio val_loss/val_bpb
    (ln 2 x bytes per token of our tokenizer on the split: the same for every seed), which is how the
    records state their margins across tokenizers. Without the baseline's per-seed values the test uses its
    mean, std and n; with no spread at all, a one-sample t against its value (its noise then unaccounted)."""
    ratio = sum(val_loss) / sum(val_bpb)
    ours, target = [float(x) for x in val_loss], [b * ratio - MARGIN_NATS for b in base["per_seed"]]
    mean_b = base["val_bpb"] * ratio
    if len(ours) < 2:
        test, p = "none: one seed has no spread", math.nan
    elif len(target) > 1:
        test, p = "Welch t, per seed", stats.ttest_ind(ours, target, equal_var=False, alternative="less").pvalue
    elif base["std"] and base["n"] > 1:
        test, p = "Welch t, from the baseline's mean, std and n", stats.ttest_ind_from_stats(
            stats.tmean(ours), stats.tstd(ours), len(ours), mean_b - MARGIN_NATS, base["std"] * ratio, base["n"],
            equal_var=False, alternative="less").pvalue
    else:
        test, p = "one-sample t against the baseline's value", stats.ttest_1samp(
            ours, mean_b - MARGIN_NATS, alternative="less").pvalue
    delta = stats.tmean(ours) - mean_b
    return {"baseline": base["source"], "baseline_name": base["name"], "baseline_val_bpb": base["val_bpb"],
            "baseline_seeds": base["n"], "delta_bpb": stats.tmean(val_bpb) - base["val_bpb"], "delta_nats": delta,
            "margin_nats": MARGIN_NATS, "alpha": ALPHA, "test": test, "p": p,
            "passed": bool(delta <= -MARGIN_NATS and p < ALPHA)}


def readme(run: dict, hp: dict) -> str:
    defaults = {f.name.upper(): f.default for f in tg.knob_fields()}
    changed = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(hp.items()) if k in defaults and v != defaults[k])
    figures = "\n".join(f"| {k} | {run[k]:.6f} |" for k in FIGURES if k in run)
    return (f"# {hp['SUBMIT_NAME'] or run['run_id']}\n\n{hp['SUBMIT_BLURB']}\n\n"
            f"Flat {hp['NUM_FLAT_LAYERS']} + crawler {hp['NUM_CRAWLER_LAYERS']}x{hp['CRAWLER_LOOPS']}, dim "
            f"{hp['MODEL_DIM']}, {run['steps']} steps in {run['train_seconds']:.1f}s, QUANT={hp['QUANT']}, SDClip k "
            f"{run['quant_k']:.3f}, brotli quality {hp['COMPRESS_LEVEL']}, pruned values {run['pruned']}.\n\n"
            f"## Scores (val_bpb is post-quant, sliding stride {hp['EVAL_STRIDE']})\n\n| figure | value |\n"
            f"| --- | --- |\n{figures}\n\n## Bytes\n\n| total | code (packed) | model | cap |\n| --- | --- | --- | --- |\n"
            f"| {run['bytes_total']} | {run['bytes_code']} | {run['bytes_model']} | {hp['SIZE_LIMIT']} |\n\n"
            "Re-score: `EVAL_ONLY=final_model.ptz DATA_PATH=... TOKENIZER_PATH=... python train_gpt.py` in this "
            f"folder.\n\n## Knobs that differ from the defaults\n\n| variable | value |\n| --- | --- |\n{changed}\n")


def load_runs(results: list[Path]) -> tuple[list[dict], bytes]:
    """The runs' JSON results, checked to be one config at distinct seeds packed from this train_gpt.py."""
    runs, code = [json.loads(Path(r).read_text()) for r in results], tg.packed_code()
    for result, run in zip(results, runs):
        if hashlib.sha256(code).hexdigest() != run["packed_code_sha256"]:
            raise tg.DataError(f"{result}: the run packed another train_gpt.py than this one — write its records "
                               f"from the commit it ran ({run['commit']})")
        differ = sorted(k for k, v in run["hp"].items() if k not in SEED_KNOBS and v != runs[0]["hp"].get(k))
        tg.require(not differ, str(result), f"differs from {results[0]} in {', '.join(differ)}: one folder holds "
                   "one config", tg.DataError)
    seeds = [run["hp"]["SEED"] for run in runs]
    tg.require(len(set(seeds)) == len(seeds), "SEEDS", f"repeat a seed ({seeds})", tg.DataError)
    return runs, code


def spread(values: list[float]) -> float | None:
    """The sample std (ddof 1) the records report; none for one value."""
    return stats.tstd(values) if len(values) > 1 else None


def summary(runs: list[dict], base: dict | None) -> dict:
    """submission.json of several seeds: the upstream records' fields (mean, std, seed_results, bytes)."""
    hp = runs[0]["hp"]
    loss, bpb = [r["val_loss"] for r in runs], [r["val_bpb"] for r in runs]
    out = {"author": hp["SUBMIT_AUTHOR"], "github_id": hp["SUBMIT_GITHUB_ID"], "name": hp["SUBMIT_NAME"],
           "blurb": hp["SUBMIT_BLURB"], "date": time.strftime("%Y-%m-%d"), "track": "10min_16mb",
           "val_loss": stats.tmean(loss), "val_bpb": stats.tmean(bpb), "val_loss_std": spread(loss),
           "val_bpb_std": spread(bpb), "seeds": [r["hp"]["SEED"] for r in runs],
           "seed_results": {str(r["hp"]["SEED"]): {
               "run_id": r["run_id"], "val_loss": r["val_loss"], "val_bpb": r["val_bpb"],
               "pre_quant_val_bpb": r.get("pre_quant_val_bpb"), "artifact_bytes": r["bytes_total"],
               "steps": r["steps"], "step_avg_ms": round(1000 * r["train_seconds"] / max(1, r["steps"]), 2),
               "eval_time_s": round(r["phase_seconds"]["eval"], 1),
               "artifact_sha256": hashlib.sha256(Path(r["artifact"]).read_bytes()).hexdigest()} for r in runs},
           "bytes_total": max(r["bytes_total"] for r in runs), "bytes_code": runs[0]["bytes_code"],
           "artifact_bytes_mean": stats.tmean([r["bytes_total"] for r in runs]),
           "hardware": runs[0]["device"], "torch_version": runs[0]["torch"], "commit": runs[0]["commit"]}
    if base is not None:
        out["significance"] = significance(loss, bpb, base)
    return out


def readme_seeds(sub: dict, hp: dict, name: str) -> str:
    rows = "\n".join(f"| {seed} | {r['val_bpb']:.6f} | {r['val_loss']:.6f} | {r['steps']} | {r['step_avg_ms']:.1f} | "
                     f"{r['eval_time_s']:.1f} | {r['artifact_bytes']} |" for seed, r in sub["seed_results"].items())
    sig = sub.get("significance")
    test = "" if sig is None else (
        f"\n## Against {sig['baseline_name']} (`{sig['baseline']}`)\n\nBaseline val_bpb {sig['baseline_val_bpb']:.6f} "
        f"({sig['baseline_seeds']} seed(s)); ours {sig['delta_bpb']:+.6f} bpb, {sig['delta_nats']:+.6f} nats. The "
        f"rule: at least {sig['margin_nats']} nats better at p < {sig['alpha']}. Test: {sig['test']}, one-sided, "
        f"p = {sig['p']:.3g}: **{'passed' if sig['passed'] else 'not passed'}**.\n")
    return (f"# {hp['SUBMIT_NAME'] or name}\n\n{hp['SUBMIT_BLURB']}\n\n"
            f"{len(sub['seeds'])} seed(s): val_bpb {sub['val_bpb']:.6f} (std {sub['val_bpb_std'] or 0:.6f}), val_loss "
            f"{sub['val_loss']:.6f} nats (std {sub['val_loss_std'] or 0:.6f}); largest artifact {sub['bytes_total']} bytes "
            f"of {hp['SIZE_LIMIT']}.\n\n| seed | val_bpb | val_loss | steps | ms/step | eval s | bytes |\n"
            f"| --- | --- | --- | --- | --- | --- | --- |\n{rows}\n{test}")


def write_records(*results: Path, name: str | None = None, compare_to: Path | None = None) -> Path:
    """The folder for one run's JSON result, or for several seeds' (see the module's text); returns its path."""
    base = baseline(compare_to) if compare_to else None
    runs, code = load_runs(list(results))
    run = runs[0]
    hp = run["hp"]
    folder = Path(hp["RECORDS_DIR"]) / f"{time.strftime('%Y-%m-%d')}_{name or run['run_id']}"
    tg.require(not folder.exists(), str(folder), "exists already — move it aside first", tg.DataError)
    if len(runs) > 1 or base is not None:
        sub = summary(runs, base)
        knobs = "## Knobs" + readme(run, {k: v for k, v in hp.items() if k not in SEED_KNOBS}).split("## Knobs", 1)[1]
        files = [("README.md", f"{readme_seeds(sub, hp, folder.name)}\n{knobs}".encode()), ("train_gpt.py", code),
                 ("submission.json", (json.dumps(sub, indent=2) + "\n").encode())]
        for r in runs:
            files += [(f"train_seed{r['hp']['SEED']}.log", Path(r["log"]).read_bytes()),
                      (f"final_model_seed{r['hp']['SEED']}.ptz", Path(r["artifact"]).read_bytes())]
        for fname, data in files:
            tg.write_atomic(folder / fname, data)
        return folder
    artifact = Path(run["artifact"])
    blob = artifact.read_bytes()
    submission = {"author": hp["SUBMIT_AUTHOR"], "github_id": hp["SUBMIT_GITHUB_ID"], "name": hp["SUBMIT_NAME"],
                  "blurb": hp["SUBMIT_BLURB"], "date": time.strftime("%Y-%m-%d"), "run_id": run["run_id"],
                  "val_loss": run["val_loss"], "val_bpb": run["val_bpb"], "bytes_total": run["bytes_total"],
                  "bytes_code": run["bytes_code"], "pruned_values": run["pruned"], "seed": hp["SEED"],
                  "hardware": run["device"], "torch_version": run["torch"],
                  "artifact_sha256": hashlib.sha256(blob).hexdigest()}
    for name, data in (("README.md", readme(run, hp).encode()), ("final_model.ptz", blob),
                       ("submission.json", (json.dumps(submission, indent=2) + "\n").encode()),
                       ("train.log", Path(run["log"]).read_bytes()), ("train_gpt.py", code)):
        tg.write_atomic(folder / name, data)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, nargs="*", help="logs/<RUN_ID>.json of finished runs (one per seed)")
    p.add_argument("--name", help="the folder's name after the date (default: the first run's RUN_ID)")
    p.add_argument("--compare-to", type=Path, help="an earlier result: records folder or JSON (COMPARE_TO)")
    p.add_argument("--check-baseline", type=Path, help="only read this baseline and say what it holds")
    args = p.parse_args(argv)
    try:
        if args.check_baseline:
            b = baseline(args.check_baseline)
            print(f"records: COMPARE_TO {b['name']}: val_bpb {b['val_bpb']:.6f} over {b['n']} seed(s)"
                  f"{'' if b['per_seed'] else ' (mean only)'}")
            return 0
        tg.require(bool(args.results), "records.py", "needs logs/<RUN_ID>.json of at least one run", tg.DataError)
        folder = write_records(*args.results, name=args.name, compare_to=args.compare_to)
        print(f"records: {folder}")
        sig = json.loads((folder / "submission.json").read_text()).get("significance")
        if sig:
            print(f"records: vs {sig['baseline_name']}: {sig['delta_nats']:+.5f} nats, p={sig['p']:.3g} "
                  f"({sig['test']}): {'passed' if sig['passed'] else 'not passed'} (>= {MARGIN_NATS} nats at p < {ALPHA})")
    except (tg.GolfError, OSError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
