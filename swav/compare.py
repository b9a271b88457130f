"""`swav compare GRID.yaml --out DIR`: objectives x crop recipes x seeds at one budget, every cell trained and
evaluated with every protocol, then one table (DIR/table.md, DIR/table.json, DIR/table.png).

A cell is DIR/cells/<objective>/<crops>/seed<N>: its run directory (checkpoints, metrics), `timing.json`
(wall-clock of each training attempt) and `eval-<protocol>.json`. What a cell already has is not redone, and a
cell cut off mid-training resumes from its checkpoint, so a grid can span sessions. Application glue, like the
demo: it drives `swav pretrain` under torchrun and calls the evaluation functions.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from swav.catalog import jobs_dir, resolve_config
from swav.compare_table import write_table
from swav.config import load_config, read_mapping
from swav.evaluate import evaluate
from swav.metrics import read_metrics
from swav_io.errors import UserError

log = logging.getLogger("swav.compare")
DEFAULT_GRID = "compare/reviewers.yaml"
PROTOCOLS = ("knn", "linear", "linear-augment", "finetune-0.01", "finetune-0.1", "finetune-1.0")


@dataclass
class Grid:
    job: str
    steps: int
    ranks: int
    seeds: list[int]
    objectives: dict[str, list[str]]
    crops: dict[str, list[str]]
    protocols: list[str]
    data: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)


def load_grid(path: str) -> Grid:
    """The grid file, checked: every key known, every protocol one we run."""
    raw = read_mapping(path, "grid file")
    known = set(Grid.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"grid {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    missing = sorted(k for k in ("job", "steps", "ranks", "seeds", "objectives", "crops", "protocols") if k not in raw)
    if missing:
        raise UserError(f"grid {path}: missing {', '.join(missing)}")
    grid = Grid(**raw)
    bad = [p for p in grid.protocols if p not in PROTOCOLS]
    if bad:
        raise UserError(f"grid {path}: unknown protocol(s) {', '.join(bad)} (known: {', '.join(PROTOCOLS)})")
    grid.objectives = {k: list(v or []) for k, v in grid.objectives.items()}
    grid.crops = {k: list(v or []) for k, v in grid.crops.items()}
    return grid


def grid_path(arg: str) -> str:
    if not arg:
        return str(jobs_dir() / DEFAULT_GRID)
    if Path(arg).is_file():
        return arg
    shipped = jobs_dir() / "compare" / f"{Path(arg).name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return str(shipped)
    raise UserError(f"grid {arg!r} is neither a file nor a shipped grid (jobs/compare/)")


@dataclass
class Data:
    shards: str
    train: str
    val: str


def prepare_data(grid: Grid, out: Path) -> Data:
    """The grid's shard set and labelled images: given in the grid, or the demo's, built once under out."""
    if grid.data.get("shards"):
        return Data(grid.data["shards"], grid.data["train"], grid.data["val"])
    from pipeline.build import BuildConfig, build
    from swav.demo import digits_split, make_bucket

    root = out / "data"
    shards = root / "shards"
    if not (root / "built.json").exists():
        bucket = root / "bucket"
        make_bucket(bucket)
        result = build(str(bucket), str(shards), BuildConfig(samples_per_shard=128), progress=True)
        (root / "built.json").write_text(json.dumps({"accepted": result.accepted}))
    train, val = digits_split(root)
    return Data(str(shards), str(train), str(val))


def cell_dir(out: Path, objective: str, crops: str, seed: int) -> Path:
    return out / "cells" / objective / crops / f"seed{seed}"


def train_cell(grid: Grid, data: Data, where: Path, overrides: list[str], seed: int) -> None:
    """Train one cell to grid.steps (resuming its checkpoint if any); attempts' wall-clock into timing.json."""
    from swav.demo import torchrun_cli

    timing_path = where / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {"attempts": []}
    if timing.get("done"):
        return
    where.mkdir(parents=True, exist_ok=True)
    args = ["pretrain", resolve_config(grid.job), f"data.url={data.shards}", f"run_dir={where / 'run'}",
            f"train.steps={grid.steps}", f"seed={seed}", f"checkpoint.every={max(1, grid.steps // 4)}", *overrides]
    t0 = time.time()
    rc = torchrun_cli(grid.ranks, args, where / "pretrain.log")
    timing["attempts"].append(time.time() - t0)
    if rc != 0:
        timing_path.write_text(json.dumps(timing))
        raise UserError(f"training {where} failed (exit {rc}); see {where / 'pretrain.log'}")
    timing["done"] = True
    timing_path.write_text(json.dumps(timing))


