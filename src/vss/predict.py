"""Run a trained checkpoint on your own video: ``python -m vss.predict`` (also ``vss-predict``).

Usage::

    python -m vss.predict ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt source=street.mp4
    python -m vss.predict ckpt_path=... source=frames/ output=pred/ fps=25 side_by_side=true opacity=0.6

``source`` is a video file (anything OpenCV's FFmpeg reads: .mp4, .avi, .mov, ...), a folder of frames
(jpg/jpeg/png/bmp, in natural name order: ``2.png`` before ``10.png``) or a single image. Every frame goes
through the checkpoint's evaluation transform (its ``data.scale`` and ``data.size_divisor``) and the model's
:class:`~vss.models.streamer.Streamer` (each frame encoded once, references from a cache), read in chunks of
``batch_size`` frames so a long video never sits in memory. Each frame's logits are upsampled (bilinear) to
the original frame size and argmax'ed. Written into ``output`` (default: the run directory):

- ``masks/<frame>.png``: class ids 0..C-1, 8-bit (``%06d.png`` for a video, the frame's stem for a folder);
- ``overlay.mp4`` (``save_overlay=true``): the frames blended with the class colours (``opacity``, ``palette``;
  by default the checkpoint's ``data.palette`` where it has one);
- ``side_by_side.mp4`` (``side_by_side=true``): frame | overlay;
- ``predict.json``, last: frame count, speed and the classes with their colours.

Every file is written under a temporary name and renamed once complete, so an interrupted run never leaves
a truncated video under a final name. Videos use fourcc mp4v at the source video's frame rate (``fps`` sets
it; 15 for frames); odd frame sides are padded by one pixel for the codec.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from tqdm import tqdm

from vss.config import (
    CONF_DIR,
    ConfigError,
    check_command_line,
    friendly_errors,
    register_resolvers,
    resolve_device,
)
from vss.runtime import tune_host_allocator

log = logging.getLogger("vss.predict")
register_resolvers()

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_FPS = 15.0
FOURCC = "mp4v"
RESULT_FILES = ("predict.json", "overlay.mp4", "side_by_side.mp4")

Frame = tuple[str, np.ndarray]
"""A frame's output name (no suffix) and its pixels, RGB uint8 (H,W,3)."""


# -- reading the source --------------------------------------------------------------------------------
@dataclass
class Source:
    """An opened source: its frames in order, their count (None when unknown) and frame rate (video only)."""

    path: Path
    kind: str  # video | folder | image
    frames: Iterator[Frame]
    count: int | None = None
    fps: float | None = None


def _one_line(e: BaseException | str) -> str:
    """An exception (or text) as a single line."""
    text = str(e) if isinstance(e, str) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())


