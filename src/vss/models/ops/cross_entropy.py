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

BAND_VALUES = 1 << 18
"""Target size of one band of upsampled logits (values; 1 MiB in fp32)."""


def source_rows(out_size: int, in_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear ``align_corners=False`` source rows of each output row: (y0, y1, weight of y1), as ATen computes
    them (scale in_size / out_size, negative source coordinates clamped to 0)."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    y0 = src.floor().long().clamp_(max=in_size - 1)
    y1 = (y0 + 1).clamp_(max=in_size - 1)
    return y0, y1, src - y0


class _BandedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int, avg_non_ignore: bool) -> Tensor:  # type: ignore[override]
        x = logits.detach().float()
        n, c, h_in, w_in = x.shape
        h, w = labels.shape[-2:]
        y0, y1, wy = source_rows(h, h_in, x.device)
        grad = torch.zeros_like(x)
        total = x.new_zeros(())
        rows = max(1, BAND_VALUES // max(1, n * c * w))
        for r0 in range(0, h, rows):  # in fp32 whatever the autocast (as autocast runs F.cross_entropy)
            r1 = min(h, r0 + rows)
            a, b = int(y0[r0]), int(y1[r1 - 1]) + 1  # the input rows this band reads
            with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
                xs = x[:, :, a:b].detach().requires_grad_(True)
                lam = wy[r0:r1].view(1, 1, -1, 1)
                band = xs[:, :, y0[r0:r1] - a] * (1 - lam) + xs[:, :, y1[r0:r1] - a] * lam  # (N, C, rows, W_in)
                up = F.interpolate(band, size=(r1 - r0, w), mode="bilinear", align_corners=False)  # width only
                loss = F.cross_entropy(up, labels[:, r0:r1], ignore_index=ignore_index, reduction="sum")
                (g,) = torch.autograd.grad(loss, xs)
            grad[:, :, a:b] += g
            total += loss.detach()
        divisor = (labels != ignore_index).sum() if avg_non_ignore else torch.tensor(float(labels.numel()))
        divisor = divisor.to(x.device, torch.float32)
        ctx.save_for_backward(grad, divisor)
        ctx.dtype = logits.dtype
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad, divisor = ctx.saved_tensors
        return (grad * (grad_output / divisor)).to(ctx.dtype), None, None, None


def banded_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int, avg_non_ignore: bool = False) -> Tensor:
    """Cross-entropy of ``logits`` (N, C, h, w) resized bilinearly (``align_corners=False``) to ``labels``'s
    (N, H, W) size, pixels labelled ``ignore_index`` left out of the sum; the mean over all pixels
    (``avg_non_ignore=False``, mmseg 0.x) or over the labelled ones. Equal to ``F.cross_entropy`` of
    ``F.interpolate(logits)`` (value and gradient, up to the order of fp32 sums) without the full-size maps."""
    return _BandedCrossEntropy.apply(logits, labels, ignore_index, avg_non_ignore)
