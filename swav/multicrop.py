"""Multi-crop views (SwAV): a few large crops and several small ones per image.

Randomness of every crop comes from (seed, sample key, pass), so a sample gets
the same views after a restart. The JPEG is decoded once, by libjpeg-turbo
(simplejpeg), at the lowest resolution the crops allow (DCT scaling in
eighths); crops and resizes run on uint8 tensors; the photometric part runs
crop by crop in OpenCV on CPU and batched on accelerators (augment.py).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
import simplejpeg

from shards.stream import key_hash
from swav.augment import BLUR_SIGMA, FLIP, N_PARAMS, P_BLUR, P_FLIP, CropBatch, photometric, sample_photometric

_RATIO = (3 / 4, 4 / 3)
_RESIZE_OUT = getattr(getattr(torch.ops.aten, "_upsample_bilinear2d_aa", None), "out", None)


def _resize(region: torch.Tensor, size: int, out: torch.Tensor | None) -> torch.Tensor:
    """Antialiased bilinear resize of [1,3,h,w] uint8 to [3,size,size], into out when given."""
    if out is None:
        return F.interpolate(region, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if _RESIZE_OUT is not None:
        # The aten op behind F.interpolate, in its out= form: the crop lands in its batch slot with
        # no second copy (stacking crops into batches was ~7% of the CPU part).
        _RESIZE_OUT(region, [size, size], False, None, None, out=out.unsqueeze(0))
    else:
        out.copy_(F.interpolate(region, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
    return out


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG libjpeg-turbo can decode to RGB, else None (Pillow's turn)."""
    if data[:2] != b"\xff\xd8":
        return None
    try:
        h, w, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (w, h) if colourspace in ("Gray", "YCbCr", "RGB") else None


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
                 seed: int = 0, flip_prob: float = P_FLIP, blur_prob: float = P_BLUR,
                 blur_sigma: Sequence[float] = BLUR_SIGMA):
        if not (len(size_crops) == len(num_crops) == len(min_scale_crops) == len(max_scale_crops)):
            raise ValueError("size_crops, num_crops, min_scale_crops and max_scale_crops must have equal lengths")
        self.size_crops, self.num_crops = list(size_crops), list(num_crops)
        self.scales = list(zip(min_scale_crops, max_scale_crops))
        self.seed = seed
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.flip_prob = flip_prob
        if not 0.0 <= blur_prob <= 1.0:
            raise ValueError(f"blur_prob must be in [0, 1], got {blur_prob}")
        if len(blur_sigma) != 2 or not 0.0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must be [low, high] with 0 < low <= high, got {list(blur_sigma)}")
        self.blur_prob, self.blur_sigma = blur_prob, (float(blur_sigma[0]), float(blur_sigma[1]))
        # (size, scale range) of every crop, in config order
        self.plan = [(s, sc) for s, n, sc in zip(self.size_crops, self.num_crops, self.scales) for _ in range(n)]
        self._scales = np.array([sc for _, sc in self.plan], np.float64).reshape(-1, 2)

    @classmethod
    def from_config(cls, crops, seed: int) -> "MultiCrop":
        return cls(crops.size_crops, crops.num_crops, crops.min_scale_crops, crops.max_scale_crops, seed,
                   crops.flip_prob, crops.blur_prob, crops.blur_sigma)

    @property
    def total_crops(self) -> int:
        return len(self.plan)

    def sample_params(self, key: str, pass_index: int, width: int, height: int):
        """Per-crop geometry [(top, left, h, w, flip)] and photometric params [n_crops, N_PARAMS].

        The flip is in both: it commutes with every photometric op (the blur is symmetric), so it is
        applied with them (on the training device under augment_on: device) rather than as a copy here.
        """
        rng = crop_rng(self.seed, key, pass_index)
        boxes = random_resized_boxes(rng, width, height, self._scales)
        flips = rng.random(len(boxes)) < self.flip_prob
        photo = sample_photometric(rng, len(boxes), self.blur_prob, self.blur_sigma)
        photo[:, FLIP] = flips
        return [(int(t), int(l), int(h), int(w), bool(f)) for (t, l, h, w), f in zip(boxes.tolist(), flips)], photo

    def _decode(self, data: bytes, boxes: list, width: int, height: int, img: Image.Image | None) -> torch.Tensor:
        """The image as uint8 [h,w,3], at the smallest size every crop allows."""
        # Reduction that keeps every crop at or above its output size; JPEGs shrink in the DCT
        # (libjpeg-turbo scales by n/8), which makes both the decode and the resizes cheaper.
        room = min(min(h, w) / s for (_, _, h, w, _), (s, _) in zip(boxes, self.plan))
        if img is None:   # a JPEG libjpeg-turbo reads (see _jpeg_size)
            try:
                if room >= 8 / 7:   # else no eighths-scale fits: a full decode, skipping the scale search
                    arr = simplejpeg.decode_jpeg(data, "RGB", min_width=math.ceil(width / room),
                                                 min_height=math.ceil(height / room))
                else:
                    arr = simplejpeg.decode_jpeg(data, "RGB")
                return torch.from_numpy(arr)
            except ValueError:
                img = Image.open(io.BytesIO(data))   # what libjpeg-turbo refuses, Pillow may still read
        factor = 1
        while factor < 8 and room >= factor * 2:
            factor *= 2
        if factor > 1 and img.format == "JPEG":
            img.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
        return torch.from_numpy(np.array(img.convert("RGB")))

    def crops_u8(self, data: bytes, key: str = "", pass_index: int = 0,
                 out: Sequence[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], np.ndarray]:
        """Uint8 crops [3,S,S] in config order, not yet flipped, and their params [n_crops, N_PARAMS].

        out: a destination per crop (e.g. its slot in a batch tensor), resized into directly.
        """
        size = _jpeg_size(data)
        img = None if size is not None else Image.open(io.BytesIO(data))   # opened once, decoded in _decode
        width, height = size if img is None else img.size
        boxes, photo = self.sample_params(key, pass_index, width, height)
        hwc = self._decode(data, boxes, width, height, img)
        sy, sx = hwc.shape[0] / height, hwc.shape[1] / width
        # [1,3,H,W] with proper channels-last strides (batch dim first, then permuted): torch's fast
        # uint8 resize path, and channels-last crops out. Unsqueezing a [3,H,W] permute instead gives
        # an ambiguous batch stride, and ~40% slower resizes with NCHW outputs.
        t4 = hwc.unsqueeze(0).permute(0, 3, 1, 2)
        crops = []
        for i, ((top, left, h, w, _), (size, _)) in enumerate(zip(boxes, self.plan)):
            y0, x0 = int(top * sy), int(left * sx)
            region = t4[..., y0:y0 + max(1, round(h * sy)), x0:x0 + max(1, round(w * sx))]
            crops.append(_resize(region, size, None if out is None else out[i]))
        return crops, photo

    def __call__(self, data: bytes, key: str = "", pass_index: int = 0) -> list[torch.Tensor]:
        batch = CropBatcher(self, 1)
        batch.add(data, key, pass_index)
        # a batch of one, crop-major per config entry: the groups in turn are the crops in config order
        return [crop for group in batch.finish(augment=True).images for crop in group]

    def collate(self, items: list[tuple[list[torch.Tensor], np.ndarray]], keys: list[str],
                augment: bool) -> CropBatch:
        """Group crops_u8 outputs by resolution, crop-major, optionally augmenting them here."""
        batch = CropBatcher(self, len(items))
        for crops, photo in items:
            batch.put(crops, photo)
        return batch.finish(augment, keys)


