"""LARS (the reference's LARC semantics over SGD momentum), AdamW, and the tensor layout that
keeps both correct when ZeRO hands the optimizer flat partitions instead of layer tensors.

A param group may carry a *layout*: for each flat tensor the optimizer sees, the
segments (start, length, tensor id, offset inside that tensor) it holds. Norms
are then summed per tensor over segments and over ranks, so LARS adapts with
true per-layer norms and prototype rows are normalised in the copy the
optimizer updates. Without a layout every parameter is its own tensor.

Group flags: ``lars_adapt`` (False: plain SGD step), ``frozen`` (skip entirely:
no update, no momentum, no decay), ``normalize_rows`` (row length of a matrix
whose rows are L2-normalised after each step; 0 = off).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist


@dataclass
class Segment:
    start: int        # offset in the flat tensor
    length: int
    tensor: int       # id of the original tensor within its group
    offset: int       # offset inside the original tensor (flattened)


@dataclass
class GroupLayout:
    """Segments for each flat tensor of one param group, and how to sum across ranks."""

    segments: list[list[Segment]]
    num_tensors: int
    distributed: bool = False
    _row_index: dict = field(default_factory=dict)

    def tensor_sq_norms(self, flats: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(self.num_tensors, dtype=torch.float64, device=flats[0].device)
        for flat, segs in zip(flats, self.segments):
            if not segs:
                continue
            views = _views(flat, segs)
            norms = torch.stack(torch._foreach_norm(views)).double() ** 2
            out.index_add_(0, torch.tensor([s.tensor for s in segs], device=out.device), norms)
        if self.distributed and dist.is_initialized():
            dist.all_reduce(out)
        return out


def _views(flat: torch.Tensor, segs: list[Segment]) -> list[torch.Tensor]:
    if len(segs) == 1 and segs[0].start == 0 and segs[0].length == flat.numel():
        return [flat]  # a whole tensor (any memory format, e.g. channels_last)
    return [flat.view(-1).narrow(0, s.start, s.length) for s in segs]


class _GroupAware:
    """Shared by our optimizers: layouts, freezing, and row normalisation after each step."""

    # Keyed by group name, not position: DeepSpeed's ZeRO-1/2 steps one group at a time by
    # temporarily making param_groups a one-element list, and load_state_dict replaces the dicts.
    layouts: dict[str, GroupLayout]

    def set_layouts(self, layouts: dict[int, GroupLayout | dict[int, GroupLayout]]) -> None:
        """Layouts by group position at construction time (ZeRO-3: a dict by id of each sub-group flat)."""
        self.layouts = {self.param_groups[gi]["name"]: layout for gi, layout in layouts.items()}

    def _name_groups(self) -> None:
        seen: set[str] = set()
        for i, g in enumerate(self.param_groups):
            name = g.get("name") or f"group{i}"
            if name in seen:
                name = f"{name}{i}"
            g["name"] = name
            seen.add(name)

    def _layout_of(self, group: dict) -> GroupLayout | None:
        layout = getattr(self, "layouts", {}).get(group.get("name"))
        if isinstance(layout, dict):  # ZeRO-3 steps one sub-group flat at a time
            return layout.get(id(group["params"][0])) if group["params"] else None
        return layout

    def _layout(self, gi: int) -> GroupLayout:
        layout = self._layout_of(self.param_groups[gi])
        if layout is None:
            params = self.param_groups[gi]["params"]
            layout = GroupLayout([[Segment(0, p.numel(), i, 0)] for i, p in enumerate(params)], len(params))
        return layout

    @torch.no_grad()
    def normalize_rows(self) -> None:
        for group in self.param_groups:
            d = group.get("normalize_rows", 0)
            if not d or group.get("frozen"):
                continue  # a frozen group must not move at all, not even by rounding
            layout = self._layout_of(group)
            if layout is None:
                for p in group["params"]:
                    if p.numel() % d:
                        raise RuntimeError(f"{group['name']}: a flat of {p.numel()} values is not whole rows of "
                                           f"{d} and has no ZeRO layout to renormalise it by")
                    # Same arithmetic as the partitioned path (fp64 sums, one multiply), so ZeRO stages agree.
                    rows = p.view(-1, d)
                    inv = 1.0 / (rows.double() ** 2).sum(1).sqrt().clamp_min(1e-12)
                    rows.mul_(inv.to(p.dtype).unsqueeze(1))
                continue
            self._normalize_rows_partitioned(group, layout, d)

    def _normalize_rows_partitioned(self, group: dict, layout: GroupLayout, d: int) -> None:
        # Rows may straddle partitions: sum squares per (tensor, row) over segments and ranks.
        flats = group["params"]
        rows_per_tensor = layout._row_index.get("rows")
        if rows_per_tensor is None:
            rows_per_tensor = layout._row_index["rows"] = group["rows_per_tensor"]
        base = [0]
        for r in rows_per_tensor:
            base.append(base[-1] + r)
        total = torch.zeros(base[-1], dtype=torch.float64, device=flats[0].device)
        cached = []
        for fi, (flat, segs) in enumerate(zip(flats, layout.segments)):
            for s in segs:
                idx = layout._row_index.get((fi, s.start))
                if idx is None:
                    idx = (torch.arange(s.offset, s.offset + s.length, device=flat.device) // d) + base[s.tensor]
                    layout._row_index[(fi, s.start)] = idx
                v = flat.view(-1).narrow(0, s.start, s.length)
                total.index_add_(0, idx, v.double() ** 2)
                cached.append((v, idx))
        if layout.distributed and dist.is_initialized():
            dist.all_reduce(total)
        inv = 1.0 / total.sqrt().clamp_min(1e-12)
        for v, idx in cached:
            v.mul_(inv[idx].to(v.dtype))


class LARS(torch.optim.Optimizer, _GroupAware):
    """LARS with the reference LARC semantics, then SGD with momentum.

    Per tensor: adaptive_lr = trust * ||w|| / (||g|| + wd * ||w|| + eps) (with
    clip: min(adaptive_lr / lr, 1)); g <- (g + wd * w) * adaptive_lr when both
    norms are non-zero; then buf <- momentum * buf + g; w <- w - lr * buf.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coefficient: float = 0.001, clip: bool = False, eps: float = 1e-8,
                 exclude_bias_and_bn: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        clip=clip, eps=eps, lars_adapt=True, frozen=False, normalize_rows=0)
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        if exclude_bias_and_bn:
            split = []
            for g in groups:
                ps = list(g["params"])
                big = [p for p in ps if p.ndim > 1]
                small = [p for p in ps if p.ndim <= 1]
                if big:
                    split.append({**g, "params": big})
                if small:
                    split.append({**g, "params": small, "lars_adapt": False, "weight_decay": 0.0})
            groups = split
        super().__init__(groups, defaults)
        self._name_groups()
        self.layouts = {}

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        for gi, group in enumerate(self.param_groups):
            if group.get("frozen"):
                continue
            params = list(group["params"])
            if all(p.grad is None for p in params):  # also: an empty ZeRO-3 partition
                continue
            wd, lr = group["weight_decay"], group["lr"]
            if group.get("lars_adapt", True):
                grads = self._adapted_grads(gi, group, params, wd, lr)
            else:
                grads = [None if p.grad is None else p.grad.add(p, alpha=wd) if wd else p.grad for p in params]
            for p, g in zip(params, grads):
                if g is None:
                    continue
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.detach().clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-lr)
        self.normalize_rows()
        return loss

    def _adapted_grads(self, gi: int, group: dict, params: list[torch.Tensor], wd: float,
                       lr: float) -> list[torch.Tensor | None]:
        """(g + wd*w) * adaptive_lr per layer tensor, as new tensors.

        p.grad is never modified: under DeepSpeed the gradient buffers are the
        engine's, and an in-place change would leak into its later steps.
        """
        layout = self._layout(gi)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        w_norm = layout.tensor_sq_norms([p.detach() for p in params]).sqrt()
        g_norm = layout.tensor_sq_norms(grads).sqrt()
        trust, eps = group["trust_coefficient"], group["eps"]
        active = (w_norm != 0) & (g_norm != 0)
        adaptive = trust * w_norm / (g_norm + w_norm * wd + eps)
        if group["clip"]:
            adaptive = torch.clamp(adaptive / lr, max=1.0)
        # Per-tensor factors stay on the device: reading them into Python would sync with it every step.
        # An inactive tensor gets decay 0 and scale 1, which leave its gradient exactly as it is.
        scale = torch.where(active, adaptive, torch.ones_like(adaptive)).to(params[0].dtype)
        decay = torch.where(active, torch.full_like(adaptive, wd), torch.zeros_like(adaptive)).to(params[0].dtype)
        out: list[torch.Tensor | None] = []
        for p, segs in zip(params, layout.segments):
            if p.grad is None:
                out.append(None)
                continue
            eff = p.grad.detach().clone()
            for g, w, s in zip(_views(eff, segs), _views(p.detach(), segs), segs):
                g.addcmul_(w, decay[s.tensor]).mul_(scale[s.tensor])
            out.append(eff)
        return out


