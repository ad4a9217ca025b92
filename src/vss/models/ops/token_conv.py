"""Convolutions shared by token maps side by side on the channel axis (MRCFA's SAR/MAA units), as depthwise ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["shared", "shared_token_conv"]


def shared(weight: Tensor, groups: int) -> Tensor:
    """A per-map parameter repeated for ``groups`` maps side by side on the channel axis (``repeat`` on dim 0)."""
    return weight.expand(groups, *weight.shape).flatten(0, 1)


def _channels(x: Tensor, per_token: int) -> Tensor:
    """(N, T*C, H, W) token-major -> a (N, H, W, T, C) view (channel ``t*C + c`` at [..., t, c])."""
    return x.permute(0, 2, 3, 1).unflatten(3, (-1, per_token))


def shared_token_conv(x: Tensor, conv: nn.Conv2d, tokens: int) -> Tensor:
    """``conv`` (C_in -> C_out, stride 1) applied to each of ``tokens`` maps (N, T*C_in, H, W) token-major -> (N,
    T*C_out, H, W): the grouped convolution ``groups=T`` with the kernel repeated per group, as depthwise ones.

    CPU kernels pad a group of 2 channels to 16 (the 2-channel units ran at a few GFLOP/s); depthwise
    convolutions (one channel per group) have fast kernels on CPU and GPU. out[t, o] = sum_i w[o, i] * x[t, i]:
    C_in = 1 -> the input repeated C_out times, one depthwise conv; C_out = 1 -> one depthwise conv with kernel
    w[0, i] on channel (t, i), then the C_in channels of a token summed; C_in = C_out = C -> one depthwise conv
    per diagonal k (kernel w[(i + k) % C, i] on channel (t, i)), added to output channel (i + k) % C. The bias
    rides on the channels that land on their own output (i = o). Other shapes use the grouped convolution.
    """
    c_out, c_in = conv.weight.shape[:2]
    weight, bias, padding = conv.weight, conv.bias, conv.padding
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError(f"shared_token_conv needs a plain stride-1 convolution, got {conv}")
    if c_in == 1:
        if c_out > 1:
            x = x.permute(0, 2, 3, 1).unsqueeze(-1).expand(*x.shape[:1], *x.shape[2:], x.shape[1], c_out)
            x = x.flatten(3).permute(0, 3, 1, 2)  # (N, T*C_out, H, W), channel (t, o) = x[t]
        b = None if bias is None else shared(bias, tokens)
        return F.conv2d(x, shared(weight, tokens), b, padding=padding, groups=tokens * c_out)
    if c_out != 1 and c_out != c_in:
        b = None if bias is None else shared(bias, tokens)
        return F.conv2d(x, shared(weight, tokens), b, padding=padding, groups=tokens)
    groups = tokens * c_in
    i = torch.arange(c_in, device=weight.device)
    diagonals = c_in if c_out == c_in else 1
    out: Tensor | None = None
    for k in range(diagonals):
        o = (i + k) % c_out
        kernels = shared(weight[o, i].unsqueeze(1), tokens)  # channel (t, i): w[o(i), i]
        b = None
        if bias is not None and k == 0:  # the bias of output o, once: on channel (t, o) of the first diagonal
            b = shared(bias if c_out == c_in else torch.cat([bias, bias.new_zeros(c_in - 1)]), tokens)
        y = F.conv2d(x, kernels, b, padding=padding, groups=groups)
        if c_out == 1:
            return _sum_last(_channels(y, c_in)).permute(0, 3, 1, 2)
        if out is None:
            out = y
            continue
        v, u = _channels(out, c_in), _channels(y, c_in)
        for j in range(c_in):  # channel (t, j) of y lands on output (t, (j + k) % C)
            v[..., (j + k) % c_in].add_(u[..., j])
    assert out is not None
    return out


def _sum_last(v: Tensor) -> Tensor:
    """Sum over the last (small) axis of v (..., C) as C - 1 strided adds (a reduction kernel over 2 is slow)."""
    out = v[..., 0] + v[..., 1]
    for j in range(2, v.shape[-1]):
        out = out.add_(v[..., j])
    return out
