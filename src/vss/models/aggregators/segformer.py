"""Single-frame SegFormer baseline: the all-MLP decoder on the target frame; references are ignored."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from vss.errors import ConfigError
from vss.models.aggregators.base import Aggregator, FrameFeatures
from vss.models.heads import SegFormerHead


class SegFormer(Aggregator):
    """SegFormer (Xie et al. 2021) as a degenerate aggregator: all work is per-frame."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        embed_dim: int = 256,
        dropout: float = 0.1,
        avg_non_ignore: bool = False,
        compile: bool = False,
        offsets: Sequence[int] = (),
    ) -> None:
        if tuple(offsets):
            raise ConfigError(f"model.offsets={list(offsets)}: SegFormer is a single-frame model, expected []")
        super().__init__(in_channels, num_classes, (), avg_non_ignore, compile)
        self.decode_head = SegFormerHead(in_channels, num_classes, embed_dim, dropout)

    def encode(self, feats: list[Tensor]) -> FrameFeatures:
        """Per-frame logits at 1/4 resolution."""
        return {"logits": self.decode_head(feats)}

    def aggregate(self, target: FrameFeatures, references: list[FrameFeatures]) -> dict[str, Tensor]:
        """The target's own logits (a single-frame model has no references)."""
        return {"logits": target["logits"]}
