"""Per-frame image encoders (MiT via timm PVTv2, dilated ResNets) and local checkpoint loading."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from torch import Tensor, nn

__all__ = [
    "ENCODER_NAMES",
    "MIT_SETTINGS",
    "Encoder",
    "MiTEncoder",
    "ResNetEncoder",
    "build_encoder",
    "convert_mit_checkpoint",
    "convert_resnet_v1c_checkpoint",
    "load_checkpoint_and_meta",
    "load_checkpoint_state_dict",
]

_MIT_WIDE = (64, 128, 320, 512)
# Mix Transformer (SegFormer) variants: embed_dims, depths, num_heads.
MIT_SETTINGS: dict[str, dict[str, tuple[int, ...]]] = {
    "mit_b0": {"embed_dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2), "num_heads": (1, 2, 5, 8)},
    "mit_b1": {"embed_dims": _MIT_WIDE, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 5, 8)},
    "mit_b2": {"embed_dims": _MIT_WIDE, "depths": (3, 4, 6, 3), "num_heads": (1, 2, 5, 8)},
    "mit_b3": {"embed_dims": _MIT_WIDE, "depths": (3, 4, 18, 3), "num_heads": (1, 2, 5, 8)},
    "mit_b4": {"embed_dims": _MIT_WIDE, "depths": (3, 8, 27, 3), "num_heads": (1, 2, 5, 8)},
    "mit_b5": {"embed_dims": _MIT_WIDE, "depths": (3, 6, 40, 3), "num_heads": (1, 2, 5, 8)},
}
# resnet50c: deep stem (3x3 convs 3->32->32->64), no avg-down = mmseg's ResNetV1c (PSPNet R50-D8's backbone).
RESNET_NAMES = ("resnet18", "resnet50", "resnet101", "resnet50c")
ENCODER_NAMES: tuple[str, ...] = (*MIT_SETTINGS, *RESNET_NAMES)

_MIT_DEFAULT_DROP_PATH = 0.1  # SegFormer's stochastic depth for every MiT variant
_MAX_KEYS_SHOWN = 20


class Encoder(nn.Module):
    """Per-frame backbone: image (B,3,H,W) -> list of 4 feature maps, shallow to deep."""

    out_channels: list[int]
    reductions: list[int]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return the 4 feature maps of a batch of images."""
        raise NotImplementedError

    def load_pretrained(self, path: str | Path, trust_pickle: bool = False) -> None:
        """Load a local checkpoint strictly into the backbone (``trust_pickle``: :func:`load_checkpoint_and_meta`)."""
        raise NotImplementedError


class MiTEncoder(Encoder):
    """SegFormer's Mix Transformer, built as timm's PyramidVisionTransformerV2 with MiT settings."""

    def __init__(self, variant: str, drop_path_rate: float = _MIT_DEFAULT_DROP_PATH, **kwargs: Any) -> None:
        """Build the MiT variant `variant` ("mit_b0".."mit_b5") without classifier head."""
        super().__init__()
        settings = MIT_SETTINGS[variant]
        self.variant = variant
        # timm splits linspace(0, rate, sum(depths)) per stage: the same per-block rule as the official MiT.
        self.body = PyramidVisionTransformerV2(
            num_classes=0,
            embed_dims=settings["embed_dims"],
            depths=settings["depths"],
            num_heads=settings["num_heads"],
            mlp_ratios=(4, 4, 4, 4),
            sr_ratios=(8, 4, 2, 1),
            qkv_bias=True,
            linear=False,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            **kwargs,
        )
        # Channels-last conv weights: the Mix-FFN depthwise convs and the attention's spatial-reduction convs read
        # (B, N, C) tokens viewed as (B, C, H, W), which is channels-last storage; with NCHW weights every call
        # copied that map to NCHW and the output back (48 -> 2 ms for one 256x120x216 depthwise conv; SegFormer-B1
        # at 480x864 1.5x faster, the same function: tests/test_speed.py). Loaded weights keep this layout.
        self.body.to(memory_format=torch.channels_last)
        self.out_channels = list(settings["embed_dims"])
        self.reductions = [4, 8, 16, 32]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return the 4 stage outputs (NCHW) at strides 4, 8, 16, 32."""
        return list(self.body.forward_intermediates(x, intermediates_only=True))

    def load_pretrained(self, path: str | Path, trust_pickle: bool = False) -> None:
        """Load an official SegFormer/mmseg or timm-layout MiT checkpoint strictly."""
        state_dict = load_checkpoint_state_dict(path, trust_pickle)
        state_dict = _strip_prefix(state_dict, "backbone.", keep_only=True)
        _load_strict(self.body, convert_mit_checkpoint(state_dict), path)


class ResNetEncoder(Encoder):
    """Dilated timm ResNet (output stride 8) returning layer1..layer4 outputs."""

    def __init__(self, name: str, drop_path_rate: float = 0.0, **kwargs: Any) -> None:
        """Build timm ResNet `name` with features_only, output_stride=8, out_indices=(1,2,3,4)."""
        super().__init__()
        self.body = timm.create_model(
            name,
            pretrained=False,
            features_only=True,
            output_stride=8,
            out_indices=(1, 2, 3, 4),
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
        self.out_channels = list(self.body.feature_info.channels())
        self.reductions = list(self.body.feature_info.reduction())

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return layer1..layer4 outputs at strides 4, 8, 8, 8."""
        return list(self.body(x))

    def load_pretrained(self, path: str | Path, trust_pickle: bool = False) -> None:
        """Load a timm/torchvision or mmseg/mmcv ResNet state dict strictly (the `fc.*` classifier is dropped)."""
        state_dict = load_checkpoint_state_dict(path, trust_pickle)
        state_dict = _strip_prefix(state_dict, "backbone.", keep_only=True)
        state_dict = {k: v for k, v in convert_resnet_v1c_checkpoint(state_dict).items() if not k.startswith("fc.")}
        _load_strict(self.body, state_dict, path)


