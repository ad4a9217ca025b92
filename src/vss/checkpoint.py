"""Atomic checkpoint writes: a crash mid-save never leaves a truncated ``.ckpt`` behind; a kill mid-save leaves a
``.NAME.*.tmp`` file, which the next start of the same run removes; checkpoints get the process's umask."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import Tensor

TMP_GLOB = ".*.tmp"
"""The temporary files of :func:`atomic_torch_save` (``.last.ckpt.<random>.tmp``)."""


def umask() -> int:
    """The process's file mode creation mask (read without changing it for good)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporary_files(dirpath: _PATH) -> list[Path]:
    """Delete the half-written temporary checkpoints a killed write left in ``dirpath``; returns them.

    Call it when a run starts or resumes, before anything of this run writes there.
    """
    stale = sorted(Path(dirpath).glob(TMP_GLOB)) if Path(dirpath).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` into a temporary file next to ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600; a checkpoint is as readable as any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes every checkpoint (best and last) atomically."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)


def checkpoint_step(path: _PATH) -> int | None:
    """The training step a Lightning checkpoint was saved at (its tensors memory-mapped, not read); None if unknown."""
    step = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step")
    return int(step) if step is not None else None


@dataclass
class ImportResult:
    """What a model's importer returns.

    ``state_dict``: the Segmenter's tensors (``encoder.*``, ``aggregator.*``). ``overrides``: Hydra
    overrides the weights imply (``encoder=mit_b1``, ``data.num_classes=124``, ...); one that the user
    sets to another value is an error. ``defaults``: overrides used unless the user sets the same key
    (e.g. ``experiment=mrcfa_vspw``). ``origin``: the official name of each converted key. ``dropped``:
    official keys left out on purpose; ``unknown``: official keys with no counterpart (an error).
    """

    state_dict: dict[str, Tensor]
    overrides: list[str]
    defaults: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
