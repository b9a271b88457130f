"""Multi-crop views per second on 1 core, measured side by side on the same JPEGs:

- baseline: the reference's recipe with torchvision's PIL transforms, one crop at a time;
- full CPU augmentation (`augment_on: cpu`): decode once at reduced size, uint8 crops, OpenCV photometric ops;
- the CPU part of `augment_on: device` (uint8 crops only);
- stream overhead without augmentation vs reading the same tars with plain webdataset;
- opening a stream over a synthetic index of 1,000,000 shards: time and memory.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import time

import numpy as np
import torch
from _inputs import shard_jpegs, shard_set
from PIL import Image, ImageFilter

torch.set_num_threads(1)
SIZE, NUM, MIN_S, MAX_S = [224, 96], [2, 6], [0.14, 0.05], [1.0, 0.14]


class _PILBlur:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img):
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def baseline_transforms():
    import torchvision.transforms as T

    out = []
    for s, n, lo, hi in zip(SIZE, NUM, MIN_S, MAX_S):
        t = T.Compose([T.RandomResizedCrop(s, scale=(lo, hi)), T.RandomHorizontalFlip(),
                       T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2),
                       _PILBlur(), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.228, 0.224, 0.225])])
        out += [t] * n
    return out


def rate(fn, items, min_seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
            n += 1
        if time.perf_counter() - t0 >= min_seconds:
            return n / (time.perf_counter() - t0)


def side_by_side(runs: dict, rounds: int = 7, seconds: float = 1.0) -> dict:
    """Rates of every contender, interleaved round by round so that a noisy neighbour slows all
    of them alike; each ratio is the median over rounds of that round's ratio to the baseline."""
    rates = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (fn, items, per_call) in runs.items():
            rates[name].append(rate(fn, items, seconds) * per_call)
    base = np.array(rates["baseline"])
    out = {f"{name}_ips": float(np.median(r)) for name, r in rates.items()}
    out.update({f"{name}_ratio": float(np.median(np.array(r) / base)) for name, r in rates.items() if name != "baseline"})
    out.update({f"{name}_ratio_range": [float(x) for x in np.percentile(np.array(r) / base, [0, 100])]
                for name, r in rates.items() if name != "baseline"})
    return out


def main() -> dict:
    from swav.multicrop import CropBatcher, MultiCrop

    jpegs = shard_jpegs(limit=64)
    tfs = baseline_transforms()

    def baseline(item):
        img = Image.open(io.BytesIO(item[1])).convert("RGB")
        return [t(img) for t in tfs]

    mc = MultiCrop(SIZE, NUM, MIN_S, MAX_S, seed=0)
    batch = 32

    def ours(aug: bool):
        def run(chunk):   # what a data-loader worker does per batch (swav/data.py)
            b = CropBatcher(mc, len(chunk))
            for key, data in chunk:
                b.add(data, key, 0)
            return b.finish(augment=aug)
        return run

    chunks = [jpegs[i:i + batch] for i in range(0, len(jpegs), batch)]
    res = side_by_side({"baseline": (baseline, jpegs, 1), "cpu_full": (ours(True), chunks, batch),
                        "device_cpu_part": (ours(False), chunks, batch)})
    print(f"multi-crop 2x224+6x96, 1 core, median of 7 interleaved rounds: baseline (torchvision PIL, per crop) "
          f"{res['baseline_ips']:.1f} img/s | full CPU augmentation {res['cpu_full_ips']:.1f} img/s = "
          f"{res['cpu_full_ratio']:.2f}x (target >= 3x; rounds {res['cpu_full_ratio_range'][0]:.2f}-"
          f"{res['cpu_full_ratio_range'][1]:.2f}) | augment_on=device CPU part {res['device_cpu_part_ips']:.1f} "
          f"img/s = {res['device_cpu_part_ratio']:.2f}x (target >= 8x; rounds "
          f"{res['device_cpu_part_ratio_range'][0]:.2f}-{res['device_cpu_part_ratio_range'][1]:.2f})")
    res.update(stream_overhead())
    res.update(million_shards())
    return res


def stream_overhead() -> dict:
    import webdataset as wds

    from shards.index import load_index
    from shards.stream import ShardStream

    root = shard_set()
    idx = load_index(str(root))
    total = int(idx.samples.sum())
    urls = [str(root / idx.name(i)) for i in range(len(idx))]

    def plain():
        t0 = time.perf_counter()
        n = sum(1 for _ in wds.WebDataset(urls, shardshuffle=False, empty_check=False))
        return n / (time.perf_counter() - t0)

    def ours(window: int):
        s = ShardStream(idx, 0, 0, 1, window=window)
        t0 = time.perf_counter()
        for _ in range(total):
            next(s)
        return total / (time.perf_counter() - t0)

    # Rounds interleaved, best of each: the default shuffle window (16 open shards) and the old 4.
    rounds = [(plain(), ours(16), ours(4)) for _ in range(5)]
    best_plain, best_ours, best_w4 = (max(r[i] for r in rounds) for i in range(3))
    print(f"stream without augmentation: plain webdataset {best_plain:.0f} samples/s | ShardStream, shuffle window "
          f"16 shards {best_ours:.0f} samples/s = {best_ours / best_plain:.2f}x (target >= 0.8x); window 4 "
          f"{best_w4:.0f} samples/s = {best_w4 / best_plain:.2f}x")
    return {"webdataset_sps": best_plain, "stream_sps": best_ours, "stream_ratio": best_ours / best_plain,
            "stream_window4_ratio": best_w4 / best_plain}


_WRITE = r"""
import sys
import pyarrow as pa, pyarrow.parquet as pq
from shards import layout
from shards.manifest import INDEX_SCHEMA
root, n = sys.argv[1], 1_000_000
pq.write_table(pa.table({"name": [f"shards/p00000-{i:07d}.tar" for i in range(n)], "samples": [1000] * n,
               "bytes": [1 << 28] * n, "sha256": ["0" * 64] * n}, schema=INDEX_SCHEMA), f"{root}/{layout.INDEX}")
open(f"{root}/{layout.BUILD_RECORD}", "w").write("{}")
"""

_OPEN = r"""
import json, sys, time
def hwm_mb():  # peak RSS of this process image (ru_maxrss would include the parent's, across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from shards.index import load_index
from shards.stream import ShardStream
before = hwm_mb()
t0 = time.perf_counter()
idx = load_index(sys.argv[1])
s = ShardStream(idx, 0, 5, 64)
s.passes.perm(0, s.layout)
secs = time.perf_counter() - t0
print(json.dumps({"seconds": secs, "max_rss_mb": hwm_mb(), "rss_before_mb": before}))
"""


def million_shards() -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-c", _WRITE, d], check=True)
        # A fresh process that only opens the stream: its peak RSS is the stream's cost (plus imports).
        out = json.loads(subprocess.run([sys.executable, "-c", _OPEN, d], capture_output=True, text=True,
                                        check=True).stdout)
    print(f"open a stream over 1,000,000 shards: {out['seconds']:.2f} s (target < 3 s); peak RSS "
          f"{out['max_rss_mb']:.0f} MB, of which {out['max_rss_mb'] - out['rss_before_mb']:.0f} MB after imports "
          f"(target < 300 MB)")
    return {"million_open_s": out["seconds"], "million_peak_rss_mb": out["max_rss_mb"],
            "million_rss_growth_mb": out["max_rss_mb"] - out["rss_before_mb"]}


if __name__ == "__main__":
    main()
