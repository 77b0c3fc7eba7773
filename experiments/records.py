"""The records folder of a finished run, in the upstream layout plus the artifact, written from the run's
logs/<RUN_ID>.json (train_gpt.py writes it; `bash run.sh` calls this after training):

    python experiments/records.py logs/<RUN_ID>.json

It writes <RECORDS_DIR>/<date>_<RUN_ID>/ with README.md, submission.json (SUBMIT_* knobs of the run, the
scores, the bytes, the artifact's sha256), train.log, train_gpt.py (the packed script the cap counted) and
final_model.ptz. It refuses a folder that exists, and a train_gpt.py that is not the one the run packed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

FIGURES = ("pre_quant_val_bpb", "post_quant_val_bpb", "val_bpb")


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


def write_records(result: Path) -> Path:
    """The folder for one run's JSON result; returns its path."""
    run = json.loads(Path(result).read_text())
    hp, artifact = run["hp"], Path(run["artifact"])
    code = tg.packed_code()
    if hashlib.sha256(code).hexdigest() != run["packed_code_sha256"]:
        raise tg.DataError(f"{result}: the run packed another train_gpt.py than this one — write its records from "
                           f"the commit it ran ({run['commit']})")
    folder = Path(hp["RECORDS_DIR"]) / f"{time.strftime('%Y-%m-%d')}_{run['run_id']}"
    tg.require(not folder.exists(), str(folder), "exists already — move it aside first", tg.DataError)
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
    p.add_argument("result", type=Path, help="logs/<RUN_ID>.json of a finished run")
    args = p.parse_args(argv)
    try:
        print(f"records: {write_records(args.result)}")
    except (tg.GolfError, OSError, KeyError, ValueError) as err:
        print(f"error: {args.result}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
