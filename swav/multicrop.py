"""Multi-crop views (SwAV): a few large crops and several small ones per image.

Randomness of every crop comes from (seed, sample key, pass), so a sample gets
the same views after a restart. The JPEG is decoded once, by libjpeg-turbo
(simplejpeg), at the lowest resolution the crops allow (DCT scaling by 1/2,
1/4 or 1/8); crops and resizes run on uint8 tensors; the photometric part runs
crop by crop in OpenCV on CPU and batched on accelerators (augment.py).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from shards.stream import key_hash
from swav.augment import BLUR_SIGMA, FLIP, N_PARAMS, P_BLUR, P_FLIP, CropBatch, photometric, sample_photometric

_RATIO = (3 / 4, 4 / 3)


def _resize_out_op():
    """The aten op behind F.interpolate's antialiased bilinear mode, in its out= form, or None.

    Its C binding first: the torch.ops route costs ~4 us more per call in Python dispatch, eight
    times per sample. Probed once, because both are private names a torch release may change."""
    x = torch.arange(7 * 5 * 3, dtype=torch.uint8).view(1, 7, 5, 3).permute(0, 3, 1, 2)
    want = F.interpolate(x, size=(3, 4), mode="bilinear", antialias=True, align_corners=False)
    for op in (getattr(torch._C._nn, "_upsample_bilinear2d_aa", None),
               getattr(getattr(torch.ops.aten, "_upsample_bilinear2d_aa", None), "out", None)):
        try:
            out = torch.empty(1, 3, 4, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
            op(x, [3, 4], False, None, None, out=out)
            if torch.equal(out, want):
                return op
        except Exception:  # noqa: BLE001 - any failure means: not this one
            continue
    return None


_RESIZE_OUT = _resize_out_op()


def _resize(region: torch.Tensor, size: int, out: torch.Tensor | None) -> torch.Tensor:
    """Antialiased bilinear resize of [1,3,h,w] uint8 to size x size, into out ([3,S,S] or [1,3,S,S])
    when given, else a new [3,S,S]."""
    if out is None:
        return F.interpolate(region, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if _RESIZE_OUT is not None:
        # The aten op behind F.interpolate, in its out= form: the crop lands in its batch slot with
        # no second copy (stacking crops into batches was ~7% of the CPU part).
        _RESIZE_OUT(region, [size, size], False, None, None, out=out if out.dim() == 4 else out.unsqueeze(0))
    else:
        out.copy_(F.interpolate(region, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                  .view(out.shape))
    return out


def _nchw_view(hwc: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
    """The region of a contiguous uint8 [H,W,3] image as [1,3,h,w] with channels-last strides.

    The batch stride is the whole image, so torch takes the view as channels-last and keeps its fast
    uint8 resize path (a [3,H,W] permute unsqueezed gets an ambiguous batch stride, and ~40% slower
    resizes with NCHW outputs). as_strided because indexing costs 3x as much, per crop.
    """
    height, width = hwc.shape[0], hwc.shape[1]
    h, w = min(h, height - top), min(w, width - left)   # what slicing would clamp to
    return hwc.as_strided((1, 3, h, w), (height * width * 3, 1, width * 3, 3),
                          hwc.storage_offset() + (top * width + left) * 3)


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
                         scales: Sequence[tuple[float, float]]) -> list[tuple[int, int, int, int]]:
    """Boxes (top, left, h, w), one per (min, max) area fraction in scales, sampled like torchvision's
    RandomResizedCrop: up to 10 tries of (area fraction, log aspect ratio), else a centred crop of
    the clamped aspect ratio. All tries are drawn at once (one generator call per quantity); the
    per-crop arithmetic is plain Python, since numpy's per-call cost dominated arrays of 8 x 10."""
    n = len(scales)
    area = width * height
    u = rng.random((n, 10, 2))
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    # numpy's exp, not math.exp: the two may differ in the last bit, and a sample's boxes must not
    # change between releases (the demo's figures and every resumed run depend on them)
    aspects = np.exp(log_lo + (log_hi - log_lo) * u[..., 1]).tolist()
    fractions = u[..., 0].tolist()
    positions = rng.random((n, 2)).tolist()
    boxes = []
    for (lo, hi), fraction, aspect, (py, px) in zip(scales, fractions, aspects, positions):
        for f, a in zip(fraction, aspect):
            target = area * (lo + (hi - lo) * f)
            w, h = round(math.sqrt(target * a)), round(math.sqrt(target / a))   # both round half to even
            if 0 < w <= width and 0 < h <= height:
                boxes.append((math.floor(py * (height - h + 1)), math.floor(px * (width - w + 1)), h, w))
                break
        else:
            in_ratio = width / height
            if in_ratio < _RATIO[0]:
                w, h = width, int(round(width / _RATIO[0]))
            elif in_ratio > _RATIO[1]:
                w, h = int(round(height * _RATIO[1])), height
            else:
                w, h = width, height
            boxes.append(((height - h) // 2, (width - w) // 2, h, w))
    return boxes


class ImageTooLarge(ValueError):
    """An image whose header claims more pixels than the decoder may allocate."""


class MultiCrop:
    """Callable on one sample's encoded image bytes: returns its crops as float tensors [3,H,W] in config order."""

    def __init__(self, size_crops: Sequence[int] = (224, 96), num_crops: Sequence[int] = (2, 6),
                 min_scale_crops: Sequence[float] = (0.14, 0.05), max_scale_crops: Sequence[float] = (1.0, 0.14),
                 seed: int = 0, flip_prob: float = P_FLIP, blur_prob: float = P_BLUR,
                 blur_sigma: Sequence[float] = BLUR_SIGMA, max_pixels: int = 100_000_000):
        if not (len(size_crops) == len(num_crops) == len(min_scale_crops) == len(max_scale_crops)):
            raise ValueError("size_crops, num_crops, min_scale_crops and max_scale_crops must have equal lengths")
        self.size_crops, self.num_crops = list(size_crops), list(num_crops)
        self.max_pixels = max_pixels
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
        self._scales = [(float(lo), float(hi)) for _, (lo, hi) in self.plan]

    @classmethod
    def from_config(cls, crops, seed: int, max_pixels: int = 100_000_000) -> "MultiCrop":
        return cls(crops.size_crops, crops.num_crops, crops.min_scale_crops, crops.max_scale_crops, seed,
                   crops.flip_prob, crops.blur_prob, crops.blur_sigma, max_pixels)

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
        return [box + (f,) for box, f in zip(boxes, flips.tolist())], photo

    def _decode(self, data: bytes, boxes: list, width: int, height: int, img: Image.Image | None) -> torch.Tensor:
        """The image as uint8 [h,w,3], at the smallest size every crop allows."""
        # Shrink in the DCT by the largest power of two that keeps every crop at or above its output
        # size: cheaper decode and cheaper resizes. Powers of two only: libjpeg-turbo has SIMD IDCTs
        # for 1/1, 1/2, 1/4 and 1/8, while its 7/8, 3/4 and 5/8 ones are plain C, measured 1.2-1.8x
        # *slower* than a full decode (bench/decode_scales.py).
        room = min(min(h, w) / s for (_, _, h, w, _), (s, _) in zip(boxes, self.plan))
        factor = 1
        while factor < 8 and room >= factor * 2:
            factor *= 2
        if img is None:   # a JPEG libjpeg-turbo reads (see _jpeg_size)
            try:
                if factor == 1:
                    return torch.from_numpy(simplejpeg.decode_jpeg(data, "RGB"))
                return torch.from_numpy(simplejpeg.decode_jpeg(data, "RGB", min_width=math.ceil(width / factor),
                                                               min_height=math.ceil(height / factor)))
            except ValueError:
                img = Image.open(io.BytesIO(data))   # what libjpeg-turbo refuses, Pillow may still read
        if factor > 1 and img.format == "JPEG":
            img.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
        return torch.from_numpy(np.array(img.convert("RGB")))

    def crops_u8(self, data: bytes, key: str = "", pass_index: int = 0,
                 out: Sequence[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], np.ndarray]:
        """Uint8 crops [3,S,S] in config order, not yet flipped, and their params [n_crops, N_PARAMS].

        out: a destination per crop, [3,S,S] or [1,3,S,S] (e.g. its slot in a batch tensor), resized
        into directly; the crops returned are then out's entries.
        """
        size = _jpeg_size(data)
        img = None if size is not None else Image.open(io.BytesIO(data))   # opened once, decoded in _decode
        width, height = size if img is None else img.size
        if width * height > self.max_pixels:
            # From the header, before any pixel is decoded: a decompression bomb in someone else's
            # shard costs one skipped sample, not a worker's memory.
            raise ImageTooLarge(f"{width}x{height} exceeds data.max_pixels={self.max_pixels}")
        boxes, photo = self.sample_params(key, pass_index, width, height)
        hwc = self._decode(data, boxes, width, height, img)
        sy, sx = hwc.shape[0] / height, hwc.shape[1] / width
        crops = []
        for i, ((top, left, h, w, _), (size, _)) in enumerate(zip(boxes, self.plan)):
            region = _nchw_view(hwc, int(top * sy), int(left * sx), max(1, round(h * sy)), max(1, round(w * sx)))
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
        self._sizes = [multicrop.size_crops[r] for r, _ in self._where]
        self.keys: list[str] = []
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled >= self.batch_size

    def _slots(self) -> list[torch.Tensor]:
        """The next sample's place in the batch, one [1,3,S,S] view per crop in config order."""
        b, n = self.filled, self.batch_size
        # as_strided rather than indexing plus unsqueeze: a third of the cost, eight times per sample
        return [self.images[r].as_strided((1, 3, s, s), (s * s * 3, 1, s * 3, 3), (j * n + b) * s * s * 3)
                for (r, j), s in zip(self._where, self._sizes)]

    def _commit(self, photo: np.ndarray, key: str) -> None:
        # crop j of sample b sits in row j * batch_size + b: one strided row slice per resolution
        start = 0
        for params, k in zip(self.params, self.mc.num_crops):
            params[self.filled::self.batch_size] = photo[start:start + k]
            start += k
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
