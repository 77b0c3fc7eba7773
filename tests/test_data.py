"""Data pipeline: shard format, local corpus builder, FineWeb downloader (fake hub)."""
import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt
from data import cached_challenge_fineweb as ccf
from data import prepare_local
from data.shard_io import shard_size_ok, write_shard, write_shards
from train_gpt import SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION

ROOT = Path(__file__).resolve().parents[1]


def read_tokens(path) -> np.ndarray:
    t = train_gpt.load_data_shard(path)
    assert t.ndim == 1 and str(t.dtype) == "torch.uint16"
    return t.numpy().astype(np.int64)


# ------------------------------------------------------------ train sampling

def loader_on(tmp_path, lengths, world=1, rank=0, seq_len=4, seed=5):
    files = []
    for i, n in enumerate(lengths):   # token value = its global position: windows are easy to recognise
        files.append(tmp_path / f"t_train_{i:06d}.bin")
        write_shard(files[-1], np.arange(sum(lengths[:i]), sum(lengths[:i]) + n) % 60000)
    hp = train_gpt.Hyperparameters.from_env({"TRAIN_SEQ_LEN": str(seq_len), "SEED": str(seed),
                                             "VOCAB_SIZE": "65536"})
    return train_gpt.DistributedTokenLoader(files, train_gpt.DistInfo(rank=rank, world_size=world),
                                            torch.device("cpu"), hp)


