"""Import a method's official checkpoint as a vss checkpoint: ``python -m vss.convert --model M --src X --dst Y``.

Generic: the importer is the model's own, found by convention -- the function ``import_official_checkpoint``
in the module of ``conf/model/M.yaml``'s ``_target_`` (MRCFA's sits beside the ``MRCFA`` class in
:mod:`vss.models.aggregators.mrcfa`). It turns the official ``state_dict`` into Segmenter tensors
(``encoder.*``, ``aggregator.*``) and returns the config overrides the weights imply (encoder variant,
number of classes, layouts). This module composes the training config (conf/train.yaml with those
overrides, the importer's defaults such as an experiment preset, and the Hydra overrides given after the
options), builds the model, loads the tensors strictly -- any key the model does not know, any model
tensor the checkpoint lacks and any shape mismatch is an error that lists them -- and writes a
**weights-only** checkpoint: ``state_dict`` + ``hyper_parameters.config`` (no optimizer state, no step).

- ``python -m vss.eval ckpt_path=Y.ckpt`` evaluates it;
- ``python -m vss.train init_from=Y.ckpt ...`` fine-tunes from its weights (a new run, step 0); ``ckpt_path=``
  (resume) refuses it and says so.

Keys dropped on purpose (e.g. classifiers the model never uses) are listed.

Example (official MRCFA VSPW MiT-B1 weights; ``data.root`` is only needed for evaluation)::

    python -m vss.convert --model mrcfa --src mrcfa_b1_vspw.pth --dst mrcfa_b1_vspw.ckpt data.root=/data/VSPW_480p
    python -m vss.eval ckpt_path=mrcfa_b1_vspw.ckpt
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from vss.config import CONF_DIR, ConfigError, register_resolvers

IMPORTER = "import_official_checkpoint"
"""The name of a model module's importer: ``(state_dict) -> ImportResult``."""
_MAX_SHOWN = 30


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


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def _preview(keys: Sequence[str]) -> str:
    more = len(keys) - _MAX_SHOWN
    return ", ".join(keys[:_MAX_SHOWN]) + (f", ... (+{more} more)" if more > 0 else "")


def find_importer(model: str) -> Callable[[dict[str, Tensor]], ImportResult]:
    """``import_official_checkpoint`` of the module that holds ``conf/model/<model>.yaml``'s ``_target_``."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "model" / f"{model}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise ConfigError(f"--model {model!r} is invalid: no conf/model/{model}.yaml (one of {names})")
    target = OmegaConf.load(path).get("_target_")
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"conf/model/{model}.yaml has no _target_ naming the model's class")
    module_name = target.rsplit(".", 1)[0]
    importer = getattr(importlib.import_module(module_name), IMPORTER, None)
    if not callable(importer):
        raise ConfigError(
            f"model={model} ({target}) has no checkpoint importer: define {IMPORTER}(state_dict) -> "
            f"vss.convert.ImportResult in {module_name}"
        )
    return importer


def compose_config(overrides: Sequence[str]) -> Any:
    """The full training config for ``overrides`` (conf/train.yaml), resolved to plain containers."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def _check_overrides(model: str, result: ImportResult, user: Sequence[str], src: str | Path) -> list[str]:
    """``model=<model>``, the importer's defaults the user does not replace, its overrides, then the user's."""
    given = {_key(o): _value(o) for o in user}
    implied = [f"model={model}", *(o for o in result.overrides if _key(o) != "model")]
    for o in result.overrides:
        if _key(o) == "model" and _value(o) != model:
            raise ConfigError(f"{src} is a model={_value(o)} checkpoint, not model={model}: pass --model {_value(o)}")
    for o in implied:
        k = _key(o)
        if k in given and given[k] != _value(o):
            raise ConfigError(
                f"{k}={given[k]} does not match the checkpoint ({o}, read from its tensors): drop the override"
            )
    defaults = [o for o in result.defaults if _key(o) not in given]
    return [*defaults, *implied]


def convert(
    src: str | Path,
    dst: str | Path,
    model: str = "mrcfa",
    overrides: Sequence[str] = (),
    verbose: bool = True,
) -> dict[str, Any]:
    """Convert the official checkpoint ``src`` of ``model`` into the weights-only vss checkpoint ``dst``.

    Returns the report stored in the checkpoint as ``vss_converted_from``.
    """
    from omegaconf import OmegaConf

    from vss.checkpoint import atomic_torch_save
    from vss.models.encoders import load_checkpoint_state_dict
    from vss.train import build_module

    if not Path(src).is_file():
        raise ConfigError(f"--src {str(src)!r}: the file does not exist")
    try:
        state = load_checkpoint_state_dict(src)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"--src {str(src)!r}: {e}") from None
    importer = find_importer(model)
    try:
        result = importer(state)
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None
    chosen = _check_overrides(model, result, overrides, src)
    config = compose_config([*chosen, f"paths.output_dir={Path(dst).parent}", *overrides])
    cfg = OmegaConf.create(config)
    classes = int(cfg.data.num_classes)
    class_names = list(cfg.data.class_names) if cfg.data.get("class_names") else [str(i) for i in range(classes)]
    if len(class_names) != classes:
        raise ConfigError(f"data.class_names has {len(class_names)} names but the checkpoint has {classes} classes")
    module = build_module(cfg, classes, class_names)

    converted, origin = result.state_dict, result.origin
    expected = module.segmenter.state_dict()
    unknown = sorted(result.unknown) + sorted(f"{origin.get(k, k)} (as {k})" for k in converted if k not in expected)
    missing = sorted(k for k in expected if k not in converted)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    )
    if unknown or missing or mismatched:
        raise ConfigError(
            f"{src} does not match {' '.join(chosen)}: "
            f"{len(unknown)} unknown, {len(missing)} missing, {len(mismatched)} mismatched keys\n"
            f"  unknown: [{_preview(unknown)}]\n  missing: [{_preview(missing)}]\n"
            f"  mismatched: [{_preview(mismatched)}]"
        )
    module.segmenter.load_state_dict({k: converted[k] for k in expected}, strict=True)
    report = {
        "src": str(src),
        "model": model,
        "overrides": [*chosen, *overrides],
        "converted": len(converted),
        "dropped": sorted(result.dropped),
    }
    # weights only: `vss.train init_from=` and `vss.eval ckpt_path=` read it; no optimizer state, no step
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "vss_converted_from": report,
    }
    atomic_torch_save(checkpoint, dst)
    if verbose:
        print(f"[vss.convert] {src} -> {dst}: {' '.join(report['overrides'])}; {len(converted)} tensors, weights only")
        print(f"[vss.convert] dropped (unused by the model): {', '.join(report['dropped']) or 'none'}")
        print(f"[vss.convert] evaluate: python -m vss.eval ckpt_path={dst}; fine-tune: vss.train init_from={dst}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: options, then Hydra overrides for the stored training config."""
    parser = argparse.ArgumentParser(
        prog="python -m vss.convert",
        description=__doc__.split("\n\n")[0],
        epilog="Example:\n  python -m vss.convert --model mrcfa --src mrcfa_b1_vspw.pth --dst mrcfa_b1.ckpt stm.p=0.5",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--model", default="mrcfa", help="conf/model/<MODEL>.yaml whose importer to use (mrcfa)")
    parser.add_argument("--src", required=True, help="the official checkpoint (.pth)")
    parser.add_argument("--dst", required=True, help="output vss checkpoint (.ckpt, weights only)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides of the stored config, e.g. stm.p=0.5 data.root=/data/VSPW (MRCFA's p is no weight)",
    )
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.model, args.overrides)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
