"""Download the challenge's sp1024 FineWeb shards and tokenizer from Hugging Face.

Remote layout (dataset repo, default `willdepueoai/parameter-golf`, export
rooted at the repo folder `datasets`), the same one upstream's downloader uses:
    {prefix}/manifest.json
    {prefix}/datasets/fineweb10B_sp1024/fineweb_val_000000.bin ...
    {prefix}/datasets/fineweb10B_sp1024/fineweb_train_000000.bin ...
    {prefix}/tokenizers/fineweb_1024_bpe.model (+ .vocab)
The prefix is dropped locally, so files land in
    data/manifest.json, data/datasets/fineweb10B_sp1024/, data/tokenizers/.

Env vars (same names as upstream): MATCHED_FINEWEB_REPO_ID,
MATCHED_FINEWEB_REMOTE_ROOT_PREFIX.

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

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # allow `python data/cached_challenge_fineweb.py` from any cwd
    sys.path.insert(0, str(REPO_ROOT))

from data.shard_io import shard_size_ok  # noqa: E402

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT_PREFIX = "datasets"
DATASET_NAME = "fineweb10B_sp1024"
TOKENIZER_FILES = ("fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab")
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


def planned_remotes(prefix: str, train_shards: int, val_shards: int) -> list[str]:
    """Remote paths to fetch, small files first so failures show up early."""
    dataset = remote_path(prefix, "datasets", DATASET_NAME)
    files = [remote_path(prefix, "tokenizers", name) for name in TOKENIZER_FILES]
    files += [f"{dataset}/fineweb_val_{i:06d}.bin" for i in range(val_shards)]
    files += [f"{dataset}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    return files


def shard_counts_from_manifest(path: Path) -> tuple[int | None, int | None]:
    """(train files available, val files) for our dataset, or None where the
    manifest does not say. Lenient: the manifest is advisory."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entry = next(d for d in manifest.get("datasets", []) if d.get("name") == DATASET_NAME)
        stats = entry.get("stats") or {}
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return None, None

    def as_int(value):
        try:
            return int(value)
        except (TypeError, ValueError):
            return None

    return as_int(stats.get("files_train")), as_int(stats.get("files_val"))


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
              use_manifest: bool = True, log=print) -> list[Path]:
    """Fetch tokenizer, val shard(s) and the first `train_shards` train shards.

    `download` has hf_hub_download's signature (injectable for tests).
    Raises HubUnreachable when a download fails. Returns the local paths.
    """
    if download is None:
        from huggingface_hub import hf_hub_download as download
    repo_id = repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO_ID)
    prefix = remote_prefix if remote_prefix is not None else os.environ.get(
        "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT_PREFIX)
    if train_shards < 0:
        raise ValueError("train_shards must be >= 0")
    out_root = Path(out_root)
    staging = out_root / "datasets" / ".hf_staging"

    def get(remote: str, label: str) -> Path:
        dest = local_path(out_root, prefix, remote)
        tag = f"[{label}] {remote}"
        if is_complete(dest):
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
    fetched = []
    if use_manifest:
        manifest = get(manifest_remote(prefix), "manifest")
        fetched.append(manifest)
        available, val_count = shard_counts_from_manifest(manifest)
        if available is not None and train_shards > available:
            raise ValueError(f"{DATASET_NAME} has only {available} train shards on {repo_id}, "
                             f"requested {train_shards}")
        val_shards = val_count or DEFAULT_VAL_SHARDS

    remotes = planned_remotes(prefix, train_shards, val_shards)
    for i, remote in enumerate(remotes, 1):
        fetched.append(get(remote, f"{i}/{len(remotes)}"))
    shutil.rmtree(staging, ignore_errors=True)
    log(f"ready: {len(remotes)} files under {out_root / 'datasets' / DATASET_NAME} and {out_root / 'tokenizers'}")
    return fetched


# -------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Download the challenge's sp1024 FineWeb shards + tokenizer from Hugging Face. "
                    f"No network? Use the bundled local corpus: {LOCAL_FALLBACK_HINT}")
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                   help=f"number of 100M-token train shards (default {DEFAULT_TRAIN_SHARDS}); val is always fetched")
    p.add_argument("--repo-id", default=None,
                   help=f"HF dataset repo (default $MATCHED_FINEWEB_REPO_ID or {DEFAULT_REPO_ID})")
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
                  remote_prefix=args.remote_prefix, use_manifest=not args.skip_manifest)
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
