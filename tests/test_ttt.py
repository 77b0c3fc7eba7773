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


@pytest.mark.parametrize("mode", ["sgd", "lora+phased"])
def test_ttt_across_two_gloo_processes_scores_as_one(local_corpus, tmp_path, mode):
    """EVAL_ONLY with TTT on one artifact: torchrun with two gloo processes (windows, documents and training
    sequences split across them, gradients all-reduced) gives one process's score."""
    dataset, tokenizer = local_corpus
    env = {"DATA_PATH": str(dataset), "TOKENIZER_PATH": str(tokenizer), "MODEL_DIM": "64", "NUM_HEADS": "4",
           "NUM_KV_HEADS": "2", "ROPE_DIMS": "8", "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "128",
           "TRAIN_BATCH_TOKENS": "2048", "ACCUM_SPLITS": "2", "ITERATIONS": "4", "MAX_WALLCLOCK_SECONDS": "0",
           "VAL_LOSS_EVERY": "0", "QUANT": "rtn", "COMPRESS_LEVEL": "5", "LOG_DIR": str(tmp_path / "logs"),
           "ARTIFACT_DIR": str(tmp_path / "art"), "RECORDS_DIR": str(tmp_path / "rec"), "RUN_ID": "base"}
    artifact = tg.main(env)["artifact"]
    ttt = {**env, "EVAL_ONLY": artifact, "TTT": mode, "TTT_CHUNK_TOKENS": "4096", "TTT_BATCH_SEQS": "4",
           "TTT_EPOCHS": "1", "TTT_LORA_RANK": "8", "TTT_LORA_CHUNK": "32", "TTT_LORA_DOCS": "5",
           "TTT_PHASE_DOCS": "12", "TTT_PHASES": "2", "TTT_LORA_LR": "0.001", "TTT_PHASE_LR": "0.01"}
    one = tg.main({**ttt, "RUN_ID": "one"})
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train_gpt.py")], env={**os.environ, **ttt, "RUN_ID": "two", "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    log = (tmp_path / "logs" / "two.txt").read_text()
    bpb = float(log.split("ttt_val_bpb:")[1].split()[0])
    assert "world:2" in log and bpb == pytest.approx(one["val_bpb"], rel=1e-5)
    assert one["val_bpb"] != pytest.approx(one["post_quant_val_bpb"], rel=1e-6)


# ---------------------------------------------------------------------------------------------------- TTT=lora
# Documents of 20-60 tokens (BOS at fixed places, no other BOS), windows of SEQ, chunks of LORA_CHUNK targets.
LORA_CHUNK = 8
BOS_AT = (0, 37, 61, 120, 150, 203, 231, 290, 330, 371)


def doc_stream(n=400, seed=0):
    tokens = torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
    tokens[list(BOS_AT)] = tg.BOS_ID
    return tokens


def lora_hp(mode="lora", **overrides):
    env = {"TTT": mode, "TTT_LORA_CHUNK": LORA_CHUNK, "TTT_LORA_RANK": 4, "TTT_LORA_LR": 0.003, "TTT_LORA_DOCS": 3,
           "TTT_PHASE_DOCS": 6, "TTT_PHASES": 2, "TTT_CHUNK_TOKENS": CHUNK, "TTT_BATCH_SEQS": 2, "TTT_PHASE_LR": 0.1}
    return tg.Hyperparameters.from_env({k: str(v) for k, v in {**env, **overrides}.items()})


def test_documents_hold_every_target_once():
    tokens = doc_stream()
    docs = tg.documents(tokens)
    assert [t for a, b in docs for t in range(a, b)] == list(range(len(tokens) - 1))
    assert [a for a, _ in docs] == list(BOS_AT)                      # each starts at its BOS ...
    assert all(tokens[b] == tg.BOS_ID for _, b in docs[:-1])          # ... and its last target is the next BOS


