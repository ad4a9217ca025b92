"""Class ids at full resolution from low-resolution logits without the (B,C,H,W) upsampled map.

``class_map(resize(logits, size))`` (bilinear, align_corners=False, then the first maximum over C) writes and
re-reads all C maps at full resolution: 124 x 480 x 853 floats (203 MB) per VSPW frame, a third of an MRCFA-B1
streaming step on CPU. :func:`upsampled_class_map` gives the same ids band by band:

* an output pixel reads a 2x2 block of input pixels. Where one class leads at all four by more than the
  rounding of the interpolation can close (``8 eps`` of the largest magnitude, see :func:`_candidates`), it
  leads the interpolated value too (bilinear weights are >= 0 and every rounded step is monotone), so its id is
  the answer without interpolating anything;
* the other pixels (class borders, ties, non-finite logits) get the C interpolated values of PyTorch's CPU
  kernel recomputed exactly (same indices and weights, same fused multiply-adds, emulated in float64 with the
  rounding of a single fma), a few thousand pixels at a time.

The emulation is checked against ``F.interpolate`` on this machine once per dtype before it is trusted; where it
does not apply (another device, float64, C <= 3 or a small output, which PyTorch sends to another kernel) or
does not match, the plain resize-then-argmax runs, so the ids are always today's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

BAND_ROWS = 64  # output rows per band: 64 x 864 pixels of int64 ids and a few masks, well under 1 MB each
PLAIN_BYTES = 32 << 20
"""A frame whose whole upsampled map (C x H x W values) takes at most this goes through resize-then-argmax, one
frame at a time: few classes (the synthetic set's 5: 8 MB at 480x854). The banded path pays per undecided pixel,
and a barely trained model leaves nearly every block undecided: 5 classes, 55 frames at 480x854 took 92 s of CPU
in ``vss.eval`` against well under 1 s for the plain path (experiments/speed.md)."""
CHUNK_PIXELS = 16384  # undecided pixels recomputed at once: 16384 x K candidate classes x 4 corners in float64
EMULATED = (torch.float32, torch.bfloat16, torch.float16)
_CHECKED: dict[tuple[str, torch.dtype], bool] = {}
_TAU = 8  # margins in eps(dtype) x the largest |logit| involved: twice the worst rounding (see _candidates)


def class_map(logits: Tensor) -> Tensor:
    """Class ids (B,H,W) of logits (B,C,H,W): the first maximum over C (``max(1).indices``, as ``argmax(1)``)."""
    return logits.max(1).indices


def _axis(size_in: int, size_out: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PyTorch's CPU source indices and weights of one axis (align_corners=False): i0, i1 (long), l0, l1 (float64).

    ``src = fma(in/out, dst + 0.5, -0.5)`` in float32, clamped at 0; ``l1 = src - floor(src)`` and
    ``l0 = 1 - l1`` stored in the logits' dtype (``compute_source_index_and_lambda``).
    """
    d = torch.arange(size_out, dtype=torch.float64)
    if size_in == size_out:
        i0 = torch.arange(size_out)
        return i0, i0, torch.ones(size_out, dtype=torch.float64), torch.zeros(size_out, dtype=torch.float64)
    scale = torch.tensor(size_in, dtype=torch.float32) / torch.tensor(size_out, dtype=torch.float32)
    src = (scale.double() * (d + 0.5) - 0.5).float().clamp_min(0)  # one rounding: the kernel's fma
    i0 = src.floor().long().clamp_max(size_in - 1)
    i1 = torch.where(i0 < size_in - 1, i0 + 1, i0)
    l1 = (src - i0.float()).clamp(0, 1).to(dtype)
    l0 = (1 - l1.float()).to(dtype)
    return i0, i1, l0.double(), l1.double()


def _fma32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """float32 ``fma(a, b, c)`` (one rounding of ``a*b + c``) of float32 values held in float64 tensors.

    ``a*b`` is exact in float64; the sum's float64 rounding error comes from TwoSum, and a sum that lands exactly
    between two float32 values is rounded toward the true value, so no double rounding remains.
    """
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # exact: s + err == p + c
    r = s.float()
    rd = r.double()
    toward = torch.where(s > rd, torch.full_like(r, float("inf")), torch.full_like(r, -float("inf")))
    n = torch.nextafter(r, toward)
    tie = (s != rd) & ((s - rd) == (n.double() - s)) & (err != 0)
    fix = tie & ((err > 0) == (n.double() > s))  # the true value lies on n's side of the midpoint
    return torch.where(fix, n, r).double()


def _round32(x: Tensor) -> Tensor:
    """float32 rounding of a float64 tensor (kept in float64)."""
    return x.float().double()


def _interpolate(corners: Sequence[Tensor], wh: Sequence[Tensor], ww: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """The kernel's value from four corners (x00, x01, x10, x11) and weights: ``fma(t0, h0, t1 * h1)`` of rows
    ``t = fma(x0, w0, x1 * w1)`` in float32, then stored in ``dtype``."""
    x00, x01, x10, x11 = corners
    t0 = _fma32(x00, ww[0], _round32(x01 * ww[1]))
    t1 = _fma32(x10, ww[0], _round32(x11 * ww[1]))
    return _fma32(t0, wh[0], _round32(t1 * wh[1])).float().to(dtype)


def _emulated_resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """The whole bilinear resize by the emulation (for the self-check; small inputs only)."""
    (hi0, hi1, hl0, hl1), (wi0, wi1, wl0, wl1) = (
        _axis(x.shape[-2], size[0], x.dtype),
        _axis(x.shape[-1], size[1], x.dtype),
    )
    v = x.double()
    r0, r1 = v[..., hi0, :], v[..., hi1, :]
    corners = (r0[..., wi0], r0[..., wi1], r1[..., wi0], r1[..., wi1])
    return _interpolate(corners, (hl0[:, None], hl1[:, None]), (wl0, wl1), x.dtype)


def emulation_matches(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the emulation gives ``F.interpolate``'s bits on this device and dtype (checked once, cached)."""
    key = (torch.device(device).type, dtype)
    if key not in _CHECKED:
        gen = torch.Generator().manual_seed(0)
        ok = True
        for shape, size in (((2, 5, 13, 17), (101, 131)), ((1, 4, 9, 30), (64, 203)), ((1, 6, 31, 7), (480, 45))):
            x = (torch.randn(shape, generator=gen) * 4).to(device=device, dtype=dtype)
            ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            ok &= bool(torch.equal(_emulated_resize(x.cpu(), size), ref.cpu()))
        _CHECKED[key] = ok
    return _CHECKED[key]


def banded_applies(logits: Tensor, size: Sequence[int]) -> bool:
    """Whether :func:`upsampled_class_map` takes the banded path for these logits (else resize then argmax)."""
    return (
        logits.device.type == "cpu"
        and logits.dtype in EMULATED
        and logits.dim() == 4
        and logits.shape[1] > 3  # C <= 3 (one thread) and outputs with H + W <= 128 use PyTorch's channels-last kernel
        and size[0] + size[1] > 128
        and logits.numel() > 0
        and emulation_matches(logits.device, logits.dtype)
    )


def _shifted(t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four pixels (i, j), (i, j+1), (i+1, j), (i+1, j+1) of each block of a (..., h, w) map, edges repeated."""
    t = torch.cat([t, t[..., -1:, :]], -2)
    t = torch.cat([t, t[..., -1:]], -1)
    return t[..., :-1, :-1], t[..., :-1, 1:], t[..., 1:, :-1], t[..., 1:, 1:]


def _block_min_max(t: Tensor) -> tuple[Tensor, Tensor]:
    """Smallest and largest value over each block's four pixels."""
    a, b, c, d = _shifted(t)
    return torch.minimum(torch.minimum(a, b), torch.minimum(c, d)), torch.maximum(
        torch.maximum(a, b), torch.maximum(c, d)
    )


def _candidates(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per block (B,h,w): the one class that can lead an output pixel in it (-1: more than one can), and
    classes (B,h,w,K), ascending, that include all that can (K the largest number of them over the blocks).

    An output value lies between its class's smallest and largest logit at the block's four pixels, up to
    rounding: each computed value is within ``6 u M`` of that range (``u`` the float32 unit roundoff, M the
    largest |logit| at the four pixels; storing in bf16/fp16 adds ``u_dtype M``). A class whose largest logit is
    more than ``8 eps(dtype) M`` below the best smallest logit of another class cannot lead. One candidate left:
    it is the class id of every output pixel of the block, nothing to interpolate.
    """
    v = x.float().permute(0, 2, 3, 1).contiguous()  # (B,h,w,C): reductions over C on contiguous memory
    lo, hi = _block_min_max(v.movedim(-1, 1))
    lo, hi = lo.movedim(1, -1), hi.movedim(1, -1)
    big = _block_min_max(v.abs().amax(-1))[1]
    threshold = lo.amax(-1) - _TAU * torch.finfo(x.dtype).eps * big - 1e-30
    count = (hi >= threshold[..., None]).sum(-1)
    top = hi.topk(int(count.max()), dim=-1).indices
    sure = torch.where(count == 1, top[..., 0], -1)
    return sure, top.sort(dim=-1).values


def _lead(corners: Sequence[Tensor], wh: Sequence[Tensor], ww: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Index of the largest plain float32 interpolation (P,K) where it leads by more than rounding can undo, else -1."""
    x00, x01, x10, x11 = corners
    vals = (x00 * ww[0] + x01 * ww[1]) * wh[0] + (x10 * ww[0] + x11 * ww[1]) * wh[1]
    big = torch.stack([c.abs().amax(1) for c in corners]).amax(0)
    top = vals.topk(2, dim=1) if vals.shape[1] > 1 else None
    if top is None:
        return torch.zeros(len(vals), dtype=torch.long)
    lead = top.values[:, 0] - top.values[:, 1]
    return torch.where(lead > 4 * _TAU * torch.finfo(dtype).eps * big + 1e-30, top.indices[:, 0], -1)


@torch.no_grad()
def upsampled_class_map(logits: Tensor, size: Sequence[int], band_rows: int = BAND_ROWS) -> Tensor:
    """``class_map(resize(logits, size))`` (bilinear, align_corners=False, first maximum), bit for bit, computed
    ``band_rows`` output rows at a time so no (B,C,H,W) map is ever made (see the module docstring)."""
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) == size:
        return class_map(logits)
    if logits.dim() == 4 and logits.shape[1] * size[0] * size[1] * logits.element_size() <= PLAIN_BYTES:
        return torch.cat(
            [
                class_map(F.interpolate(f.contiguous(), size=size, mode="bilinear", align_corners=False))
                for f in logits.split(1)
            ]
        )
    if not banded_applies(logits, size) or not bool(torch.isfinite(logits).all()):
        return class_map(F.interpolate(logits.contiguous(), size=size, mode="bilinear", align_corners=False))
    x = logits.contiguous()
    b, c, h, w = x.shape
    hi0, hi1, hl0, hl1 = _axis(h, size[0], x.dtype)
    wi0, wi1, wl0, wl1 = _axis(w, size[1], x.dtype)
    sure, ids = _candidates(x)
    k = ids.shape[-1]
    sure = sure[:, :, wi0]  # (B,h,W): the block left of each output column
    ids = ids.reshape(b * h * w, k)
    out = torch.empty(b, *size, dtype=torch.long)
    flat = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # pixel-major: one pixel's C logits are one row
    step = max(1, int(band_rows))
    for r0 in range(0, size[0], step):
        r1 = min(size[0], r0 + step)
        band = sure[:, hi0[r0:r1]]
        out[:, r0:r1] = band
        todo = (band < 0).nonzero()
        for k0 in range(0, len(todo), CHUNK_PIXELS):
            n, r, col = todo[k0 : k0 + CHUNK_PIXELS].unbind(1)
            row = r + r0
            base = n * (h * w)
            ia, ib, ja, jb = hi0[row] * w, hi1[row] * w, wi0[col], wi1[col]
            cls = ids[base + ia + ja]  # (P,K) candidate classes of the block, ascending: ties keep the first
            corners = [flat[(base + i + j)[:, None], cls].float() for i in (ia, ib) for j in (ja, jb)]
            wh, ww = (hl0[row, None], hl1[row, None]), (wl0[col, None], wl1[col, None])
            best = _lead(corners, [t.float() for t in wh], [t.float() for t in ww], x.dtype)
            near = best < 0  # a near tie: the kernel's exact bits decide
            if bool(near.any()):
                exact = _interpolate(
                    [t[near].double() for t in corners], [t[near] for t in wh], [t[near] for t in ww], x.dtype
                )
                best[near] = exact.max(1).indices
            out[n, row, col] = cls.gather(1, best[:, None])[:, 0]
    return out
