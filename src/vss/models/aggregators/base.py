"""The interface every temporal model implements: per-frame ``encode`` and temporal ``aggregate``."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from vss.data.vspw import IGNORE_INDEX

FrameFeatures = dict[str, Tensor]
"""What a method computes from one frame alone (batched): cacheable and reused when the frame is a reference."""


def resize(x: Tensor, size: Sequence[int], align_corners: bool = False) -> Tensor:
    """Bilinear resize of a (B,C,H,W) map to ``size``; the map itself when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def cross_entropy(logits: Tensor, labels: Tensor, avg_non_ignore: bool = False) -> Tensor:
    """Pixel cross-entropy with ignore 255; logits are resized (bilinear) to the label size first.

    ``avg_non_ignore=False`` is mmseg 0.x (the official MRCFA/SegFormer code): the mean runs over all
    pixels, ignored ones included in the denominator. ``True`` averages over labelled pixels only.
    """
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if avg_non_ignore:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none").mean()


class Aggregator(nn.Module):
    """Temporal model on top of an encoder.

    ``encode`` sees one frame's encoder features and returns its :data:`FrameFeatures`; it must not
    look at other frames, so features can be cached and reused in streaming inference.
    ``aggregate`` combines the target's features with the references' (oldest first) and returns a
    dict with at least ``logits`` (the target's prediction, any resolution) and any auxiliary outputs
    its ``losses`` need.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, avg_non_ignore: bool = False) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.num_classes = int(num_classes)
        self.avg_non_ignore = bool(avg_non_ignore)

    def encode(self, feats: list[Tensor]) -> FrameFeatures:
        """Per-frame work on a batch of frames."""
        raise NotImplementedError

    def aggregate(self, target: FrameFeatures, references: list[FrameFeatures]) -> dict[str, Tensor]:
        """Temporal work: the target's logits (and auxiliary outputs)."""
        raise NotImplementedError

    def losses(self, outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """Named loss terms; ``labels`` is (B,T,H,W) for the whole clip, target last. Default: CE on the target."""
        return {"ce": cross_entropy(outputs["logits"], labels[:, -1], self.avg_non_ignore)}
