"""Live sources for ``vss.predict``: a camera index or a network stream read by a thread into a bounded queue.

A reader thread opens the source with OpenCV (FFmpeg for ``rtsp://``, ``http://``, ...; connect and read timeouts
set, and a watchdog of its own on top: a source that never starts or stops sending ends the run with one line,
never a hang), stamps every frame with the time its read returned (the *capture* time) and its number in the
source (every frame read counts, dropped or not), and puts it into a queue of ``queue_size`` frames. When the
queue is full, ``drop=oldest`` throws the oldest frame away (the model, when slower than the source, always gets
the newest frame: bounded latency) and ``drop=none`` makes the reader wait (nothing lost; latency grows while the
model is slower). The model side takes the frames in order, so a temporal model sees the frames it processed,
in order, with the real gaps between them: its offsets count *processed* frames, so with frames dropped a
reference ``t-3`` lies further back in time than three source frames (and the spacing varies with the drops).

:class:`Stopper` ends a run at ``max_frames`` frames, after ``duration`` seconds or on SIGINT/SIGTERM (a second
signal interrupts at once); :class:`Window` shows the overlay where a display exists (``show=true``).
"""

from __future__ import annotations

import collections
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vss.errors import ConfigError

DROP = ("oldest", "none")
"""``drop=``: when the queue is full, drop its oldest frame, or make the reader wait."""
SCHEME = re.compile(r"^(?!file:)[a-zA-Z][a-zA-Z0-9+.-]*://")
"""A URL OpenCV's FFmpeg opens as a stream (rtsp://, http://, https://, rtmp://, udp://, ...)."""
POLL_S = 0.05
"""How often the model side looks at the stop conditions while it waits for a frame."""
GRACE_S = 2.0
"""The watchdog's margin over ``timeout``: a read that has not returned by then is given up on."""
EDGE = 10
"""Frames averaged for the latency at the start and at the end of a run."""


def live_source(source: Any) -> int | str | None:
    """A camera index (an integer, unless a file of that name exists) or a stream URL; None for a file/folder."""
    if isinstance(source, int) and not isinstance(source, bool):
        return source
    text = str(source).strip()
    if text.isdigit() and not Path(text).exists():
        return int(text)
    return text if SCHEME.match(text) else None


def describe(source: int | str) -> str:
    """``camera 0`` or the URL."""
    return f"camera {source}" if isinstance(source, int) else source


@dataclass
class Captured:
    """A frame as read: its number in the source, RGB uint8 (H,W,3), and the time its read returned."""

    number: int
    rgb: np.ndarray
    time: float


@dataclass
class Latency:
    """Capture-to-mask latency of every processed frame, in seconds, in processing order."""

    seconds: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float | None]:
        """Milliseconds: the mean of the first and the last ``EDGE`` frames, p50, p95 and the maximum."""
        if not self.seconds:
            return {"first": None, "last": None, "p50": None, "p95": None, "max": None}
        ms = np.asarray(self.seconds) * 1000.0
        first, last = ms[:EDGE].mean(), ms[-EDGE:].mean()
        p50, p95 = np.percentile(ms, [50, 95])
        return {
            k: round(float(v), 2)
            for k, v in zip(("first", "last", "p50", "p95", "max"), (first, last, p50, p95, ms.max()), strict=True)
        }


