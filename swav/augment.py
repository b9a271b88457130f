"""Batched photometric augmentation: colour jitter, grayscale, blur and normalisation.

Each crop carries its own sampled parameters, so a whole batch is augmented by
a few vectorised tensor ops instead of one PIL call per crop per op. The same
code runs in a CPU worker (``augment_on: cpu``) or on the training GPU
(``augment_on: device``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MEAN = (0.485, 0.456, 0.406)
STD = (0.228, 0.224, 0.225)

# SwAV/SimCLR colour distortion at strength 1.0.
JITTER = (0.8, 0.8, 0.8, 0.2)      # brightness, contrast, saturation, hue
P_JITTER, P_GRAY, P_BLUR, P_FLIP = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)
_PER_CROP_MIN_PIXELS = 128 * 128   # measured on CPU: per-crop wins at 224 px, batched wins at 96 px
N_PARAMS = 11   # jitter flag, 4 factors, 4 order slots, gray flag, blur sigma (0 = no blur)


def sample_photometric(rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    """Photometric parameters of one crop [N_PARAMS], or of n crops [n, N_PARAMS], as float32.

    Drawn as a few arrays rather than per value: per-call overhead of the generator
    dominated the CPU cost of small crops.
    """
    b, c, s, h = JITTER
    m = 1 if n is None else n
    u = rng.random((m, 7))
    out = np.empty((m, N_PARAMS), np.float32)
    out[:, 0] = u[:, 0] < P_JITTER
    for col, (lo, hi) in enumerate(((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c),
                                    (max(0.0, 1 - s), 1 + s), (-h, h)), start=1):
        out[:, col] = lo + (hi - lo) * u[:, col]
    out[:, 5:9] = np.argsort(rng.random((m, 4)), axis=1)   # a uniformly random order of the four ops
    out[:, 9] = u[:, 5] < P_GRAY
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * rng.random(m)
    out[:, 10] = np.where(u[:, 6] < P_BLUR, sigma, 0.0)
    return out[0] if n is None else out


_LUMA = (0.299, 0.587, 0.114)
# YIQ: hue is a rotation of the chroma plane (I, Q) around the luma axis.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                        dtype=torch.float64)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def colour_maps(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per crop, the affine colour map of jitter (in its sampled order) then grayscale, as (M [N,3,3],
    A [N,3,3]) in float64: a pixel p becomes M p + A mu, where mu is the crop's mean colour.

    Every SwAV colour op is affine in RGB: brightness scales, saturation and grayscale mix with luma,
    contrast mixes with the image's mean luma, and hue is a rotation about the grey axis (done in
    YIQ). The only offsets come from contrast and are linear in the mean colour, hence A. Composing
    them costs nothing per pixel, so a crop is transformed with one 3x3 multiply and a single clamp,
    instead of four passes with a clamp after each as torchvision does; and hue is YIQ's rotation
    rather than HSV's (the usual fast variant).
    """
    n = params.shape[0]
    p = params.double()
    eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
    w = torch.tensor(_LUMA, dtype=torch.float64)
    luma = torch.ones(3, 1, dtype=torch.float64) @ w.view(1, 3)          # every channel := luma
    m, off = eye.clone(), torch.zeros(n, 3, 3, dtype=torch.float64)
    jitter = p[:, 0] > 0.5
    for slot in range(4):
        op = p[:, 5 + slot].long()
        for kind in range(4):
            sel = jitter & (op == kind)
            if not sel.any():
                continue
            f = p[sel, 1 + kind].view(-1, 1, 1)
            if kind == 0:      # brightness
                a = f * eye[sel]
            elif kind == 1:    # contrast: towards the mean luma of the image as it is now (M + A) mu
                a = f * eye[sel]
                off[sel] = a @ off[sel] + (1 - f) * (luma @ (m[sel] + off[sel]))
                m[sel] = a @ m[sel]
                continue
            elif kind == 2:    # saturation
                a = f * eye[sel] + (1 - f) * luma
            else:              # hue
                theta = -2 * torch.pi * p[sel, 4]  # the sign that turns hues the way HSV does
                c, s_ = torch.cos(theta), torch.sin(theta)
                rot = torch.zeros(int(sel.sum()), 3, 3, dtype=torch.float64)
                rot[:, 0, 0] = 1
                rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s_, s_, c
                a = _YIQ2RGB @ rot @ _RGB2YIQ
            m[sel] = a @ m[sel]
            off[sel] = a @ off[sel]
    gray = p[:, 9] > 0.5
    if gray.any():
        m[gray] = luma @ m[gray]
        off[gray] = luma @ off[gray]
    return m, off


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, each image with its own sigma (radius 3 sigma, reflected borders).

    Each pass is a weighted sum of shifted views (2r+1 fused multiply-adds over the image): on CPU
    this beats both a grouped convolution over the batch and per-image depthwise convolutions.
    Images sharing a radius are blurred together, each with its own weights, so the Python cost
    is per radius rather than per image (it dominated for small crops).
    """
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    limit = max(1, (min(h, w) - 1) // 2)
    sig = sigma.double().cpu().numpy()
    radius = np.clip(np.ceil(3 * sig).astype(np.int64), 1, limit)
    for r in np.unique(radius).tolist():
        sel = np.nonzero(radius == r)[0]
        t = np.arange(-r, r + 1, dtype=np.float64)
        k = np.exp(-(t[None, :] ** 2) / (2 * sig[sel, None] ** 2))
        k = torch.from_numpy(k / k.sum(axis=1, keepdims=True)).to(x.device, x.dtype)   # [n, 2r+1]
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


@torch.no_grad()
def photometric(crops_u8: torch.Tensor, params: torch.Tensor, normalize: bool = True,
                dtype: torch.dtype = torch.float32, per_crop: bool | None = None) -> torch.Tensor:
    """Augment a batch of uint8 crops [N,3,H,W] with per-crop params [N, N_PARAMS]; float output.

    per_crop: crop-by-crop loops or whole-batch ops. The default is per crop for large crops on CPU,
    where a crop then stays in cache through every op; batched for small crops on CPU, where the
    per-op overhead of a loop would dominate; and batched on accelerators, where each op is a launch.
    """
    n, _, h, w = crops_u8.shape
    if per_crop is None:
        per_crop = crops_u8.device.type == "cpu" and h * w >= _PER_CROP_MIN_PIXELS
    params = params.to(torch.float32).cpu()
    src = crops_u8.reshape(n, 3, h * w)
    m, off = colour_maps(params)
    mean, std = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
    if not normalize:
        mean, std = torch.zeros_like(mean), torch.ones_like(std)
    # Normalisation is per-channel affine: fold it into the map and the clamp bounds, and apply the
    # (linear, per-channel) blur afterwards; same result, two passes fewer per crop. Inputs are 0-255.
    m = m / (255.0 * std.view(1, 3, 1))
    off = off / (255.0 * std.view(1, 3, 1))
    shift = -mean / std
    bounds = list(zip(((0 - mean) / std).tolist(), ((1 - mean) / std).tolist()))
    if per_crop:
        # Crop by crop, so each one is converted, averaged, mapped and clamped while it sits in cache:
        # ~3x faster on CPU than batched conversion, mean and baddbmm (slow for 3x3 matrices).
        m, off, shift = m.to(dtype), off.to(dtype), shift.to(dtype)
        y = torch.empty(n, 3, h * w, dtype=dtype, device=crops_u8.device)
        sigma = params[:, 10]
        for i in range(n):
            xi = src[i].to(dtype)
            o = torch.addmv(shift, off[i], xi.mean(dim=1))
            torch.addmm(o.view(3, 1), m[i], xi, out=y[i])
            for ch, (a, b) in enumerate(bounds):
                y[i, ch].clamp_(a, b)
            if sigma[i] > 0:   # blurred here too, while still in cache
                y[i] = _gaussian_blur(y[i].view(1, 3, h, w), sigma[i:i + 1]).view(3, h * w)
    else:
        x = src.to(dtype)
        mu = x.mean(dim=2).double().cpu()
        o = ((off @ mu.unsqueeze(-1)).squeeze(-1) + shift).to(crops_u8.device, dtype)
        y = torch.baddbmm(o.view(n, 3, 1), m.to(crops_u8.device, dtype), x)
        for ch, (a, b) in enumerate(bounds):
            y[:, ch].clamp_(a, b)
    x = y.view(n, 3, h, w)
    idx = torch.nonzero(params[:, 10] > 0).flatten()
    if idx.numel() and not per_crop:   # batched by radius (see _gaussian_blur)
        idx = idx.to(x.device)
        x[idx] = _gaussian_blur(x[idx], params[idx.cpu(), 10].to(x.device, dtype))
    return x


@dataclass
class CropBatch:
    """Crops of a batch grouped by resolution, in config order within each group.

    images[r]: [n_crops_r * B, 3, S_r, S_r], crop-major (all samples' crop 0, then crop 1, ...),
    uint8 until augmented; params[r]: matching [n_crops_r * B, N_PARAMS]; keys: sample keys.
    """

    images: list[torch.Tensor]
    params: list[torch.Tensor]
    keys: list[str]
    augmented: bool

    def augment(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        if self.augmented:
            return [im.to(device, non_blocking=True) if device is not None else im for im in self.images]
        out = []
        for im, p in zip(self.images, self.params):
            im = im.to(device, non_blocking=True) if device is not None else im
            out.append(photometric(im, p, dtype=dtype))
        return out
