"""Sinkhorn-Knopp equal-partition assignment, distributed across ranks.

Computes exactly what the reference computes (Q = exp(scores/eps)^T, total 1,
then alternately rows to 1/K and columns to 1/B, B summed over ranks), but in
the log domain and in float64: subtracting the global maximum is exact, and no
finite input can underflow a whole row to zero (the reference's NaN case).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _global_logsumexp(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """log(sum(exp(x))) over `dim` (None = all) and over every rank's rows."""
    if x.numel() == 0:   # a rank with no rows (an empty memory bank) still takes part in every all-reduce
        m = x.new_full(() if dim is None else [1 if d == dim else n for d, n in enumerate(x.shape)], float("-inf"))
    else:
        m = x.amax() if dim is None else x.amax(dim=dim, keepdim=True)
    m = _all_reduce(m.clone(), dist.ReduceOp.MAX if _distributed() else None)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m)
    s = s.sum() if dim is None else s.sum(dim=dim, keepdim=True)
    return torch.log(_all_reduce(s)) + m


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Assignments [B, K] (rows sum to 1) for this rank's scores [B, K]; float32 output."""
    return sinkhorn64(scores, epsilon, iterations).to(torch.float32)


@torch.no_grad()
def sinkhorn64(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """As sinkhorn(), in float64."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, K], got {tuple(scores.shape)}")
    logq = scores.detach().to(torch.float64).t() / epsilon     # [K, B]
    k = logq.shape[0]
    b = torch.tensor(float(logq.shape[1]), dtype=torch.float64, device=logq.device)
    b = _all_reduce(b)
    logq = logq - _global_logsumexp(logq, None)                  # total mass 1
    for _ in range(iterations):
        logq = logq - _global_logsumexp(logq, 1) - torch.log(torch.tensor(float(k), dtype=torch.float64))
        logq = logq - torch.logsumexp(logq, dim=0, keepdim=True) - torch.log(b)
    q = torch.exp(logq + torch.log(b))                           # columns sum to 1
    return q.t()
