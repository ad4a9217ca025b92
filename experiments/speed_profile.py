"""Profile of one steady-state streaming step: ``python experiments/speed_profile.py MODEL ENCODER H W [k=v ...]``.

Builds the model as experiments/speed_worker.py does (random weights, eval, 124 classes) from whichever ``vss``
is on the path (``PYTHONPATH=/tmp/today/src`` for the commit before a change), warms a :class:`Streamer` past
MRCFA's start clips, then runs ``torch.profiler`` (CPU, and CUDA when available) over ``--steps`` pushes of one
frame each and prints the top operators by self time (``--rows``), per step.
"""

from __future__ import annotations

import argparse

import torch
from speed_worker import build
from torch.profiler import ProfilerActivity, profile

from vss.models.streamer import Streamer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("encoder")
    parser.add_argument("height", type=int)
    parser.add_argument("width", type=int)
    parser.add_argument("extra", nargs="*")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=15)
    a = parser.parse_args()
    model = build(a.model, a.encoder, dict(e.split("=", 1) for e in a.extra))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    frames = torch.randn(12, 3, a.height, a.width, generator=torch.Generator().manual_seed(0)).to(device)
    streamer = Streamer(model, batch_size=1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        for i in range(10):
            streamer.push(frames[i])
        with profile(activities=activities) as prof:
            for i in range(a.steps):
                streamer.push(frames[i])
            if device.type == "cuda":
                torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_cpu_time_total"
    if device.type == "cuda":  # torch >= 2.4 names it self_device_time_total
        key = next(k for k in ("self_device_time_total", "self_cuda_time_total") if hasattr(events[0], k))
    total = sum(getattr(e, key) for e in events)
    name = f"{a.model} {a.encoder} {a.height}x{a.width} {' '.join(a.extra)}"
    print(f"{name}: {total / 1e3 / a.steps:.0f} ms self time per step")
    print("| operator | calls/step | self ms/step | share |")
    print("|---|---|---|---|")
    for e in sorted(events, key=lambda e: -getattr(e, key))[: a.rows]:
        t = getattr(e, key)
        print(f"| {e.key} | {e.count // a.steps} | {t / 1e3 / a.steps:.1f} | {100 * t / total:.1f}% |")


if __name__ == "__main__":
    main()