def build_encoder(
    name: str,
    pretrained: str | Path | None = None,
    drop_path_rate: float | None = None,
    trust_pickle: bool = False,
    **kwargs: Any,
) -> Encoder:
    """Build encoder `name`, optionally loading the local checkpoint `pretrained` (never downloads; weights only
    unless ``trust_pickle``, ``+encoder.trust_pickle=true``: unpickling runs code the file names)."""
    if name in MIT_SETTINGS:
        rate = _MIT_DEFAULT_DROP_PATH if drop_path_rate is None else drop_path_rate
        encoder: Encoder = MiTEncoder(name, drop_path_rate=rate, **kwargs)
    elif name in RESNET_NAMES:
        encoder = ResNetEncoder(name, drop_path_rate=drop_path_rate or 0.0, **kwargs)
    else:
        raise ValueError(f"Unknown encoder {name!r}; allowed names: {', '.join(ENCODER_NAMES)}")
    if pretrained:
        encoder.load_pretrained(pretrained, trust_pickle)
    return encoder


def convert_mit_checkpoint(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename official SegFormer MiT keys to timm PVTv2 keys; drop `head.*`; keep timm-layout keys."""
    return {_timm_mit_key(k): v for k, v in state_dict.items() if not k.startswith("head.")}


def convert_resnet_v1c_checkpoint(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename mmseg/mmcv ResNetV1c deep-stem keys to timm's (`stem.0/1/3/4/6` -> `conv1.*`, `stem.7` -> `bn1`).

    `layerX.*` (convs, BNs, `downsample.0/1`) have the same names in both; other keys pass through.
    """
    return {_timm_resnet_key(k): v for k, v in state_dict.items()}


def _timm_resnet_key(key: str) -> str:
    """Map one mmseg ResNetV1c stem key to timm's name; others pass through."""
    if m := re.match(r"stem\.([0-7])\.", key):
        index = int(m[1])
        if index in (0, 1, 3, 4, 6):
            return f"conv1.{index}.{key[m.end() :]}"
        if index == 7:
            return f"bn1.{key[m.end() :]}"
    return key


def _timm_mit_key(key: str) -> str:
    """Map one official MiT key (1-based stages) to timm's PVTv2 name (0-based); others pass through."""
    if m := re.match(r"patch_embed([1-4])\.", key):
        stage = int(m[1]) - 1
        prefix = "patch_embed." if stage == 0 else f"stages.{stage}.downsample."
    elif m := re.match(r"block([1-4])\.(\d+)\.", key):
        prefix = f"stages.{int(m[1]) - 1}.blocks.{m[2]}."
    elif m := re.match(r"norm([1-4])\.", key):
        prefix = f"stages.{int(m[1]) - 1}.norm."
    else:
        return key
    return (prefix + key[m.end() :]).replace(".mlp.dwconv.dwconv.", ".mlp.dwconv.")


def load_checkpoint_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """Read a local checkpoint and return its state dict (plain, or under `state_dict` / `model`)."""
    return load_checkpoint_and_meta(path, trust_pickle, flag="+encoder.trust_pickle=true")[0]


def load_checkpoint_and_meta(
    path: str | Path, trust_pickle: bool = False, key: str = "encoder.pretrained", flag: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a local checkpoint (:func:`vss.checkpoint.load_checkpoint`: weights only unless ``trust_pickle``, the
    user's ``flag``): its state dict (see :func:`load_checkpoint_state_dict`) and its ``meta`` dict (mmcv /
    mmengine runners store the data set's class names there; ``{}`` when absent)."""
    from vss.checkpoint import load_checkpoint

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Pretrained checkpoint not found: {str(path)!r} (set by config key `encoder.pretrained`; "
            "weights are never downloaded, pass a local file)"
        )
    checkpoint = load_checkpoint(path, key=key, trust_pickle=trust_pickle, expect="weights", flag=flag, mmap=False)
    meta = checkpoint.get("meta")
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    state_dict = _strip_prefix(dict(checkpoint), "module.", keep_only=False)
    return state_dict, dict(meta) if isinstance(meta, dict) else {}


def _strip_prefix(state_dict: dict[str, Tensor], prefix: str, keep_only: bool) -> dict[str, Tensor]:
    """Strip `prefix` when present; with keep_only, other keys (e.g. `decode_head.*`) are dropped."""
    if not any(k.startswith(prefix) for k in state_dict):
        return state_dict
    if not keep_only and not all(k.startswith(prefix) for k in state_dict):
        return state_dict
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _load_strict(module: nn.Module, state_dict: dict[str, Tensor], path: str | Path) -> None:
    """Load `state_dict` strictly into `module`, raising ValueError that names bad keys and the file."""
    expected = set(module.state_dict())
    # Old torchvision files lack BatchNorm's num_batches_tracked buffer; it does not affect outputs.
    missing = sorted(k for k in expected - set(state_dict) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {str(path)!r} does not match the encoder "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys).\n"
            f"  missing: {_preview(missing)}\n  unexpected: {_preview(unexpected)}"
        )
    try:
        module.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"Checkpoint {str(path)!r} does not match the encoder: {err}") from err


def _preview(keys: list[str]) -> str:
    """Show at most the first few keys of a list."""
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    more = len(keys) - _MAX_KEYS_SHOWN
    return f"[{shown}{f', ... (+{more} more)' if more > 0 else ''}]"
