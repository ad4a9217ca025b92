"""AOTInductor package vs the eager step on the CPU (issue 24): ``step.aoti.pt2`` of ``vss.export format=pt2
aoti=true`` and the checkpoint's eager :class:`~vss.models.step.Step`, 6 frames a round, rounds interleaved
(order alternated), the first round untimed; median ms per frame.

Usage (after ``experiments/export_480.py --work W`` and ``vss.export ckpt_path=W/NAME.ckpt format=pt2 aoti=true
height=480 width=864 output=W/NAME/aoti``)::

    python experiments/aoti_time.py W segformer_b1 mrcfa_b1
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from vss.export import load
from vss.exported import open_exported
from vss.models.step import Step


def main(work: str, names: list[str]) -> None:
    for name in names:
        time_one(work, name)


def time_one(work: str, name: str, frames: int = 6, rounds: int = 4) -> None:
    """Print the median ms per frame of ``name``'s eager step and AOTInductor package."""
    opened = open_exported(f"{work}/{name}/aoti", "pt2")
    h, w = opened.size
    step = Step(load(f"{work}/{name}.ckpt").segmenter.float().eval()).eval()
    video = torch.randint(0, 256, (frames, 1, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def eager() -> None:
        state = step.init_state(h, w, 1)
        with torch.inference_mode():
            for f in video:
                _, state = step.step(f, state)

    def aoti() -> None:
        state = dict(opened.zero)
        for f in video:
            _, state = opened.runner(f.numpy(), state)

    ms: dict[str, list[float]] = {"eager": [], "aoti": []}
    for r in range(rounds):
        for key, run in [("eager", eager), ("aoti", aoti)][:: 1 if r % 2 else -1]:
            start = time.perf_counter()
            run()
            if r:
                ms[key].append(1e3 * (time.perf_counter() - start) / frames)
    e, a = statistics.median(ms["eager"]), statistics.median(ms["aoti"])
    print(
        f"{name} {h}x{w} CPU: eager step {e:.0f} ms/frame, AOTInductor package ({opened.runner.device}) {a:.0f} "
        f"ms/frame, ratio {a / e:.2f}, load_1m {os.getloadavg()[0]:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
