"""Which slices of which layer tensors each ZeRO-1/2 flat partition holds.

DeepSpeed's stage 1/2 optimizer concatenates a param group's tensors (with
alignment padding) into one flat buffer, splits it evenly over data-parallel
ranks, and hands the inner optimizer only this rank's fp32 slice. We rebuild
that map once, after the engine is created, so LARS and prototype
normalisation can work per layer tensor (see swav.optim).
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from swav.optim import GroupLayout, Segment

log = logging.getLogger(__name__)


def zero12_layouts(zero_optimizer, groups_params: list[list]) -> dict[int, GroupLayout]:
    """GroupLayouts for a DeepSpeedZeroOptimizer (stage 1 or 2) whose groups came from groups_params."""
    layouts = {}
    for gi, params in enumerate(groups_params):
        ids = {id(p): i for i, p in enumerate(params)}
        tensors = zero_optimizer.round_robin_bit16_groups[gi]
        offsets = zero_optimizer.round_robin_bit16_offsets[gi]
        group = zero_optimizer.real_dp_process_group[gi]
        rank = dist.get_rank(group=group)
        size = zero_optimizer.partition_size[gi]
        lo, hi = rank * size, (rank + 1) * size
        segs = []
        for t, off in zip(tensors, offsets):
            start, end = max(off, lo), min(off + t.numel(), hi)
            if start < end:
                segs.append(Segment(start=start - lo, length=end - start, tensor=ids[id(t)], offset=start - off))
        layouts[gi] = GroupLayout(segments=[segs], num_tensors=len(params), distributed=True)
    return layouts
