"""Staged training: start from another run's weights (``init_from``), re-initialise parts (``init_exclude``),
and keep frozen parts out of SyncBatchNorm.

``init_from=PATH`` loads weights only -- no optimizer state, no step, no schedule -- from a vss checkpoint:
a Lightning ``.ckpt`` written by ``vss.train`` (``state_dict`` with the ``segmenter.`` prefix) or the
weights-only checkpoint of ``vss.convert``; a bare Segmenter state dict (``encoder.*``, ``aggregator.*``)
works too. Loading is non-strict and prints what was loaded, missing and unexpected; ``init_exclude``
(key prefixes, e.g. ``[aggregator.classifier]``) drops those tensors from the checkpoint first, so the
model keeps its fresh initialisation there. A tensor whose shape differs from the model's is an error
unless excluded. ``ckpt_path=`` (resume: weights, optimizer, step) and ``init_from=`` exclude each other.

The ``freeze`` list itself is :class:`vss.models.segmenter.Segmenter`'s (no gradient, eval mode through
``train()``); :func:`convert_sync_batchnorm` converts only the parts that are not frozen.
"""

from __future__ import annotations

import difflib
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from vss.config import ConfigError

PREFIX = "segmenter."
"""The Segmenter's prefix in a Lightning ``state_dict`` (``VSSModule.segmenter``)."""
MAX_SHOWN = 8


def preview(keys: Sequence[str], limit: int = MAX_SHOWN) -> str:
    """``[a, b, ... (+n more)]``: at most ``limit`` keys of a list."""
    more = len(keys) - limit
    return "[" + ", ".join(keys[:limit]) + (f", ... (+{more} more)" if more > 0 else "") + "]"


