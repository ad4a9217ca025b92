"""Staged training: start from another run's weights (``init_from``), re-initialise parts (``init_exclude``),
and keep frozen parts out of SyncBatchNorm.

``init_from=PATH`` loads weights only -- no optimizer state, no step, no schedule -- from a vss checkpoint:
a Lightning ``.ckpt`` written by ``vss.train`` (``state_dict`` with the ``segmenter.`` prefix), the
weights-only checkpoint of ``vss.convert``, or a model folder (``vss.export format=folder``: its
model.safetensors); a bare Segmenter state dict (``encoder.*``, ``aggregator.*``) works too. Loading is
non-strict and prints what was loaded, missing and unexpected; ``init_exclude`` (key prefixes, e.g.
``[aggregator.classifier]``) drops those tensors from the checkpoint first, so the model keeps its fresh
initialisation there. A tensor whose shape differs from the model's is an error unless excluded.
``ckpt_path=`` (resume: weights, optimizer, step) and ``init_from=`` exclude each other.

The ``freeze`` list itself is :class:`vss.models.segmenter.Segmenter`'s (no gradient, eval mode through
``train()``); :func:`convert_sync_batchnorm` converts only the parts that are not frozen.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from vss.errors import ConfigError

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


def read_checkpoint(
    path: str | Path, key: str = "init_from", mmap: bool = False, trust_pickle: bool = False
) -> dict[str, Any]:
    """Read a local checkpoint file (:func:`vss.checkpoint.load_checkpoint`, weights only unless ``trust_pickle``)
    or a model folder (:func:`vss.folder.read_folder`) into a dict; :class:`ConfigError` naming ``key`` and the
    file otherwise.

    ``mmap=True`` maps the tensors instead of reading them (cheap: to look at the checkpoint's keys).
    """
    from vss.folder import read_model_file

    return read_model_file(path, key=key, trust_pickle=trust_pickle, expect="dict", mmap=mmap)


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
        ckpt = read_checkpoint(ckpt_path, "ckpt_path", mmap=True, trust_pickle=bool(cfg.get("trust_pickle")))
        if "optimizer_states" not in ckpt or "global_step" not in ckpt:
            raise ConfigError(
                f"ckpt_path={str(ckpt_path)!r} is a weights-only checkpoint (no optimizer state or step, e.g. "
                f"written by vss.convert): use init_from={ckpt_path} to start training from its weights"
            )
    if init_from is None:
        return None
    return segmenter_state_dict(read_checkpoint(init_from, trust_pickle=bool(cfg.get("trust_pickle"))), init_from)


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


# -- resume ------------------------------------------------------------------------------------------
ALWAYS_CURRENT = ("ckpt_path", "trust_pickle")
"""Keys a resume takes from the command line's config, not the checkpoint's."""


@dataclass
class Resume:
    """A resume (``ckpt_path=``): the checkpoint, its step, the run's config and what the command line changed."""

    path: str
    step: int
    config: DictConfig
    changes: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    stored: bool = True

    def summary(self) -> str:
        """One line: ``[vss] resuming from PATH (step N) with its stored config; overrides: ...``."""
        source = "its stored config" if self.stored else "this command line's config (the checkpoint stores none)"
        changed = "; command-line overrides: " + ", ".join(self.changes) if self.changes else ""
        return f"[vss] resuming from {self.path} (step {self.step}) with {source}{changed}"


def _show(value: Any) -> str:
    if isinstance(value, DictConfig | dict):
        return "{...}"
    return str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value).replace(" ", "")


