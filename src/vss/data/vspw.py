"""Reader for the VSPW directory layout (also used by the embedded synthetic set).

Layout::

    root/{train,val,test}.txt          one video id per line
    root/data/<video>/origin/*.jpg      frames, ordered by file name
    root/data/<video>/mask/*.png        masks, same stem as their frame
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from vss.errors import IGNORE_INDEX, DatasetError

cv2.setNumThreads(0)  # decoding runs in DataLoader workers; OpenCV's own threads would oversubscribe the cores
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def fail(problems: list[str] | None, message: str) -> None:
    """Raise ``message`` as a DatasetError, or, when a checker collects ``problems``, append it there."""
    if problems is None:
        raise DatasetError(message)
    problems.append(message)


def check_choice(key: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``key``."""
    if value not in choices:
        raise ValueError(f"{key}={value!r} is invalid: expected one of {list(choices)}")
    return value


@dataclass(frozen=True)
class Video:
    """One video: its id, its frame files in temporal order and each frame's mask (None: unlabelled)."""

    name: str
    frames: tuple[Path, ...]
    masks: tuple[Path | None, ...]
    source: str = ""  # a piece of a longer video (segments): that video's name, and where the piece starts
    start: int = 0

    def __post_init__(self) -> None:
        if len(self.frames) != len(self.masks):
            raise ValueError(f"video {self.name!r}: {len(self.frames)} frames but {len(self.masks)} mask entries")

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def labelled(self) -> tuple[int, ...]:
        """Indices of the frames that have a mask."""
        return tuple(i for i, m in enumerate(self.masks) if m is not None)

    @property
    def dense(self) -> bool:
        """Every frame has a mask (VSPW, the default synthetic set)."""
        return all(m is not None for m in self.masks)

    def label_name(self, t: int) -> str:
        """File name of frame ``t``'s mask (or, unlabelled, its frame's stem + .png): predictions use it."""
        mask = self.masks[t]
        return mask.name if mask is not None else f"{self.frames[t].stem}.png"

    def segments(self, before: int, after: int) -> list[Video]:
        """Sparse labels: the pieces a stream must run to score every labelled frame.

        Each labelled frame ``k`` needs frames ``k-before .. k+after`` (clipped to the video); pieces that
        overlap or touch are merged. A dense video is one piece, itself. Streaming a piece gives every
        labelled frame the same references as the whole video would (clamping happens only at the ends of
        the video, which are the ends of its first and last piece).
        """
        if self.dense:
            return [self]
        spans: list[list[int]] = []
        for k in self.labelled:
            lo, hi = max(0, k - before), min(len(self) - 1, k + after)
            if spans and lo <= spans[-1][1] + 1:
                spans[-1][1] = max(spans[-1][1], hi)
            else:
                spans.append([lo, hi])
        return [
            Video(
                name=self.name if len(spans) == 1 else f"{self.name}@{lo:06d}",
                frames=self.frames[lo : hi + 1],
                masks=self.masks[lo : hi + 1],
                source=self.name,
                start=lo,
            )
            for lo, hi in spans
        ]


class LabelMap:
    """Maps raw mask values to training ids (0..C-1) and ignore (255).

    ``reduce_zero_label=True`` is VSPW's map: 0 ("others") and 255 become 255, k becomes k-1.
    ``mapping`` gives an explicit raw -> train id table instead (values not in it are an error,
    unless listed in ``ignore_values``).
    """

    def __init__(
        self,
        num_classes: int,
        reduce_zero_label: bool = True,
        mapping: Mapping[int, int] | None = None,
        ignore_values: Sequence[int] = (255,),
    ) -> None:
        if num_classes < 1 or num_classes > 255:
            raise ValueError(f"num_classes must be in 1..255, got {num_classes}")
        self.num_classes = num_classes
        lut = np.full(256, -1, dtype=np.int16)
        if mapping is not None:
            for raw, tid in mapping.items():
                raw, tid = int(raw), int(tid)
                if not 0 <= raw <= 255:
                    raise ValueError(f"label_map.mapping key {raw} is not a uint8 mask value")
                if not (0 <= tid < num_classes or tid == IGNORE_INDEX):
                    raise ValueError(
                        f"label_map.mapping[{raw}] = {tid}: expected 0..{num_classes - 1} or {IGNORE_INDEX}"
                    )
                lut[raw] = tid
        elif reduce_zero_label:
            lut[0] = IGNORE_INDEX
            lut[1 : num_classes + 1] = np.arange(num_classes)
        else:
            lut[:num_classes] = np.arange(num_classes)
        for v in ignore_values:
            lut[int(v)] = IGNORE_INDEX
        self._lut = lut
        # uint8 lookup tables (np.take on a uint8 mask: ~10x faster than an int16 fancy index, no int16 copy)
        self._ids = np.where(lut >= 0, lut, 0).astype(np.uint8)
        self._valid = lut >= 0

    @property
    def valid_raw_values(self) -> np.ndarray:
        """Raw mask values this map accepts."""
        return np.flatnonzero(self._lut >= 0)

    def __call__(self, raw: np.ndarray, path: Path | str = "<array>") -> np.ndarray:
        """Return the training-id mask (uint8); raise naming ``path`` on values outside the map."""
        raw = np.asarray(raw)
        if raw.dtype != np.uint8:
            raw = raw.astype(np.uint8)  # mask values are 8-bit (read_mask checks)
        out = np.take(self._ids, raw)
        if not np.take(self._valid, raw).all():
            bad = np.unique(raw[~np.take(self._valid, raw)])[:10].tolist()
            raise DatasetError(
                f"{path}: mask values {bad} are outside the label map "
                f"(allowed raw values: {_ranges(self.valid_raw_values)})"
            )
        return out


