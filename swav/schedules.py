"""Step-indexed schedules: linear warmup then cosine decay, precomputed like DINO's."""

from __future__ import annotations

import numpy as np


def warmup_cosine(base_lr: float, final_lr: float, total_steps: int, warmup_steps: int = 0,
                  start_warmup: float = 0.0) -> np.ndarray:
    """lr for every optimizer step: start_warmup -> base_lr linearly, then cosine to final_lr."""
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(start_warmup, base_lr, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    rest = total_steps - warmup_steps
    t = np.arange(rest)
    cos = final_lr + 0.5 * (base_lr - final_lr) * (1 + np.cos(np.pi * t / max(1, rest)))
    return np.concatenate([warm, cos]).astype(np.float64)
