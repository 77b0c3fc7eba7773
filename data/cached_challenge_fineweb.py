"""Download the challenge's FineWeb shards and tokenizer from Hugging Face (sp1024 unless --variant says).

Remote layout (a dataset repo, export rooted at the repo folder `datasets`), the one upstream's
downloader uses; {D} is the variant's dataset folder, {T} its tokenizer name:
    {prefix}/manifest.json
    {prefix}/datasets/{D}/fineweb_val_000000.bin ...
    {prefix}/datasets/{D}/fineweb_val_bytes_000000.bin ...   (caseops only: the byte sidecar)
    {prefix}/datasets/{D}/fineweb_train_000000.bin ...
    {prefix}/tokenizers/{T}.model (+ .vocab)
    variant  repo                               {D} / {T}
    sp1024   willdepueoai/parameter-golf        fineweb10B_sp1024 / fineweb_1024_bpe
    sp4096   kevclark/parameter-golf            fineweb10B_sp4096 / fineweb_4096_bpe
    sp8192   kevclark/parameter-golf            fineweb10B_sp8192 / fineweb_8192_bpe
    caseops  romeerp/parameter-golf-caseops-v1  fineweb10B_sp8192_lossless_caps_caseops_v1_reserved /
                                                fineweb_8192_bpe_lossless_caps_caseops_v1_reserved
as the published records' READMEs download them. The prefix is dropped locally, so files land in
    data/manifest.json, data/datasets/{D}/, data/tokenizers/.
data/manifest.json is the last fetched repo's; one that does not list {D} is fetched again.

Env vars (same names as upstream): MATCHED_FINEWEB_REPO_ID (overrides the variant's repo),
MATCHED_FINEWEB_REMOTE_ROOT_PREFIX.

The challenge scores the first 50,000 documents; one shipped CaseOps preparation script defaults to
10,000, which would put documents 10,000-49,999 into the train shards. A caseops dataset whose manifest
or validation shards (their BOS tokens) say another count is refused before any train shard is fetched,
as is a byte sidecar that does not parallel its validation shard.

Files already present and complete are skipped (a shard is complete when its
size equals the size its header declares). Without network, use the bundled
local corpus instead: `python data/prepare_local.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # allow `python data/cached_challenge_fineweb.py` from any cwd
    sys.path.insert(0, str(REPO_ROOT))

from data.shard_io import shard_size_ok  # noqa: E402
from train_gpt import BOS_ID, shard_tokens  # noqa: E402

DEFAULT_REMOTE_ROOT_PREFIX = "datasets"
# variant: (default repo id, dataset folder, tokenizer name)
VARIANTS = {
    "sp1024": ("willdepueoai/parameter-golf", "fineweb10B_sp1024", "fineweb_1024_bpe"),
    "sp4096": ("kevclark/parameter-golf", "fineweb10B_sp4096", "fineweb_4096_bpe"),
    "sp8192": ("kevclark/parameter-golf", "fineweb10B_sp8192", "fineweb_8192_bpe"),
    "caseops": ("romeerp/parameter-golf-caseops-v1", "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved"),
}
DEFAULT_VARIANT = "sp1024"
SIDECAR_VARIANTS = {"caseops"}   # they ship fineweb_val_bytes_* (original UTF-8 bytes per val token)
VAL_DOCS = 50_000                # the challenge's validation split: the first 50,000 documents
DATASET_NAME = VARIANTS[DEFAULT_VARIANT][1]
DEFAULT_TRAIN_SHARDS = 80
DEFAULT_VAL_SHARDS = 1  # used when the remote manifest is skipped or says nothing
DEFAULT_OUT_ROOT = REPO_ROOT / "data"
LOCAL_FALLBACK_HINT = "python data/prepare_local.py"


class DownloadError(RuntimeError):
    """A file could not be fetched or arrived broken."""


class HubUnreachable(DownloadError):
    """A download from the hub failed (network, HTTP, auth or missing file)."""


# ------------------------------------------------------------------ layout

def remote_path(prefix: str, *parts: str) -> str:
    return "/".join(p.strip("/") for p in (prefix, *parts) if p.strip("/"))


def local_path(out_root: Path, prefix: str, remote: str) -> Path:
    """Where a remote file lands: the remote root prefix is dropped."""
    inner = remote[len(prefix.strip("/")) + 1:] if prefix.strip("/") else remote
    return Path(out_root) / inner


def manifest_remote(prefix: str) -> str:
    return remote_path(prefix, "manifest.json")


def planned_remotes(prefix: str, train_shards: int, val_shards: int,
                    variant: str = DEFAULT_VARIANT) -> list[str]:
    """Remote paths to fetch, small files first so failures show up early: tokenizer, val shards, their
    byte sidecars (caseops), train shards."""
    _, dataset_name, tokenizer = VARIANTS[variant]
    dataset = remote_path(prefix, "datasets", dataset_name)
    files = [remote_path(prefix, "tokenizers", f"{tokenizer}.{ext}") for ext in ("model", "vocab")]
    files += [f"{dataset}/fineweb_val_{i:06d}.bin" for i in range(val_shards)]
    if variant in SIDECAR_VARIANTS:
        files += [f"{dataset}/fineweb_val_bytes_{i:06d}.bin" for i in range(val_shards)]
    files += [f"{dataset}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    return files


def _as_int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def manifest_entry(path: Path, dataset_name: str = DATASET_NAME) -> tuple[dict, dict] | None:
    """(the manifest, its entry for dataset_name), or None when it is unreadable or lists no such dataset."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        return manifest, next(d for d in manifest.get("datasets", []) if d.get("name") == dataset_name)
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return None