class LiveReader:
    """A camera or stream read by a daemon thread into a bounded queue (see the module docstring)."""

    def __init__(self, source: int | str, drop: str, queue_size: int, timeout: float) -> None:
        self.source, self.drop, self.queue_size, self.timeout = source, drop, int(queue_size), float(timeout)
        self.queue: collections.deque[Captured] = collections.deque()
        self.cond = threading.Condition()
        self.read = 0  # frames read from the source
        self.dropped = 0  # frames thrown away by drop=oldest
        self.fps: float | None = None  # the frame rate the source declares
        self.ended: str | None = None  # why the source stopped giving frames
        self.failed: str | None = None  # why it could not be opened
        self.first_read: float | None = None
        self.last_read = time.perf_counter()
        self.captured: dict[str, float] = {}  # capture time of the frames handed out, by name
        self.latency = Latency()
        self.processed: list[int] = []
        self._stop = threading.Event()
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vss-live-reader", daemon=True)

    # -- the reader thread -------------------------------------------------------------------------------
    def _open(self) -> Any:
        ms = int(self.timeout * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        api = cv2.CAP_ANY if isinstance(self.source, int) else cv2.CAP_FFMPEG
        return cv2.VideoCapture(self.source, api, params)

    def _put(self, frame: Captured) -> None:
        with self.cond:
            while len(self.queue) >= self.queue_size:
                if self.drop == "oldest":
                    self.queue.popleft()
                    self.dropped += 1
                elif self._stop.is_set():  # drop=none, stopping: the frame read last is queued (not processed)
                    break
                else:
                    self.cond.wait(POLL_S)
            self.queue.append(frame)
            self.cond.notify_all()

    def _run(self) -> None:
        cap = None
        try:
            cap = self._open()
            if not cap.isOpened():
                self.failed = "OpenCV could not open it (nothing answers there, or not a video stream)"
                return
            fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
            self.fps = fps if 0 < fps < 1000 else None
            while not self._stop.is_set():
                asked = time.perf_counter()
                ok, bgr = cap.read()
                now = time.perf_counter()
                if not ok or bgr is None:
                    waited = now - asked
                    why = (
                        f"no frame within the read timeout ({self.timeout:g} s)"
                        if waited >= 0.9 * self.timeout
                        else "the source closed the stream"
                    )
                    if self.read == 0:
                        self.failed = f"no frame could be read: {why}"
                    self.ended = why
                    return
                self.last_read = now
                self.first_read = self.first_read or now
                self._put(Captured(self.read, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), now))
                self.read += 1
                self._started.set()
        except Exception as e:  # an OpenCV error in the thread: the model side ends with it
            self.failed = self.failed or f"{type(e).__name__}: {e}"
            self.ended = self.ended or f"{type(e).__name__}: {e}"
        finally:
            self.ended = self.ended or "stopped"
            if cap is not None:
                cap.release()
            with self.cond:
                self.cond.notify_all()
            self._started.set()

    # -- the model side ----------------------------------------------------------------------------------
    def _named(self) -> str:
        return f"source={self.source!r}" + (" (a camera index)" if isinstance(self.source, int) else "")

    def start(self) -> None:
        """Start reading; return at the first frame, else a :class:`ConfigError` (one line) within the timeouts."""
        self.thread.start()
        wait = 2 * self.timeout + GRACE_S  # the open, then the first read
        if not self._started.wait(wait):
            self.close(join=False)
            raise ConfigError(f"{self._named()}: no frame within {wait:g} s (timeout={self.timeout:g})")
        if self.read == 0:
            raise ConfigError(f"{self._named()} cannot be read: {self.failed or self.ended}")

    def batches(self, size: int, stopper: Stopper) -> Iterator[list[tuple[str, np.ndarray]]]:
        """The queued frames in order, up to ``size`` at a time (as many as are waiting, at least one), named
        ``%06d`` by their number in the source, until the source ends or ``stopper`` says stop."""
        while True:
            if stopper.check():
                return
            with self.cond:
                if not self.queue and not self.thread.is_alive():
                    stopper.reason = stopper.reason or f"the source ended: {self.ended}"
                    return
                if not self.queue:
                    self.cond.wait(POLL_S)
                room = stopper.room()
                take = min(size, len(self.queue), size if room is None else room)
                frames = [self.queue.popleft() for _ in range(take)]
                self.cond.notify_all()
            if not frames:
                if time.perf_counter() - self.last_read > self.timeout + GRACE_S:  # the read hangs: give up on it
                    stopper.reason = f"the source ended: no frame for {self.timeout + GRACE_S:g} s"
                    return
                continue
            stopper.taken += len(frames)
            out = []
            for f in frames:
                name = f"{f.number:06d}"
                self.captured[name] = f.time
                out.append((name, f.rgb))
            yield out

    def done(self, name: str) -> None:
        """The mask of frame ``name`` is written: its latency is counted."""
        self.latency.seconds.append(time.perf_counter() - self.captured.pop(name))
        self.processed.append(int(name))

    def progress(self) -> str:
        """The live part of the progress line."""
        last = self.latency.seconds[-1] * 1000 if self.latency.seconds else float("nan")
        return f"dropped {self.dropped}, latency {last:.0f} ms"

    def close(self, join: bool = True) -> None:
        """Stop the thread (a read still blocked in OpenCV is left to its timeout: the thread is a daemon)."""
        self._stop.set()
        with self.cond:
            self.cond.notify_all()
        if join and self.thread.is_alive():
            self.thread.join(self.timeout + GRACE_S)

    def summary(self, stopped: str | None) -> dict[str, Any]:
        """For predict.json: counts, latency (ms) and the source frames processed."""
        with self.cond:
            waiting = len(self.queue)
        span = self.last_read - self.first_read if self.first_read is not None and self.read > 1 else 0.0
        return {
            "source": describe(self.source),
            "drop": self.drop,
            "queue_size": self.queue_size,
            "read": self.read,
            "dropped": self.dropped,
            "processed": len(self.processed),
            "unprocessed_at_stop": self.read - self.dropped - len(self.processed),
            "queued_at_stop": waiting,
            "declared_fps": self.fps,
            "measured_fps": round((self.read - 1) / span, 2) if span > 0 else None,
            "stopped": stopped,
            "latency_ms": self.latency.summary(),
            "processed_frames": self.processed,
        }


