"""Build a small local corpus (tokenizer + shards) that needs no network.

Default source: the shipped demo corpus, data/corpus/python_docs.jsonl.xz (CPython 3.11.7's own
documentation, harvested by data/harvest_python_docs.py; licences in data/corpus/README.md), so every
machine and every Python builds the same tokenizer and shards. Your own text can be used with
`--text-dir DIR` (every *.txt file, one document each) and/or `--jsonl FILE` (one JSON object per line
with a "text" field).

Outputs (under --out-root, default: the repo's data/ directory):
    tokenizers/{name}_{V}_bpe.model (+ .vocab)         V = --vocab-size, 1024 by default
    datasets/{name}_sp{V}/{name}_train_000000.bin ...
    datasets/{name}_sp{V}/{name}_val_000000.bin ...   (+ {name}_heldout_* for the shipped corpus)
    datasets/{name}_sp{V}/manifest.json

The tokenizer follows the challenge spec (SentencePiece BPE, vocab 1024 unless --vocab-size says otherwise,
byte fallback, split digits, nmt_nfkc, no dummy prefix, pad/bos/eos/unk =
0/1/2/3) and is trained on the train documents only. Each document is encoded
as [BOS] + tokens, no EOS, like the challenge's FineWeb shards.

Documents are split into train and val by a hash of their text. The train documents are written in a
random order drawn from --shuffle-seed (recorded in the manifest), as FineWeb's shards hold web pages
in effectively random order: a loader that streams them in order then sees mixed topics, not one source
after another (in harvest order the warmdown trained on the last modules only; experiments/LOG.md).

With --caseops the documents go through the lossless case transform data/lossless_caps.py (case operators
+ lowercased text) before the tokenizer is trained and they are encoded; the operators are user-defined
symbols of the tokenizer (one token each), the outputs are named {name}_caseops, and every scored split gets
a byte sidecar {name}_caseops_{val,heldout}_bytes_000000.bin (the shard format, one uint16 per token: the
UTF-8 bytes of text it stands for, 0 for BOS and operators). Those bytes are the decoded text's: a scored
document is first put in the tokenizer's normal form (nmt_nfkc merges whitespace), as the LUTs of a plain
vocabulary count what its tokens decode to, so bits per byte compare across tokenizers.

Reruns are cheap: if manifest.json matches the requested parameters and every
listed file still has its recorded sha256, the build is skipped; a dataset built
with other parameters (an older format, another order) is rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # allow `python data/prepare_local.py` from any cwd
    sys.path.insert(0, str(REPO_ROOT))

from data import lossless_caps  # noqa: E402
from data.shard_io import iter_shard_paths, write_shards  # noqa: E402
from train_gpt import write_atomic  # noqa: E402

DEFAULT_OUT_ROOT = REPO_ROOT / "data"
SHIPPED_CORPUS = REPO_ROOT / "data" / "corpus" / "python_docs.jsonl.xz"
MANIFEST_FORMAT = 2   # 2: train documents shuffled (shuffle_seed), the shipped corpus as default source
VOCAB_SIZE = 1024
BOS_ID = 1

# The challenge's tokenizer spec, plus options that only make training
# reproducible or keep long lines (they do not change the tokenizer's rules).
SP_TRAINER_SPEC = {
    "model_type": "bpe",
    "vocab_size": VOCAB_SIZE,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "character_coverage": 0.999,
    "pad_id": 0,
    "bos_id": BOS_ID,
    "eos_id": 2,
    "unk_id": 3,
    # Reproducibility: one thread, every sentence, no sampling/shuffling.
    "num_threads": 1,
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "max_sentence_length": 1 << 16,
}
SP_SEED = 1337

SCORED_SPLITS = ("val", "heldout")   # --caseops writes a byte sidecar for these
SPLIT_BUCKETS = 10_000
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------- sources

def read_shipped_corpus(path: Path = SHIPPED_CORPUS) -> tuple[list[str], list[str]]:
    """(documents, held-out documents) of the shipped JSONL.xz corpus, in file order."""
    try:
        rows = [json.loads(line) for line in lzma.decompress(path.read_bytes()).decode("utf-8").splitlines()]
    except (OSError, lzma.LZMAError, ValueError) as err:
        raise SystemExit(f"prepare_local: error: {path}: cannot read the shipped corpus ({err}) — "
                         "restore it with git checkout -- data/corpus") from None
    return [r["text"] for r in rows if not r.get("heldout")], [r["text"] for r in rows if r.get("heldout")]


def read_text_dir(text_dir: Path) -> list[str]:
    files = sorted(p for p in Path(text_dir).rglob("*.txt") if p.is_file())
    if not files:
        raise SystemExit(f"prepare_local: error: no *.txt files under {text_dir}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def read_jsonl(path: Path) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SystemExit(
                    f"prepare_local: error: {path}:{lineno}: expected a JSON object with a \"text\" field"
                ) from None
            if not isinstance(text, str):
                raise SystemExit(f"prepare_local: error: {path}:{lineno}: \"text\" must be a string")
            docs.append(text)
    return docs


def read_user_documents(text_dir: Path | None, jsonl: Path | None) -> tuple[list[str], str]:
    docs, parts = [], []
    if text_dir is not None:
        docs += read_text_dir(text_dir)
        parts.append(f"text files under {Path(text_dir).resolve()}")
    if jsonl is not None:
        docs += read_jsonl(jsonl)
        parts.append(f"JSONL {Path(jsonl).resolve()}")
    return [d for d in docs if d.strip()], " + ".join(parts)


def corpus_sha256(docs: list[str]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length prefix: no ambiguity at boundaries
        h.update(data)
    return h.hexdigest()


# ------------------------------------------------------------------ split

def is_val_doc(text: str, val_fraction: float) -> bool:
    """Stable split: depends only on the document's text, never on order."""
    bucket = int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % SPLIT_BUCKETS
    return bucket < round(val_fraction * SPLIT_BUCKETS)


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    train, val = [], []
    for doc in docs:
        (val if is_val_doc(doc, val_fraction) else train).append(doc)
    if not val:
        raise SystemExit(
            f"prepare_local: error: the val split is empty ({len(docs)} documents, "
            f"--val-fraction {val_fraction}); add documents or raise --val-fraction"
        )
    if not train:
        raise SystemExit("prepare_local: error: the train split is empty; lower --val-fraction")
    return train, val


