"""Run a trained checkpoint on your own video: ``python -m vss.predict`` (also ``vss-predict``).

Usage::

    python -m vss.predict ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt source=street.mp4
    python -m vss.predict ckpt_path=... source=frames/ output=pred/ fps=25 side_by_side=true opacity=0.6
    python -m vss.predict backend=onnx export=EXPORT_DIR source=street.mp4    # or backend=pt2 | compile

``backend``: ``eager`` (default) runs the :class:`~vss.models.streamer.Streamer`; ``compile`` the streaming
:class:`~vss.models.step.Step` through ``torch.compile``; ``onnx`` / ``pt2`` the step ``vss.export`` wrote into
``export=EXPORT_DIR`` (spec.json + step.onnx / step.pt2, no checkpoint read; ONNX Runtime on the CPU or its CUDA
provider, pt2 on the CPU), one frame per call, the last ``lookahead`` frames by repeating the last frame. All give
the same masks: frames are prepared as below (spec.json records the checkpoint's ``data.scale`` and
``size_divisor``) and must come out at the export's size (else one line naming both sizes).

``source`` is a video file (anything OpenCV's FFmpeg reads: .mp4, .avi, .mov, ...), a folder of frames
(jpg/jpeg/png/bmp, in natural name order: ``2.png`` before ``10.png``) or a single image. Every frame goes
through the checkpoint's evaluation transform (its ``data.scale`` and ``data.size_divisor``) and the model's
:class:`~vss.models.streamer.Streamer` (each frame encoded once, references from a cache), read in chunks of
``batch_size`` frames so a long video never sits in memory. Each frame's logits are upsampled (bilinear) to
the original frame size and argmax'ed. Written into ``output`` (default: the run directory):

- ``masks/<frame>.png``: class ids 0..C-1, 8-bit (``%06d.png`` for a video: the frame's index in it, also after
  skipped frames; the frame's stem for a folder);
- ``overlay.mp4`` (``save_overlay=true``): the frames blended with the class colours (``opacity``), frame for frame
  the size of the source (it lines up with the masks and the source);
- ``side_by_side.mp4`` (``side_by_side=true``): frame | overlay, a legend of the frame's classes under them;
- ``legend.png``: swatch, id, name and pixel share of every class predicted;
- ``predict.json``, last: frame count, frames skipped, speed, the classes with their colours and ``flicker``:
  the share of pixels whose predicted class changes between consecutive processed frames
  (:class:`~vss.metrics.flicker.FlickerRate`; no labels; ``pooled`` and ``per_video``, also in the summary line;
  a frame whose size differs from the one before it is not compared with it).

Class names and colours are those of the checkpoint's data (the data module its config builds, as its training
overlays: e.g. the Cityscapes table where ``data.class_names``/``data.palette`` are null; no data file is read);
``palette=FILE`` replaces the colours. A frame FFmpeg cannot decode, or a video that ends before the frame
count its container declares (OpenCV's ``CAP_PROP_FRAME_COUNT``), is an error naming the frame and the source
(exit 2); with ``on_error=skip`` it is a warning, the frames are counted in the summary line and predict.json
(``read``). FFmpeg's and OpenCV's own messages while the source is read (and the videos are opened) do not
reach the terminal: they go into predict.json and the error text.

**Live sources** (:mod:`vss.live`): ``source=0`` (a camera index), ``source=rtsp://...``, ``http://...`` (anything
OpenCV's FFmpeg opens). A reader thread fills a queue of ``queue_size`` frames; when the model is slower than the
source, ``drop=oldest`` (the default for live sources) drops the oldest queued frame, ``drop=none`` (the default,
and the only choice, for files) makes the reader wait. Masks are named ``%06d`` by the frame's number in the source
(dropped frames leave gaps). The temporal model sees the frames it processed, in order: its offsets count processed
frames, so with drops a reference ``t-3`` is further back in time than 3 source frames, and not by a fixed amount.
The progress line shows the dropped count, the model's fps and the latency (capture to mask written);
predict.json's ``live`` block the counts, the latency (mean of the first and the last 10 frames, p50, p95, max, in
ms) and the source frames processed. ``max_frames=N``, ``duration=SECONDS`` (files too), Ctrl-C or SIGTERM (live)
stop the run cleanly: the frames in hand are finished, the videos closed and predict.json written (from the loop
on; while the model loads, and at a second Ctrl-C, they interrupt as usual). A stream that does not answer or
stops sending ends within ``timeout`` seconds (plus a watchdog margin) with one line: an error when no frame came,
else the end of the run with the reason.
``save_frames=true`` also writes the processed frames as ``frames/<name>.png`` (lossless: a later run on that
folder sees the same pixels); ``show=true`` shows the overlay in a window where a display exists (``q`` stops).

Every file is written under a temporary name and renamed once complete, so an interrupted run never leaves
a truncated video under a final name. Videos use fourcc mp4v at the source video's frame rate (``fps`` sets
it; 15 for frames); odd frame sides are padded by one pixel for the codec.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from vss.cli import model_command_line
from vss.config import CONF_DIR, register_resolvers
from vss.errors import ConfigError, friendly_errors
from vss.live import DROP, Stopper, Window, live_source
from vss.outputs import (
    DEFAULT_FPS,
    FRAMES_DIR,
    AtomicVideoWriter,
    LegendStrip,
    blend,
    check_output,
    data_classes,
    legend_image,
    load_palette,
    prepare_output,
    write_json,
    write_png,
    write_png_rgb,
)
from vss.runtime import tune_host_allocator
from vss.sources import ON_ERROR, Frame, NativeLog, open_live, open_source, terminal_stderr
from vss.validation import required, resolve_device

log = logging.getLogger("vss.predict")
register_resolvers()


# -- the model and its colours -------------------------------------------------------------------------
@dataclass
class Model:
    """A checkpoint's segmenter (in eval mode on its device) and what predicting needs from its config."""

    segmenter: Any
    class_names: list[str]
    scale: list[int]
    size_divisor: int
    palette: list[list[int]] | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes C (mask values are 0..C-1)."""
        return len(self.class_names)


def load_model(ckpt_path: str | Path, device: torch.device, trust_pickle: bool = False) -> Model:
    """Rebuild a vss checkpoint's model from its training config and load its weights (:func:`vss.lit.load_module`)."""
    from vss.lit import load_module, read_module_checkpoint

    path = Path(str(ckpt_path)).expanduser()
    ckpt, cfg = read_module_checkpoint(path, trust_pickle=trust_pickle)
    num_classes = int(cfg.data.num_classes)
    table = data_classes(cfg, num_classes)
    if table is not None:
        class_names, palette = table
    else:  # the config's own names (else those the module was trained with), and its palette
        names = OmegaConf.select(cfg, "data.class_names") or ckpt["hyper_parameters"].get("class_names") or []
        class_names = [str(names[i]) if i < len(names) else str(i) for i in range(num_classes)]
        own = OmegaConf.select(cfg, "data.palette")
        palette = OmegaConf.to_container(own) if own is not None else None
    scale = OmegaConf.select(cfg, "data.scale")
    if scale is None:
        raise ConfigError(f"ckpt_path={str(path)!r}: its config has no data.scale (the evaluation size)")
    size_divisor = int(OmegaConf.select(cfg, "data.size_divisor", default=32) or 1)
    module = load_module(path, device=device, class_names=class_names, checkpoint=(ckpt, cfg)).module
    return Model(module.segmenter, class_names, [int(s) for s in scale], size_divisor, palette)


