"""Checks of a composed config, table by table, before any work starts: each names the key, the value and
what is allowed (a :class:`vss.errors.ConfigError`)."""

from __future__ import annotations

import functools
import math
import netrc
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from vss.errors import ConfigError

DATA_PREFIX = "vss.data."
"""Where ``data._target_`` may point: a :class:`vss.data.datamodule.VSSDataModule` subclass."""
AGGREGATOR_PREFIX = "vss.models.aggregators."
"""Where ``model._target_`` may point (the same as :data:`vss.models.aggregators.base.AGGREGATOR_PREFIX`,
checked here before torch is imported)."""

KEY_PREFIXES = {"model": AGGREGATOR_PREFIX, "encoder": "vss.models.encoders."}
"""Stricter prefixes for the ``_target_`` of these config nodes (and everything below them)."""


@functools.cache
def target_prefixes() -> tuple[str, ...]:
    """Where any ``_target_`` may point: ``vss.`` and the modules of the other ``_target_`` s the shipped configs
    (conf/**/*.yaml) name (``torch.optim.``, ``pytorch_lightning.callbacks.``, ...)."""
    from vss.config import CONF_DIR

    prefixes = {"vss."}
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        for target in re.findall(r"^\s*_target_:\s*([A-Za-z_][\w.]*)\s*(?:#.*)?$", path.read_text(), re.MULTILINE):
            if "." in target and not target.startswith("vss."):
                prefixes.add(target.rsplit(".", 1)[0] + ".")
    return tuple(sorted(prefixes))


