"""Random but well-scaled weights for parity tests (norm scales near 1, BN running stats set)."""

from __future__ import annotations

import torch
from torch import nn


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
