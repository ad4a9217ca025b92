"""A model folder: a trained model as plain files that need no pickle and fit a Hugging Face Hub model repository
(every file at the top level), written by ``python -m vss.export ckpt_path=... format=folder``.

- ``model.safetensors``: the Segmenter's tensors (``encoder.*``, ``aggregator.*``), weights only (safetensors: a
  JSON header and raw tensor bytes, nothing is unpickled); its metadata holds ``format`` and ``global_step``;
- ``config.yaml``: the resolved config that rebuilds the model (``encoder``, ``model``, ``data`` with its
  evaluation transform and classes, ``stm``, ``freeze``, ``val_mode``, ``seed``); no paths: ``data.root`` is
  ``???`` (``vss.eval +data.root=DIR`` gives one), weights files the tensors replace (:data:`FILE_KEYS`) are null;
- ``preprocessing.json``: the input (RGB uint8), the keep-ratio resize (``scale``), ``size_divisor``, mean/std;
- ``classes.json``: class ids, names and colours;
- ``README.md``: the model card (what it is, classes, preprocessing, figures of the run's ``metrics.json``, how to
  run it).

:func:`read_folder` turns a folder into what :func:`vss.checkpoint.load_checkpoint` returns for a vss checkpoint
(``state_dict`` under ``segmenter.``, ``hyper_parameters.config``, ``global_step``), so
:func:`vss.lit.load_module` (eval, predict, export, the pipeline's passes) and ``init_from`` take either. A missing
file, a damaged ``model.safetensors`` and description files that contradict ``config.yaml`` are one
:class:`~vss.errors.ConfigError` each, naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from vss.errors import ConfigError

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
PREPROCESSING = "preprocessing.json"
CLASSES = "classes.json"
CARD = "README.md"
FILES = (WEIGHTS, CONFIG, PREPROCESSING, CLASSES, CARD)
"""Every file of a model folder."""
READ = (CONFIG, WEIGHTS, PREPROCESSING, CLASSES)
"""The files vss reads back (``README.md`` is for people, and may be edited freely)."""
FORMAT = "vss-model-folder/1"
"""``format`` in the safetensors metadata and ``preprocessing.json``."""
PREFIX = "segmenter."
"""The LightningModule's prefix of the Segmenter's tensors (the folder stores them without it)."""
CONFIG_KEYS = ("seed", "val_mode", "freeze", "stm", "encoder", "model", "data")
"""Top-level keys of the training config that ``config.yaml`` keeps (what rebuilds and evaluates the model)."""
FILE_KEYS = ("encoder.pretrained", "model.memory")
"""Config keys naming a weights file (ImageNet weights, STF-MAR's memory) whose tensors the folder's replace: null."""
MISSING = "???"


def folder_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config.yaml`` of a resolved training config: :data:`CONFIG_KEYS` only, ``data.root`` ``???``,
    :data:`FILE_KEYS` null."""
    out = {k: _plain(config[k]) for k in CONFIG_KEYS if k in config}
    if not isinstance(out.get("data"), dict) or not isinstance(out.get("model"), dict):
        raise ConfigError("the checkpoint's config has no data or model node: it cannot be written as a model folder")
    out["data"]["root"] = MISSING
    for key in FILE_KEYS:
        node, leaf = key.split(".")
        if isinstance(out.get(node), dict) and out[node].get(leaf) is not None:
            out[node][leaf] = None
    return out


def _plain(node: Any) -> Any:
    """A deep copy made of dicts, lists and scalars."""
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_plain(v) for v in node]
    return node


