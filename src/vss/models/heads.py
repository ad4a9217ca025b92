"""Per-frame decoders. Parameter names follow the official SegFormer head so its checkpoints map 1:1."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vss.config import ConfigError


class MLP(nn.Module):
    """Channel-wise linear embedding of a feature map (official ``MLP``: ``proj``)."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B,C,H,W) -> (B,E,H,W)."""
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(x.shape[0], -1, *x.shape[2:])


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU, named ``conv``/``bn`` as mmcv's ConvModule."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.activate = nn.ReLU(inplace=True)


class SegFormerHead(nn.Module):
    """SegFormer all-MLP decoder (Xie et al. 2021, eq. 1): embed c1..c4, upsample to 1/4, fuse, classify."""

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
            raise ConfigError(f"model.embed_dim={embed_dim!r} is invalid: expected a positive integer")
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout <= 1.0:
            raise ConfigError(f"model.dropout={dropout!r} is invalid: expected a probability in [0, 1]")
        self.in_channels = list(in_channels)
        for i, c in enumerate(self.in_channels, start=1):
            setattr(self, f"linear_c{i}", MLP(c, embed_dim))
        self.linear_fuse = ConvBNReLU(embed_dim * len(self.in_channels), embed_dim, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def fuse(self, feats: Sequence[Tensor]) -> Tensor:
        """Fused 1/4-resolution feature ``_c`` (after conv+BN+ReLU, before dropout)."""
        size = feats[0].shape[2:]
        embedded = []
        for i in reversed(range(len(feats))):  # official concat order: c4, c3, c2, c1
            e = getattr(self, f"linear_c{i + 1}")(feats[i])
            if e.shape[2:] != size:
                e = F.interpolate(e.contiguous(), size=size, mode="bilinear", align_corners=False)  # see resize()
            embedded.append(e)
        return self.linear_fuse(torch.cat(embedded, dim=1))

    def classify(self, fused: Tensor) -> Tensor:
        """Per-pixel class logits from the fused feature."""
        return self.linear_pred(self.dropout(fused))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Logits at the resolution of the first feature map."""
        return self.classify(self.fuse(feats))
