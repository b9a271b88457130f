"""Multi-crop views (SwAV): a few large crops and several small ones per image.

Randomness of every crop comes from (seed, sample key, pass), so a sample gets
the same views after a restart. The JPEG is decoded once, at the lowest
resolution the crops allow (DCT scaling through Pillow's draft mode); crops
and resizes run on uint8 tensors; the photometric part is batched (augment.py).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from shards.stream import key_hash
from swav.augment import N_PARAMS, P_FLIP, CropBatch, photometric, sample_photometric

_RATIO = (3 / 4, 4 / 3)


def crop_rng(seed: int, key: str, pass_index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed & 0xFFFFFFFF, pass_index, key_hash(key)]))


def random_resized_box(rng: np.random.Generator, width: int, height: int,
                       scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) following torchvision's RandomResizedCrop sampling."""
    area = width * height
    log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        w, h = width, int(round(width / _RATIO[0]))
    elif in_ratio > _RATIO[1]:
        h, w = height, int(round(height * _RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class MultiCrop:
    """Callable on one sample's encoded image bytes: returns its crops as float tensors [3,H,W] in config order."""

    def __init__(self, size_crops: Sequence[int] = (224, 96), num_crops: Sequence[int] = (2, 6),
                 min_scale_crops: Sequence[float] = (0.14, 0.05), max_scale_crops: Sequence[float] = (1.0, 0.14),
                 seed: int = 0):
        if not (len(size_crops) == len(num_crops) == len(min_scale_crops) == len(max_scale_crops)):
            raise ValueError("size_crops, num_crops, min_scale_crops and max_scale_crops must have equal lengths")
        self.size_crops, self.num_crops = list(size_crops), list(num_crops)
        self.scales = list(zip(min_scale_crops, max_scale_crops))
        self.seed = seed
        # (size, scale range) of every crop, in config order
        self.plan = [(s, sc) for s, n, sc in zip(self.size_crops, self.num_crops, self.scales) for _ in range(n)]

    @classmethod
    def from_config(cls, crops, seed: int) -> "MultiCrop":
        return cls(crops.size_crops, crops.num_crops, crops.min_scale_crops, crops.max_scale_crops, seed)

    @property
    def total_crops(self) -> int:
        return len(self.plan)

    def sample_params(self, key: str, pass_index: int, width: int, height: int):
        """Per-crop geometry [(top, left, h, w, flip)] and photometric params [n_crops, N_PARAMS]."""
        rng = crop_rng(self.seed, key, pass_index)
        boxes, photo = [], np.zeros((self.total_crops, N_PARAMS), np.float32)
        for i, (_, scale) in enumerate(self.plan):
            top, left, h, w = random_resized_box(rng, width, height, scale)
            boxes.append((top, left, h, w, bool(rng.random() < P_FLIP)))
            photo[i] = sample_photometric(rng)
        return boxes, photo

    def crops_u8(self, data: bytes, key: str = "", pass_index: int = 0) -> tuple[list[torch.Tensor], np.ndarray]:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        boxes, photo = self.sample_params(key, pass_index, width, height)
        # Largest power-of-two reduction that keeps every crop at or above its output size.
        room = min(min(h, w) / s for (_, _, h, w, _), (s, _) in zip(boxes, self.plan))
        factor = 1
        while factor < 8 and room >= factor * 2:
            factor *= 2
        if factor > 1 and img.format == "JPEG":
            img.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
        img = img.convert("RGB")
        sx, sy = img.size[0] / width, img.size[1] / height
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        crops = []
        for (top, left, h, w, flip), (size, _) in zip(boxes, self.plan):
            c = TF.resized_crop(t, int(top * sy), int(left * sx), max(1, round(h * sy)), max(1, round(w * sx)),
                                [size, size], antialias=True)
            crops.append(c.flip(-1) if flip else c)
        return crops, photo

    def __call__(self, data: bytes, key: str = "", pass_index: int = 0) -> list[torch.Tensor]:
        crops, photo = self.crops_u8(data, key, pass_index)
        out: list[torch.Tensor] = [None] * len(crops)  # type: ignore[list-item]
        for size in dict.fromkeys(self.size_crops):
            idx = [i for i, (s, _) in enumerate(self.plan) if s == size]
            aug = photometric(torch.stack([crops[i] for i in idx]), torch.from_numpy(photo[idx]))
            for j, i in enumerate(idx):
                out[i] = aug[j]
        return out

    def collate(self, items: list[tuple[list[torch.Tensor], np.ndarray]], keys: list[str],
                augment: bool) -> CropBatch:
        """Group a batch's crops by resolution, crop-major, optionally augmenting them here."""
        images, params = [], []
        start = 0
        for n in self.num_crops:
            imgs = torch.stack([crops[ci] for ci in range(start, start + n) for crops, _ in items])
            prm = torch.from_numpy(np.stack([p[ci] for ci in range(start, start + n) for _, p in items]))
            images.append(photometric(imgs, prm) if augment else imgs)
            params.append(prm)
            start += n
        return CropBatch(images=images, params=params, keys=keys, augmented=augment)
