"""Training on labelled images for evaluation: class-balanced subsets, held-out selection, and the two
protocols that train on images rather than cached features (a linear head on augmented views of a frozen
trunk, and fine-tuning the whole network on a fraction of the labels).

Honesty rules, shared by every protocol:
- the learning rate and the epoch are chosen on a held-out, class-balanced part of the train set, never on the
  validation set; the validation set is scored once, with the choice;
- the chosen values, the grid they came from and the held-out score are returned with the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from swav.augment import MEAN, STD
from swav_io.errors import UserError


def balanced_subset(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Positions of a class-balanced `fraction` of the samples: round(fraction x n_c) of each class c, at least
    one, drawn with a generator seeded by `seed`. Sorted, so the same inputs give the same list."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(int(c), []).append(i)
    chosen: list[int] = []
    for c in sorted(by_class):
        members = by_class[c]
        take = min(len(members), max(1, round(fraction * len(members))))
        chosen.extend(int(i) for i in rng.choice(members, size=take, replace=False))
    return sorted(chosen)


def holdout(positions: Sequence[int], labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit, held_out): a class-balanced `fraction` of `positions` held out for selection; every class with two
    or more members keeps at least one in each part."""
    sub_labels = [labels[i] for i in positions]
    rng = np.random.default_rng(seed + 7919)
    by_class: dict[int, list[int]] = {}
    for p, c in zip(positions, sub_labels):
        by_class.setdefault(int(c), []).append(p)
    held: list[int] = []
    for c in sorted(by_class):
        members = by_class[c]
        if len(members) < 2:
            continue
        take = min(len(members) - 1, max(1, round(fraction * len(members))))
        held.extend(int(i) for i in rng.choice(members, size=take, replace=False))
    held_set = set(held)
    return [p for p in positions if p not in held_set], sorted(held)


def subset_file(path: str, labels: Sequence[int], digests: Sequence[str], fraction: float, seed: int) -> list[int]:
    """The subset recorded at `path`, or a new one written there. A recorded subset is reused only when it was
    drawn from the same images (their digests) with the same fraction and seed, so runs stay comparable."""
    key = {"fraction": fraction, "seed": seed, "train_images": len(labels),
           "train_digest": hashlib.sha256("".join(digests).encode()).hexdigest()}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        if {k: rec.get(k) for k in key} != key:
            raise UserError(f"subset file {path} was drawn from other images or settings; remove it or give another "
                            f"--subset-file")
        return [int(i) for i in rec["positions"]]
    positions = balanced_subset(labels, fraction, seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**key, "positions": positions, "sha256": [digests[i] for i in positions]}, f, indent=1)
    return positions


def decode(data: bytes) -> torch.Tensor:
    """uint8 [3, H, W]."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def center_view(img: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view: resize the short side to size x 256/224, center crop, normalise."""
    t = v2.functional.resize(img, [int(round(size * 256 / 224))], antialias=True)
    t = v2.functional.center_crop(t, [size, size]).float().div_(255)
    return v2.functional.normalize(t, list(MEAN), list(STD))


def train_view(size: int, flip: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference's training view: random resized crop (scale 0.08-1) and a horizontal flip, normalised."""
    ops = [v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(MEAN), list(STD))]
    return v2.Compose(ops)


@dataclasses.dataclass
class Choice:
    """What held-out selection picked, and from what."""

    lr: float
    epoch: int
    heldout_top1: float
    grid: dict[str, dict[int, float]]   # lr -> {epoch: held-out top-1}

    def as_dict(self) -> dict:
        return {"lr": self.lr, "epoch": self.epoch, "heldout_top1": self.heldout_top1, "grid": self.grid}


def choose(run: Callable[[float, list[int]], dict[int, float]], lrs: Sequence[float], epochs: int) -> Choice:
    """Run `run(lr, score_at)` for each lr; it returns held-out top-1 at each epoch of `score_at`. The best
    (lr, epoch) wins; ties go to the smaller lr, then the earlier epoch."""
    score_at = sorted({max(1, round(epochs * q)) for q in (0.25, 0.5, 0.75, 1.0)})
    grid, best = {}, None
    for lr in lrs:
        scores = run(lr, score_at)
        grid[f"{lr:g}"] = scores
        for epoch in score_at:
            cand = (scores[epoch], -lr, -epoch)
            if best is None or cand > best[0]:
                best = (cand, lr, epoch)
    assert best is not None
    return Choice(lr=best[1], epoch=best[2], heldout_top1=best[0][0], grid=grid)


