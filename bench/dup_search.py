"""Merge's cross-part duplicate search at 10M and 100M accepted rows, 20% of them later copies.

Rows come straight from a generator (no manifests or tars: those costs are bench/merge_info.py's), in
manifests of 1,000 spread over 4 parts; a fifth of all rows repeat content accepted in another part.
Each measurement runs in a fresh process (peak RSS is VmHWM). Side by side: the partitioned, on-disk
search (pipeline/dupsearch.py) and the in-memory one it replaced (16 B per accepted row in numpy
arrays, then a sort), which finds the candidate rows only; the new one also resolves every group to
its losers. Prints seconds, peak RSS and ratios.

    python bench/dup_search.py               # 10M and 100M (~25 min on 2 cores, ~6 GB of temp disk)
    python bench/dup_search.py 1000000       # a quick look
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ROWS_PER_MANIFEST = 1000
PARTS = 4

CHILD = r"""
import json, sys, time
import numpy as np
import pyarrow as pa
sys.path.insert(0, sys.argv[3])
n, impl = int(sys.argv[1]), sys.argv[2]
R, PARTS = 1000, 4
manifests = n // R
# Content ids: a flagged row (odds p) whose row one manifest earlier is not flagged repeats that row's
# content, which lies in another part (parts take manifests in turn). p(1 - p) = 0.2 of all rows are
# later copies, each in a group of two.
P = 0.27639320225002106
def flags(m):
    return np.random.default_rng(m + 10**9).random(R) < P
def content(m):
    ids = m * R + np.arange(R, dtype=np.int64)
    if m:
        later = flags(m) & ~flags(m - 1)
        ids[later] = (m - 1) * R + np.arange(R)[later]
    return ids
def mix(ids):   # a 64-bit hash prefix per content id (splitmix64)
    z = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
t0 = time.perf_counter()
found = 0
if impl == "partitioned":
    from pipeline.dupsearch import DuplicateSearch
    s = DuplicateSearch()
    for m in range(manifests):
        s.add(m, np.arange(R, dtype=np.int32), mix(content(m)))
    def read_copies(m, rows):
        ids = content(m)[rows]
        sha = [f"{int(h):016x}" + "0" * 48 for h in mix(ids)]
        urls = [f"s3://b/raw/p{m % PARTS}/{m}-{r}.jpg" for r in rows]
        return pa.table({"sha256": sha, "key": [f"{m}-{r}" for r in rows], "url": urls}), 0
    for m, keys in s.losers(read_copies, len("s3://b/raw/"), 0):
        found += len(keys)
    s.close()
else:
    hs, ms, rs = [], [], []
    for m in range(manifests):
        hs.append(mix(content(m))); ms.append(np.full(R, m, np.int32)); rs.append(np.arange(R, dtype=np.int32))
    h = np.concatenate(hs); mm = np.concatenate(ms); rr = np.concatenate(rs)
    del hs, ms, rs
    import pyarrow.compute as pc
    order = pc.sort_indices(pa.array(h)).to_numpy()
    ordered = h[order]
    same = ordered[1:] == ordered[:-1]
    found = int(same.sum())          # later copies (groups of two here)
out = {"seconds": time.perf_counter() - t0, "later_copies": found}
out["peak_rss_mb"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps(out))
"""


def measure(n: int, impl: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(n), impl, str(REPO)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(sizes: list[int] | None = None) -> dict:
    out = {}
    for n in sizes or [10_000_000, 100_000_000]:
        new, base = measure(n, "partitioned"), measure(n, "in_memory")
        out[str(n)] = {"partitioned": new, "in_memory": base}
        print(f"{n:>12,} rows, {new['later_copies']:,} later copies | partitioned {new['seconds']:7.1f} s, peak RSS "
              f"{new['peak_rss_mb']:6.0f} MB | in memory (candidates only) {base['seconds']:6.1f} s, peak RSS "
              f"{base['peak_rss_mb']:6.0f} MB | RSS {new['peak_rss_mb'] / base['peak_rss_mb']:.2f}x", flush=True)
    if len(out) > 1:
        a, b = (sorted(out, key=int)[0], sorted(out, key=int)[-1])
        pa_, pb = out[a]["partitioned"]["seconds"] / int(a), out[b]["partitioned"]["seconds"] / int(b)
        print(f"partitioned: seconds per million rows {pa_ * 1e6:.1f} at {int(a):,}, {pb * 1e6:.1f} at {int(b):,} "
              f"(ratio {pb / pa_:.2f}; 1.00 = linear)")
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    from _inputs import write_results

    sizes = [int(a) for a in sys.argv[1:]] or None
    res = main(sizes)
    if sizes is None:
        write_results(str(HERE / "results" / f"cpu-{time.strftime('%Y-%m-%d')}-dup-search.json"), res)