# -- the loop ------------------------------------------------------------------------------------------
def _export_folder(cfg: DictConfig, backend: str) -> Any:
    """``export``, else a model folder (``model=FOLDER``) that ``vss.export format=<backend>`` also wrote into."""
    from vss.exported import FILES

    model = OmegaConf.select(cfg, "ckpt_path", default=None)
    if OmegaConf.select(cfg, "export", default=None) is None and model is not None and Path(str(model)).is_dir():
        if (Path(str(model)) / "spec.json").is_file() and (Path(str(model)) / FILES[backend]).is_file():
            return model
        raise ConfigError(
            f"backend={backend} runs the step vss.export wrote: pass export=DIR, or export into the model folder "
            f"(python -m vss.export model={model} format={backend} height=H width=W output={model}); "
            f"{str(model)!r} holds no spec.json and {FILES[backend]}"
        )
    return required(cfg, "export")


def _checked(cfg: DictConfig, key: str, ok: Callable[[Any], bool], expected: str) -> Any:
    value = cfg.get(key)
    if not ok(value):
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")
    return value


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.output``, or the Hydra run directory when it is null."""
    if cfg.get("output") is not None:
        return Path(str(cfg.output)).expanduser()
    try:
        return Path(str(cfg.paths.output_dir))
    except Exception:  # ${hydra:runtime.output_dir} outside a Hydra run
        raise ConfigError(
            "output=null means the run directory, which exists only under python -m vss.predict; pass output=DIR"
        ) from None


def chunks(frames: Iterable[Frame], size: int) -> Iterator[list[Frame]]:
    """Consecutive lists of up to ``size`` frames."""
    it = iter(frames)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


BACKENDS = ("eager", "compile", "onnx", "pt2")
"""eager: the :class:`Streamer`; compile: the :class:`~vss.models.step.Step` through ``torch.compile``; onnx, pt2:
the step exported by ``vss.export`` (``export=FOLDER`` holding spec.json and step.onnx / step.pt2)."""


class CompiledSteps:
    """The checkpoint's :class:`~vss.models.step.Step` through ``torch.compile`` (compiled at the first frame)."""

    def __init__(self, segmenter: Any) -> None:
        from vss.models.step import Step

        self.step = Step(segmenter).eval()
        self.lookahead = self.step.lookahead
        self.graph: Any = None
        self.state: dict[str, torch.Tensor] = {}

    def reset(self, height: int, width: int) -> None:
        """Start a video of ``height`` x ``width`` frames from the zero state."""
        from vss.exported import StepGraph

        self.state = self.step.init_state(height, width, 1)
        if self.graph is None:
            self.graph = torch.compile(StepGraph(self.step, list(self.state)).eval())

    def __call__(self, frame: torch.Tensor) -> tuple[torch.Tensor, bool, int]:
        """One frame (1,3,H,W) uint8 in; the logits, validity and index of the frame that became ready."""
        logits, valid, index, *new = self.graph(frame, *self.state.values())
        self.state = dict(zip(self.state, new, strict=True))
        return logits, bool(valid), int(index)


