"""Encoder + aggregator: the whole video segmentation model, split into per-frame and temporal work."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from vss.models.aggregators.base import Aggregator, FrameFeatures
from vss.models.encoders import Encoder


class Segmenter(nn.Module):
    """``encode`` (encoder + the aggregator's per-frame part, cacheable) then ``aggregate`` (temporal)."""

    def __init__(self, encoder: Encoder, aggregator: Aggregator | Callable[..., Aggregator], num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        if not isinstance(aggregator, Aggregator):  # a Hydra partial waiting for the encoder's channels
            aggregator = aggregator(in_channels=encoder.out_channels, num_classes=num_classes)
        self.aggregator = aggregator
        self.num_classes = int(num_classes)

    @property
    def uses_references(self) -> bool:
        """False for single-frame models, which skip the reference frames entirely."""
        return getattr(self.aggregator, "uses_references", True)

    def encode(self, frames: Tensor) -> FrameFeatures:
        """Per-frame features of a batch of frames (N,3,H,W); each depends on its own frame only."""
        return self.aggregator.encode(self.encoder(frames))

    def aggregate(self, target: FrameFeatures, references: Sequence[FrameFeatures]) -> dict[str, Tensor]:
        """Target logits (and auxiliary outputs) from cached per-frame features, references oldest first."""
        return self.aggregator.aggregate(target, list(references))

    def forward(self, clip: Tensor, single_frame: Tensor | None = None) -> dict[str, Tensor]:
        """Clip (B,T,3,H,W), target last -> outputs; all frames go through ``encode`` as one batch.

        ``single_frame`` (B,) bool marks samples whose target is predicted from its own frame alone (the
        start-of-video rule ``data.clip.start_rule=mrcfa``): their ``logits`` are the target's per-frame
        logits (its FrameFeatures ``logits``).
        """
        b, t = clip.shape[:2]
        if not self.uses_references:
            return self.aggregate(self.encode(clip[:, -1]), [])
        feats = self.encode(clip.flatten(0, 1))
        per_frame = [{k: v.unflatten(0, (b, t))[:, i] for k, v in feats.items()} for i in range(t)]
        return self.use_single_frame(self.aggregate(per_frame[-1], per_frame[:-1]), per_frame[-1], single_frame)

    @staticmethod
    def use_single_frame(
        outputs: dict[str, Tensor], target: FrameFeatures, single_frame: Tensor | None
    ) -> dict[str, Tensor]:
        """Replace ``logits`` by the target's per-frame logits where ``single_frame`` is true."""
        if single_frame is None:
            return outputs
        mask = torch.as_tensor(single_frame, dtype=torch.bool, device=outputs["logits"].device).view(-1)
        if not bool(mask.any()):
            return outputs
        if "logits" not in target:
            raise ValueError("single_frame samples need per-frame logits: the aggregator's encode() gives no 'logits'")
        own = target["logits"]
        if own.shape[-2:] != outputs["logits"].shape[-2:]:
            own = torch.nn.functional.interpolate(
                own, size=outputs["logits"].shape[-2:], mode="bilinear", align_corners=False
            )
        return {**outputs, "logits": torch.where(mask.view(-1, 1, 1, 1), own, outputs["logits"])}

    def losses(self, outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """The aggregator's named loss terms."""
        return self.aggregator.losses(outputs, labels)

    @torch.no_grad()
    def predict(self, clip: Tensor, size: Sequence[int], single_frame: Tensor | None = None) -> Tensor:
        """Class map (B,H,W) of the target at ``size``: bilinear upsampling of logits, then argmax."""
        logits = self(clip, single_frame)["logits"]
        logits = torch.nn.functional.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits.argmax(1)
