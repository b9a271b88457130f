"""`swav eval knn|linear`: how good are the frozen trunk features on labelled images?

kNN follows the usual SSL protocol (cosine similarity, k nearest training
features vote with weight exp(sim / T), T = 0.07); the linear probe trains one
Linear layer on cached features with SGD + momentum and a cosine schedule.
Labelled images are streamed (swav/labelled.py) in batches through the trunk on the chosen device;
only the features are kept, so 100,000 training images cost their features, never their pixels.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from swav import checkpoint as ckpt
from swav.augment import MEAN, STD
from swav.eval_images import image_protocol
from swav.labelled import iter_labelled
from swav.models import build_trunk
from swav.supervised import Recipe, choose, holdout, topk
from swav.weights import checkpoint_config, load_model_state, trunk_state
from swav_io.cliflags import storage_options
from swav_io.errors import UserError

log = logging.getLogger(__name__)

def _preprocess(data: bytes, size: int) -> torch.Tensor:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    t = TF.resize(t, [int(round(size * 256 / 224))], antialias=True)
    t = TF.center_crop(t, [size, size]).float().div_(255)
    return TF.normalize(t, list(MEAN), list(STD))


@torch.no_grad()
def extract(trunk: nn.Module, pairs: Iterable[tuple[bytes, str]], size: int, batch_size: int,
            device: str = "cpu", progress: bool = False, what: str = "") -> tuple[torch.Tensor, list[str]]:
    """L2-normalised trunk features [N, D] (in eval mode, on `device`) and the class of each, streamed."""
    from tqdm import tqdm

    # NHWC: 1.2-1.4x the images/s of NCHW for the demo's thin trunk on an idle CPU core, 1.9x with the other
    # core busy (bench/eval_rate.py), and what cuDNN prefers on GPU; the features agree to float rounding.
    trunk.eval().to(device, memory_format=torch.channels_last)
    feats, labels, batch = [], [], []

    def flush() -> None:
        x = torch.stack(batch).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        feats.append(F.normalize(trunk(x).float(), dim=1))
        batch.clear()

    for data, label in tqdm(pairs, desc=f"features {what}".strip(), unit="img", disable=not progress):
        batch.append(_preprocess(data, size))
        labels.append(label)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not feats:
        raise UserError(f"no labelled images in {what or 'the input'}")
    return torch.cat(feats), labels


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                 k: int, temperature: float = 0.07, num_classes: int | None = None) -> tuple[float, float]:
    """(top-1, top-5) in percent of a similarity-weighted kNN vote."""
    c = num_classes or int(max(train_y.max(), val_y.max())) + 1
    k = min(k, train_f.shape[0])
    train_y = train_y.to(train_f.device)
    val_y = val_y.to(val_f.device)
    top1 = top5 = 0
    for i in range(0, val_f.shape[0], 256):
        sim = val_f[i:i + 256] @ train_f.t()
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], c, device=sim.device).scatter_add_(1, train_y[idx], (w / temperature).exp())
        pred = votes.topk(min(5, c), dim=1).indices
        y = val_y[i:i + 256].view(-1, 1)
        top1 += (pred[:, :1] == y).any(1).sum().item()
        top5 += (pred == y).any(1).sum().item()
    n = val_f.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n


def _fit_head(train_f: torch.Tensor, train_y: torch.Tensor, classes: int, epochs: int, lr: float,
              weight_decay: float, batch_size: int, seed: int, stop_at: int | None = None,
              on_epoch: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """A linear layer trained on (standardised) features: SGD momentum 0.9, cosine lr over `epochs`, stopped
    after `stop_at` epochs when given (the schedule keeps its length, so a stop is a point on one trajectory)."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(train_f.shape[1], classes)
    head.weight.data.normal_(0, 0.01, generator=g)
    head.bias.data.zero_()
    head.to(train_f.device)
    train_y = train_y.to(train_f.device)
    scaled_lr = lr * batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=scaled_lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(train_f.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for epoch in range(1, (stop_at or epochs) + 1):
        perm = torch.randperm(train_f.shape[0], generator=g)
        for i in range(0, train_f.shape[0], batch_size):
            for group in opt.param_groups:
                group["lr"] = scaled_lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, head)
    return head


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                 epochs: int = 100, lr: float = 0.3, weight_decay: float = 1e-6, batch_size: int = 256,
                 seed: int = 0) -> tuple[float, float, dict]:
    """(top-1, top-5, choice) of a linear classifier on frozen features.

    The lr (lr/3, lr, 3 lr) and the epoch (a quarter, half, three quarters or all of `epochs`) are chosen on a
    class-balanced tenth of the train features held out from fitting; then the head is fitted on all of them
    with that choice and scored once on val.
    """
    c = int(max(train_y.max(), val_y.max())) + 1
    # Standardise each feature with the training statistics (the reference puts a BatchNorm without
    # affine in front of its linear layer): raw trunk features differ in scale by orders of magnitude.
    mean, std = train_f.mean(0, keepdim=True), train_f.std(0, keepdim=True).clamp_min(1e-6)
    train_f, val_f = (train_f - mean) / std, (val_f - mean) / std
    fit_idx, held_idx = holdout(list(range(train_f.shape[0])), train_y.tolist(), 0.1, seed)
    fit_i, held_i = torch.tensor(fit_idx), torch.tensor(held_idx)

    def run(lr_: float, score_at: list[int]) -> dict[int, float]:
        scores: dict[int, float] = {}

        def on_epoch(epoch: int, head: nn.Module) -> None:
            if epoch in score_at:
                with torch.no_grad():
                    scores[epoch] = topk(head(train_f[held_i]), train_y[held_i])[0]
        _fit_head(train_f[fit_i], train_y[fit_i], c, epochs, lr_, weight_decay, batch_size, seed, on_epoch=on_epoch)
        return scores

    choice = choose(run, [lr / 3, lr, lr * 3], epochs) if held_idx else None
    head = _fit_head(train_f, train_y, c, epochs, choice.lr if choice else lr, weight_decay, batch_size, seed,
                     stop_at=choice.epoch if choice else None)
    with torch.no_grad():
        t1, t5 = topk(head(val_f), val_y.to(val_f.device))
    return t1, t5, choice.as_dict() if choice else {"lr": lr, "epoch": epochs, "note": "too few images to hold out"}


