"""Encoder + aggregator: the whole video segmentation model, split into per-frame and temporal work."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from vss.errors import ConfigError
from vss.models.aggregators.base import Aggregator, FrameFeatures, resize
from vss.models.encoders import Encoder
from vss.models.ops.classes import upsampled_class_map
from vss.models.ops.normalize import normalize_frames


class Segmenter(nn.Module):
    """``encode`` (encoder + the aggregator's per-frame part, cacheable) then ``aggregate`` (temporal).

    The clip is the aggregator's: ``offsets`` (references relative to the target, in ``aggregate`` order),
    ``lookahead`` and the start-of-video policy ``references``. ``freeze`` lists module prefixes (e.g.
    ``encoder``, ``aggregator.decode_head``) whose parameters get no gradient and which stay in eval mode
    through ``train()`` (BatchNorm statistics and dropout frozen).
    """

    def __init__(
        self,
        encoder: Encoder,
        aggregator: Aggregator | Callable[..., Aggregator],
        num_classes: int,
        freeze: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.encoder = encoder
        if not isinstance(aggregator, Aggregator):  # a Hydra partial waiting for the encoder's channels
            aggregator = aggregator(in_channels=encoder.out_channels, num_classes=num_classes)
        self.aggregator = aggregator
        self.num_classes = int(num_classes)
        self.frozen = self._frozen_modules(freeze)
        for module in self.frozen.values():
            module.requires_grad_(False)
        self.train(self.training)

    # -- the clip ------------------------------------------------------------------------------------
    @property
    def offsets(self) -> tuple[int, ...]:
        """Where each reference sits relative to the target, in the order ``aggregate`` receives them."""
        return self.aggregator.offsets

    @property
    def lookahead(self) -> int:
        """Frames after the target a stream waits for (0 for causal models)."""
        return self.aggregator.lookahead

    def references(self, t: int, length: int | None) -> list[int]:
        """The model's start-of-video policy: reference frame indices of target ``t`` (``[]``: alone)."""
        return self.aggregator.references(t, length)

    # -- staged training -----------------------------------------------------------------------------
    def _frozen_modules(self, prefixes: Sequence[str]) -> dict[str, nn.Module]:
        names = dict(self.named_modules())
        frozen: dict[str, nn.Module] = {}
        for prefix in prefixes:
            prefix = str(prefix).rstrip(".")
            if prefix not in names or not prefix:
                close = difflib.get_close_matches(prefix, [n for n in names if n], n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"freeze: {prefix!r} is not a module of the model (e.g. encoder, aggregator){hint}")
            frozen[prefix] = names[prefix]
        return frozen

    def train(self, mode: bool = True) -> Segmenter:
        """``nn.Module.train``, but frozen parts stay in eval mode."""
        super().train(mode)
        for module in getattr(self, "frozen", {}).values():
            module.eval()
        return self

    # -- per frame and temporal ----------------------------------------------------------------------
    def normalize(self, frames: Tensor, valid: Tensor | None = None) -> Tensor:
        """uint8 frames -> ImageNet-normalised floats in the model's parameter dtype (padding beyond ``valid`` zeroed);
        float frames are taken as already normalised (:func:`vss.models.ops.normalize.normalize_frames`)."""
        if frames.is_floating_point():
            return frames
        param = next(self.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else None
        return normalize_frames(frames, valid, dtype)

    def encode(self, frames: Tensor) -> FrameFeatures:
        """Per-frame features of frames (N,3,H,W), uint8 or normalised; each depends on its own frame only."""
        return self.aggregator.encode(self.encoder(self.normalize(frames)))

    def aggregate(self, target: FrameFeatures, references: Sequence[FrameFeatures]) -> dict[str, Tensor]:
        """Target logits (and auxiliary outputs) from per-frame features, references in ``offsets`` order.

        With ``model.compile=true`` the aggregator's ``aggregate`` runs through ``torch.compile`` (compiled on the
        first call; a new number of references or input size recompiles once).
        """
        if not getattr(self.aggregator, "compile_aggregate", False):
            return self.aggregator.aggregate(target, list(references))
        compiled = self.__dict__.get("_compiled_aggregate")
        if compiled is None:
            compiled = self.__dict__["_compiled_aggregate"] = torch.compile(self.aggregator.aggregate)
        return compiled(target, list(references))

    def forward(self, clip: Tensor) -> dict[str, Tensor]:
        """Clip (B,T,3,H,W), uint8 or normalised: the references in ``offsets`` order, target last -> outputs (the clip
        path). Every frame of the clip goes through ``encode`` in one batch. T = 1 predicts the target alone.
        """
        b, t = clip.shape[:2]
        feats = self.encode(clip.flatten(0, 1))
        # unbind: one backward node stacks the frames' gradients; indexing each frame ([:, i]) made T zero-filled
        # (B,T,...) gradients per feature and added them (the same values, T times the memory traffic)
        split = {k: v.unflatten(0, (b, t)).unbind(1) for k, v in feats.items()}
        per_frame = [{k: v[i] for k, v in split.items()} for i in range(t)]
        return self.aggregate(per_frame[-1], per_frame[:-1])

    def reference_features(self, features: FrameFeatures) -> FrameFeatures:
        """What inference still reads of a frame that will only be a reference (the aggregator's choice)."""
        return self.aggregator.reference_features(features)

    def losses(self, outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """The aggregator's named loss terms."""
        return self.aggregator.losses(outputs, labels)

    @torch.no_grad()
    def clip_logits(self, clip: Tensor, num_references: Tensor | Sequence[int] | None = None) -> Tensor:
        """Target logits of padded evaluation clips (B,T,3,H,W) whose sample i reads its last
        ``num_references[i]`` frames before the target (the policy's count; None: all T-1)."""
        b, t = clip.shape[:2]
        counts = [t - 1] * b if num_references is None else [int(n) for n in num_references]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(counts):
            groups.setdefault(n, []).append(i)
        if len(groups) == 1:
            (n,) = groups
            return self(clip[:, t - 1 - n :])["logits"]
        parts = {n: self(clip[idx, t - 1 - n :])["logits"] for n, idx in groups.items()}
        size = max((p.shape[-2:] for p in parts.values()), key=lambda s: s[0] * s[1])
        out = torch.empty(b, self.num_classes, *size, dtype=next(iter(parts.values())).dtype, device=clip.device)
        for n, idx in groups.items():
            out[idx] = resize(parts[n], size)
        return out

    @torch.no_grad()
    def predict(
        self, clip: Tensor, size: Sequence[int], num_references: Tensor | Sequence[int] | None = None
    ) -> Tensor:
        """Class map (B,H,W) of the clips' targets at ``size``: bilinear upsampling of logits, then argmax (block
        by block: :func:`vss.models.ops.classes.upsampled_class_map`)."""
        return upsampled_class_map(self.clip_logits(clip, num_references), size)
