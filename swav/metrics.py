"""Training health signals and where they go: the log, metrics.jsonl and TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("swav.train")


@torch.no_grad()
def assignment_stats(q: torch.Tensor) -> tuple[float, int]:
    """(entropy in nats of the global hard-assignment histogram, prototypes in use) over all ranks.

    A healthy run uses many prototypes (entropy approaching ln K); a collapsed one
    puts everything on a few.
    """
    counts = torch.bincount(q.argmax(dim=1), minlength=q.shape[1]).double()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    p = counts / counts.sum().clamp_min(1)
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum()), int((counts > 0).sum())


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl, mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except Exception as e:  # noqa: BLE001 - TensorBoard is a nicety, metrics.jsonl is the record
                log.warning("TensorBoard events disabled (%s)", e)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    """metrics.jsonl as rows, one per step: a step logged again after a resume replaces the earlier row."""
    rows: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                rows[int(row["step"])] = row
    return [rows[k] for k in sorted(rows)]