def _targets(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``(dotted key, value)`` of a ``_target_`` in a config (DictConfig or plain containers)."""
    if isinstance(node, DictConfig) and (node._is_none() or node._is_missing()):
        return
    if isinstance(node, DictConfig | dict):
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
        for k, v in items:
            if not prefix and k == "hydra":  # Hydra's own config (launchers, sweepers)
                continue
            if k == "_target_":
                yield f"{prefix}{k}", v
            else:
                yield from _targets(v, f"{prefix}{k}.")
    elif (OmegaConf.is_list(node) and not node._is_none() and not node._is_missing()) or isinstance(node, list | tuple):
        for i, v in enumerate(node):
            yield from _targets(v, f"{prefix}{i}.")


MODEL_NODES = ("model", "encoder", "data", "optim")
"""The nodes a model and its data are built from: their ``_target_`` s are checked on the command line too (the
callbacks, loggers and trainer of a command line are the user's to extend, e.g. ``+callbacks.mine._target_=``)."""


def check_targets(cfg: Any, where: str = "", nodes: tuple[str, ...] | None = None) -> None:
    """Every ``_target_`` of ``cfg`` names a callable under :func:`target_prefixes` (``model.*``: an aggregator,
    ``encoder.*``: vss.models.encoders), else one :class:`ConfigError` naming the key and the allowed prefixes.
    ``where``: the file the config comes from (a checkpoint's stored config); ``nodes``: only these top-level nodes.
    """
    allowed = target_prefixes()
    for key, value in _targets(cfg):
        if nodes is not None and key.split(".", 1)[0] not in nodes:
            continue
        strict = KEY_PREFIXES.get(key.split(".", 1)[0])
        prefixes = (strict,) if strict and key.count(".") == 1 else allowed
        if not isinstance(value, str) or not value.startswith(prefixes):
            source = f"{where}: its config's " if where else ""
            raise ConfigError(
                f"{source}{key}={value!r} is refused: a _target_ must name a callable under "
                f"{' or '.join(prefixes) if len(prefixes) < 3 else list(prefixes)}"
            )


PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")


def resolve_device(name: Any, key: str = "device") -> Any:
    """``auto`` -> cuda when available, else cpu; ``cpu``, ``cuda`` or ``cuda:N`` that exists on this machine;
    anything else is one :class:`ConfigError` naming ``key``."""
    import torch

    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"{key}={name!r} is invalid: expected auto, cpu or cuda (cuda:N)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but torch.cuda.is_available() is False (no GPU): use {key}=cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name} but only {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device(name)


def required(cfg: DictConfig, key: str) -> Any:
    """``cfg.key``; unset (null, ``???`` or empty): one :class:`ConfigError` saying to pass it."""
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        value = None
    if value is None or str(value) == "":
        raise ConfigError(f"{key} is required but not set (pass {key}=...)")
    return value


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
    """A finite int or float (not a bool; ``inf`` and ``nan`` are no learning rate, weight or probability)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _ints(v: Any, low: int = 1) -> bool:
    """A list of integers >= ``low``."""
    return (OmegaConf.is_list(v) or isinstance(v, list | tuple)) and all(_int(x) and x >= low for x in v)


# (key, test, expected): the numeric keys of the training configs that may be absent (a model's, a data set's
# own); ``*`` matches one level (every callback). A new numeric key gets a row here or in the allow-list of
# tests/test_cli_robustness.py (which enumerates the composed configs' numeric keys).
NUMERIC_CHECKS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("seed", lambda v: _int(v) and 0 <= v < 2**32, "an integer in 0..2**32-1"),
    ("trainer.log_every_n_steps", lambda v: _int(v) and v > 0, "a positive integer"),
    ("trainer.max_epochs", lambda v: _int(v) and v >= -1, "an integer >= -1 (-1: no limit)"),
    ("trainer.num_nodes", lambda v: _int(v) and v > 0, "a positive integer"),
    ("trainer.num_sanity_val_steps", lambda v: _int(v) and v >= -1, "an integer >= -1"),
    ("callbacks.*.save_top_k", lambda v: _int(v) and v >= -1, "an integer >= -1"),
    ("callbacks.*.refresh_rate", lambda v: _int(v) and v >= 0, "a non-negative integer"),
    ("callbacks.*.num_images", lambda v: _int(v) and v >= 0, "a non-negative integer"),
    ("data.flip_prob", lambda v: _num(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    ("data.size_divisor", lambda v: _int(v) and v > 0, "a positive integer"),
    ("data.synthetic.height", lambda v: _int(v) and v > 0, "a positive integer"),
    ("data.synthetic.width", lambda v: _int(v) and v > 0, "a positive integer"),
    ("data.synthetic.hide_prob", lambda v: _num(v) and 0 <= v < 1, "a probability in [0, 1)"),
    ("data.synthetic.object_classes", lambda v: _int(v) and v > 0, "a positive integer"),
    ("data.synthetic.seed", lambda v: _int(v) and v >= 0, "a non-negative integer"),
    ("data.synthetic.train_videos", lambda v: _int(v) and v > 0, "a positive integer"),
    ("data.synthetic.val_videos", lambda v: _int(v) and v > 0, "a positive integer"),
    ("encoder.drop_path_rate", lambda v: _num(v) and 0 <= v < 1, "a rate in [0, 1)"),
    ("model.dropout", lambda v: _num(v) and 0 <= v < 1, "a rate in [0, 1)"),
    *(
        (f"model.{k}", lambda v: _int(v) and v > 0, "a positive integer")
        for k in ("embed_dim", "channels", "depth", "keys_per_class", "mlp_dim", "num_heads", "num_scales")
    ),
    ("model.tr_downsample", lambda v: _int(v) and v > 0, "a positive integer"),
    ("model.mlp_ratio", lambda v: _num(v) and v > 0, "a positive number"),
    ("model.scale_init", _num, "a finite number"),
    *(
        (f"model.{k}", lambda v: _num(v) and v >= 0, "a finite number >= 0 (a loss weight)")
        for k in ("per_frame_loss_weight", "weight_M", "weight_pd", "weight_rd")
    ),
    *((f"model.{k}", _ints, "a list of positive integers") for k in ("pe_size", "pool_scales", "pst_downsample")),
    ("optim.optimizer.momentum", lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    (
        "optim.optimizer.betas",
        lambda v: len(v) == 2 and all(_num(b) and 0 <= b < 1 for b in v),
        "[beta1, beta2], each in [0, 1)",
    ),
    ("optim.scheduler.warmup_ratio", lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"),
)


def _expand(cfg: DictConfig, pattern: str) -> list[str]:
    """The keys of ``cfg`` that ``pattern`` names (``*``: every child at that level)."""
    keys = [""]
    for part in pattern.split("."):
        if part != "*":
            keys = [f"{k}{part}." for k in keys]
            continue
        nxt = []
        for k in keys:
            node = OmegaConf.select(cfg, k[:-1], default=None)
            nxt += [f"{k}{c}." for c in node] if isinstance(node, DictConfig) else []
        keys = nxt
    return [k[:-1] for k in keys]


def check_numeric_keys(cfg: DictConfig) -> None:
    """The rows of :data:`NUMERIC_CHECKS` that ``cfg`` has (null: the default)."""
    for pattern, ok, expected in NUMERIC_CHECKS:
        for key in _expand(cfg, pattern):
            _check(cfg, key, ok, expected, optional=True)


def validate_train_config(cfg: DictConfig) -> None:
    """Check the composed training config; raise :class:`ConfigError` naming the first bad key."""
    check_train_values(cfg)
    check_model_values(cfg)


PIPELINE_STAGE_ENV = "VSS_PIPELINE_STAGE"
"""Set by ``vss.pipeline`` for the training runs of its stages."""


def check_pipeline_alone(cfg: DictConfig, experiment: str | None = None) -> None:
    """``vss.train`` on an experiment that lists ``pipeline`` stages would train its base config only: say to run
    ``vss.pipeline`` (a stage ``vss.pipeline`` runs, or a resume with ``ckpt_path=``, passes)."""
    stages = OmegaConf.select(cfg, "pipeline", default=None)
    if not stages or os.environ.get(PIPELINE_STAGE_ENV) or cfg.get("ckpt_path") is not None:
        return
    names = ", ".join(str(s.get("name")) for s in stages)
    name = experiment or "NAME"
    raise ConfigError(
        f"experiment={name} is a pipeline of {len(stages)} stages ({names}): run them with python -m vss.pipeline "
        f"experiment={name} [overrides]; to train its base config alone, add pipeline=[]"
    )


#: Keys the config no longer reads -> what replaced them (an error, never silently ignored).
RETIRED_KEYS = {
    "optim.head_lr_mult": (
        "the per-parameter rules are optim.paramwise now (mmcv custom_keys: longest key first, the first that is a "
        "substring of the parameter name wins), e.g. optim.paramwise.aggregator.lr_mult=10, or a preset: "
        "optim/paramwise=segformer|msaf|none (conf/optim/paramwise)"
    ),
}


def check_retired_keys(cfg: DictConfig) -> None:
    """A :class:`ConfigError` for a key of :data:`RETIRED_KEYS` (a config written before it was replaced)."""
    for key, replacement in RETIRED_KEYS.items():
        if OmegaConf.select(cfg, key, default=None) is not None:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r} is no longer read: {replacement}")


def check_train_values(cfg: DictConfig) -> None:
    """The checks that need neither torch nor the model code (they run before torch is imported)."""
    _check(cfg, "seed", lambda v: _int(v) and 0 <= v < 2**32, "an integer in 0..2**32-1")
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
    _check(cfg, "data.train_repeat", lambda v: _int(v) and v > 0, "a positive integer (clips per video per epoch)")
    for key, choices in (
        ("data.iou_mean", ("gt_present", "union")),
        ("data.photometric", ("per_frame", "per_clip", "none")),  # vss.data.transforms.PHOTOMETRIC_MODES
        ("data.missing_frames", ("error", "clamp")),  # Cityscapes video
        ("data.label_file", ("auto", "labelIds", "labelTrainIds")),
        ("data.label_form", ("index", "colour")),  # CamVid video
        ("data.colour_convention", ("grouped", "exact")),
        ("data.check_val", ("auto", "full", "headers", "off")),  # vss.data.datamodule.VAL_CHECKS
    ):
        _check(cfg, key, lambda v, c=choices: v in c, f"one of {list(choices)}", optional=True)
    _check(cfg, "data.check_val_max_mb", lambda v: _num(v) and v > 0, "a positive number of megabytes", optional=True)
    _check(cfg, "data.synthetic.label_every", lambda v: _int(v) and v > 0, "a positive integer", optional=True)
    _check(
        cfg,
        "data.clip.offsets",
        lambda v: OmegaConf.is_list(v) or isinstance(v, list | tuple),
        "a list of reference offsets that follows model.offsets (set model.offsets=[...] instead)",
        optional=True,
    )
    _check(cfg, "model.embed_dim", lambda v: _int(v) and v > 0, "a positive integer", optional=True)
    _check(cfg, "data.clip.reverse_prob", lambda v: _num(v) and 0 <= v <= 1, "a probability in [0, 1]")
    data_target = _get(cfg, "data._target_")
    if not isinstance(data_target, str) or not data_target.startswith(DATA_PREFIX):
        raise ConfigError(f"data._target_={data_target!r} is invalid: expected a class under {DATA_PREFIX}")
    _check(
        cfg,
        "encoder.pretrained",
        lambda v: Path(str(v)).is_file(),
        "a path to an existing local checkpoint file, or null",
        optional=True,
    )
    check_optim_values(cfg)
    check_numeric_keys(cfg)
    check_targets(cfg, nodes=MODEL_NODES)
    check_retired_keys(cfg)
    _check(cfg, "val_mode", lambda v: v in ("stream", "clip"), "stream or clip")
    _check(
        cfg,
        "ckpt_path",
        lambda v: Path(str(v)).is_file(),
        "an existing checkpoint file or null",
        optional=True,
    )
    target = _get(cfg, "model._target_")  # imported (and checked to be an Aggregator) with the model code
    if not isinstance(target, str) or not target.startswith(AGGREGATOR_PREFIX):
        raise ConfigError(f"model._target_={target!r} is invalid: expected a class under {AGGREGATOR_PREFIX}")
    check_wandb_login(cfg)


def check_model_values(cfg: DictConfig) -> None:
    """The checks that read the model code (encoder names, the offsets' rules): after the cheap ones."""
    from vss.models.aggregators.base import aggregator_class
    from vss.models.encoders import ENCODER_NAMES
    from vss.offsets import check_offsets

    _check(cfg, "encoder.name", lambda v: v in ENCODER_NAMES, f"one of {sorted(ENCODER_NAMES)}")
    offsets = check_offsets(_get(cfg, "model.offsets") or [])
    data_offsets = OmegaConf.select(cfg, "data.clip.offsets", default=None)
    if data_offsets is not None and list(data_offsets) != list(offsets):
        raise ConfigError(
            f"data.clip.offsets={list(data_offsets)} differs from model.offsets={list(offsets)}: the clip belongs "
            "to the model; set model.offsets=... (data.clip.offsets follows it)"
        )
    aggregator_class(_get(cfg, "model._target_")).check_config(cfg)  # the method's own checks (its file)
    data_class(_get(cfg, "data._target_")).check_config(cfg)  # the data set's own (data.root, ...)


def data_class(target: Any, key: str = "data._target_") -> type:
    """The :class:`vss.data.datamodule.VSSDataModule` subclass that ``data._target_`` names."""
    from vss.config import target_class
    from vss.data.datamodule import VSSDataModule

    return target_class(target, key, DATA_PREFIX, VSSDataModule)


OFFLINE_MODES = ("offline", "dryrun", "disabled")


def wandb_logged_in() -> bool:
    """Whether W&B has an API key without asking the network: ``WANDB_API_KEY`` or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def check_wandb_login(cfg: DictConfig) -> None:
    """``logger=wandb`` online without a login would stop at W&B's prompt or fail late: say how to go offline."""
    loggers = cfg.get("logger") or {}
    wandb_loggers = [
        c for c in loggers.values() if isinstance(c, DictConfig) and "WandbLogger" in str(c.get("_target_", ""))
    ]
    if not wandb_loggers or all(c.get("offline") for c in wandb_loggers):
        return
    if os.environ.get("WANDB_MODE", "").lower() in OFFLINE_MODES or wandb_logged_in():
        return
    raise ConfigError(
        "logger=wandb needs a W&B login (run `wandb login` or set WANDB_API_KEY), or run offline: WANDB_MODE=offline "
        "(or logger.wandb.offline=true); upload an offline run later with `wandb sync RUN/wandb/offline-run-*`"
    )


def check_optim_values(cfg: DictConfig) -> None:
    """The optimizer's and scheduler's values (``optim.*``): finite, in range; the paramwise rules (train, and
    ``vss.bench mode=train``, which builds the same parameter groups)."""
    from vss.optim import check_paramwise

    _check(cfg, "optim.optimizer.lr", lambda v: _num(v) and v > 0, "a positive finite number")
    _check(cfg, "optim.optimizer.weight_decay", lambda v: _num(v) and v >= 0, "a non-negative finite number")
    check_paramwise(OmegaConf.select(cfg, "optim.paramwise", default=None), "optim.paramwise")
    if OmegaConf.select(cfg, "optim.scheduler", default=None) is not None:  # null: a constant learning rate
        _check(cfg, "optim.scheduler.warmup_steps", lambda v: _int(v) and v >= 0, "a non-negative integer")
        _check(cfg, "optim.scheduler.power", lambda v: _num(v) and v >= 0, "a non-negative number")
