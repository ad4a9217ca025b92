"""STF+MAR's config values and checks: the ISA block on the stride-8 feature, the sizes it needs, MAR's memory."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from vss.errors import ConfigError

OUTPUT_STRIDE = 8
"""The PSPNet R50-D8 feature's stride: STF's block grid is counted on it."""
OFFICIAL_BLOCK = (16, 16)
"""The official ISA block (``block_size: auto`` takes it wherever the feature map divides by it)."""


def positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.{key}={value!r} is invalid: expected a positive integer")
    return value


def pair(key: str, value: Any) -> tuple[int, int]:
    try:
        pair = tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ConfigError(f"model.{key}={value!r} is invalid: expected [height, width], two positive integers")
    return int(pair[0]), int(pair[1])


def block_size_value(value: Any) -> tuple[int, int] | None:
    """``model.block_size``: ``auto`` (None) or [height, width]."""
    return None if value == "auto" else pair("block_size", value)


def auto_block(h: int, w: int) -> tuple[int, int]:
    """``block_size: auto`` on an h x w feature map: per side the official 16, else its largest divisor below 16
    (at the official sizes, multiples of 128, always 16x16)."""

    def side(block: int, n: int) -> int:
        return max(d for d in range(1, min(block, n) + 1) if n % d == 0)

    return side(OFFICIAL_BLOCK[0], h), side(OFFICIAL_BLOCK[1], w)


def check_input_size(
    height: int, width: int, reduction: int = OUTPUT_STRIDE, block_size: Sequence[int] = (16, 16), key: str = "input"
) -> None:
    """Raise ConfigError unless an input of ``height`` x ``width`` gives a feature map (stride ``reduction``)
    whose sides are multiples of STF's ``block_size``: multiples of 128 for 16x16 blocks at stride 8."""
    bh, bw = (int(b) for b in block_size)
    mh, mw = bh * reduction, bw * reduction
    if height % mh or width % mw:
        raise ConfigError(
            f"{key}={[height, width]} is invalid for STF: the input must be a multiple of {mh}x{mw} "
            f"(model.block_size={[bh, bw]} blocks on the stride-{reduction} feature map)"
        )


def check_train_config(cfg: Any) -> None:
    """Config-time check of a training config for STF/MAR: the crop (``data.crop_size``, padded to it) and the
    evaluation sizes (``data.size_divisor``, sides rounded up to a multiple of it) must be multiples of
    ``block_size`` x 8 (128 for the official 16x16 blocks). A hook shared code can call with the composed
    config (``cfg.model`` of this module); a missing key is not checked. ``block_size: auto`` fits any size.
    Warns when MAR would train from a random memory (``model.mar`` without ``model.memory`` or ``init_from``)."""
    from omegaconf import OmegaConf

    memory, init_from = (OmegaConf.select(cfg, k, default=None) for k in ("model.memory", "init_from"))
    if OmegaConf.select(cfg, "model.mar", default=False) is True and memory is None and not init_from:
        warnings.warn(
            "model.mar=true without model.memory: MAR's memory is random; build it with the memory pass over a "
            "trained model=stf and pass model.memory=memory.pt (or init_from= a checkpoint that holds it)",
            stacklevel=2,
        )
    block = block_size_value(OmegaConf.select(cfg, "model.block_size", default=list(OFFICIAL_BLOCK)))
    if block is None:
        return
    crop = OmegaConf.select(cfg, "data.crop_size", default=None)
    if crop is not None:
        check_input_size(int(crop[0]), int(crop[1]), OUTPUT_STRIDE, block, key="data.crop_size")
    divisor = OmegaConf.select(cfg, "data.size_divisor", default=None)
    if divisor is not None:
        m = [b * OUTPUT_STRIDE for b in block]
        if any(int(divisor) % v for v in m):
            raise ConfigError(
                f"data.size_divisor={divisor} is invalid for STF: evaluation frames must be multiples of {m[0]}x{m[1]} "
                f"(model.block_size={list(block)} at stride {OUTPUT_STRIDE}); set data.size_divisor={max(m)}"
            )