class Stopper:
    """When a run stops: ``max_frames`` frames taken, ``duration`` seconds after :meth:`start`, a signal
    (SIGINT/SIGTERM, while :meth:`signals` is active) or a ``reason`` set from outside."""

    def __init__(self, max_frames: int | None, duration: float | None) -> None:
        self.max_frames, self.duration = max_frames, duration
        self.reason: str | None = None
        self.taken = 0
        self.started = time.perf_counter()

    def _named(self) -> str:
        return f"source={self.source!r}" + (" (a camera index)" if isinstance(self.source, int) else "")

    def start(self) -> None:
        """The clock of ``duration`` starts now."""
        self.started = time.perf_counter()

    def room(self) -> int | None:
        """Frames that may still be taken (None: no limit)."""
        return None if self.max_frames is None else max(0, self.max_frames - self.taken)

    def check(self) -> str | None:
        """The reason to stop now, if any."""
        if self.reason is None and self.max_frames is not None and self.taken >= self.max_frames:
            self.reason = f"max_frames={self.max_frames} reached"
        if self.reason is None and self.duration is not None and time.perf_counter() - self.started >= self.duration:
            self.reason = f"duration={self.duration:g} s reached"
        return self.reason

    def limit(self, frames: Iterator[Any]) -> Iterator[Any]:
        """``frames`` until a stop condition holds (checked before each frame is read)."""
        while not self.check():
            frame = next(frames, None)
            if frame is None:
                return
            self.taken += 1
            yield frame

    @contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM stop the run cleanly (after the frame in hand); a second one interrupts at once.
        Only in the main thread (elsewhere Python cannot install handlers: signals act as before)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        names = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}
        saved = {s: signal.getsignal(s) for s in names}

        def handler(signum: int, frame: Any) -> None:
            if self.reason is not None and self.reason.startswith("stopped by"):
                for s, h in saved.items():
                    signal.signal(s, h)
                raise KeyboardInterrupt
            self.reason = f"stopped by {names[signal.Signals(signum)]}"

        for s in names:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in saved.items():
                signal.signal(s, h)


class Window:
    """``show=true``: the overlay in an OpenCV window, where a display exists (else one warning line); ``q`` or
    Esc in the window stops the run."""

    TITLE = "vss.predict"

    def __init__(self) -> None:
        self.open = False
        self.why: str | None = None
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            self.why = "no display (DISPLAY and WAYLAND_DISPLAY are unset)"
            return
        try:
            cv2.namedWindow(self.TITLE, cv2.WINDOW_NORMAL)
            self.open = True
        except cv2.error as e:
            self.why = f"OpenCV cannot open a window here ({' '.join(str(e).split())[:160]})"

    def show(self, rgb: np.ndarray) -> bool:
        """Show a frame; True when the user asked to stop."""
        if not self.open:
            return False
        cv2.imshow(self.TITLE, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        return (cv2.waitKey(1) & 0xFF) in (ord("q"), 27)

    def close(self) -> None:
        """Close the window."""
        if self.open:
            cv2.destroyWindow(self.TITLE)
            self.open = False