def test_training_visits_every_window_once_an_epoch_in_a_seeded_order(tmp_path):
    loader = loader_on(tmp_path, [103, 58, 3])            # the 3-token shard holds no window of 5 tokens
    stream = loader.windows
    epoch, phase = int(stream.counts.sum()), stream.phase
    x, y = loader.next_batch(4 * epoch, 4)                 # exactly one epoch
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    in_file_order = [phase + 4 * k for k in range((103 - 1 - phase) // 4)] + \
        [103 + phase + 4 * k for k in range((58 - 1 - phase) // 4)]
    assert sorted(x[:, 0].tolist()) == in_file_order and x[:, 0].tolist() != in_file_order
    assert torch.equal(loader_on(tmp_path, [103, 58, 3]).next_batch(4 * epoch, 4)[0], x)
    assert not torch.equal(loader_on(tmp_path, [103, 58, 3], seed=6).next_batch(4 * epoch, 4)[0], x)
    loader.next_batch(4, 4)
    assert (stream.epoch, stream.pos) == (1, 1)       # the next epoch: position (epoch, index)


def test_the_window_order_resumes_from_two_ints_and_splits_a_step_over_ranks(tmp_path):
    one = loader_on(tmp_path, [300, 200])
    one.next_batch(4 * 10, 4)
    state = (one.windows.epoch, one.windows.pos)
    whole = one.next_batch(4 * 200, 4)[0]                                # crosses into later epochs
    other = loader_on(tmp_path, [300, 200])
    other.windows.seek(*state)
    assert torch.equal(other.next_batch(4 * 200, 4)[0], whole)
    ranks = [loader_on(tmp_path, [300, 200], world=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.windows.seek(*state)
    assert torch.equal(torch.cat([r.next_batch(4 * 100, 4)[0] for r in ranks]), whole)


# ------------------------------------------------------------ shard format

def test_shard_round_trip_and_exact_layout(tmp_path):
    tokens = np.array([0, 1, 2, 1023, 65535, 7, 1], dtype=np.int64)
    path = write_shard(tmp_path / "x_train_000000.bin", tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [SHARD_MAGIC, SHARD_VERSION, len(tokens)] == [20240520, 1, 7]
    assert SHARD_HEADER_INTS == 256 and not header[3:].any()
    assert np.frombuffer(raw[1024:], dtype="<u2").tolist() == tokens.tolist()
    assert read_tokens(path).tolist() == tokens.tolist()
    assert shard_size_ok(path)
    assert [p.name for p in tmp_path.iterdir()] == ["x_train_000000.bin"]  # no temp file left


def test_empty_shard_round_trip(tmp_path):
    path = write_shard(tmp_path / "e.bin", [])
    assert path.stat().st_size == 1024
    assert read_tokens(path).size == 0


@pytest.mark.parametrize("bad", [[-1], [65536], [1.5], np.array([[70000]])])
def test_write_shard_rejects_ids_outside_uint16(tmp_path, bad):
    with pytest.raises(ValueError):
        write_shard(tmp_path / "bad.bin", bad)
    assert list(tmp_path.iterdir()) == []


def test_write_shards_splits_streams_and_names_files(tmp_path):
    docs = [[1] + list(range(10, 10 + n)) for n in (3, 8, 0, 6)]  # 21 tokens in 4 docs
    paths = write_shards(tmp_path, "local", "train", iter(docs), tokens_per_shard=10)
    assert [p.name for p in paths] == ["local_train_000000.bin", "local_train_000001.bin",
                                       "local_train_000002.bin"]
    got = [read_tokens(p).tolist() for p in paths]
    assert [len(g) for g in got] == [10, 10, 1]
    assert sum(got, []) == sum(docs, [])
    # A flat array and a stream of single ints give the same files.
    flat = np.array(sum(docs, []))
    for i, source in enumerate([flat, (int(x) for x in flat)]):
        again = write_shards(tmp_path / str(i), "local", "train", source, tokens_per_shard=10)
        assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    assert write_shards(tmp_path / "none", "local", "val", []) == []


def _corrupt(path: Path, kind: str) -> None:
    raw = bytearray(path.read_bytes())
    if kind == "bad_magic":
        raw[0:4] = np.array([12345], dtype="<i4").tobytes()
    elif kind == "bad_version":
        raw[4:8] = np.array([2], dtype="<i4").tobytes()
    elif kind == "shorter_than_header":
        raw = raw[:100]
    elif kind == "truncated_tokens":
        raw = raw[:-2]
    elif kind == "extra_bytes":
        raw += b"\x00\x00"
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind", ["bad_magic", "bad_version", "shorter_than_header",
                                  "truncated_tokens", "extra_bytes"])
def test_corrupt_shard_raises_value_error_naming_the_file(tmp_path, kind):
    path = write_shard(tmp_path / f"{kind}_val_000000.bin", np.arange(50))
    _corrupt(path, kind)
    assert not shard_size_ok(path)
    with pytest.raises(ValueError) as err:
        train_gpt.load_data_shard(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "prepare_local" in msg or "cached_challenge_fineweb" in msg  # a fix hint


# ----------------------------------------------------------- prepare_local

@pytest.fixture(scope="module")
def small_docs():
    """A few hundred varied English documents: the shipped corpus's pydoc topics cut into paragraph groups."""
    docs = []
    for text in prepare_local.read_shipped_corpus()[0][:79]:
        paras = [p for p in text.split("\n\n") if p.strip()]
        for i in range(0, len(paras), 6):
            docs.append("\n\n".join(paras[i:i + 6]))
    assert len(docs) > 200
    return docs


def _write_text_dir(root: Path, docs) -> Path:
    for i, doc in enumerate(docs):
        sub = root / f"part{i % 3}"  # nested dirs are read recursively
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc_{i:04d}.txt").write_text(doc, encoding="utf-8")
    return root


def _files_in_read_order(text_dir: Path):
    return [p.read_text(encoding="utf-8") for p in sorted(text_dir.rglob("*.txt"))]


def _build(args, capsys):
    assert prepare_local.main(args) == 0
    return capsys.readouterr().out


def test_prepare_local_text_dir_builds_tokenizer_and_bos_shards(tmp_path, small_docs, capsys):
    text_dir = _write_text_dir(tmp_path / "text", small_docs)
    out = tmp_path / "out"
    args = ["--text-dir", str(text_dir), "--out-root", str(out), "--name", "tiny",
            "--val-fraction", "0.2", "--tokens-per-shard", "40000"]
    printed = _build(args, capsys)
    assert "built: tiny_sp1024" in printed and "bytes/token" in printed

    model = out / "tokenizers" / "tiny_1024_bpe.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.get_piece_size() == 1024
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.encode("12", out_type=str) == ["1", "2"]  # split_digits
    assert "<0xE2>" in sp.encode("\u2603", out_type=str)  # byte fallback for an unseen char

    dataset = out / "datasets" / "tiny_sp1024"
    manifest = json.loads((dataset / "manifest.json").read_text())
    docs = _files_in_read_order(text_dir)
    expected = {"train": [], "val": []}
    for doc in docs:
        expected["val" if prepare_local.is_val_doc(doc, 0.2) else "train"].append(doc)
    assert expected["val"] and expected["train"]
    for split, split_docs in expected.items():
        shards = sorted(dataset.glob(f"tiny_{split}_*.bin"))
        assert [s.name for s in shards] == [s["file"] for s in manifest["splits"][split]["shards"]]
        stream = np.concatenate([read_tokens(s) for s in shards])
        ordered = prepare_local.shuffled(split_docs, 0) if split == "train" else split_docs
        want = np.concatenate([[1] + sp.encode(d) for d in ordered])
        assert stream.tolist() == want.tolist()  # BOS before each doc, no EOS; train shuffled, val in order
        assert int((stream == 1).sum()) == len(split_docs) == manifest["splits"][split]["docs"]
        assert not (stream == 2).any()
        assert manifest["splits"][split]["tokens"] == len(stream)
    assert len(list(dataset.glob("tiny_train_*.bin"))) > 1  # --tokens-per-shard took effect
    assert manifest["tokenizer"]["path"] == "tokenizers/tiny_1024_bpe.model"


def test_prepare_local_vocab_size_builds_its_own_tokenizer_and_dataset(tmp_path, small_docs, capsys):
    """--vocab-size N: tokenizers/{name}_N_bpe.model and datasets/{name}_spN beside the sp1024 build, whose
    manifest (and so its up-to-date check) is what it was before the option existed."""
    text_dir = _write_text_dir(tmp_path / "text", small_docs)
    out = tmp_path / "out"
    base = ["--text-dir", str(text_dir), "--out-root", str(out), "--name", "tiny"]
    assert "built: tiny_sp1536" in _build(base + ["--vocab-size", "1536"], capsys)
    assert spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / "tiny_1536_bpe.model")).get_piece_size() == 1536
    manifest = json.loads((out / "datasets" / "tiny_sp1536" / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == manifest["params"]["tokenizer_spec"]["vocab_size"] == 1536
    assert "built: tiny_sp1024" in _build(base, capsys)
    spec = json.loads((out / "datasets" / "tiny_sp1024" / "manifest.json").read_text())["params"]["tokenizer_spec"]
    assert spec == prepare_local.SP_TRAINER_SPEC
    with pytest.raises(SystemExit, match="--vocab-size 100: expected 260 to 65536"):
        prepare_local.main(base + ["--vocab-size", "100"])


def test_prepare_local_rerun_is_up_to_date_and_rebuild_is_identical(tmp_path, small_docs, capsys):
    text_dir = _write_text_dir(tmp_path / "text", small_docs)
    out = tmp_path / "out"
    args = ["--text-dir", str(text_dir), "--out-root", str(out), "--val-fraction", "0.2"]
    _build(args, capsys)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}

    printed = _build(args, capsys)
    assert printed.startswith("up to date: local_sp1024")
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before

    # A damaged shard is noticed and the rebuild is byte-identical (deterministic).
    shard = out / "datasets" / "local_sp1024" / "local_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2] + b"\xff\xff")
    assert _build(args, capsys).startswith("built:")
    assert {p: p.read_bytes() for p in files} == {p: b for p, (b, _) in before.items()}

    assert _build(args + ["--force"], capsys).startswith("built:")
    # Different parameters are not "up to date".
    assert _build(args[:-1] + ["0.3"], capsys).startswith("built:")


def test_train_documents_are_shuffled_by_the_recorded_seed(tmp_path, small_docs, capsys):
    """Numbered documents come out of the train shard in an order that is not the input order; the same seed
    gives the same order on a second build, another seed another order; the manifest records the seed."""
    docs = [f"document number {i:03d}. {text}" for i, text in enumerate(small_docs[:120])]
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    for i, doc in enumerate(docs):
        (text_dir / f"{i:03d}.txt").write_text(doc, encoding="utf-8")

    def train_order(out: str, *extra: str) -> list[int]:
        _build(["--text-dir", str(text_dir), "--out-root", str(tmp_path / out), "--val-fraction", "0.1", *extra], capsys)
        dataset = tmp_path / out / "datasets" / "local_sp1024"
        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / out / "tokenizers" / "local_1024_bpe.model"))
        stream = read_tokens(dataset / "local_train_000000.bin")
        starts = np.flatnonzero(stream == 1).tolist() + [len(stream)]
        numbers = [int(sp.decode(stream[a + 1:b].tolist()).split("number ")[1][:3]) for a, b in zip(starts, starts[1:])]
        assert json.loads((dataset / "manifest.json").read_text())["params"]["shuffle_seed"] == (int(extra[1]) if extra else 0)
        return numbers

    first, again, other = train_order("a"), train_order("b"), train_order("c", "--shuffle-seed", "7")
    assert sorted(first) == [i for i in range(120) if not prepare_local.is_val_doc(docs[i], 0.1)]
    assert first != sorted(first)            # not the input order
    assert again == first and other != first and sorted(other) == sorted(first)


def test_split_depends_only_on_text_not_order(small_docs):
    train, val = prepare_local.split_documents(small_docs, 0.2)
    shuffled = list(small_docs)
    random.Random(0).shuffle(shuffled)
    train2, val2 = prepare_local.split_documents(shuffled, 0.2)
    assert sorted(val) == sorted(val2) and sorted(train) == sorted(train2)
    assert 0.1 < len(val) / len(small_docs) < 0.3


def test_prepare_local_jsonl_matches_text_dir_split(tmp_path, small_docs, capsys):
    jsonl = tmp_path / "docs.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for doc in reversed(small_docs):  # order must not change the split
            f.write(json.dumps({"text": doc, "id": 0}) + "\n")
        f.write("\n")  # blank lines are ignored
    _build(["--jsonl", str(jsonl), "--out-root", str(tmp_path / "a"), "--val-fraction", "0.2"], capsys)
    _build(["--text-dir", str(_write_text_dir(tmp_path / "t", small_docs)),
            "--out-root", str(tmp_path / "b"), "--val-fraction", "0.2"], capsys)
    a, b = (json.loads((tmp_path / r / "datasets/local_sp1024/manifest.json").read_text())
            for r in "ab")
    for split in ("train", "val"):
        assert a["splits"][split]["docs"] == b["splits"][split]["docs"]
        assert a["splits"][split]["text_bytes"] == b["splits"][split]["text_bytes"]


def test_prepare_local_input_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2"):
        prepare_local.main(["--jsonl", str(bad), "--out-root", str(tmp_path)])

    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["alpha doc", "beta doc"]))
    assert not any(prepare_local.is_val_doc(t, 0.01) for t in ["alpha doc", "beta doc"])
    with pytest.raises(SystemExit, match="val split is empty"):
        prepare_local.main(["--jsonl", str(tiny), "--out-root", str(tmp_path), "--val-fraction", "0.01"])

    with pytest.raises(SystemExit, match="reserved"):
        prepare_local.main(["--name", "fineweb", "--out-root", str(tmp_path)])
    assert not (tmp_path / "tokenizers").exists()


def test_prepare_local_cli_runs_from_any_cwd(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "data" / "prepare_local.py"), "--help"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--text-dir" in res.stdout and "--out-root" in res.stdout


# The demo corpus's bytes on every machine (bash run.sh builds these): the README's figures are for them.
DEMO_SHA256 = {"tokenizer": "a8b348a1e2e683a5473a52fdcf0d7d271d33681c6a12f6ef0802feaff34611fa",
               "train": "6c603e19e3058447222f0381563d8e3ac6674908883b8ecc285e4833f119b955",
               "val": "f53402531670f87e26cf61f44b085ee118e2448b150355e7d31034bc3a98cb11",
               "heldout": "ce0dfd9f85d814bf03cfe33a159de65b42e6fd58224e58eda6deed6b33bfeb97"}


def test_default_local_corpus(local_corpus):
    dataset_dir, tokenizer_path = local_corpus
    assert dataset_dir == ROOT / "data" / "datasets" / "local_sp1024"
    assert tokenizer_path == ROOT / "data" / "tokenizers" / "local_1024_bpe.model"
    assert spm.SentencePieceProcessor(model_file=str(tokenizer_path)).get_piece_size() == 1024
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    for split in ("train", "val"):
        tokens = np.concatenate([read_tokens(p) for p in sorted(dataset_dir.glob(f"local_{split}_*.bin"))])
        assert tokens[0] == 1 and int((tokens == 1).sum()) == manifest["splits"][split]["docs"] > 0
        assert tokens.max() < 1024
    assert {"tokenizer": manifest["tokenizer"]["sha256"],
            **{k: v["shards"][0]["sha256"] for k, v in manifest["splits"].items()}} == DEMO_SHA256
    assert manifest["params"]["train_order"] == "shuffled" and manifest["params"]["shuffle_seed"] == 0


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the shipped corpus is CPython 3.11.7's harvest")
def test_shipped_corpus_is_the_harvest_of_python_3_11_7(tmp_path):
    from data import harvest_python_docs
    assert harvest_python_docs.main(["--out", str(tmp_path / "docs.jsonl.xz")]) == 0
    assert (tmp_path / "docs.jsonl.xz").read_bytes() == harvest_python_docs.CORPUS_FILE.read_bytes()


# --------------------------------------------------- cached_challenge_fineweb

class FakeHub:
    """Stands in for hf_hub_download(local_dir=...): records requests, writes files (`shards`: the tokens
    of the shards with these file names; every other shard holds a short ramp)."""

    def __init__(self, files_train=195, files_val=1, dataset="fineweb10B_sp1024", shards=None, **manifest):
        self.calls = []
        self.shards = shards or {}
        stats = {"files_train": files_train, "files_val": files_val}
        self.manifest = {"datasets": [{"name": dataset, "stats": stats}], **manifest}

    def __call__(self, *, repo_id, filename, repo_type, local_dir, **kw):
        self.calls.append({"repo_id": repo_id, "filename": filename, "repo_type": repo_type})
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        if filename.endswith(".bin"):
            write_shard(dest, self.shards.get(Path(filename).name, np.arange(len(self.calls) + 5)))
        elif filename.endswith("manifest.json"):
            dest.write_text(json.dumps(self.manifest))
        else:
            dest.write_bytes(b"tokenizer:" + filename.encode())
        return str(dest)

    @property
    def names(self):
        return [c["filename"] for c in self.calls]


@pytest.fixture
def hub_env(monkeypatch):
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)


