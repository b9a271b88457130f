"""Model, optimizer and DeepSpeed engine for a run, built so that ZeRO stages agree with each other.

What needs care under ZeRO-1/2 (the optimizer sees flat fp32 partitions):
LARS norms and prototype row normalisation are computed per layer tensor from
a rebuilt layout (swav.zero_layout), and the prototype freeze is a group flag
the optimizer honours (dropping ``p.grad`` does not reach the partitions).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.nn as nn

from swav.checkpoint import install_safe_loading
from swav.config import Config
from swav.models import SwAVModel
from swav.optim import build_optimizer
from swav.zero_layout import zero3_layouts, zero12_layouts
from swav_io.errors import UserError
from swav_io.trees import deep_merge

log = logging.getLogger(__name__)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The generated DeepSpeed config; `deepspeed.extra` is merged on top (the user wins)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.train.batch_size * world_size,
        # DeepSpeed's default is 1.0; SwAV's recipe does not clip, so say so explicitly.
        "gradient_clipping": cfg.deepspeed.gradient_clipping,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Fail"},
    }
    if cfg.precision == "bf16":
        # DeepSpeed's own bf16 mode casts BatchNorm; torch autocast keeps it (and our Sinkhorn) in fp32.
        # Its default also reduces every Linear's gradients in bf16, the prototypes included: only the
        # trunk's convolutions (nearly all the bytes) are reduced in bf16; head and prototypes stay fp32.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16",
                                "lower_precision_safe_modules": ["torch.nn.Conv2d"]}
    return deep_merge(ds, cfg.deepspeed.extra)


def build_model(cfg: Config, on_gpu: bool, world_size: int) -> nn.Module:
    m = cfg.model
    model = SwAVModel(m.arch, hidden_mlp=m.hidden_mlp, feat_dim=m.feat_dim, num_prototypes=m.num_prototypes)
    if m.sync_bn and on_gpu and world_size > 1:
        group = None
        if m.sync_bn_group_size and m.sync_bn_group_size < world_size:
            group = _sync_bn_group(m.sync_bn_group_size, world_size)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    elif m.sync_bn and not on_gpu and world_size > 1:
        log.warning("model.sync_bn=true does not apply on CPU (SyncBatchNorm needs CUDA): "
                    "using per-rank BatchNorm")
    model.normalize_prototypes()
    return model


def _sync_bn_group(size: int, world_size: int):
    import torch.distributed as dist

    if world_size % size:
        raise UserError(f"model.sync_bn_group_size={size} does not divide the world size {world_size}")
    rank, mine = dist.get_rank(), None
    for start in range(0, world_size, size):
        g = dist.new_group(list(range(start, start + size)))  # every rank must create every group
        if start <= rank < start + size:
            mine = g
    return mine


def build_engine(cfg: Config, model: nn.Module, world_size: int):
    """(engine, client optimizer) with ZeRO layouts installed for stages 1 and 2."""
    import deepspeed

    optimizer = build_optimizer(model, cfg)
    groups_params = [list(g["params"]) for g in optimizer.param_groups]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=deepspeed_config(cfg, world_size))
    stage = cfg.deepspeed.zero_stage
    # ZeRO hands the optimizer flat partitions: the layouts let LARS use whole-layer norms and renormalise
    # prototype rows exactly, whichever rank holds which slice of a row.
    if stage in (1, 2):
        optimizer.set_layouts(zero12_layouts(engine.optimizer, groups_params))
    elif stage == 3:
        optimizer.set_layouts(zero3_layouts(engine.optimizer, groups_params))

    install_safe_loading(engine)
    return engine, optimizer


def apply_channels_last(engine) -> tuple[int, int]:
    """Conv weights in channels_last where DeepSpeed allows it; (conv weights, how many are NHWC).

    Only after deepspeed.initialize: it broadcasts each parameter through a byte view, which an NHWC
    weight refuses ("stride(-1) must be 1"), so converting the model first crashes every stage.
    ZeRO-1/2/3 then make each weight a view of a flat buffer, which must stay aliased: those keep
    NCHW weights, and the NHWC inputs still select NHWC kernels. ZeRO-0 leaves the parameters alone,
    so their storage is converted in place (same Parameter objects, so the optimizer keeps them).
    """
    convs = [m.weight for m in engine.module.modules() if isinstance(m, nn.Conv2d)]
    if engine.zero_optimization_stage() == 0:
        for w in convs:
            w.data = w.data.contiguous(memory_format=torch.channels_last)
    nhwc = sum(1 for w in convs if w.is_contiguous(memory_format=torch.channels_last))
    return len(convs), nhwc


def set_step_hyperparams(optimizer: torch.optim.Optimizer, lr: float, freeze_prototypes: bool) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
        if g.get("name") == "prototypes":
            g["frozen"] = freeze_prototypes


@torch.no_grad()
def write_prototypes(engine, values: list[torch.Tensor]) -> None:
    """Set each head's prototype weights to `values` (the same on every rank) in every copy the engine keeps.

    ZeRO-1/2 step from an fp32 partition of each weight and copy it back over the module's weight after every
    step, and ZeRO-3 keeps only a partition in the module: writing the module's weight alone would be undone
    by the next step. DeepSpeed's `safe_set_full_fp32_param` writes the optimizer's partition (a no-op
    where there is none, as under ZeRO-0), and the module's weight is written too (gathered under ZeRO-3) so
    this step's forward already sees the new values.
    """
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    weights = engine.module.prototype_weights()
    if len(weights) != len(values):
        raise ValueError(f"{len(values)} prototype values for {len(weights)} heads")
    for w, v in zip(weights, values):
        if hasattr(w, "ds_id"):   # ZeRO-3: every rank holds the same values, so any rank may modify
            with deepspeed.zero.GatheredParameters([w], modifier_rank=0):
                w.data.copy_(v.to(w.device, w.dtype))
        else:
            w.data.copy_(v.to(w.device, w.dtype))
        safe_set_full_fp32_param(w, v.to(w.device, torch.float32))