def test_lora_without_learning_scores_each_document_alone():
    """lr 0: the adapters stay zero, so the score is the model's on each document from its own BOS (windows of
    SEQ tokens of the document, as the chunks go)."""
    tokens, model = doc_stream(), make_model()
    nll = bytes_ = 0.0
    with torch.no_grad():
        for a, b in tg.documents(tokens):
            for lo in range(a, b, LORA_CHUNK):
                hi = min(b, lo + LORA_CHUNK)
                start = max(a, hi - SEQ)
                per = model(tokens[start:hi][None].long(), tokens[start + 1:hi + 1][None].long(), per_token=True)[0]
                nll += per[lo - start:].double().sum().item()
                bytes_ += 2 * (hi - lo)
    got = run(tokens, lora_hp(TTT_LORA_LR=0))
    assert got[0] == pytest.approx(nll / (len(tokens) - 1), rel=1e-9)
    assert got[1] == pytest.approx(tg.bits_per_byte(nll, bytes_), rel=1e-9)


def test_lora_learns_a_document_that_repeats():
    pattern = torch.randint(2, VOCAB, (12,), generator=torch.Generator().manual_seed(3))
    tokens = torch.cat([torch.tensor([tg.BOS_ID]), pattern.repeat(20)])
    assert run(tokens, lora_hp())[0] < run(tokens, lora_hp(TTT_LORA_LR=0))[0] - 1


def lora_distributions(tokens, hp, monkeypatch, plant=None):
    """Each scored target's predictive distribution, taken when TTT=lora scores it (a spy on the logits and on
    add_scores, which names the targets each scored position stands for)."""
    seen, last, real_logits, real_add = {}, {}, tg.CrawlerGPT.logits, tg.add_scores

    def logits(self, ids, loops=None, head=None):
        last["logits"] = real_logits(self, ids, loops, head)
        return last["logits"]

    def add_scores(sums, nll, targets, tb):
        logp = last["logits"].detach().log_softmax(-1)
        for (r, j) in (targets >= 0).nonzero().tolist():
            seen[int(targets[r, j])] = logp[r, j]
        return real_add(sums, nll, targets, tb)
    monkeypatch.setattr(tg.CrawlerGPT, "logits", logits)
    monkeypatch.setattr(tg, "add_scores", add_scores)
    if plant:
        plant(monkeypatch)
    run(tokens, hp)
    monkeypatch.undo()
    return seen


def lora_leaks(monkeypatch, cut, hp, plant=None, changed=None):
    """Targets j <= cut whose distribution moved when only tokens after cut changed (BOS kept where it is)."""
    tokens = doc_stream()
    if changed is None:
        changed = tokens.clone()
        tail = changed[cut + 1:]
        changed[cut + 1:] = torch.where(tail == tg.BOS_ID, tail, 2 + (tail - 2 + 5) % (VOCAB - 2))
    a, b = (lora_distributions(t, hp, monkeypatch, plant) for t in (tokens, changed))
    assert sorted(a) == list(range(len(tokens) - 1))                    # every target scored exactly once
    return [j for j in a if j <= cut and not torch.equal(a[j], b[j])]


@pytest.mark.parametrize("mode", ["lora", "lora+phased"])
@pytest.mark.parametrize("cut", [44, 64, 100, 160, 250])
def test_lora_never_sees_a_token_before_scoring_it(monkeypatch, mode, cut):
    """Exact equality, as for TTT=sgd; the phases (after documents 3 and 6) train the model on what was scored."""
    assert lora_leaks(monkeypatch, cut, lora_hp(mode)) == []


@pytest.mark.parametrize("mode", ["lora", "lora+phased"])
def test_lora_score_does_not_depend_on_the_batching(mode):
    """Documents in batches of 3 or 2 (as ranks would split them): the same score; the phases train the model
    itself, never with the last batch's adapters on."""
    tokens = doc_stream()
    assert run(tokens, lora_hp(mode, TTT_LORA_DOCS=2)) == pytest.approx(run(tokens, lora_hp(mode)), rel=1e-6)


def test_lora_documents_do_not_see_each_other(monkeypatch):
    """Each document starts from the same adapters: changing one document (the 4th) moves no other one's
    distributions, even those scored after it."""
    tokens = doc_stream()
    changed = tokens.clone()
    changed[BOS_AT[3] + 1:BOS_AT[4]] = 2 + (changed[BOS_AT[3] + 1:BOS_AT[4]] - 2 + 5) % (VOCAB - 2)
    a, b = (lora_distributions(t, lora_hp(), monkeypatch) for t in (tokens, changed))
    assert [j for j in a if not torch.equal(a[j], b[j]) and not BOS_AT[3] <= j < BOS_AT[4]] == []