def _matches(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _cover(modules: list[str], limit: int = 3) -> list[str]:
    """At most ``limit`` prefixes covering ``modules``: their deepest common module when there are more."""
    if len(modules) <= limit:
        return modules
    parts = [m.split(".") for m in modules]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return [".".join(common)] if common else sorted({p[0] for p in parts})


def read_checkpoint(path: str | Path, key: str = "init_from", mmap: bool = False) -> dict[str, Any]:
    """Read a local checkpoint file into a dict; :class:`ConfigError` naming ``key`` and the file otherwise.

    ``mmap=True`` maps the tensors instead of reading them (cheap: to look at the checkpoint's keys).
    """
    p = Path(str(path)).expanduser()
    if not p.is_file():
        what = "a directory, not a checkpoint file" if p.is_dir() else "the file does not exist"
        raise ConfigError(f"{key}={str(path)!r} is invalid: {what}")
    try:
        # a local file written by vss.train / vss.convert (the config in hyper_parameters is plain containers)
        ckpt = torch.load(p, map_location="cpu", weights_only=False, mmap=mmap and zipfile.is_zipfile(p))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ImportError, OSError) as e:
        raise ConfigError(f"{key}={str(path)!r} is not a checkpoint torch can read ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{key}={str(path)!r} is not a checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    return ckpt


def segmenter_state_dict(ckpt: Mapping[str, Any], path: str | Path = "", key: str = "init_from") -> dict[str, Tensor]:
    """The Segmenter's tensors (``encoder.*``, ``aggregator.*``) of a Lightning or bare checkpoint."""
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(
            f"{key}={str(path)!r} is not a vss checkpoint: expected a state_dict of tensors (a .ckpt written by "
            "vss.train or vss.convert, or a bare Segmenter state dict)"
        )
    if any(k.startswith(PREFIX) for k in state):
        return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    return dict(state)


@dataclass
class InitReport:
    """What ``init_from`` did: tensors loaded, excluded (re-initialised), missing and unexpected keys."""

    path: str
    loaded: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``[vss] init_from PATH: loaded N tensors; excluded ...; missing: [...]; unexpected: [...]``."""
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.excluded:
            parts.append(f"excluded (re-initialised) {len(self.excluded)}: {preview(self.excluded)}")
        parts.append(f"missing {len(self.missing)}: {preview(self.missing)}")
        parts.append(f"unexpected {len(self.unexpected)}: {preview(self.unexpected)}")
        return f"[vss] init_from {self.path}: " + "; ".join(parts)


def load_weights(
    model: nn.Module,
    state: Mapping[str, Tensor],
    exclude: Sequence[str] = (),
    path: str | Path = "",
) -> InitReport:
    """Load ``state`` (the model's keys) into ``model`` non-strictly, without the keys under ``exclude``.

    A prefix of ``exclude`` that matches no key of the checkpoint or the model is an error (a typo would
    silently load the tensors one meant to re-initialise), as is a shape mismatch outside ``exclude``.
    """
    expected = model.state_dict()
    prefixes = [str(p).rstrip(".") for p in exclude]
    for prefix in prefixes:
        if not prefix or not any(_matches(k, prefix) for k in (*state, *expected)):
            modules = [n for n, _ in model.named_modules() if n]
            close = difflib.get_close_matches(prefix, modules, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"init_exclude: {prefix!r} matches no key of the checkpoint or the model{hint}")
    excluded = sorted(k for k in state if any(_matches(k, p) for p in prefixes))
    kept = {k: v for k, v in state.items() if not any(_matches(k, p) for p in prefixes)}
    if kept and not any(k in expected for k in kept):
        raise ConfigError(
            f"init_from={str(path)!r}: none of its {len(kept)} tensors is a key of the model (e.g. "
            f"{next(iter(kept))!r}; the model's are encoder.*, aggregator.*); an official checkpoint is imported "
            "with python -m vss.convert first"
        )
    mismatched = sorted(k for k, v in kept.items() if k in expected and v.shape != expected[k].shape)
    if mismatched:
        rows = [f"{k}: checkpoint {tuple(kept[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched]
        parents = _cover(sorted({k.rsplit(".", 1)[0] for k in mismatched}))
        raise ConfigError(
            f"init_from={str(path)!r}: {len(mismatched)} tensors do not match the model's shapes: "
            f"{preview(rows)}; re-initialise them with init_exclude=[{','.join(parents)}] "
            "(or build the same model: encoder, model and data.num_classes as the checkpoint)"
        )
    result = model.load_state_dict(kept, strict=False)
    return InitReport(
        path=str(path),
        loaded=sorted(k for k in kept if k in expected),
        excluded=excluded,
        missing=sorted(k for k in result.missing_keys if not any(_matches(k, p) for p in prefixes)),
        unexpected=sorted(result.unexpected_keys),
    )


def check_stages(cfg: DictConfig) -> dict[str, Tensor] | None:
    """Check ``init_from`` / ``init_exclude`` / ``ckpt_path`` before anything is built; read ``init_from``.

    Returns the Segmenter tensors of ``init_from`` (None without it). Raises :class:`ConfigError` for a
    missing or unreadable file, ``init_from`` together with ``ckpt_path``, and a weights-only checkpoint
    (no optimizer state, e.g. from ``vss.convert``) given as ``ckpt_path``.
    """
    init_from = cfg.get("init_from")
    ckpt_path = cfg.get("ckpt_path")
    exclude = cfg.get("init_exclude") or []
    if not OmegaConf.is_list(exclude) and not isinstance(exclude, list | tuple):
        raise ConfigError(f"init_exclude={exclude!r} is invalid: expected a list of key prefixes, e.g. [aggregator]")
    if exclude and init_from is None:
        raise ConfigError("init_exclude is set but init_from is not: it drops keys of the init_from checkpoint")
    if init_from is not None and ckpt_path is not None:
        raise ConfigError(
            f"init_from={str(init_from)!r} and ckpt_path={str(ckpt_path)!r} exclude each other: to resume a run "
            "(weights, optimizer, step) pass only ckpt_path= (drop init_from=); to start a new run from weights only "
            "pass only init_from="
        )
    if ckpt_path is not None:
        ckpt = read_checkpoint(ckpt_path, "ckpt_path", mmap=True)
        if "optimizer_states" not in ckpt or "global_step" not in ckpt:
            raise ConfigError(
                f"ckpt_path={str(ckpt_path)!r} is a weights-only checkpoint (no optimizer state or step, e.g. "
                f"written by vss.convert): use init_from={ckpt_path} to start training from its weights"
            )
    if init_from is None:
        return None
    return segmenter_state_dict(read_checkpoint(init_from), init_from)


def init_weights(segmenter: nn.Module, cfg: DictConfig, state: Mapping[str, Tensor]) -> InitReport:
    """Load ``init_from``'s tensors (from :func:`check_stages`) into ``segmenter`` with ``init_exclude``."""
    return load_weights(segmenter, state, list(cfg.get("init_exclude") or []), cfg.init_from)


def convert_sync_batchnorm(segmenter: nn.Module, frozen: Sequence[str] = ()) -> nn.Module:
    """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` on every part of ``segmenter`` except ``frozen``.

    ``frozen`` defaults to the segmenter's own ``frozen`` modules; frozen BatchNorm layers keep their
    running statistics and stay plain BatchNorm (in eval mode they would not synchronise anyway).
    """
    names = [str(p).rstrip(".") for p in (frozen or getattr(segmenter, "frozen", {}))]

    def convert(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            full = f"{prefix}{name}"
            if any(_matches(full, f) for f in names):
                continue  # frozen, or inside a frozen module
            if any(_matches(f, full) for f in names):
                convert(child, f"{full}.")  # holds a frozen module: go down to its siblings
            else:
                setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))

    convert(segmenter, "")
    return segmenter