def preprocessing(scale: Sequence[int], size_divisor: int, mean: Sequence[float], std: Sequence[float]) -> dict:
    """``preprocessing.json``: how a frame becomes the model's input (as :func:`vss.data.transforms.
    build_eval_transform` and :meth:`vss.models.segmenter.Segmenter.normalize` do it)."""
    return {
        "format": FORMAT,
        "input": {"dtype": "uint8", "channels": "RGB", "layout": "(frames, 3, height, width), values 0..255"},
        "scale": [int(s) for s in scale],
        "resize": "keep-ratio bilinear resize so the long side fits max(scale) and the short side min(scale) "
        "(mmseg Resize keep_ratio), then a bilinear resize of each side up to the next multiple of size_divisor",
        "size_divisor": int(size_divisor),
        "mean": [round(float(m), 6) for m in mean],
        "std": [round(float(s), 6) for s in std],
        "normalize": "(x - mean) / std per channel on the 0..255 values, as float32",
        "output": "per-class logits at the model's output resolution; upsampled bilinearly (align_corners=False) "
        "to the frame size, then the argmax over classes is the class map",
    }


def classes(names: Sequence[str], colours: Sequence[Sequence[int]]) -> dict[str, Any]:
    """``classes.json``: id, name and RGB colour of each class."""
    rows = [{"id": i, "name": str(n), "color": [int(c) for c in colours[i]]} for i, n in enumerate(names)]
    return {"num_classes": len(rows), "classes": rows}


# -- writing ----------------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _stage(folder: Path, name: str, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a hidden temporary file in ``folder`` (fsynced, an ordinary file's mode); returns it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_folder(
    output: Path,
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any],
    prep: Mapping[str, Any],
    class_table: Mapping[str, Any],
    card: str,
    global_step: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the model folder into ``output``: every file staged under a temporary name first, then renamed into
    place (an interrupted export leaves no file under its final name); an existing folder is refused unless
    ``overwrite``. ``state_dict``: the Segmenter's tensors (``encoder.*``, ``aggregator.*``)."""
    from safetensors.torch import save_file

    present = [n for n in FILES if (output / n).exists()]
    if present and not overwrite:
        raise ConfigError(
            f"output={str(output)!r} already holds {', '.join(present)} (pass overwrite=true to replace them)"
        )
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output={str(output)!r} is a file: expected a folder for the model folder")
    output.mkdir(parents=True, exist_ok=True)
    # clones: tensors that share memory (tied weights) are saved as separate tensors, contiguous
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    metadata = {"format": FORMAT, **({"global_step": str(int(global_step))} if global_step is not None else {})}

    def text(s: str) -> Callable[[Path], None]:
        return lambda p: p.write_text(s, encoding="utf-8")

    writers: dict[str, Callable[[Path], None]] = {
        WEIGHTS: lambda p: save_file(tensors, str(p), metadata=metadata),
        CONFIG: text(yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None, width=100)),
        PREPROCESSING: text(json.dumps(prep, indent=2) + "\n"),
        CLASSES: text(json.dumps(class_table, indent=2) + "\n"),
        CARD: text(card),
    }
    staged: dict[str, Path] = {}
    try:
        for name, write in writers.items():
            staged[name] = _stage(output, name, write)
        for name, tmp in staged.items():
            os.replace(tmp, output / name)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return [output / n for n in FILES]


