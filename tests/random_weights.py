"""Random but well-scaled weights for parity tests (norm scales near 1, BN running stats set)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import TINY_DATA, compose_job
from vss.lit import build_module


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (norm weights around 1, BN statistics too); eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.ndim == 0:  # a learned scalar (e.g. a logit scale) keeps its initial value
                    continue
                noise = torch.randn(p.shape, generator=gen)
                if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)) and name == "weight":
                    p.copy_(1.0 + 0.2 * noise)
                elif p.ndim == 1:
                    p.copy_(0.1 * noise)
                else:
                    p.copy_(noise / p[0].numel() ** 0.5)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=gen))
    return model.eval()


def write_tiny_checkpoints(root: Path, models: dict[str, list[str]], side: int) -> dict[str, Path]:
    """Tiny random-weight checkpoints (mit_b0, ``embed_dim=16``, ``data.scale=[side, side]``) in the vss.train
    layout, one per ``models`` entry (name -> overrides)."""
    out: dict[str, Path] = {}
    for name, extra in models.items():
        cfg = compose_job(
            [
                *TINY_DATA,
                *extra,
                "encoder=mit_b0",
                "model.embed_dim=16",
                f"data.scale=[{side},{side}]",
                f"paths.output_dir={root}",
                f"paths.data_dir={root / 'data'}",
            ]
        )
        module = build_module(cfg, cfg.data.num_classes, list(cfg.data.class_names))
        randomize_(module.segmenter, seed=1)
        out[name] = root / f"{name}.ckpt"
        config = OmegaConf.to_container(cfg, resolve=True)
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": config}}, out[name])
    return out