def topk(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
    y = y.view(-1, 1)
    return 100.0 * (pred[:, :1] == y).any(1).float().mean().item(), 100.0 * (pred == y).any(1).float().mean().item()


class ImageClassifier(nn.Module):
    """A trunk and a linear head; with `frozen`, the trunk stays in eval mode and gets no gradient."""

    def __init__(self, trunk: nn.Module, feature_dim: int, classes: int, frozen: bool,
                 standardise: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.trunk, self.frozen = trunk, frozen
        self.head = nn.Linear(feature_dim, classes)
        self.head.weight.data.normal_(0, 0.01)
        self.head.bias.data.zero_()
        mean, std = standardise if standardise is not None else (torch.zeros(feature_dim), torch.ones(feature_dim))
        self.register_buffer("mean", mean.reshape(1, -1))
        self.register_buffer("std", std.reshape(1, -1))
        if frozen:
            for p in trunk.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ImageClassifier":
        super().train(mode)
        if self.frozen:
            self.trunk.eval()   # frozen means frozen BatchNorm statistics too
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            f = F.normalize(self.trunk(x.contiguous(memory_format=torch.channels_last)).float(), dim=1)
        return self.head((f - self.mean) / self.std)


@dataclasses.dataclass
class Recipe:
    """How a protocol trains: SGD with momentum 0.9 and a cosine schedule over `epochs`."""

    epochs: int
    lr: float                 # the head's; the trunk's is lr x trunk_lr_scale when it trains
    weight_decay: float
    batch_size: int
    image_size: int
    flip: bool = True
    trunk_lr_scale: float = 0.01


def fit(model: ImageClassifier, images: Callable[[], Iterable[tuple[torch.Tensor, int]]], recipe: Recipe,
        lr: float, seed: int, score_at: Sequence[int] = (),
        score: Callable[[ImageClassifier], float] | None = None, stop_at: int | None = None) -> dict[int, float]:
    """Train `model` on augmented views of `images()` (re-streamed each epoch) with a schedule of
    recipe.epochs, stopping after `stop_at` epochs when given; returns score(model) after each epoch in
    `score_at`."""
    torch.manual_seed(seed)
    view = train_view(recipe.image_size, recipe.flip)
    groups = [{"params": list(model.head.parameters()), "lr": lr, "base": lr}]
    if not model.frozen:
        trunk_lr = lr * recipe.trunk_lr_scale
        groups.append({"params": list(model.trunk.parameters()), "lr": trunk_lr, "base": trunk_lr})
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=recipe.weight_decay)
    n = sum(1 for _ in images())
    steps_per_epoch = max(1, math.ceil(n / recipe.batch_size))
    total, step, scores = recipe.epochs * steps_per_epoch, 0, {}
    for epoch in range(1, (stop_at or recipe.epochs) + 1):
        model.train()
        for x, y in _batches(images(), view, recipe.batch_size, seed * 100_003 + epoch):
            for g in opt.param_groups:
                g["lr"] = g["base"] * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        if epoch in score_at and score is not None:
            scores[epoch] = score(model)
    return scores


@torch.no_grad()
def evaluate_model(model: ImageClassifier, images: Iterable[tuple[torch.Tensor, int]], size: int,
                   batch_size: int) -> tuple[float, float]:
    """(top-1, top-5) on the center views of `images`."""
    model.eval()
    logits, ys = [], []
    batch: list[torch.Tensor] = []
    labels: list[int] = []
    for img, y in images:
        batch.append(center_view(img, size))
        labels.append(y)
        if len(batch) == batch_size:
            logits.append(model(torch.stack(batch)))
            ys.extend(labels)
            batch, labels = [], []
    if batch:
        logits.append(model(torch.stack(batch)))
        ys.extend(labels)
    return topk(torch.cat(logits), torch.tensor(ys))


def _batches(images: Iterable[tuple[torch.Tensor, int]], view: Callable, batch_size: int,
             seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled within a buffer of 16 batches (the images are streamed), then augmented."""
    rng = np.random.default_rng(seed)
    buf: list[tuple[torch.Tensor, int]] = []

    def drain(keep: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while len(buf) > keep:
            rng.shuffle(buf)
            take, buf[:] = buf[:batch_size], buf[batch_size:]
            yield torch.stack([view(img) for img, _ in take]), torch.tensor([y for _, y in take])

    for item in images:
        buf.append(item)
        if len(buf) >= 16 * batch_size:
            yield from drain(15 * batch_size)
    yield from drain(0)
