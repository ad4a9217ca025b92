"""Import an official MRCFA (or CFFM-style) mmseg checkpoint: ``python -m vss.convert --src X.pth --dst Y.ckpt``.

The official ``state_dict`` holds ``backbone.*`` (SegFormer MiT, converted to timm PVTv2 names with
:func:`vss.models.encoders.convert_mit_checkpoint`) and ``decode_head.*`` (the MRCFA head, renamed by
:func:`official_head_key`). The encoder variant, the number of classes and the affinity-decoder layout
(``b1`` or ``light``) are read from the tensors' shapes unless given. The output is a vss Lightning
checkpoint: ``state_dict`` + ``hyper_parameters.config`` (a full training config composed from
conf/train.yaml with ``experiment=mrcfa_vspw``, the inferred encoder, and any Hydra overrides given after
the options), so ``python -m vss.eval ckpt_path=Y.ckpt`` evaluates it and ``python -m vss.train
ckpt_path=Y.ckpt ...`` (same model and encoder overrides) fine-tunes it from step 0 (fresh optimizer state).

Dropped on purpose (and listed): ``decode_head.conv_seg.*`` (a classifier of mmseg's base head that
MRCFA never uses) and ``backbone.head.*`` (the ImageNet classifier of MiT). Any other key the model
does not know, and any model parameter the checkpoint lacks, is an error that lists the keys.

Example (official VSPW MiT-B1 weights; ``data.root`` is only needed for evaluation)::

    python -m vss.convert --src mrcfa_b1_vspw.pth --dst mrcfa_b1_vspw.ckpt data.root=/data/VSPW_480p
    python -m vss.eval ckpt_path=mrcfa_b1_vspw.ckpt
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vss.config import CONF_DIR, ConfigError, register_resolvers
from vss.models.encoders import MIT_SETTINGS, convert_mit_checkpoint, load_checkpoint_state_dict

# official decode_head names (after the prefix) -> ours (under segmenter.aggregator.)
_HEAD_RENAMES: tuple[tuple[str, str], ...] = (
    (r"linear_(c[1-4]|fuse|pred)\.(.+)", r"decode_head.linear_\1.\2"),
    (r"deco([1-3])\.smalldecoder\.(.+)", "aux_classifiers.{deco}.{rest}"),
    (r"deco4\.smalldecoder\.(.+)", r"classifier.\1"),
    (r"hypercorre_module\.q1\.(.+)", r"query_proj.s8.\1"),
    (r"hypercorre_module\.q2\.(.+)", r"query_proj.s16.\1"),
    (r"hypercorre_module\.q3\.(.+)", r"query_proj.s32.\1"),
    (r"hypercorre_module\.k1\.(.+)", r"key_proj.s8.\1"),
    (r"hypercorre_module\.k2\.(.+)", r"key_proj.s16.\1"),
    (r"hypercorre_module\.k3\.(.+)", r"key_proj.s32.\1"),
    (r"sr2\.(.+)", r"key_reduction.s8.\1"),
    (r"sr3\.(.+)", r"key_reduction.s16.\1"),
    (r"sr1_feat\.(.+)", r"value_reduction.\1"),
    (r"hypercorre_module\.hpn\.encoder_layer4\.(\d+)\.(?:conv2\.)?(.+)", r"affinity_decoder.refine.s32.\1.\2"),
    (r"hypercorre_module\.hpn\.encoder_layer3\.(\d+)\.(?:conv2\.)?(.+)", r"affinity_decoder.refine.s16.\1.\2"),
    (r"hypercorre_module\.hpn\.encoder_layer2\.(\d+)\.(?:conv2\.)?(.+)", r"affinity_decoder.refine.s8.\1.\2"),
    (r"hypercorre_module\.hpn\.encoder_layer4to3\.(\d+)\.(?:conv2\.)?(.+)", r"affinity_decoder.aggregate.s16.\1.\2"),
    (r"hypercorre_module\.hpn\.encoder_layer3to2\.(\d+)\.(?:conv2\.)?(.+)", r"affinity_decoder.aggregate.s8.\1.\2"),
)
DROPPED_HEAD = ("conv_seg.",)
_MAX_SHOWN = 30


def official_head_key(key: str) -> str | None:
    """Our aggregator key for an official ``decode_head`` key (prefix removed); None when unknown."""
    for pattern, repl in _HEAD_RENAMES:
        m = re.fullmatch(pattern, key)
        if m is None:
            continue
        if "{deco}" in repl:
            return repl.format(deco=int(m[1]) - 1, rest=m[2])
        return m.expand(repl)
    return None


def infer_mit_variant(backbone: dict[str, Tensor]) -> str:
    """The MiT variant (mit_b0..b5) whose embed dims and depths match an official backbone state dict."""
    dims = tuple(int(backbone[f"patch_embed{i}.proj.weight"].shape[0]) for i in range(1, 5))
    depths = tuple(len({k.split(".")[1] for k in backbone if k.startswith(f"block{i}.")}) for i in range(1, 5))
    for name, s in MIT_SETTINGS.items():
        if tuple(s["embed_dims"]) == dims and tuple(s["depths"]) == depths:
            return name
    raise ConfigError(
        f"backbone with embed dims {dims} and depths {depths} is no MiT variant ({', '.join(MIT_SETTINGS)})"
    )


def split_official(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """``backbone.*`` and ``decode_head.*`` (prefixes removed) and the keys with any other prefix."""
    backbone, head, other = {}, {}, []
    for k, v in state_dict.items():
        if k.startswith("backbone."):
            backbone[k[len("backbone.") :]] = v
        elif k.startswith("decode_head."):
            head[k[len("decode_head.") :]] = v
        else:
            other.append(k)
    return backbone, head, other


def convert_official_state_dict(
    state_dict: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, str], list[str], list[str]]:
    """Official MRCFA keys -> Segmenter keys (``encoder.body.*``, ``aggregator.*``).

    Returns the converted tensors, the official name of each converted key, the dropped keys and the
    keys that have no counterpart.
    """
    backbone, head, unknown = split_official(state_dict)
    dropped = [f"backbone.{k}" for k in backbone if k.startswith("head.")]
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for k, v in backbone.items():
        for new, tensor in convert_mit_checkpoint({k: v}).items():
            out[f"encoder.body.{new}"], origin[f"encoder.body.{new}"] = tensor, f"backbone.{k}"
    for k, v in head.items():
        if k.startswith(DROPPED_HEAD):
            dropped.append(f"decode_head.{k}")
            continue
        new = official_head_key(k)
        if new is None:
            unknown.append(f"decode_head.{k}")
        else:
            out[f"aggregator.{new}"], origin[f"aggregator.{new}"] = v, f"decode_head.{k}"
    return out, origin, sorted(dropped), sorted(unknown)


def compose_config(overrides: Sequence[str]) -> Any:
    """The full training config for ``overrides`` (conf/train.yaml), resolved to plain containers."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def _preview(keys: Sequence[str]) -> str:
    more = len(keys) - _MAX_SHOWN
    return ", ".join(keys[:_MAX_SHOWN]) + (f", ... (+{more} more)" if more > 0 else "")


