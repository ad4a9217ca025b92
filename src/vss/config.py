"""Config checks that run before anything is built, so a bad value fails in a second with a clear message."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

CONF_DIR = Path(__file__).resolve().parent / "conf"
"""The Hydra configs, shipped inside the package (``conf/`` at the repository root links here)."""
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the value and what is allowed."""


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn config and dataset errors into one clear line on stderr and exit code 2 (no stack trace)."""
    import functools
    import sys

    from vss.data.vspw import DatasetError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DatasetError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def resolve_device(name: str) -> Any:
    """``auto`` -> cuda when available, else cpu; any other value is a torch device string."""
    import torch

    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(name))


def register_resolvers() -> None:
    """``${vss_uid:}``: a per-process tag (pid + random) that keeps run directories unique."""
    if not OmegaConf.has_resolver("vss_uid"):
        uid = f"{os.getpid()}-{secrets.token_hex(3)}"
        OmegaConf.register_new_resolver("vss_uid", lambda: uid, use_cache=True)


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{key} is required but not set (pass {key}=...)") from e


def _check(cfg: DictConfig, key: str, ok: Callable[[Any], bool], expected: str, optional: bool = False) -> None:
    value = _get(cfg, key)
    if value is None and optional:
        return
    if not ok(value):
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def validate_train_config(cfg: DictConfig) -> None:
    """Check the composed training config; raise :class:`ConfigError` naming the first bad key."""
    from vss.models.encoders import ENCODER_NAMES

    _check(
        cfg,
        "trainer.max_steps",
        lambda v: _int(v) and v > 0,
        "a positive integer (training is iteration-based)",
    )
    _check(cfg, "trainer.val_check_interval", lambda v: _int(v) and v > 0, "a positive integer number of steps")
    _check(cfg, "trainer.precision", lambda v: str(v) in PRECISIONS, f"one of {PRECISIONS}")
    _check(
        cfg,
        "trainer.devices",
        lambda v: (_int(v) and v > 0) or v == "auto" or isinstance(v, list | str),
        "a positive int, 'auto' or a device list",
    )
    _check(
        cfg,
        "trainer.gradient_clip_val",
        lambda v: _num(v) and v > 0,
        "a positive number or null",
        optional=True,
    )
    _check(cfg, "data.num_classes", lambda v: _int(v) and 1 <= v <= 255, "an integer in 1..255")
    _check(cfg, "data.batch_size", lambda v: _int(v) and v > 0, "a positive integer")
    _check(cfg, "data.val_batch_size", lambda v: _int(v) and v > 0, "a positive integer")
    _check(cfg, "data.num_workers", lambda v: _int(v) and v >= 0, "a non-negative integer")
    _check(
        cfg,
        "data.crop_size",
        lambda v: len(v) == 2 and all(_int(x) and x > 0 for x in v),
        "[height, width], positive integers",
    )
    _check(
        cfg,
        "data.scale",
        lambda v: len(v) == 2 and all(_int(x) and x > 0 for x in v),
        "[long side, short side], positive integers",
    )
    _check(
        cfg,
        "data.ratio_range",
        lambda v: len(v) == 2 and all(_num(x) and x > 0 for x in v) and v[0] <= v[1],
        "[low, high] with 0 < low <= high",
    )
    _check(cfg, "data.cat_max_ratio", lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]")
    from vss.models.aggregators.base import check_offsets

    offsets = check_offsets(_get(cfg, "model.offsets") or [])
    data_offsets = OmegaConf.select(cfg, "data.clip.offsets", default=None)
    if data_offsets is not None and list(data_offsets) != list(offsets):
        raise ConfigError(
            f"data.clip.offsets={list(data_offsets)} differs from model.offsets={list(offsets)}: the clip belongs "
            "to the model; set model.offsets=... (data.clip.offsets follows it)"
        )
    _check(cfg, "data.clip.reverse_prob", lambda v: _num(v) and 0 <= v <= 1, "a probability in [0, 1]")
    root = _get(cfg, "data.root")
    if "Synthetic" not in str(_get(cfg, "data._target_")) and not Path(str(root)).is_dir():
        raise ConfigError(f"data.root={root!r} is invalid: the directory does not exist (expected a VSPW-layout root)")
    _check(cfg, "encoder.name", lambda v: v in ENCODER_NAMES, f"one of {sorted(ENCODER_NAMES)}")
    _check(
        cfg,
        "encoder.pretrained",
        lambda v: Path(str(v)).is_file(),
        "a path to an existing local checkpoint file, or null",
        optional=True,
    )
    _check(cfg, "optim.optimizer.lr", lambda v: _num(v) and v > 0, "a positive number")
    _check(cfg, "optim.optimizer.weight_decay", lambda v: _num(v) and v >= 0, "a non-negative number")
    _check(cfg, "optim.head_lr_mult", lambda v: _num(v) and v > 0, "a positive number")
    _check(cfg, "val_mode", lambda v: v in ("stream", "clip"), "stream or clip")
    _check(cfg, "optim.scheduler.warmup_steps", lambda v: _int(v) and v >= 0, "a non-negative integer")
    _check(cfg, "optim.scheduler.power", lambda v: _num(v) and v >= 0, "a non-negative number")
    _check(
        cfg,
        "ckpt_path",
        lambda v: Path(str(v)).is_file(),
        "an existing checkpoint file or null",
        optional=True,
    )
    target = _get(cfg, "model._target_")
    if not isinstance(target, str) or not target.startswith("vss.models.aggregators."):
        raise ConfigError(f"model._target_={target!r} is invalid: expected a class under vss.models.aggregators")


def check_ddp_multirun(cfg: DictConfig, multirun: bool) -> None:
    """Plain ``strategy=ddp`` re-launches the script per rank and cannot run inside ``-m``; say what to do."""
    strategy = str(OmegaConf.select(cfg, "trainer.strategy", default="auto"))
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    many = (isinstance(devices, int) and devices > 1) or isinstance(devices, list | str) and devices not in (1, "1")
    if multirun and strategy == "ddp" and many:
        raise ConfigError(
            "trainer.strategy=ddp cannot run inside a Hydra multirun (-m): Lightning re-launches the script per "
            "rank. Use trainer=ddp_spawn for sweeps, or launch each run of the sweep on its own without -m."
        )
