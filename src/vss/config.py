"""Config checks that run before anything is built, so a bad value fails in a second with a clear message."""

from __future__ import annotations

import difflib
import functools
import importlib
import netrc
import os
import re
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

CONF_DIR = Path(__file__).resolve().parent / "conf"
"""The Hydra configs, shipped inside the package (``conf/`` at the repository root links here)."""
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the value and what is allowed."""


def _end_progress_bars() -> None:
    """Close live tqdm bars, so that what is printed next starts on a new line, not after a bar's ``\\r``."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


def print_error(message: str) -> None:
    """``error: message`` on stderr, on a line of its own (after any progress bar)."""
    _end_progress_bars()
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn config and dataset errors into one clear line on stderr and exit code 2 (no stack trace)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            vspw = sys.modules.get("vss.data.vspw")  # imported by whoever raised a DatasetError
            if isinstance(e, ConfigError) or (vspw is not None and isinstance(e, vspw.DatasetError)):
                print_error(worker_error_message(str(e)))
                raise SystemExit(2) from None
            raise

    return wrapper


def worker_error_message(text: str) -> str:
    """The error's own message when it was raised in a DataLoader worker (torch re-raises it with the worker's
    traceback in the text: ``Caught DatasetError in DataLoader worker process 0. Original Traceback ...``)."""
    if not re.match(r"Caught \w+ in DataLoader worker process \d+\.", text):
        return text
    name = text.split(" ", 2)[1]
    return text.rsplit(f"{name}: ", 1)[-1].strip()


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


def slurm_job(env: Any = None) -> bool:
    """Whether this process is a task of a SLURM job step, as Lightning's ``SLURMEnvironment.detect`` decides
    (``SLURM_NTASKS`` set, job name not ``bash``/``interactive``): Lightning then starts no ranks itself."""
    env = os.environ if env is None else env
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_run_name(env: Any = None) -> str | None:
    """``slurm-<job>[_<array task>][-step<N>]`` inside a SLURM job (every rank and a requeued job agree), else None."""
    env = os.environ if env is None else env
    if not slurm_job(env) or not env.get("SLURM_JOB_ID"):
        return None
    step = env.get("SLURM_STEP_ID", "")
    return f"slurm-{slurm_job_id(env)}" + (f"-step{step}" if step.isdigit() and step != "0" else "")


SLURM_REQUEUE_SIGNAL = "USR1"
"""The signal SLURM sends before the time limit (``--signal=USR1@90``, ``hydra/launcher=slurm``): vss saves
``last.ckpt`` and requeues the job; submitit's own handler (USR2) and Lightning's auto-requeue stay unused."""


def slurm_restart_count(env: Any = None) -> int:
    """How often SLURM restarted this job (``SLURM_RESTART_COUNT``: requeue, preemption, node failure); 0 outside."""
    env = os.environ if env is None else env
    count = str(env.get("SLURM_RESTART_COUNT", "0")) if slurm_job(env) else "0"
    return int(count) if count.isdigit() else 0


def slurm_requeue_checkpoint(cfg: DictConfig, env: Any = None) -> Path | None:
    """A requeued SLURM job's own ``paths.output_dir/checkpoints/last.ckpt`` (the run directory is named after the
    job, or is its submitit sweep job's): what the restarted job resumes from; None on a first start, with an
    explicit ``ckpt_path`` or without a checkpoint."""
    if slurm_restart_count(env) == 0 or cfg.get("ckpt_path") is not None:
        return None
    last = Path(str(cfg.paths.output_dir)) / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


def slurm_job_id(env: Any = None) -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task (submitit sweeps), else the job."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    job = env.get("SLURM_JOB_ID")
    if not job:
        raise ConfigError("SLURM_JOB_ID is not set: requeueing needs a SLURM job")
    return str(job)


def slurm_requeue(env: Any = None) -> str:
    """``scontrol requeue`` this job (SLURM restarts it; it resumes from its ``last.ckpt``); returns the job id."""
    import subprocess

    job = slurm_job_id(env)
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}")
    return job


def check_slurm_launcher(cfg: DictConfig) -> None:
    """A submitit launcher's task counts must be the trainer's (Lightning refuses to start otherwise): say so at
    submission, not in every job; ``hydra/launcher=slurm`` takes both from the trainer."""
    launcher = OmegaConf.select(cfg, "hydra.launcher", default=None)
    if launcher is None or "submitit" not in str(launcher.get("_target_", "")):
        return
    pairs = (("tasks_per_node", "trainer.devices"), ("nodes", "trainer.num_nodes"))
    for key, trainer_key in pairs:
        value, wanted = launcher.get(key), OmegaConf.select(cfg, trainer_key, default=1)
        if isinstance(wanted, int) and value is not None and int(value) != wanted:
            raise ConfigError(
                f"hydra.launcher.{key}={value} is invalid: expected {wanted}, the value of {trainer_key} (one task per "
                f"device; Lightning refuses other counts): use hydra/launcher=slurm, which takes both from the trainer"
            )