def convert(
    src: str | Path,
    dst: str | Path,
    encoder: str | None = None,
    num_classes: int | None = None,
    token_ratio: float | None = None,
    sar_layout: str | None = None,
    overrides: Sequence[str] = (),
    verbose: bool = True,
) -> dict[str, Any]:
    """Convert ``src`` (official mmseg checkpoint) into the vss checkpoint ``dst``; return a short report."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from vss.checkpoint import atomic_torch_save
    from vss.lit import poly_warmup_factor
    from vss.train import build_module

    if not Path(src).is_file():
        raise ConfigError(f"--src {str(src)!r}: the file does not exist")
    state = load_checkpoint_state_dict(src)
    backbone, head, _ = split_official(state)
    if not backbone or not head:
        raise ConfigError(f"{src}: expected an mmseg checkpoint with backbone.* and decode_head.* keys")
    found = infer_mit_variant(backbone)
    if encoder is not None and encoder != found:
        raise ConfigError(f"--encoder {encoder} does not match the checkpoint's backbone ({found})")
    encoder = found
    if "linear_pred.weight" not in head:
        raise ConfigError(f"{src}: decode_head.linear_pred.weight is missing (not a SegFormer/MRCFA head)")
    classes = int(head["linear_pred.weight"].shape[0])
    if num_classes is not None and int(num_classes) != classes:
        raise ConfigError(f"--num-classes {num_classes} does not match the checkpoint's classifier ({classes} classes)")
    b1_key = "hypercorre_module.hpn.encoder_layer4.3.conv2.weight"
    layout = sar_layout or ("b1" if b1_key in head else "light")

    base = (
        ["experiment=mrcfa_vspw"] if not any(o.split("=", 1)[0].lstrip("+~") == "experiment" for o in overrides) else []
    )
    chosen = [
        f"encoder={encoder}",
        f"data.num_classes={classes}",
        f"model.sar_layout={layout}",
        "model.num_references=3",
    ]
    if token_ratio is not None:
        chosen.append(f"stm.p={token_ratio}")
    config = compose_config([*base, *chosen, f"paths.output_dir={Path(dst).parent}", *overrides])
    cfg = OmegaConf.create(config)
    class_names = list(cfg.data.class_names) if cfg.data.get("class_names") else [str(i) for i in range(classes)]
    if len(class_names) != classes:
        raise ConfigError(f"data.class_names has {len(class_names)} names but the checkpoint has {classes} classes")
    module = build_module(cfg, classes, class_names)

    converted, origin, dropped, unknown = convert_official_state_dict(state)
    expected = module.segmenter.state_dict()
    unknown += sorted(f"{origin[k]} (as {k})" for k in converted if k not in expected)
    missing = sorted(k for k in expected if k not in converted)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    )
    if unknown or missing or mismatched:
        raise ConfigError(
            f"{src} does not match model=mrcfa encoder={encoder} (sar_layout={layout}): "
            f"{len(unknown)} unknown, {len(missing)} missing, {len(mismatched)} mismatched keys\n"
            f"  unknown: [{_preview(unknown)}]\n  missing: [{_preview(missing)}]\n"
            f"  mismatched: [{_preview(mismatched)}]"
        )
    module.segmenter.load_state_dict({k: converted[k] for k in expected}, strict=True)

    # a fresh optimizer and schedule at step 0, so that `vss.train ckpt_path=` can start from these weights
    optimizer = torch.optim.AdamW(module.param_groups(), betas=tuple(module.optim_cfg["betas"]))
    s = module.sched_cfg
    first = poly_warmup_factor(0, int(cfg.trainer.max_steps), int(s["warmup_steps"]), float(s["warmup_ratio"]), 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: first)
    report = {
        "src": str(src),
        "encoder": encoder,
        "num_classes": classes,
        "sar_layout": layout,
        "token_ratio": cfg.model.token_ratio,
        "converted": len(converted),
        "dropped": dropped,
    }
    checkpoint = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": pl.__version__,
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "vss_converted_from": report,
    }
    atomic_torch_save(checkpoint, dst)
    if verbose:
        print(
            f"[vss.convert] {src} -> {dst}: model=mrcfa encoder={encoder} num_classes={classes} "
            f"sar_layout={layout} stm.p={cfg.model.token_ratio}; {len(converted)} tensors"
        )
        print(f"[vss.convert] dropped (unused by the model): {', '.join(dropped) or 'none'}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: options, then Hydra overrides for the stored training config."""
    parser = argparse.ArgumentParser(
        prog="python -m vss.convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "--src", required=True, help="official mmseg checkpoint (.pth) with backbone.* and decode_head.*"
    )
    parser.add_argument("--dst", required=True, help="output vss checkpoint (.ckpt)")
    parser.add_argument("--encoder", help="MiT variant (mit_b0..mit_b5); default: read from the backbone's shapes")
    parser.add_argument("--num-classes", type=int, help="number of classes; default: read from linear_pred")
    parser.add_argument("--token-ratio", type=float, help="STM ratio p (stm.p); default: official (0.8 B0, 0.5 others)")
    parser.add_argument("--sar-layout", choices=("b1", "light"), help="default: read from the HPN weights' shapes")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the stored config, e.g. data.root=/data/VSPW")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.encoder, args.num_classes, args.token_ratio, args.sar_layout, args.overrides)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