def _remap(node: Any, old: str, new: str) -> Any:
    """Every string of a plain container with the prefix ``old`` (a former run directory) moved under ``new``."""
    if isinstance(node, dict):
        return {k: _remap(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_remap(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old.rstrip("/") + "/")):
        return new + node[len(old) :]
    return node


def resume_config(
    current: DictConfig, stored: Mapping[str, Any], overrides: Sequence[str], groups: Sequence[str] | set[str] = ()
) -> tuple[DictConfig, list[str]]:
    """The config of a resumed run: the checkpoint's (``stored``, resolved) with the command line's ``overrides``
    taken from ``current`` (the config Hydra composed from them); returns it and the changes (``key=new (was old)``).

    A group override (``trainer=cpu``) replaces that node; a group without a node of its own (``experiment=``)
    cannot be re-applied to a stored config and is refused. Paths under the stored run directory follow
    ``paths.output_dir`` of ``current`` when the run directory moved.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = dict(stored)
    old_dir = str((plain.get("paths") or {}).get("output_dir") or "")
    new_dir = str(OmegaConf.select(current, "paths.output_dir", default="") or "")
    if old_dir and new_dir and old_dir != new_dir:
        plain = _remap(plain, old_dir, new_dir)
    merged, original = OmegaConf.create(plain), OmegaConf.create(plain)
    changes = []
    for text, o in zip(overrides, OverridesParser.create().parse_overrides(list(overrides)), strict=True):
        key = o.key_or_group
        if key in ALWAYS_CURRENT or key.startswith("hydra"):
            continue
        if o.is_delete():
            raise ConfigError(f"{text}: deleting a key is not supported when resuming (ckpt_path=); drop it")
        if key in groups and OmegaConf.select(current, key, default=None) is None:
            raise ConfigError(
                f"{text}: the group {key} sets keys across the config and cannot change when resuming "
                "(ckpt_path=); start a new run from the checkpoint's weights with init_from= instead"
            )
        new = OmegaConf.select(current, key, default=None)
        old = OmegaConf.select(original, key, default=None)
        value = OmegaConf.to_container(new, resolve=True) if OmegaConf.is_config(new) else new
        OmegaConf.update(merged, key, value, merge=False, force_add=True)
        if key in groups:
            changes.append(f"{key}={o.value()}")
        elif old != new:
            changes.append(f"{key}={_show(new)} (was {_show(old)})")
    for key in ALWAYS_CURRENT:
        OmegaConf.update(merged, key, OmegaConf.select(current, key), force_add=True)
    merged.init_from, merged.init_exclude = None, []  # the weights come from the checkpoint itself
    return merged, changes


def prepare_resume(cfg: DictConfig, overrides: Sequence[str] = (), groups: Sequence[str] | set[str] = ()) -> Resume:
    """Read ``cfg.ckpt_path`` (tensors memory-mapped): its step, its stored config with ``overrides`` applied
    (:func:`resume_config`) and its tensor shapes (for :func:`check_resume_model`).

    Also what a SLURM requeue calls with the checkpoint it restarts from.
    """
    path = str(cfg.ckpt_path)
    ckpt = read_checkpoint(path, "ckpt_path", mmap=True, trust_pickle=bool(cfg.get("trust_pickle")))
    if "optimizer_states" not in ckpt or "global_step" not in ckpt:
        raise ConfigError(
            f"ckpt_path={path!r} is a weights-only checkpoint (no optimizer state or step, e.g. "
            f"written by vss.convert): use init_from={path} to start training from its weights"
        )
    stored = (ckpt.get("hyper_parameters") or {}).get("config")
    shapes = {k: tuple(v.shape) for k, v in segmenter_state_dict(ckpt, path, "ckpt_path").items()}
    if stored is None:
        return Resume(path, int(ckpt["global_step"]), cfg, shapes=shapes, stored=False)
    from vss.validation import check_targets

    check_targets(stored, where=f"ckpt_path={path!r}")  # nothing the stored config names is built before this
    config, changes = resume_config(cfg, stored, overrides, groups)
    return Resume(path, int(ckpt["global_step"]), config, changes, shapes)


def check_resume_model(module: nn.Module, resume: Resume) -> None:
    """Refuse, in one line, a checkpoint whose tensors do not fit the model built from the resumed config."""
    expected = {k[len(PREFIX) :]: tuple(v.shape) for k, v in module.state_dict().items() if k.startswith(PREFIX)}
    rows = [
        f"{k}: checkpoint {resume.shapes[k]} vs model {s}"
        for k, s in expected.items()
        if k in resume.shapes and resume.shapes[k] != s
    ]
    missing = sorted(set(expected) - set(resume.shapes))
    unexpected = sorted(set(resume.shapes) - set(expected))
    if not (rows or missing or unexpected):
        return
    parts = [f"{len(rows)} tensor shape(s) differ: {preview(rows, 2)}"] if rows else []
    parts += [f"missing in the checkpoint: {preview(missing, 2)}"] if missing else []
    parts += [f"not in the model: {preview(unexpected, 2)}"] if unexpected else []
    cause = f" after the overrides {', '.join(resume.changes)}" if resume.changes else ""
    raise ConfigError(
        f"ckpt_path={resume.path!r}: the checkpoint's model does not match the model of the resumed config{cause}: "
        + "; ".join(parts)
        + "; drop the model overrides, or start a new run from these weights with init_from= (and init_exclude=)"
    )
