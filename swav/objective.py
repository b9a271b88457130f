"""The objective seam: what a training step computes from the model's outputs, and what it carries between steps.

The trainer owns the model, the optimizer, the data, checkpoints and the sync protocol; an objective owns the
rest. Per step the trainer asks `forward_inputs(step)` for extra rows the forward should score with the current
prototypes (SwAV's queue: scored inside the forward, where ZeRO-3 has the prototypes gathered), calls
`loss(...)` on the forward's outputs, steps the optimizer, and calls `after_step(...)`. The objective's state
travels in each rank's checkpoint state file through `state_dict` / `load_state`.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from swav.loss import swav_loss
from swav.queue import EmbeddingQueue, local_queue_length

log = logging.getLogger(__name__)


class Objective(Protocol):
    name: str
    learns_prototypes: bool        # False: the prototype layer stays frozen (DeepCluster-v2 writes centroids into it)

    def set_batch(self, ids: torch.Tensor | None) -> None:
        """The sample ids of this step's batch (before forward_inputs)."""

    def forward_inputs(self, step: int) -> list[torch.Tensor] | None:
        """Rows the forward should also score with the prototypes this step, or None."""

    def new_prototypes(self) -> list[torch.Tensor] | None:
        """Weights the trainer writes into the prototype layer before this step's forward (DeepCluster-v2's
        fresh centroids, one [K, D] per head), or None to leave it."""

    def loss(self, step: int, emb: torch.Tensor, scores: torch.Tensor | list[torch.Tensor],
             extra_scores: list | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(scalar loss, soft assignments of the first head's assignment crops, for the health signals)."""

    def after_step(self, step: int, emb: torch.Tensor) -> None:
        """State updates once the optimizer has stepped."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this rank's objective state (merged into the rank's state file)."""

    def load_state(self, state: dict | None, old_world: int, new_world: int, rank: int) -> None:
        """Restore from a rank's state file (None: the old world had no such rank)."""

    def log_fields(self) -> dict:
        """Extra fields for this step's metrics row."""


class SwAVObjective:
    """Swapped prediction with Sinkhorn codes (per head) and an optional queue of past embeddings."""

    name = "swav"
    learns_prototypes = True

    def __init__(self, cfg, batch_size: int, world: int, device: torch.device) -> None:
        s = cfg.swav
        self.crops_for_assign, self.temperature = list(s.crops_for_assign), s.temperature
        self.epsilon, self.iterations, self.queue_start = s.epsilon, s.sinkhorn_iterations, s.queue_start_step
        self.batch_size = batch_size
        p = cfg.model.num_prototypes
        self.heads = len(p) if isinstance(p, list) else 1
        self.queue = EmbeddingQueue(len(self.crops_for_assign), local_queue_length(s.queue_length, batch_size, world),
                                    cfg.model.feat_dim).to(device)
        self._use_queue = False

    def set_batch(self, ids: torch.Tensor | None) -> None:
        pass

    def forward_inputs(self, step: int) -> list[torch.Tensor] | None:
        self._use_queue = step >= self.queue_start and self.queue.full
        if not self._use_queue:
            return None
        return [self.queue.rows[i] for i in range(self.queue.rows.shape[0])]

    def new_prototypes(self) -> None:
        return None

    def loss(self, step: int, emb: torch.Tensor, scores, extra_scores) -> tuple[torch.Tensor, list[torch.Tensor]]:
        heads = scores if isinstance(scores, list) else [scores]
        loss, qs = 0.0, []
        for h, head_scores in enumerate(heads):
            qscores = extra_scores[h] if extra_scores is not None else None
            head_loss, head_q = swav_loss(head_scores.float(), self.batch_size, self.crops_for_assign,
                                          self.temperature, self.epsilon, self.iterations, qscores,
                                          return_assignments=True)
            loss = loss + head_loss / self.heads
            qs.append(head_q[0])
        return loss, qs

    def after_step(self, step: int, emb: torch.Tensor) -> None:
        if step >= self.queue_start and self.queue.length:
            bs = self.batch_size
            for i, crop_id in enumerate(self.crops_for_assign):
                self.queue.push(i, emb[bs * crop_id: bs * (crop_id + 1)].float())

    def state_dict(self) -> dict:
        return {"queue": self.queue.state_dict()}

    def load_state(self, state: dict | None, old_world: int, new_world: int, rank: int) -> None:
        # A queue holds the embeddings of its own rank's past batches: each rank takes its own, or starts
        # empty where the old world had no such rank; never another rank's.
        if state is not None:
            self.queue.load_resized(state["queue"], old_world, new_world)
        elif self.queue.length:
            log.warning("rank %d had no queue in the checkpoint (world %d): its queue restarts empty", rank,
                        old_world)

    def log_fields(self) -> dict:
        return {"queue_in_use": bool(self._use_queue)}


def build_objective(cfg, batch_size: int, world: int, device: torch.device) -> Objective:
    from swav.bank_objectives import DeepClusterV2Objective, SeLaV2Objective

    kinds = {"swav": SwAVObjective, "deepclusterv2": DeepClusterV2Objective, "selav2": SeLaV2Objective}
    return kinds[cfg.objective.name](cfg, batch_size, world, device)