def _protocol_args(protocol: str, ev: dict) -> dict:
    if protocol == "knn":
        return {"kind": "knn"}
    if protocol == "linear":
        return {"kind": "linear", "epochs": ev.get("linear_epochs", 100), "lr": ev.get("linear_lr", 0.3)}
    if protocol == "linear-augment":
        return {"kind": "linear", "augment": True, "epochs": ev.get("image_epochs", 10), "lr": ev.get("linear_lr", 0.3)}
    fraction = float(protocol.split("-", 1)[1])
    return {"kind": "finetune", "augment": True, "fraction": fraction,
            "epochs": ev.get("finetune_epochs", ev.get("image_epochs", 10)),
            "lr": ev.get("finetune_lr", 0.1)}


def evaluate_cell(grid: Grid, data: Data, where: Path, size: int, flip: bool, root: Path,
                  random_init: tuple[str, int] | None = None) -> None:
    """Every protocol on the cell's last checkpoint, or on a random init (arch, seed) of the same trunk."""
    where.mkdir(parents=True, exist_ok=True)
    for protocol in grid.protocols:
        path = where / f"eval-{protocol}.json"
        if path.exists():
            continue
        kw = _protocol_args(protocol, grid.eval)
        kind = kw.pop("kind")
        if kind == "finetune":
            # One subset per fraction for the whole grid: every cell fine-tunes on the same labelled images.
            kw["subset_file"] = str(root / f"subset-{kw['fraction']:g}.json")
        if random_init:
            kw.update(arch=random_init[0], random_init=True, init_seed=random_init[1])
        else:
            kw["checkpoint"] = str(where / "run" / "checkpoints")
        t0 = time.time()
        res = evaluate(kind, data.train, data.val, image_size=size, seed=0, flip=flip, **kw)
        res["seconds"] = time.time() - t0
        path.write_text(json.dumps(res, indent=2))


def scores(where: Path, protocols: list[str]) -> dict:
    out = {}
    for protocol in protocols:
        res = json.loads((where / f"eval-{protocol}.json").read_text())
        key = {"knn": "knn20", "linear": "linear", "linear-augment": "linear"}.get(protocol, "finetune")
        out[protocol] = {"top1": res[f"{key}_top1"], "top5": res[f"{key}_top5"],
                         "choice": res.get("protocol", {}).get("choice"), "seconds": res["seconds"]}
    return out


def cell_summary(where: Path, protocols: list[str]) -> dict:
    """What the table needs from one cell: scores per protocol, wall-clock, clustering time, images/s."""
    rows = read_metrics(str(where / "run" / "metrics.jsonl"))
    timing = json.loads((where / "timing.json").read_text())
    out = {"train_seconds": sum(timing["attempts"]), "images_per_s": statistics.fmean(r["images_per_s"] for r in rows),
           "cluster_seconds": rows[-1].get("cluster_seconds"), "final_loss": rows[-1]["loss"],
           "prototypes_in_use": rows[-1]["prototypes_in_use"], "losses": {r["step"]: r["loss"] for r in rows},
           "scores": scores(where, protocols)}
    return out


def run_compare(grid_arg: str, out: str) -> dict:
    path = grid_path(grid_arg)
    grid = load_grid(path)
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    data = prepare_data(grid, root)
    base = load_config(resolve_config(grid.job))
    cells = [(o, c, s) for o in grid.objectives for c in grid.crops for s in grid.seeds]
    summaries = {}
    for i, (objective, crops, seed) in enumerate(cells, 1):
        where = cell_dir(root, objective, crops, seed)
        print(f"[{i}/{len(cells)}] {objective} / {crops} / seed {seed}", flush=True)
        overrides = [*grid.objectives[objective], *grid.crops[crops]]
        train_cell(grid, data, where, overrides, seed)
        cfg = load_config(resolve_config(grid.job), [*overrides, f"seed={seed}"])
        evaluate_cell(grid, data, where, cfg.crops.size_crops[0], cfg.crops.flip_prob > 0, root)
        summaries[(objective, crops, seed)] = cell_summary(where, grid.protocols)
    # The trunks the cells started from (the same architecture and seed, untrained): the floor every
    # objective has to clear.
    baselines = {}
    for seed in grid.seeds:
        where = root / "random-init" / f"seed{seed}"
        print(f"random init / seed {seed}", flush=True)
        evaluate_cell(grid, data, where, base.crops.size_crops[0], base.crops.flip_prob > 0, root,
                      random_init=(base.model.arch, seed))
        baselines[seed] = scores(where, grid.protocols)
    table = write_table(root, grid, path, summaries, base, baselines)
    print(f"wrote {root / 'table.md'}, {root / 'table.json'} and {root / 'table.png'}")
    return table
