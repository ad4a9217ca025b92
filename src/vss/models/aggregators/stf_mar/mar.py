"""MAR, the Memory-Augmented Refinement: each pixel attends over a static class memory (official ``MAR``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vss.errors import ConfigError
from vss.models.aggregators.stf_mar.stf import feed_forward


def _projection(dim: int, mlp_dim: int) -> nn.Sequential:
    """Official ``to_q`` / ``to_k`` / ``to_v``: Linear(C,C), Linear(C,mlp), Linear(mlp,mlp); no bias, no activation."""
    return nn.Sequential(
        nn.Linear(dim, dim, bias=False), nn.Linear(dim, mlp_dim, bias=False), nn.Linear(mlp_dim, mlp_dim, bias=False)
    )


def _linear_stack(stack: nn.Sequential, x: Tensor) -> Tensor:
    """``stack(x)`` for a stack of bias-free Linear layers, as functions: the memory (a Parameter) as a module's
    input breaks torch's module tracker (FlopCounterMode, ``vss.bench``) under inference mode."""
    for layer in stack:
        x = F.linear(x, layer.weight, layer.bias)
    return x


class MemoryAugmentedRefinement(nn.Module):
    """MAR (official ``MAR`` / ``TransformerHELayer``): each pixel attends over a static class memory.

    ``memory_key`` and ``memory_value`` (num_classes*K, C) are class-major: slot r belongs to class r // K;
    the keys are the K hard (low-score, correct) features of each class, value slot r the prototype of class
    r // K. Read path: attn = softmax(q k^T) (single head, no 1/sqrt(d) scaling); x = LN(x + drop(W_o attn v));
    x = LN(x + drop(FFN(x))).
    """

    def __init__(
        self, dim: int, num_classes: int, keys_per_class: int = 10, mlp_dim: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.num_classes, self.keys_per_class = int(num_classes), int(keys_per_class)
        slots = self.num_classes * self.keys_per_class
        self.memory_key = nn.Parameter(torch.randn(slots, dim))
        self.memory_value = nn.Parameter(torch.randn(num_classes, dim).repeat_interleave(keys_per_class, 0))
        self.to_q = _projection(dim, mlp_dim)
        self.to_k = _projection(dim, mlp_dim)
        self.to_v = _projection(dim, mlp_dim)
        self.proj = nn.Linear(mlp_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = feed_forward(dim, mlp_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    @torch.no_grad()
    def set_memory(self, memory: dict[str, Tensor], source: str = "memory") -> None:
        """Load a memory dict (:func:`load_memory`): keys as they are, prototypes repeat-interleaved K times."""
        key, prototype = memory["key"], memory["prototype"]
        expected_key, expected_proto = tuple(self.memory_key.shape), (self.num_classes, self.memory_key.shape[1])
        if tuple(key.shape) != expected_key or tuple(prototype.shape) != expected_proto:
            raise ConfigError(
                f"model.memory={source}: key {tuple(key.shape)} and prototype {tuple(prototype.shape)} do not match "
                f"the model's key {expected_key} and prototype {expected_proto} (data.num_classes x "
                "model.keys_per_class, model.channels)"
            )
        self.memory_key.copy_(key)
        self.memory_value.copy_(prototype.repeat_interleave(self.keys_per_class, 0))

    def forward(self, x: Tensor) -> Tensor:
        """(B,C,H,W) -> the refined feature (B,C,H,W)."""
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # B,HW,C
        q = self.to_q(tokens)
        k = _linear_stack(self.to_k, self.memory_key)
        v = _linear_stack(self.to_v, self.memory_value)
        attn = torch.softmax(q @ k.t(), dim=-1)  # unscaled, as the official code
        out = self.norm1(tokens + self.dropout(self.proj(attn @ v)))
        out = self.norm2(out + self.dropout(self.ffn(out)))
        return out.transpose(1, 2).reshape(b, c, h, w)
