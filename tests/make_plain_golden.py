"""Writes tests/data/plain_crawler_golden.pt from the model as it was before the research arms existed
(commit 50aba15): for a few small configurations, its weights (a seeded init with the zero-init
projections woken), a batch of ids and the logits it computed. test_arms.py loads those weights into
today's model, with every arm off, and requires the same logits. Regenerate only on purpose:
    git worktree add /tmp/plain 50aba15 && python tests/make_plain_golden.py /tmp/plain"""
import importlib.util
import sys
from pathlib import Path

import torch

CONFIGS = {
    "end": {},
    "bottleneck_inst": {"CRAWLER_POSITION": "bottleneck", "INST_DIM": "8", "CRAWLER_LOOPS": "3"},
    "stack": {"NGRAM_HASH": "trigram", "NGRAM_BUCKETS": "64", "NGRAM_DIM": "8", "VE_DIM": "8", "XSA_LAST_N": "-1",
              "SMEAR_GATE": "1", "NUM_FLAT_LAYERS": "3"},
}
BASE = {"VOCAB_SIZE": "96", "MODEL_DIM": "48", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "ROPE_DIMS": "8",
        "NUM_FLAT_LAYERS": "2", "NUM_CRAWLER_LAYERS": "1", "CRAWLER_LOOPS": "2", "MLP_MULT": "2",
        "CRAWLER_MLP_MULT": "2", "NGRAM_HASH": "none", "VE_DIM": "0", "XSA_LAST_N": "0"}


def golden(tg, name: str) -> dict:
    torch.manual_seed(0)
    model = tg.CrawlerGPT(tg.Hyperparameters.from_env({**BASE, **CONFIGS[name]}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():   # wake the zero-init projections so every path matters
            if p.ndim == 2 and not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
        return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "ids": ids, "logits": model.logits(ids)}


if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("old_train_gpt", Path(sys.argv[1]) / "train_gpt.py")
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_train_gpt"] = old
    spec.loader.exec_module(old)
    torch.save({name: golden(old, name) for name in CONFIGS}, Path(__file__).parent / "data" / "plain_crawler_golden.pt")
    print("wrote tests/data/plain_crawler_golden.pt from", sys.argv[1])