class GraphedSteps:
    """The checkpoint's :class:`~vss.models.step.Step` captured in a CUDA graph (``graph=true``), or its static
    body run uncaptured (``graph=dry``, any device: the CPU rehearsal), one uint8 frame a call."""

    def __init__(self, segmenter: Any, dry_run: bool, dtype: torch.dtype = torch.float32) -> None:
        from vss.models.step import Step

        self.step = Step(segmenter.to(dtype)).eval()  # bf16: weights and activations, no autocast
        self.lookahead = self.step.lookahead
        self.dry_run = dry_run
        self.graphed: Any = None

    def reset(self, height: int, width: int) -> None:
        """Start a video from the zero state (captured once per frame size)."""
        from vss.models.ops.cuda_graph import GraphedStep

        if self.graphed is None or self.graphed.size != (height, width):
            self.graphed = GraphedStep(self.step, height, width, dry_run=self.dry_run, frame_dtype=torch.uint8)
        self.graphed.reset()

    def __call__(self, frame: torch.Tensor) -> tuple[torch.Tensor, bool, int]:
        """One frame (1,3,H,W) uint8 in; the logits (copied out of the static buffer), validity and index."""
        out = self.graphed(frame)
        return out["logits"].clone(), bool(out["valid"]), int(out["index"])


class ExportedSteps:
    """An exported step (:func:`vss.export.open_exported`) run one frame at a time, its state threaded."""

    def __init__(self, exported: Any, backend: str) -> None:
        self.exported, self.backend = exported, backend
        self.lookahead = int(exported.spec["lookahead"])
        self.state: dict[str, np.ndarray] = {}

    def reset(self, height: int, width: int) -> None:
        """Start a video from the zero state; frames prepared at another size than the export's: one line."""
        pre = self.exported.spec["preprocessing"]
        if (height, width) != self.exported.size:
            eh, ew = self.exported.size
            raise ConfigError(
                f"backend={self.backend}: this source's frames are prepared at {height}x{width} (data.scale "
                f"{pre['scale']}, size_divisor {pre['size_divisor']}, as backend=eager does), the step exported in "
                f"export={str(self.exported.folder)!r} takes {eh}x{ew}: export it with height={height} width={width}"
            )
        self.state = dict(self.exported.zero)

    def __call__(self, frame: torch.Tensor) -> tuple[torch.Tensor, bool, int]:
        """One frame (1,3,H,W) uint8 in; the logits, validity and index of the frame that became ready."""
        out, self.state = self.exported.runner(np.ascontiguousarray(frame.cpu().numpy()), self.state)
        return torch.from_numpy(np.asarray(out["logits"])), bool(out["valid"]), int(out["index"])


