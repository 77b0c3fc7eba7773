"""Score every artifact of a sweep on another validation split, paired by seed against the control:
    python experiments/rescore.py experiments/<slug> [VAL_FILES] [EVAL_STRIDE]
(default `*_val_[0-9]*.bin`, the bundled val split, stride 64). The CPU proxy scores on the held-out pool; this
gives the same runs' score on the demo's own split. Writes results/rescore_<files>.tsv and prints the
paired table (mean Δ vs control, 95% CI, paired p), from the same statistics as ablate.py."""
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import ablate  # noqa: E402
import train_gpt as tg  # noqa: E402


def main() -> None:
    exp, files = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "*_val_[0-9]*.bin"
    stride = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    rows = pd.read_csv(exp / "results" / "results.tsv", sep="\t", dtype={"run_id": str})
    rows = rows[rows.status == "ok"].assign(artifact=lambda r: [exp.resolve().parents[1] / a for a in r.artifact])
    first = tg.load_artifact(rows.artifact.iloc[0])[0].hp
    hp = tg.Hyperparameters()
    data_path = ROOT / "data" / "datasets" / "local_sp1024"
    sp = tg.load_tokenizer(str(ROOT / "data" / "tokenizers" / "local_1024_bpe.model"))
    luts = tg.build_byte_luts(sp, first.vocab_size)
    val = torch.cat([tg.load_data_shard(f) for f in tg.shard_files(str(data_path), files, "VAL_FILES")])
    scores = []
    for row in rows.itertuples():
        model, meta = tg.load_artifact(row.artifact)
        seq = meta["eval"]["eval_seq_len"]
        scores.append(tg.evaluate(model, val, luts, seq, min(stride, seq), hp.val_batch_size, tg.DistInfo(),
                                  torch.device("cpu"))[1])
    rows = rows.assign(val_bpb=scores)
    rows[["arm", "seed", "val_bpb"]].to_csv(exp / "results" / f"rescore_{files.strip('*_.bin')}.tsv", sep="\t", index=False)
    names = list(dict.fromkeys(rows.arm))
    print(ablate.markdown_table(ablate.arm_table(rows, names, 0.005)))


if __name__ == "__main__":
    main()
