"""Writes tests/data/plain_crawler_golden.pt: logits of the plain crawler (the model as it was before
the research arms) for a few small configurations. test_arms.py checks that, with every arm off, the
model still builds the same parameters and computes the same logits. Regenerate only on purpose:
    python tests/make_plain_golden.py"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

CONFIGS = {
    "end": {},
    "bottleneck_inst": {"CRAWLER_POSITION": "bottleneck", "INST_DIM": "8", "CRAWLER_LOOPS": "3"},
    "stack": {"NGRAM_HASH": "trigram", "VE_DIM": "8", "XSA_LAST_N": "-1", "SMEAR_GATE": "1", "NUM_FLAT_LAYERS": "3"},
}
BASE = {"VOCAB_SIZE": "96", "MODEL_DIM": "48", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "ROPE_DIMS": "8",
        "NUM_FLAT_LAYERS": "2", "NUM_CRAWLER_LAYERS": "1", "CRAWLER_LOOPS": "2", "MLP_MULT": "2",
        "CRAWLER_MLP_MULT": "2", "NGRAM_HASH": "none", "VE_DIM": "0", "XSA_LAST_N": "0"}


def golden_logits(name: str) -> tuple[dict, torch.Tensor]:
    torch.manual_seed(0)
    model = tg.CrawlerGPT(tg.Hyperparameters.from_env({**BASE, **CONFIGS[name]}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():   # wake the zero-init projections so every path matters
            if p.ndim == 2 and not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model.state_dict(), model.logits(ids)


if __name__ == "__main__":
    out = {}
    for name in CONFIGS:
        state, logits = golden_logits(name)
        out[name] = {"keys": sorted(state), "param_sum": sum(float(v.double().sum()) for v in state.values()),
                     "logits": logits}
    torch.save(out, Path(__file__).parent / "data" / "plain_crawler_golden.pt")
    print({k: tuple(v["logits"].shape) for k, v in out.items()})