def shuffled(docs: list[str], seed: int) -> list[str]:
    """The documents in a random order drawn from seed: sorted by sha256(seed, text). It depends on the
    texts and the seed alone (not on the input order, the Python or numpy), so a build is reproducible."""
    return sorted(docs, key=lambda doc: hashlib.sha256(f"{seed}\n{doc}".encode("utf-8")).digest())


# -------------------------------------------------------------- tokenizer

def _training_sentences(docs: list[str]):
    # SentencePiece trains on "sentences"; lines keep them short and natural.
    for doc in docs:
        for line in doc.splitlines():
            if line.strip():
                yield line


def train_tokenizer(train_docs: list[str], spec: dict = SP_TRAINER_SPEC) -> bytes:
    """Train the challenge-spec BPE tokenizer (spec: SP_TRAINER_SPEC, its vocab_size may differ); returns the model."""
    import sentencepiece as spm

    spm.set_random_generator_seed(SP_SEED)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(train_docs),
            model_writer=model,  # no temp/prefix path ends up inside the model
            minloglevel=2,
            **spec,
        )
    except RuntimeError as e:
        raise SystemExit(
            f"prepare_local: error: SentencePiece training failed ({e}); "
            f"a {spec['vocab_size']}-piece BPE needs more (and more varied) training text"
        ) from None
    return model.getvalue()


def vocab_text(sp) -> str:
    lines = []
    for i in range(sp.get_piece_size()):
        score = sp.get_score(i)
        lines.append(f"{sp.id_to_piece(i)}\t{int(score) if float(score).is_integer() else score}")
    return "\n".join(lines) + "\n"


def encode_documents(sp, docs: list[str]):
    """Yield one token list per document: [BOS] + ids (no EOS)."""
    for ids in sp.encode(docs, out_type=int, num_threads=1):
        yield [BOS_ID] + ids


