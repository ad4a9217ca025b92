"""Import of the official ST_Memory checkpoints (``python -m vss.convert --model stf|stf_mar``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from vss.errors import ConfigError

if TYPE_CHECKING:
    from vss.checkpoint import ImportResult

# ``python -m vss.convert --model stf|stf_mar`` calls :meth:`STFMAR.import_official`. The names
# are read from the official code (jfzhuang/ST_Memory): ``SegRefine`` (exp/cityscapes/psp50/{STF,MAR}/model/
# refine.py) holds ``pspnet`` (mmseg pspnet_r50-d8: ``backbone``, ``decode_head``, ``auxiliary_head``), ``STF`` and,
# in the MAR stage, ``MAR`` (lib/net/transformer.py), built of lib/net/transformer_block.py's layers.
# STF/python/train.py saves ``net.module.state_dict()``; MAR/python/test.py loads the MAR stage's file strictly. A
# ``module.`` prefix on every key (a DataParallel / DDP wrapper saved as a whole) is stripped.

_MHA = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_AFFINE = ("weight", "bias")
#: The official ISA_Block / ISA_Block_CA attentions -> ours (InterlacedSparseAttention).
_ISA = (("self_attn_short", "short_range"), ("self_attn_long", "long_range"))
#: Official PSPNet keys a SegRefine file must hold (the rest of ``pspnet.*`` is checked by the strict load).
_PSPNET_ANCHORS = (
    "pspnet.backbone.stem.0.weight",
    "pspnet.decode_head.bottleneck.conv.weight",
    "pspnet.decode_head.conv_seg.weight",
    "pspnet.decode_head.conv_seg.bias",
)
_SHOWN = 4


def _isa_names(official: str, ours: str) -> dict[str, str]:
    return {f"{official}.{o}.{p}": f"{ours}.{s}.{p}" for o, s in _ISA for p in _MHA}


def _ffn_norm_names(official: str, ours: str, norms: int) -> dict[str, str]:
    """``linear1``/``linear2`` -> ``ffn.0``/``ffn.3``; ``norm1..norms`` -> the same names."""
    names = {f"{official}.linear{i}.{p}": f"{ours}.ffn.{j}.{p}" for i, j in ((1, 0), (2, 3)) for p in _AFFINE}
    return names | {f"{official}.norm{i}.{p}": f"{ours}.norm{i}.{p}" for i in range(1, norms + 1) for p in _AFFINE}


def official_names(depth: int = 1, mar: bool = True) -> dict[str, str]:
    """Every official ``STF.*`` (and, with ``mar``, ``MAR.*``) tensor name of a ``depth``-layer STF -> ours (under
    ``aggregator.``); ``STF.pe_enc`` first."""
    names = {"STF.pe_enc": "stf.pe_enc", "STF.pe_dec": "stf.pe_dec"}
    for i in range(depth):
        enc, dec = f"STF.encoder.layers.{i}", f"STF.decoder.layers.{i}"
        names |= _isa_names(f"{enc}.self_attn", f"stf.encoder_layers.{i}.attn")
        names |= _ffn_norm_names(enc, f"stf.encoder_layers.{i}", 2)
        names |= _isa_names(f"{dec}.self_attn", f"stf.decoder_layers.{i}.self_attn")
        names |= _isa_names(f"{dec}.multihead_attn", f"stf.decoder_layers.{i}.cross_attn")
        names |= _ffn_norm_names(dec, f"stf.decoder_layers.{i}", 3)
    if mar:
        layer = "MAR.HEdecoder"
        names |= {"MAR.memory_key": "mar.memory_key", "MAR.memory_value": "mar.memory_value"}
        names |= {
            f"{layer}.attn.{p}.{j}.weight": f"mar.{p}.{j}.weight" for p in ("to_q", "to_k", "to_v") for j in range(3)
        }
        names |= {f"{layer}.attn.to_out.0.{p}": f"mar.proj.{p}" for p in _AFFINE}
        names |= _ffn_norm_names(layer, "mar", 2)
    return names


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return f"{shown}, ... (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else shown


def _strip_module(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Without the ``module.`` prefix of a DataParallel / DDP wrapper when every key has it."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict


def convert_official_state_dict(
    state_dict: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, str], list[str], list[str], list[str]]:
    """An official ``SegRefine`` state_dict (``pspnet.*``, ``STF.*``, ``MAR.*``; ``module.`` stripped) -> Segmenter
    keys. Returns the tensors, the official name of each, the dropped keys (mmseg's auxiliary head) and the
    expected official keys missing and the unexpected keys found."""
    from vss.models.aggregators.pspnet import pspnet_keys

    state = _strip_module(state_dict)
    depth = len({k.split(".")[3] for k in state if k.startswith("STF.encoder.layers.")})
    expected = official_names(max(depth, 1), any(k.startswith("MAR.") for k in state))
    missing = [k for k in (*expected, *_PSPNET_ANCHORS) if k not in state]
    psp = {k.removeprefix("pspnet."): v for k, v in state.items() if k.startswith("pspnet.")}
    psp_out, psp_origin, dropped, psp_unknown = pspnet_keys(psp)
    out = dict(psp_out)
    origin = {k: f"pspnet.{v}" for k, v in psp_origin.items()}
    for k, v in state.items():
        if k in expected:
            if k in ("MAR.memory_key", "MAR.memory_value") and v.ndim == 3 and v.shape[0] == 1:
                v = v[0]  # official (1, K*num_class, C)
            out[f"aggregator.{expected[k]}"], origin[f"aggregator.{expected[k]}"] = v, k
    unknown = {f"pspnet.{k}" for k in psp_unknown}
    unexpected = [k for k in state if k in unknown or not (k.startswith("pspnet.") or k in expected)]  # file order
    return out, origin, [f"pspnet.{k}" for k in dropped], missing, unexpected


def _layout_error(state: dict[str, Tensor], missing: list[str], unexpected: list[str]) -> ConfigError:
    """The one-line error for a file that is not an official ST_Memory SegRefine state_dict."""
    msg = (
        "not an official ST_Memory checkpoint (the state_dict of SegRefine: pspnet.*, STF.*, MAR.* in the MAR "
        f"stage): {len(missing)} expected keys missing ({_listing(missing) or 'none'}); {len(unexpected)} "
        f"unexpected keys found ({_listing(unexpected) or 'none'})"
    )
    if "backbone.stem.0.weight" in state and not any(k.startswith("STF.") for k in state):
        msg += "; it looks like an mmseg PSPNet checkpoint: --model pspnet"
    return ConfigError(msg)


def import_official_checkpoint(state_dict: dict[str, Tensor]) -> ImportResult:
    """An official ST_Memory ``SegRefine`` state_dict (STF stage: ``pspnet.*``, ``STF.*``; MAR stage: also ``MAR.*``;
    with or without ``module.``) -> Segmenter tensors + the config they imply: ``model=stf_mar`` when ``MAR.*`` is
    present (else ``model=stf``), ``encoder=resnet50c``, the number of classes (``conv_seg``), the widths, the
    positional tables' grid and the memory's keys per class (vss.convert picks the data set and class names from the
    count). A file of another layout is a ConfigError naming the missing and unexpected keys."""
    from vss.checkpoint import ImportResult
    from vss.models.aggregators.pspnet import check_resnet50_v1c

    state = _strip_module(state_dict)
    converted, origin, dropped, missing, unexpected = convert_official_state_dict(state)
    if missing or unexpected:
        raise _layout_error(state, missing, unexpected)
    check_resnet50_v1c({k.removeprefix("pspnet."): v for k, v in state.items() if k.startswith("pspnet.backbone.")})
    pe, mlp = state["STF.pe_enc"], int(state["STF.encoder.layers.0.linear1.weight"].shape[0])
    num_classes = int(state["pspnet.decode_head.conv_seg.weight"].shape[0])
    depth = len({k.split(".")[3] for k in state if k.startswith("STF.encoder.layers.")})
    has_mar = "MAR.memory_key" in state
    overrides = [
        f"model={'stf_mar' if has_mar else 'stf'}",
        "encoder=resnet50c",
        f"data.num_classes={num_classes}",
        f"model.channels={int(pe.shape[1])}",
        f"model.pe_size=[{int(pe.shape[3])},{int(pe.shape[4])}]",
        f"model.depth={depth}",
        f"model.mlp_dim={mlp}",
    ]
    if has_mar:
        overrides.append(f"model.keys_per_class={_keys_per_class(state, num_classes, mlp)}")
    return ImportResult(
        state_dict=converted,
        overrides=overrides,
        defaults=[],
        origin=origin,
        dropped=dropped,
        unknown=[],
    )


def _keys_per_class(state: dict[str, Tensor], num_classes: int, mlp: int) -> int:
    """K of the MAR memory (official KL = KH = 10), checked against what :class:`MemoryAugmentedRefinement` builds:
    KL = KH and MAR's width (official ``dim // 2``) equal to STF's ``mlp_dim``."""
    slots, values = state["MAR.memory_key"].shape[-2], state["MAR.memory_value"].shape[-2]
    if slots % num_classes or slots != values:
        raise ConfigError(
            f"MAR.memory_key has {slots} slots and MAR.memory_value {values} for {num_classes} classes: vss builds "
            "K keys and K values per class (official KL = KH = 10)"
        )
    width = int(state["MAR.HEdecoder.linear1.weight"].shape[0])
    if width != mlp:
        raise ConfigError(
            f"MAR's width {width} (MAR.HEdecoder.linear1) differs from STF's {mlp} (STF.encoder.layers.0.linear1): "
            "vss builds both with model.mlp_dim (official: 256 and 512 // 2)"
        )
    return slots // num_classes
