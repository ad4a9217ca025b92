"""The STF+MAR aggregator (PSPNet + STF, + MAR with ``mar=true``) and its single-frame baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vss.errors import ConfigError
from vss.models.aggregators.base import Aggregator, FrameFeatures
from vss.models.aggregators.stf_mar.checks import check_train_config, positive_int
from vss.models.aggregators.stf_mar.mar import MemoryAugmentedRefinement
from vss.models.aggregators.stf_mar.memory import load_memory
from vss.models.aggregators.stf_mar.official import import_official_checkpoint
from vss.models.aggregators.stf_mar.stf import SpatialTemporalFusion
from vss.models.heads import PSPHead

if TYPE_CHECKING:
    from vss.checkpoint import ImportResult


class STFMAR(Aggregator):
    """PSPNet + STF (+ MAR with ``mar=true``); see the package docstring (vss.models.aggregators.stf_mar).

    ``aggregate`` returns ``logits`` (1/8) and ``features``, the STF output before MAR (what the memory pass
    reads of a stage-1 model; returned at inference too, it costs nothing).
    """

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Block-size multiples of the crop and evaluation sizes; MAR without a memory (:func:`check_train_config`)."""
        check_train_config(cfg)

    @classmethod
    def single_frame_baseline(cls, model_cfg: Any) -> Any:
        """PSPNet with the same head (:func:`single_frame_baseline`)."""
        return single_frame_baseline(model_cfg)

    @classmethod
    def import_official(cls, state_dict: dict[str, Tensor]) -> ImportResult:
        """The official ST_Memory checkpoints (:func:`import_official_checkpoint`)."""
        return import_official_checkpoint(state_dict)

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        offsets: Sequence[int] = (-1, 1),
        mar: bool = False,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        depth: int = 1,
        num_heads: int = 2,
        mlp_dim: int = 256,
        block_size: Sequence[int] | str = (16, 16),
        pe_size: Sequence[int] = (128, 256),
        dropout: float = 0.1,
        keys_per_class: int = 10,
        memory: str | None = None,
        avg_non_ignore: bool = False,
        compile: bool = False,
        encoder_name: str | None = None,
    ) -> None:
        super().__init__(in_channels, num_classes, offsets, avg_non_ignore, compile)
        if encoder_name is not None and not str(encoder_name).startswith("resnet"):
            raise ConfigError(
                f"model=stf/stf_mar needs a dilated ResNet encoder (output stride 8, e.g. encoder=resnet50c); "
                f"encoder.name={encoder_name!r} is not one"
            )
        if not isinstance(mar, bool):
            raise ConfigError(f"model.mar={mar!r} is invalid: expected true or false")
        if not self.offsets:
            raise ConfigError("model.offsets=[] is invalid for STF: expected reference frames, e.g. [-1,1]")
        channels = positive_int("channels", channels)
        num_heads = positive_int("num_heads", num_heads)
        if channels % num_heads:
            raise ConfigError(f"model.num_heads={num_heads} is invalid: model.channels={channels} must divide by it")
        mlp_dim, depth = positive_int("mlp_dim", mlp_dim), positive_int("depth", depth)
        keys_per_class = positive_int("keys_per_class", keys_per_class)
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout={dropout!r} is invalid: expected a probability in [0, 1)")
        if memory is not None and not mar:
            raise ConfigError(
                f"model.memory={memory!r} is set but model.mar=false: the memory is MAR's (model=stf_mar)"
            )
        self.mar_enabled, self.keys_per_class = mar, keys_per_class
        # the frames in time order: the references (offsets order) and the target (offset 0) sorted by offset
        self.time_order = sorted(range(len(self.offsets) + 1), key=lambda i: (*self.offsets, 0)[i])
        self.target_index = sum(o < 0 for o in self.offsets)
        self.decode_head = PSPHead(self.in_channels[-1], num_classes, channels, pool_scales, dropout)
        self.stf = SpatialTemporalFusion(
            channels,
            len(self.offsets) + 1,
            depth,
            num_heads,
            mlp_dim,
            block_size,
            pe_size,
            dropout,
            self.target_index,
        )
        if mar:
            self.mar = MemoryAugmentedRefinement(channels, num_classes, keys_per_class, mlp_dim, dropout)
            if memory is not None:  # else random until loaded (a checkpoint's); training says so (check_train_config)
                self.mar.set_memory(load_memory(memory), str(memory))

    def encode(self, feats: list[Tensor]) -> FrameFeatures:
        """The PSP bottleneck feature of each frame (official ``decode_head(x, return_feat=True)``)."""
        return {"feature": self.decode_head.bottleneck_features(feats[-1])}

    def aggregate(self, target: FrameFeatures, references: list[FrameFeatures]) -> dict[str, Tensor]:
        """STF over the frames in time order (target as the decoder query), MAR, ``conv_seg``; no references:
        STF over the target alone (T=1, the target's slice of ``pe_enc``)."""
        if references and len(references) != len(self.offsets):
            raise ConfigError(
                f"STF reads {len(self.offsets)} reference frames (model.offsets={list(self.offsets)}), got "
                f"{len(references)}"
            )
        if references:
            items = [*references, target]
            frames = torch.stack([items[i]["feature"] for i in self.time_order], 1)
            x = self.stf(frames, self.target_index)
        else:
            x = self.stf(target["feature"].unsqueeze(1), 0)
        refined = self.mar(x) if self.mar_enabled else x
        return {"logits": self.decode_head.classify(refined), "features": x}


def single_frame_baseline(model_cfg: Any) -> Any:
    """The single-frame baseline of model=stf / stf_mar (``vss.bench baseline=true``): PSPNet with the same head."""
    from functools import partial

    from vss.models.aggregators.pspnet import PSPNet

    keys = ("channels", "pool_scales", "dropout")
    return partial(PSPNet, **{k: model_cfg[k] for k in keys if k in model_cfg})
