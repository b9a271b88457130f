"""`swav demo`: the whole product on this machine in minutes, with no network and no GPU.

bucket of real, uncurated images (shipped in scikit-image/scikit-learn, plus
broken and duplicate files) -> shard set -> SwAV pretraining on 2 DeepSpeed
ranks that stops itself midway and resumes from its checkpoint -> kNN of
pretrained vs random-init features on handwritten digits -> report and plots.

This module is application glue (like the CLI): it may use the sharding
pipeline; the training modules never do.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.build import BuildConfig, build, summary_lines
from swav.catalog import jobs_dir
from swav.config import load_config
from swav.demo_bucket import digits_folder, odd_cases, photo_bucket
from swav.evaluate import evaluate
from swav.metrics import read_metrics
from swav.report import plot_knn, summary_table, write_report
from swav_io.errors import UserError

log = logging.getLogger("swav.demo")

DEMO_CONFIG = jobs_dir() / "demo.yaml"
RANDOM_SEEDS = tuple(range(7))   # other random inits for scale: the first five that are not the run's seed


def make_bucket(root: Path, photos: int = 48) -> dict:
    """The uncurated bucket: photos at many sizes, every digit as a PNG, and the odd cases."""
    photo_bucket(root / "photos", photos, seed=0, min_side=300, max_side=1600)
    n_digits = digits_folder(root / "digits", size=64)
    odd = odd_cases(root / "uploads", rel_prefix="uploads/")
    return {"photos": photos, "digits": n_digits, "odd": len(odd)}


def digits_split(root: Path) -> tuple[Path, Path]:
    """The labelled digits the demo evaluates on (train and held-out val folders), made once under root."""
    train_dir, val_dir = root / "digits-train", root / "digits-val"
    if not train_dir.exists():
        digits_folder(train_dir, split="train", size=64)
        digits_folder(val_dir, split="val", size=64)
    return train_dir, val_dir


def _serve_s3(local: Path, endpoint_url: str, bucket: str = "swav-demo") -> str:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint_url})
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put(str(local) + "/", f"{bucket}/raw/", recursive=True)
    return f"s3://{bucket}/raw"


def torchrun_cli(nproc: int, args: list[str], log_path: Path) -> int:
    """`swav ARGS` on nproc local ranks under torchrun; the full output goes to log_path, progress lines to stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), "-m", "swav.cli", *args]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    with open(log_path, "a", encoding="utf-8") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            if " I [swav" in line or " W [" in line or " E [" in line or "Error" in line:
                sys.stderr.write(line)
        return proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(out: str = "demo-output", steps: int = 0, endpoint_url: str = "", fresh: bool = False,
             nproc: int = 2, seed: int | None = None, overrides: list[str] | None = None) -> dict:
    t0 = time.time()
    overrides = [*(overrides or []), *([f"seed={seed}"] if seed is not None else [])]
    job = load_config(str(DEMO_CONFIG), overrides)
    steps = steps or job.train.steps
    root = Path(out).resolve()
    if fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    bucket, shards, run = root / "bucket", root / "shards", root / "run"
    logs = root / "logs"
    logs.mkdir(exist_ok=True)

    print("1/5 making an uncurated bucket from images shipped in scikit-image and scikit-learn ...", flush=True)
    marker = root / "bucket.json"  # outside the bucket: a marker of ours must not become an input object
    if not marker.exists():
        shutil.rmtree(bucket, ignore_errors=True)
        marker.write_text(json.dumps(make_bucket(bucket)))
    src = str(bucket)
    if endpoint_url:
        src = _serve_s3(bucket, endpoint_url)
        print(f"    serving the bucket from {src} at {endpoint_url}")

    print("2/5 building shards (validate, normalise, deduplicate, pack) ...", flush=True)
    opts = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}
    result = build(src, str(shards), BuildConfig(samples_per_shard=128), opts, {}, progress=True)
    print("\n".join("    " + line for line in summary_lines(result)))

    print(f"3/5 SwAV pretraining on {nproc} DeepSpeed ranks: stops itself at step {steps // 2}, then resumes ...",
          flush=True)
    common = [str(DEMO_CONFIG), f"data.url={shards}", f"run_dir={run}", f"train.steps={steps}", *overrides]
    for attempt, extra in enumerate(([f"train.stop_after={steps // 2}"], [])):
        rc = torchrun_cli(nproc, ["pretrain", *common, *extra], logs / "pretrain.log")
        if rc != 0:
            raise UserError(f"pretraining failed (exit {rc}); see {logs / 'pretrain.log'}")
        if attempt == 0:
            print("    ... stopped as if preempted; rerunning the same command resumes from the checkpoint", flush=True)

    print("4/5 evaluating: kNN on handwritten digits, pretrained vs random-init trunk ...", flush=True)
    ckpt_url = str(run / "checkpoints")
    pre, rnd = _evaluate(root, ckpt_url, job)
    others = list(rnd["other_seeds_knn20_top1"].values())
    evals = {"pretrained": pre, "random_init": rnd}
    (root / "eval.json").write_text(json.dumps(evals, indent=2))

    print("5/5 writing the report ...", flush=True)
    pngs = write_report(str(run), str(root / "report"))
    knn_png = plot_knn({"random init (same seed)": rnd["knn20_top1"], "SwAV pretrained": pre["knn20_top1"]},
                       str(root / "report" / "knn.png"), "digits kNN (k=20) top-1 %")
    rows = read_metrics(str(run / "metrics.jsonl"))
    md = root / "report" / "README.md"
    md.write_text(_report_markdown(result, rows, pre, rnd, time.time() - t0))
    summary = {"report": str(md), "plots": [pngs[0], knn_png], "checkpoints": ckpt_url, "shards": str(shards),
               "knn20_pretrained": pre["knn20_top1"], "knn20_random": rnd["knn20_top1"],
               "knn20_random_other_seeds": others,
               "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"], "seconds": time.time() - t0}
    _print_closing(summary, rows)
    return summary


