"""Inputs shared by the benchmarks: a realistic mixed bucket and a shard set built from it; and where results go."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def demo_step_inputs(make: Callable | None = None) -> tuple:
    """The demo job's config for one-process step benchmarks (ZeRO-0, no queue) and one batch of its crops,
    drawn with `make` (torch.randn unless given) after seeding torch with 0."""
    import torch

    from swav.config import load_config

    torch.manual_seed(0)
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "jobs", "demo.yaml"),
                      ["swav.queue_length=0", "deepspeed.zero_stage=0"])
    b, make = cfg.train.batch_size, make or torch.randn
    return cfg, [make(n * b, 3, s, s) for s, n in zip(cfg.crops.size_crops, cfg.crops.num_crops)]


def mixed_bucket(root: Path, photos: int = 480) -> Path:
    """Photos from scikit-image/scikit-learn resized to 400-2000 px, plus every odd case."""
    from swav.demo_bucket import odd_cases, photo_bucket

    if not (root / ".done").exists():
        photo_bucket(root / "photos", photos, seed=7, min_side=400, max_side=2000)
        odd_cases(root / "odd", rel_prefix="odd/")
        (root / ".done").touch()
    return root


def workdir() -> Path:
    d = Path(os.environ.get("SWAV_BENCH_DIR", Path(tempfile.gettempdir()) / "swav-bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def shard_set(samples_per_shard: int = 50) -> Path:
    """A shard set of the mixed bucket (built once per work dir)."""
    from pipeline.build import BuildConfig, build

    root = workdir()
    bucket = root / "bucket"
    if not bucket.exists():
        mixed_bucket(bucket)
    dst = root / "shards"
    if not (dst / "build.json").exists():
        build(str(bucket), str(dst), BuildConfig(samples_per_shard=samples_per_shard), progress=False)
    return dst


def shard_jpegs(limit: int = 0) -> list[tuple[str, bytes]]:
    from shards.tario import iter_samples

    out = []
    for tar in sorted((shard_set() / "shards").glob("*.tar")):
        with open(tar, "rb") as f:
            out += [(s["__key__"], s["jpg"]) for s in iter_samples(f)]
    return out[:limit] if limit else out


def write_results(out: str, results: dict) -> None:
    """One benchmark run's figures as indented JSON (bench/results/ for recorded runs)."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {out}")

