"""ResNet-50 trunks of any width (SwAV's w2/w4/w5 widen every layer), projection head, prototypes.

Parameter names follow torchvision's ResNet (conv1, bn1, layer1..4), so the
resnet50 trunk loads into ``torchvision.models.resnet50`` and export to the
reference release's names is a prefix change.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck

from swav_io.errors import UserError

_ARCH = re.compile(r"^resnet50(?:w(\d+(?:\.\d+)?))?$")
_REFERENCE_HIDDEN = {1.0: 2048, 2.0: 8192, 4.0: 8192, 5.0: 10240}


def parse_width(arch: str) -> float:
    m = _ARCH.match(arch)
    if not m:
        raise UserError(f"unknown model.arch {arch!r}: use resnet50, resnet50w2, resnet50w4, resnet50w5 or e.g. resnet50w0.25")
    return float(m.group(1)) if m.group(1) else 1.0


class ResNetTrunk(nn.Module):
    """ResNet-50 up to global average pooling; returns pooled features [B, 2048*width]."""

    def __init__(self, width: float = 1.0, layers: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        base = int(64 * width)
        if base < 1:
            raise UserError(f"width {width} gives no channels")
        self.inplanes = base
        self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(base, layers[0])
        self.layer2 = self._make_layer(base * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(base * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(base * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_dim = base * 8 * Bottleneck.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_trunk(name: str) -> nn.Module:
    """A ResNet-50 trunk by name (resnet50, resnet50w2, resnet50w4, resnet50w5, resnet50w0.25, ...)."""
    return ResNetTrunk(parse_width(name))


def reference_hidden(arch: str) -> int:
    w = parse_width(arch)
    return _REFERENCE_HIDDEN.get(w, max(16, int(2048 * w)))


class MultiPrototypes(nn.Module):
    """Several prototype heads (one Linear per K)."""

    def __init__(self, feat_dim: int, ks: list[int]):
        super().__init__()
        for i, k in enumerate(ks):
            self.add_module(f"prototypes{i}", nn.Linear(feat_dim, k, bias=False))
        self.n = len(ks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [getattr(self, f"prototypes{i}")(x) for i in range(self.n)]


class SwAVModel(nn.Module):
    """Trunk -> projection head -> L2 norm -> prototypes.

    forward(crops) takes a list of crop batches (any order; consecutive equal
    resolutions are concatenated and go through the trunk together) and returns
    (embeddings [N, feat_dim], scores [N, K] or a list of them), rows in crop order.
    """

    def __init__(self, arch: str = "resnet50", hidden_mlp: int = 0, feat_dim: int = 128,
                 num_prototypes: int | list[int] = 3000):
        super().__init__()
        self.trunk = build_trunk(arch)
        dim = self.trunk.out_dim
        hidden = hidden_mlp or reference_hidden(arch)
        if feat_dim <= 0:
            self.projection_head = nn.Identity()
            feat_dim = dim
        else:
            self.projection_head = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                                 nn.Linear(hidden, feat_dim))
        ks = num_prototypes if isinstance(num_prototypes, list) else [num_prototypes]
        self.prototypes = (MultiPrototypes(feat_dim, ks) if isinstance(num_prototypes, list)
                           else nn.Linear(feat_dim, num_prototypes, bias=False))
        self.num_prototypes = ks

    def prototype_weights(self) -> list[nn.Parameter]:
        if isinstance(self.prototypes, MultiPrototypes):
            return [getattr(self.prototypes, f"prototypes{i}").weight for i in range(self.prototypes.n)]
        return [self.prototypes.weight]

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        for w in self.prototype_weights():
            w.copy_(F.normalize(w.data.float(), dim=1, p=2).to(w.dtype))

    def features(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Trunk features of all crops, one trunk pass per run of equal resolution."""
        outs, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            outs.append(self.trunk(torch.cat(crops[start:end]) if end - start > 1 else crops[start]))
            start = end
        return torch.cat(outs)

    def forward(self, crops: list[torch.Tensor] | torch.Tensor, queue: list[torch.Tensor] | None = None):
        """(embeddings, scores), and with `queue` (past embeddings, one [L, D] tensor per assignment
        crop) also their scores against each head's prototypes, without gradient: [head][crop] -> [L, K].

        Queue scores are computed here, not by the caller, because under ZeRO-3 the prototypes are
        whole only inside the forward; outside it a rank may hold an empty slice of them.
        """
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        emb = self.projection_head(self.features(crops))
        emb = F.normalize(emb.float(), dim=1, p=2)
        # Scores stay fp32 whatever the autocast dtype: Sinkhorn and the softmax need the range.
        with torch.autocast(device_type=emb.device.type, enabled=False):
            if isinstance(self.prototypes, MultiPrototypes):
                weights = [w.float() for w in self.prototype_weights()]
                scores = [F.linear(emb, w) for w in weights]
            else:
                weights = [self.prototypes.weight.float()]
                scores = F.linear(emb, weights[0])
            if queue is None:
                return emb, scores
            with torch.no_grad():
                queued = [[F.linear(rows.float(), w.detach()) for rows in queue] for w in weights]
        return emb, scores, queued
