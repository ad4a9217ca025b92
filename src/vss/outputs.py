"""What ``vss.predict`` writes: the colours (class palette, overlay blend, legend) and the result files, each
written under a temporary name and renamed into place. See :mod:`vss.predict`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from omegaconf import DictConfig, OmegaConf

from vss.errors import FILE_ERRNOS, ConfigError
from vss.sources import NativeLog, one_line

log = logging.getLogger("vss.predict")

DEFAULT_FPS = 15.0
"""Frame rate of the videos written for a source that declares none (frames, images)."""
FOURCC = "mp4v"
RESULT_FILES = ("predict.json", "overlay.mp4", "side_by_side.mp4", "legend.png")
FRAMES_DIR = "frames"
"""``save_frames=true``: the processed frames as PNG."""


# -- colours ------------------------------------------------------------------------------------------
def data_classes(cfg: DictConfig, num_classes: int) -> tuple[list[str], list[list[int]] | None] | None:
    """The class names and colours of the data module the checkpoint's config builds: those its training
    overlays used (a data set's own table where the config leaves them null). Built without reading any data;
    None, with a warning, when that config does not build it."""
    from hydra.utils import instantiate

    data = cfg.data
    if OmegaConf.is_missing(data, "root") or data.get("root") is None:  # (a converted checkpoint) not read here
        data = OmegaConf.merge(cfg, {"data": {"root": "."}}).data
    try:
        module = instantiate(data)
        names, colours = [str(n) for n in module.class_names], module.palette
    except Exception as e:  # a config of another vss version, a data module this install lacks, ...
        log.warning(
            "the checkpoint's data config does not build its data module (%s): class names and colours from "
            "its data.class_names / data.palette",
            one_line(e),
        )
        return None
    if len(names) != num_classes:
        return None
    return names, [[int(v) for v in c] for c in colours] if colours is not None else None


def _triples(colours: Any, num_classes: int) -> bool:
    """Whether ``colours`` is a list of at least ``num_classes`` [r, g, b] triples of integers in 0..255."""

    def triple(c: Any) -> bool:
        return isinstance(c, list | tuple) and len(c) == 3 and all(type(v) is int and 0 <= v <= 255 for v in c)

    return isinstance(colours, list) and len(colours) >= num_classes and all(triple(c) for c in colours)


def load_palette(path: str | Path | None, num_classes: int, own: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Class colours (C,3) uint8: the file's list of [r, g, b] triples; when None, ``own`` (the data's palette)
    if it is one triple per class, else the generated palette the training overlays use without one."""
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
        raise ConfigError(f"palette={str(p)!r} cannot be parsed as JSON/YAML ({one_line(e)})") from None

    if not _triples(colours, num_classes):
        raise ConfigError(
            f"palette={str(p)!r} is invalid: expected a list of at least {num_classes} [r, g, b] triples "
            "(integers 0..255), one per class"
        )
    return np.asarray(colours[:num_classes], dtype=np.uint8)


def blend(rgb: np.ndarray, mask: np.ndarray, colours: np.ndarray, opacity: float) -> np.ndarray:
    """The frame with every pixel's class colour mixed in at ``opacity``."""
    return cv2.addWeighted(rgb, 1.0 - opacity, colours[mask], opacity, 0.0)


def legend_image(names: Sequence[str], colours: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """legend.png: one row per class present (``pixels`` > 0), in id order: colour swatch, id, name and share of
    the predicted pixels (RGB uint8, white background)."""
    font, scale, thick, line = cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1, 22
    total = max(int(pixels.sum()), 1)
    rows = [(c, f"{c:>3}  {names[c]}  {100.0 * pixels[c] / total:.1f}%") for c in range(len(names)) if pixels[c] > 0]
    width = 28 + max(cv2.getTextSize(text, font, scale, thick)[0][0] for _, text in rows) + 8
    legend = np.full((line * len(rows) + 6, width, 3), 255, np.uint8)
    for r, (c, text) in enumerate(rows):
        y = 3 + r * line
        colour = tuple(int(v) for v in colours[c])
        cv2.rectangle(legend, (4, y + 3), (20, y + 19), colour, -1)
        cv2.rectangle(legend, (4, y + 3), (20, y + 19), (90, 90, 90), 1)
        cv2.putText(legend, text, (28, y + 16), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return legend


class LegendStrip:
    """The strip under side_by_side.mp4's frames: swatch + name of the classes in that frame (the layout of the
    training overlays' legend), of one height for the whole video (that of all classes)."""

    def __init__(self, width: int, names: Sequence[str], colours: np.ndarray) -> None:
        from vss.callbacks import draw_legend

        self.draw, self.names, self.colours = draw_legend, names, colours
        self.factor = max(1, round(width / 960))  # drawn at <= ~960 px, then enlarged: legible on large frames
        self.width = width
        self.height = draw_legend(width // self.factor, names, colours, range(len(names)), ignore=False).shape[0]

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        """The strip for one frame's mask."""
        shown = np.flatnonzero(np.bincount(mask.ravel(), minlength=len(self.names)))
        strip = self.draw(self.width // self.factor, self.names, self.colours, shown.tolist(), ignore=False)
        strip = np.concatenate([strip, np.full((self.height - strip.shape[0], *strip.shape[1:]), 255, np.uint8)])
        return cv2.resize(strip, (self.width, self.height * self.factor), interpolation=cv2.INTER_LINEAR)


# -- writing -------------------------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name, then rename: a failed write leaves no file looking complete (and an
    OSError that names no file is given ``path``)."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: name it
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def write_png(mask: np.ndarray, path: Path) -> None:
    """Write a class-id map as an 8-bit PNG, under a temporary name first."""
    ok, buf = cv2.imencode(".png", mask)
    if not ok:
        raise RuntimeError(f"could not encode {path} as PNG")
    write_atomic(path, buf.tobytes())


def write_png_rgb(rgb: np.ndarray, path: Path) -> None:
    """Write an RGB image as PNG, under a temporary name first."""
    write_png(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), path)


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write JSON under a temporary name, then rename."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


class AtomicVideoWriter:
    """An mp4v video written to a temporary file and renamed to ``path`` by :meth:`commit`."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps = path, float(fps)
        self.tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] = (0, 0)  # (h, w) of the first frame; later frames are resized to it
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        """Append one RGB frame."""
        h, w = rgb.shape[:2]
        if self.writer is None:
            self.size = (h, w)
            frame_size = (w + w % 2, h + h % 2)  # mp4v wants even sides
            native = NativeLog()
            with native.capture() as messages:  # FFmpeg's complaints go into the error, not onto the terminal
                self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*FOURCC), self.fps, frame_size)
            native.close()
            if not self.writer.isOpened():
                why = f" ({messages[0]})" if messages else ""
                raise ConfigError(
                    f"cannot write {str(self.path)!r}: OpenCV's VideoWriter (fourcc {FOURCC}) did not open{why}"
                )
        sh, sw = self.size
        if (h, w) != self.size:
            rgb = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_LINEAR)
        if sh % 2 or sw % 2:
            rgb = cv2.copyMakeBorder(rgb, 0, sh % 2, 0, sw % 2, cv2.BORDER_REPLICATE)
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def commit(self) -> Path:
        """Finish the file, check it holds every frame (OpenCV does not report a full disk), give it its name."""
        if self.writer is None:
            raise RuntimeError(f"{self.path}: no frame was written")
        self.writer.release()
        cap = cv2.VideoCapture(str(self.tmp))
        readable = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
        cap.release()
        if readable < self.frames:
            self.tmp.unlink(missing_ok=True)
            raise ConfigError(
                f"cannot write {str(self.path)!r}: OpenCV's VideoWriter stored {readable} of {self.frames} frames "
                f"(is the disk full? {shutil.disk_usage(self.path.parent).free // 1024} KiB free there)"
            )
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the unfinished file."""
        if self.writer is not None:
            self.writer.release()
        self.tmp.unlink(missing_ok=True)


def check_output(output: Path) -> None:
    """``output`` is a directory this process can write (created if missing), else one line naming it: checked
    before the model is read, so a file, a read-only disk or a missing permission fails at once."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output={str(output)!r} is a file, not a directory: pass a directory (created if missing)")
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output, prefix=".vss-write-check-"):
            pass
    except OSError as e:
        hint = FILE_ERRNOS.get(e.errno or 0, "")
        raise ConfigError(
            f"output={str(output)!r} cannot be written: {e.strerror or e}" + (f" ({hint})" if hint else "")
        ) from None


def prepare_output(output: Path, overwrite: bool) -> Path:
    """Create ``output/masks``; refuse (or, with ``overwrite``, clear) the results of an earlier prediction.

    ``predict.json`` is written last: results without it are those of a run that failed or was killed (a full
    disk, Ctrl-C), which nothing claims complete; they are cleared without ``overwrite``, and said so.
    """
    masks = output / "masks"
    old = [output / f for f in RESULT_FILES if (output / f).exists()]
    old += sorted(masks.glob("*.png")) if masks.is_dir() else []
    old += sorted((output / FRAMES_DIR).glob("*.png")) if (output / FRAMES_DIR).is_dir() else []
    interrupted = bool(old) and not (output / "predict.json").exists()
    if old and not overwrite and not interrupted:
        raise ConfigError(
            f"output={str(output)!r} already holds predictions ({old[0].relative_to(output)}, ...); "
            "pass overwrite=true to replace them, or another output=..."
        )
    if interrupted:
        log.warning("output=%s: removing %d files of an unfinished prediction (no predict.json)", output, len(old))
    for f in old:  # predict.json first: the results stop claiming completion before anything else goes
        f.unlink()
    for f in [*output.glob(".*.partial*"), *(masks.glob(".*.partial") if masks.is_dir() else [])]:
        f.unlink(missing_ok=True)  # temporary files of a killed write
    masks.mkdir(parents=True, exist_ok=True)
    return masks