def natural_key(path: Path) -> list[Any]:
    """Sort key ordering ``frame2`` before ``frame10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collect what native code (FFmpeg's log) writes to file descriptor 2 instead of showing it."""
    lines: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 to redirect
        saved = -1
    if saved < 0:
        yield lines
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def read_image(path: Path) -> np.ndarray:
    """One frame file as RGB uint8 (H,W,3); a :class:`ConfigError` naming the file if it cannot be decoded."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise ConfigError(f"source frame {str(path)!r} cannot be read: {e.strerror or e}") from None
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise ConfigError(f"source frame {str(path)!r} is not a readable image (expected {'/'.join(IMAGE_SUFFIXES)})")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def open_video(path: Path) -> Source:
    """A video file read frame by frame with OpenCV; its first frame is read here to check the file."""
    with captured_stderr() as ffmpeg_log:
        cap = cv2.VideoCapture(str(path))
        opened = cap.isOpened()
        ok, first = cap.read() if opened else (False, None)
    if not ok:
        cap.release()
        reasons = [re.sub(r"^\[[^]]*\]\s*", "", line).strip() for line in ffmpeg_log]
        reasons = [r for r in reasons if r]
        why = "OpenCV could not open it" if not opened else "no frame could be read from it"
        hint = f" (FFmpeg: {reasons[-1]})" if reasons else ""
        raise ConfigError(f"source={str(path)!r} is not a readable video: {why}{hint}")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)

    def frames() -> Iterator[Frame]:
        try:
            yield f"{0:06d}", cv2.cvtColor(first, cv2.COLOR_BGR2RGB)
            for i in itertools.count(1):
                ok, bgr = cap.read()
                if not ok:
                    return
                yield f"{i:06d}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()

    return Source(path, "video", frames(), count if count > 0 else None, fps if 0 < fps < 1000 else None)


def open_source(source: str | Path) -> Source:
    """A video file, a folder of frames or one image; a :class:`ConfigError` naming what cannot be read."""
    path = Path(str(source)).expanduser()
    if not path.exists():
        raise ConfigError(f"source={str(path)!r} is invalid: no such file or folder")
    if path.is_dir():
        files = sorted(
            (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name[0] != "."),
            key=natural_key,
        )
        if not files:
            raise ConfigError(f"source={str(path)!r}: the folder holds no image files ({'/'.join(IMAGE_SUFFIXES)})")
        stems: dict[str, Path] = {}
        for f in files:
            if f.stem in stems:
                raise ConfigError(f"source={str(path)!r}: {stems[f.stem].name} and {f.name} would share one mask name")
            stems[f.stem] = f
        return Source(path, "folder", ((f.stem, read_image(f)) for f in files), len(files))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return Source(path, "image", iter([(path.stem, read_image(path))]), 1)
    return open_video(path)


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


def load_model(ckpt_path: str | Path, device: torch.device) -> Model:
    """Rebuild a vss checkpoint's model from its training config and load its weights."""
    from vss.eval import load_checkpoint
    from vss.train import build_module

    path = Path(str(ckpt_path)).expanduser()
    try:
        ckpt = load_checkpoint(path)
    except ConfigError:
        raise
    except Exception as e:  # not a torch file at all, or not a dict
        raise ConfigError(f"ckpt_path={str(path)!r} cannot be read as a vss checkpoint ({_one_line(e)})") from None
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    if OmegaConf.select(cfg, "encoder.pretrained") is not None:
        cfg.encoder.pretrained = None  # ImageNet weights are replaced by the checkpoint's (and may not exist here)
    num_classes = int(cfg.data.num_classes)
    names = OmegaConf.select(cfg, "data.class_names")
    names = [str(n) for n in names] if names else []
    class_names = [names[i] if i < len(names) else str(i) for i in range(num_classes)]
    module = build_module(cfg, num_classes, class_names)
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        why = _one_line(" ".join(str(e).strip().splitlines()[:2]))
        raise ConfigError(
            f"ckpt_path={str(path)!r}: its weights do not fit the model of its own config ({why})"
        ) from None
    scale = OmegaConf.select(cfg, "data.scale")
    if scale is None:
        raise ConfigError(f"ckpt_path={str(path)!r}: its config has no data.scale (the evaluation size)")
    size_divisor = int(OmegaConf.select(cfg, "data.size_divisor", default=32) or 1)
    palette = OmegaConf.select(cfg, "data.palette")
    palette = OmegaConf.to_container(palette) if palette is not None else None
    segmenter = module.segmenter.to(device).eval()
    return Model(segmenter, class_names, [int(s) for s in scale], size_divisor, palette)


def _triples(colours: Any, num_classes: int) -> bool:
    """Whether ``colours`` is a list of at least ``num_classes`` [r, g, b] triples of integers in 0..255."""

    def triple(c: Any) -> bool:
        return isinstance(c, list | tuple) and len(c) == 3 and all(type(v) is int and 0 <= v <= 255 for v in c)

    return isinstance(colours, list) and len(colours) >= num_classes and all(triple(c) for c in colours)


