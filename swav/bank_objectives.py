"""Streaming DeepCluster-v2 and SeLa-v2: targets from a bounded memory bank instead of an epoch-long one.

Both keep, per rank, the newest `objective.bank_size` samples' embeddings of the assignment crops keyed by
sample id (swav.clustering.MemoryBank), and every `objective.period` steps they relabel the bank:

- DeepCluster-v2: spherical k-means across ranks, one per head, on the bank rows of the head's assignment crop
  (heads take the assignment crops in turn). The centroids are copied into the head's prototypes, which stay
  frozen between clusterings (as solo-learn's port), so they score every crop (logits = emb . centroids / T) and
  the exported model carries them. A sample's target is its assignment in the bank of whichever rank saw it
  last (the batch's ids are looked up in every rank's bank; a row re-added keeps its label until the next
  clustering), or its nearest centroid when it is in none.
- SeLa-v2: the prototypes are learned by SGD; the bank rows are scored against them inside the forward and
  relabelled by Sinkhorn equipartition over the whole bank, rounded to exact counts per rank. A sample not in
  any rank's bank is labelled by the hard Sinkhorn code of its batch (as SwAV's codes, rounded).

Loss for both, as the reference DeepCluster-v2: cross-entropy of every crop's scores / T against the sample's
target, averaged over crops and heads. Bank, centroids and the clustering counter are checkpointed per rank.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from swav.clustering import MemoryBank, equipartition, spherical_kmeans
from swav.sinkhorn import sinkhorn64

log = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor) -> None:
    if _distributed():
        dist.all_reduce(t)


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(t, src=0)
    return t


class _BankObjective:
    """What DeepCluster-v2 and SeLa-v2 share: the bank, the period, the per-crop cross-entropy, the state."""

    name = ""
    learns_prototypes = True

    def __init__(self, cfg, batch_size: int, world: int, device: torch.device) -> None:
        o = cfg.objective
        self.crops_for_assign, self.temperature = list(cfg.swav.crops_for_assign), cfg.swav.temperature
        self.batch_size, self.period, self.seed = batch_size, o.period, cfg.seed
        p = cfg.model.num_prototypes
        self.ks = list(p) if isinstance(p, list) else [p]
        self.bank = MemoryBank(o.bank_size, len(self.crops_for_assign), cfg.model.feat_dim, len(self.ks), device)
        self.clusterings = 0
        self.cluster_seconds = 0.0
        self._ids: torch.Tensor | None = None
        self._found: torch.Tensor | None = None
        self._from_bank = 0.0

    def view_of(self, head: int) -> int:
        return head % len(self.crops_for_assign)

    def new_prototypes(self) -> list[torch.Tensor] | None:
        return None

    def clustering_step(self, step: int) -> bool:
        return step > 0 and step % self.period == 0

    def set_batch(self, ids: torch.Tensor | None) -> None:
        if ids is None:
            raise ValueError(f"objective {self.name} needs sample ids in every batch")
        if ids.shape[0] != self.batch_size:   # the cross-rank lookup gathers equal batches from every rank
            raise ValueError(f"objective {self.name} needs full batches of {self.batch_size}, got {ids.shape[0]}")
        self._ids = ids
        self._found: torch.Tensor | None = None   # the batch's bank assignments, looked up once per step
        self._world_ids: torch.Tensor | None = None

    def _cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        crops = logits.shape[0] // self.batch_size
        return F.cross_entropy(logits.float() / self.temperature, targets.repeat(crops))

    def _assign_rows(self, emb: torch.Tensor, view: int) -> torch.Tensor:
        c = self.crops_for_assign[view]
        return emb[self.batch_size * c: self.batch_size * (c + 1)]

    def _targets(self, head: int, fallback: torch.Tensor) -> torch.Tensor:
        if self._found is None:
            self._found, self._world_ids = self.bank.lookup_everywhere(self._ids)
        found = self._found[head]
        if head == 0:
            self._from_bank = float((found >= 0).float().mean())
        return torch.where(found >= 0, found, fallback)

    def after_step(self, step: int, emb: torch.Tensor) -> None:
        views = torch.stack([self._assign_rows(emb, v) for v in range(len(self.crops_for_assign))], 1)
        if self._found is None:
            self._found, self._world_ids = self.bank.lookup_everywhere(self._ids)
        # A sample lives in one bank, the one of the rank that saw it last, and keeps its label until the
        # next relabelling: every rank drops the rows of the world's batch, then adds its own batch.
        self.bank.forget(self._world_ids)
        self.bank.add(self._ids, views, self._found)

    def state_dict(self) -> dict:
        return {"bank": self.bank.state_dict(), "clusterings": self.clusterings,
                "cluster_seconds": self.cluster_seconds}

    def load_state(self, state: dict | None, old_world: int, new_world: int, rank: int) -> None:
        # A bank holds its own rank's samples: each rank takes its own, or starts empty where the old
        # world had no such rank (its first clustering then sees fewer rows).
        if state is not None:
            self.bank.load_state_dict(state["bank"])
            self.clusterings = int(state["clusterings"])
            self.cluster_seconds = float(state["cluster_seconds"])
        else:
            log.warning("rank %d had no memory bank in the checkpoint (world %d): its bank restarts empty", rank,
                        old_world)

    def log_fields(self) -> dict:
        return {"bank_filled": self.bank.filled, "clusterings": self.clusterings,
                "cluster_seconds": round(self.cluster_seconds, 4), "targets_from_bank": self._from_bank}


class DeepClusterV2Objective(_BankObjective):
    name = "deepclusterv2"
    learns_prototypes = False

    def __init__(self, cfg, batch_size: int, world: int, device: torch.device) -> None:
        super().__init__(cfg, batch_size, world, device)
        self.iterations = cfg.objective.kmeans_iterations
        g = torch.Generator().manual_seed(cfg.seed)
        # Until the first clustering the prototypes are random unit centroids (the same on every rank).
        self.centroids = [F.normalize(torch.randn(k, cfg.model.feat_dim, generator=g), dim=1).to(device)
                          for k in self.ks]
        self._write = True   # a fresh run puts its first centroids into the prototypes; a resume has them

    def new_prototypes(self) -> list[torch.Tensor] | None:
        if not self._write:
            return None
        self._write = False
        return self.centroids

    def forward_inputs(self, step: int) -> list[torch.Tensor] | None:
        if self.clustering_step(step):
            self._cluster(step)
        return None

    def _initial(self, head: int, step: int) -> torch.Tensor:
        """K rows of rank 0's bank (distinct, seeded by step), the previous centroids where it has fewer."""
        c = self.centroids[head].clone()
        filled = torch.nonzero(self.bank.ids >= 0).flatten()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 31 + head)
        pick = filled[torch.randperm(filled.numel(), generator=g)[: c.shape[0]].to(filled.device)]
        c[: pick.numel()] = self.bank.rows[pick, self.view_of(head)].to(c)
        return _broadcast(c)

    def _cluster(self, step: int) -> None:
        t0 = time.perf_counter()
        filled = self.bank.ids >= 0
        for h in range(len(self.ks)):
            rows = self.bank.rows[filled, self.view_of(h)]
            centroids, assign = spherical_kmeans(rows, self._initial(h, step), self.iterations, _all_reduce)
            self.centroids[h] = centroids
            self.bank.assignments[h, filled] = assign
        self._write = True
        self.clusterings += 1
        self.cluster_seconds += time.perf_counter() - t0

    def loss(self, step: int, emb: torch.Tensor, scores, extra_scores) -> tuple[torch.Tensor, list[torch.Tensor]]:
        heads = scores if isinstance(scores, list) else [scores]
        loss, qs = 0.0, []
        for h, head_scores in enumerate(heads):   # the prototypes hold self.centroids (written before the forward)
            with torch.no_grad():
                c = self.crops_for_assign[self.view_of(h)]
                nearest = head_scores[self.batch_size * c: self.batch_size * (c + 1)].argmax(1)
                targets = self._targets(h, nearest)
            loss = loss + self._cross_entropy(head_scores, targets) / len(heads)
            qs.append(F.one_hot(targets, head_scores.shape[1]).float())
        if self.clusterings == 0:
            # Until the first clustering the steps only fill the banks with the untrained network's embeddings,
            # as the reference's memory initialisation pass does. Training on nearest-random-centroid targets
            # instead collapses the embeddings within a pass; k-means seeded from collapsed rows then gives K
            # equal centroids, uniform scores (loss ln K) and a zero gradient for good. A zero loss keeps every
            # parameter's gradient defined (and reduced alike under every ZeRO stage).
            loss = 0.0 * loss
        return loss, qs

    def state_dict(self) -> dict:
        return {**super().state_dict(), "centroids": [c.clone() for c in self.centroids]}

    def load_state(self, state: dict | None, old_world: int, new_world: int, rank: int) -> None:
        super().load_state(state, old_world, new_world, rank)
        self._write = False   # the checkpoint's prototypes are the centroids (frozen since they were written)
        if state is not None:
            self.centroids = [c.to(self.centroids[0].device) for c in state["centroids"]]
        if old_world != new_world:   # centroids are global: a rank new to the world takes rank 0's
            self.centroids = [_broadcast(c.contiguous()) for c in self.centroids]


