"""LARS/SGD momentum across a change of world size under ZeRO-1/2.

DeepSpeed 0.19.8 cannot reshard a ZeRO-1/2 optimizer to another data-parallel size, and its
universal-checkpoint converter knows only Adam's states (DeepSpeed #8608). The layout makes it
simple to do ourselves: a param group's tensors sit in one flat buffer at offsets that do not
depend on the world size (only on dtype alignment), and rank i of W holds the slice
[i*P, (i+1)*P) of it, saved without the trailing padding. So the flat momentum is the
concatenation of the old partitions, and a new rank copies its slice out of the one or two old
partitions that overlap it: each rank reads O(1) files, never all of them.
"""

from __future__ import annotations

import torch


def partition_sizes(zero_optimizer) -> list[int]:
    """P per param group (every rank's slice has this length, padding included)."""
    return [int(p) for p in zero_optimizer.partition_size]


def _group_numel(zero_optimizer, gi: int) -> int:
    """Length of the flat group with the alignment padding between tensors, not the trailing one."""
    offsets = zero_optimizer.round_robin_bit16_offsets[gi]
    tensors = zero_optimizer.round_robin_bit16_groups[gi]
    return offsets[-1] + tensors[-1].numel() if tensors else 0


def old_ranks_needed(zero_optimizer, rank: int, old_sizes: list[int], old_world: int) -> list[int]:
    """The old partitions that overlap this rank's new slice, in any param group."""
    need: set[int] = set()
    for gi, new_p in enumerate(partition_sizes(zero_optimizer)):
        lo, hi = rank * new_p, min((rank + 1) * new_p, _group_numel(zero_optimizer, gi))
        if lo < hi:
            need.update(range(lo // old_sizes[gi], min(old_world - 1, (hi - 1) // old_sizes[gi]) + 1))
    return sorted(need)


def _saved_momentum(state: dict, gi: int) -> torch.Tensor | None:
    """Group gi's saved momentum: DeepSpeed writes the inner optimizer's state_dict (one flat param per
    group, numbered by group), or with elastic checkpoints a list of per-group states without padding."""
    base = state["base_optimizer_state"]
    if isinstance(base, list):
        return base[gi].get("momentum_buffer")
    return base.get("state", {}).get(gi, {}).get("momentum_buffer")


def restore_momentum(zero_optimizer, old_states: dict[int, dict], old_sizes: list[int], rank: int) -> int:
    """Copy this rank's slice of every group's momentum out of the old partitions' optimizer states
    ({old rank: DeepSpeed's optimizer_state_dict}); returns how many groups got their momentum."""
    restored = 0
    for gi, (flat, new_p) in enumerate(zip(zero_optimizer.single_partition_of_fp32_groups,
                                           partition_sizes(zero_optimizer))):
        lo, hi = rank * new_p, min((rank + 1) * new_p, _group_numel(zero_optimizer, gi))
        buf = torch.zeros_like(flat)
        complete = hi > lo
        for i, state in sorted(old_states.items()):
            start = i * old_sizes[gi]
            saved = _saved_momentum(state, gi)
            s, e = max(lo, start), min(hi, start + (0 if saved is None else saved.numel()))
            if s >= e:
                if saved is None and start < hi and start + old_sizes[gi] > lo:
                    complete = False   # a group that never stepped (e.g. frozen) has no momentum yet
                continue
            buf[s - lo:e - lo] = saved[s - start:e - start].to(buf.dtype)
        if complete:
            zero_optimizer.optimizer.state[flat]["momentum_buffer"] = buf
            restored += 1
    return restored