def shard_counts_from_manifest(path: Path, dataset_name: str = DATASET_NAME) -> tuple[int | None, ...]:
    """(train files available, val files) for our dataset, or None where the
    manifest does not say. Lenient: the manifest is advisory."""
    try:
        stats = manifest_entry(path, dataset_name)[1].get("stats") or {}
        return _as_int(stats.get("files_train")), _as_int(stats.get("files_val"))
    except (TypeError, AttributeError):   # no entry, or not the JSON objects expected
        return None, None


def check_val_split(manifest: Path | None, val_files: list[Path], sidecars: list[Path],
                    dataset_name: str) -> None:
    """Refuse a dataset whose validation split is not the first VAL_DOCS documents (per the manifest's
    num_val_docs / stats.docs_val, and per the BOS tokens of its val shards), or whose byte sidecars do
    not parallel the val shards (same length, 0 at every BOS). Raises ValueError naming the file."""
    why = f"the challenge scores the first {VAL_DOCS:,} documents; a smaller val split puts the rest in train"
    found = manifest_entry(manifest, dataset_name) if manifest is not None else None
    if found:
        stats = found[1].get("stats") or {}
        claims = {"num_val_docs": found[0].get("num_val_docs"), "docs_val": stats.get("docs_val")}
        for key, value in claims.items():
            if value is not None and _as_int(value) != VAL_DOCS:
                raise ValueError(f"{manifest}: {dataset_name} has {key}={value}, not {VAL_DOCS:,} ({why})")
    docs = 0
    for i, path in enumerate(val_files):
        tokens = shard_tokens(path)
        docs += int(np.count_nonzero(tokens == BOS_ID))
        if i < len(sidecars):
            counts = shard_tokens(sidecars[i])
            if len(counts) != len(tokens) or counts[tokens == BOS_ID].any():
                raise ValueError(f"{sidecars[i]}: the byte sidecar does not parallel {path.name} "
                                 f"({len(counts):,} vs {len(tokens):,} entries, or bytes at a BOS)")
    if docs != VAL_DOCS:
        raise ValueError(f"{val_files[0]}: the validation shards hold {docs:,} documents (BOS tokens), "
                         f"not {VAL_DOCS:,} ({why})")


# --------------------------------------------------------------- fetching

