"""The comparison table of `swav compare`: mean +- std over seeds per (objective, crops, protocol), every seed's
numbers beside it, as markdown, JSON and a plot."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import torch


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value: one seed shows no spread)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(values: list[float], digits: int = 1) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f} (1 seed)"


def _optional(values: list) -> list[float]:
    return [v for v in values if v is not None]


def baseline_rows(grid, baselines: dict) -> list[dict]:
    rows = []
    for protocol in grid.protocols:
        top1 = [b[protocol]["top1"] for b in baselines.values() if protocol in b]
        top5 = [b[protocol]["top5"] for b in baselines.values() if protocol in b]
        if not top1:
            continue
        rows.append({"objective": "random init", "crops": "-", "protocol": protocol, "seeds": len(top1),
                     "top1": top1, "top5": top5, "top1_mean_std": mean_std(top1), "top5_mean_std": mean_std(top5)})
    return rows


def table_rows(grid, summaries: dict) -> list[dict]:
    rows = []
    for objective in grid.objectives:
        for crops in grid.crops:
            cells = [summaries[(objective, crops, s)] for s in grid.seeds if (objective, crops, s) in summaries]
            if not cells:
                continue
            cluster = _optional([c["cluster_seconds"] for c in cells]) or None
            for protocol in grid.protocols:
                top1 = [c["scores"][protocol]["top1"] for c in cells]
                top5 = [c["scores"][protocol]["top5"] for c in cells]
                rows.append({"objective": objective, "crops": crops, "protocol": protocol, "seeds": len(cells),
                             "top1": top1, "top5": top5, "top1_mean_std": mean_std(top1),
                             "top5_mean_std": mean_std(top5),
                             "train_minutes": [c["train_seconds"] / 60 for c in cells],
                             "cluster_seconds": cluster, "images_per_s": [c["images_per_s"] for c in cells],
                             "final_loss": [c["final_loss"] for c in cells]})
    return rows


def _markdown(grid, grid_file: str, rows: list[dict], base, summaries: dict, floor: list[dict]) -> str:
    lines = [f"# {Path(grid_file).stem}: {', '.join(grid.objectives)} x {', '.join(grid.crops)} x seeds "
             f"{', '.join(map(str, grid.seeds))}", "",
             f"Budget: {grid.steps} steps of {grid.ranks} ranks x {base.train.batch_size} images ({grid.job} job, "
             f"{base.model.arch}); machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"{'GPU' if torch.cuda.is_available() else 'CPU only'}. Top-1 / top-5 in %, mean ± sample std over seeds.",
             "Wall-clock is the training processes' (start-up included); clustering is the k-means or "
             "Sinkhorn-over-the-bank time inside it (SwAV's batch Sinkhorn is part of its loss, not counted).", "",
             "| objective | crops | protocol | top-1 | top-5 | train min | clustering s | images/s | final loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cluster = _fmt(r["cluster_seconds"]) if r["cluster_seconds"] else "—"
        lines.append(f"| {r['objective']} | {r['crops']} | {r['protocol']} | {_fmt(r['top1'])} | {_fmt(r['top5'])} "
                     f"| {_fmt(r['train_minutes'])} | {cluster} | {_fmt(r['images_per_s'], 0)} "
                     f"| {_fmt(r['final_loss'], 3)} |")
    for r in floor:
        lines.append(f"| random init | - | {r['protocol']} | {_fmt(r['top1'])} | {_fmt(r['top5'])} | - | - | - | - |")
    lines += ["", "## Every seed", "", "| objective | crops | seed | " + " | ".join(
        f"{p} top-1 / top-5" for p in grid.protocols) + " | train min | final loss |",
              "|---|---|---|" + "---|" * (len(grid.protocols) + 2)]
    for (objective, crops, seed), c in summaries.items():
        scores = " | ".join(f"{c['scores'][p]['top1']:.1f} / {c['scores'][p]['top5']:.1f}" for p in grid.protocols)
        lines.append(f"| {objective} | {crops} | {seed} | {scores} | {c['train_seconds'] / 60:.1f} "
                     f"| {c['final_loss']:.3f} |")
    lines += ["", "Random inits (the trunk each seed's cells started from): " + "; ".join(
        f"{r['protocol']} " + ", ".join(f"{v:.1f}" for v in r["top1"]) for r in floor) + " (top-1, seeds in order).",
              "", "![top-1 per protocol, and the loss](table.png)", ""]
    return "\n".join(lines)


def _plot(grid, rows: list[dict], summaries: dict, path: Path, floor: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(14, 4.5))
    pairs = [("random init", "-")] + [(o, c) for o in grid.objectives for c in grid.crops]
    width = 0.8 / max(1, len(pairs))
    for j, (o, c) in enumerate(pairs):
        mine = [r for r in rows + floor if r["objective"] == o and r["crops"] == c]
        if not mine:
            continue
        xs = [grid.protocols.index(r["protocol"]) + (j - (len(pairs) - 1) / 2) * width for r in mine]
        ys = [r["top1_mean_std"][0] for r in mine]
        err = [r["top1_mean_std"][1] or 0.0 for r in mine]
        bars.bar(xs, ys, width, yerr=err, capsize=2, label=f"{o} / {c}", color="lightgrey" if j == 0 else None)
        if j == 0:
            continue
        runs = [summaries[(o, c, s)]["losses"] for s in grid.seeds if (o, c, s) in summaries]
        steps = sorted(runs[0])
        curves.plot(steps, [statistics.fmean(run[s] for run in runs if s in run) for s in steps], label=f"{o} / {c}")
    bars.set_xticks(range(len(grid.protocols)), grid.protocols, rotation=15)
    bars.set(title="top-1 % (mean ± std over seeds)", ylim=(0, 105))
    bars.legend(fontsize=7)
    curves.set(title="training loss (mean over seeds)", xlabel="step")
    curves.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(root: Path, grid, grid_file: str, summaries: dict, base, baselines: dict) -> dict:
    rows = table_rows(grid, summaries)
    floor = baseline_rows(grid, baselines)
    (root / "table.md").write_text(_markdown(grid, grid_file, rows, base, summaries, floor), encoding="utf-8")
    cells = [{"objective": o, "crops": c, "seed": s, **{k: v for k, v in summ.items() if k != "losses"}}
             for (o, c, s), summ in summaries.items()]
    table = {"grid": grid_file, "steps": grid.steps, "ranks": grid.ranks, "seeds": grid.seeds, "rows": rows,
             "random_init": floor, "cells": cells}
    (root / "table.json").write_text(json.dumps(table, indent=2, default=lambda v: None if v is None else str(v)),
                                     encoding="utf-8")
    _plot(grid, rows, summaries, root / "table.png", floor)
    return table

