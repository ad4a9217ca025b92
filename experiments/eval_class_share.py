"""Share of the logits-to-classes step in an MRCFA streaming step at full resolution (issue 26):
``python experiments/eval_class_share.py [H W] [--rounds R] [--encoder mit_b1] [--p 0.5]``.

Builds MRCFA (random weights, eval, 124 classes, ``stm.p``) as experiments/speed_worker.py does, warms a
:class:`Streamer` past the start clips, then in each round times, in turn: one streaming step (a frame pushed, its
logits out), the old resize-then-argmax of that step's logits to H x W, and
:func:`vss.models.ops.classes.upsampled_class_map` (checked equal to the old ids every round). Prints medians of
wall and process CPU ms, and each logits-to-classes step as a share of the streaming step, with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from speed_worker import _tune_host_allocator, build

from vss.models.ops.classes import upsampled_class_map
from vss.models.streamer import Streamer


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall ms, CPU ms, result) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return 1e3 * (time.perf_counter() - w0), 1e3 * (time.process_time() - c0), out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("height", type=int, nargs="?", default=480)
    p.add_argument("width", type=int, nargs="?", default=864)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--encoder", default="mit_b1")
    p.add_argument("--p", type=float, default=0.5)
    a = p.parse_args()
    _tune_host_allocator()
    model = build("mrcfa", a.encoder, {"token_ratio": str(a.p)})
    size = (a.height, a.width)
    frames = torch.randn(12, 3, *size, generator=torch.Generator().manual_seed(0))
    streamer = Streamer(model, batch_size=1)
    count = 0

    def step() -> torch.Tensor | None:
        nonlocal count
        out = streamer.push(frames[count % len(frames)])
        count += 1
        return out[0].logits[None] if out else None

    def old(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False).max(1).indices

    rows: dict[str, list[tuple[float, float]]] = {"step": [], "resize+argmax": [], "upsampled_class_map": []}
    load = os.getloadavg()[0]
    with torch.inference_mode():
        logits = None
        for _ in range(10):
            logits = step()
        assert logits is not None
        old(logits), upsampled_class_map(logits, size)
        for r in range(a.rounds):
            w, c, logits = timed(step)
            rows["step"].append((w, c))
            w, c, ids_old = timed(lambda x=logits: old(x))
            rows["resize+argmax"].append((w, c))
            w, c, ids_new = timed(lambda x=logits: upsampled_class_map(x, size))
            rows["upsampled_class_map"].append((w, c))
            assert torch.equal(ids_old, ids_new), "upsampled_class_map ids differ from resize-then-argmax"
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.0f}/{v[-1][1]:.0f}" for k, v in rows.items()))
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in rows.items()}
    print(
        f"MRCFA {a.encoder} p={a.p}, logits {tuple(logits.shape[1:])} -> {size}, {torch.get_num_threads()} threads, "
        f"{a.rounds} rounds, load_1m {load:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    print("| part | wall ms | CPU ms | share of the step (wall) | share (CPU) |\n|---|---|---|---|---|")
    s = med["step"]
    for k, (w, c) in med.items():
        print(f"| {k} | {w:.1f} | {c:.1f} | {100 * w / s[0]:.1f}% | {100 * c / s[1]:.1f}% |")


if __name__ == "__main__":
    main()
