"""Merge (cross-part duplicate search, counts, index) and `shards info` over a synthetic manifest set.

Prints seconds and peak RSS at 1M and 10M rows (goal: RSS < 2 GB, time linear in rows), and at 1M
the same figures for the row-by-row implementation this replaced (to_pydict of every manifest row),
run side by side as the baseline. Each measurement runs in a fresh process so its peak RSS is its own.

    python bench/merge_info.py            # 1M and 10M rows (~10 min on 2 cores, ~2.5 GB of disk)
    python bench/merge_info.py 200000     # a quick look
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

ROWS_PER_MANIFEST = 1000
PARTS = 4
DUPLICATE_PAIRS = 20        # content accepted in two parts: merge must find and drop the later copy


def make_set(root: Path, rows: int) -> None:
    """Manifests of 1,000 rows in 4 parts: 90% accepted, the rest rejected with a spread of reasons."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.order import order_key
    from shards import layout
    from shards.manifest import MANIFEST_SCHEMA
    from shards.tario import write_tar
    from swav_io.storage import write_json

    fs = fsspec.filesystem("file")
    rng = np.random.default_rng(0)
    manifests = rows // ROWS_PER_MANIFEST
    source = "s3://bench/raw"
    fingerprint = {"source": source, "config": {"seed": 0, "samples_per_shard": ROWS_PER_MANIFEST}}
    reasons = np.array(["not_an_image", "truncated", "too_small", "duplicate", "corrupt"])
    dup_hex = [os.urandom(32).hex() for _ in range(DUPLICATE_PAIRS)]
    for d in ("manifest", "shards", "parts"):
        (root / d).mkdir(parents=True, exist_ok=True)
    numbers = [0] * PARTS
    shards_by_part: list[list[dict]] = [[] for _ in range(PARTS)]
    for m in range(manifests):
        part = m % PARTS
        number = numbers[part]
        numbers[part] += 1
        n = ROWS_PER_MANIFEST
        first = m * n
        accepted = rng.random(n) < 0.9
        raw = np.frombuffer(os.urandom(32 * n), np.uint8).reshape(n, 32)
        sha = [bytes(r).hex() for r in raw]
        urls = [f"{source}/obj-{first + i:010d}.jpg" for i in range(n)]
        keys = [f"obj-{first + i:010d}" for i in range(n)]
        shard = layout.shard_name(part, PARTS, number)
        samples = []
        if m < 2 * DUPLICATE_PAIRS:   # one copy of pair m//2 in this manifest (parts alternate)
            sha[0], accepted[0] = dup_hex[m // 2], True
            samples = [{"__key__": keys[0], "jpg": b"x", "json": b"{}"}]
        status = np.where(accepted, "accepted", "rejected")
        table = pa.table({
            "list_pos": pa.array(np.arange(first, first + n), pa.int64()), "url": urls,
            "size": pa.array(rng.integers(1000, 500000, n), pa.int64()), "status": status,
            "reason": pa.array(np.where(accepted, None, reasons[rng.integers(0, 5, n)])),
            "detail": pa.nulls(n, pa.string()),
            "key": pa.array([k if a else None for k, a in zip(keys, accepted)], pa.string()),
            "shard": pa.array([shard if a else None for a in accepted], pa.string()),
            "sha256": sha, "width": pa.array(rng.integers(32, 5000, n), pa.int32()),
            "height": pa.array(rng.integers(32, 5000, n), pa.int32()),
            "out_bytes": pa.array(rng.integers(1000, 100000, n), pa.int64()),
        }, schema=MANIFEST_SCHEMA)
        data = write_tar(samples) if samples else b""
        entry = {"name": shard, "samples": int(accepted.sum()), "bytes": len(data), "sha256": "0" * 64}
        if samples:
            (root / shard).write_bytes(data)
        pq.write_table(table.replace_schema_metadata({"shard": json.dumps(entry)}),
                       root / layout.manifest_name(part, PARTS, number), compression="zstd")
        shards_by_part[part].append(entry)
    for part in range(PARTS):
        write_json(fs, str(root / layout.part_record_name(part, PARTS)),
                   {"fingerprint": fingerprint, "part": part, "inputs": 0, "accepted": 0, "reasons": {},
                    "shards": shards_by_part[part], "generations": 1})
    del order_key


CHILD = r"""
import json, sys, time
sys.path.insert(0, {repo!r}); sys.path.insert(0, {here!r})
which, root, impl = sys.argv[1], sys.argv[2], sys.argv[3]
if impl == "new":
    from pipeline.merge import merge
    from pipeline.inspect import info
else:
    from baseline_merge_info import merge, info
t0 = time.perf_counter()
if which == "merge":
    rec = merge(root, {parts})
    out = {{"samples": rec["samples"], "dropped": rec["cross_part_duplicates"]}}
else:
    d = info(root)
    out = {{"inputs": d["inputs"]}}
out["seconds"] = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so it would report the parent's size.
out["peak_rss_mb"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps(out))
"""


def measure(which: str, root: Path, impl: str) -> dict:
    code = CHILD.format(repo=str(REPO), here=str(HERE), parts=PARTS)
    r = subprocess.run([sys.executable, "-c", code, which, str(root), impl], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(sizes: list[int] | None = None) -> dict:
    from _inputs import workdir

    sizes = sizes or [1_000_000, 10_000_000]
    results = {}
    for rows in sizes:
        root = workdir() / f"merge-bench-{rows}"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        make_set(root, rows)
        made = time.perf_counter() - t0
        pristine = root.with_name(root.name + "-pristine")
        shutil.rmtree(pristine, ignore_errors=True)
        shutil.copytree(root, pristine)   # each implementation merges the same, untouched set
        row = {"setup_seconds": made}
        for impl in ("new", "baseline") if rows <= 1_000_000 else ("new",):
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(pristine, root)
            row[impl] = {"merge": measure("merge", root, impl), "info": measure("info", root, impl)}
            assert row[impl]["merge"]["dropped"] == DUPLICATE_PAIRS, row[impl]
        results[rows] = row
        shutil.rmtree(pristine, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        new = row["new"]
        line = (f"{rows:>11,} rows | merge {new['merge']['seconds']:7.1f} s, peak RSS {new['merge']['peak_rss_mb']:6.0f} MB"
                f" | info {new['info']['seconds']:7.1f} s, peak RSS {new['info']['peak_rss_mb']:6.0f} MB")
        if "baseline" in row:
            b = row["baseline"]
            line += (f" || baseline (row by row): merge {b['merge']['seconds']:.1f} s, {b['merge']['peak_rss_mb']:.0f} MB;"
                     f" info {b['info']['seconds']:.1f} s, {b['info']['peak_rss_mb']:.0f} MB"
                     f" | ratio new/baseline: merge time {new['merge']['seconds'] / b['merge']['seconds']:.2f}x, "
                     f"RSS {new['merge']['peak_rss_mb'] / b['merge']['peak_rss_mb']:.2f}x;"
                     f" info time {new['info']['seconds'] / b['info']['seconds']:.2f}x, "
                     f"RSS {new['info']['peak_rss_mb'] / b['info']['peak_rss_mb']:.2f}x")
        print(line, flush=True)
    if len(sizes) > 1:
        a, b = sizes[0], sizes[-1]
        for which in ("merge", "info"):
            per_a = results[a]["new"][which]["seconds"] / a
            per_b = results[b]["new"][which]["seconds"] / b
            print(f"{which}: seconds per million rows {per_a * 1e6:.1f} at {a:,}, {per_b * 1e6:.1f} at {b:,} "
                  f"(ratio {per_b / per_a:.2f}; 1.00 = linear)")
    return {str(k): v for k, v in results.items()}


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or None)