class StepStream:
    """:class:`Streamer`'s ``push``/``end`` over a step with explicit state (compiled or exported): one frame
    per call, frame ``t - lookahead`` out at frame ``t``, the end of the video by repeating the last frame
    ``lookahead`` times (equal to :meth:`Step.flush`, see :mod:`vss.export`)."""

    def __init__(self, steps: CompiledSteps | GraphedSteps | ExportedSteps) -> None:
        self.steps = steps
        self.items: dict[int, Any] = {}
        self.count = 0
        self.last: torch.Tensor | None = None

    def _one(self, frame: torch.Tensor, item: Any) -> list[Any]:
        from vss.models.streamer import StreamOutput

        if self.last is None:
            self.steps.reset(*frame.shape[-2:])
        self.items[self.count] = item
        self.count += 1
        self.last = frame
        logits, valid, index = self.steps(frame)
        return [StreamOutput(index, self.items.pop(index), logits[0])] if valid else []

    def push(self, frames: torch.Tensor, items: Sequence[Any]) -> list[Any]:
        """Frames (T,3,H,W) uint8 and what goes with each; the predictions that became ready."""
        return [o for i, item in enumerate(items) for o in self._one(frames[i : i + 1], item)]

    def end(self) -> list[Any]:
        """The video's last ``lookahead`` predictions."""
        from vss.models.streamer import StreamOutput

        outs: list[Any] = []
        if self.last is None:
            return outs
        for _ in range(self.steps.lookahead):
            logits, valid, index = self.steps(self.last)
            outs += [StreamOutput(index, self.items.pop(index), logits[0])] if valid else []
        return outs


def exported_model(exported: Any) -> Model:
    """The class names, colours and evaluation transform of an export folder's spec.json (no checkpoint read)."""
    spec, pre = exported.spec, exported.spec["preprocessing"]
    if "scale" not in pre or "size_divisor" not in pre:
        raise ConfigError(
            f"export={str(exported.folder)!r}: spec.json has no preprocessing.scale/size_divisor (written by an older "
            "vss.export): export it again"
        )
    names = [str(c["name"]) for c in spec["classes"]]
    palette = [[int(v) for v in c["color"]] for c in spec["classes"]]
    return Model(None, names, [int(v) for v in pre["scale"]], int(pre["size_divisor"]), palette)


@torch.no_grad()
def predict(cfg: DictConfig) -> dict[str, Any]:
    """Segment every frame of ``cfg.source`` with ``cfg.ckpt_path``; write the results, return the summary."""
    with ExitStack() as closing:  # a live source's reader thread and its capture of fd 2 end with the run
        return _predict(cfg, closing)