def test_fetch_requests_exact_remote_files_and_places_them(tmp_path, hub_env):
    hub = FakeHub()
    ccf.fetch_all(tmp_path, 3, download=hub, log=lambda *a: None)
    base = "datasets/datasets/fineweb10B_sp1024"
    assert hub.names == [
        "datasets/manifest.json",
        "datasets/tokenizers/fineweb_1024_bpe.model",
        "datasets/tokenizers/fineweb_1024_bpe.vocab",
        f"{base}/fineweb_val_000000.bin",
        f"{base}/fineweb_train_000000.bin",
        f"{base}/fineweb_train_000001.bin",
        f"{base}/fineweb_train_000002.bin",
    ]
    assert {c["repo_id"] for c in hub.calls} == {"willdepueoai/parameter-golf"}
    assert {c["repo_type"] for c in hub.calls} == {"dataset"}
    ds = tmp_path / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in ds.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin",
        "fineweb_val_000000.bin"]
    assert (tmp_path / "tokenizers" / "fineweb_1024_bpe.model").is_file()
    assert (tmp_path / "manifest.json").is_file()
    assert read_tokens(ds / "fineweb_train_000002.bin").tolist() == list(range(12))
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == ["fineweb10B_sp1024"]


def test_fetch_skips_complete_files_and_refetches_broken_ones(tmp_path, hub_env):
    ccf.fetch_all(tmp_path, 2, download=FakeHub(), log=lambda *a: None)
    hub = FakeHub()
    logs = []
    ccf.fetch_all(tmp_path, 2, download=hub, log=logs.append)
    assert hub.calls == [] and sum("skipped" in line for line in logs) == 6

    shard = tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-4])  # an interrupted download
    ccf.fetch_all(tmp_path, 3, download=hub, log=lambda *a: None)
    assert hub.names == ["datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                         "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin"]
    assert shard_size_ok(shard)


def test_fetch_follows_manifest_env_vars_and_limits(tmp_path, monkeypatch):
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/golf-data")
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "export_v2")
    hub = FakeHub(files_train=4, files_val=2)
    ccf.fetch_all(tmp_path, 0, download=hub, log=lambda *a: None)
    assert {c["repo_id"] for c in hub.calls} == {"someone/golf-data"}
    assert hub.names[-2:] == ["export_v2/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                              "export_v2/datasets/fineweb10B_sp1024/fineweb_val_000001.bin"]
    assert (tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000001.bin").is_file()
    with pytest.raises(ValueError, match="only 4 train shards"):
        ccf.fetch_all(tmp_path, 5, download=hub, log=lambda *a: None)

    hub = FakeHub()
    ccf.fetch_all(tmp_path / "nomanifest", 1, download=hub, use_manifest=False, log=lambda *a: None)
    assert not any(n.endswith("manifest.json") for n in hub.names) and len(hub.names) == 4


def test_unreachable_hub_exits_with_one_line_pointing_to_prepare_local(tmp_path, hub_env, capsys):
    def offline(**kwargs):
        raise ConnectionError("[Errno -2] Name or service not known\nwhile requesting HEAD ...")

    with pytest.raises(SystemExit) as exc:
        ccf.main(["--train-shards", "2", "--out-root", str(tmp_path)], download=offline)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n")
    assert "unreachable" in err and "python data/prepare_local.py" in err
    assert "ConnectionError" in err
    assert not list((tmp_path).rglob("*.bin"))


CASEOPS = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"


def caseops_hub(val_docs=50_000, sidecar_tokens=None, **manifest):
    """A caseops repo whose val shard holds val_docs documents of 3 tokens ([BOS, 5, 6]) and whose sidecar
    gives them 0, 2 and 3 original bytes."""
    shards = {"fineweb_val_000000.bin": np.tile([1, 5, 6], val_docs),
              "fineweb_val_bytes_000000.bin": np.tile([0, 2, 3], val_docs)[:sidecar_tokens]}
    return FakeHub(dataset=CASEOPS, shards=shards, **manifest)


@pytest.mark.parametrize("variant, repo, dataset, tokenizer", [
    ("sp4096", "kevclark/parameter-golf", "fineweb10B_sp4096", "fineweb_4096_bpe"),
    ("sp8192", "kevclark/parameter-golf", "fineweb10B_sp8192", "fineweb_8192_bpe"),
    ("caseops", "romeerp/parameter-golf-caseops-v1", CASEOPS,
     "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved"),
])
def test_each_variant_requests_its_repo_and_files_and_places_them(tmp_path, hub_env, variant, repo, dataset,
                                                                  tokenizer):
    hub = caseops_hub() if variant == "caseops" else FakeHub(dataset=dataset)
    ccf.fetch_all(tmp_path, 2, download=hub, log=lambda *a: None, variant=variant)
    base = f"datasets/datasets/{dataset}"
    sidecar = [f"{base}/fineweb_val_bytes_000000.bin"] if variant == "caseops" else []
    assert hub.names == ["datasets/manifest.json",
                         f"datasets/tokenizers/{tokenizer}.model", f"datasets/tokenizers/{tokenizer}.vocab",
                         f"{base}/fineweb_val_000000.bin", *sidecar,
                         f"{base}/fineweb_train_000000.bin", f"{base}/fineweb_train_000001.bin"]
    assert {c["repo_id"] for c in hub.calls} == {repo} and {c["repo_type"] for c in hub.calls} == {"dataset"}
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == [dataset]
    assert sorted(p.name for p in (tmp_path / "datasets" / dataset).iterdir()) == sorted(
        n.rsplit("/", 1)[1] for n in hub.names if n.endswith(".bin"))
    assert (tmp_path / "tokenizers" / f"{tokenizer}.model").is_file()
    if variant == "caseops":
        side = read_tokens(tmp_path / "datasets" / dataset / "fineweb_val_bytes_000000.bin")
        assert side.sum() == 5 * 50_000 and side[:3].tolist() == [0, 2, 3]


def test_caseops_sidecar_is_size_checked_skipped_when_complete_and_refetched_when_broken(tmp_path, hub_env):
    ccf.fetch_all(tmp_path, 1, download=caseops_hub(), log=lambda *a: None, variant="caseops")
    hub = caseops_hub()
    ccf.fetch_all(tmp_path, 1, download=hub, log=lambda *a: None, variant="caseops")
    assert hub.calls == []
    sidecar = tmp_path / "datasets" / CASEOPS / "fineweb_val_bytes_000000.bin"
    sidecar.write_bytes(sidecar.read_bytes()[:-2])                      # an interrupted download
    ccf.fetch_all(tmp_path, 1, download=hub, log=lambda *a: None, variant="caseops")
    assert hub.names == [f"datasets/datasets/{CASEOPS}/fineweb_val_bytes_000000.bin"]
    assert shard_size_ok(sidecar)

    def truncating(**kw):                                               # a hub that serves a broken sidecar
        got = Path(hub(**kw))
        if got.name == sidecar.name:
            got.write_bytes(got.read_bytes()[:-2])
        return str(got)

    sidecar.unlink()
    with pytest.raises(ccf.DownloadError, match="fineweb_val_bytes_000000.bin.*incomplete"):
        ccf.fetch_all(tmp_path, 1, download=truncating, log=lambda *a: None, variant="caseops")


def test_caseops_val_split_of_10000_documents_is_refused_before_any_train_shard(tmp_path, hub_env, capsys):
    hub = caseops_hub(val_docs=10_000)
    with pytest.raises(SystemExit) as exc:
        ccf.main(["--variant", "caseops", "--train-shards", "3", "--out-root", str(tmp_path)], download=hub)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    val = tmp_path / "datasets" / CASEOPS / "fineweb_val_000000.bin"
    assert err.count("\n") == 1 and err.startswith("cached_challenge_fineweb: error: ")
    assert f"{val}: the validation shards hold 10,000 documents" in err and "not 50,000" in err
    assert not any("train" in n for n in hub.names)

    with pytest.raises(ValueError, match=r"manifest.json: .*num_val_docs=10000, not 50,000"):
        ccf.fetch_all(tmp_path / "m", 1, download=caseops_hub(num_val_docs=10_000), log=lambda *a: None,
                      variant="caseops")
    with pytest.raises(ValueError, match=r"fineweb_val_bytes_000000.bin: the byte sidecar does not parallel"):
        ccf.fetch_all(tmp_path / "s", 1, download=caseops_hub(sidecar_tokens=-1), log=lambda *a: None,
                      variant="caseops", use_manifest=False)
    ccf.fetch_all(tmp_path / "ok", 1, download=caseops_hub(num_val_docs=50_000), log=lambda *a: None,
                  variant="caseops")


def test_a_manifest_of_another_variant_is_fetched_again(tmp_path, hub_env):
    ccf.fetch_all(tmp_path, 1, download=FakeHub(), log=lambda *a: None)
    hub = FakeHub(dataset="fineweb10B_sp8192", files_train=1)
    with pytest.raises(ValueError, match="fineweb10B_sp8192 has only 1 train shards on kevclark/parameter-g"):
        ccf.fetch_all(tmp_path, 2, download=hub, log=lambda *a: None, variant="sp8192")
    assert hub.names == ["datasets/manifest.json"]
    assert json.loads((tmp_path / "manifest.json").read_text())["datasets"][0]["name"] == "fineweb10B_sp8192"
    with pytest.raises(SystemExit):
        ccf.build_parser().parse_args(["--variant", "sp2048"])


# --------------------------------------------------------- prepare_local --caseops

def test_prepare_local_caseops_builds_single_token_operators_and_an_exact_byte_sidecar(tmp_path, small_docs,
                                                                                      capsys):
    """Half the documents as they are (indentation, newlines: the tokenizer's normalizer drops some of it),
    half made normalizer-proof (NFKC, single spaces), plus some with every kind of case and a literal
    operator. The sidecar sums to the UTF-8 bytes of the decoded val text (what a LUT counts for a plain
    tokenizer), not the original's; normalizer-proof val documents come back exactly from the shards through
    sp.decode and lossless_caps.decode."""
    from data import lossless_caps
    extra = [f"Hello WORLD foo McDonald iPhone ÉCOLE ΟΔΟΣ straße İstanbul {lossless_caps.TITLE} doc {i}"
             for i in range(40)]
    clean = [" ".join(unicodedata.normalize("NFKC", d).split()) for d in small_docs[::2]] + extra
    docs = small_docs[1::2] + clean
    text_dir = _write_text_dir(tmp_path / "text", docs)
    out = tmp_path / "out"
    args = ["--text-dir", str(text_dir), "--out-root", str(out), "--name", "tiny", "--val-fraction", "0.2",
            "--caseops", "--vocab-size", "512"]
    printed = _build(args, capsys)
    assert "built: tiny_caseops_sp512" in printed and "tiny_caseops_val_bytes_000000.bin" in printed
    dataset = out / "datasets" / "tiny_caseops_sp512"
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / "tiny_caseops_512_bpe.model"))
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["params"]["text_transform"] == lossless_caps.NAME
    op_ids = [sp.piece_to_id(op) for op in lossless_caps.OPERATORS]
    names = ["title", "allcaps", "capnext", "esc"]
    assert manifest["tokenizer"]["caseops_operator_ids"] == dict(zip(names, op_ids))
    assert sp.unk_id() not in op_ids
    for op, i in zip(lossless_caps.OPERATORS, op_ids):
        assert sp.encode(op) == [i] and sp.encode(f"ab{op}cd") == sp.encode("ab") + [i] + sp.encode("cd")

    val_docs = [d for d in _files_in_read_order(text_dir) if prepare_local.is_val_doc(d, 0.2)]
    stream = read_tokens(dataset / "tiny_caseops_val_000000.bin")
    sidecar = read_tokens(dataset / "tiny_caseops_val_bytes_000000.bin")
    assert sidecar.sum() == manifest["byte_sidecars"]["val_bytes"]["decoded_bytes"] and len(sidecar) == len(stream)
    assert sidecar.sum() < sum(len(d.encode()) for d in val_docs)       # the normalizer merged whitespace
    escaped = np.r_[False, stream[:-1] == op_ids[3]]                   # a literal operator after ESC
    assert escaped.any() and (sidecar[escaped] == 3).all()
    assert not sidecar[(stream == 1) | (np.isin(stream, op_ids) & ~escaped)].any()   # BOS, operators: 0
    starts = np.flatnonzero(stream == 1).tolist() + [len(stream)]
    assert len(starts) - 1 == len(val_docs)
    round_trips = 0
    for doc, a, b in zip(val_docs, starts, starts[1:]):
        ids = stream[a + 1:b].tolist()
        assert sidecar[a:b].sum() == len(lossless_caps.decode(sp.decode(ids)).encode())   # decoded doc's bytes
        if doc in clean:
            assert ids == sp.encode(lossless_caps.encode(doc))
            assert lossless_caps.decode(sp.decode(ids)) == doc
            round_trips += 1
    assert round_trips > 10 and any(doc in extra for doc in val_docs)
    train = read_tokens(dataset / "tiny_caseops_train_000000.bin")
    assert set(op_ids[:3]) <= set(train.tolist())                       # TITLE, ALLCAPS, CAPNEXT all used
    # train_gpt.py's preflight finds the sidecar and scores by it (the LUTs would charge each operator bytes)
    hp = train_gpt.Hyperparameters.from_env({"DATA_PATH": str(dataset), "VOCAB_SIZE": "512", "TRAIN_SEQ_LEN": "64",
                                             "EVAL_SEQ_LEN": "64", "TOKENIZER_PATH": str(out / "tokenizers" /
                                                                                         "tiny_caseops_512_bpe.model")})
    data = train_gpt.preflight(hp, train_gpt.DistInfo(), torch.device("cpu"))
    assert isinstance(data.luts, torch.Tensor) and data.luts.tolist() == sidecar.tolist()

    assert _build(args, capsys).startswith("up to date: tiny_caseops_sp512")
    sidecar_path = dataset / "tiny_caseops_val_bytes_000000.bin"
    sidecar_path.write_bytes(sidecar_path.read_bytes()[:-2] + b"\x00\x00")
    assert _build(args, capsys).startswith("built:")                    # a damaged sidecar is rebuilt
    assert read_tokens(sidecar_path).tolist() == sidecar.tolist()
