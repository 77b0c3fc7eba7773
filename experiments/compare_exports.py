"""Every export variant from the same trained weights, so the gaps carry no training noise: train once with
train_gpt.py's knobs (from the environment), then quantize the export weights by RTN, one-pass GPTQ and
loop-aware GPTQ at the same SDClip k and score each (plain windows). The run itself is exported and scored
as usual first.

    PROFILE=cpu . experiments/profile.sh && python experiments/compare_exports.py

COMPARE_ARMS="name:KEY=VALUE KEY=VALUE|name2:..." adds export arms: each is the run's export with those export
knobs changed, fitted to the cap on its own (SIZE_TARGET=fit with a binding SIZE_LIMIT: equal bytes), e.g.
COMPARE_ARMS="embed_gptq:EMBED_GPTQ=1|lqer:LQER_RANK=4 LQER_TOP=3". `control` is the run's own export.
Prints one line per variant and writes logs/<RUN_ID>.compare.json.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

VARIANTS = {"rtn": ("rtn", "0"), "gptq_plain": ("gptq", "0"), "gptq_loop_aware": ("gptq", "1")}
TOOL_VARS = ("PROFILE", "ABLATE_CALLER_VARS", "TRAIN_TFLOPS", "COMPARE_ARMS")


def parse_arms(text: str) -> dict[str, dict[str, str]]:
    arms = {}
    for item in filter(None, text.split("|")):
        name, _, pairs = item.partition(":")
        kv = [p.partition("=") for p in pairs.split()]
        if not name.isidentifier() or not kv or any(not (k and eq and v) for k, eq, v in kv) or name in arms:
            raise SystemExit(f"error: COMPARE_ARMS: {item!r}: expected name:KEY=VALUE KEY=VALUE, names distinct")
        arms[name] = {k: v for k, _, v in kv}
    return arms


def compare(hp: tg.Hyperparameters, dinfo: tg.DistInfo, device, arms: dict | None = None,
            env: dict | None = None) -> dict:
    run_id = tg.make_run_id(hp, dinfo)
    data = tg.preflight(hp, dinfo, device, run_id)
    log = tg.Logger(Path(hp.log_dir) / f"{run_id}.txt" if dinfo.master else None)
    trainer = tg.build_training(hp, data, dinfo, device, log, run_id)
    out = {"run_id": run_id, **trainer.train(data)}
    trained, where = copy.deepcopy(trainer.model), (trainer.loader.windows.epoch, trainer.loader.windows.pos)
    calib = tg.calibration_batches(trainer.loader, hp, dinfo)   # the batches the export is about to draw
    trainer.loader.windows.seek(*where)
    out.update(tg.export(trainer, hp, data, run_id))
    out.update(tg.score_artifact(Path(out["artifact"]), hp, data, dinfo, device, log))
    ks = tg.ks_at(tg.relative_ks(trained, hp, {}), out["quant_k"]) if hp.quant_alloc == "uniform" else None
    for label, (quant, aware) in VARIANTS.items():
        if label == "gptq_plain" and not hp.num_crawler_layers:
            continue
        model = copy.deepcopy(trained)
        tg.quantize_model_(model, dataclasses.replace(hp, quant=quant, gptq_loop_aware=aware), quant, calib, dinfo, ks)
        _, bpb = tg.evaluate(model, data.val_tokens, data.luts, hp.eval_seq_len, hp.eval_seq_len, hp.val_batch_size,
                             dinfo, device)
        out[f"{label}_val_bpb"] = bpb
        log.kv(variant=label, plain_val_bpb=f"{bpb:.6f}")
    for label, overrides in {"control": {}, **(arms or {})}.items():   # each fitted to the cap on its own
        arm_hp = tg.Hyperparameters.from_env({**(env or {}), **overrides})
        final = tg.export_model(copy.deepcopy(trained), arm_hp, calib, dinfo, log,
                                tg.artifact_meta(arm_hp, data.tokenizer_sha256))
        _, bpb = tg.evaluate(final.model, data.val_tokens, data.luts, hp.eval_seq_len, hp.eval_stride,
                             hp.val_batch_size, dinfo, device)
        out[f"{label}_val_bpb"], out[f"{label}_bytes_total"] = bpb, final.size + len(tg.packed_code())
        log.kv(arm=label, val_bpb=f"{bpb:.6f}", bytes_total=out[f"{label}_bytes_total"],
               quant_k=f"{final.quant_k:.3f}")
    if dinfo.master:
        record = {k: v for k, v in out.items() if k != "curve"}
        tg.write_atomic(Path(hp.log_dir) / f"{run_id}.compare.json", json.dumps(record, indent=1).encode())
    return out


def main(environ: dict | None = None) -> dict:
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if k not in TOOL_VARS}
    hp, dinfo = tg.Hyperparameters.from_env(env), tg.DistInfo.from_env(env)
    arms = parse_arms((os.environ if environ is None else environ).get("COMPARE_ARMS", ""))
    model_knobs = {f.name.upper() for f in tg.knob_fields() if f.metadata["model"]}
    for name, overrides in arms.items():   # a bad arm fails before training
        tg.Hyperparameters.from_env({**env, **overrides})
        if model_knobs & set(overrides):
            raise SystemExit(f"error: COMPARE_ARMS: {name} sets {sorted(model_knobs & set(overrides))}: "
                             "an export arm changes export knobs only (the trained model is shared)")
    device = tg.setup_distributed(dinfo)
    return compare(hp, dinfo, device, arms, env)


if __name__ == "__main__":
    tg.cli(main)
