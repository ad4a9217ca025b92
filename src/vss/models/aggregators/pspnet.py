"""Single-frame PSPNet baseline (Zhao et al. 2017; mmseg PSPNet R50-D8): PSPHead on the last encoder feature.

STF+MAR's base network (ST_Memory: ``pspnet_r50-d8``, encoder ``resnet50c``); its checkpoints import with
``python -m vss.convert --model pspnet --src pspnet_r50-d8.pth --dst pspnet.ckpt`` (:meth:`PSPNet.import_official`).
mmseg's auxiliary FCN head (on layer3) is not built: ST_Memory never uses it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vss.errors import ConfigError
from vss.models.aggregators.base import Aggregator, FrameFeatures
from vss.models.heads import PSPHead

if TYPE_CHECKING:
    from vss.checkpoint import ImportResult


class PSPNet(Aggregator):
    """PSPNet as a degenerate aggregator: all work is per-frame (logits at the last feature's resolution, 1/8)."""

    @classmethod
    def import_official(cls, state_dict: dict[str, Tensor]) -> ImportResult:
        """An mmseg PSPNet R50-D8 checkpoint (:func:`import_official_checkpoint`)."""
        return import_official_checkpoint(state_dict)

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        avg_non_ignore: bool = False,
        compile: bool = False,
        offsets: Sequence[int] = (),
    ) -> None:
        if tuple(offsets):
            raise ConfigError(f"model.offsets={list(offsets)}: PSPNet is a single-frame model, expected []")
        super().__init__(in_channels, num_classes, (), avg_non_ignore, compile)
        self.decode_head = PSPHead(self.in_channels[-1], num_classes, channels, pool_scales, dropout)

    def encode(self, feats: list[Tensor]) -> FrameFeatures:
        """Per-frame logits from the deepest encoder feature (mmseg ``in_index=3``)."""
        return {"logits": self.decode_head(feats[-1])}

    def aggregate(self, target: FrameFeatures, references: list[FrameFeatures]) -> dict[str, Tensor]:
        """The target's own logits (a single-frame model has no references)."""
        return {"logits": target["logits"]}


# -- official (mmseg) checkpoints ------------------------------------------------------------------------
# An mmseg PSPNet R50-D8 ``state_dict`` holds ``backbone.*`` (ResNetV1c, renamed to timm's resnet50c by
# :func:`vss.models.encoders.convert_resnet_v1c_checkpoint`), ``decode_head.*`` (PSPHead: the same names as
# :class:`vss.models.heads.PSPHead`) and ``auxiliary_head.*`` (the FCN head, dropped).

#: Official key prefixes left out on purpose: the auxiliary FCN head, which ST_Memory never uses.
DROPPED = ("auxiliary_head.",)
_HEAD_KEY = re.compile(r"(psp_modules\.\d+\.1\.(conv|bn)|bottleneck\.(conv|bn)|conv_seg)\.[a-z_]+")


def pspnet_keys(
    state_dict: dict[str, Tensor], head_prefix: str = "aggregator.decode_head."
) -> tuple[dict[str, Tensor], dict[str, str], list[str], list[str]]:
    """Official mmseg PSPNet keys -> Segmenter keys: ``backbone.*`` -> ``encoder.body.*``, ``decode_head.*`` ->
    ``head_prefix`` + the same name.

    Returns the converted tensors, the official name of each converted key, the dropped keys
    (:data:`DROPPED`) and the keys with no counterpart. BatchNorm's ``num_batches_tracked`` (absent from old
    files; it does not affect outputs) is added as 0 where a BN lacks it.
    """
    from vss.models.encoders import convert_resnet_v1c_checkpoint

    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for k, v in state_dict.items():
        if k.startswith(DROPPED):
            dropped.append(k)
        elif k.startswith("backbone."):
            ((new, tensor),) = convert_resnet_v1c_checkpoint({k[len("backbone.") :]: v}).items()
            out[f"encoder.body.{new}"], origin[f"encoder.body.{new}"] = tensor, k
        elif k.startswith("decode_head.") and _HEAD_KEY.fullmatch(k[len("decode_head.") :]):
            new = head_prefix + k[len("decode_head.") :]
            out[new], origin[new] = v, k
        else:
            unknown.append(k)
    for k in [k for k in out if k.endswith(".running_mean")]:
        counter = k.removesuffix("running_mean") + "num_batches_tracked"
        out.setdefault(counter, torch.tensor(0, dtype=torch.long))
    return out, origin, sorted(dropped), sorted(unknown)


def check_resnet50_v1c(state_dict: dict[str, Tensor]) -> None:
    """Raise ConfigError unless ``backbone.*`` is an mmseg ResNetV1c of depth 50 (deep stem, blocks 3-4-6-3)."""
    if "backbone.stem.0.weight" not in state_dict:
        found = "a 7x7 stem (ResNetV1b, timm resnet50)" if "backbone.conv1.weight" in state_dict else "none"
        raise ConfigError(f"expected an mmseg ResNetV1c backbone (backbone.stem.0.weight, deep stem); found {found}")
    depths = tuple(
        len({k.split(".")[2] for k in state_dict if k.startswith(f"backbone.layer{i}.")}) for i in range(1, 5)
    )
    if depths != (3, 4, 6, 3) or "backbone.layer1.0.conv3.weight" not in state_dict:
        raise ConfigError(f"backbone has blocks {depths}: only ResNet-50 V1c (3, 4, 6, 3; encoder=resnet50c) is built")


def import_official_checkpoint(state_dict: dict[str, Tensor]) -> ImportResult:
    """An mmseg PSPNet R50-D8 (or ST_Memory ``psp50_trained.pth``) ``state_dict`` -> Segmenter tensors + config.

    Read from the tensors: the number of classes (``conv_seg``; any count, e.g. 150 for ADE20K) and the head
    width (``bottleneck``). vss.convert picks the data set and class names from the count and the ``meta``
    (19: ``data=cityscapes_video``).
    """
    from vss.checkpoint import ImportResult

    check_resnet50_v1c(state_dict)
    if "decode_head.conv_seg.weight" not in state_dict or "decode_head.bottleneck.conv.weight" not in state_dict:
        raise ConfigError("decode_head.conv_seg.weight / decode_head.bottleneck.conv.weight missing (no PSPHead)")
    num_classes = int(state_dict["decode_head.conv_seg.weight"].shape[0])
    channels = int(state_dict["decode_head.bottleneck.conv.weight"].shape[0])
    converted, origin, dropped, unknown = pspnet_keys(state_dict)
    return ImportResult(
        state_dict=converted,
        overrides=[
            "model=pspnet",
            "encoder=resnet50c",
            f"data.num_classes={num_classes}",
            f"model.channels={channels}",
        ],
        origin=origin,
        dropped=dropped,
        unknown=unknown,
    )
