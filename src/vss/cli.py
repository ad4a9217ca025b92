"""The command line before Hydra runs: overrides composed without torch (unknown keys, retired keys, missing
group options), and the arguments of a resume."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vss.cluster import check_launcher_installed
from vss.config import CONF_DIR, register_resolvers
from vss.errors import ConfigError
from vss.validation import RETIRED_KEYS


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
                if not parsed[1]:  # a single run: its directory (a sweep's are made per job)
                    run_dir = [a for a in argv if a.startswith("hydra.run.dir=")]
                    check_run_dir(compose(config_name, [*overrides, *run_dir[-1:]], return_hydra_config=True))
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


def model_argument(argv: Sequence[str]) -> list[str]:
    """The command line of vss.eval / vss.predict / vss.export with ``model=PATH`` (a model folder, or a checkpoint
    file) as ``ckpt_path=PATH``: those configs have no ``model`` group (a model is chosen when it is trained), so a
    ``model=`` that names no folder or file is one :class:`ConfigError`. ``model.KEY=`` overrides stay as they are."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out, given = [], [a for a in argv if a.startswith("ckpt_path=")]
    for arg in argv:
        if not arg.startswith("model="):
            out.append(arg)
            continue
        raw = arg.split("=", 1)[1]
        try:
            value = OverridesParser.create().parse_override(arg).value()
        except Exception:  # Hydra reports a malformed override itself
            value = raw
        path = Path(str(value)).expanduser()
        if given:
            raise ConfigError(f"{arg} and {given[0]} both name the model: pass one of them")
        if not (path.is_dir() or path.is_file()):
            raise ConfigError(
                f"{arg}: no model folder or checkpoint file there (model= takes a folder written by vss.export "
                "format=folder, or a .ckpt; the model architecture is chosen when it is trained)"
            )
        out.append(f"ckpt_path={raw}")
    return out


def check_run_dir(cfg: DictConfig) -> None:
    """The run directory Hydra will create (``hydra.run.dir``) can be written: else one line naming it, before Hydra
    fails with a trace (a read-only disk, a file in the way, no permission)."""
    from omegaconf import OmegaConf

    try:
        run_dir = Path(str(OmegaConf.select(cfg, "hydra.run.dir"))).expanduser().absolute()
    except Exception:  # an interpolation only Hydra's run resolves
        return
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        why = f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        why = f"{existing} is on a read-only file system" if read_only else f"{existing} is not writable"
    else:
        return
    raise ConfigError(
        f"the run directory {run_dir} cannot be created: {why}; pass hydra.run.dir=DIR or paths.log_dir=DIR "
        "on a writable disk"
    )


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


def model_command_line(config_name: str, argv: Sequence[str]) -> list[str]:
    """The command line of vss.eval / vss.predict / vss.export: ``model=PATH`` as ``ckpt_path=PATH``
    (:func:`model_argument`), then checked against ``config_name`` (:func:`check_command_line`)."""
    argv = model_argument(argv)
    check_command_line(config_name, argv)
    return argv
