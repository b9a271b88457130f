"""The build's in-part duplicate check: memory against the number of accepted objects.

Each measurement runs in a fresh process (its own peak RSS, VmHWM): N accepted hashes go through the
check the way a build part sends them (a lookup, then an add; a commit every 1,000 as shards commit),
10% of them repeats. Side by side: the SQLite-backed SeenHashes and the Python set of hex digests it
replaced. Prints seconds, peak RSS and the ratios at each N.

    python bench/dedup_memory.py              # 1M and 10M
    python bench/dedup_memory.py 200000       # a quick look
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CHILD = r"""
import hashlib, json, os, sys, time
sys.path.insert(0, sys.argv[4])
from pipeline.seen import SeenHashes
n, impl, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
seen = SeenHashes(path) if impl == "sqlite" else set()
t0 = time.perf_counter()
dups = 0
for i in range(n):
    # every tenth object repeats the content of one 7 objects earlier
    j = i - 7 if i % 10 == 9 else i
    h = hashlib.sha256(j.to_bytes(8, "little")).hexdigest()
    if h in seen:
        dups += 1
    else:
        seen.add(h)
    if impl == "sqlite" and i % 1000 == 999:
        seen.commit(i // 1000 + 1, "")
out = {"seconds": time.perf_counter() - t0, "duplicates": dups}
out["peak_rss_mb"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
if impl == "sqlite":
    out["file_mb"] = os.path.getsize(path) / 2**20
    seen.close(remove=True)
print(json.dumps(out))
"""


def measure(n: int, impl: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", CHILD, str(n), impl, os.path.join(tmp, "seen.sqlite"), str(REPO)],
                           capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def main(sizes: list[int] | None = None) -> dict:
    out = {}
    for n in sizes or [1_000_000, 10_000_000]:
        new, base = measure(n, "sqlite"), measure(n, "set")
        assert new["duplicates"] == base["duplicates"] == n // 10
        out[str(n)] = {"sqlite": new, "python_set": base}
        print(f"{n:>12,} accepted | SeenHashes {new['seconds']:7.1f} s, peak RSS {new['peak_rss_mb']:6.0f} MB, file "
              f"{new['file_mb']:6.0f} MB | set {base['seconds']:6.1f} s, peak RSS {base['peak_rss_mb']:6.0f} MB | "
              f"time {new['seconds'] / base['seconds']:.2f}x, RSS {new['peak_rss_mb'] / base['peak_rss_mb']:.2f}x",
              flush=True)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    from _inputs import write_results

    sizes = [int(a) for a in sys.argv[1:]] or None
    res = main(sizes)
    if sizes is None:
        import time
        write_results(str(HERE / "results" / f"cpu-{time.strftime('%Y-%m-%d')}-dedup-memory.json"), res)
