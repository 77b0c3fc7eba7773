"""Writer for the challenge's token shard format (the only one in the project).

A shard is a 1024-byte header of 256 little-endian int32 values
([0] = magic 20240520, [1] = version 1, [2] = number of tokens, the rest 0),
followed by that many little-endian uint16 token ids. A valid file is exactly
1024 + 2 * num_tokens bytes long.

The format's constants, the reader (`load_data_shard`), its header check
(`shard_tokens`) and `write_atomic` live in train_gpt.py, which must stay
self-contained (it is the submission); this module imports them and only adds
the writer side.
"""

from __future__ import annotations

import numbers
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # train_gpt.py sits at the repo root
    sys.path.insert(0, str(REPO_ROOT))

from train_gpt import SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, shard_tokens, write_atomic  # noqa: E402

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
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = num_tokens
    return header.tobytes()


def write_shard(path, tokens) -> Path:
    """Write one shard atomically (train_gpt.write_atomic: a temp name, then os.replace).

    The whole file is built in memory first; our shards are at most
    DEFAULT_TOKENS_PER_SHARD tokens (200 MB), which is affordable.
    """
    path = Path(path)
    data = _to_uint16(tokens)
    if data.size > np.iinfo(np.int32).max:
        raise ValueError(f"too many tokens for one shard: {data.size}")
    write_atomic(path, make_header(int(data.size)) + data.tobytes())
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
    """True when `path` has a valid header and exactly the size it declares:
    the trainer's own check (train_gpt.shard_tokens without a vocabulary: it reads the 1 KiB header and maps
    the tokens without reading them), as a bool."""
    try:
        shard_tokens(path)
    except (OSError, ValueError):
        return False
    return True


def iter_shard_paths(out_dir, prefix: str, split: str) -> Iterable[Path]:
    """Existing shards for (prefix, split), sorted by name."""
    return sorted(Path(out_dir).glob(f"{prefix}_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))