def _predict(cfg: DictConfig, closing: ExitStack) -> dict[str, Any]:
    """:func:`predict`; ``closing`` ends what a live source started."""
    from vss.data.transforms import build_eval_transform
    from vss.metrics.flicker import FlickerRate
    from vss.models.ops.classes import upsampled_class_map
    from vss.models.ops.cuda_graph import DTYPES, check_tf32, frame_ids, tf32
    from vss.models.streamer import Streamer

    backend = _checked(cfg, "backend", lambda v: v in BACKENDS, f"one of {list(BACKENDS)}")
    graph = _checked(cfg, "graph", lambda v: v in (False, True, "dry"), "false, true (CUDA) or dry")
    if graph and backend != "eager":
        raise ConfigError(f"graph={graph} replays the checkpoint's step: use it with backend=eager, not {backend}")
    use_tf32 = _checked(cfg, "tf32", lambda v: type(v) is bool, "true or false")
    ids_first = _checked(cfg, "ids_first", lambda v: type(v) is bool, "true or false")
    dtype = _checked(cfg, "dtype", lambda v: v in DTYPES, f"one of {list(DTYPES)}")
    for key, on in (("tf32", use_tf32), ("ids_first", ids_first), ("dtype", dtype != "fp32")):
        if on and not graph:
            raise ConfigError(
                f"{key}={cfg.get(key)} is an option of the step's graph: add graph=true (CUDA) or graph=dry"
            )
    exporting = backend in ("onnx", "pt2")
    # onnx|pt2 run the exported step in export=FOLDER (no checkpoint read); eager|compile the checkpoint
    ckpt_path = None if exporting else required(cfg, "ckpt_path")
    folder = _export_folder(cfg, backend) if exporting else None
    source_arg = required(cfg, "source")
    opacity = float(_checked(cfg, "opacity", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"))
    batch_size = _checked(cfg, "batch_size", lambda v: type(v) is int and v > 0, "a positive integer")
    fps_arg = _checked(cfg, "fps", lambda v: v is None or (_number(v) and v > 0), "a positive number or null")
    on_error = _checked(cfg, "on_error", lambda v: v in ON_ERROR, f"one of {list(ON_ERROR)}")
    live_arg = live_source(source_arg)
    drop = _checked(cfg, "drop", lambda v: v is None or v in DROP, f"null or one of {list(DROP)}")
    drop = drop or ("oldest" if live_arg is not None else "none")
    if live_arg is None and drop != "none":
        raise ConfigError(
            f"drop={drop!r} is for live sources (a camera index, rtsp://..., http://...); source={str(source_arg)!r} "
            "is read frame by frame, nothing lost: leave drop unset"
        )
    queue_size = _checked(cfg, "queue_size", lambda v: v is None or (type(v) is int and v > 0), "a positive integer")
    max_frames = _checked(cfg, "max_frames", lambda v: v is None or (type(v) is int and v > 0), "a positive integer")
    duration = _checked(cfg, "duration", lambda v: v is None or (_number(v) and v > 0), "a positive number or null")
    timeout = _checked(cfg, "timeout", lambda v: _number(v) and v > 0, "a positive number of seconds")
    output = output_dir(cfg)

    device = resolve_device(cfg.device)
    check_tf32(use_tf32, device)
    check_output(output)
    native = NativeLog()
    if live_arg is not None:
        closing.enter_context(terminal_stderr())
        closing.callback(native.close)
    live_stack = closing.enter_context(ExitStack())  # ended after the loop (or on an error): reader, then fd 2
    if live_arg is not None:
        live_stack.enter_context(native.capture())
        size = queue_size or (1 if drop == "oldest" else 2 * batch_size)  # oldest: the newest frame only
        source = open_live(live_arg, drop, size, float(timeout))
        live_stack.callback(source.live.close)  # type: ignore[union-attr]
    else:
        native.close()
        source = open_source(source_arg, on_error)  # before the model: a bad source fails in a second
    live = source.live
    if exporting:
        from vss.exported import open_exported

        exported = open_exported(folder, backend, "export", cuda=device.type == "cuda")
        if exported.batch != 1:
            raise ConfigError(
                f"export={str(folder)!r}: its step takes {exported.batch} videos per call; vss.predict runs one video "
                "(export it with batch=1)"
            )
        model = exported_model(exported)
        runs_on = exported.runner.device
        device = torch.device("cpu")  # frames go to the runtime as numpy arrays
    else:
        model = load_model(ckpt_path, device, bool(cfg.get("trust_pickle", False)))
        runs_on = str(device)
    colours = load_palette(cfg.get("palette"), model.num_classes, model.palette)
    mask_dir = prepare_output(output, bool(cfg.get("overwrite", False)))
    frames_dir = output / FRAMES_DIR if cfg.get("save_frames", False) else None
    if frames_dir is not None:
        frames_dir.mkdir(exist_ok=True)
    window = Window() if cfg.get("show", False) else None
    if window is not None and not window.open:
        log.warning("show=true: no window (%s); going on without one", window.why)
    transform = build_eval_transform(model.scale, model.size_divisor)
    fps = float(fps_arg) if fps_arg is not None else source.fps or DEFAULT_FPS
    writers: dict[str, AtomicVideoWriter] = {}
    if cfg.get("save_overlay", True):
        writers["overlay"] = AtomicVideoWriter(output / "overlay.mp4", fps)
    if cfg.get("side_by_side", False):
        writers["side_by_side"] = AtomicVideoWriter(output / "side_by_side.mp4", fps)

    streamer: Any
    if graph:
        streamer = StepStream(GraphedSteps(model.segmenter, graph == "dry", DTYPES[dtype]))
        if use_tf32:
            closing.enter_context(tf32(True))
    elif backend == "eager":
        streamer = Streamer(model.segmenter, batch_size)  # frames encoded in batches, targets aggregated one by one
    elif backend == "compile":
        streamer = StepStream(CompiledSteps(model.segmenter))
    else:
        streamer = StepStream(ExportedSteps(exported, backend))
    first_size: tuple[int, int] | None = None
    pixels = np.zeros(model.num_classes, np.int64)  # predicted pixels per class: the legend's classes
    strip: LegendStrip | None = None
    flicker, flicker_at, last_shape = FlickerRate(), 0, None  # a size change: an index gap (no pair across it)
    done, first_out = 0, 0.0
    desc = f"predict {backend}" + (f" graph={graph}" if graph else "") + (f" {source.kind}" if live is not None else "")
    bar = tqdm(total=source.count, desc=desc, unit="frame", disable=not cfg.get("progress", True))
    stopper = Stopper(max_frames, duration)

    def emit(outputs: list[Any]) -> None:
        nonlocal done, strip, flicker_at, last_shape, first_out
        for out in outputs:
            name, rgb = out.item
            logits = out.logits[None].float()
            if ids_first:  # the argmax at the logits' size, then nearest upsampling of the ids (as in the graph)
                ids = frame_ids(logits, rgb.shape[:2], ids_first=True)
            else:
                ids = upsampled_class_map(logits, rgb.shape[:2])
            mask = ids[0].to(torch.uint8).cpu().numpy()
            write_png(mask, mask_dir / f"{name}.png")
            if live is not None:
                live.done(name)  # capture to mask written
                rate = done / (time.perf_counter() - start) if done else 0.0
                bar.set_postfix_str(f"{live.progress()}, model {rate:.1f} fps", refresh=False)
            if frames_dir is not None:
                write_png_rgb(rgb, frames_dir / f"{name}.png")
            pixels[:] += np.bincount(mask.ravel(), minlength=model.num_classes)[: model.num_classes]
            flicker_at += 1 + (last_shape is not None and mask.shape != last_shape)
            flicker.update(torch.from_numpy(mask)[None], [source.path.name], [flicker_at])
            last_shape = mask.shape
            if writers or window is not None:
                overlay = blend(rgb, mask, colours, opacity)
                if window is not None and window.show(overlay):
                    stopper.reason = "stopped from the window (q/Esc)"
                if "overlay" in writers:
                    writers["overlay"].write(overlay)
                if "side_by_side" in writers:
                    pair = np.concatenate([rgb, overlay], axis=1)
                    if first_size is not None and rgb.shape[:2] != first_size:  # the video keeps its first size
                        pair = cv2.resize(pair, (2 * first_size[1], first_size[0]), interpolation=cv2.INTER_LINEAR)
                    strip = strip or LegendStrip(pair.shape[1], model.class_names, colours)
                    writers["side_by_side"].write(np.concatenate([pair, strip(mask)], axis=0))
            done += 1
            first_out = first_out or time.perf_counter()
            bar.update(1)

    def fit(rgb: np.ndarray) -> np.ndarray:
        # frames of a folder may differ in size; the network sees every one at the first frame's size
        nonlocal first_size
        first_size = first_size or rgb.shape[:2]
        if rgb.shape[:2] == first_size:
            return rgb
        return cv2.resize(rgb, (first_size[1], first_size[0]), interpolation=cv2.INTER_LINEAR)

    start = time.perf_counter()
    stopper.start()
    batches = (
        live.batches(batch_size, stopper) if live is not None else chunks(stopper.limit(source.frames), batch_size)
    )
    try:
        with stopper.signals() if live is not None else nullcontext():  # Ctrl-C/SIGTERM: a clean end
            for chunk in batches:
                images = transform(images=np.stack([fit(rgb) for _, rgb in chunk]))["images"].to(device)
                emit(streamer.push(images, chunk))
            emit(streamer.end())
        live_stack.close()  # the reader stopped, FFmpeg's messages collected
        if done == 0:
            raise ConfigError(
                f"source={source.label!r}: no frame could be read from it ({source.report.skipped} skipped)"
                if live is None
                else f"source={source.label!r}: no frame was processed ({stopper.reason})"
            )
        videos = {key: str(w.commit()) for key, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
        if window is not None:
            window.close()
    end = time.perf_counter()
    seconds = end - start
    warm = (done - 1) / (end - first_out) if done > 1 and end > first_out else None  # after the first frame out
    write_png_rgb(legend_image(model.class_names, colours, pixels), output / "legend.png")

    report = source.report
    if live is not None:
        report.messages, report.message_count = native.messages, native.count
    if report.damaged:
        log.warning(
            "FFmpeg reported errors while decoding %d frame(s) (%s%s): the decoder concealed them, their masks may "
            "be wrong (predict.json: read.decoded_with_errors)",
            len(report.damaged),
            ", ".join(report.damaged[:5]),
            ", ..." if len(report.damaged) > 5 else "",
        )
    summary: dict[str, Any] = {
        "frames": done,
        "skipped": report.skipped,
        "seconds": round(seconds, 3),
        "fps": round(done / seconds, 2) if seconds > 0 else None,
        "fps_after_first": round(warm, 2) if warm is not None else None,
        "backend": backend,
        "graph": graph,
        "graph_options": {"tf32": use_tf32, "ids_first": ids_first, "dtype": dtype} if graph else None,
        "runs_on": runs_on,
        "export": str(folder) if folder is not None else None,
        "source": source.label,
        "source_kind": source.kind,
        "stopped": stopper.reason,
        "live": live.summary(stopper.reason) if live is not None else None,
        "ckpt_path": str(ckpt_path) if ckpt_path is not None else None,
        "output": str(output),
        "masks": str(mask_dir),
        "overlay": videos.get("overlay"),
        "side_by_side": videos.get("side_by_side"),
        "legend": str(output / "legend.png"),
        "video_fps": fps,
        "device": str(device),
        "on_error": on_error,
        "read": report.as_dict(),
        "flicker": flicker.summary(),
        "classes": [
            {"id": i, "name": n, "color": [int(c) for c in colours[i]], "pixels": int(pixels[i])}
            for i, n in enumerate(model.class_names)
        ],
    }
    write_json(summary, output / "predict.json")
    rate = f"{done / seconds:.1f}" if seconds > 0 else "inf"
    skipped = ""
    if report.gaps:
        unknown = " and an unknown number at the end" if any(g.count is None for g in report.gaps) else ""
        skipped = f", {report.skipped} skipped{unknown} (unreadable: {', '.join(g.describe() for g in report.gaps)})"
    pooled = summary["flicker"]["pooled"]
    flick = f", flicker {pooled:.4f}" if pooled is not None else ", flicker n/a (no two consecutive frames of one size)"
    after = f", {warm:.1f} after the first frame" if warm is not None else ""
    stop = f"; {stopper.reason}" if stopper.reason else ""
    if live is not None:
        lat = summary["live"]["latency_ms"]
        stop = (
            f", {live.dropped} of {live.read} read dropped (drop={live.drop}), latency {lat['first']:.0f} ms at the "
            f"start, {lat['last']:.0f} ms at the end (p50 {lat['p50']:.0f}, p95 {lat['p95']:.0f}){stop}"
        )
    print(
        f"[vss.predict] backend={backend}{f' graph={graph}' if graph else ''} on {runs_on}: {done} frames in "
        f"{seconds:.1f} s ({rate} fps{after})"
        f"{skipped}{flick}{stop} -> {output}"
    )
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
@friendly_errors
def _hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    predict(cfg)


def main() -> None:
    """``python -m vss.predict`` / ``vss-predict``: a mistyped key or a missing option is one line first."""
    tune_host_allocator()
    sys.argv[1:] = friendly_errors(model_command_line)("predict", sys.argv[1:])  # model=FOLDER -> ckpt_path=FOLDER
    _hydra_main()


if __name__ == "__main__":
    main()