def is_complete(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.suffix == ".bin":
        return shard_size_ok(path)
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
            return True
        except (OSError, ValueError):
            return False
    return path.stat().st_size > 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fetch_one(remote: str, dest: Path, *, download, repo_id: str, staging: Path) -> None:
    """Download `remote` and move it into `dest` atomically."""
    staging.mkdir(parents=True, exist_ok=True)
    try:
        got = download(repo_id=repo_id, filename=remote, repo_type="dataset", local_dir=staging)
    except Exception as e:  # any network/HTTP/hub error: the caller prints one line
        raise HubUnreachable(f"could not fetch {remote} from {repo_id} ({_one_line(e)})") from e
    src = Path(got)
    # Not train_gpt.write_atomic: that takes the bytes in memory, while a shard here is a 200 MB
    # file already on disk, moved (a rename, no copy) or streamed by copyfile into place.
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if src.is_file() and not src.is_symlink() and staging.resolve() in src.resolve().parents:
        os.replace(src, tmp)  # staged next to the destination: move, don't copy 200 MB
    else:
        shutil.copyfile(src.resolve(), tmp)
    os.replace(tmp, dest)


def fetch_all(out_root=DEFAULT_OUT_ROOT, train_shards: int = DEFAULT_TRAIN_SHARDS, *,
              download=None, repo_id: str | None = None, remote_prefix: str | None = None,
              use_manifest: bool = True, log=print, variant: str = DEFAULT_VARIANT) -> list[Path]:
    """Fetch tokenizer, val shard(s) (+ byte sidecars) and the first `train_shards` train shards of `variant`.

    `download` has hf_hub_download's signature (injectable for tests).
    Raises HubUnreachable when a download fails, ValueError for a refused dataset. Returns the local paths.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    default_repo, dataset_name, _ = VARIANTS[variant]
    if download is None:
        from huggingface_hub import hf_hub_download as download
    repo_id = repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID", default_repo)
    prefix = remote_prefix if remote_prefix is not None else os.environ.get(
        "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT_PREFIX)
    if train_shards < 0:
        raise ValueError("train_shards must be >= 0")
    out_root = Path(out_root)
    staging = out_root / "datasets" / ".hf_staging"

    def get(remote: str, label: str, complete=is_complete) -> Path:
        dest = local_path(out_root, prefix, remote)
        tag = f"[{label}] {remote}"
        if complete(dest):
            log(f"{tag}: present ({dest.stat().st_size / 1e6:.1f} MB), skipped")
            return dest
        start = time.perf_counter()
        fetch_one(remote, dest, download=download, repo_id=repo_id, staging=staging)
        if not is_complete(dest):
            dest.unlink()
            raise DownloadError(f"downloaded {remote} but it is incomplete or corrupt; run again to retry")
        log(f"{tag}: downloaded {dest.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")
        return dest

    val_shards = DEFAULT_VAL_SHARDS
    fetched, manifest = [], None
    if use_manifest:
        # data/manifest.json may be another repo's (another variant fetched last): it must list our dataset.
        manifest = get(manifest_remote(prefix), "manifest",
                       lambda p: is_complete(p) and manifest_entry(p, dataset_name) is not None)
        fetched.append(manifest)
        available, val_count = shard_counts_from_manifest(manifest, dataset_name)
        if available is not None and train_shards > available:
            raise ValueError(f"{dataset_name} has only {available} train shards on {repo_id}, "
                             f"requested {train_shards}")
        val_shards = val_count or DEFAULT_VAL_SHARDS

    remotes = planned_remotes(prefix, train_shards, val_shards, variant)
    n_head = len(remotes) - train_shards   # tokenizer, val shards, sidecars: checked before any train shard
    for i, remote in enumerate(remotes, 1):
        fetched.append(get(remote, f"{i}/{len(remotes)}"))
        if i == n_head and variant in SIDECAR_VARIANTS:
            val = fetched[-n_head + 2:]
            check_val_split(manifest, val[:val_shards], val[val_shards:], dataset_name)
    shutil.rmtree(staging, ignore_errors=True)
    log(f"ready: {len(remotes)} files under {out_root / 'datasets' / dataset_name} "
        f"and {out_root / 'tokenizers'}")
    return fetched


# -------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Download the challenge's FineWeb shards + tokenizer from Hugging Face. "
                    f"No network? Use the bundled local corpus: {LOCAL_FALLBACK_HINT}")
    p.add_argument("--variant", choices=list(VARIANTS), default=DEFAULT_VARIANT,
                   help=f"tokenizer + dataset (default {DEFAULT_VARIANT}): "
                        + "; ".join(f"{v}: {repo} {d}" for v, (repo, d, _) in VARIANTS.items()))
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                   help=f"number of 100M-token train shards (default {DEFAULT_TRAIN_SHARDS}); val is always fetched")
    p.add_argument("--repo-id", default=None,
                   help="HF dataset repo (default $MATCHED_FINEWEB_REPO_ID or the variant's)")
    p.add_argument("--remote-prefix", default=None,
                   help="folder of the export inside the repo "
                        f"(default $MATCHED_FINEWEB_REMOTE_ROOT_PREFIX or {DEFAULT_REMOTE_ROOT_PREFIX})")
    p.add_argument("--skip-manifest", action="store_true",
                   help=f"do not fetch manifest.json (assumes {DEFAULT_VAL_SHARDS} val shard)")
    p.add_argument("--out-root", type=Path, default=DEFAULT_OUT_ROOT,
                   help="local root for datasets/ and tokenizers/ (default: <repo>/data)")
    return p


def main(argv=None, download=None) -> int:
    args = build_parser().parse_args(argv)
    if args.train_shards < 0:
        build_parser().error("--train-shards must be >= 0")
    if download is None:
        try:
            from huggingface_hub import hf_hub_download as download
        except ImportError:
            print("cached_challenge_fineweb: error: huggingface_hub is not installed "
                  f"(pip install huggingface_hub); offline alternative: {LOCAL_FALLBACK_HINT}",
                  file=sys.stderr)
            raise SystemExit(1) from None
    try:
        fetch_all(args.out_root, args.train_shards, download=download, repo_id=args.repo_id,
                  remote_prefix=args.remote_prefix, use_manifest=not args.skip_manifest,
                  variant=args.variant)
    except HubUnreachable as e:
        print(f"cached_challenge_fineweb: error: Hugging Face hub unreachable: {e}; "
              f"for the bundled offline corpus run: {LOCAL_FALLBACK_HINT}", file=sys.stderr)
        raise SystemExit(1) from None
    except (DownloadError, ValueError) as e:
        print(f"cached_challenge_fineweb: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
