"""The SegFormer decoder folded: each stage's embedding and its slice of the 1x1 fuse conv as one linear map."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["FoldCache", "Folded", "fold", "fold_sources", "folded_fuse"]

Folded = tuple[list[Tensor], Tensor, bool]
"""The per-stage maps M_i (E, C_i), the bias (E,) and whether BatchNorm (running statistics) is in them."""


def fold_sources(head: nn.Module) -> list[Tensor]:
    """The tensors of a SegFormer head (``linear_c{i}.proj``, ``linear_fuse.conv/bn``) that the folded maps read."""
    bn = head.linear_fuse.bn
    projections = [getattr(head, f"linear_c{i + 1}").proj for i in range(len(head.in_channels))]
    tensors = [head.linear_fuse.conv.weight, *(t for m in projections for t in (m.weight, m.bias))]
    return tensors + [t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]


def fold(head: nn.Module) -> Folded:
    """M_i = W_fuse,i W_i and the bias sum_i W_fuse,i b_i from the head's parameters (BatchNorm folded in eval)."""
    n, e = len(head.in_channels), head.linear_fuse.conv.out_channels
    w_fuse = head.linear_fuse.conv.weight.flatten(1)  # (E, n*E), input chunks in the order c_n .. c_1
    weights: list[Tensor] = []
    bias: Tensor | None = None
    for i in range(n):
        proj = getattr(head, f"linear_c{i + 1}").proj
        chunk = w_fuse[:, (n - 1 - i) * e : (n - i) * e]
        weights.append(chunk @ proj.weight)
        bias = chunk @ proj.bias if bias is None else bias + chunk @ proj.bias
    assert bias is not None
    bn = head.linear_fuse.bn
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return weights, bias, False
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = (bias - bn.running_mean) * scale + (bn.bias if bn.bias is not None else 0)
    return [w * scale[:, None] for w in weights], bias, True


def folded_fuse(feats: Sequence[Tensor], folded: Folded, bn: nn.Module) -> Tensor:
    """The head's fused 1/4 feature from the folded maps: sum_i up(M_i x_i) + bias, then BN (unless folded), ReLU.

    Bilinear upsampling commutes with channel-wise linear maps (its weights sum to 1, so biases pass through), so
    ``conv(cat(up(W_i x_i + b_i))) = sum_i up(M_i x_i) + sum_i W_fuse,i b_i``: each map runs at its stage's own
    resolution. Each map is applied token-major, so the maps, their upsampling and the result are channels-last
    (torch's CPU bilinear and pooling kernels are several times faster on that layout than on NCHW for E = 256).
    """
    weights, bias, bn_folded = folded
    size = feats[0].shape[2:]
    out: Tensor | None = None
    for i in reversed(range(len(feats))):  # c4, c3, c2, c1, as the official concat order
        x = feats[i]
        b, _, h, w = x.shape
        y = torch.matmul(x.flatten(2).transpose(1, 2), weights[i].t())  # (B,hw,E) whatever x's layout
        y = y.view(b, h, w, -1).permute(0, 3, 1, 2)  # a channels-last (B,E,h,w) view
        if y.shape[2:] != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        out = y if out is None else out.add_(y)
    assert out is not None
    out = out.add_(bias.view(1, -1, 1, 1))
    if not bn_folded:
        out = bn(out)
    return F.relu(out, inplace=True)


def _forget(cache: weakref.ref[FoldCache], optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Optimizer step post-hook of a filled cache: drop its maps (the hook itself stays until :meth:`clear`)."""
    held = cache()
    if held is not None:
        held.entry = None


class FoldCache:
    """A head's folded maps, kept between calls that record no autograd until a source tensor changes.

    The key holds BatchNorm's mode, inference mode (its tensors cannot enter autograd later) and each source
    tensor's identity, storage, version counter, dtype and device: ``load_state_dict`` and in-place edits bump
    version counters (edits through ``.data`` do not: they are invisible here as to autograd), ``to()`` gives new
    storage. Fused optimizers (``AdamW(fused=True)``) and BatchNorm's
    running statistics change tensors without a version bump: while the cache holds maps, a global optimizer
    step post-hook (registered on filling, removed by :meth:`clear` or when the cache is collected; none at
    import) drops them at any optimizer step, and the head calls :meth:`clear` when it enters training mode.
    Copies and pickles of the head get an empty cache.
    """

    def __init__(self) -> None:
        self.entry: tuple[tuple, Folded] | None = None
        self._release: weakref.finalize | None = None

    def __reduce__(self) -> tuple[type[FoldCache], tuple]:
        return FoldCache, ()

    def get(self, head: nn.Module) -> Folded:
        """The head's folded maps: recomputed when autograd records, in training or from inference tensors."""
        sources = fold_sources(head)
        recording = torch.is_grad_enabled() and any(t.requires_grad for t in sources)
        if head.training or recording or any(t.is_inference() for t in sources):  # the latter have no versions
            return fold(head)
        key: tuple = (head.linear_fuse.bn.training, torch.is_inference_mode_enabled())
        key += tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        if self.entry is None or self.entry[0] != key:
            if self._release is None:
                handle = register_optimizer_step_post_hook(partial(_forget, weakref.ref(self)))
                self._release = weakref.finalize(self, handle.remove)
            self.entry = (key, fold(head))
        return self.entry[1]

    def clear(self) -> None:
        """Drop the maps and the optimizer hook."""
        self.entry = None
        if self._release is not None:
            self._release()
            self._release = None

    @property
    def hooked(self) -> bool:
        """Whether this cache's optimizer step hook is registered."""
        return self._release is not None and self._release.alive
