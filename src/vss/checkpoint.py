"""Checkpoint IO. Reading: :func:`load_checkpoint`, the one reader of every model file (``torch.load`` with
``weights_only=True`` always; a file that needs full unpickling is refused unless the user trusts it). Writing:
atomic, a crash mid-save never leaves a truncated ``.ckpt`` behind; a kill mid-save leaves a ``.NAME.*.tmp`` file,
which the next start of the same run removes; checkpoints get the process's umask."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import Tensor

from vss.errors import ConfigError

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
    """Lightning checkpoint IO that writes every checkpoint (best and last) atomically and reads them (a resume)
    with :func:`load_checkpoint`."""

    def __init__(self, trust_pickle: bool = False) -> None:
        super().__init__()
        self.trust_pickle = bool(trust_pickle)

    def load_checkpoint(self, path: _PATH, map_location: Any = None, weights_only: bool | None = None) -> Any:
        return load_checkpoint(path, key="ckpt_path", trust_pickle=self.trust_pickle, expect="dict", mmap=False)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)


def checkpoint_step(path: _PATH, trust_pickle: bool = False) -> int | None:
    """The training step a Lightning checkpoint was saved at (its tensors memory-mapped, not read); None if unknown."""
    step = load_checkpoint(path, trust_pickle=trust_pickle, expect="dict").get("global_step")
    return int(step) if step is not None else None


class CheckpointError(ConfigError):
    """A model file that cannot be loaded as asked; the message names the file, what it holds and what was expected."""


TRUST_FLAG = "trust_pickle=true"
"""How a Hydra CLI trusts a file that needs full unpickling (argparse CLIs: ``--trust-pickle``)."""

EXPECTED = {
    "vss": "a vss checkpoint (a .ckpt written by vss.train or vss.convert: state_dict and hyper_parameters.config)",
    "weights": "a checkpoint holding a state dict of tensors (plain, or under 'state_dict' or 'model')",
    "dict": "a checkpoint written by torch.save holding a dict",
}
"""What :func:`load_checkpoint` accepts for each ``expect``, as its errors say."""


def _describe_bytes(head: bytes) -> str:
    """What a file that is no torch checkpoint looks like: text (its first words) or binary (its first bytes)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        words = " ".join(text.split())[:40]
        return f"a text file (it starts with {words!r})"
    return f"binary data (it starts with bytes {head[:8].hex(' ')})"


def _kind(obj: Any) -> str:
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return f"a bare state dict of {len(obj)} tensors (no training config)"
    if isinstance(obj, Mapping):
        keys = list(obj)[:4]
        return f"a dict with keys {keys}" + (" ..." if len(obj) > 4 else "")
    return f"a {type(obj).__module__}.{type(obj).__name__}" if not isinstance(obj, Tensor) else "a bare tensor"


def _check_kind(obj: Any, expect: str, where: str) -> None:
    """``obj`` is what ``expect`` names (:data:`EXPECTED`), else a :class:`CheckpointError`."""
    ok = isinstance(obj, Mapping)
    if ok and expect == "vss":
        config = obj.get("hyper_parameters")
        config = config.get("config") if isinstance(config, Mapping) else None
        ok = isinstance(obj.get("state_dict"), Mapping) and isinstance(config, Mapping)
        if ok is False and isinstance(obj.get("state_dict"), Mapping):
            raise CheckpointError(
                f"{where} is not a vss checkpoint: it has a state_dict but no hyper_parameters.config (the training "
                "config that rebuilds the model): expected a .ckpt written by vss.train or vss.convert"
            )
    elif ok and expect == "weights":
        state = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), obj)
        ok = bool(state) and all(isinstance(v, Tensor) for v in state.values())
    if not ok:
        noun = "vss checkpoint" if expect == "vss" else "checkpoint of that kind"
        raise CheckpointError(f"{where} is not a {noun}: it holds {_kind(obj)}; expected {EXPECTED[expect]}")


def load_checkpoint(
    path: _PATH,
    *,
    key: str = "ckpt_path",
    trust_pickle: bool = False,
    expect: str = "vss",
    flag: str | None = TRUST_FLAG,
    mmap: bool = True,
) -> Any:
    """Read the model file ``path`` (given as ``key``) with ``torch.load(weights_only=True)``; check it is ``expect``.

    ``expect``: ``vss`` (state_dict + hyper_parameters.config), ``weights`` (tensors, plain or under
    ``state_dict`` / ``model``) or ``dict``. A file that is not a torch checkpoint, a truncated archive, another
    kind of object and a file that needs full unpickling are each one :class:`CheckpointError` naming ``key``, the
    file and what was expected. ``trust_pickle=True`` (the user's ``flag``) unpickles fully: that runs whatever
    code the file names, so only for files from a trusted origin (``flag=None``: no flag for this kind of file).
    ``mmap``: tensors are mapped, not read.
    """
    if expect not in EXPECTED:
        raise ValueError(f"expect={expect!r}: one of {list(EXPECTED)}")
    p = Path(str(path)).expanduser()
    where = f"{key}={str(path)!r}"
    if not p.is_file():
        what = "a directory, not a checkpoint file" if p.is_dir() else "the file does not exist"
        raise CheckpointError(f"{where} is invalid: {what}")
    with open(p, "rb") as f:
        head = f.read(64)
    archive = zipfile.is_zipfile(p)
    if not archive and head.startswith(b"PK\x03\x04"):
        raise CheckpointError(
            f"{where} is a truncated or damaged archive ({p.stat().st_size} bytes, no zip directory at its end): "
            "copy or download it again"
        )
    if not archive and not head.startswith(b"\x80"):  # torch.save writes a zip archive (legacy: a pickle)
        what = _describe_bytes(head)
        raise CheckpointError(f"{where} cannot be read as a checkpoint: it is {what}; expected {EXPECTED[expect]}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=not trust_pickle, mmap=mmap and archive)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        if trust_pickle or "Weights only load failed" not in str(e):
            raise CheckpointError(f"{where} cannot be read: {' '.join(str(e).split())[:200]}") from None
        what = f"the Python object {named.group(1)}" if named else "Python objects beyond tensors and containers"
        how = f"if you trust where it comes from, pass {flag}" if flag else "expected tensors and plain containers only"
        raise CheckpointError(
            f"{where} needs full unpickling (it names {what}), which runs code chosen by the file: refused; {how}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{where} cannot be read (damaged or truncated?): {type(e).__name__}: {first}") from None
    _check_kind(obj, expect, where)
    return obj


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