def load_trunk(checkpoint: str, arch: str, random_init: bool, seed: int,
               options: dict | None = None) -> tuple[nn.Module, str]:
    """(trunk, description): from a checkpoint, or freshly initialised with the same architecture."""
    if random_init or not checkpoint:
        if not arch and checkpoint:
            arch = checkpoint_config(ckpt.resolve(checkpoint, options), options).model.arch
        if not arch:
            raise UserError("give --checkpoint, or --random-init with --arch")
        torch.manual_seed(seed)
        return build_trunk(arch), f"random init {arch} (seed {seed})"

    state, cfg, ref = load_model_state(checkpoint, options)
    trunk = build_trunk(arch or cfg.model.arch)
    trunk.load_state_dict(trunk_state(state))
    return trunk, f"{cfg.model.arch} from {ref.url}"


def evaluate(kind: str, train: str, val: str, checkpoint: str = "", arch: str = "", random_init: bool = False,
             image_size: int = 224, batch_size: int = 64, seed: int = 0, options: dict | None = None,
             epochs: int = 100, lr: float = 0.3, weight_decay: float = 1e-6, device: str = "cpu",
             label: str = "folder", progress: bool = False, augment: bool = False, fraction: float = 1.0,
             subset_file: str = "", trunk_lr_scale: float = 0.1, flip: bool = True, init_seed: int | None = None) -> dict:
    """One protocol's result: knn (k=20, 200), linear (frozen features, or augmented views with `augment`),
    finetune (the whole network on a class-balanced `fraction` of the train labels). Top-1 and top-5 in %.
    `init_seed` seeds a random init apart from the protocol's own draws (`seed`: subsets, held-out part, order)."""
    torch.manual_seed(seed)
    try:
        device = str(torch.device(device))
    except RuntimeError as e:
        raise UserError(f"--device {device!r}: {e}") from None
    trunk, what = load_trunk(checkpoint, arch, random_init, seed if init_seed is None else init_seed, options)
    if init_seed is not None:
        torch.manual_seed(seed)   # the protocol's draws as for a checkpoint, whatever the init consumed
    if kind == "finetune" or augment:
        recipe = Recipe(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, image_size=image_size,
                        flip=flip, trunk_lr_scale=trunk_lr_scale)
        res = image_protocol(trunk, train, val, label, options, recipe, seed, fraction, kind == "finetune",
                             subset_file)
        return {"kind": kind, "model": what, "train": train, "val": val, "device": "cpu", "label": label,
                "image_size": image_size, **res}
    train_f, train_c = extract(trunk, iter_labelled(train, label, options), image_size, batch_size, device,
                               progress, "train")
    val_f, val_c = extract(trunk, iter_labelled(val, label, options), image_size, batch_size, device, progress, "val")
    classes = sorted(set(train_c))
    unseen = sorted(set(val_c) - set(classes))
    if unseen:
        raise UserError(f"val has classes that train lacks: {', '.join(unseen[:5])}{' ...' if len(unseen) > 5 else ''}")
    lookup = {c: i for i, c in enumerate(classes)}
    train_y = torch.tensor([lookup[c] for c in train_c], dtype=torch.int64)
    val_y = torch.tensor([lookup[c] for c in val_c], dtype=torch.int64)
    out = {"kind": kind, "model": what, "train": train, "val": val, "train_images": len(train_c),
           "val_images": len(val_c), "classes": len(classes), "feature_dim": int(train_f.shape[1]),
           "device": device, "label": label, "image_size": image_size}
    if kind == "knn":
        for k in (20, 200):
            t1, t5 = knn_accuracy(train_f, train_y, val_f, val_y, k, num_classes=len(classes))
            out[f"knn{k}_top1"], out[f"knn{k}_top5"] = t1, t5
    else:
        t1, t5, choice = linear_probe(train_f, train_y, val_f, val_y, epochs, lr, weight_decay, seed=seed)
        out["linear_top1"], out["linear_top5"] = t1, t5
        out["protocol"] = {"name": "linear", "augment": False, "selection": "held-out tenth of train",
                           "epochs": epochs, "choice": choice}
    return out


def run_eval_cli(args: argparse.Namespace) -> int:
    extra = {}
    if args.eval_kind in ("linear", "finetune"):
        extra = {"epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
                 "augment": args.eval_kind == "finetune" or args.augment, "flip": not args.no_flip}
    if args.eval_kind == "finetune":
        extra.update(fraction=args.fraction, subset_file=args.subset_file, trunk_lr_scale=args.trunk_lr_scale)
    res = evaluate(args.eval_kind, args.train, args.val, args.checkpoint, args.arch, args.random_init,
                   args.image_size, args.batch_size, args.seed, storage_options(args), device=args.device,
                   label=args.label, progress=not args.no_progress, **extra)
    print(f"{res['model']}: {res['train_images']} train / {res['val_images']} val images, {res['classes']} classes")
    for k, v in res.items():
        if k.endswith(("top1", "top5")):
            print(f"  {k:<14}{v:6.2f}%")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.out}")
    return 0