class SlurmLauncherCheck(HydraCallback):
    """Hydra callback: :func:`check_slurm_launcher` when a ``-m`` sweep starts, before any job is submitted."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check the launcher's task counts; a clear ``error:`` line and exit status 2 when they differ."""
        friendly_errors(check_slurm_launcher)(config)


def knobs_key(knobs: Any) -> str:
    """``${vss_knobs_key:${data.synthetic}}``: 8 hex digits of a hash of every generator setting (cache key)."""
    import hashlib
    import json

    plain = OmegaConf.to_container(knobs, resolve=True) if isinstance(knobs, DictConfig) else knobs
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:8]


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
    if OmegaConf.select(cfg, "stm", default=None) is not None:
        _check(cfg, "stm.p", lambda v: _num(v) and 0 < v <= 1, "a token ratio in (0, 1], or null", optional=True)
        _check(cfg, "stm.top_n", lambda v: _int(v) and v > 0, "a positive integer")
    _check(cfg, "data.clip.reverse_prob", lambda v: _num(v) and 0 <= v <= 1, "a probability in [0, 1]")
    root = _get(cfg, "data.root")
    if "Synthetic" not in str(_get(cfg, "data._target_")) and not Path(str(root)).is_dir():
        raise ConfigError(
            f"data.root={root!r} is invalid: the directory does not exist (expected the dataset's root folder)"
        )
    _check(
        cfg,
        "encoder.pretrained",
        lambda v: Path(str(v)).is_file(),
        "a path to an existing local checkpoint file, or null",
        optional=True,
    )
    _check(cfg, "optim.optimizer.lr", lambda v: _num(v) and v > 0, "a positive number")
    _check(cfg, "optim.optimizer.weight_decay", lambda v: _num(v) and v >= 0, "a non-negative number")
    check_retired_keys(cfg)
    from vss.optim import check_paramwise

    check_paramwise(OmegaConf.select(cfg, "optim.paramwise", default=None), "optim.paramwise")
    _check(cfg, "val_mode", lambda v: v in ("stream", "clip"), "stream or clip")
    if OmegaConf.select(cfg, "optim.scheduler", default=None) is not None:  # null: a constant learning rate
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
    check_wandb_login(cfg)


def check_model_values(cfg: DictConfig) -> None:
    """The checks that read the model code (encoder names, the offsets' rules): after the cheap ones."""
    from vss.models.aggregators.base import check_offsets
    from vss.models.encoders import ENCODER_NAMES

    _check(cfg, "encoder.name", lambda v: v in ENCODER_NAMES, f"one of {sorted(ENCODER_NAMES)}")
    offsets = check_offsets(_get(cfg, "model.offsets") or [])
    data_offsets = OmegaConf.select(cfg, "data.clip.offsets", default=None)
    if data_offsets is not None and list(data_offsets) != list(offsets):
        raise ConfigError(
            f"data.clip.offsets={list(data_offsets)} differs from model.offsets={list(offsets)}: the clip belongs "
            "to the model; set model.offsets=... (data.clip.offsets follows it)"
        )
    target = OmegaConf.select(cfg, "model._target_", default=None)
    if isinstance(target, str) and "." in target:  # the method's own config-time checks (its file, not here)
        module = importlib.import_module(target.rsplit(".", 1)[0])
        hook = getattr(module, "check_train_config", None)
        if callable(hook):
            hook(cfg)


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


def check_ddp_multirun(cfg: DictConfig, multirun: bool, env: Any = None) -> None:
    """Plain ``strategy=ddp`` re-launches the script per rank and cannot run inside ``-m``; say what to do.

    A SLURM job (one srun task per device, e.g. ``hydra/launcher=submitit_slurm``) is let through: Lightning starts
    no ranks there; its task counts must match ``trainer.devices`` / ``trainer.num_nodes``."""
    env = os.environ if env is None else env
    strategy = str(OmegaConf.select(cfg, "trainer.strategy", default="auto"))
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    many = (isinstance(devices, int) and devices > 1) or isinstance(devices, list | str) and devices not in (1, "1")
    if slurm_job(env):
        nodes = OmegaConf.select(cfg, "trainer.num_nodes", default=1)
        pairs = (("trainer.devices", devices, "SLURM_NTASKS_PER_NODE"), ("trainer.num_nodes", nodes, "SLURM_NNODES"))
        for key, value, var in pairs:
            if env.get(var) is not None and isinstance(value, int) and str(value) != env[var]:
                raise ConfigError(f"{key}={value} is invalid: expected {env[var]}, the job's {var}")
        return
    if multirun and strategy == "ddp" and many:
        raise ConfigError(
            "trainer.strategy=ddp cannot run inside a Hydra multirun (-m): Lightning re-launches the script per "
            "rank. Use trainer=ddp_spawn for sweeps, or launch each run of the sweep on its own without -m."
        )