class CropBatcher:
    """One batch under construction: each sample's crops are resized straight into their slot of
    the per-resolution batch tensors (crop-major, channels-last uint8), as collate() would lay them out."""

    def __init__(self, multicrop: MultiCrop, batch_size: int):
        self.mc, self.batch_size = multicrop, batch_size
        self.images = [torch.empty(n * batch_size, s, s, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
                       for s, n in zip(multicrop.size_crops, multicrop.num_crops)]
        self.params = [np.zeros((n * batch_size, N_PARAMS), np.float32) for n in multicrop.num_crops]
        self._where = [(r, j) for r, n in enumerate(multicrop.num_crops) for j in range(n)]
        self.keys: list[str] = []
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled >= self.batch_size

    def _slots(self) -> list[torch.Tensor]:
        """The next sample's place in the batch, one [3,S,S] view per crop in config order."""
        b, n = self.filled, self.batch_size
        return [self.images[r][j * n + b] for r, j in self._where]

    def _commit(self, photo: np.ndarray, key: str) -> None:
        b, n = self.filled, self.batch_size
        for ci, (r, j) in enumerate(self._where):
            self.params[r][j * n + b] = photo[ci]
        self.keys.append(key)
        self.filled += 1

    def add(self, data: bytes, key: str, pass_index: int) -> None:
        """Adds one sample; if it raises (undecodable), the batch is as before and the slot is reused."""
        _, photo = self.mc.crops_u8(data, key, pass_index, out=self._slots())
        self._commit(photo, key)

    def put(self, crops: Sequence[torch.Tensor], photo: np.ndarray, key: str = "") -> None:
        """Adds one sample's crops_u8 output (already resized)."""
        for slot, c in zip(self._slots(), crops):
            slot.copy_(c)
        self._commit(photo, key)

    def finish(self, augment: bool, keys: list[str] | None = None) -> CropBatch:
        """The CropBatch, optionally augmented here; keys, when given, replace the ones added."""
        images, params = self.images, [torch.from_numpy(p) for p in self.params]
        if not self.full:   # a short last batch: keep the filled slots, still crop-major
            n = self.batch_size
            images, params = zip(*[(im.view(-1, n, *im.shape[1:])[:, :self.filled].flatten(0, 1),
                                    p.view(-1, n, N_PARAMS)[:, :self.filled].flatten(0, 1))
                                   for im, p in zip(images, params)])
        images, params = list(images), list(params)
        if augment:
            images = [photometric(im, p) for im, p in zip(images, params)]
        return CropBatch(images=images, params=params, keys=list(self.keys if keys is None else keys),
                         augmented=augment)
