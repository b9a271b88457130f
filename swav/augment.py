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


_LUMA = (0.299, 0.587, 0.114)
# YIQ: hue is a rotation of the chroma plane (I, Q) around the luma axis.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                        dtype=torch.float64)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def colour_matrices(params: torch.Tensor, mean_rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per crop, the affine colour map (M [N,3,3], o [N,3]) of jitter (in its sampled order) then grayscale.

    Every SwAV colour op is affine in RGB: brightness scales, saturation and grayscale mix with luma,
    contrast mixes with the image's mean luma (known exactly from the mean colour), and hue is a
    rotation about the grey axis (done in YIQ). Composing them costs nothing per pixel, so a crop is
    transformed with one 3x3 multiply and a single clamp, instead of four passes with a clamp after
    each as torchvision does; and hue is YIQ's rotation rather than HSV's (the usual fast variant).
    """
    n = params.shape[0]
    p = params.double()
    eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
    w = torch.tensor(_LUMA, dtype=torch.float64)
    luma = torch.ones(3, 1, dtype=torch.float64) @ w.view(1, 3)          # every channel := luma
    m, o = eye.clone(), torch.zeros(n, 3, dtype=torch.float64)
    mu = mean_rgb.double()
    jitter = p[:, 0] > 0.5
    for slot in range(4):
        op = p[:, 5 + slot].long()
        for kind in range(4):
            sel = jitter & (op == kind)
            if not sel.any():
                continue
            f = p[sel, 1 + kind].view(-1, 1, 1)
            if kind == 0:      # brightness
                a, b = f * eye[sel], torch.zeros(int(sel.sum()), 3, dtype=torch.float64)
            elif kind == 1:    # contrast: towards the mean luma of the image as it is now
                cur = (m[sel] @ mu[sel].unsqueeze(-1)).squeeze(-1) + o[sel]
                a = f * eye[sel]
                b = ((1 - f.view(-1, 1)) * (cur @ w).view(-1, 1)).expand(-1, 3)
            elif kind == 2:    # saturation
                a, b = f * eye[sel] + (1 - f) * luma, torch.zeros(int(sel.sum()), 3, dtype=torch.float64)
            else:              # hue
                theta = -2 * torch.pi * p[sel, 4]  # the sign that turns hues the way HSV does
                c, s_ = torch.cos(theta), torch.sin(theta)
                rot = torch.zeros(int(sel.sum()), 3, 3, dtype=torch.float64)
                rot[:, 0, 0] = 1
                rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s_, s_, c
                a, b = _YIQ2RGB @ rot @ _RGB2YIQ, torch.zeros(int(sel.sum()), 3, dtype=torch.float64)
            m[sel] = a @ m[sel]
            o[sel] = (a @ o[sel].unsqueeze(-1)).squeeze(-1) + b
    gray = p[:, 9] > 0.5
    if gray.any():
        m[gray] = luma @ m[gray]
        o[gray] = (luma @ o[gray].unsqueeze(-1)).squeeze(-1)
    return m.float(), o.float()


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, each image with its own sigma (radius 3 sigma, reflected borders).

    Each pass is a weighted sum of shifted views (2r+1 fused multiply-adds over the image): on CPU
    this beats both a grouped convolution over the batch and per-image depthwise convolutions.
    """
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    limit = max(1, (min(h, w) - 1) // 2)
    for i, s in enumerate(sigma.tolist()):
        r = max(1, min(int(np.ceil(3 * s)), limit))
        t = np.arange(-r, r + 1, dtype=np.float64)
        k = np.exp(-(t ** 2) / (2 * s * s))
        k = (k / k.sum()).tolist()
        z = F.pad(x[i:i + 1], (r, r, 0, 0), mode="reflect")[0]
        row = z[..., 0:w] * k[0]
        for j in range(1, 2 * r + 1):
            row.add_(z[..., j:j + w], alpha=k[j])
        z = F.pad(row.unsqueeze(0), (0, 0, r, r), mode="reflect")[0]
        col = z[:, 0:h, :] * k[0]
        for j in range(1, 2 * r + 1):
            col.add_(z[:, j:j + h, :], alpha=k[j])
        out[i] = col
    return out


@torch.no_grad()
def photometric(crops_u8: torch.Tensor, params: torch.Tensor, normalize: bool = True,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Augment a batch of uint8 crops [N,3,H,W] with per-crop params [N, N_PARAMS]; float output."""
    n = crops_u8.shape[0]
    params = params.to(torch.float32).cpu()
    x = crops_u8.to(dtype)
    mean_rgb = x.mean(dim=(2, 3)).double().cpu() / 255.0
    m, o = colour_matrices(params, mean_rgb)
    lo, hi = torch.zeros(3, 1), torch.ones(3, 1)
    if normalize:
        # Normalisation is per-channel affine: fold it into the colour map and the clamp bounds, and
        # apply the (linear, per-channel) blur afterwards; same result, two passes fewer per crop.
        mean, std = torch.tensor(MEAN).view(3, 1), torch.tensor(STD).view(3, 1)
        m, o = m / std.view(1, 3, 1), (o - mean.view(1, 3)) / std.view(1, 3)
        lo, hi = (lo - mean) / std, (hi - mean) / std
    m, o = (m / 255.0).to(x.device, dtype), o.to(x.device, dtype)
    y = torch.baddbmm(o.view(n, 3, 1), m, x.view(n, 3, -1))
    x = y.clamp_(lo.to(x.device, dtype), hi.to(x.device, dtype)).view_as(x)
    idx = torch.nonzero(params[:, 10] > 0).flatten()
    if idx.numel():
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
