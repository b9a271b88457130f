"""JPEG decode time at each libjpeg-turbo DCT scale, relative to a full decode of the same files (1 core).

Why MultiCrop only shrinks by powers of two: libjpeg-turbo has SIMD inverse DCTs for the 1/1, 1/2, 1/4
and 1/8 scales; the other eighths (7/8, 3/4, 5/8, 3/8) run in plain C and can cost more than decoding
the whole image.
"""

from __future__ import annotations

import time

import numpy as np
import simplejpeg
from _inputs import shard_jpegs

SCALES = (8, 7, 6, 5, 4, 3, 2, 1)   # in eighths


def _seconds(jpegs: list[tuple[bytes, int, int]], eighths: int) -> float:
    t0 = time.perf_counter()
    for data, w, h in jpegs:
        if eighths == 8:
            simplejpeg.decode_jpeg(data, "RGB")
        else:
            simplejpeg.decode_jpeg(data, "RGB", min_width=-(-w * eighths // 8), min_height=-(-h * eighths // 8))
    return time.perf_counter() - t0


def main(rounds: int = 9) -> dict:
    jpegs = []
    for _, data in shard_jpegs():
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        if max(w, h) >= 512:
            jpegs.append((data, w, h))
    jpegs = jpegs[:48]
    # interleaved, so a slow spell of the host hits every scale alike; ratio per round, then the median
    times = {s: [] for s in SCALES}
    for _ in range(rounds):
        for s in SCALES:
            times[s].append(_seconds(jpegs, s))
    full = np.array(times[8])
    out = {f"{s}/8": float(np.median(np.array(times[s]) / full)) for s in SCALES}
    print(f"JPEG decode time vs a full decode ({len(jpegs)} shard JPEGs of 512 px, median of {rounds} "
          f"interleaved rounds; full = {np.median(full) / len(jpegs) * 1e3:.2f} ms/image): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main()
