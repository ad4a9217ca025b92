"""ImageNet normalisation on the model's device: uint8 frames cross from the data workers, floats enter the network.

The arithmetic is albumentations' ``Normalize`` on uint8 (its per-channel lookup table): float32 ``(x - m) * d`` with
``m = float32(mean) * 255`` and ``d = 1 / (float32(std) * 255)``, so a frame normalised here is bit for bit the frame
the data pipeline used to normalise in the worker.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def _constants(device: torch.device) -> tuple[Tensor, Tensor]:
    """(m, d) as (3,1,1) float32 on ``device``, computed as albumentations computes them (numpy float32)."""
    mean = np.array(IMAGENET_MEAN, dtype=np.float32) * 255.0
    denominator = np.reciprocal(np.array(IMAGENET_STD, dtype=np.float32) * 255.0)
    return tuple(torch.from_numpy(v).view(3, 1, 1).to(device) for v in (mean, denominator))  # type: ignore[return-value]


def normalize_frames(frames: Tensor, valid: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """uint8 RGB frames (..., 3, H, W) -> ImageNet-normalised float32 (``dtype`` if given); a float input is taken as
    already normalised and returned as it is.

    ``valid`` (B, 2): the (height, width) of each sample before it was padded at the bottom/right to the batch's
    size; the padding is zero after normalisation, as mmseg pads after ``Normalize`` (frames (B, ..., 3, H, W)).
    """
    if frames.is_floating_point():
        return frames
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8 (0..255) or already normalised floats, got {frames.dtype}")
    mean, denominator = _constants(frames.device)
    out = torch.sub(frames.float(), mean).mul_(denominator)
    if valid is not None:
        h, w = frames.shape[-2:]
        valid = valid.to(frames.device)
        rows = torch.arange(h, device=frames.device) < valid[:, :1]  # (B, H)
        cols = torch.arange(w, device=frames.device) < valid[:, 1:]  # (B, W)
        inside = (rows[:, :, None] & cols[:, None, :]).view(len(frames), *[1] * (frames.ndim - 3), h, w)
        out.masked_fill_(~inside, 0.0)
    return out if dtype is None or dtype == out.dtype else out.to(dtype)
