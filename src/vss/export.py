"""Export a checkpoint's streaming step: ``python -m vss.export`` (also ``vss-export``).

Usage::

    python -m vss.export ckpt_path=RUN/checkpoints/last.ckpt format=onnx height=480 width=864 [batch=1] [output=DIR]
    python -m vss.export ckpt_path=... format=pt2 height=256 width=448
    python -m vss.export ckpt_path=RUN/checkpoints/last.ckpt format=folder [output=DIR]   # a model folder
    python -m vss.export model=FOLDER format=onnx height=480 width=864                    # from a model folder

``format=folder`` writes a model folder (:mod:`vss.folder`: model.safetensors, config.yaml, preprocessing.json,
classes.json, README.md; default ``output``: ``model/`` in the run directory); no frame size is needed.

The exported graph is :meth:`vss.models.step.Step.step` at a fixed frame size and batch: inputs ``frame``
(B,3,H,W) uint8 RGB (normalised inside the graph) and the state tensors (names sorted, see
:mod:`vss.models.step`); outputs ``logits``, ``valid``, ``index`` and the next state (``next.<name>``). The
first call passes the zero state (zeros of the shapes in ``spec.json``); each call's ``next.*`` is the next
call's state. Written into ``output`` (default: the run directory):

- ``step.pt2`` (``format=pt2``, :func:`torch.export.save`; :func:`torch.export.load` reads it) or ``step.onnx``
  (``format=onnx``, :func:`torch.onnx.export` with ``dynamo=True``);
- ``step.aoti.pt2`` (``format=pt2 aoti=true``): the program compiled by AOTInductor
  (:func:`torch._inductor.aoti_compile_and_package`; needs a C++ compiler, takes minutes on a CPU), checked like
  the others; ``vss.predict backend=pt2`` runs it where present;
- ``spec.json``: input/output names, shapes and dtypes, the zero state, the preprocessing, ``lookahead`` and the
  flush procedure, the class names and palette, and the parity figures of the export-time check.

**Flush.** A model with lookahead ``L`` emits frame ``t - L`` at step ``t``; at the end of a video the last ``L``
frames come out by calling the step ``L`` more times with the last frame repeated. That is
:meth:`Step.flush` exactly: its references are clamped to the last frame, and a repeated frame has the last
frame's features (the export-time check runs the repetition against the eager ``flush``).

**Checked at export time.** A short synthetic video (``check_frames`` random uint8 frames) goes through the
eager step (and its flush) and through the exported file (and the repetition); the maximum absolute difference
of the valid frames' logits and the share of equal class ids are printed. The export is refused (exit 2, one
line, no file left under its final name) when the logits differ by more than ``atol`` or a class id differs
where the eager logits are not tied (top two within ``atol``), and when the exporter fails (the op it could not
export is named).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from vss.cli import model_command_line
from vss.config import CONF_DIR, register_resolvers
from vss.errors import ConfigError, friendly_errors
from vss.exported import AOTI_FILE, FILES, NEXT, OUTPUTS, Runner, StepGraph, _require_onnx, cpp_compiler
from vss.models.ops.normalize import IMAGENET_MEAN, IMAGENET_STD
from vss.models.step import State, Step
from vss.validation import required

log = logging.getLogger("vss.export")
register_resolvers()

FORMATS = ("pt2", "onnx", "folder")


# -- the model -------------------------------------------------------------------------------------------
def load(ckpt_path: str | Path, trust_pickle: bool = False) -> Any:
    """The checkpoint's model on the CPU (:class:`vss.predict.Model`: segmenter, class names, palette, ...),
    read weights-only unless ``trust_pickle`` (:func:`vss.lit.load_module`). The one place the export reads a
    checkpoint."""
    from vss.predict import load_model

    return load_model(ckpt_path, torch.device("cpu"), trust_pickle)


def _tensor_spec(name: str, t: Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


# -- exporting -------------------------------------------------------------------------------------------
OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)"),  # the ONNX exporter's DispatchError
    re.compile(r"target=torch\.ops\.([\w.]+)"),  # the ONNX exporter's ConversionError: the node's target
    re.compile(r"\b([A-Za-z_][\w]*::[A-Za-z_][\w.]*)"),  # torchvision::deform_conv2d, aten::foo.default
    re.compile(r"\b((?:aten|torchvision|prims|quantized)\.[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)?)"),  # aten.foo.default
)


def unsupported_op(e: BaseException) -> str | None:
    """The op an exporter's exception names (``torchvision::deform_conv2d``), searching its chain; None if none."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for pattern in OP_PATTERNS:
            if m := pattern.search(str(e)):
                return ".".join(m.groups()).removesuffix(".")
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


