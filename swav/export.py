"""`swav export`: weights out of a checkpoint as a plain state_dict other code can load.

torchvision format: the trunk with torchvision ResNet keys (a resnet50 loads
strictly into ``torchvision.models.resnet50`` apart from ``fc``).
swav format: the reference release's keys, ``module.``-prefixed as its
DataParallel checkpoints are, optionally with projection head and prototypes.
"""

from __future__ import annotations

import io

import torch

from swav.weights import load_model_state, trunk_state
from swav_io.errors import UserError
from swav_io.storage import get_fs, write_bytes


def exported_state(model_state: dict[str, torch.Tensor], fmt: str, include_head: bool = False) -> dict:
    trunk = trunk_state(model_state)
    if fmt == "torchvision":
        if include_head:
            raise UserError("--include-head needs --format swav (torchvision's ResNet has no SwAV head)")
        return trunk
    if fmt != "swav":
        raise UserError(f"unknown export format {fmt!r}: torchvision or swav")
    out = {f"module.{k}": v for k, v in trunk.items()}
    if include_head:
        for k, v in model_state.items():
            if k.startswith(("projection_head.", "prototypes.")):
                out[f"module.{k}"] = v
    return out


def export_checkpoint(checkpoint: str, out: str, fmt: str = "torchvision", include_head: bool = False,
                      storage_options: dict | None = None) -> str:
    state, _, _ = load_model_state(checkpoint, storage_options)
    tensors = {k: v.contiguous() for k, v in exported_state(state, fmt, include_head).items()}
    buf = io.BytesIO()
    torch.save(tensors, buf)
    fs, path = get_fs(out, storage_options)
    write_bytes(fs, path, buf.getvalue())
    return out
