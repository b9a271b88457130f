"""SwAV's swapped prediction loss."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from swav.sinkhorn import sinkhorn64


def swav_loss(scores: torch.Tensor, batch_size: int, crops_for_assign: Sequence[int] = (0, 1),
              temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3,
              queue_scores: Sequence[torch.Tensor] | None = None, return_assignments: bool = False):
    """Scores [num_crops*B, K] ordered crop by crop; returns the scalar loss (fp32, computed in fp64).

    For each assignment crop: q = Sinkhorn(its scores, with queue rows prepended
    when given, keeping the batch rows); then the cross-entropy between q and
    softmax(scores_v / T) averaged over every other crop v; averaged over
    assignment crops.
    """
    scores = scores.double()
    num_crops = scores.shape[0] // batch_size
    total = scores.new_zeros(())
    qs = []
    for i, crop_id in enumerate(crops_for_assign):
        with torch.no_grad():
            out = scores[batch_size * crop_id: batch_size * (crop_id + 1)].detach()
            if queue_scores is not None and queue_scores[i] is not None:
                out = torch.cat((queue_scores[i].double(), out))
            q = sinkhorn64(out, epsilon, sinkhorn_iterations)[-batch_size:]
            qs.append(q)
        sub = scores.new_zeros(())
        for v in range(num_crops):
            if v == crop_id:
                continue
            x = scores[batch_size * v: batch_size * (v + 1)] / temperature
            sub = sub - torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        total = total + sub / (num_crops - 1)
    loss = total / len(crops_for_assign)
    loss = loss.float()
    return (loss, [q.float() for q in qs]) if return_assignments else loss
