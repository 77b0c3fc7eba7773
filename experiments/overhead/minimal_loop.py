"""The floor for train_gpt.py's per-step overhead: the same model, optimizers and data, stepped by the
smallest loop that trains (no schedule, averages, logging or checks). Prints ms/step.
    python experiments/overhead/minimal_loop.py            (env vars as for train_gpt.py)"""
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt as tg  # noqa: E402


def main() -> None:
    hp = tg.Hyperparameters.from_env({k: v for k, v in os.environ.items() if k.upper() in tg.knob_names()})
    torch.manual_seed(hp.seed)
    model = tg.CrawlerGPT(hp)
    optimizers = tg.build_optimizers(model, hp, tg.DistInfo())
    loader = tg.DistributedTokenLoader(tg.shard_files(hp.data_path, hp.train_files, "TRAIN_FILES"), tg.DistInfo(),
                                       torch.device("cpu"), hp)
    micro = hp.train_batch_tokens // hp.accum_splits
    start = time.perf_counter()   # every step counted, the first ones too, as train_gpt.py's clock does
    for _ in range(hp.iterations):
        for _ in range(hp.accum_splits):
            x, y = loader.next_batch(micro, hp.train_seq_len)
            (model(x, y) / hp.accum_splits).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    print(f"minimal_loop step_ms:{1000 * (time.perf_counter() - start) / hp.iterations:.1f}")


if __name__ == "__main__":
    main()
