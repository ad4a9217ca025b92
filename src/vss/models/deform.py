"""Deformable convolution (``torchvision.ops.deform_conv2d``) as bilinear sampling plus one matrix product.

torchvision's CPU kernel builds its columns in a scalar loop (about 7x a plain 3x3 conv of the same shape on a
2-core box); here the columns come from one ``grid_sample`` call (zero padding, the same bilinear weights: a tap
at (h, w) reads the four neighbours in the map and counts those outside as zero, which is torchvision's
``bilinear_interpolate``), are multiplied by the modulation mask, and one matmul with the kernel gives the output.
The same function and the same gradients (autograd through ``grid_sample``). :func:`deform_conv2d` picks this
formulation on CPU and torchvision's kernel elsewhere (``impl`` overrides).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from vss.errors import ConfigError

__all__ = ["IMPLS", "deform_conv2d", "deform_conv2d_sampled"]

IMPLS = ("auto", "sampled", "torchvision")
ROW_PIXELS = 2048  # output pixels per band of the inference path (:func:`_sampled_rows`)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    """(v, v) for an int, else the pair itself."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _next_pow2(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(int(n) - 1, 0).bit_length()


def deform_conv2d_sampled(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """``torchvision.ops.deform_conv2d`` (same arguments and layouts) by ``grid_sample`` and one matmul."""
    b, cin, h, w = input.shape
    cout, cin_g, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    kk = kh * kw
    groups = cin // cin_g
    offset_groups = offset.shape[1] // (2 * kk)
    ho, wo = offset.shape[-2:]
    if cin % cin_g or cout % groups or cin % offset_groups or offset.shape[1] != 2 * kk * offset_groups:
        raise ValueError(
            f"deform_conv2d: input {tuple(input.shape)}, weight {tuple(weight.shape)}, offset "
            f"{tuple(offset.shape)} do not fit together"
        )
    if mask is not None and mask.shape[1] != kk * offset_groups:
        raise ValueError(f"deform_conv2d: mask {tuple(mask.shape)} needs {kk * offset_groups} channels")
    dt, dev = input.dtype, input.device
    # sampling positions (B, G, kk, Ho, Wo): output position * stride - padding + tap * dilation + offset
    base_y = (torch.arange(ho, dtype=dt, device=dev) * sh - ph).view(1, 1, 1, ho, 1)
    base_x = (torch.arange(wo, dtype=dt, device=dev) * sw - pw).view(1, 1, 1, 1, wo)
    tap_y = (torch.arange(kh, dtype=dt, device=dev) * dh).repeat_interleave(kw).view(1, 1, kk, 1, 1)
    tap_x = (torch.arange(kw, dtype=dt, device=dev) * dw).repeat(kh).view(1, 1, kk, 1, 1)
    off = offset.reshape(b, offset_groups, kk, 2, ho, wo)
    py = base_y + tap_y + off[:, :, :, 0]
    px = base_x + tap_x + off[:, :, :, 1]
    # The map is zero-padded (bottom, right) to power-of-two sizes: reads there are zero, as torchvision's reads
    # outside the map, and an integer position normalises and unnormalises exactly, so a tap at a whole pixel
    # takes the same corners (floor) as torchvision's, hence the same one-sided gradient at zero offsets.
    hp, wp = _next_pow2(h), _next_pow2(w)
    x = F.pad(input, (0, wp - w, 0, hp - h)) if (hp, wp) != (h, w) else input
    # normalised for align_corners=False: pixel i is at (2i + 1) / size - 1 (valid for any size, 1 included)
    grid = torch.stack(((2 * px + 1) / wp - 1, (2 * py + 1) / hp - 1), -1)  # B,G,kk,Ho,Wo,2
    grid = grid.reshape(b * offset_groups, kk * ho, wo, 2)
    x = x.reshape(b * offset_groups, cin // offset_groups, hp, wp)
    if groups == 1 and offset_groups == 1 and not torch.is_grad_enabled():
        return _sampled_rows(x, grid.view(b, kk, ho, wo, 2), weight, bias, mask)
    cols = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    cols = cols.view(b, offset_groups, cin // offset_groups, kk, ho * wo)
    if mask is not None:
        cols = cols * mask.reshape(b, offset_groups, 1, kk, ho * wo)
    cols = cols.view(b, groups, cin_g * kk, ho * wo)  # rows ordered (channel, tap) as weight.view(Cout, -1)
    out = torch.matmul(weight.reshape(groups, cout // groups, cin_g * kk), cols)  # B,groups,Cout/g,HoWo
    out = out.view(b, cout, ho, wo)
    return out if bias is None else out + bias.view(1, cout, 1, 1)


def _sampled_rows(x: Tensor, grid: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None) -> Tensor:
    """The columns and the matmul of :func:`deform_conv2d_sampled` (one group, one offset group, no autograd) a
    band of ``ROW_PIXELS`` output pixels (whole rows) at a time, into a channels-last output: the same sampling
    positions (``grid`` (B, kk, Ho, Wo, 2)), products and sums, but each band's columns are a reused heap buffer
    instead of one (Cin x kk, Ho x Wo) buffer of the whole map (75 MiB for 256 channels at 64 x 128), mapped,
    written, masked in a second buffer and read back. Returns (B, Cout, Ho, Wo), channels-last strides."""
    b, kk, ho, wo = grid.shape[:4]
    cin, cout = x.shape[1], weight.shape[0]
    w_t = weight.reshape(cout, cin * kk).t()  # (Cin*kk, Cout): rows ordered (channel, tap), as the columns
    rows = max(1, ROW_PIXELS // wo)
    out = None
    for i in range(b):
        for r0 in range(0, ho, rows):
            r1 = min(ho, r0 + rows)
            n = (r1 - r0) * wo
            g = grid[i : i + 1, :, r0:r1].reshape(1, kk * (r1 - r0), wo, 2)
            cols = F.grid_sample(x[i : i + 1], g, mode="bilinear", padding_mode="zeros", align_corners=False)
            cols = cols.reshape(cin, kk, n)
            if mask is not None:
                m = mask[i, :, r0:r1].reshape(1, kk, n)
                cols = cols.mul_(m) if torch.result_type(cols, m) == cols.dtype else cols * m
            band = torch.mm(cols.view(cin * kk, n).t(), w_t).view(r1 - r0, wo, cout)  # (rows, Wo, Cout)
            if bias is not None:
                band = band + bias
            if out is None:
                out = band.new_empty(b, ho, wo, cout)
            out[i, r0:r1] = band
    return out.permute(0, 3, 1, 2)


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
    impl: str = "auto",
) -> Tensor:
    """Deformable conv: ``impl`` = ``sampled`` (:func:`deform_conv2d_sampled`), ``torchvision`` or ``auto``
    (sampled on CPU, torchvision's kernel on other devices)."""
    if impl not in IMPLS:
        raise ConfigError(f"model.dcn_impl={impl!r}: expected one of {', '.join(IMPLS)}")
    if impl == "sampled" or (impl == "auto" and input.device.type == "cpu"):
        return deform_conv2d_sampled(input, offset, weight, bias, stride, padding, dilation, mask)
    return tv_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
