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

Any number of classes: a data set's class table (``conf/data/*.yaml``: its names, colours, label map) is used
only where its class count equals the checkpoint's -- the one given with ``data=`` (another count is an
error naming both), else the composed one, else the one data group with that count (19: Cityscapes video).
Otherwise the checkpoint is stored with the VSPW-layout reader (``data=vspw``, any ``data.num_classes``) and
its own classes: the names and colours mmseg saved in the checkpoint's ``meta``, else ``class_0``,
``class_1``, ... (:func:`class_table`).

Example (official MRCFA VSPW MiT-B1 weights; ``data.root`` is only needed for evaluation)::

    python -m vss.convert --model mrcfa --src mrcfa_b1_vspw.pth --dst mrcfa_b1_vspw.ckpt data.root=/data/VSPW_480p
    python -m vss.eval ckpt_path=mrcfa_b1_vspw.ckpt
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from vss.checkpoint import ImportResult
from vss.config import CONF_DIR, register_resolvers
from vss.errors import ConfigError, os_error_message, print_error

"""The name of a model module's importer: ``(state_dict) -> ImportResult``."""
_MAX_SHOWN = 30
NUMBERED_CLASS = "class_{}"
"""The name of class ``i`` when the checkpoint stores no class names."""
GENERIC_DATA = "vspw"
"""The data group of a checkpoint whose classes no data set's table fits: the VSPW-layout reader, which reads
any ``data.num_classes`` (README "Real data")."""


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def _preview(keys: Sequence[str]) -> str:
    more = len(keys) - _MAX_SHOWN
    return ", ".join(keys[:_MAX_SHOWN]) + (f", ... (+{more} more)" if more > 0 else "")


def find_importer(model: str) -> Callable[[dict[str, Tensor]], ImportResult]:
    """The importer (:meth:`vss.models.aggregators.base.Aggregator.import_official`) of the class that
    ``conf/model/<model>.yaml``'s ``_target_`` names."""
    from omegaconf import OmegaConf

    from vss.models.aggregators.base import Aggregator, aggregator_class

    path = CONF_DIR / "model" / f"{model}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise ConfigError(f"--model {model!r} is invalid: no conf/model/{model}.yaml (one of {names})")
    cls = aggregator_class(OmegaConf.load(path).get("_target_"), key=f"conf/model/{model}.yaml _target_")
    if cls.import_official.__func__ is Aggregator.import_official.__func__:
        raise ConfigError(
            f"model={model} ({cls.__module__}.{cls.__name__}) has no checkpoint importer: override "
            "import_official(state_dict) -> vss.checkpoint.ImportResult on the class"
        )
    return cls.import_official


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


@dataclass
class ClassTable:
    """The checkpoint's own classes: names, colours (one RGB triple each, or None) and where they come from
    (``source``: the ``meta`` entry, or None for numbered names; ``note``: meta entries left unused)."""

    names: list[str]
    palette: list[list[int]] | None
    source: str | None
    note: str = ""

    def describe(self) -> str:
        """``names from meta['CLASSES'], palette from ...`` or ``numbered names (...)``, for the report."""
        if self.source is None:
            return f"numbered names {self.names[0]}...{self.names[-1]} (no class names in the meta{self.note})"
        colours = "its palette" if self.palette is not None else "no palette (a generated one)"
        return f"names from the checkpoint's {self.source}, {colours}{self.note}"


def _palette(colours: Any, num_classes: int) -> list[list[int]] | None:
    """``colours`` as ``num_classes`` RGB triples of integers in 0..255, or None when it is not that."""
    if not isinstance(colours, list | tuple) or len(colours) != num_classes:
        return None
    out = []
    for c in colours:
        if not isinstance(c, list | tuple) or len(c) != 3 or not all(isinstance(v, int | float) for v in c):
            return None
        if any(v != int(v) or not 0 <= v <= 255 for v in c):
            return None
        out.append([int(v) for v in c])
    return out


