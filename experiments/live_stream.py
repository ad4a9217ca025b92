"""Serve a generated MJPEG-over-HTTP stream (multipart/x-mixed-replace) on 127.0.0.1 for ``vss.predict``'s live path.

    python experiments/live_stream.py --port 8765 --fps 60 --seconds 70 --size 256x448
    python -m vss.predict ckpt_path=... source=http://127.0.0.1:8765/stream.mjpg duration=60

Frame ``i`` is a square and a disc moving over a noisy background (:func:`frame`), JPEG-encoded and sent at
``fps``; after ``count`` frames the server closes the connection (``stall=True``: keeps it open, silent).
``tests/test_live.py`` uses :class:`MJPEGServer` too.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cv2
import numpy as np

BOUNDARY = "vssframe"


def frame(i: int, hw: tuple[int, int] = (96, 160)) -> np.ndarray:
    """Frame ``i`` (RGB uint8): noise, a red square moving right and a green disc moving left (period 40 frames)."""
    h, w = hw
    f = np.random.default_rng(i).integers(30, 90, (h, w, 3), dtype=np.uint8)
    step = i % 40
    x = w // 20 + (w // 2) * step // 40
    cv2.rectangle(f, (x, h // 5), (x + w // 4, h // 5 + h // 3), (230, 40, 40), -1)
    cv2.circle(f, (w - w // 8 - (w // 2) * step // 40, h - h // 4), min(h, w) // 5, (40, 220, 60), -1)
    return f


class MJPEGServer:
    """An MJPEG stream of ``make(i)`` frames at ``fps`` on ``http://127.0.0.1:PORT/stream.mjpg`` (any path), served
    by a thread; ``count`` frames per connection (None: endless), then closed or, with ``stall``, kept silent."""

    def __init__(
        self,
        make: Callable[[int], np.ndarray] = frame,
        fps: float = 100.0,
        count: int | None = None,
        stall: bool = False,
        port: int = 0,
        quality: int = 90,
    ) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self.send_response(200)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                start, i = time.perf_counter(), 0
                try:
                    while (count is None or i < count) and not server.closing.is_set():
                        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(make(i), cv2.COLOR_RGB2BGR), [1, quality])
                        data = jpg.tobytes()
                        head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
                        self.wfile.write(head.encode() + data + b"\r\n")
                        self.wfile.flush()
                        server.sent += 1
                        i += 1
                        time.sleep(max(0.0, start + i / fps - time.perf_counter()))
                    while stall and not server.closing.is_set():
                        time.sleep(0.05)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.sent = 0
        self.closing = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="mjpeg-server", daemon=True)

    @property
    def url(self) -> str:
        """The stream's address."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/stream.mjpg"

    def __enter__(self) -> MJPEGServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    """Serve for ``--seconds``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--fps", type=float, default=60.0)
    ap.add_argument("--seconds", type=float, default=70.0)
    ap.add_argument("--size", default="96x160", help="HxW of the frames")
    args = ap.parse_args()
    hw = tuple(int(v) for v in args.size.split("x"))
    with MJPEGServer(lambda i: frame(i, hw), fps=args.fps, port=args.port) as server:  # type: ignore[arg-type]
        print(f"serving {server.url} at {args.fps:g} fps, {args.size}, for {args.seconds:g} s", flush=True)
        time.sleep(args.seconds)
        print(f"sent {server.sent} frames", flush=True)


if __name__ == "__main__":
    main()