# -- the command line, before Hydra ------------------------------------------------------------------------
def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (containers and leaves), e.g. ``stm``, ``stm.p``."""
    keys: list[str] = []
    if isinstance(node, DictConfig):
        for k in node:
            full = f"{prefix}{k}"
            keys.append(full)
            keys += _leaf_keys(node._get_node(k), f"{full}.")
    return keys


def closest_key(key: str, cfg: DictConfig) -> str | None:
    """The key of ``cfg`` closest to a mistyped ``key`` (``stm.pp`` -> ``stm.p``), or None."""
    keys = _leaf_keys(cfg)
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in keys if k.rsplit(".", 1)[0] == parent] if parent else []
    for pool in (siblings, keys):
        close = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if close:
            return close[0]
    return None


def _task_overrides(argv: Sequence[str]) -> tuple[list[str], bool] | None:
    """The config overrides of a Hydra command line (sweeps reduced to their first value) and whether it is a
    multirun; None where Hydra itself answers (``--help``, ``--info``, another config) or the line does not parse."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        args = get_args_parser().parse_args(list(argv))
    except SystemExit:
        return None
    if args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun:
        return None
    if args.config_name or args.config_path or args.config_dir:
        return None
    out = []
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # Hydra reports a malformed override itself
        return None
    for text, o in zip(args.overrides, parsed, strict=True):
        if o.key_or_group.startswith(("hydra.", "hydra/")) or o.key_or_group == "hydra":
            continue
        if o.is_sweep_override():
            out.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        else:
            out.append(text)
    return out, bool(args.multirun)


SUBMITIT_LAUNCHERS = ("slurm", "slurm_gpu", "submitit_slurm", "submitit_local")
"""``hydra/launcher=`` options that need the extra ``slurm`` (hydra-submitit-launcher)."""


def _submitit_plugin_installed() -> bool:
    import importlib.util

    try:  # find_spec imports the parent package: no hydra_plugins at all raises
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


def check_launcher_installed(argv: Sequence[str]) -> None:
    """A submitit launcher without its plugin is one line saying how to install it (Hydra's own message names
    neither the package nor the extra)."""
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "hydra/launcher" and value in SUBMITIT_LAUNCHERS and not _submitit_plugin_installed():
            raise ConfigError(
                f"hydra/launcher={value} needs hydra-submitit-launcher, which is not installed: "
                "pip install -e '.[slurm]' (or pip install 'vss[slurm]')"
            )


def check_command_line(config_name: str, argv: Sequence[str]) -> None:
    """Compose ``config_name`` with the command line's overrides as Hydra will, without torch: a key that is not
    in the config is a :class:`ConfigError` suggesting the closest key, a missing group option lists the options."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException

    check_launcher_installed(argv)
    parsed = _task_overrides(argv)
    if parsed is None or GlobalHydra.instance().is_initialized():
        return
    overrides, _ = parsed
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key in RETIRED_KEYS:
            raise ConfigError(f"{o} is no longer read: {RETIRED_KEYS[key]}")
    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            try:
                compose(config_name=config_name, overrides=overrides)
                return
            except MissingConfigException as e:
                options = ", ".join(getattr(e, "options", None) or [])
                first = str(e).strip().splitlines()[0]
                raise ConfigError(f"{first}" + (f"; available: {options}" if options else "")) from None
            except ConfigCompositionException as e:
                named = re.search(r"Could not override '([^']+)'", str(e))
                key = named.group(1) if named else getattr(e.__cause__, "full_key", None) or ""
                bad = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), None)
                if not key or bad is None:
                    raise ConfigError(" ".join(str(e).split())) from None
                base = compose(config_name=config_name, overrides=[o for o in overrides if o is not bad])
                close = closest_key(key, base)
                hint = f"; did you mean `{close}`?" if close else ""
                raise ConfigError(
                    f"{bad.split('=', 1)[0]} is not a key of the {config_name} config{hint} "
                    f"(`+{key}=...` adds a new key)"
                ) from None
    finally:
        GlobalHydra.instance().clear()


def run_dir_of_checkpoint(ckpt_path: str | Path) -> Path | None:
    """The run directory a checkpoint belongs to: ``RUN`` for ``RUN/checkpoints/X.ckpt`` (``RUN/.hydra`` exists)."""
    path = Path(str(ckpt_path)).expanduser()
    run = path.parent.parent
    if path.parent.name == "checkpoints" and (run / ".hydra").is_dir():
        return run
    return None


def resume_arguments(argv: Sequence[str]) -> list[str]:
    """The command line of a resume (``ckpt_path=RUN/checkpoints/X.ckpt``, not ``-m``): continue in ``RUN``
    (``hydra.run.dir=RUN``, its ``.hydra/`` left as the run wrote it); any other command line unchanged."""
    parsed = _task_overrides(argv)
    if parsed is None or parsed[1] or any(a.startswith(("hydra.run.dir=", "hydra.output_subdir=")) for a in argv):
        return list(argv)
    ckpt = next((o.split("=", 1)[1] for o in parsed[0] if o.startswith("ckpt_path=")), None)
    run = run_dir_of_checkpoint(ckpt) if ckpt not in (None, "null") else None
    if run is None:
        return list(argv)
    return [*argv, f'hydra.run.dir="{run}"', "hydra.output_subdir=null"]