def carry_lora(monkeypatch):
    """Planted: the adapters reset for the first batch of documents only; later batches start where the
    previous one left them."""
    real, done = tg.LoRA.reset, set()

    def reset(self):
        if id(self) not in done:
            done.add(id(self))
            real(self)
    monkeypatch.setattr(tg.LoRA, "reset", reset)


def train_before_scoring(monkeypatch):
    """Planted: an SGD step of the head's LoRA on the window about to be scored, before scoring it."""
    real = tg.CrawlerGPT.forward

    def forward(self, ids, targets, per_token=False, loops=None, head=None):
        if head is not None:
            real(self, ids, targets, False, loops, head).backward()
            with torch.no_grad():
                for t in (*head.A, *head.B):
                    t -= 1.0 * t.grad
                    t.grad = None
        return real(self, ids, targets, per_token, loops, head)
    monkeypatch.setattr(tg.CrawlerGPT, "forward", forward)


def look_ahead(monkeypatch):
    """Planted: a phase's SGD reads two sequences past each chunk, past the scored prefix at its end."""
    real = tg.ttt_sequences
    monkeypatch.setattr(tg, "ttt_sequences", lambda first, end, seq: real(first, end + 2 * seq, seq))


@pytest.mark.parametrize("plant, mode, cut", [
    (carry_lora, "lora", 250), (train_before_scoring, "lora", 100), (look_ahead, "lora+phased", BOS_AT[3])])
def test_the_probe_catches_planted_lora_leaks(monkeypatch, plant, mode, cut):
    # chunks of 52: the first phase trains on [0, 52) and [52, 104) of its prefix [0, 120) (the last chunk has
    # LR 0); two sequences past 104 reach target 131
    hp = lora_hp(mode, TTT_CHUNK_TOKENS=52)
    assert lora_leaks(monkeypatch, cut, hp, plant), plant.__doc__
    if plant is look_ahead:
        assert lora_leaks(monkeypatch, cut, hp) == []


def test_lora_per_loop_gives_the_crawler_one_adapter_a_loop():
    """TTT_LORA_PER_LOOP: the crawler block's five adapters get a slot per loop; the flat blocks' stay one."""
    model, one, per = make_model(), lora_hp(), lora_hp(TTT_LORA_PER_LOOP=1)
    counts = []
    for hp in (one, per):
        adapters, hooks = tg.attach_lora(model, 2, hp, CPU)
        [h.remove() for h in hooks]
        counts.append(sum(len(a.A) + len(a.B) for a in adapters))
    loops = model.hp.crawler_loops * model.hp.num_crawler_layers
    assert counts[1] - counts[0] == 2 * 5 * (loops - model.hp.num_crawler_layers)
    tokens = doc_stream()
    assert run(tokens, per) != pytest.approx(run(tokens, one), rel=1e-9)