def _evaluate(root: Path, ckpt_url: str, job) -> tuple[dict, dict]:
    """kNN on digits of the pretrained trunk, and of the random init it started from (plus other seeds)."""
    train_dir, val_dir = digits_split(root)
    # Features are taken at the size the trunk was trained to see (its large views).
    size = job.crops.size_crops[0]
    pre = evaluate("knn", str(train_dir), str(val_dir), checkpoint=ckpt_url, image_size=size, seed=0)
    # The baseline is the very trunk the run started from (same architecture, same seed), so the
    # difference is what pretraining did. Random inits of this thin trunk score several points apart
    # on the digits, so a few other seeds are reported beside it for scale.
    rnd = evaluate("knn", str(train_dir), str(val_dir), checkpoint=ckpt_url, random_init=True, image_size=size,
                   seed=job.seed)
    other_seeds = [s for s in RANDOM_SEEDS if s != job.seed][:5]
    others = [evaluate("knn", str(train_dir), str(val_dir), checkpoint=ckpt_url, random_init=True, image_size=size,
                       seed=s)["knn20_top1"] for s in other_seeds]
    rnd["other_seeds_knn20_top1"] = dict(zip(other_seeds, others))
    return pre, rnd


def _report_markdown(result, rows: list[dict], pre: dict, rnd: dict, seconds: float) -> str:
    return (f"# swav-stream demo\n\nRan in {seconds / 60:.1f} minutes.\n\n## Shards\n\n"
            f"{result.inputs} objects in, {result.accepted} accepted; rejections: "
            f"{', '.join(f'{k} {v}' for k, v in sorted(result.reasons.items())) or 'none'}.\n\n"
            f"## Pretraining\n\n![training](training.png)\n\n{summary_table(rows)}\n\n"
            f"## Evaluation (digits, kNN on frozen trunk features)\n\n![knn](knn.png)\n\n"
            f"| trunk | kNN k=20 top-1 | kNN k=200 top-1 |\n|---|---|---|\n"
            f"| random init the run started from | {rnd['knn20_top1']:.1f}% | {rnd['knn200_top1']:.1f}% |\n"
            f"| SwAV pretrained | {pre['knn20_top1']:.1f}% | {pre['knn200_top1']:.1f}% |\n\n"
            f"Other random inits of the same trunk (kNN k=20 top-1): "
            f"{', '.join(f'seed {k} {v:.1f}%' for k, v in rnd['other_seeds_knn20_top1'].items())}.\n")


def _print_closing(s: dict, rows: list[dict]) -> None:
    k = rows[-1].get("entropy_max", 0.0)
    last = rows[-1]
    n_protos = round(math.exp(k)) if k else 0
    print("\nDone. Where everything is:")
    print(f"  report       {s['report']}")
    print(f"  plots        {', '.join(s['plots'])}")
    print(f"  shards       {s['shards']}")
    print(f"  checkpoints  {s['checkpoints']}  (rerun `swav pretrain` with the same arguments to continue)")
    print("What the numbers mean:")
    print(f"  loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}; a uniform prediction over the {n_protos} prototypes "
          f"scores ln K = {k:.3f}.")
    if s["last_loss"] > k - 0.02:
        print("  The loss has settled at ln K: the model predicts every prototype equally (SwAV's collapse to "
              "uniform predictions, common on tiny data and short runs; see README, 'The demo').")
    else:
        print("  The loss is below ln K: views of an image predict each other's cluster codes.")
    print(f"  prototypes in use at the end: {last['prototypes_in_use']} of {n_protos} (assignment entropy "
          f"{last['assign_entropy']:.2f} of at most {k:.2f} nats); few in use means the codes have collapsed.")
    others = s["knn20_random_other_seeds"]
    print(f"  digits kNN top-1: {s['knn20_pretrained']:.1f}% pretrained vs {s['knn20_random']:.1f}% for the random init "
          f"the run started from ({s['knn20_pretrained'] - s['knn20_random']:+.1f} points from self-supervision);")
    print(f"  other random inits of this trunk score {min(others):.1f}-{max(others):.1f}% (mean "
          f"{sum(others) / len(others):.1f}%).")
    print(f"  total time {s['seconds'] / 60:.1f} min")