def encode_caseops_with_bytes(sp, docs: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Per document, [BOS] + the ids of its CaseOps text, and per token the UTF-8 bytes of text it stands for
    (BOS and operators 0). The document is first put in the tokenizer's normal form, what its tokens decode
    to, so its counts sum to the UTF-8 length of lossless_caps.decode(sp.decode(ids)), the bytes a LUT would
    count for a plain tokenizer; counting the original's bytes would credit CaseOps with the whitespace the
    normalizer drops (4.9% more bytes on the held-out pool)."""
    tokens, counts = [], []
    for doc in docs:
        normal = sp.decode(sp.encode(doc))
        ids, doc_counts = lossless_caps.token_byte_counts(sp, lossless_caps.encode(normal))
        tokens.append([BOS_ID] + ids)
        counts.append([0] + doc_counts)
    return tokens, counts


# ------------------------------------------------------------ file helpers

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def output_paths(out_root: Path, name: str, vocab_size: int = VOCAB_SIZE) -> dict:
    dataset_dir = out_root / "datasets" / f"{name}_sp{vocab_size}"
    tok_base = out_root / "tokenizers" / f"{name}_{vocab_size}_bpe"
    return {
        "dataset_dir": dataset_dir,
        "manifest": dataset_dir / "manifest.json",
        "tokenizer": tok_base.with_suffix(".model"),
        "vocab": tok_base.with_suffix(".vocab"),
    }


# --------------------------------------------------------------- manifest

def tokenizer_spec(vocab_size: int = VOCAB_SIZE, caseops: bool = False) -> dict:
    """SP_TRAINER_SPEC at vocab_size; with caseops the operators are user-defined symbols (one piece each)."""
    extra = {"user_defined_symbols": list(lossless_caps.OPERATORS)} if caseops else {}
    return {**SP_TRAINER_SPEC, "vocab_size": vocab_size, **extra}


def requested_params(name: str, val_fraction: float, tokens_per_shard: int, source_key: dict,
                     shuffle_seed: int = 0, vocab_size: int = VOCAB_SIZE, caseops: bool = False) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "val_fraction": val_fraction,
        "tokens_per_shard": tokens_per_shard,
        "train_order": "shuffled",
        "shuffle_seed": shuffle_seed,
        "tokenizer_spec": tokenizer_spec(vocab_size, caseops),
        "tokenizer_seed": SP_SEED,
        "bos_per_document": True,
        "eos_per_document": False,
        "source_key": source_key,
        **({"text_transform": lossless_caps.NAME, "sidecar_bytes": "decoded"} if caseops else {}),
    }


def manifest_is_current(paths: dict, params: dict, out_root: Path) -> dict | None:
    """Return the existing manifest if it matches `params` and every file it
    lists is present with the recorded hash (and no stray shards exist)."""
    try:
        manifest = json.loads(paths["manifest"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # Round-trip through JSON so tuples/floats compare the way they are stored.
    if manifest.get("params") != json.loads(json.dumps(params)):
        return None
    tok = manifest.get("tokenizer", {})
    tok_path = out_root / tok.get("path", "")
    if not tok_path.is_file() or sha256_file(tok_path) != tok.get("sha256"):
        return None
    sidecars = manifest.get("byte_sidecars", {})
    stray = [f"{s}_bytes" for s in SCORED_SPLITS if f"{s}_bytes" not in sidecars]
    if any(any(iter_shard_paths(paths["dataset_dir"], params["name"], split)) for split in stray):
        return None     # a stray sidecar: the trainer's *_val_* glob would read it
    for split, info in {**manifest.get("splits", {}), **sidecars}.items():
        listed = [paths["dataset_dir"] / s["file"] for s in info.get("shards", [])]
        on_disk = list(iter_shard_paths(paths["dataset_dir"], params["name"], split))
        if sorted(listed) != on_disk:
            return None
        for shard, p in zip(info["shards"], listed):
            if sha256_file(p) != shard["sha256"]:
                return None
    return manifest


def shard_list(shard_paths: list[Path]) -> list[dict]:
    return [{"file": p.name, "tokens": (p.stat().st_size - 1024) // 2, "sha256": sha256_file(p)}
            for p in shard_paths]


def split_summary(docs: list[str], shard_paths: list[Path], token_count: int) -> dict:
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    content_tokens = token_count - len(docs)  # BOS tokens carry no text
    return {
        "docs": len(docs),
        "tokens": token_count,
        "content_tokens": content_tokens,
        "text_bytes": text_bytes,
        "bytes_per_token": round(text_bytes / max(content_tokens, 1), 4),
        "shards": shard_list(shard_paths),
    }


# ------------------------------------------------------------------- build

def build(out_root: Path, name: str, docs: list[str], description: str, params: dict,
          heldout: list[str] | None = None) -> dict:
    import sentencepiece as spm

    vocab_size = params["tokenizer_spec"]["vocab_size"]
    caseops = params.get("text_transform") == lossless_caps.NAME
    paths = output_paths(out_root, name, vocab_size)
    train_docs, val_docs = split_documents(docs, params["val_fraction"])   # by the original text's hash

    # Remove the old manifest first so an interrupted build is never "current".
    paths["manifest"].unlink(missing_ok=True)

    model_bytes = train_tokenizer([lossless_caps.encode(d) for d in train_docs] if caseops else train_docs,
                                  params["tokenizer_spec"])
    write_atomic(paths["tokenizer"], model_bytes)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    if sp.get_piece_size() != vocab_size:
        raise SystemExit(f"prepare_local: error: tokenizer has {sp.get_piece_size()} pieces, expected {vocab_size}")
    write_atomic(paths["vocab"], vocab_text(sp).encode("utf-8"))
    operator_ids = [sp.piece_to_id(op) for op in lossless_caps.OPERATORS] if caseops else []
    if any(sp.encode(op) != [i] for op, i in zip(lossless_caps.OPERATORS, operator_ids)):
        raise SystemExit("prepare_local: error: the tokenizer does not keep each case operator as one token")

    splits, sidecars = {}, {}
    train_docs = shuffled(train_docs, params["shuffle_seed"])   # the tokenizer saw them in input order
    for split, split_docs in (("train", train_docs), ("val", val_docs), ("heldout", heldout or [])):
        if not split_docs:
            continue
        for stale in [*iter_shard_paths(paths["dataset_dir"], name, split),
                      *iter_shard_paths(paths["dataset_dir"], name, f"{split}_bytes")]:
            stale.unlink()
        if caseops and split in SCORED_SPLITS:
            token_lists, byte_lists = encode_caseops_with_bytes(sp, split_docs)
            byte_paths = write_shards(paths["dataset_dir"], name, f"{split}_bytes", byte_lists,
                                      tokens_per_shard=params["tokens_per_shard"])
            sidecars[f"{split}_bytes"] = {"of_split": split, "decoded_bytes": sum(map(sum, byte_lists)),
                                          "shards": shard_list(byte_paths)}
        else:
            token_lists = list(encode_documents(
                sp, [lossless_caps.encode(d) for d in split_docs] if caseops else split_docs))
        shard_paths = write_shards(paths["dataset_dir"], name, split, token_lists,
                                   tokens_per_shard=params["tokens_per_shard"])
        splits[split] = split_summary(split_docs, shard_paths, sum(len(t) for t in token_lists))

    manifest = {
        "created_by": "data/prepare_local.py",
        "params": params,
        "source": {"description": description, "corpus_sha256": corpus_sha256(docs),
                   "docs": len(docs), "text_bytes": sum(s["text_bytes"] for k, s in splits.items() if k != "heldout")},
        "tokenizer": {"path": paths["tokenizer"].relative_to(out_root).as_posix(),
                      "sha256": hashlib.sha256(model_bytes).hexdigest(),
                      "vocab_size": vocab_size},
        "dataset_dir": paths["dataset_dir"].relative_to(out_root).as_posix(),
        "splits": splits,
    }
    if caseops:
        manifest["tokenizer"]["caseops_operator_ids"] = dict(zip(("title", "allcaps", "capnext", "esc"),
                                                                 operator_ids))
        manifest["byte_sidecars"] = sidecars
    write_atomic(paths["manifest"], (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def format_summary(manifest: dict, out_root: Path) -> str:
    lines = [f"source: {manifest['source']['description']}"]
    for split in [k for k in ("train", "val", "heldout") if k in manifest["splits"]]:
        s = manifest["splits"][split]
        lines.append(
            f"  {split:<5} {s['docs']:>6,} docs  {s['tokens']:>11,} tokens (incl. BOS)  "
            f"{s['text_bytes']:>12,} text bytes  {s['bytes_per_token']:.3f} bytes/token"
        )
    lines.append(f"  text total: {manifest['source']['text_bytes'] / 1e6:.3f} MB "
                 f"({manifest['source']['text_bytes']:,} bytes, {manifest['source']['docs']:,} docs)")
    lines.append(f"  tokenizer: {out_root / manifest['tokenizer']['path']}  "
                 f"(sha256 {manifest['tokenizer']['sha256'][:16]}...)")
    dataset_dir = out_root / manifest["dataset_dir"]
    lines.append(f"  dataset:   {dataset_dir}/")
    for split in [k for k in ("train", "val", "heldout") if k in manifest["splits"]]:
        names = ", ".join(s["file"] for s in manifest["splits"][split]["shards"])
        lines.append(f"    {split}: {names}")
    for split, info in manifest.get("byte_sidecars", {}).items():
        names = ", ".join(s["file"] for s in info["shards"])
        lines.append(f"    {split}: {names} ({info['decoded_bytes']:,} decoded bytes)")
    return "\n".join(lines)


def run(out_root=None, name: str = "local", text_dir=None, jsonl=None,
        val_fraction: float = 0.05, tokens_per_shard: int = 100_000_000,
        force: bool = False, log=print, shuffle_seed: int = 0, vocab_size: int = VOCAB_SIZE,
        caseops: bool = False) -> dict:
    """Build (or confirm) the local corpus. Returns a dict with the manifest,
    `dataset_dir`, `tokenizer_path` and `up_to_date` (True when skipped)."""
    start = time.perf_counter()
    out_root = Path(out_root or DEFAULT_OUT_ROOT).resolve()
    validate_args(name, val_fraction, tokens_per_shard)
    if not 260 <= vocab_size <= 65536:   # byte fallback needs 256 pieces + 4 ids; shards store uint16
        raise SystemExit(f"prepare_local: error: --vocab-size {vocab_size}: expected 260 to 65536")
    name = f"{name}_caseops" if caseops else name
    paths = output_paths(out_root, name, vocab_size)

    heldout = None
    if text_dir is None and jsonl is None:
        docs, heldout = read_shipped_corpus()
        description = (f"the shipped corpus {SHIPPED_CORPUS.relative_to(REPO_ROOT).as_posix()} (CPython 3.11.7 "
                       f"documentation; + {len(heldout)} held-out documents for validation only)")
        source_key = {"kind": "shipped", "corpus_sha256": corpus_sha256(docs + heldout)}
    else:
        docs, description = read_user_documents(text_dir and Path(text_dir), jsonl and Path(jsonl))
        source_key = {"kind": "user-text", "corpus_sha256": corpus_sha256(docs)}
    params = requested_params(name, val_fraction, tokens_per_shard, source_key, shuffle_seed, vocab_size,
                              caseops)

    manifest = None if force else manifest_is_current(paths, params, out_root)
    up_to_date = manifest is not None
    if not up_to_date:
        manifest = build(out_root, name, docs, description, params, heldout)
    log(("up to date: " if up_to_date else "built: ") + f"{name}_sp{vocab_size}")
    log(format_summary(manifest, out_root))
    log(f"  time: {time.perf_counter() - start:.1f} s")
    return {
        "manifest": manifest,
        "up_to_date": up_to_date,
        "dataset_dir": paths["dataset_dir"],
        "tokenizer_path": paths["tokenizer"],
    }


def validate_args(name: str, val_fraction: float, tokens_per_shard: int) -> None:
    if not NAME_RE.match(name):
        raise SystemExit(f"prepare_local: error: --name {name!r} must be letters, digits, '_', '-', '.'")
    if name == "fineweb":
        # Would overwrite the real challenge tokenizer data/tokenizers/fineweb_1024_bpe.model.
        raise SystemExit("prepare_local: error: --name fineweb is reserved for the challenge data")
    if not 0.0 < val_fraction < 1.0:
        raise SystemExit("prepare_local: error: --val-fraction must be in (0, 1)")
    if tokens_per_shard <= 0:
        raise SystemExit("prepare_local: error: --tokens-per-shard must be positive")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Build a local sp1024 tokenizer + shards with no network "
                    "(default text: the shipped corpus, CPython 3.11.7's documentation).")
    p.add_argument("--text-dir", type=Path, help="use every *.txt under DIR (recursive), one document per file")
    p.add_argument("--jsonl", type=Path, help="use FILE with one JSON object per line holding a \"text\" field")
    p.add_argument("--name", default="local", help="output name prefix (default: local)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of documents (by text hash) held out for val (default: 0.05)")
    p.add_argument("--tokens-per-shard", type=int, default=100_000_000,
                   help="max tokens per shard file (default: 100,000,000)")
    p.add_argument("--out-root", type=Path, default=DEFAULT_OUT_ROOT,
                   help="root holding tokenizers/ and datasets/ (default: <repo>/data)")
    p.add_argument("--shuffle-seed", type=int, default=0,
                   help="seed of the train documents' random order, recorded in the manifest (default: 0)")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE,
                   help="the BPE's pieces (default: 1024, the challenge's; the records use 4096 and 8192)")
    p.add_argument("--caseops", action="store_true",
                   help="apply the lossless case transform (data/lossless_caps.py) before training and "
                        "encoding; outputs are named NAME_caseops; val/heldout get *_bytes_* sidecars")
    p.add_argument("--force", action="store_true", help="rebuild even if the manifest says up to date")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run(out_root=args.out_root, name=args.name, text_dir=args.text_dir, jsonl=args.jsonl,
        val_fraction=args.val_fraction, tokens_per_shard=args.tokens_per_shard, force=args.force,
        shuffle_seed=args.shuffle_seed, vocab_size=args.vocab_size, caseops=args.caseops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
