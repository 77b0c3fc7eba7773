"""Score-first test-time training (TTT=sgd): every target scored once, a model that is never trained on a token
before that token is scored (proved by exact equality of the predictive distributions, with planted leaks that
the probe must catch), learning where the text repeats, and the same score on one process or two."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from test_model import FakeSP, VOCAB, make_model

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SEQ, STRIDE, CHUNK = 16, 8, 48


def flat_luts():
    luts = tg.build_byte_luts(FakeSP(), VOCAB)
    luts.base_bytes[:] = 2
    luts.is_boundary[:] = False
    luts.has_space[:] = False
    return luts


def stream(n=400, seed=0):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def ttt_hp(**overrides):
    env = {"TTT": "sgd", "TTT_CHUNK_TOKENS": str(CHUNK), "TTT_LR": "0.2", "TTT_EPOCHS": "2", "TTT_BATCH_SEQS": "2"}
    return tg.Hyperparameters.from_env({**env, **{k: str(v) for k, v in overrides.items()}})


def run(tokens, hp, model=None):
    model = model or make_model()
    return tg.evaluate(model, tokens, flat_luts(), SEQ, STRIDE, 256, tg.DistInfo(), CPU, None, hp)


def test_without_learning_ttt_is_the_sliding_score_exactly():
    """lr 0 (or no epochs): the chunked, score-first pass scores every target once, as the sliding eval does."""
    tokens = stream()
    plain = tg.evaluate(make_model(), tokens, flat_luts(), SEQ, STRIDE, 256, tg.DistInfo(), CPU)
    assert run(tokens, ttt_hp(TTT_LR=0)) == pytest.approx(plain, rel=1e-12)
    assert run(tokens, ttt_hp(TTT_EPOCHS=0)) == pytest.approx(plain, rel=1e-12)
    assert run(tokens, ttt_hp()) != pytest.approx(plain, rel=1e-6)     # and with learning it moves


def test_ttt_learns_text_that_repeats():
    pattern = stream(40, seed=3)
    tokens = pattern.repeat(12)
    plain = tg.evaluate(make_model(), tokens, flat_luts(), SEQ, STRIDE, 256, tg.DistInfo(), CPU)
    assert run(tokens, ttt_hp())[0] < plain[0] - 0.05


def distributions(tokens, hp, monkeypatch, wrap=None):
    """Each scored target's predictive distribution, taken by a spy at the moment TTT scores it."""
    seen = {}
    real = tg.score_windows

    def spy(model, toks, luts, seq_len, mine, batch, device, log=None):
        with torch.no_grad():
            for s, first in mine:
                logp = model.logits(toks[s:s + seq_len][None].long()).log_softmax(-1)[0]
                for j in range(first, seq_len):
                    seen[s + j] = logp[j]
        return real(model, toks, luts, seq_len, mine, batch, device, log)
    monkeypatch.setattr(tg, "score_windows", wrap(spy) if wrap else spy)
    run(tokens, hp)
    monkeypatch.setattr(tg, "score_windows", real)
    return seen


def leaks(monkeypatch, cut: int, wrap=None) -> list[int]:
    """Targets j <= cut whose distribution moved when only tokens after position cut changed (target j
    predicts token j + 1 from tokens 0..j, so none may move)."""
    tokens = stream()
    changed = tokens.clone()
    changed[cut + 1:] = (changed[cut + 1:] + 5) % VOCAB
    a, b = (distributions(t, ttt_hp(), monkeypatch, wrap) for t in (tokens, changed))
    assert sorted(a) == list(range(len(tokens) - 1))                    # every target scored exactly once
    return [j for j in a if j <= cut and not torch.equal(a[j], b[j])]


@pytest.mark.parametrize("cut", [CHUNK - 1, CHUNK, CHUNK + 20, 3 * CHUNK])
def test_ttt_never_sees_a_token_before_scoring_it(monkeypatch, cut):
    """Exact equality: changing the tokens after position `cut` leaves every distribution at targets <= cut as
    it was, bit for bit, with the model training between chunks (cuts at chunk ends and inside a chunk)."""
    assert leaks(monkeypatch, cut) == []


def train_first(score):
    """A planted leak: one SGD step on the windows about to be scored, then the scoring."""
    def wrapped(model, toks, luts, seq_len, mine, batch, device, log=None):
        if mine:
            idx = torch.stack([toks[s:s + seq_len + 1] for s, _ in mine]).long()
            model(idx[:, :-1], idx[:, 1:]).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.2 * p.grad
                    p.grad = None
        return score(model, toks, luts, seq_len, mine, batch, device, log)
    return wrapped


@pytest.mark.parametrize("plant, cut", [
    ("trains on the next chunk before scoring it", CHUNK + 20),
    ("one token of look-ahead", CHUNK),
    ("trains on the windows it is about to score", 20)])
def test_the_probe_catches_planted_leaks(monkeypatch, plant, cut):
    real = tg.ttt_sequences
    if plant == "trains on the next chunk before scoring it":
        monkeypatch.setattr(tg, "ttt_sequences", lambda first, end, seq: real(first + CHUNK, min(end + CHUNK, 399), seq))
    elif plant == "one token of look-ahead":
        monkeypatch.setattr(tg, "ttt_sequences", lambda first, end, seq: [a + 1 for a in real(first, end, seq)])
    assert leaks(monkeypatch, cut, train_first if plant.startswith("trains on the windows") else None), plant


def test_ttt_across_two_gloo_processes_scores_as_one(local_corpus, tmp_path):
    """EVAL_ONLY with TTT=sgd on one artifact: torchrun with two gloo processes (windows and training sequences
    split across them, gradients all-reduced) gives one process's score."""
    dataset, tokenizer = local_corpus
    env = {"DATA_PATH": str(dataset), "TOKENIZER_PATH": str(tokenizer), "MODEL_DIM": "64", "NUM_HEADS": "4",
           "NUM_KV_HEADS": "2", "ROPE_DIMS": "8", "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "128",
           "TRAIN_BATCH_TOKENS": "2048", "ACCUM_SPLITS": "2", "ITERATIONS": "4", "MAX_WALLCLOCK_SECONDS": "0",
           "VAL_LOSS_EVERY": "0", "QUANT": "rtn", "COMPRESS_LEVEL": "5", "LOG_DIR": str(tmp_path / "logs"),
           "ARTIFACT_DIR": str(tmp_path / "art"), "RECORDS_DIR": str(tmp_path / "rec"), "RUN_ID": "base"}
    artifact = tg.main(env)["artifact"]
    ttt = {**env, "EVAL_ONLY": artifact, "TTT": "sgd", "TTT_CHUNK_TOKENS": "4096", "TTT_BATCH_SEQS": "4",
           "TTT_EPOCHS": "1"}
    one = tg.main({**ttt, "RUN_ID": "one"})
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train_gpt.py")], env={**os.environ, **ttt, "RUN_ID": "two", "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    log = (tmp_path / "logs" / "two.txt").read_text()
    bpb = float(log.split("ttt_val_bpb:")[1].split()[0])
    assert "world:2" in log and bpb == pytest.approx(one["val_bpb"], rel=1e-5)
    assert one["val_bpb"] != pytest.approx(one["post_quant_val_bpb"], rel=1e-6)