def load_palette(path: str | Path | None, num_classes: int, own: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Class colours (C,3) uint8: the file's list of [r, g, b] triples; when None, ``own`` (the checkpoint's
    ``data.palette``) if it is one triple per class, else the default palette."""
    if path is None and own is not None and _triples(own, num_classes):
        return np.asarray([list(c) for c in own][:num_classes], dtype=np.uint8)
    if path is None:
        from vss.callbacks import palette

        return np.ascontiguousarray(palette(num_classes)[:num_classes])
    import yaml

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ConfigError(f"palette={str(p)!r} is invalid: the file does not exist")
    try:
        text = p.read_text()
        colours = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"palette={str(p)!r} cannot be parsed as JSON/YAML ({_one_line(e)})") from None

    if not _triples(colours, num_classes):
        raise ConfigError(
            f"palette={str(p)!r} is invalid: expected a list of at least {num_classes} [r, g, b] triples "
            "(integers 0..255), one per class"
        )
    return np.asarray(colours[:num_classes], dtype=np.uint8)


def blend(rgb: np.ndarray, mask: np.ndarray, colours: np.ndarray, opacity: float) -> np.ndarray:
    """The frame with every pixel's class colour mixed in at ``opacity``."""
    return cv2.addWeighted(rgb, 1.0 - opacity, colours[mask], opacity, 0.0)


# -- writing -------------------------------------------------------------------------------------------
def write_png(mask: np.ndarray, path: Path) -> None:
    """Write a class-id map as an 8-bit PNG, under a temporary name first."""
    ok, buf = cv2.imencode(".png", mask)
    if not ok:
        raise RuntimeError(f"could not encode {path} as PNG")
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write JSON under a temporary name, then rename."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class AtomicVideoWriter:
    """An mp4v video written to a temporary file and renamed to ``path`` by :meth:`commit`."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps = path, float(fps)
        self.tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] = (0, 0)  # (h, w) of the first frame; later frames are resized to it

    def write(self, rgb: np.ndarray) -> None:
        """Append one RGB frame."""
        h, w = rgb.shape[:2]
        if self.writer is None:
            self.size = (h, w)
            frame_size = (w + w % 2, h + h % 2)  # mp4v wants even sides
            self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*FOURCC), self.fps, frame_size)
            if not self.writer.isOpened():
                raise ConfigError(
                    f"cannot write {str(self.path)!r}: OpenCV's VideoWriter (fourcc {FOURCC}) did not open"
                )
        sh, sw = self.size
        if (h, w) != self.size:
            rgb = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_LINEAR)
        if sh % 2 or sw % 2:
            rgb = cv2.copyMakeBorder(rgb, 0, sh % 2, 0, sw % 2, cv2.BORDER_REPLICATE)
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def commit(self) -> Path:
        """Finish the file and give it its final name."""
        if self.writer is None:
            raise RuntimeError(f"{self.path}: no frame was written")
        self.writer.release()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the unfinished file."""
        if self.writer is not None:
            self.writer.release()
        self.tmp.unlink(missing_ok=True)


def prepare_output(output: Path, overwrite: bool) -> Path:
    """Create ``output/masks``; refuse (or, with ``overwrite``, clear) the results of an earlier prediction."""
    masks = output / "masks"
    old = [output / f for f in RESULT_FILES if (output / f).exists()]
    old += sorted(masks.glob("*.png")) if masks.is_dir() else []
    if old and not overwrite:
        raise ConfigError(
            f"output={str(output)!r} already holds predictions ({old[0].relative_to(output)}, ...); "
            "pass overwrite=true to replace them, or another output=..."
        )
    for f in old:  # predict.json first: the results stop claiming completion before anything else goes
        f.unlink()
    masks.mkdir(parents=True, exist_ok=True)
    return masks


