"""What splitting the artifact's brotli stream into train_gpt.PACK_STREAMS pieces costs and buys: the bytes of
one stream against the pieces, and the CPU seconds of each (quality 11, window 2^24), on int6 SDClip rows
(k 13) of a Gaussian matrix. Prints one line.

    python experiments/pack_streams/bench.py [--rows 4096 --cols 2048]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt as tg  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=2048)
    a = p.parse_args()
    torch.manual_seed(0)
    w = torch.randn(a.rows, a.cols)
    q, _ = tg.quantize_rows(w, 6, tg.row_clip(w, 13.0))
    raw = q.numpy().tobytes()
    t = time.process_time()
    one = len(tg.compress_bytes(raw, 11))
    one_s = time.process_time() - t
    t = time.process_time()
    pieces = len(tg.compress_streams(raw, 11)) - 4 * tg.PACK_STREAMS   # the length header is not the coder's
    pieces_s = time.process_time() - t
    print(f"values:{len(raw)} one_stream_bytes:{one} cpu_s:{one_s:.1f} {tg.PACK_STREAMS}_pieces_bytes:{pieces} "
          f"cpu_s:{pieces_s:.1f} extra:{100 * (pieces - one) / one:+.4f}% one_stream_mib_s:{len(raw) / one_s / 2**20:.2f}")


if __name__ == "__main__":
    main()
