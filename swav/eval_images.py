"""Protocols that train on images: a linear head on augmented views of the frozen trunk (`swav eval linear
--augment`, as the reference trains its linear classifier), and fine-tuning the whole network on a class-balanced
fraction of the train labels (`swav eval finetune --fraction F`: the semi-supervised protocol; F = 1.0 is full
fine-tuning). Only the labels a protocol is allowed are used, selection included: the lr and the epoch are chosen
on a held-out tenth of those, and the validation set is scored once."""

from __future__ import annotations

import copy
import hashlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

from swav.labelled import iter_labelled
from swav.supervised import ImageClassifier, Recipe, center_view, choose, decode, evaluate_model, fit, holdout, subset_file
from swav_io.errors import UserError


def _inventory(where: str, label: str, options: dict | None) -> tuple[list[str], list[str]]:
    """(class name, sha256) of every labelled image, in the stream's fixed order; nothing decoded."""
    names, digests = [], []
    for data, c in iter_labelled(where, label, options):
        names.append(c)
        digests.append(hashlib.sha256(data).hexdigest())
    if not names:
        raise UserError(f"no labelled images in {where}")
    return names, digests


def _images(where: str, label: str, options: dict | None, lookup: dict[str, int],
            keep: set[int] | None = None) -> Callable[[], Iterator[tuple[torch.Tensor, int]]]:
    def stream() -> Iterator[tuple[torch.Tensor, int]]:
        for i, (data, c) in enumerate(iter_labelled(where, label, options)):
            if keep is None or i in keep:
                yield decode(data), lookup[c]
    return stream


@torch.no_grad()
def _feature_stats(trunk: nn.Module, images: Callable, size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the frozen trunk's normalised features over the center views (the probe's standardiser)."""
    trunk.eval()
    feats, batch = [], []
    for img, _ in images():
        batch.append(center_view(img, size))
        if len(batch) == batch_size:
            feats.append(torch.nn.functional.normalize(trunk(torch.stack(batch)).float(), dim=1))
            batch = []
    if batch:
        feats.append(torch.nn.functional.normalize(trunk(torch.stack(batch)).float(), dim=1))
    f = torch.cat(feats)
    return f.mean(0), f.std(0).clamp_min(1e-6)


def image_protocol(trunk: nn.Module, train: str, val: str, label: str, options: dict | None, recipe: Recipe,
                   seed: int, fraction: float = 1.0, finetune: bool = False, subset_path: str = "") -> dict:
    """Result fields for `linear --augment` (finetune=False) or `finetune --fraction F`."""
    names, digests = _inventory(train, label, options)
    classes = sorted(set(names))
    lookup = {c: i for i, c in enumerate(classes)}
    labels = [lookup[c] for c in names]
    if finetune:
        path = subset_path or f"subset-{fraction:g}-seed{seed}.json"
        positions = subset_file(path, labels, digests, fraction, seed)
    else:
        positions, path = list(range(len(labels))), ""
    fit_pos, held_pos = holdout(positions, labels, 0.1, seed)
    if not held_pos:
        raise UserError(f"{len(positions)} labelled image(s) leave none to hold out for selection; raise --fraction")
    feature_dim = _feature_dim(trunk, recipe.image_size)
    initial = copy.deepcopy(trunk.state_dict())

    def fresh(standardise_on: list[int]) -> ImageClassifier:
        t = copy.deepcopy(trunk)
        t.load_state_dict(initial)
        stats = None if finetune else _feature_stats(t, _images(train, label, options, lookup, set(standardise_on)),
                                                      recipe.image_size, recipe.batch_size)
        torch.manual_seed(seed)
        return ImageClassifier(t, feature_dim, len(classes), frozen=not finetune, standardise=stats)

    held = _images(train, label, options, lookup, set(held_pos))

    def run(lr: float, score_at: list[int]) -> dict[int, float]:
        model = fresh(fit_pos)
        return fit(model, _images(train, label, options, lookup, set(fit_pos)), recipe, lr, seed, score_at,
                   lambda m: evaluate_model(m, held(), recipe.image_size, recipe.batch_size)[0])

    choice = choose(run, [recipe.lr / 3, recipe.lr, recipe.lr * 3], recipe.epochs)
    model = fresh(positions)
    fit(model, _images(train, label, options, lookup, set(positions)), recipe, choice.lr, seed, stop_at=choice.epoch)
    val_images = _images(val, label, options, {**lookup})
    val_names = [c for _, c in iter_labelled(val, label, options)]
    unseen = sorted(set(val_names) - set(classes))
    if unseen:
        raise UserError(f"val has classes that train lacks: {', '.join(unseen[:5])}")
    t1, t5 = evaluate_model(model, val_images(), recipe.image_size, recipe.batch_size)
    name = "finetune" if finetune else "linear"
    return {f"{name}_top1": t1, f"{name}_top5": t5, "classes": len(classes), "train_images": len(labels),
            "val_images": len(val_names), "labelled_images": len(positions),
            "protocol": {"name": name, "augment": True, "fraction": fraction if finetune else 1.0,
                         "subset_file": path, "selection": "held-out tenth of the labelled train images",
                         "epochs": recipe.epochs, "batch_size": recipe.batch_size,
                         "weight_decay": recipe.weight_decay,
                         "trunk_lr_scale": recipe.trunk_lr_scale if finetune else 0.0, "flip": recipe.flip,
                         "choice": choice.as_dict()}}


@torch.no_grad()
def _feature_dim(trunk: nn.Module, size: int) -> int:
    was = trunk.training
    trunk.eval()
    d = int(trunk(torch.zeros(2, 3, size, size)).shape[1])
    trunk.train(was)
    return d