def class_table(meta: Mapping[str, Any], num_classes: int) -> ClassTable:
    """The class names and palette an mmseg checkpoint's ``meta`` holds, else numbered names and no palette.

    mmseg 0.x (mmcv runner; tools/train.py sets ``checkpoint_config.meta``) saves ``meta['CLASSES']`` and
    ``meta['PALETTE']``; mmseg 1.x (mmengine runner) ``meta['dataset_meta']['classes']`` / ``['palette']``.
    Names of another count than the weights' are not used (said in ``note``), nor a malformed palette.
    """
    dataset_meta = meta.get("dataset_meta")
    dataset_meta = dataset_meta if isinstance(dataset_meta, Mapping) else {}
    note = ""
    for where, names, colours in (
        ("meta['CLASSES']", meta.get("CLASSES"), meta.get("PALETTE")),
        ("meta['dataset_meta']['classes']", dataset_meta.get("classes"), dataset_meta.get("palette")),
    ):
        if not isinstance(names, list | tuple) or not names or not all(isinstance(n, str) for n in names):
            continue
        if len(names) != num_classes:
            note += f"; {where} has {len(names)} names, the weights {num_classes} classes: not used"
            continue
        palette = _palette(colours, num_classes)
        if colours is not None and palette is None:
            note += f"; its palette is not {num_classes} RGB triples in 0..255: not used"
        return ClassTable([str(n) for n in names], palette, where, note)
    return ClassTable([NUMBERED_CLASS.format(i) for i in range(num_classes)], None, None, note)


@dataclass
class DataChoice:
    """The data group a converted checkpoint is stored with: the overrides that pick it, its name, and whether
    its class table applies (else the checkpoint's own :class:`ClassTable` does)."""

    overrides: list[str]
    group: str
    table_applies: bool


