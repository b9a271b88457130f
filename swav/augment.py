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
N_PARAMS = 11   # jitter flag, 4 factors, 4 order slots, gray flag, blur sigma (0 = no blur)


def sample_photometric(rng: np.random.Generator) -> np.ndarray:
    """One crop's photometric parameters as a float32 vector (see N_PARAMS)."""
    b, c, s, h = JITTER
    out = np.zeros(N_PARAMS, np.float32)
    out[0] = rng.random() < P_JITTER
    out[1] = rng.uniform(max(0.0, 1 - b), 1 + b)
    out[2] = rng.uniform(max(0.0, 1 - c), 1 + c)
    out[3] = rng.uniform(max(0.0, 1 - s), 1 + s)
    out[4] = rng.uniform(-h, h)
    out[5:9] = rng.permutation(4)
    out[9] = rng.random() < P_GRAY
    out[10] = rng.uniform(*BLUR_SIGMA) if rng.random() < P_BLUR else 0.0
    return out


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * _gray(x)).clamp_(0, 1)


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    v = maxc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    h = (h + f.view(-1, 1, 1)) % 1.0
    i = torch.floor(h * 6.0)
    fr = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * fr), v * (1 - s * (1 - fr))
    i = i.long() % 6
    rgb = torch.stack([
        torch.stack([v, q, p, p, t, v], 1).gather(1, i.unsqueeze(1)).squeeze(1),
        torch.stack([t, v, v, q, p, p], 1).gather(1, i.unsqueeze(1)).squeeze(1),
        torch.stack([p, p, t, v, v, q], 1).gather(1, i.unsqueeze(1)).squeeze(1),
    ], 1)
    return rgb.clamp_(0, 1)


_OPS = (_brightness, _contrast, _saturation, _hue)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (one grouped convolution per axis)."""
    n, c, hgt, wid = x.shape
    radius = int(np.ceil(3 * float(sigma.max())))
    radius = max(1, min(radius, (min(hgt, wid) - 1) // 2))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)           # [n*c, 2r+1]
    y = x.reshape(1, n * c, hgt, wid)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, hgt, wid)


@torch.no_grad()
def photometric(crops_u8: torch.Tensor, params: torch.Tensor, normalize: bool = True,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Augment a batch of uint8 crops [N,3,H,W] with per-crop params [N, N_PARAMS]; float output."""
    x = crops_u8.to(dtype).div_(255.0)
    params = params.to(x.device, torch.float32)
    jitter = params[:, 0] > 0.5
    for slot in range(4):
        op_ids = params[:, 5 + slot].long()
        for op in range(4):
            idx = torch.nonzero(jitter & (op_ids == op)).flatten()
            if idx.numel():
                x[idx] = _OPS[op](x[idx], params[idx, 1 + op].to(dtype))
    idx = torch.nonzero(params[:, 9] > 0.5).flatten()
    if idx.numel():
        x[idx] = _gray(x[idx]).expand(-1, 3, -1, -1)
    idx = torch.nonzero(params[:, 10] > 0).flatten()
    if idx.numel():
        x[idx] = _gaussian_blur(x[idx], params[idx, 10].to(dtype))
    if normalize:
        mean = torch.tensor(MEAN, device=x.device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=x.device, dtype=dtype).view(1, 3, 1, 1)
        x = x.sub_(mean).div_(std)
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
