"""Batched photometric augmentation: colour jitter, grayscale, blur and normalisation.

Each crop carries its own sampled parameters, so a whole batch is augmented by
a few vectorised tensor ops instead of one PIL call per crop per op. The same
code runs in a CPU worker (``augment_on: cpu``) or on the training GPU
(``augment_on: device``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MEAN = (0.485, 0.456, 0.406)
STD = (0.228, 0.224, 0.225)

# SwAV/SimCLR colour distortion at strength 1.0.
JITTER = (0.8, 0.8, 0.8, 0.2)      # brightness, contrast, saturation, hue
P_JITTER, P_GRAY, P_BLUR, P_FLIP = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)
# Crops are small and a data-loader worker is one core: OpenCV's own thread pool would only add
# hand-offs and oversubscribe the workers.
cv2.setNumThreads(1)
N_PARAMS = 12   # jitter flag, 4 factors, 4 order slots, gray flag, blur sigma (0 = no blur), flip flag
FLIP = 11


# factor ranges of brightness, contrast, saturation and hue, as uniform lo + span * u
_JITTER_LO = np.array([max(0.0, 1 - JITTER[0]), max(0.0, 1 - JITTER[1]), max(0.0, 1 - JITTER[2]), -JITTER[3]])
_JITTER_SPAN = np.array([1 + JITTER[0], 1 + JITTER[1], 1 + JITTER[2], JITTER[3]]) - _JITTER_LO


def sample_photometric(rng: np.random.Generator, n: int | None = None, blur_prob: float = P_BLUR,
                       blur_sigma: tuple[float, float] = BLUR_SIGMA) -> np.ndarray:
    """Photometric parameters of one crop [N_PARAMS], or of n crops [n, N_PARAMS], as float32.
    The flip flag is left 0: MultiCrop draws it with the crop geometry.

    Drawn as a few arrays rather than per value: per-call overhead of the generator
    dominated the CPU cost of small crops.
    """
    m = 1 if n is None else n
    u = rng.random((m, 7))
    out = np.zeros((m, N_PARAMS), np.float32)
    out[:, 0] = u[:, 0] < P_JITTER
    out[:, 1:5] = _JITTER_LO + _JITTER_SPAN * u[:, 1:5]
    out[:, 5:9] = np.argsort(rng.random((m, 4)), axis=1)   # a uniformly random order of the four ops
    out[:, 9] = u[:, 5] < P_GRAY
    sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * rng.random(m)
    out[:, 10] = np.where(u[:, 6] < blur_prob, sigma, 0.0)
    return out[0] if n is None else out


_LUMA = (0.299, 0.587, 0.114)
_TO_LUMA = np.ones((3, 1)) @ np.array([_LUMA])     # every channel := luma
# YIQ: hue is a rotation of the chroma plane (I, Q) around the luma axis.
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)
_KEEP = 4   # the op index of "no op": crops without jitter


def colour_maps(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per crop, the affine colour map of jitter (in its sampled order) then grayscale, as (M [N,3,3],
    A [N,3,3]) in float64: a pixel p becomes M p + A mu, where mu is the crop's mean colour.

    Every SwAV colour op is affine in RGB: brightness scales, saturation and grayscale mix with luma,
    contrast mixes with the image's mean luma, and hue is a rotation about the grey axis (done in
    YIQ). The only offsets come from contrast and are linear in the mean colour, hence A. Composing
    them costs nothing per pixel, so a crop is transformed with one 3x3 multiply and a single clamp,
    instead of four passes with a clamp after each as torchvision does; and hue is YIQ's rotation
    rather than HSV's (the usual fast variant).

    Vectorised over crops, with no per-op masking: a data-loader worker calls this once per batch and
    MultiCrop.__call__ once per sample, so per-call overhead is most of its cost; masked torch ops
    cost several times more per call for the same views.
    """
    p = np.asarray(params, dtype=np.float64)
    n = p.shape[0]
    rows, eye = np.arange(n), np.eye(3)
    f = p[:, 1:5].reshape(n, 4, 1, 1)
    theta = -2 * np.pi * p[:, 4]   # the sign that turns hues the way HSV does
    c, s = np.cos(theta), np.sin(theta)
    rot = np.zeros((n, 3, 3))
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    maps = np.empty((n, 5, 3, 3))                      # brightness, contrast, saturation, hue, keep
    maps[:, 0] = f[:, 0] * eye
    maps[:, 1] = f[:, 1] * eye
    maps[:, 2] = f[:, 2] * eye + (1 - f[:, 2]) * _TO_LUMA
    maps[:, 3] = _YIQ2RGB @ rot @ _RGB2YIQ
    maps[:, _KEEP] = eye
    # contrast pulls towards the mean luma of the image as it is now, (M + A) mu; no other op does
    pull = np.zeros((n, 5, 1, 1))
    pull[:, 1] = 1 - f[:, 1]
    jitter = p[:, 0] > 0.5
    m, off = np.broadcast_to(eye, (n, 3, 3)).copy(), np.zeros((n, 3, 3))
    for slot in range(4):
        op = np.where(jitter, p[:, 5 + slot].astype(np.int64), _KEEP)
        a, k = maps[rows, op], pull[rows, op]
        off = a @ off + k * (_TO_LUMA @ (m + off))
        m = a @ m
    gray = (p[:, 9] > 0.5).reshape(n, 1, 1)
    return np.where(gray, _TO_LUMA @ m, m), np.where(gray, _TO_LUMA @ off, off)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, each image with its own sigma (radius 3 sigma, reflected borders).

    The tensor path's blur (see _blur_kernels for the taps). Each pass is a weighted sum of shifted
    views, 2r+1 fused multiply-adds over the image; images sharing a radius are blurred together,
    each with its own weights, so the Python cost is per radius rather than per image.
    """
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    taps = _blur_kernels(sigma.double().cpu().numpy(), h, w)
    radius = np.array([len(k) // 2 for k in taps])
    for r in np.unique(radius).tolist():
        sel = np.nonzero(radius == r)[0]
        k = torch.from_numpy(np.stack([taps[i] for i in sel])).to(x.device, x.dtype)   # [n, 2r+1]
        idx = torch.from_numpy(sel).to(x.device)
        z = F.pad(x.index_select(0, idx), (r, r, 0, 0), mode="reflect")
        kk = k.view(-1, 1, 1, 1, 2 * r + 1)
        row = z[..., 0:w] * kk[..., 0]
        for j in range(1, 2 * r + 1):
            row.addcmul_(z[..., j:j + w], kk[..., j])
        z = F.pad(row, (0, 0, r, r), mode="reflect")
        col = z[..., 0:h, :] * kk[..., 0]
        for j in range(1, 2 * r + 1):
            col.addcmul_(z[..., j:j + h, :], kk[..., j])
        out.index_copy_(0, idx, col)
    return out


def _blur_kernels(sigma: np.ndarray, h: int, w: int) -> list[np.ndarray]:
    """Normalised 1-D Gaussian taps per sigma: radius 3 sigma, capped so a reflected border still fits."""
    limit = max(1, (min(h, w) - 1) // 2)
    radius = np.clip(np.ceil(3 * sigma).astype(np.int64), 1, limit)
    out = []
    for s, r in zip(sigma.tolist(), radius.tolist()):
        t = np.arange(-r, r + 1, dtype=np.float64)
        k = np.exp(-(t ** 2) / (2 * s * s))
        out.append(k / k.sum())
    return out


def _normalisation(normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
    if not normalize:
        mean, std = torch.zeros_like(mean), torch.ones_like(std)
    return mean, std


def _photometric_opencv(crops_u8: torch.Tensor, params: torch.Tensor, normalize: bool,
                        dtype: torch.dtype) -> torch.Tensor:
    """The CPU path: crop by crop on uint8 HWC images with OpenCV's SIMD kernels, then one batched
    conversion to normalised float. Like the reference's PIL pipeline it rounds to uint8 after the
    colour map and after the blur; the tensor path keeps float throughout (same distribution)."""
    n, _, h, w = crops_u8.shape
    src = crops_u8.permute(0, 2, 3, 1).contiguous().numpy()     # no copy when already channels-last
    buf = np.empty_like(src)
    m, off = colour_maps(params.numpy())
    identity = (np.abs(m - np.eye(3)).reshape(n, -1).max(1) == 0) & (np.abs(off).reshape(n, -1).max(1) == 0)
    sigma = params[:, 10].double().numpy()
    blurred = np.nonzero(sigma > 0)[0]
    kernels = dict(zip(blurred.tolist(), _blur_kernels(sigma[blurred], h, w)))
    affine = np.empty((3, 4), np.float32)
    flips = params[:, FLIP].numpy() > 0.5
    for i in range(n):
        x = cv2.flip(src[i], 1) if flips[i] else src[i]
        if not identity[i]:
            # the contrast offset needs the crop's mean colour; saturation clamps to 0..255 in the same pass
            affine[:, :3] = m[i]
            affine[:, 3] = off[i] @ np.asarray(cv2.mean(x)[:3])
            x = cv2.transform(x, affine, dst=buf[i] if i not in kernels else None)
        if i in kernels:
            k = kernels[i]
            cv2.sepFilter2D(x, -1, k, k, dst=buf[i], borderType=cv2.BORDER_REFLECT_101)
        elif identity[i]:
            buf[i] = x
    mean, std = _normalisation(normalize)
    out = torch.empty(n, 3, h, w, dtype=torch.float32)
    out.copy_(torch.from_numpy(buf).permute(0, 3, 1, 2))
    out.mul_((1 / (255 * std)).float().view(1, 3, 1, 1)).add_((-mean / std).float().view(1, 3, 1, 1))
    return out if dtype == torch.float32 else out.to(dtype)


@torch.no_grad()
def photometric(crops_u8: torch.Tensor, params: torch.Tensor, normalize: bool = True,
                dtype: torch.dtype = torch.float32, method: str | None = None) -> torch.Tensor:
    """Augment a batch of uint8 crops [N,3,H,W] with per-crop params [N, N_PARAMS]: colour jitter,
    grayscale, blur, horizontal flip and normalisation; float output.

    method: "opencv" (crop by crop with OpenCV, CPU only; the default there: tensor ops on a CPU pay
    a full memory pass per op) or "tensor" (a few whole-batch ops; the default
    on accelerators, where each op is one launch).
    """
    if method is None:
        method = "opencv" if crops_u8.device.type == "cpu" else "tensor"
    if method not in ("opencv", "tensor"):
        raise ValueError(f"method must be 'opencv' or 'tensor', got {method!r}")
    params = params.to(torch.float32).cpu()
    if method == "opencv":
        if crops_u8.device.type != "cpu":
            raise ValueError("method='opencv' needs crops in CPU memory")
        return _photometric_opencv(crops_u8, params, normalize, dtype)
    n, _, h, w = crops_u8.shape
    # one pass for both the dtype and the layout (crops arrive channels-last)
    x = crops_u8.to(dtype, memory_format=torch.contiguous_format).view(n, 3, h * w)
    m, off = (torch.from_numpy(a) for a in colour_maps(params.numpy()))
    mean, std = _normalisation(normalize)
    # Normalisation is per-channel affine: fold it into the map and the clamp bounds, and apply the
    # (linear, per-channel) blur afterwards; same result, two passes fewer. Inputs are 0-255.
    m = m / (255.0 * std.view(1, 3, 1))
    off = off / (255.0 * std.view(1, 3, 1))
    mu = x.mean(dim=2).double().cpu()
    o = ((off @ mu.unsqueeze(-1)).squeeze(-1) - mean / std).to(crops_u8.device, dtype)
    y = torch.baddbmm(o.view(n, 3, 1), m.to(crops_u8.device, dtype), x)
    for ch, (a, b) in enumerate(zip(((0 - mean) / std).tolist(), ((1 - mean) / std).tolist())):
        y[:, ch].clamp_(a, b)
    x = y.view(n, 3, h, w)
    idx = torch.nonzero(params[:, 10] > 0).flatten()
    if idx.numel():
        idx = idx.to(x.device)
        x[idx] = _gaussian_blur(x[idx], params[idx.cpu(), 10].to(x.device, dtype))
    idx = torch.nonzero(params[:, FLIP] > 0.5).flatten()
    if idx.numel():
        idx = idx.to(x.device)
        x[idx] = x[idx].flip(-1)
    return x


@dataclass
class CropBatch:
    """Crops of a batch grouped by resolution, in config order within each group.

    images[r]: [n_crops_r * B, 3, S_r, S_r], crop-major (all samples' crop 0, then crop 1, ...),
    uint8 until augmented; params[r]: matching [n_crops_r * B, N_PARAMS]; keys: sample keys; ids: [B] int64
    sample ids (shard number << 32 | ordinal in the shard), what the memory-bank objectives key their banks by.
    """

    images: list[torch.Tensor]
    params: list[torch.Tensor]
    keys: list[str]
    augmented: bool
    ids: torch.Tensor | None = None

    def pin_memory(self) -> "CropBatch":
        """Page-locked copies, so the loader's pin_memory thread makes the host-to-device copies truly
        asynchronous (the DataLoader calls this on any batch object that has it)."""
        return CropBatch([im.pin_memory() for im in self.images], [p.pin_memory() for p in self.params],
                         self.keys, self.augmented, self.ids)

    def augment(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        if self.augmented:
            return [im.to(device, non_blocking=True) if device is not None else im for im in self.images]
        out = []
        for im, p in zip(self.images, self.params):
            im = im.to(device, non_blocking=True) if device is not None else im
            out.append(photometric(im, p, dtype=dtype))
        return out
