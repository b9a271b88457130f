"""Memory of 4 DataLoader workers over a 1M-shard index: each loading its own (the old way) vs one load
per rank, memory-mapped by the workers (swav.data / shards.index.share_index). Side by side, one process.

Each worker touches every shard name and count, as a long run eventually does; reported per worker:
USS (memory no other process shares) and RSS. Run: .venv/bin/python bench/index_memory.py [shards]
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from shards import layout  # noqa: E402
from shards.index import load_index, open_shared_index, share_index  # noqa: E402

WORKERS = 4


def make_set(root: str, n: int) -> str:
    names = pa.array([f"shards/p00000-of-00001-{i:09d}.tar" for i in range(n)])
    sha = pa.array([f"{i:064x}" for i in range(n)])
    table = pa.table({"name": names, "samples": pa.array(np.full(n, 1000, np.int64)),
                      "bytes": pa.array(np.full(n, 256 << 20, np.int64)), "sha256": sha})
    pq.write_table(table, os.path.join(root, layout.INDEX), compression="zstd")
    with open(os.path.join(root, layout.BUILD_RECORD), "w") as f:
        json.dump({"counts": {}}, f)
    return root


def _touch(idx) -> int:
    return int(idx.samples.sum()) + int(pc.sum(pc.utf8_length(idx.names)).as_py())


def _worker(how: str, where: str, out, barrier) -> None:
    idx = load_index(where) if how == "own" else open_shared_index(where)
    _touch(idx)
    barrier.wait()    # every worker has touched the index: shared pages are shared when measured
    info = psutil.Process().memory_full_info()
    out.put((info.uss, info.rss))
    barrier.wait()


def measure(how: str, where: str) -> dict:
    ctx = mp.get_context("spawn")   # what GPU runs use: nothing inherited, only what is passed
    q, barrier = ctx.Queue(), ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_worker, args=(how, where, q, barrier)) for _ in range(WORKERS)]
    base = psutil.Process().memory_full_info().uss
    for p in procs:
        p.start()
    got = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return {"uss_mb_per_worker": round(max(u for u, _ in got) / 2**20, 1),
            "rss_mb_per_worker": round(max(r for _, r in got) / 2**20, 1),
            "parent_uss_mb": round(base / 2**20, 1)}


def main(n: int = 1_000_000) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        make_set(tmp, n)
        own = measure("own", tmp)
        t0 = time.perf_counter()
        shared_path = share_index(load_index(tmp), tmp)
        share_s = time.perf_counter() - t0
        shared = measure("shared", shared_path)
        # a bare interpreter with the same imports, for the floor both include
        floor = measure("shared", share_index(load_index(make_set(tempfile.mkdtemp(dir=tmp), 10)), tmp))
    res = {"shards": n, "workers": WORKERS, "each_worker_loads": own, "mapped_from_one_load": shared,
           "tiny_index_floor": floor, "share_seconds": round(share_s, 2),
           "uss_ratio_mapped_vs_own": round(shared["uss_mb_per_worker"] / own["uss_mb_per_worker"], 3)}
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
