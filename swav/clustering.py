"""Clustering for the streaming objectives (DeepCluster-v2, SeLa-v2): a bounded per-rank memory bank keyed by
sample id, spherical k-means across ranks, and an exact equipartition of the bank.

Nothing here grows with the data set: the bank has a fixed number of rows, every cross-rank k-means
step is an all-reduce of K x D sums and K counts, and a cross-rank lookup moves the world's batch of ids.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from swav.sinkhorn import sinkhorn64

AllReduce = Callable[[torch.Tensor], None]   # in-place sum across ranks (torch.distributed.all_reduce)


class MemoryBank:
    """This rank's newest `size` samples: for each, its id, the embedding of each assignment view, and one
    cluster assignment per head (-1 = none yet). A new row takes an empty slot, else the oldest row's, so the
    bank always holds the `size` samples this rank saw most recently (and no other rank saw since)."""

    def __init__(self, size: int, views: int, dim: int, heads: int = 1, device: torch.device | str = "cpu") -> None:
        if size < 1:
            raise ValueError("a memory bank needs at least one row")
        self.ids = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.rows = torch.zeros(size, views, dim, device=device)
        self.assignments = torch.full((heads, size), -1, dtype=torch.int64, device=device)
        self.written = torch.full((size,), -1, dtype=torch.int64, device=device)   # when each row came; -1 empty
        self.next = 0   # samples added so far (host side)

    @property
    def size(self) -> int:
        return self.ids.shape[0]

    @property
    def filled(self) -> int:
        return int((self.ids >= 0).sum())

    @torch.no_grad()
    def add(self, ids: torch.Tensor, emb: torch.Tensor, assignments: torch.Tensor | None = None) -> None:
        """Write a batch (emb [n, views, dim]); a sample already in the bank keeps only its newest row.

        `assignments` [heads, n] (-1 = none) is each sample's label from the last relabelling, which its new
        row keeps until the next one: a sample seen again between two clusterings still has a target."""
        ids = ids.to(self.ids.device)
        n = ids.shape[0]
        labels = assignments.to(self.ids.device) if assignments is not None else None
        if n > self.size:
            ids, emb, n = ids[-self.size:], emb[-self.size:], self.size
            labels = labels[:, -self.size:] if labels is not None else None
        self.forget(ids)
        # Empty slots first, then the oldest rows: a slot a sample left (it came back on another rank)
        # is reused at once instead of waiting for a ring pointer to come round.
        pos = torch.argsort(self.written, stable=True)[:n]
        self.ids[pos] = ids
        self.rows[pos] = F.normalize(emb.detach().float(), dim=-1).to(self.rows)
        self.assignments[:, pos] = labels if labels is not None else -1
        self.written[pos] = self.next + torch.arange(n, device=self.ids.device)
        self.next += n

    @torch.no_grad()
    def forget(self, ids: torch.Tensor) -> None:
        """Drop the rows of these samples; their slots are the first the next add() fills."""
        present = torch.isin(self.ids, ids.to(self.ids.device))
        self.ids[present] = -1
        self.assignments[:, present] = -1
        self.written[present] = -1

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """[heads, n]: each head's assignment of each id, -1 where it is not in the bank or not yet assigned."""
        ids = ids.to(self.ids.device)
        out = torch.full((self.assignments.shape[0], ids.shape[0]), -1, dtype=torch.int64, device=ids.device)
        # Sorted search, not an [n, size] match matrix: a lookup for every rank's batch at once stays
        # O((n + size) log size) in time and O(n + size) in memory.
        sorted_ids, order = torch.sort(self.ids)
        pos = torch.searchsorted(sorted_ids, ids).clamp(max=self.size - 1)
        found = sorted_ids[pos] == ids
        out[:, found] = self.assignments[:, order[pos[found]]]
        return out

    def lookup_everywhere(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lookup() of `ids` against the banks of every rank, the world's ids of this step).

        The batch's ids are gathered, each rank looks all of them up in its own bank, and the answers are
        max-reduced, so a sample seen before on any rank gets its assignment. Traffic per step is the world's
        batch of ids and [heads, world x n] assignments; nothing scales with the data set. Every rank must call
        it with the same n. Without a process group it is lookup() and `ids`."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.lookup(ids), ids.to(self.ids.device)
        ids = ids.to(self.ids.device).contiguous()
        world, rank, n = dist.get_world_size(), dist.get_rank(), ids.shape[0]
        everyone = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(everyone, ids)
        world_ids = torch.cat(everyone)
        found = self.lookup(world_ids)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return found[:, rank * n: (rank + 1) * n].contiguous(), world_ids

    def state_dict(self) -> dict:
        return {"ids": self.ids.clone(), "rows": self.rows.clone(), "assignments": self.assignments.clone(),
                "written": self.written.clone(), "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        for name in ("rows", "assignments"):
            if state[name].shape != getattr(self, name).shape:
                raise ValueError(f"bank {name} of shape {tuple(state[name].shape)} does not fit "
                                 f"{tuple(getattr(self, name).shape)}")
        self.ids.copy_(state["ids"])
        self.rows.copy_(state["rows"])
        self.assignments.copy_(state["assignments"])
        self.written.copy_(state["written"])
        self.next = int(state["next"])


@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, centroids: torch.Tensor, iterations: int,
                     all_reduce: AllReduce | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [K, D], assignments [N]) after `iterations` Lloyd steps on the unit sphere.

    x holds this rank's L2-normalised rows; the sums and counts of every step are summed across ranks by
    `all_reduce`, so all ranks end with the same centroids, equal to one process's on the union of the rows. A
    cluster that no row chose keeps its centroid. The assignments are against the final centroids.
    """
    c = F.normalize(centroids.double(), dim=1)
    xd = x.double()
    k = c.shape[0]
    for _ in range(iterations):
        assign = (xd @ c.t()).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, assign, xd)
        counts = torch.bincount(assign, minlength=k).to(c)
        if all_reduce is not None:
            all_reduce(sums)
            all_reduce(counts)
        moved = counts > 0
        c[moved] = F.normalize(sums[moved] / counts[moved].unsqueeze(1), dim=1)
    return c.to(centroids.dtype), (xd @ c.t()).argmax(1)


@torch.no_grad()
def equipartition(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Hard assignments [N] of this rank's N rows to K clusters, exactly floor or ceil of N / K rows each.

    Sinkhorn-Knopp (swav.sinkhorn, summed across ranks when distributed) gives the soft equipartitioned plan
    Q over every rank's rows; each rank rounds its own rows to a hard plan: in rounds, every unassigned row
    proposes to its best cluster with room left, and each cluster keeps its strongest proposals up to its
    room (ceil for the first N mod K clusters, floor for the rest). Each round assigns at least one row.
    """
    n, k = scores.shape
    q = sinkhorn64(scores, epsilon, iterations)                      # [N, K], rows sum to 1
    room = torch.full((k,), n // k, dtype=torch.int64, device=q.device)
    room[: n % k] += 1
    out = torch.full((n,), -1, dtype=torch.int64, device=q.device)
    while True:
        rows = torch.nonzero(out < 0).flatten()
        if rows.numel() == 0:
            return out
        value, choice = q[rows].masked_fill((room == 0).unsqueeze(0), -1.0).max(1)
        order = torch.argsort(value, descending=True, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]     # grouped by cluster, strongest first
        grouped = choice[order]
        first = torch.searchsorted(grouped, grouped, right=False)
        rank_in_group = torch.arange(grouped.numel(), device=q.device) - first
        take = rank_in_group < room[grouped]
        out[rows[order[take]]] = grouped[take]
        room -= torch.bincount(grouped[take], minlength=k)
