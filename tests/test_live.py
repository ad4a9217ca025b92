"""``vss.predict`` on a live network source: an MJPEG-over-HTTP stream served on 127.0.0.1 by this test
(``experiments/live_stream.py``), faster than the model runs."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest

from conftest import REPO_ROOT
from random_weights import write_tiny_checkpoints
from test_predict import read_mask, run_predict
from vss.errors import ConfigError
from vss.live import Latency, Stopper, live_source

TIMEOUT = 2  # seconds: connect and read timeouts of the runs here


@pytest.fixture(scope="module")
def stream() -> ModuleType:
    """``experiments/live_stream.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location("live_stream", REPO_ROOT / "experiments" / "live_stream.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["live_stream"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mrcfa_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight MRCFA checkpoint (a temporal model: references at -9, -6, -3) at 64x64."""
    return write_tiny_checkpoints(tmp_path_factory.mktemp("live-ckpt"), {"mrcfa": ["model=mrcfa"]}, 64)["mrcfa"]


def masks_of(folder: Path) -> dict[str, np.ndarray]:
    """The masks of a run, by name."""
    return {p.stem: read_mask(p) for p in sorted((folder / "masks").glob("*.png"))}


def test_live_source_names() -> None:
    assert live_source(0) == 0 and live_source("2") == 2
    assert live_source("rtsp://cam.local/stream") == "rtsp://cam.local/stream"
    assert live_source("http://127.0.0.1:8000/x.mjpg") == "http://127.0.0.1:8000/x.mjpg"
    assert live_source("clip.mp4") is None and live_source("file:///data/clip.mp4") is None


def test_latency_summary_and_stopper() -> None:
    lat = Latency([0.1] * 10 + [0.2] * 5 + [0.3] * 10).summary()  # ms: first 10 frames, last 10 frames
    assert lat["first"] == 100.0 and lat["last"] == 300.0 and lat["p50"] == 200.0 and lat["max"] == 300.0
    stopper = Stopper(max_frames=3, duration=None)
    assert list(stopper.limit(iter(range(10)))) == [0, 1, 2] and stopper.reason == "max_frames=3 reached"


def test_stream_drops_frames_and_equals_an_offline_run(
    stream: ModuleType, mrcfa_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 300 fps stream, a slower model: frames dropped and counted, latency bounded, masks = offline run."""
    live_out, offline_out = tmp_path / "live", tmp_path / "offline"
    with stream.MJPEGServer(fps=300.0) as server:
        summary = run_predict(
            f"ckpt_path={mrcfa_ckpt}",
            f"source={server.url}",
            f"output={live_out}",
            "duration=3",
            "save_frames=true",
            "batch_size=1",
            f"timeout={TIMEOUT}",
        )
    printed = capsys.readouterr().out
    live = summary["live"]
    assert live == json.loads((live_out / "predict.json").read_text())["live"]
    assert summary["stopped"] == "duration=3 s reached" and live["drop"] == "oldest" and live["queue_size"] == 1
    # the source ran faster than the model: frames dropped, and every frame read is accounted for
    assert live["processed"] == summary["frames"] >= 15 and live["dropped"] > live["processed"]
    assert live["read"] == live["dropped"] + live["processed"] + live["unprocessed_at_stop"]
    assert live["unprocessed_at_stop"] == live["queued_at_stop"] <= 1  # the queue holds the newest frame only
    numbers = live["processed_frames"]
    assert numbers == sorted(set(numbers)) and numbers[-1] < live["read"]
    gaps = numbers[-1] + 1 - len(numbers)  # source frames before the last processed one that were not processed
    assert gaps <= live["dropped"] and live["read"] - numbers[-1] - 1 == live["dropped"] - gaps + live["queued_at_stop"]
    # latency does not grow with run time (it would by about a second a second without drops)
    lat = live["latency_ms"]
    assert lat["last"] < max(3 * lat["first"], lat["first"] + 500), lat
    assert f"{live['dropped']} of {live['read']} read dropped" in printed
    # the processed frames, run offline as a folder: the same masks (the model saw them in the same order)
    assert sorted(p.stem for p in (live_out / "frames").glob("*.png")) == [f"{n:06d}" for n in numbers]
    run_predict(f"ckpt_path={mrcfa_ckpt}", f"source={live_out / 'frames'}", f"output={offline_out}", "batch_size=1")
    live_masks, offline_masks = masks_of(live_out), masks_of(offline_out)
    assert list(live_masks) == list(offline_masks) == [f"{n:06d}" for n in numbers]
    assert len(np.unique(np.stack(list(live_masks.values())))) > 1, "one class everywhere: the check is void"
    assert all(np.array_equal(live_masks[k], offline_masks[k]) for k in live_masks)
    assert (live_out / "overlay.mp4").is_file()


def test_stream_that_stops_ends_cleanly(stream: ModuleType, mrcfa_ckpt: Path, tmp_path: Path) -> None:
    """The server closes after 40 frames, or goes silent: the run ends with the reason, its files complete."""
    for stall, reason in ((False, "the source closed the stream"), (True, "no frame within the read timeout")):
        out = tmp_path / f"stall{stall}"
        started = time.perf_counter()
        with stream.MJPEGServer(fps=100.0, count=40, stall=stall) as server:
            summary = run_predict(
                f"ckpt_path={mrcfa_ckpt}", f"source={server.url}", f"output={out}", "drop=none", f"timeout={TIMEOUT}"
            )
        assert time.perf_counter() - started < 20
        assert summary["stopped"].startswith("the source ended: ") and reason in summary["stopped"], summary["stopped"]
        assert summary["frames"] == 40 and summary["live"]["dropped"] == 0  # drop=none: nothing lost
        assert len(list((out / "masks").glob("*.png"))) == 40 and (out / "overlay.mp4").is_file()


def test_nobody_listening_is_one_line(mrcfa_ckpt: Path, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"source='http://127.0.0.1:{port}/x.mjpg' cannot be read: OpenCV could"):
        run_predict(f"ckpt_path={mrcfa_ckpt}", f"source=http://127.0.0.1:{port}/x.mjpg", f"output={tmp_path / 'o'}")
    assert time.perf_counter() - started < 10


def test_silent_server_is_one_line_within_the_timeout(mrcfa_ckpt: Path, tmp_path: Path) -> None:
    with socket.socket() as s:  # accepts the connection, never answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        url = f"http://127.0.0.1:{s.getsockname()[1]}/x.mjpg"
        started = time.perf_counter()
        with pytest.raises(ConfigError, match=rf"source='{url}' cannot be read"):
            run_predict(f"ckpt_path={mrcfa_ckpt}", f"source={url}", f"output={tmp_path / 'o'}", f"timeout={TIMEOUT}")
        assert time.perf_counter() - started < 3 * TIMEOUT + 5


def test_ctrl_c_stops_cleanly(stream: ModuleType, mrcfa_ckpt: Path, tmp_path: Path) -> None:
    """SIGINT during a live run: the run ends, its videos and predict.json are written."""
    out, before = tmp_path / "out", signal.getsignal(signal.SIGINT)
    done = threading.Event()

    def interrupt() -> None:  # once the loop runs (5 masks written): before it, Ctrl-C interrupts as usual
        while not done.is_set() and len(list((out / "masks").glob("*.png"))) < 5:
            time.sleep(0.05)
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    with stream.MJPEGServer(fps=200.0) as server:
        thread = threading.Thread(target=interrupt, daemon=True)
        thread.start()
        try:
            summary = run_predict(f"ckpt_path={mrcfa_ckpt}", f"source={server.url}", f"output={out}", "timeout=5")
        finally:
            done.set()
    assert summary["stopped"] == "stopped by SIGINT (Ctrl-C)" and summary["frames"] >= 5
    assert json.loads((out / "predict.json").read_text())["frames"] == summary["frames"]
    assert len(list((out / "masks").glob("*.png"))) == summary["frames"]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_drop_oldest_on_a_file_is_refused(mrcfa_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="drop='oldest' is for live sources"):
        run_predict(f"ckpt_path={mrcfa_ckpt}", f"source={tmp_path}", f"output={tmp_path / 'o'}", "drop=oldest")


def test_max_frames_on_a_folder_and_show_without_display(
    stream: ModuleType,
    mrcfa_ckpt: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``max_frames`` stops a file source too (its first frames, in order); ``show=true`` without a display: a
    warning line, and the run goes on."""
    src = tmp_path / "frames"
    src.mkdir()
    for i in range(6):
        cv2.imwrite(str(src / f"{i}.png"), cv2.cvtColor(stream.frame(i, (48, 80)), cv2.COLOR_RGB2BGR))
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with caplog.at_level(logging.WARNING, logger="vss.predict"):
        summary = run_predict(
            f"ckpt_path={mrcfa_ckpt}", f"source={src}", f"output={tmp_path / 'o'}", "max_frames=3", "show=true"
        )
    assert summary["frames"] == 3 and summary["stopped"] == "max_frames=3 reached" and summary["live"] is None
    assert sorted(p.name for p in (tmp_path / "o" / "masks").iterdir()) == ["0.png", "1.png", "2.png"]
    assert any("show=true: no window (no display" in r.getMessage() for r in caplog.records)