def _ranges(values: np.ndarray) -> str:
    """Compact '0..124, 255' text for a sorted set of integers."""
    parts, start, prev = [], None, None
    for v in values.tolist():
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}..{prev}" if prev > start else str(start))
            start = prev = v
    if start is not None:
        parts.append(f"{start}..{prev}" if prev > start else str(start))
    return ", ".join(parts)


def no_mask_message(frame: Path, mask: Path) -> str:
    """The error for a frame without its mask (VSPW: every frame has one)."""
    return f"frame {frame} has no mask (expected {mask}; data.sparse_labels=true makes such frames unlabelled)"


def read_split(root: Path | str, split: str, sparse: bool = False) -> list[Video]:
    """List the videos of ``root/<split>.txt`` with their frames and masks; raise on any mismatch.

    ``sparse``: frames without a mask are unlabelled (each video needs at least one mask) instead of an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a directory")
    split_file = root / f"{split}.txt"
    if not split_file.is_file():
        raise DatasetError(f"split file {split_file} is missing (expected one video id per line)")
    names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"split file {split_file} lists no videos")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DatasetError(f"split file {split_file} lists videos more than once: {dupes[:5]}")
    return [read_video(root, name, sparse) for name in names]


def read_video(root: Path, name: str, sparse: bool = False) -> Video:
    """Pair every frame of ``root/data/<name>/origin`` with its mask; raise naming the file on a gap."""
    vdir = root / "data" / name
    origin, mask_dir = vdir / "origin", vdir / "mask"
    if not origin.is_dir():
        raise DatasetError(f"video {name!r}: frame folder {origin} is missing")
    frames = sorted(p for p in origin.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not frames:
        raise DatasetError(f"video {name!r}: {origin} holds no frames (*.jpg / *.png)")
    if not mask_dir.is_dir():
        raise DatasetError(f"video {name!r}: mask folder {mask_dir} is missing")
    masks: list[Path | None] = []
    for f in frames:
        m = mask_dir / f"{f.stem}.png"
        if not m.is_file():
            if not sparse:
                raise DatasetError(no_mask_message(f, m))
            m = None
        masks.append(m)
    if not any(m is not None for m in masks):
        raise DatasetError(f"video {name!r}: no frame of {origin} has a mask in {mask_dir}")
    return Video(name=name, frames=tuple(frames), masks=tuple(masks))


_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"IEND\xaeB`\x82"


def truncation(data: bytes) -> str | None:
    """Why an encoded JPEG / PNG is cut short (its end marker is missing), or None when it is whole.

    libjpeg decodes a truncated JPEG into a half-grey frame with only a warning on stderr, so the end
    marker is checked before decoding.
    """
    if data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00\r\n ").endswith(_JPEG_EOI):
        return "truncated JPEG: no end-of-image marker"
    if data[:8] == b"\x89PNG\r\n\x1a\n" and _PNG_IEND not in data[-32:]:
        return "truncated PNG: no IEND chunk"
    return None


def read_image(path: Path | str) -> np.ndarray:
    """Read an RGB frame as HxWx3 uint8; raise naming the file if it is truncated or cannot be decoded."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read image {path} ({e.strerror or e})") from e
    cut = truncation(data)
    if cut:
        raise DatasetError(f"image {path} is corrupt ({cut}); re-extract or re-download it")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise DatasetError(f"cannot read image {path} (empty or not an image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_mask(path: Path | str) -> np.ndarray:
    """Read a mask's stored values (uint8 HxW); palette PNGs give their indices, as the official PIL reader."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            m = np.array(im)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read mask {path} ({e})") from e
    if m.ndim != 2 or m.dtype != np.uint8:
        raise DatasetError(
            f"mask {path} must be a single-channel 8-bit PNG (mode L or P), got mode {mode} shape {m.shape}"
        )
    return m


def read_pair(frame: Path, mask: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a frame and its raw mask, checking that their sizes agree."""
    img, m = read_image(frame), read_mask(mask)
    if img.shape[:2] != m.shape:
        raise DatasetError(
            f"mask {mask} is {m.shape[1]}x{m.shape[0]} but its frame {frame} is "
            f"{img.shape[1]}x{img.shape[0]} (width x height); they must match"
        )
    return img, m


def check_headers(videos: Sequence[Video]) -> list[str]:
    """Cheap problems (headers only, nothing decoded): unreadable files, a mask whose size differs from its frame's."""
    problems = []
    for video in videos:
        for frame, mask in zip(video.frames, video.masks, strict=True):
            sizes = []
            for path in (frame, mask):
                if path is None:
                    continue
                try:
                    with Image.open(path) as im:
                        sizes.append((path, im.size))
                except (OSError, ValueError) as e:
                    problems.append(f"cannot read {path} ({e})")
            if len(sizes) == 2 and sizes[0][1] != sizes[1][1]:
                (fp, (fw, fh)), (mp, (mw, mh)) = sizes
                problems.append(f"mask {mp} is {mw}x{mh} but its frame {fp} is {fw}x{fh}; they must match")
    return problems
