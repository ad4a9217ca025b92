"""The live path's overhead over offline ``vss.predict`` on the same frames (issue 25: under 5% on the CPU).

Each round streams ``--frames`` generated frames as MJPEG over HTTP on 127.0.0.1 at ``--fps`` (faster than the model,
``drop=none``: nothing is lost, the model is never idle), predicts them live with ``save_frames=true``, then predicts
the saved frames offline (a folder); rounds alternate which runs first. Reported: the seconds of each run (first
frame read to last mask written, as ``predict.json`` records them), their ratio, and whether the masks are equal.

    PYTHONPATH=src python experiments/live_overhead.py --ckpt RUN/checkpoints/last.ckpt --frames 300 --rounds 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_stream import MJPEGServer, frame  # noqa: E402

from vss.config import CONF_DIR, register_resolvers  # noqa: E402
from vss.predict import predict  # noqa: E402


def run(ckpt: str, source: str, out: Path, *extra: str) -> dict:
    """One ``vss.predict`` run in-process; its summary."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "predict",
            [f"ckpt_path={ckpt}", f"source={source}", f"output={out}", "progress=false", "save_overlay=false", *extra],
        )
    return predict(cfg)


def masks(out: Path) -> list[np.ndarray]:
    """The masks a run wrote, in name order."""
    return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((out / "masks").glob("*.png"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--fps", type=float, default=1000.0)
    ap.add_argument("--size", default="256x448", help="HxW of the streamed frames")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    register_resolvers()
    hw = tuple(int(v) for v in args.size.split("x"))
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        first = Path(tmp) / "first"  # a first live run (also the warm-up): its saved frames are the offline source
        with MJPEGServer(lambda i: frame(i, hw), fps=args.fps, count=args.frames) as server:
            run(args.ckpt, server.url, first, "drop=none", "save_frames=true")
        frames = str(first / "frames")
        for r in range(args.rounds):
            outs = {"live": Path(tmp) / f"live{r}", "offline": Path(tmp) / f"offline{r}"}
            times = {}
            for which in ("live", "offline") if r % 2 == 0 else ("offline", "live"):
                if which == "live":
                    with MJPEGServer(lambda i: frame(i, hw), fps=args.fps, count=args.frames) as server:
                        got = run(args.ckpt, server.url, outs[which], "drop=none")
                else:
                    got = run(args.ckpt, frames, outs[which])
                times[which] = got["seconds"] / max(got["frames"], 1)
            ratio = times["live"] / times["offline"]
            ratios.append(ratio)
            live, offline = masks(outs["live"]), masks(outs["offline"])
            same = len(live) == len(offline) == args.frames and all(map(np.array_equal, live, offline))
            print(
                f"round {r}: live {1000 * times['live']:.1f} ms/frame, offline {1000 * times['offline']:.1f} ms/frame,"
                f" ratio {ratio:.3f}, {len(live)} frames, masks equal: {same}",
                flush=True,
            )
    print(
        f"live / offline: median {statistics.median(ratios):.3f} over {len(ratios)} rounds "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}); load_1m {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
