"""`swav report`: a run's metrics.jsonl as PNG plots and a markdown summary."""

from __future__ import annotations

import os

from swav.metrics import read_metrics
from swav_io.errors import UserError


def plot_training(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(steps, [r["loss"] for r in rows])
    if rows and "entropy_max" in rows[0]:
        axes[0].axhline(rows[0]["entropy_max"], ls="--", c="grey", lw=1, label="ln K (uniform prediction)")
        axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set(title="SwAV loss", xlabel="step")
    axes[1].plot(steps, [r["prototypes_in_use"] for r in rows], c="tab:green")
    axes[1].set(title="prototypes in use (hard assignments)", xlabel="step")
    axes[2].plot(steps, [r["assign_entropy"] for r in rows], c="tab:purple", label="assignment entropy")
    if rows and "entropy_max" in rows[0]:
        axes[2].axhline(rows[0]["entropy_max"], ls="--", c="grey", lw=1, label="ln K")
    axes[2].set(title="assignment entropy (nats)", xlabel="step")
    axes[2].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_knn(results: dict[str, float], path: str, title: str = "kNN top-1 (%)") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names, values = list(results), list(results.values())
    bars = ax.bar(names, values, color=["tab:grey", "tab:blue"][: len(values)] + ["tab:orange"] * (len(values) - 2))
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.1f}", ha="center")
    ax.set(title=title, ylim=(0, 105))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_table(rows: list[dict]) -> str:
    if not rows:
        return "(no metrics)"
    first, last = rows[0], rows[-1]
    ips = [r["images_per_s"] for r in rows[1:]] or [first["images_per_s"]]
    wait = [r["data_wait"] for r in rows[1:]] or [first["data_wait"]]
    lines = ["| metric | first | last |", "|---|---|---|",
             f"| step | {first['step']} | {last['step']} |",
             f"| loss | {first['loss']:.4f} | {last['loss']:.4f} |",
             f"| assignment entropy (nats, max {last.get('entropy_max', float('nan')):.2f}) | "
             f"{first['assign_entropy']:.2f} | {last['assign_entropy']:.2f} |",
             f"| prototypes in use | {first['prototypes_in_use']} | {last['prototypes_in_use']} |",
             f"| lr | {first['lr']:.4g} | {last['lr']:.4g} |",
             "", f"Throughput: median {sorted(ips)[len(ips) // 2]:.1f} images/s; data wait median "
             f"{100 * sorted(wait)[len(wait) // 2]:.0f}% of step time."]
    return "\n".join(lines)


def write_report(run: str, out: str = "") -> list[str]:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"no metrics.jsonl in {run}: is it a run directory?")
    rows = read_metrics(path)
    if not rows:
        raise UserError(f"{path} holds no metrics yet")
    out = out or os.path.join(run, "report")
    os.makedirs(out, exist_ok=True)
    png = plot_training(rows, os.path.join(out, "training.png"))
    md = os.path.join(out, "summary.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(f"# Run {run}\n\n![training](training.png)\n\n{summary_table(rows)}\n")
    return [png, md]