def test_compiled_lora_pass_scores_as_the_eager_one(mode="lora+phased"):
    """With COMPILE on (aot_eager here: the graph the pod's inductor would compile), the LoRA pass runs
    compiled with dynamic shapes (windows widen, the last batch is smaller), every batch reusing the same
    adapters and hooks, within the recompile budget; its score is the eager one's."""
    import torch._dynamo
    tokens = doc_stream()
    eager = run(tokens, lora_hp(mode, TTT_LORA_PER_LOOP=1))
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit = 8, True
    try:
        compiled = run(tokens, lora_hp(mode, TTT_LORA_PER_LOOP=1, COMPILE=1, COMPILE_BACKEND="aot_eager"))
    finally:
        torch._dynamo.reset()
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_lora_chunks_run_only_the_open_documents(monkeypatch):
    """Compaction: each chunk's forward gets only the documents of its batch still open (the rows, longest first)
    at the longest open window, so the pass costs rows x window of open documents, the cost model's work_ours;
    a finished document costs nothing more. Every target is still scored once, and the score is the same as in
    batches of one (test_lora_score_does_not_depend_on_the_batching)."""
    from experiments import cost_model as cm
    shapes, real = [], tg.CrawlerGPT.forward

    def forward(self, ids, targets, per_token=False, loops=None, head=None):
        shapes.append(tuple(ids.shape))
        return real(self, ids, targets, per_token, loops, head)
    monkeypatch.setattr(tg.CrawlerGPT, "forward", forward)
    tokens = doc_stream()
    run(tokens, lora_hp())
    mine = cm.ttt_shares(tg.documents(tokens), 1)[0]
    expected, work, padded = [], 0, 0
    for i in range(0, len(mine), 3):
        lens = sorted((b - a for a, b in mine[i:i + 3]), reverse=True)
        for c in range(-(-lens[0] // LORA_CHUNK)):
            expected.append((sum(n > c * LORA_CHUNK for n in lens), min((c + 1) * LORA_CHUNK, lens[0], SEQ)))
            padded += len(lens) * expected[-1][1]
        work += cm.work_ours(lens, LORA_CHUNK, SEQ)
    assert shapes == expected
    assert sum(r * w for r, w in shapes) == work < padded     # all rows at every chunk would cost `padded`


def test_lora_ranks_take_their_share_of_one_longest_first_order(monkeypatch):
    """Every rank deals the same longest-first order, back and forth: rank r scores exactly the cost model's
    share r (experiments/cost_model.ttt_shares), longest first, and the shares hold every document once."""
    from experiments import cost_model as cm
    tokens, docs = doc_stream(), tg.documents(doc_stream())
    shares = cm.ttt_shares(docs, 2)
    assert sorted(d for s in shares for d in s) == docs
    real = tg.lora_batch
    for rank, share in enumerate(shares):
        seen = []
        monkeypatch.setattr(tg, "lora_batch", lambda f, ad, t, tb, batch, *a: seen.extend(batch) or real(f, ad, t, tb, batch, *a))
        hp = lora_hp(TTT_LORA_DOCS=2)
        tg.lora_ttt(make_model(), tokens, torch.full((len(tokens) - 1,), 2), SEQ, hp, tg.DistInfo(rank, 2), CPU, None,
                    tg.Clock())
        assert seen == share and [b - a for a, b in share] == sorted((b - a for a, b in share), reverse=True)


def compile_counting(monkeypatch):
    """torch.compile with aot_eager behind a backend that counts the graphs Dynamo compiles."""
    from torch._dynamo.backends.registry import lookup_backend
    graphs, real, aot = [], torch.compile, lookup_backend("aot_eager")

    def backend(gm, inputs):
        graphs.append(len(inputs))
        return aot(gm, inputs)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=backend, dynamic=kw["dynamic"]))
    return graphs


def test_compiled_lora_pass_is_warmed_up_off_the_clock_and_never_recompiles(monkeypatch):
    """With COMPILE on, the LoRA pass compiles before the scored pass: one lora_batch on dummy tokens (not the val
    stream), every batch size down to one open row, with the caller's clock paused; the scored pass then compiles
    nothing more (the graphs serve every batch size and window). The warm-up leaves nothing behind: with a
    pass-through compile the score is the eager one exactly."""
    import torch._dynamo
    tokens, calls, clock = doc_stream(), [], tg.Clock()
    graphs, real = compile_counting(monkeypatch), tg.lora_batch

    def lora_batch(forward, adapters, toks, tb, batch, seq_len, hp, device):
        calls.append((toks is tokens, clock.since is None, len(batch), len(graphs)))
        out = real(forward, adapters, toks, tb, batch, seq_len, hp, device)
        calls[-1] += (len(graphs),)
        return out
    monkeypatch.setattr(tg, "lora_batch", lora_batch)
    torch._dynamo.reset()
    try:
        hp = lora_hp("lora+phased", COMPILE=1, COMPILE_BACKEND="aot_eager")
        with clock.running():
            tg.evaluate(make_model(), tokens, flat_luts(), SEQ, STRIDE, 256, tg.DistInfo(), CPU, None, hp, clock)
    finally:
        torch._dynamo.reset()
    (val, paused, rows, _, warm), *scored = calls
    assert not val and paused and rows == 3 and warm >= 1            # the warm-up: dummy tokens, clock paused
    assert all(v and not p for v, p, *_ in scored) and len(scored) >= 4
    assert len(graphs) == warm                                       # nothing compiled once the scoring began
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)   # warm-up on, compile a no-op
    monkeypatch.setattr(tg, "lora_batch", real)
    assert run(tokens, lora_hp("lora+phased", COMPILE=1)) == run(tokens, lora_hp("lora+phased"))
