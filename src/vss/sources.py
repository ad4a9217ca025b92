"""Reading what ``vss.predict`` segments: video files, frame folders, single images and live sources (the
reader thread of :mod:`vss.live`); FFmpeg's own messages kept off the terminal. See :mod:`vss.predict`."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vss.errors import ConfigError
from vss.live import LiveReader, describe

log = logging.getLogger("vss.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
ON_ERROR = ("error", "skip")
RETRIES = 64
"""Reads tried after a failed one when the container declares no frames beyond it but FFmpeg reported an error."""
MESSAGES_KEPT = 20
"""Distinct FFmpeg/OpenCV messages kept for predict.json."""
NATIVE_PREFIX = re.compile(r"^\[[^]]*\]\s*")
"""``[mpeg4 @ 0x55d0...] `` (FFmpeg's av_log) or ``[ WARN:0@1.2] `` (OpenCV's logger) before a message."""

Frame = tuple[str, np.ndarray]
"""A frame's output name (no suffix) and its pixels, RGB uint8 (H,W,3)."""


# -- reading the source --------------------------------------------------------------------------------
@dataclass
class Gap:
    """Source frames that were not predicted: ``first``..``last`` (mask names), ``count`` of them (None: unknown)."""

    first: str
    last: str | None
    count: int | None
    reason: str

    def describe(self) -> str:
        """``frame 000006`` / ``frames 000006-000026 (21)`` / ``the frames from 000013 on``."""
        if self.count is None or self.last is None:
            return f"the frames from {self.first} on"
        return f"frame {self.first}" if self.count == 1 else f"frames {self.first}-{self.last} ({self.count})"


@dataclass
class ReadReport:
    """What reading the source went through: frames skipped (``on_error=skip``), frames decoded while FFmpeg
    reported errors (concealed by the decoder), FFmpeg's and OpenCV's own messages, the declared frame count."""

    gaps: list[Gap] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    message_count: int = 0
    declared: int | None = None

    @property
    def skipped(self) -> int:
        """Frames skipped, where known (a gap of unknown length counts none)."""
        return sum(g.count or 0 for g in self.gaps)

    def as_dict(self) -> dict[str, Any]:
        """For predict.json."""
        return {
            "declared_frames": self.declared,
            "skipped": self.skipped,
            "skipped_frames": [dataclasses.asdict(g) for g in self.gaps],
            "decoded_with_errors": self.damaged,
            "ffmpeg_messages": self.message_count,
            "ffmpeg_messages_distinct": self.messages[:MESSAGES_KEPT],
        }


@dataclass
class Source:
    """An opened source: its frames in order, their count (None when unknown) and frame rate (video only)."""

    path: Path
    kind: str  # video | folder | image
    frames: Iterator[Frame]
    count: int | None = None
    fps: float | None = None
    report: ReadReport = field(default_factory=ReadReport)
    live: LiveReader | None = None  # a camera or stream, read by a thread

    @property
    def label(self) -> str:
        """The source as given: a path, a URL or ``camera N``."""
        return describe(self.live.source) if self.live is not None else str(self.path)


def one_line(e: BaseException | str) -> str:
    """An exception (or text) as a single line."""
    text = str(e) if isinstance(e, str) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())


def natural_key(path: Path) -> list[Any]:
    """Sort key ordering ``frame2`` before ``frame10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class NativeLog:
    """File descriptor 2 pointed at a private file while native code runs: FFmpeg's ``av_log`` and OpenCV's
    logger write there (not through Python), so their lines never reach the terminal; they are kept for the
    error texts and predict.json instead."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 (kept across reads; closed by close())
        self.messages: list[str] = []  # the first MESSAGES_KEPT distinct ones, "[mpeg4 @ 0x...]" prefixes removed
        self.count = 0

    @contextmanager
    def capture(self) -> Iterator[list[str]]:
        """Run the body with fd 2 redirected; the list yielded receives the body's messages when it ends."""
        new: list[str] = []
        sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no file descriptor 2 to redirect
            yield new
            return
        os.dup2(self._file.fileno(), 2)
        try:
            yield new
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            self._file.seek(0)
            text = self._file.read().decode(errors="replace")
            self._file.seek(0)
            self._file.truncate()
            new.extend(m for m in (NATIVE_PREFIX.sub("", line).strip() for line in text.splitlines()) if m)
            self.count += len(new)
            for m in new:
                if len(self.messages) < MESSAGES_KEPT and m not in self.messages:
                    self.messages.append(m)

    def close(self) -> None:
        """Drop the file."""
        self._file.close()


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


class SkipOrRaise:
    """``on_error``: a frame that cannot be read stops the run (``error``) or is counted and skipped (``skip``)."""

    def __init__(self, source: Path, on_error: str, report: ReadReport) -> None:
        self.source, self.on_error, self.report = source, on_error, report

    def __call__(self, gap: Gap) -> None:
        """Raise a :class:`ConfigError` for ``gap``, or record it with a warning."""
        what = f"source={str(self.source)!r}: {gap.describe()} {gap.reason}"
        if self.on_error == "error":
            raise ConfigError(f"{what}; pass on_error=skip to predict the readable frames and count the rest")
        self.report.gaps.append(gap)
        unknown = " (and an unknown number at the end)" if any(g.count is None for g in self.report.gaps) else ""
        log.warning("%s: skipped (on_error=skip); %d frames skipped so far%s", what, self.report.skipped, unknown)


