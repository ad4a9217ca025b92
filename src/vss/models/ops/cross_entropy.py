"""Pixel cross-entropy of logits upsampled to the label size, in bands of output rows (training speed).

mmseg's loss (the official MRCFA/SegFormer code) resizes the logits bilinearly to the label size, then takes the
pixel cross-entropy: every loss term writes and re-reads the whole (N, C, H, W) map at full resolution about eight
times (upsample, log-softmax, the NLL's zero-filled gradient, the log-softmax backward, the upsample backward),
and keeps two such maps alive until the backward. :func:`banded_cross_entropy` computes the same sum over the same
pixels a band of output rows at a time: each band is upsampled from the input rows it reads, its loss summed and
its gradient taken at once (a band's working set fits in the cache), and the gradient with respect to the
low-resolution logits accumulated; the backward multiplies that by the incoming gradient. Same function, same
gradient, up to the order of fp32 sums (tests/test_train_ops.py compares both with the full-map formulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BAND_VALUES = 1 << 19
"""Target size of one band of upsampled logits (values; 2 MiB in fp32): smaller bands pay ~20 ops of overhead
each, larger ones fall out of the cache (124 classes at 480x480, one core, loss and gradient: N = 8, 798 ms at
1 MiB, 816 at 2 MiB, 969 at 4 MiB; N = 2: 235, 227, 243 ms)."""


def source_rows(out_size: int, in_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear ``align_corners=False`` source rows of each output row: (y0, y1, weight of y1), as ATen computes
    them (scale in_size / out_size, negative source coordinates clamped to 0)."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    y0 = src.floor().long().clamp_(max=in_size - 1)
    y1 = (y0 + 1).clamp_(max=in_size - 1)
    return y0, y1, src - y0


def _bilinear_taps(x: Tensor, rows: Tensor, lam: Tensor, dim: int) -> Tensor:
    """``x`` interpolated along ``dim`` between the source indices ``rows`` = (i0, i1) with weight ``lam`` of i1
    (broadcast along ``dim``): ATen's ``(1 - lam) x[i0] + lam x[i1]`` (as ``lerp``: the same up to rounding)."""
    a = x.index_select(dim, rows[0])
    return a.lerp_(x.index_select(dim, rows[1]), lam)


def _add_taps(out: Tensor, grad: Tensor, rows: Tensor, lam: Tensor, dim: int) -> None:
    """The transpose of :func:`_bilinear_taps`: ``grad`` weighted by ``1 - lam`` and ``lam`` added into ``out``
    at the source indices along ``dim`` (``grad`` is overwritten)."""
    part = grad * lam
    out.index_add_(dim, rows[1], part)
    out.index_add_(dim, rows[0], grad.sub_(part))  # grad (1 - lam); ``grad`` is overwritten


def _columns(v: Tensor, width: int) -> Tensor:
    """A band (w_in, rows, N, C) interpolated along its first axis to ``width``: ATen's bilinear kernel on the
    band seen as one channels-last image (C channels, w_in x rows*N pixels), resized along its height only."""
    w_in, rows, n, c = v.shape
    image = v.view(1, w_in, rows * n, c).permute(0, 3, 1, 2)
    out = F.interpolate(image, size=(width, rows * n), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).view(width, rows, n, c)


def _columns_transposed(g: Tensor, w_in: int) -> Tensor:
    """The transpose of :func:`_columns`: a (W, rows, N, C) gradient taken back to (w_in, rows, N, C)."""
    width, rows, n, c = g.shape
    image = g.view(1, width, rows * n, c).permute(0, 3, 1, 2)
    out = torch.ops.aten.upsample_bilinear2d_backward(image, [width, rows * n], [1, c, w_in, rows * n], False)
    return out.permute(0, 2, 3, 1).reshape(w_in, rows, n, c)


TINY = 1e-30
"""Softmax values below this have lost relative precision (float32 underflows near 1e-38 and 1e-45)."""
HOST_READS = True
"""Branch on band values where the logits are on the CPU (see :func:`_softmax_and_log_target`); the tests turn it
off to run the accelerator formulation on the CPU."""