def _data_group(overrides: Sequence[str]) -> tuple[str, int, list[str] | None]:
    """The data group ``overrides`` compose to, its class count and its class names (None: not in the YAML)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    names = cfg.data.get("class_names")
    names = [str(n) for n in OmegaConf.to_container(names)] if names is not None else None
    return str(cfg.hydra.runtime.choices.data), int(cfg.data.num_classes), names


def choose_data(chosen: Sequence[str], user: Sequence[str], num_classes: int, table: ClassTable) -> DataChoice:
    """The data group for a checkpoint of ``num_classes`` classes.

    The data set the user picked (``data=``, or an ``experiment=`` that sets it) must have that many classes,
    unless ``data.num_classes`` is given too (its layout, the checkpoint's classes). Else the composed data
    set, then any data group, whose count (and names, where both are known) fit; else :data:`GENERIC_DATA`.
    """
    given = {_key(o) for o in user}
    picked = sorted(given & {"data", "experiment"})
    base = [o for o in [*chosen, *user] if _key(o) != "data.num_classes"]
    group, count, names = _data_group(base)
    if picked:
        if count == num_classes:
            return DataChoice([], group, True)
        if "data.num_classes" in given:
            return DataChoice([], group, False)
        via = "" if picked == ["data"] else f" ({' '.join(o for o in user if _key(o) in picked)})"
        raise ConfigError(
            f"data={group}{via} has {count} classes but the checkpoint has {num_classes}: pass a data set "
            f"with {num_classes} classes, leave {' and '.join(k + '=' for k in picked)} out (then data="
            f"{GENERIC_DATA}, the VSPW-layout reader, with the checkpoint's classes), or add "
            f"data.num_classes={num_classes} to read data={group}'s layout with {num_classes} classes"
        )

    def fits(count: int, names: list[str] | None) -> bool:
        return count == num_classes and (names is None or table.source is None or names == table.names)

    if fits(count, names):
        return DataChoice([], group, True)
    for other in sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml") if p.stem != group):
        _, count, names = _data_group([*base, f"data={other}"])
        if fits(count, names):
            return DataChoice([f"data={other}"], other, True)
    return DataChoice([] if group == GENERIC_DATA else [f"data={GENERIC_DATA}"], GENERIC_DATA, False)


def _implied_classes(overrides: Sequence[str]) -> int | None:
    """The ``data.num_classes=`` an importer read from the weights, if any."""
    values = [_value(o) for o in overrides if _key(o) == "data.num_classes"]
    return int(values[0]) if values else None


def _describe_classes(classes: int, choice: DataChoice | None, table: ClassTable | None, given: set[str]) -> str:
    """One line: the class count and where the names and colours come from."""
    if choice is None or table is None:
        return f"{classes} (the data set's)"
    if choice.table_applies:
        return f"{classes}, data={choice.group}'s class table"
    if "data.class_names" in given:
        return f"{classes}, data.class_names as given (data={choice.group} reads the data)"
    return f"{classes}, {table.describe()} (data={choice.group} reads the data)"


def convert(
    src: str | Path,
    dst: str | Path,
    model: str = "mrcfa",
    overrides: Sequence[str] = (),
    verbose: bool = True,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Convert the official checkpoint ``src`` of ``model`` into the weights-only vss checkpoint ``dst``.

    Returns the report stored in the checkpoint as ``vss_converted_from``. ``src`` is read with
    ``weights_only=True`` unless ``trust_pickle`` (``--trust-pickle``: unpickling runs code the file names).
    """
    from omegaconf import OmegaConf

    from vss.checkpoint import atomic_torch_save
    from vss.lit import build_module
    from vss.models.encoders import load_checkpoint_and_meta

    if not Path(src).is_file():
        raise ConfigError(f"--src {str(src)!r}: the file does not exist")
    state, meta = load_checkpoint_and_meta(src, trust_pickle=trust_pickle, key="--src", flag="--trust-pickle")
    importer = find_importer(model)
    try:
        result = importer(state)
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None
    chosen = _check_overrides(model, result, overrides, src)
    implied_classes = _implied_classes(result.overrides)
    given = {_key(o) for o in overrides}
    table, choice = None, None
    if implied_classes is not None:
        table = class_table(meta, implied_classes)
        choice = choose_data(chosen, overrides, implied_classes, table)
        chosen = [*choice.overrides, *chosen]
    config = compose_config([*chosen, f"paths.output_dir={Path(dst).parent}", *overrides])
    if table is not None and choice is not None and not choice.table_applies:
        if "data.class_names" not in given:  # no data set's table fits: the checkpoint's own classes
            config["data"]["class_names"] = list(table.names)
        if "data.palette" not in given:
            config["data"]["palette"] = table.palette
    cfg = OmegaConf.create(config)
    classes = int(cfg.data.num_classes)
    class_names = list(cfg.data.class_names) if cfg.data.get("class_names") else [str(i) for i in range(classes)]
    if len(class_names) != classes:
        raise ConfigError(
            f"data.class_names has {len(class_names)} names but the checkpoint has {classes} classes: "
            f"give {classes} names or leave data.class_names out"
        )
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
        "classes": _describe_classes(int(config["data"]["num_classes"]), choice, table, given),
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
        print(f"[vss.convert] classes: {report['classes']}")
        if OmegaConf.is_missing(cfg.data, "root"):
            print(
                f"[vss.convert] evaluate: add data.root=DIR to this command (data={choice.group if choice else '...'}"
                f" layout), then python -m vss.eval ckpt_path={dst}; predict: python -m vss.predict "
                f"ckpt_path={dst} source=VIDEO; fine-tune: vss.train init_from={dst}"
            )
        else:
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
        "--trust-pickle",
        action="store_true",
        help="read --src with full unpickling when weights-only loading refuses it: this RUNS CODE the file names;\n"
        "only for files from a trusted origin",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides of the stored config, e.g. stm.p=0.5 data.root=/data/VSPW (MRCFA's p is no weight)",
    )
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.model, args.overrides, trust_pickle=args.trust_pickle)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print_error(str(e))
        return 2
    except OSError as e:
        print_error(os_error_message(e))
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
