"""Model weights out of a checkpoint URL, whatever ZeRO stage wrote it, without trusting pickles."""

from __future__ import annotations

import logging
import os
import tempfile

import torch
import yaml

from swav import checkpoint as ckpt
from swav.config import Config, load_config
from swav_io.errors import UserError
from swav_io.storage import join, read_bytes

log = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"


def checkpoint_config(ref: ckpt.CheckpointRef, options: dict | None) -> Config:
    store = ckpt.CheckpointStore(ref.root, options)

    raw = read_bytes(store.fs, join(store.root, ref.tag, ckpt.CONFIG)).decode("utf-8")
    return load_config(None, base=yaml.safe_load(raw))


def load_model_state(url: str, options: dict | None = None) -> tuple[dict[str, torch.Tensor], Config, ckpt.CheckpointRef]:
    """(full model state_dict, the run's config, checkpoint) from a run's checkpoint root or one step's folder."""
    ref = ckpt.resolve(url, options)
    cfg = checkpoint_config(ref, options)
    store = ckpt.CheckpointStore(ref.root, options)
    with tempfile.TemporaryDirectory(prefix="swav-weights-") as tmp:
        rank0 = f"{ckpt.rank_dir(0)}/ds/{MODEL_STATES}"
        module = {}
        if ref.manifest.get("zero_stage", 0) != 3 and rank0 in ref.manifest["files"]:
            store.download(ref, tmp, [rank0])
            module = ckpt.safe_load(ckpt.local_path(tmp, rank0)).get("module") or {}
        if not module:  # ZeRO-3: only partitions were saved
            module = _consolidate_zero3(store, ref, tmp)
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}, cfg, ref


def _consolidate_zero3(store: ckpt.CheckpointStore, ref: ckpt.CheckpointRef, tmp: str) -> dict:
    """ZeRO-3 keeps only partitions: gather every rank's files and let DeepSpeed reassemble them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    names = [n for n in ref.manifest["files"] if n.startswith("rank") and "/ds/" in n]
    store.download(ref, tmp, names)
    merged = os.path.join(tmp, "merged", "ds")
    os.makedirs(merged, exist_ok=True)
    for n in names:
        os.replace(ckpt.local_path(tmp, n), ckpt.local_path(merged, n.split("/ds/", 1)[1]))
    for n in os.listdir(merged):  # vet every file before DeepSpeed's own loader opens it
        ckpt.safe_load(os.path.join(merged, n))
    return get_fp32_state_dict_from_zero_checkpoint(os.path.join(tmp, "merged"), tag="ds")


def trunk_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trunk's own keys (torchvision ResNet names), from a SwAVModel state_dict."""
    out = {k[len("trunk."):]: v for k, v in model_state.items() if k.startswith("trunk.")}
    if not out:
        raise UserError("the checkpoint holds no trunk weights")
    return out
