"""Shard build throughput (images/s) vs bare JPEG decoding of the same inputs, side by side, same process.

Target: build rate >= 0.5x the bare-decode rate on a 2-core machine.
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

from _inputs import mixed_bucket, workdir
from PIL import Image


def bare_decode(files: list[Path]) -> float:
    """Full decode of every file with PIL in one process (no validation, resizing, encoding or I/O out)."""
    t0 = time.perf_counter()
    for f in files:
        try:
            with Image.open(io.BytesIO(f.read_bytes())) as im:
                im.load()
        except Exception:  # noqa: BLE001 - the odd cases fail here too
            pass
    return len(files) / (time.perf_counter() - t0)


def build_rate(bucket: Path, dst: Path) -> tuple[float, int]:
    from pipeline.build import BuildConfig, build

    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    res = build(str(bucket), str(dst), BuildConfig(samples_per_shard=100), progress=False)
    return res.inputs / (time.perf_counter() - t0), res.inputs


def main() -> dict:
    bucket = mixed_bucket(workdir() / "bucket")
    files = sorted(p for p in bucket.rglob("*") if p.is_file() and not p.name.startswith("."))
    bare = bare_decode(files)
    rate, n = build_rate(bucket, workdir() / "build-bench")
    ratio = rate / bare
    print(f"build: {n} objects | bare decode {bare:.1f} img/s (1 process) | shards build {rate:.1f} img/s "
          f"(2 cores) | ratio {ratio:.2f}x (target >= 0.5x)")
    return {"bare_decode_ips": bare, "build_ips": rate, "ratio": ratio, "objects": n}


if __name__ == "__main__":
    main()