class SeLaV2Objective(_BankObjective):
    name = "selav2"

    def __init__(self, cfg, batch_size: int, world: int, device: torch.device) -> None:
        super().__init__(cfg, batch_size, world, device)
        self.epsilon, self.batch_iterations = cfg.swav.epsilon, cfg.swav.sinkhorn_iterations
        self.bank_iterations = cfg.objective.bank_sinkhorn_iterations
        self._relabel = False

    def forward_inputs(self, step: int) -> list[torch.Tensor] | None:
        # The bank is scored inside the forward (where ZeRO-3 has the prototypes gathered).
        self._relabel = self.clustering_step(step)
        if not self._relabel:
            return None
        filled = self.bank.ids >= 0
        return [self.bank.rows[filled, v] for v in range(len(self.crops_for_assign))]

    def _relabel_bank(self, extra_scores: list) -> None:
        t0 = time.perf_counter()
        filled = self.bank.ids >= 0
        for h in range(len(self.ks)):
            bank_scores = extra_scores[h][self.view_of(h)]
            self.bank.assignments[h, filled] = equipartition(bank_scores, self.epsilon, self.bank_iterations)
        self.clusterings += 1
        self.cluster_seconds += time.perf_counter() - t0

    def loss(self, step: int, emb: torch.Tensor, scores, extra_scores) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self._relabel:
            self._relabel_bank(extra_scores)
        heads = scores if isinstance(scores, list) else [scores]
        loss, qs = 0.0, []
        for h, head_scores in enumerate(heads):
            with torch.no_grad():
                c = self.crops_for_assign[self.view_of(h)]
                codes = sinkhorn64(head_scores[self.batch_size * c: self.batch_size * (c + 1)].detach(),
                                   self.epsilon, self.batch_iterations)
                targets = self._targets(h, codes.argmax(1))
            loss = loss + self._cross_entropy(head_scores, targets) / len(heads)
            qs.append(F.one_hot(targets, head_scores.shape[1]).float())
        return loss, qs
