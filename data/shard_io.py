"""Writer for the challenge's token shard format (the only one in the project).

A shard is a 1024-byte header of 256 little-endian int32 values
([0] = magic 20240520, [1] = version 1, [2] = number of tokens, the rest 0),
followed by that many little-endian uint16 token ids. A valid file is exactly
1024 + 2 * num_tokens bytes long.

The reader lives in train_gpt.py (`load_data_shard`) so the artifact stays
self-contained; this module only writes, plus a cheap header check used by the
downloader to decide whether a file on disk is complete.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN_ID = 65535  # tokens are stored as uint16
DEFAULT_TOKENS_PER_SHARD = 100_000_000


def _to_uint16(tokens) -> np.ndarray:
    """Validate token ids and return them as a flat little-endian uint16 array."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size == 0:
        return np.zeros(0, dtype="<u2")
    if arr.dtype.kind not in "iu":
        # Accept floats/objects only when they hold exact integers, so a stray
        # 3.7 is an error rather than a silently truncated token.
        as_int = arr.astype(np.int64)
        if not np.array_equal(as_int, arr):
            raise ValueError("token ids must be integers")
        arr = as_int
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > MAX_TOKEN_ID:
        raise ValueError(
            f"token ids must lie in [0, {MAX_TOKEN_ID}] to fit uint16; got range [{lo}, {hi}]"
        )
    return arr.astype("<u2", copy=False)


def make_header(num_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = num_tokens
    return header.tobytes()


def write_shard(path, tokens) -> Path:
    """Write one shard atomically (temp file in the same dir, then os.replace)."""
    path = Path(path)
    data = _to_uint16(tokens)
    if data.size > np.iinfo(np.int32).max:
        raise ValueError(f"too many tokens for one shard: {data.size}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(make_header(int(data.size)))
            f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def shard_name(prefix: str, split: str, index: int) -> str:
    return f"{prefix}_{split}_{index:06d}.bin"


def _iter_chunks(token_source) -> Iterator[np.ndarray]:
    """Yield uint16 chunks from an array, an iterable of ints, or an iterable of
    per-document sequences (lists/arrays), mixing allowed."""
    if isinstance(token_source, np.ndarray):
        yield _to_uint16(token_source)
        return
    pending: list[int] = []
    for item in token_source:
        if isinstance(item, numbers.Integral):
            pending.append(int(item))
            if len(pending) >= 1 << 16:
                yield _to_uint16(pending)
                pending = []
            continue
        if pending:
            yield _to_uint16(pending)
            pending = []
        yield _to_uint16(item)
    if pending:
        yield _to_uint16(pending)


def write_shards(
    out_dir,
    prefix: str,
    split: str,
    token_iter_or_array,
    tokens_per_shard: int = DEFAULT_TOKENS_PER_SHARD,
) -> list[Path]:
    """Split a token stream into `{prefix}_{split}_{i:06d}.bin` shards of at most
    `tokens_per_shard` tokens each (the last one may be shorter).

    Returns the written paths in order; an empty stream writes nothing.
    """
    if tokens_per_shard <= 0:
        raise ValueError("tokens_per_shard must be positive")
    out_dir = Path(out_dir)
    paths: list[Path] = []
    buf: list[np.ndarray] = []
    buffered = 0

    def flush(n: int) -> None:
        nonlocal buf, buffered
        joined = np.concatenate(buf) if len(buf) > 1 else buf[0]
        paths.append(write_shard(out_dir / shard_name(prefix, split, len(paths)), joined[:n]))
        rest = joined[n:]
        buf = [rest] if rest.size else []
        buffered = int(rest.size)

    for chunk in _iter_chunks(token_iter_or_array):
        if chunk.size == 0:
            continue
        buf.append(chunk)
        buffered += int(chunk.size)
        while buffered >= tokens_per_shard:
            flush(tokens_per_shard)
    if buffered:
        flush(buffered)
    return paths


def shard_size_ok(path) -> bool:
    """True when `path` has a valid header and exactly the size it declares.

    Cheap completeness check (reads 1 KiB); not a substitute for the reader.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < HEADER_BYTES:
            return False
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    except OSError:
        return False
    if int(header[0]) != SHARD_MAGIC or int(header[1]) != SHARD_VERSION:
        return False
    return size == HEADER_BYTES + 2 * int(header[2])


def iter_shard_paths(out_dir, prefix: str, split: str) -> Iterable[Path]:
    """Existing shards for (prefix, split), sorted by name."""
    return sorted(Path(out_dir).glob(f"{prefix}_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))
