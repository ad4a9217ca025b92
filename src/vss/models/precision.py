"""Inference precision: Lightning's ``trainer.precision`` names mapped to ``torch.autocast`` for the loops that
run outside a Trainer (``vss.eval``, ``vss.bench``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from vss.errors import ConfigError

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")


@contextlib.contextmanager
def inference_precision(precision: str | int, device: torch.device, key: str = "trainer.precision") -> Iterator[None]:
    """``32-true``: fp32 as is; ``bf16-mixed`` / ``16-mixed``: ``torch.autocast`` in bfloat16 / float16 (float16 on
    CUDA only), as Lightning's mixed-precision plugin does for a step."""
    name = str(precision)
    if name not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} is invalid: expected one of {list(PRECISIONS)}")
    if name in ("32-true", "32"):
        yield
        return
    if name == "16-mixed" and device.type != "cuda":
        raise ConfigError(f"{key}=16-mixed needs a GPU (device={device.type}); use {key}=bf16-mixed on CPU")
    dtype = torch.bfloat16 if name == "bf16-mixed" else torch.float16
    with torch.autocast(device.type, dtype=dtype):
        yield
