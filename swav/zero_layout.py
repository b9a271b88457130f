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


def zero3_layouts(zero_optimizer, groups_params: list[list]) -> dict[int, dict[int, GroupLayout]]:
    """GroupLayouts for a DeepSpeed ZeRO-3 optimizer, per param group and per sub-group flat.

    Stage 3 gives each rank a contiguous slice (ds_tensor) of every flattened parameter, and the inner
    optimizer steps one sub-group at a time over the flat fp32 concatenation of those slices. A layout
    is keyed by that flat tensor's id, since a step sees only the one sub-group it is updating.
    """
    layouts: dict[int, dict[int, GroupLayout]] = {}
    for sg, (params, flat) in enumerate(zip(zero_optimizer.fp16_groups, zero_optimizer.fp32_partitioned_groups_flat)):
        gi = zero_optimizer.sub_group_to_group_id[sg]
        ids = {id(p): i for i, p in enumerate(groups_params[gi])}
        rank = dist.get_rank(group=zero_optimizer.sub_group_process_groups[sg])
        segs, start = [], 0
        for p in params:
            part = p.partition_numel()
            offset = rank * part
            length = max(0, min(part, p.ds_numel - offset))  # the last rank's slice may be padding only
            if length:
                segs.append(Segment(start=start, length=length, tensor=ids[id(p)], offset=offset))
            start += part
        layouts.setdefault(gi, {})[id(flat)] = GroupLayout(segments=[segs], num_tensors=len(groups_params[gi]),
                                                           distributed=True)
    return layouts
