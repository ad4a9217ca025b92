"""Where the Hydra configs live and the resolvers they use (``${vss_uid:}``, ``${vss_knobs_key:...}``, ...)."""

from __future__ import annotations

import importlib
import os
import secrets
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vss.cluster import slurm_run_name
from vss.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent / "conf"
"""The Hydra configs, shipped inside the package (``conf/`` at the repository root links here)."""


def register_resolvers() -> None:
    """``${vss_uid:}``: a per-process tag (pid + random) that keeps run directories unique."""
    if not OmegaConf.has_resolver("vss_uid"):
        uid = f"{os.getpid()}-{secrets.token_hex(3)}"
        OmegaConf.register_new_resolver("vss_uid", lambda: uid, use_cache=True)
    if not OmegaConf.has_resolver("vss_knobs_key"):
        OmegaConf.register_new_resolver("vss_knobs_key", knobs_key)
    if not OmegaConf.has_resolver("vss_run_name"):
        OmegaConf.register_new_resolver("vss_run_name", lambda default: slurm_run_name() or default)
    if not OmegaConf.has_resolver("vss_or"):  # ${vss_or:${hydra:...},fallback}: the fallback for null or ""
        OmegaConf.register_new_resolver("vss_or", lambda value, default: default if value in (None, "") else value)
    if not OmegaConf.has_resolver("vss_override_tags"):
        OmegaConf.register_new_resolver("vss_override_tags", override_tags)


WANDB_TAG_MAX = 64
"""W&B refuses tags longer than this."""


def override_tags(tags: Any, overrides: Any, exclude: Any = ()) -> list[str]:
    """``${vss_override_tags:${tags},${hydra:overrides.task},[keys]}``: W&B tags of a run, the config's ``tags``
    then each command-line override of the sweep point (``stm.p=0.5``) whose key is not in ``exclude``, each cut
    to W&B's 64 characters, without repeats."""
    skip = {str(k) for k in exclude or ()}
    out = [str(tag)[:WANDB_TAG_MAX] for tag in tags or ()]
    for override in map(str, overrides or ()):
        key = override.split("=", 1)[0].lstrip("+~")
        if key not in skip:
            out.append(override[:WANDB_TAG_MAX])
    return list(dict.fromkeys(out))


def knobs_key(knobs: Any) -> str:
    """``${vss_knobs_key:${data.synthetic}}``: 8 hex digits of a hash of every generator setting (cache key)."""
    import hashlib
    import json

    plain = OmegaConf.to_container(knobs, resolve=True) if isinstance(knobs, DictConfig) else knobs
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:8]


def target_class(target: Any, key: str, prefix: str, base: type) -> type:
    """The subclass of ``base`` that a ``_target_`` names (``key`` in messages), refused unless it lies under
    ``prefix``: the class shared code asks (a method's protocol, a data set's checks), imported, never called."""
    if not isinstance(target, str) or not target.startswith(prefix):
        raise ConfigError(f"{key}={target!r} is invalid: expected a class under {prefix}")
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}={target!r} is invalid: no such class ({' '.join(str(e).split())[:200]})") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key}={target!r} is invalid: expected a subclass of {base.__module__}.{base.__qualname__}")
    return cls
