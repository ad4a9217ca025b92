"""The interface every temporal model implements: per-frame ``encode`` and temporal ``aggregate``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vss.config import target_class
from vss.errors import IGNORE_INDEX, ConfigError
from vss.models.ops.classes import class_map
from vss.models.ops.cross_entropy import banded_cross_entropy
from vss.offsets import check_offsets, clamp_references

if TYPE_CHECKING:
    from vss.checkpoint import ImportResult

__all__ = [
    "AGGREGATOR_PREFIX",
    "Aggregator",
    "FrameFeatures",
    "aggregator_class",
    "check_offsets",
    "clamp_references",
    "class_map",
    "cross_entropy",
    "resize",
]

FrameFeatures = dict[str, Tensor]
"""What a method computes from one frame alone (batched): cacheable and reused when the frame is a reference."""


def resize(x: Tensor, size: Sequence[int], align_corners: bool = False) -> Tensor:
    """Bilinear resize of a (B,C,H,W) map to ``size``; the map itself when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    # a channels-last map (what a conv after a token MLP gives) is copied first: torch's CPU bilinear kernel is
    # about 6x slower on that layout for many channels (124-class logits to 480x854: 0.81 s vs 0.13 s)
    return F.interpolate(x.contiguous(), size=tuple(size), mode="bilinear", align_corners=align_corners)


def cross_entropy(logits: Tensor, labels: Tensor, avg_non_ignore: bool = False) -> Tensor:
    """Pixel cross-entropy with ignore 255; logits are resized (bilinear) to the label size first.

    ``avg_non_ignore=False`` is mmseg 0.x (the official MRCFA/SegFormer code): the mean runs over all
    pixels, ignored ones included in the denominator. ``True`` averages over labelled pixels only. In training
    (a gradient to take, not under ``torch.compile``) the resize and the loss run in bands of rows
    (:func:`vss.models.ops.cross_entropy.banded_cross_entropy`: the same function without the full-size maps).
    """
    resized = logits.shape[-2:] != labels.shape[-2:]
    if resized and logits.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return banded_cross_entropy(logits, labels, IGNORE_INDEX, avg_non_ignore)
    if resized:
        logits = F.interpolate(logits.contiguous(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if avg_non_ignore:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none").mean()


AGGREGATOR_PREFIX = "vss.models.aggregators."
"""Where ``model._target_`` may point: a config (or a checkpoint's stored config) names no other class."""


def aggregator_class(target: Any, key: str = "model._target_") -> type[Aggregator]:
    """The :class:`Aggregator` subclass that ``model._target_`` names: what shared code asks the method protocol."""
    return target_class(target, key, AGGREGATOR_PREFIX, Aggregator)


class Aggregator(nn.Module):
    """Temporal model on top of an encoder.

    The clip belongs to the model: ``offsets`` says where each reference frame sits relative to the target
    (any sign, no 0), in the order ``aggregate`` receives them; ``()`` for single-frame models. A stream
    waits ``lookahead = max(0, *offsets)`` frames before it can predict a target.

    ``encode`` sees one frame's encoder features and returns its :data:`FrameFeatures`; it must not look at
    other frames, so features can be cached and reused in streaming inference. ``aggregate`` combines the
    target's features with the references' and returns a dict with at least ``logits`` (the target's
    prediction, any resolution) and any auxiliary outputs its ``losses`` need. ``aggregate(target, [])``
    predicts the target from its own frame alone, or raises :class:`vss.errors.ConfigError` where the
    method cannot. ``references`` is the start-of-video policy (which frames serve as references of each
    target); the default clamps the offsets into the video. Outputs that only the training loss reads are
    left out at inference (:meth:`wants_training_outputs`), and :meth:`reference_features` says what a stream
    must keep of a frame that will only be read as a reference. ``compile=True`` (``model.compile``) runs
    ``aggregate`` through ``torch.compile`` (see :meth:`vss.models.segmenter.Segmenter.aggregate`).

    **The method protocol**: what shared code asks of a method, through the class that ``model._target_``
    names (:func:`aggregator_class`), each with a default a method overrides in its own file:
    :meth:`check_config` (config-time checks of a composed training config), :meth:`single_frame_baseline`
    (what ``vss.bench baseline=true`` times next to it), :meth:`import_official` (``vss.convert``).
    """

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """The method's own checks of a composed training config, before anything is built (default: none).

        Raise :class:`vss.errors.ConfigError` naming the key; a key the config does not set is not checked."""

    @classmethod
    def single_frame_baseline(cls, model_cfg: Mapping[str, Any]) -> Callable[..., Aggregator] | None:
        """The honest single-frame counterpart (a factory taking ``in_channels``, ``num_classes``) that
        ``vss.bench baseline=true`` times next to the method; None when there is none (default), and for a
        model that is itself single-frame: the bench then says so."""
        return None

    @classmethod
    def import_official(cls, state_dict: dict[str, Tensor]) -> ImportResult:
        """An official checkpoint's ``state_dict`` -> this suite's tensors and the overrides they imply
        (``vss.convert``). Default: the method has no importer."""
        raise ConfigError(
            f"{cls.__module__}.{cls.__name__} has no importer of official checkpoints: override "
            "Aggregator.import_official(state_dict) -> vss.checkpoint.ImportResult in its file"
        )

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        offsets: Sequence[int] = (),
        avg_non_ignore: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(avg_non_ignore, bool):
            raise ConfigError(f"model.avg_non_ignore={avg_non_ignore!r} is invalid: expected true or false")
        if not isinstance(compile, bool):
            raise ConfigError(f"model.compile={compile!r} is invalid: expected true or false")
        self.compile_aggregate = compile
        self.in_channels = list(in_channels)
        self.num_classes = int(num_classes)
        self.offsets = check_offsets(offsets)
        self.avg_non_ignore = bool(avg_non_ignore)

    @property
    def lookahead(self) -> int:
        """Frames after the target that a stream must see before predicting it."""
        return max((0, *self.offsets))

    def references(self, t: int, length: int | None) -> list[int]:
        """Frame indices of target ``t``'s references (``aggregate`` order); ``[]``: the target alone.

        ``length`` is the video's length, or None while a stream has not reached its end. Default: the
        offsets clamped into the video (the first / last frame repeats).
        """
        return clamp_references(self.offsets, t, length)

    def encode(self, feats: list[Tensor]) -> FrameFeatures:
        """Per-frame work on a batch of frames."""
        raise NotImplementedError

    def aggregate(self, target: FrameFeatures, references: list[FrameFeatures]) -> dict[str, Tensor]:
        """Temporal work: the target's logits (and auxiliary outputs)."""
        raise NotImplementedError

    def reference_features(self, features: FrameFeatures) -> FrameFeatures:
        """The part of a frame's features that inference reads once the frame is only a reference (a stream
        keeps just this after the frame was predicted). Default: all of them."""
        return features

    def wants_training_outputs(self) -> bool:
        """Whether ``aggregate`` should add the outputs only ``losses`` reads: in training mode or while autograd
        records (a loss may follow); never under ``no_grad`` / ``inference_mode`` in eval mode."""
        return self.training or torch.is_grad_enabled()

    def losses(self, outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """Named loss terms; ``labels`` is (B,T,H,W) for the whole clip, target last. Default: CE on the target."""
        return {"ce": cross_entropy(outputs["logits"], labels[:, -1], self.avg_non_ignore)}