class AdamW(torch.optim.AdamW, _GroupAware):
    """torch AdamW that honours ``frozen`` groups and row normalisation."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        for g in self.param_groups:
            g.setdefault("frozen", False)
            g.setdefault("normalize_rows", 0)
            g.setdefault("lars_adapt", False)
        self._name_groups()
        self.layouts = {}

    @torch.no_grad()
    def step(self, closure=None):
        stash = {}
        for g in self.param_groups:
            if g.get("frozen"):
                for p in g["params"]:
                    stash[p] = p.grad
                    p.grad = None
        loss = super().step(closure)
        for p, grad in stash.items():
            p.grad = grad
        self.normalize_rows()
        return loss


def param_groups(model: torch.nn.Module, exclude_bias_and_bn: bool = False) -> list[dict]:
    """Groups: trunk+head (optionally biases/BN apart), and the prototypes alone (freezable, row-normalised)."""
    proto_ids = {id(w) for w in model.prototype_weights()}
    protos = [p for p in model.parameters() if id(p) in proto_ids]
    rest = [p for p in model.parameters() if id(p) not in proto_ids]
    groups = []
    if exclude_bias_and_bn:
        groups.append({"params": [p for p in rest if p.ndim > 1], "name": "weights"})
        groups.append({"params": [p for p in rest if p.ndim <= 1], "name": "bias_bn", "lars_adapt": False,
                       "weight_decay": 0.0})
    else:
        groups.append({"params": rest, "name": "weights"})
    groups.append({"params": protos, "name": "prototypes", "normalize_rows": protos[0].shape[1],
                   "rows_per_tensor": [p.shape[0] for p in protos]})
    return groups


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.exclude_bias_and_bn)
    if o.name in ("lars", "sgd"):
        opt = LARS(groups, lr=o.base_lr, momentum=o.momentum, weight_decay=o.weight_decay,
                   trust_coefficient=o.trust_coefficient, clip=o.clip)
        if o.name == "sgd":
            for g in opt.param_groups:
                g["lars_adapt"] = False
        return opt
    return AdamW(groups, lr=o.base_lr, weight_decay=o.weight_decay)
