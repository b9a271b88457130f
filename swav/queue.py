"""The per-rank FIFO of past embeddings that enlarges Sinkhorn's batch (SwAV's queue)."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def local_queue_length(global_length: int, batch_size: int, world_size: int) -> int:
    """Per-rank rows: the global length rounded down to a multiple of the global batch, split over ranks."""
    global_batch = batch_size * world_size
    return (global_length - global_length % global_batch) // world_size if global_length else 0


class EmbeddingQueue(nn.Module):
    """Rows [num_assign_crops, L, D]; newest first. Used only once full, as in the reference."""

    def __init__(self, num_assign_crops: int, length: int, dim: int):
        super().__init__()
        self.register_buffer("rows", torch.zeros(num_assign_crops, length, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._filled = 0   # a host copy of `filled`: reading the device buffer every step would sync with it

    @property
    def length(self) -> int:
        return self.rows.shape[1]

    @property
    def full(self) -> bool:
        return self.length > 0 and self._filled >= self.length

    @torch.no_grad()
    def push(self, i: int, emb: torch.Tensor) -> None:
        bs = emb.shape[0]
        if bs > self.length:
            return
        self.rows[i, bs:] = self.rows[i, :-bs].clone()
        self.rows[i, :bs] = emb.detach().to(self.rows.dtype)
        if i == self.rows.shape[0] - 1:
            self.filled.add_(bs)
            self._filled += bs

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._filled = int(self.filled)   # once per resume, not per step
        return out

    def load_resized(self, state: dict, old_world: int, new_world: int) -> None:
        """A checkpoint from another world size: keep what fits, else restart filling (logged)."""
        rows = state["rows"]
        if rows.shape == self.rows.shape:
            self.load_state_dict(state)
            return
        log.warning("queue shape %s in checkpoint (world %d) != %s now (world %d): the queue restarts empty",
                    tuple(rows.shape), old_world, tuple(self.rows.shape), new_world)