def _softmax_and_log_target(u: Tensor, target: Tensor, host_reads: bool) -> tuple[Tensor, Tensor]:
    """softmax(u) over the last axis and log softmax(u) at the ``target`` classes.

    ``host_reads`` (CPU tensors, where reading a value costs nothing): one softmax pass, the log of the target's
    softmax, and for the rare pixels whose softmax is too small to carry it (a logit gap above ~69)
    ``u - logsumexp(u)`` for those alone. Else (an accelerator: no synchronisation per band) log_softmax, then its
    exp."""
    if not host_reads:
        log_p = torch.log_softmax(u, -1)
        return log_p.gather(-1, target).squeeze(-1), log_p.exp_()
    p = torch.softmax(u, -1)
    picked = p.gather(-1, target).squeeze(-1)
    out = picked.log()
    tiny = picked < TINY
    if bool(tiny.any()):
        rows = u[tiny]
        out[tiny] = rows.gather(-1, target[tiny]).squeeze(-1) - rows.logsumexp(-1)
    return out, p


class _BandedCrossEntropy(torch.autograd.Function):
    """The loss and its gradient in one pass over bands of output rows, pixel-major (classes innermost).

    Per band: the two-tap bilinear interpolation of the rows (ATen's source indices and weights) and then of the
    columns (ATen's own kernel on the band seen as a channels-last image), the softmax over the contiguous class
    axis, the summed NLL of the labelled pixels (see :func:`_softmax_and_log_target`), and
    the gradient written analytically (``softmax - onehot`` at labelled pixels, 0 at ignored ones) and taken back
    through the two interpolations (their transposes: ATen's channels-last upsample backward for the columns,
    index_add of the weighted taps for the rows). No autograd graph, no zero-filled NLL gradient, no NCHW upsample
    backward (a scatter over NCHW maps: 15% of an MRCFA-B1 step)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int, avg_non_ignore: bool) -> Tensor:  # type: ignore[override]
        x = logits.detach().float()  # fp32 whatever the autocast (as autocast runs F.cross_entropy)
        n, c, h_in, w_in = x.shape
        h, w = labels.shape[-2:]
        xp = x.permute(3, 2, 0, 1).contiguous()  # (w_in, h_in, N, C): a band's rows are slices of dim 1
        y0, y1, wy = source_rows(h, h_in, x.device)
        lab = labels.permute(2, 1, 0)  # (W, H, N) as the band's (W, rows, N, C) values
        host_reads = x.device.type == "cpu" and HOST_READS
        grad = torch.zeros_like(xp)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        rows = max(1, BAND_VALUES // max(1, n * c * w))
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            band_rows, ly = torch.stack([y0[r0:r1], y1[r0:r1]]), wy[r0:r1].view(1, -1, 1, 1)
            v = _bilinear_taps(xp, band_rows, ly, 1)  # (w_in, rows, N, C)
            u = _columns(v, w)  # (W, rows, N, C): the band of upsampled logits
            y = lab[:, r0:r1]
            valid = y != ignore_index
            target = torch.where(valid, y, 0).unsqueeze(-1)
            log_target, p = _softmax_and_log_target(u, target, host_reads)
            total -= (log_target * valid).sum(dtype=torch.float64)
            keep = valid.unsqueeze(-1).to(p.dtype)
            if not host_reads or not bool(valid.all()):
                p *= keep  # 0 at ignored pixels
            p.scatter_add_(-1, target, -keep)  # - onehot(label)
            _add_taps(grad, _columns_transposed(p, w_in), band_rows, ly, 1)
        divisor = (labels != ignore_index).sum() if avg_non_ignore else torch.tensor(float(labels.numel()))
        divisor = divisor.to(x.device, torch.float32)
        ctx.save_for_backward(grad.permute(2, 3, 1, 0), divisor)
        ctx.dtype = logits.dtype
        return total.float() / divisor

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad, divisor = ctx.saved_tensors
        scale = grad_output / divisor
        out = torch.empty(grad.shape, dtype=ctx.dtype, device=grad.device)  # NCHW
        if ctx.dtype == grad.dtype:
            torch.mul(grad, scale, out=out)  # one pass from the band layout to NCHW
        else:
            out.copy_(grad * scale)
        return out, None, None, None


def banded_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int, avg_non_ignore: bool = False) -> Tensor:
    """Cross-entropy of ``logits`` (N, C, h, w) resized bilinearly (``align_corners=False``) to ``labels``'s
    (N, H, W) size, pixels labelled ``ignore_index`` left out of the sum; the mean over all pixels
    (``avg_non_ignore=False``, mmseg 0.x) or over the labelled ones. Equal to ``F.cross_entropy`` of
    ``F.interpolate(logits)`` (value and gradient, up to the order of fp32 sums) without the full-size maps."""
    return _BandedCrossEntropy.apply(logits, labels, ignore_index, avg_non_ignore)