def _video_frames(cap: Any, native: NativeLog, source: Source, fail: SkipOrRaise) -> Iterator[Frame]:
    """The decoded frames, named by their index in the video; a frame FFmpeg cannot decode and a video that
    ends before its container's frame count go to ``fail``."""
    report, count, fps = source.report, source.count, source.fps
    index, start_ms = 0, None

    def read() -> tuple[bool, Any, list[str]]:
        with native.capture() as messages:
            ok, bgr = cap.read()
        return ok, bgr, messages

    try:
        while True:
            ok, bgr, messages = read()
            if not ok:
                # the end, or frames FFmpeg cannot decode: OpenCV gives up one packet per failed read and goes on
                # with the next on the following read, so read on as far as the container says frames remain
                why = messages[-1] if messages else ""
                failed, budget = 1, max((count or 0) - index, RETRIES if messages else 0)
                while not ok and failed <= budget:
                    ok, bgr, more = read()
                    failed += 0 if ok else 1
                    why = more[-1] if more else why
                because = f" (FFmpeg: {why})" if why else ""
                if not ok:  # nothing after it
                    if count is not None and index < count:
                        ends = f"the video ends there, before the {count} frames its container declares"
                        reason = f"cannot be read: {ends} (a truncated or damaged file){because}"
                        fail(Gap(f"{index:06d}", f"{count - 1:06d}", count - index, reason))
                    elif messages and count is None:
                        reason = f"cannot be decoded{because}; nothing after them could be"
                        fail(Gap(f"{index:06d}", None, None, reason))
                    return
                # a later frame decoded: the frames in between are lost (its timestamp says how many, where known)
                resumed = index + failed
                if fps and start_ms is not None:
                    at = round((cap.get(cv2.CAP_PROP_POS_MSEC) - start_ms) * fps / 1000.0)
                    resumed = max(resumed, at) if count is None or at < count else resumed
                reason = f"cannot be decoded{because}; the video goes on from frame {resumed:06d}"
                fail(Gap(f"{index:06d}", f"{resumed - 1:06d}", resumed - index, reason))
                index = resumed
            elif messages:
                report.damaged.append(f"{index:06d}")
            if start_ms is None:
                start_ms = cap.get(cv2.CAP_PROP_POS_MSEC)
            yield f"{index:06d}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        with native.capture():
            cap.release()
        report.messages, report.message_count = native.messages, native.count
        native.close()


def open_video(path: Path, on_error: str = "error") -> Source:
    """A video file read frame by frame with OpenCV (FFmpeg's messages kept out of the terminal); the container
    is checked here: a :class:`ConfigError` if OpenCV cannot open it."""
    native = NativeLog()
    with native.capture() as messages:
        # one decoding thread: FFmpeg's worker threads would log after a read returns, onto the terminal
        cap = cv2.VideoCapture(str(path), cv2.CAP_ANY, [cv2.CAP_PROP_N_THREADS, 1])
        if not cap.isOpened():
            cap = cv2.VideoCapture(str(path))
        opened = cap.isOpened()
    if not opened:
        cap.release()
        native.close()
        reasons = [m for m in messages if "VIDEOIO" not in m and "global " not in m] or messages
        hint = f" (FFmpeg: {reasons[0]})" if reasons else ""
        raise ConfigError(f"source={str(path)!r} is not a readable video: OpenCV could not open it{hint}")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    source = Source(path, "video", iter(()), count if count > 0 else None, fps if 0 < fps < 1000 else None)
    source.report.declared = source.count
    frames = _video_frames(cap, native, source, SkipOrRaise(path, on_error, source.report))
    first = next(frames, None)  # here, before the model is loaded: a video without a readable frame fails now
    if first is None:
        raise ConfigError(
            f"source={str(path)!r} is not a readable video: no frame could be read from it"
            + (f" ({source.report.skipped} skipped)" if source.report.gaps else "")
        )
    source.frames = itertools.chain([first], frames)
    return source


def _folder_frames(files: list[Path], fail: SkipOrRaise) -> Iterator[Frame]:
    """The folder's frames in order; one that cannot be decoded goes to ``fail``."""
    for f in files:
        try:
            rgb = read_image(f)
        except ConfigError as e:
            fail(Gap(f.stem, f.stem, 1, f"cannot be read: {e}"))
            continue
        yield f.stem, rgb


def open_source(source: str | Path, on_error: str = "error") -> Source:
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
        folder = Source(path, "folder", iter(()), len(files))
        folder.report.declared = len(files)
        folder.frames = _folder_frames(files, SkipOrRaise(path, on_error, folder.report))
        return folder
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return Source(path, "image", iter([(path.stem, read_image(path))]), 1)
    return open_video(path, on_error)


@contextmanager
def terminal_stderr() -> Iterator[None]:
    """``sys.stderr`` on a copy of file descriptor 2 (the terminal), for Python's own writes (the progress bar,
    warnings) while fd 2 itself is captured for a whole live run (FFmpeg's messages from the reader thread)."""
    sys.stderr.flush()
    try:
        terminal = open(os.dup(2), "w", buffering=1, errors="replace")  # noqa: SIM115 (closed below)
    except OSError:  # no file descriptor 2
        yield
        return
    saved, sys.stderr = sys.stderr, terminal
    try:
        yield
    finally:
        sys.stderr = saved
        terminal.close()


def open_live(source: int | str, drop: str, queue_size: int, timeout: float) -> Source:
    """A camera or stream, read by a :class:`~vss.live.LiveReader` from its first frame on (a :class:`ConfigError`
    within the timeouts when none comes)."""
    reader = LiveReader(source, drop, queue_size, timeout)
    reader.start()
    kind = "camera" if isinstance(source, int) else "stream"
    return Source(Path(describe(source)), kind, iter(()), None, reader.fps, live=reader)
