"""How much of a val_bpb is the validation text rather than the model: score one artifact on the two
halves of the validation split (cut at the document boundary nearest the middle). The full split's
sampling noise is about |half A - half B| / 2 (the std of a mean of two independent halves).
    python experiments/eval_noise.py ARTIFACT [DATA_PATH TOKENIZER_PATH]"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def halves(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    starts = (tokens == tg.BOS_ID).nonzero().flatten().tolist()
    cut = min(starts, key=lambda s: abs(s - tokens.numel() // 2))
    return tokens[:cut + 1], tokens[cut:]


def main() -> None:
    artifact = Path(sys.argv[1])
    data_path = sys.argv[2] if len(sys.argv) > 2 else "data/datasets/local_sp1024"
    tokenizer = sys.argv[3] if len(sys.argv) > 3 else "data/tokenizers/local_1024_bpe.model"
    model, meta = tg.load_artifact(artifact)
    hp = tg.Hyperparameters()
    sp = tg.load_tokenizer(tokenizer)
    luts = tg.build_byte_luts(sp, model.hp.vocab_size)
    val = torch.cat([tg.load_data_shard(f) for f in tg.shard_files(data_path, hp.val_files, "VAL_FILES")])
    seq, stride = meta["eval"]["eval_seq_len"], meta["eval"]["eval_stride"]
    scores = [tg.evaluate(model, part, luts, seq, stride, 65536, tg.DistInfo(), torch.device("cpu"))[1]
              for part in (val, *halves(val))]
    print(f"val_tokens:{val.numel()} full:{scores[0]:.5f} half_a:{scores[1]:.5f} half_b:{scores[2]:.5f} "
          f"noise_estimate:{abs(scores[1] - scores[2]) / 2:.5f}")


if __name__ == "__main__":
    main()
