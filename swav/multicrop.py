"""Multi-crop views (SwAV): a few large crops and several small ones per image.

Randomness of every crop comes from (seed, sample key, pass), so a sample gets
the same views after a restart. The JPEG is decoded once, at the lowest
resolution the crops allow (DCT scaling through Pillow's draft mode); crops
and resizes run on uint8 tensors; the photometric part is batched (augment.py).
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from shards.stream import key_hash
from swav.augment import P_FLIP, CropBatch, photometric, sample_photometric

_RATIO = (3 / 4, 4 / 3)
# torchvision 0.29 deprecates its image decoders (in favour of TorchCodec) and warns on every call;
# the pinned version has them, and they are the fastest JPEG-to-tensor path we have.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def crop_rng(seed: int, key: str, pass_index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed & 0xFFFFFFFF, pass_index, key_hash(key)]))


def random_resized_boxes(rng: np.random.Generator, width: int, height: int,
                         scales: np.ndarray) -> np.ndarray:
    """Boxes [n, 4] of (top, left, h, w), one per row of scales [n, 2], sampled like torchvision's
    RandomResizedCrop: up to 10 tries of (area fraction, log aspect ratio), else a centred crop of
    the clamped aspect ratio. All tries are drawn at once (one generator call per quantity)."""
    n = scales.shape[0]
    area = width * height
    u = rng.random((n, 10, 2))
    target = area * (scales[:, :1] + (scales[:, 1:] - scales[:, :1]) * u[..., 0])
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.argmax(axis=1)
    rows = np.arange(n)
    bw, bh, found = w[rows, first], h[rows, first], ok[rows, first]
    pos = rng.random((n, 2))
    top = np.floor(pos[:, 0] * (height - bh + 1)).astype(np.int64)
    left = np.floor(pos[:, 1] * (width - bw + 1)).astype(np.int64)
    if not found.all():
        in_ratio = width / height
        if in_ratio < _RATIO[0]:
            fw, fh = width, int(round(width / _RATIO[0]))
        elif in_ratio > _RATIO[1]:
            fw, fh = int(round(height * _RATIO[1])), height
        else:
            fw, fh = width, height
        miss = ~found
        bw[miss], bh[miss] = fw, fh
        top[miss], left[miss] = (height - fh) // 2, (width - fw) // 2
    return np.stack([top, left, bh, bw], axis=1)


class MultiCrop:
    """Callable on one sample's encoded image bytes: returns its crops as float tensors [3,H,W] in config order."""

    def __init__(self, size_crops: Sequence[int] = (224, 96), num_crops: Sequence[int] = (2, 6),
                 min_scale_crops: Sequence[float] = (0.14, 0.05), max_scale_crops: Sequence[float] = (1.0, 0.14),
                 seed: int = 0, flip_prob: float = P_FLIP):
        if not (len(size_crops) == len(num_crops) == len(min_scale_crops) == len(max_scale_crops)):
            raise ValueError("size_crops, num_crops, min_scale_crops and max_scale_crops must have equal lengths")
        self.size_crops, self.num_crops = list(size_crops), list(num_crops)
        self.scales = list(zip(min_scale_crops, max_scale_crops))
        self.seed = seed
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.flip_prob = flip_prob
        # (size, scale range) of every crop, in config order
        self.plan = [(s, sc) for s, n, sc in zip(self.size_crops, self.num_crops, self.scales) for _ in range(n)]
        self._scales = np.array([sc for _, sc in self.plan], np.float64).reshape(-1, 2)

    @classmethod
    def from_config(cls, crops, seed: int) -> "MultiCrop":
        return cls(crops.size_crops, crops.num_crops, crops.min_scale_crops, crops.max_scale_crops, seed,
                   crops.flip_prob)

    @property
    def total_crops(self) -> int:
        return len(self.plan)

    def sample_params(self, key: str, pass_index: int, width: int, height: int):
        """Per-crop geometry [(top, left, h, w, flip)] and photometric params [n_crops, N_PARAMS]."""
        rng = crop_rng(self.seed, key, pass_index)
        boxes = random_resized_boxes(rng, width, height, self._scales)
        flips = rng.random(len(boxes)) < self.flip_prob
        photo = sample_photometric(rng, len(boxes))
        return [(int(t), int(l), int(h), int(w), bool(f)) for (t, l, h, w), f in zip(boxes.tolist(), flips)], photo

    def crops_u8(self, data: bytes, key: str = "", pass_index: int = 0) -> tuple[list[torch.Tensor], np.ndarray]:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        boxes, photo = self.sample_params(key, pass_index, width, height)
        # Largest power-of-two reduction that keeps every crop at or above its output size.
        room = min(min(h, w) / s for (_, _, h, w, _), (s, _) in zip(boxes, self.plan))
        factor = 1
        while factor < 8 and room >= factor * 2:
            factor *= 2
        if img.format == "JPEG" and factor == 1:
            # No DCT reduction possible: torchvision's libjpeg-turbo decode straight into a tensor is ~35%
            # faster than PIL's decode plus the copy out of it.
            t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        else:
            if factor > 1 and img.format == "JPEG":
                img.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
            t = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
        # Both layouts are channels-last in memory ([3,H,W] over HWC), torch's fast uint8 resize path.
        sy, sx = t.shape[1] / height, t.shape[2] / width
        t4 = t.unsqueeze(0)
        crops = []
        for (top, left, h, w, flip), (size, _) in zip(boxes, self.plan):
            y0, x0 = int(top * sy), int(left * sx)
            region = t4[..., y0:y0 + max(1, round(h * sy)), x0:x0 + max(1, round(w * sx))]
            c = F.interpolate(region, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
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