# -- reading ----------------------------------------------------------------------------------------------------
def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a directory (a model folder, or a directory that should have been one)."""
    return Path(str(path)).expanduser().is_dir()


def _read_json(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {path.name} cannot be read as JSON ({' '.join(str(e).split())[:160]})") from None


def read_weights(path: Path, where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and metadata of ``model.safetensors``; a damaged file is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"{where}: {WEIGHTS} cannot be read (damaged, truncated or not a safetensors file: {first[:160]}); "
            "export the folder again"
        ) from None
    if not tensors:
        raise ConfigError(f"{where}: {WEIGHTS} holds no tensors")
    return tensors, metadata


def _check_classes(table: Any, num_classes: int, where: str) -> list[str]:
    """The class names of ``classes.json``, which must list ``num_classes`` classes with ids 0..C-1."""
    rows = table.get("classes") if isinstance(table, dict) else None
    ok = isinstance(rows, list) and all(isinstance(r, dict) and "name" in r for r in rows)
    if not ok:
        raise ConfigError(f"{where}: {CLASSES} is invalid: expected {{'classes': [{{'id', 'name', 'color'}}, ...]}}")
    if len(rows) != num_classes or [r.get("id") for r in rows] != list(range(num_classes)):
        raise ConfigError(
            f"{where}: {CLASSES} lists {len(rows)} classes (ids {[r.get('id') for r in rows][:6]}...), config.yaml "
            f"data.num_classes={num_classes}: the files disagree (export the folder again)"
        )
    return [str(r["name"]) for r in rows]


def _check_preprocessing(prep: Any, data: Mapping[str, Any], where: str) -> None:
    """``preprocessing.json`` says what ``config.yaml``'s data transform does (scale, size_divisor)."""
    if not isinstance(prep, dict):
        raise ConfigError(f"{where}: {PREPROCESSING} is invalid: expected a JSON object")
    own = {"scale": [int(s) for s in data.get("scale") or []], "size_divisor": int(data.get("size_divisor") or 1)}
    for key, value in own.items():
        if prep.get(key) != value:
            raise ConfigError(
                f"{where}: {PREPROCESSING} has {key}={prep.get(key)!r} but config.yaml data.{key}={value!r}: the "
                "files disagree (vss rebuilds from config.yaml; export the folder again)"
            )


