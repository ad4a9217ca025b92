"""Per-frame decoders. Parameter names follow the official SegFormer head so its checkpoints map 1:1."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vss.errors import ConfigError
from vss.models.ops.folded_decoder import FoldCache, Folded, folded_fuse


def pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 convolution as one matmul over the pixels: (B,C,H,W) in either memory layout -> contiguous (B,O,H,W).

    The channels-last input (what :meth:`SegFormerHead.fuse` gives) is read as a transposed operand, so no copy is
    made and the logits come out in the plain NCHW layout the resize to the label size wants.
    """
    b, _, h, w = x.shape
    weight = conv.weight.flatten(1).expand(b, -1, -1)
    if conv.bias is None:
        return torch.bmm(weight, x.flatten(2)).view(b, -1, h, w)
    return torch.baddbmm(conv.bias.view(1, -1, 1).expand(b, -1, h * w), weight, x.flatten(2)).view(b, -1, h, w)


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
        self._fold_cache = FoldCache()

    def fuse(self, feats: Sequence[Tensor]) -> Tensor:
        """Fused 1/4-resolution feature ``_c`` (after conv+BN+ReLU, before dropout), by the folded decoder.

        Each stage's embedding ``linear_c{i}`` followed by its slice of the 1x1 ``linear_fuse`` conv is one
        linear map M_i = W_fuse,i W_i applied at the stage's own resolution before the upsampling, instead of a
        (4E -> E) conv at 1/4 (the same function, :func:`vss.models.ops.folded_decoder.folded_fuse`; the official
        layout is :meth:`fuse_unfolded`). In eval mode BatchNorm is folded in too. The parameters stay the
        official ones; :meth:`folded` derives the maps from them.
        """
        return folded_fuse(feats, self.folded(), self.linear_fuse.bn)

    def fuse_unfolded(self, feats: Sequence[Tensor]) -> Tensor:
        """``_c`` as the official head computes it: embed, upsample to 1/4, concatenate, 1x1 conv + BN + ReLU."""
        size = feats[0].shape[2:]
        embedded = []
        for i in reversed(range(len(feats))):  # official concat order: c4, c3, c2, c1
            e = getattr(self, f"linear_c{i + 1}")(feats[i])
            if e.shape[2:] != size:
                e = F.interpolate(e.contiguous(), size=size, mode="bilinear", align_corners=False)  # see resize()
            embedded.append(e)
        return self.linear_fuse(torch.cat(embedded, dim=1))

    def folded(self) -> Folded:
        """The folded maps M_i, bias and whether BatchNorm is in them: recomputed at every call in training or
        when autograd records (gradients reach the official parameters), otherwise cached until the weights
        change (:class:`vss.models.ops.folded_decoder.FoldCache`)."""
        return self._fold_cache.get(self)

    def train(self, mode: bool = True) -> SegFormerHead:
        """``nn.Module.train``; training mode also drops the folded-weights cache (see :meth:`folded`)."""
        if mode:
            self._fold_cache.clear()
        return super().train(mode)

    def classify(self, fused: Tensor) -> Tensor:
        """Per-pixel class logits (NCHW) from the fused feature."""
        return pointwise(self.linear_pred, self.dropout(fused))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Logits at the resolution of the first feature map."""
        return self.classify(self.fuse(feats))


class PyramidPoolingBranch(nn.Sequential):
    """One PPM branch: ``AdaptiveAvgPool2d(scale)`` then 1x1 conv + BN + ReLU (mmseg ``PPM``: indices 0 and 1)."""

    def __init__(self, scale: int, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(scale), ConvBNReLU(in_ch, out_ch, 1))


class PSPHead(nn.Module):
    """PSPNet's pyramid pooling head (Zhao et al. 2017; mmseg ``PSPHead``): PPM, 3x3 bottleneck, classifier.

    Names give mmseg's state dict directly: ``psp_modules.{k}.1.conv/bn``, ``bottleneck.conv/bn``, ``conv_seg``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ConfigError(f"model.channels={channels!r} is invalid: expected a positive integer")
        try:
            scales = tuple(pool_scales)
        except TypeError:
            scales = ()
        if not scales or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in scales):
            raise ConfigError(
                f"model.pool_scales={pool_scales!r} is invalid: expected a non-empty list of positive integers"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout <= 1.0:
            raise ConfigError(f"model.dropout={dropout!r} is invalid: expected a probability in [0, 1]")
        self.in_channels = int(in_channels)
        self.channels = channels
        self.pool_scales = scales
        self.psp_modules = nn.ModuleList(PyramidPoolingBranch(s, self.in_channels, channels) for s in scales)
        self.bottleneck = ConvBNReLU(self.in_channels + len(scales) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def bottleneck_features(self, x: Tensor) -> Tensor:
        """(B, in_channels, h, w) -> the PSP feature (B, channels, h, w): concat [x, PPM s=1, 2, ...], 3x3 conv."""
        size = x.shape[2:]
        pooled = [
            F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False) for branch in self.psp_modules
        ]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def classify(self, feature: Tensor) -> Tensor:
        """``cls_seg``: Dropout2d then the 1x1 ``conv_seg`` -> (B, num_classes, h, w) logits."""
        return self.conv_seg(self.dropout(feature))

    def forward(self, x: Tensor) -> Tensor:
        """Logits at the input's resolution."""
        return self.classify(self.bottleneck_features(x))