# -- the loop ------------------------------------------------------------------------------------------
def _required(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        value = None
    if value is None or str(value) == "":
        raise ConfigError(f"{key} is required but not set (pass {key}=...)")
    return value


def _checked(cfg: DictConfig, key: str, ok: Callable[[Any], bool], expected: str) -> Any:
    value = cfg.get(key)
    if not ok(value):
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")
    return value


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


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


@torch.no_grad()
def predict(cfg: DictConfig) -> dict[str, Any]:
    """Segment every frame of ``cfg.source`` with ``cfg.ckpt_path``; write the results, return the summary."""
    from vss.data.transforms import build_eval_transform
    from vss.models.aggregators.base import class_map, resize
    from vss.models.streamer import Streamer

    ckpt_path, source_arg = _required(cfg, "ckpt_path"), _required(cfg, "source")
    opacity = float(_checked(cfg, "opacity", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"))
    batch_size = _checked(cfg, "batch_size", lambda v: type(v) is int and v > 0, "a positive integer")
    fps_arg = _checked(cfg, "fps", lambda v: v is None or (_number(v) and v > 0), "a positive number or null")
    output = output_dir(cfg)

    source = open_source(source_arg)  # before the model: a bad source fails in a second
    device = resolve_device(cfg.device)
    model = load_model(ckpt_path, device)
    colours = load_palette(cfg.get("palette"), model.num_classes, model.palette)
    mask_dir = prepare_output(output, bool(cfg.get("overwrite", False)))
    transform = build_eval_transform(model.scale, model.size_divisor)
    fps = float(fps_arg) if fps_arg is not None else source.fps or DEFAULT_FPS
    writers: dict[str, AtomicVideoWriter] = {}
    if cfg.get("save_overlay", True):
        writers["overlay"] = AtomicVideoWriter(output / "overlay.mp4", fps)
    if cfg.get("side_by_side", False):
        writers["side_by_side"] = AtomicVideoWriter(output / "side_by_side.mp4", fps)

    streamer = Streamer(model.segmenter, batch_size)  # frames encoded in batches, targets aggregated one by one
    first_size: tuple[int, int] | None = None
    done = 0
    bar = tqdm(total=source.count, desc="predict", unit="frame", disable=not cfg.get("progress", True))

    def emit(outputs: list[Any]) -> None:
        nonlocal done
        for out in outputs:
            name, rgb = out.item
            logits = out.logits[None].float()
            mask = class_map(resize(logits, rgb.shape[:2]))[0].to(torch.uint8).cpu().numpy()
            write_png(mask, mask_dir / f"{name}.png")
            if writers:
                overlay = blend(rgb, mask, colours, opacity)
                if "overlay" in writers:
                    writers["overlay"].write(overlay)
                if "side_by_side" in writers:
                    writers["side_by_side"].write(np.concatenate([rgb, overlay], axis=1))
            done += 1
            bar.update(1)

    def fit(rgb: np.ndarray) -> np.ndarray:
        # frames of a folder may differ in size; the network sees every one at the first frame's size
        nonlocal first_size
        first_size = first_size or rgb.shape[:2]
        if rgb.shape[:2] == first_size:
            return rgb
        return cv2.resize(rgb, (first_size[1], first_size[0]), interpolation=cv2.INTER_LINEAR)

    start = time.perf_counter()
    try:
        for chunk in chunks(source.frames, batch_size):
            images = transform(images=np.stack([fit(rgb) for _, rgb in chunk]))["images"].to(device)
            emit(streamer.push(images, chunk))
        emit(streamer.end())
        videos = {key: str(w.commit()) for key, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start

    summary: dict[str, Any] = {
        "frames": done,
        "seconds": round(seconds, 3),
        "fps": round(done / seconds, 2) if seconds > 0 else None,
        "source": str(source.path),
        "source_kind": source.kind,
        "ckpt_path": str(ckpt_path),
        "output": str(output),
        "masks": str(mask_dir),
        "overlay": videos.get("overlay"),
        "side_by_side": videos.get("side_by_side"),
        "video_fps": fps,
        "device": str(device),
        "classes": [
            {"id": i, "name": n, "color": [int(c) for c in colours[i]]} for i, n in enumerate(model.class_names)
        ],
    }
    write_json(summary, output / "predict.json")
    rate = f"{done / seconds:.1f}" if seconds > 0 else "inf"
    print(f"[vss.predict] {done} frames in {seconds:.1f} s ({rate} fps) -> {output}")
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
@friendly_errors
def _hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    predict(cfg)


def main() -> None:
    """``python -m vss.predict`` / ``vss-predict``: a mistyped key or a missing option is one line first."""
    tune_host_allocator()
    friendly_errors(check_command_line)("predict", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