def read_folder(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """A model folder as a vss checkpoint dict: ``state_dict`` (``segmenter.*``), ``hyper_parameters``
    (``config``, ``class_names``), ``global_step``, ``model_folder``. Each missing or contradicting file is one
    :class:`ConfigError` naming it; shapes are checked against the built model by :func:`vss.lit.check_fit`."""
    folder = Path(str(path)).expanduser()
    where = f"{key}={str(path)!r}"
    missing = [n for n in READ if not (folder / n).is_file()]
    if missing:
        what = "is no model folder" if len(missing) == len(READ) else "is a model folder missing"
        raise ConfigError(
            f"{where} {what}: {', '.join(missing)} not found (a model folder holds {', '.join(FILES)}, as "
            "python -m vss.export format=folder writes it; a checkpoint is a .ckpt file)"
        )
    try:
        config = yaml.safe_load((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: {CONFIG} cannot be parsed as YAML ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("model", "encoder", "data")):
        raise ConfigError(f"{where}: {CONFIG} is invalid: expected a mapping with model, encoder and data")
    num_classes = config["data"].get("num_classes")
    if type(num_classes) is not int or num_classes < 1:
        raise ConfigError(f"{where}: {CONFIG} data.num_classes={num_classes!r} is invalid: expected a positive integer")
    names = _check_classes(_read_json(folder / CLASSES, where), num_classes, where)
    _check_preprocessing(_read_json(folder / PREPROCESSING, where), config["data"], where)
    tensors, metadata = read_weights(folder / WEIGHTS, where)
    step = metadata.get("global_step")
    return {
        "state_dict": {PREFIX + k: v for k, v in tensors.items()},
        "hyper_parameters": {"config": config, "class_names": names},
        "global_step": int(step) if step is not None and step.isdigit() else None,
        "model_folder": str(folder),
    }


def read_model_file(path: str | Path, *, key: str = "ckpt_path", **load: Any) -> Any:
    """A model folder (:func:`read_folder`) or a checkpoint file (:func:`vss.checkpoint.load_checkpoint` with
    ``load``: ``trust_pickle``, ``expect``, ``mmap``)."""
    if is_model_folder(path):
        return read_folder(path, key)
    from vss.checkpoint import load_checkpoint

    return load_checkpoint(path, key=key, **load)


# -- the model card -----------------------------------------------------------------------------------------------
def run_metrics(ckpt_path: str | Path, step: int | None) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    """The figures of the checkpoint's run (``RUN/metrics.json`` of ``RUN/checkpoints/X.ckpt``, written by vss.train:
    the final weights' ``val`` / ``test`` and the ``best`` checkpoint's ``val``) that belong to this checkpoint's
    step, as (split, metrics) rows; and a note saying where they come from, or why there are none."""
    path = Path(str(ckpt_path)).expanduser()
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    source = run / "metrics.json"
    try:
        result = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [], f"no metrics.json next to the checkpoint's run ({source})"
    if not isinstance(result, dict):
        return [], f"{source} is not a JSON object"
    rows: list[tuple[str, dict[str, Any]]] = []
    if result.get("step") == step and step is not None:
        rows += [(split, result[split]) for split in ("val", "test") if isinstance(result.get(split), dict)]
    best = result.get("best")
    if not rows and isinstance(best, dict) and best.get("step") == step and isinstance(best.get("val"), dict):
        rows.append(("val", best["val"]))
    if not rows:
        return [], f"{source} holds no figures of step {step} (this checkpoint's)"
    return rows, f"from {source.name} of the training run, step {step}"


def _number(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, int | float) and not isinstance(v, bool) else "n/a"


def model_card(
    *,
    title: str,
    facts: Sequence[tuple[str, str]],
    class_table: Mapping[str, Any],
    prep: Mapping[str, Any],
    metrics: Sequence[tuple[str, Mapping[str, Any]]],
    metrics_note: str,
    headline: Sequence[str],
    data_target: str,
) -> str:
    """``README.md``: YAML front matter for the Hub, then what the model is, its classes, its preprocessing, the
    figures of its run and the commands that run it."""
    lines = [
        "---",
        "library_name: vss",
        "pipeline_tag: image-segmentation",
        "tags: [video-semantic-segmentation, semantic-segmentation, safetensors, vss]",
        "---",
        "",
        f"# {title}",
        "",
        "A video semantic segmentation model exported by `python -m vss.export format=folder`. The weights are in "
        f"`{WEIGHTS}` (no pickle), the config that rebuilds the model in `{CONFIG}`.",
        "",
        "## Model",
        "",
        *(f"- {k}: {v}" for k, v in facts),
        "",
        "## Classes",
        "",
        "| id | name | colour (RGB) |",
        "|---:|---|---|",
        *(f"| {c['id']} | {c['name']} | {tuple(c['color'])} |" for c in class_table["classes"]),
        "",
        "## Preprocessing",
        "",
        f"- input: RGB uint8 frames, channels first; `{PREPROCESSING}` says it for other tools",
        f"- resize: keep-ratio to fit scale {prep['scale']} (long, short side), then each side up to a multiple "
        f"of {prep['size_divisor']} (bilinear)",
        f"- normalise: (x - mean) / std on 0..255 values, mean {[round(m, 3) for m in prep['mean']]}, "
        f"std {[round(s, 3) for s in prep['std']]}",
        "- output: per-class logits, upsampled bilinearly to the frame size; the argmax is the class map",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        keys = [k for k in headline if any(k in m for _, m in metrics)]
        lines += [f"| split | {' | '.join(keys)} |", "|---|" + "---:|" * len(keys)]
        lines += [f"| {split} | {' | '.join(_number(m.get(k)) for k in keys)} |" for split, m in metrics]
        lines += ["", f"Figures {metrics_note}.", ""]
    else:
        lines += [f"None recorded: {metrics_note}.", ""]
    lines += [
        "## Use",
        "",
        "With vss installed (`pip install -e .` in its repository); `MODEL` is the path of this folder:",
        "",
        "```bash",
        "python -m vss.predict model=MODEL source=clip.mp4          # masks, overlay.mp4",
        f"python -m vss.eval model=MODEL +data.root=DATA             # metrics.json ({data_target})",
        "python -m vss.export model=MODEL format=onnx height=480 width=864  # a streaming ONNX step",
        "python -m vss.train init_from=MODEL ...                    # fine-tune from these weights",
        "```",
        "",
        f"Without vss: `safetensors.torch.load_file('{WEIGHTS}')` gives the tensors (keys `encoder.*`, "
        "`aggregator.*`) of the model `config.yaml` describes.",
        "",
    ]
    return "\n".join(lines)