def _refuse_export(fmt: str, label: str, e: BaseException) -> ConfigError:
    op = unsupported_op(e)
    first = " ".join(str(e).strip().splitlines()[0].split())[:300] if str(e).strip() else type(e).__name__
    what = f"op {op} is not supported" if op else f"{type(e).__name__}: {first}"
    return ConfigError(f"format={fmt}: {label} cannot be exported ({what}); nothing was written")


def export_pt2(graph: StepGraph, args: tuple[Tensor, ...], path: Path) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) of the step, saved with :func:`torch.export.save`; the program."""
    with torch.no_grad():  # Step.step's own no_grad is then no region of its own (torch.export.save refuses those)
        program = torch.export.export(graph, args, strict=False)
    torch.export.save(program, str(path))
    return program


def compile_aoti(program: torch.export.ExportedProgram, path: Path) -> float:
    """The exported program compiled by AOTInductor into a package at ``path`` (``.pt2``); the seconds it took."""
    from torch._inductor import aoti_compile_and_package

    start = time.perf_counter()
    with torch.no_grad():
        aoti_compile_and_package(program, package_path=str(path))
    return time.perf_counter() - start


def export_onnx(graph: StepGraph, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str]) -> None:
    """``torch.onnx.export(dynamo=True)`` of the step, state as named inputs and outputs. The exporter names inner
    values after the traced nodes (an ``aten.index`` node is ``index``): one that holds an input or output name is
    renamed first (the exporter's own ``output_names`` would make a second ``index``, an invalid model)."""
    program = torch.onnx.export(graph, args, dynamo=True, external_data=False, verbose=False, report=False)
    model = program.model
    ends = {id(v) for v in (*model.graph.inputs, *model.graph.outputs)}
    reserved = set(inputs) | set(outputs)
    for node in model.graph.all_nodes():
        for value in node.outputs:
            if value.name in reserved and id(value) not in ends:
                value.name = f"{value.name}.inner{len(ends)}"
                ends.add(id(value))
    for value in model.graph.initializers.values():
        if value.name in reserved and id(value) not in ends:
            raise ConfigError(f"format=onnx: the graph has a weight named {value.name!r}, a name of the step's I/O")
    for value, name in zip(model.graph.inputs, inputs, strict=True):
        value.name = name
    for value, name in zip(model.graph.outputs, outputs, strict=True):
        value.name = name
    program.save(str(path), external_data=False)


# -- the export-time check -------------------------------------------------------------------------------
@dataclass
class Parity:
    """The exported step vs the eager step over a video: max |logits diff|, share of equal class ids, frames
    compared, class ids that differ where the eager logits are not tied."""

    max_abs_diff: float
    equal_ids: float
    frames: int
    untied_differences: int


def check_video(height: int, width: int, batch: int, frames: int, seed: int = 0) -> np.ndarray:
    """A synthetic video (N,B,3,H,W) uint8: smooth random colour fields (varied class maps) with noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(frames * batch, 3, max(2, height // 16), max(2, width // 16), generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    noisy = smooth * 220 + torch.rand(frames * batch, 3, height, width, generator=g) * 35
    return noisy.clamp(0, 255).to(torch.uint8).reshape(frames, batch, 3, height, width).numpy()


def run_eager(step: Step, video: np.ndarray) -> list[tuple[int, Tensor]]:
    """(index, logits) of every valid output of the eager step over ``video`` then its flush."""
    h, w = video.shape[-2:]
    state = step.init_state(h, w, video.shape[1])
    outs = []
    for frame in video:
        o, state = step.step(torch.from_numpy(frame), state)
        outs.append(o)
    outs += step.flush(state, h, w)
    return [(int(o["index"]), o["logits"]) for o in outs if bool(o["valid"])]


def run_exported(run: Runner, zero: State, video: np.ndarray, lookahead: int) -> list[tuple[int, np.ndarray]]:
    """(index, logits) of every valid output of an exported step over ``video``, then ``lookahead`` calls with
    the last frame repeated (the flush)."""
    state = {k: v.numpy() for k, v in zero.items()}
    outs = []
    for frame in [*video, *[video[-1]] * lookahead]:
        o, state = run(np.ascontiguousarray(frame), state)
        if bool(o["valid"]):
            outs.append((int(o["index"]), o["logits"]))
    return outs


def compare(eager: list[tuple[int, Tensor]], exported: list[tuple[int, np.ndarray]], atol: float) -> Parity:
    """:class:`Parity` of two runs (same indices expected)."""
    if [i for i, _ in eager] != [i for i, _ in exported]:
        raise ConfigError(
            f"the exported step emits frames {[i for i, _ in exported]}, the eager step {[i for i, _ in eager]}"
        )
    diff, equal, total, untied = 0.0, 0, 0, 0
    for (_, a), (_, b) in zip(eager, exported, strict=True):
        b_t = torch.from_numpy(np.asarray(b)).to(a.dtype)
        diff = max(diff, (a - b_t).abs().max().item())
        ia, ib = a.argmax(1), b_t.argmax(1)
        same = ia == ib
        equal += int(same.sum())
        total += same.numel()
        # a differing id is a tie when the eager logit of the exported class is within atol of the eager top
        top = a.gather(1, ia[:, None])[:, 0]
        other = a.gather(1, ib[:, None])[:, 0]
        untied += int(((~same) & (top - other > atol)).sum())
    return Parity(diff, equal / max(total, 1), len(eager), untied)


# -- the command -----------------------------------------------------------------------------------------
def _positive_int(cfg: DictConfig, key: str) -> int:
    value = required(cfg, key)
    if type(value) is not int or value <= 0:
        raise ConfigError(f"{key}={value!r} is invalid: expected a positive integer")
    return value


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.output``, or the Hydra run directory when it is null."""
    if cfg.get("output") is not None:
        return Path(str(cfg.output)).expanduser()
    try:
        return Path(str(cfg.paths.output_dir))
    except Exception:  # ${hydra:runtime.output_dir} outside a Hydra run
        raise ConfigError(
            "output=null means the run directory, which exists only under python -m vss.export; pass output=DIR"
        ) from None


def _write_atomic(path: Path, write: Any) -> None:
    """``write(tmp)`` then rename to ``path``: an interrupted export never leaves a file under its final name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> an ordinary file's mode
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _trust(cfg: DictConfig) -> bool:
    trust = cfg.get("trust_pickle", False)
    if not isinstance(trust, bool):
        raise ConfigError(f"trust_pickle={trust!r} is invalid: expected true or false")
    return trust


def export_folder(cfg: DictConfig, ckpt_path: str) -> dict[str, Any]:
    """Write ``ckpt_path``'s model as a model folder (:mod:`vss.folder`) into ``output`` (default: ``model/`` in the
    run directory); return what was written."""
    from vss.folder import WEIGHTS, classes, folder_config, model_card, preprocessing, run_metrics, write_folder
    from vss.lit import read_module_checkpoint
    from vss.metrics import SUMMARY_KEYS
    from vss.outputs import load_palette

    trust = _trust(cfg)
    model = load(ckpt_path, trust)  # rebuilt and its weights checked against the config before anything is written
    ckpt, stored = read_module_checkpoint(ckpt_path, trust_pickle=trust)
    output = output_dir(cfg) if cfg.get("output") is not None else output_dir(cfg) / "model"
    segmenter = model.segmenter
    config = folder_config(OmegaConf.to_container(stored, resolve=True))
    mean, std = [m * 255 for m in IMAGENET_MEAN], [s * 255 for s in IMAGENET_STD]
    prep = preprocessing(model.scale, model.size_divisor, mean, std)
    table = classes(model.class_names, load_palette(None, model.num_classes, model.palette).tolist())
    step = ckpt.get("global_step")
    rows, note = run_metrics(ckpt_path, step)
    aggregator = getattr(segmenter, "aggregator", segmenter)
    encoder = OmegaConf.select(stored, "encoder.name") or OmegaConf.select(stored, "encoder._target_")
    params = sum(p.numel() for p in segmenter.parameters())
    facts = [
        ("aggregator", f"`{OmegaConf.select(stored, 'model._target_')}`"),
        ("encoder", f"`{encoder}`"),
        ("parameters", f"{params / 1e6:.2f} M"),
        ("references (frame offsets relative to the target)", str(list(segmenter.offsets) or "none: single frame")),
        ("classes", str(model.num_classes)),
        ("training step", str(step) if step is not None else "unknown"),
    ]
    card = model_card(
        title=f"{type(aggregator).__name__} ({encoder}), {model.num_classes} classes",
        facts=facts,
        class_table=table,
        prep=prep,
        metrics=rows,
        metrics_note=note,
        headline=SUMMARY_KEYS,
        data_target=str(OmegaConf.select(stored, "data._target_")),
    )
    files = write_folder(
        output, segmenter.state_dict(), config, prep, table, card, step, overwrite=bool(cfg.get("overwrite"))
    )
    size = (output / WEIGHTS).stat().st_size / 2**20
    print(f"[vss.export] wrote the model folder {output}/: {', '.join(f.name for f in files)} ({size:.1f} MiB)")
    print(
        f"[vss.export] run it: python -m vss.predict model={output} source=VIDEO; evaluate: python -m vss.eval "
        f"model={output} +data.root=DIR",
        flush=True,
    )
    return {"format": "folder", "output": str(output), "files": [f.name for f in files], "metrics": note}


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path``'s step in ``cfg.format``, check it against the eager step; return the spec."""
    from vss.outputs import load_palette

    ckpt_path = required(cfg, "ckpt_path")
    fmt = required(cfg, "format")
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is invalid: expected one of {list(FORMATS)}")
    if fmt == "folder":
        return export_folder(cfg, ckpt_path)
    height, width, batch = (_positive_int(cfg, k) for k in ("height", "width", "batch"))
    frames = _positive_int(cfg, "check_frames")
    atol = float(required(cfg, "atol"))
    if not (math.isfinite(atol) and atol > 0):
        raise ConfigError(f"atol={atol!r} is invalid: expected a positive finite number")
    aoti = cfg.get("aoti", False)
    if not isinstance(aoti, bool):
        raise ConfigError(f"aoti={aoti!r} is invalid: expected true or false")
    if aoti and fmt != "pt2":
        raise ConfigError(f"aoti=true compiles the torch.export program: it goes with format=pt2, not format={fmt}")
    if aoti and cpp_compiler() is None:
        raise ConfigError(
            "aoti=true needs a C++ compiler for AOTInductor (none of $CXX, c++, g++, clang++ is on PATH): install "
            "one (apt-get install g++) or leave aoti=false (step.pt2 alone runs without one)"
        )
    if fmt == "onnx":
        _require_onnx()
    model = load(ckpt_path, _trust(cfg))
    if height % model.size_divisor or width % model.size_divisor:
        raise ConfigError(
            f"height={height} width={width}: this model takes frame sides that are multiples of "
            f"{model.size_divisor} (its data.size_divisor)"
        )
    output = output_dir(cfg)
    target = output / FILES[fmt]
    if target.exists() and not cfg.get("overwrite", False):
        raise ConfigError(f"output={str(output)!r} already holds {target.name} (pass overwrite=true to replace it)")
    output.mkdir(parents=True, exist_ok=True)

    segmenter = model.segmenter.float().eval()
    label = type(getattr(segmenter, "aggregator", segmenter)).__name__
    step = Step(segmenter).eval()
    zero = step.init_state(height, width, batch)
    names = list(zero)
    graph = StepGraph(step, names).eval()
    frame0 = torch.zeros(batch, 3, height, width, dtype=torch.uint8)
    with torch.no_grad():
        eager_out = graph(frame0, *zero.values())
    inputs = ["frame", *names]
    outputs = [*OUTPUTS, *(NEXT + n for n in names)]

    video = check_video(height, width, batch, frames)

    def write(tmp: Path) -> None:
        try:
            if fmt == "pt2":
                program = export_pt2(graph, (frame0, *zero.values()), tmp)
            else:
                export_onnx(graph, (frame0, *zero.values()), tmp, inputs, outputs)
        except Exception as e:  # the exporter's own error: name the op it could not export
            raise _refuse_export(fmt, label, e) from None
        eager = run_eager(step, video)
        try:
            runner = Runner(fmt, tmp, names)
        except Exception as e:  # the runtime refuses the written file (an invalid model)
            raise _refuse_export(fmt, label, e) from None
        spec["check"] = checked(fmt, runner, eager)
        if aoti:  # the compiled package, checked likewise, beside step.pt2 (written before it: nothing partial)
            aoti_path = output / AOTI_FILE
            if aoti_path.exists() and not cfg.get("overwrite", False):
                raise ConfigError(
                    f"output={str(output)!r} already holds {AOTI_FILE} (pass overwrite=true to replace it)"
                )

            def package(tmp_aoti: Path) -> None:
                try:
                    seconds = compile_aoti(program, tmp_aoti)
                except Exception as e:
                    raise _refuse_export("pt2 aoti=true", label, e) from None
                print(f"[vss.export] AOTInductor ({cpp_compiler()}) compiled the step in {seconds:.0f} s", flush=True)
                spec["aoti"] = {
                    "file": AOTI_FILE,
                    "compile_s": seconds,
                    "check": checked("aoti", Runner("aoti", tmp_aoti, names), eager),
                }

            _write_atomic(aoti_path, package)

    def checked(kind: str, runner: Runner, eager: list[tuple[int, Tensor]]) -> dict[str, Any]:
        exported = run_exported(runner, zero, video, step.lookahead)
        parity = compare(eager, exported, atol)
        line = (
            f"[vss.export] {label} {kind} {batch}x3x{height}x{width}: parity over {parity.frames} frames: max |logits "
            f"diff| {parity.max_abs_diff:.3g}, equal class ids {100 * parity.equal_ids:.4f}%"
        )
        print(line, flush=True)
        if parity.max_abs_diff > atol or parity.untied_differences:
            raise ConfigError(
                f"format={fmt}: the exported {label} step ({kind}) differs from the eager step (max |logits diff| "
                f"{parity.max_abs_diff:.3g} > atol={atol:g} or {parity.untied_differences} untied class id(s) differ "
                f"over {parity.frames} frames); nothing was written"
            )
        return {
            "frames": parity.frames,
            "max_abs_diff": parity.max_abs_diff,
            "equal_class_ids": parity.equal_ids,
            "atol": atol,
        }

    colours = load_palette(None, model.num_classes, model.palette)
    spec: dict[str, Any] = {
        "format": fmt,
        "file": target.name,
        "model": label,
        "ckpt_path": str(ckpt_path),
        "inputs": [_tensor_spec("frame", frame0), *(_tensor_spec(k, v) for k, v in zero.items())],
        "outputs": [_tensor_spec(n, t) for n, t in zip(outputs, eager_out, strict=True)],
        "state": [
            {**_tensor_spec(k, v), "input": k, "output": NEXT + k, "zero": "zeros of shape and dtype"}
            for k, v in zero.items()
        ],
        "preprocessing": {
            "frame": "RGB uint8 0..255, (batch, 3, height, width), channels first; normalised inside the graph",
            "height": height,
            "width": width,
            "resize": f"frames are resized to {height}x{width} (bilinear) before the step; sides multiples of "
            f"{model.size_divisor}",
            "scale": list(model.scale),  # the checkpoint's evaluation transform (vss.predict prepares frames so)
            "size_divisor": model.size_divisor,
            "normalisation_inside": {"mean": [m * 255 for m in IMAGENET_MEAN], "std": [s * 255 for s in IMAGENET_STD]},
        },
        "logits": "per class scores of frame `index` at the model's output size; vss.predict upsamples them "
        "bilinearly (align_corners=False) to the frame size, then takes the argmax over classes",
        "lookahead": step.lookahead,
        "usage": "state = zeros of each state entry; per frame: outputs = step(frame, *state); state = the next.* "
        "outputs; when `valid` is true, `logits` are those of frame `index` (frames come out in order, `lookahead` "
        "frames late)",
        "flush": f"at the end of a video call the step {step.lookahead} more time(s) with the last frame repeated "
        "and keep the valid outputs (equal to vss.models.step.Step.flush); then start the next video from the zero "
        "state",
        "classes": [
            {"id": i, "name": n, "color": [int(c) for c in colours[i]]} for i, n in enumerate(model.class_names)
        ],
    }
    _write_atomic(target, write)
    _write_atomic(output / "spec.json", lambda p: p.write_text(json.dumps(spec, indent=2) + "\n"))
    size = target.stat().st_size / 2**20
    also = ""
    if "aoti" in spec:
        also = f", {AOTI_FILE} ({(output / AOTI_FILE).stat().st_size / 2**20:.1f} MiB)"
    print(f"[vss.export] wrote {target} ({size:.1f} MiB){also} and spec.json", flush=True)
    return spec


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
@friendly_errors
def _hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    export(cfg)


def main() -> None:
    """``python -m vss.export`` / ``vss-export``: a mistyped key or a missing option is one line first."""
    sys.argv[1:] = friendly_errors(model_command_line)("export", sys.argv[1:])  # model=FOLDER -> ckpt_path=FOLDER
    _hydra_main()


if __name__ == "__main__":
    main()
