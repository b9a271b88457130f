"""The GPU checks `bench/gpu.sh` runs on one GPU, no network: synthetic shards built locally, then
- resnet50 and resnet50w2, 2x224+6x96, bf16, channels_last, augment_on device: images/s/GPU and the
  data-wait fraction (median over the logged windows after warmup), from the real `swav pretrain`;
- SyncBatchNorm over nccl in a one-process group: forward/backward/step of the real model;
- host syncs per training step under torch.cuda.set_sync_debug_mode("warn"), as the difference
  between two runs of different lengths (setup and checkpoints cancel out);
- pinned memory: the loader's batches are page-locked, so the non-blocking copies are asynchronous.
Every check records its result or its error; the JSON goes to bench/results/gpu-<date>.json.
`--smoke` runs the same code on CPU at toy sizes, to test this script where no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from _inputs import write_results  # noqa: E402

GOAL = 1500.0   # img/s/GPU for resnet50 multi-crop on an H100; the official code: ~91 per V100


def build_shards(root: str, images: int) -> str:
    from pipeline.build import BuildConfig, build
    from swav.demo_bucket import photo_bucket

    photo_bucket(os.path.join(root, "bucket"), images, seed=1, min_side=300, max_side=700)
    build(os.path.join(root, "bucket"), os.path.join(root, "shards"), BuildConfig(samples_per_shard=100),
          progress=False)
    return os.path.join(root, "shards")


def _cfg(job: str, shards: str, run: str, extra: list[str]):
    from swav.catalog import resolve_config
    from swav.config import load_config

    return load_config(resolve_config(job), [f"data.url={shards}", f"run_dir={run}", "checkpoint.every=100000",
                                             f"checkpoint.url={os.path.join(run, 'checkpoints')}",
                                             "train.log_every=5", "deepspeed.zero_stage=0", *extra])


def throughput(job: str, shards: str, steps: int, extra: list[str]) -> dict:
    from swav.metrics import read_metrics
    from swav.train import pretrain

    run = tempfile.mkdtemp(prefix=f"gpu-{job}-")
    cfg = _cfg(job, shards, run, [f"train.steps={steps}", *extra])
    t0 = time.time()
    pretrain(cfg)
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    rows = rows[2:] or rows   # the first windows include warmup
    return {"images_per_s_per_gpu": round(statistics.median(r["images_per_s"] for r in rows), 1),
            "data_wait_fraction": round(statistics.median(r["data_wait"] for r in rows), 3),
            "last_loss": rows[-1]["loss"] if rows else None, "steps": steps, "wall_s": round(time.time() - t0, 1),
            "batch_per_gpu": cfg.train.batch_size, "overrides": extra}


def syncs_per_step(job: str, shards: str, extra: list[str], short: int, long: int) -> dict:
    from swav.train import pretrain

    counts = {}
    for steps in (short, long):
        run = tempfile.mkdtemp(prefix="gpu-sync-")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("warn")
            try:
                pretrain(_cfg(job, shards, run, [f"train.steps={steps}", "train.log_every=1000",
                                                 "train.sync_every=10", *extra]))
            finally:
                if torch.cuda.is_available():
                    torch.cuda.set_sync_debug_mode(0)
        counts[steps] = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    return {"syncs": counts, "per_step": round((counts[long] - counts[short]) / (long - short), 2),
            "note": "train.sync_every=10: the loss read and the preemption agreement come every 10 steps"}


def syncbn_nccl(device: str) -> dict:
    import torch.distributed as dist

    from swav.models import SwAVModel

    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group(backend, rank=0, world_size=1)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(SwAVModel("resnet50", 2048, 128, 3000)).to(device)
    n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = [torch.randn(16, 3, 224, 224, device=device), torch.randn(48, 3, 96, 96, device=device)]
    emb, scores = model(x)
    scores.float().logsumexp(1).mean().backward()
    opt.step()
    return {"backend": dist.get_backend(), "sync_bn_layers": n_sync, "finite": bool(torch.isfinite(emb).all())}


def pinned(shards: str) -> dict:
    from swav.data import build_loader

    cfg = _cfg("resnet50", shards, tempfile.mkdtemp(), ["data.num_workers=2", "train.batch_size=8"])
    batch = next(iter(build_loader(cfg, 0, 1, pin_memory=torch.cuda.is_available())))
    return {"images_pinned": [bool(t.is_pinned()) for t in batch.images],
            "params_pinned": [bool(t.is_pinned()) for t in batch.params]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes: test this script")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.smoke
    res: dict = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0) if gpu else "cpu (smoke)",
                 "torch": torch.__version__, "goal_resnet50_img_s_per_gpu": GOAL}
    toy = [] if gpu else ["model.arch=resnet50w0.0625", "model.hidden_mlp=64", "crops.size_crops=[64,32]",
                          "train.batch_size=8", "data.num_workers=1", "model.num_prototypes=100"]
    steps = 200 if gpu else 12
    work = tempfile.mkdtemp(prefix="swav-gpu-")
    shards = os.path.join(work, "shards")   # a temporary folder: never written into the results
    images = 3000 if gpu else 64
    checks = {
        "shards": lambda: {"images": images, "built": bool(build_shards(work, images))},
        "resnet50": lambda: throughput("resnet50", shards, steps,
                                       ["train.batch_size=64", "data.num_workers=12", *toy]),
        "resnet50w2": lambda: throughput("resnet50w2", shards, steps // 2,
                                         ["train.batch_size=64", "data.num_workers=12", *toy]),
        "syncs": lambda: syncs_per_step("resnet50", shards, ["train.batch_size=32",
                                        "data.num_workers=8", *toy], 20, 60),
        "syncbn_nccl": lambda: syncbn_nccl("cuda") if gpu else {"skipped": "SyncBatchNorm needs CUDA"},
        "pinned_memory": lambda: pinned(shards),
    }
    for name, fn in checks.items():
        t0 = time.time()
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failed check must not hide the others
            res[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        res[name]["seconds"] = round(time.time() - t0, 1)
        print(name, json.dumps(res[name])[:400], flush=True)
    if "images_per_s_per_gpu" in res.get("resnet50", {}):
        res["resnet50_vs_goal"] = round(res["resnet50"]["images_per_s_per_gpu"] / GOAL, 3)
    # A smoke run tests this script; only a GPU run's figures belong in bench/results.
    out = args.out or (os.path.join(os.path.dirname(__file__), "results", f"gpu-{res['date']}.json") if gpu
                       else os.path.join(work, "smoke.json"))
    write_results(out, res)


if __name__ == "__main__":
    main()
