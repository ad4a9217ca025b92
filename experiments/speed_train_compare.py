"""Interleaved training-step comparison of two code trees: ``python experiments/speed_train_compare.py OLD_SRC
H W B [--rounds R] override ...`` (e.g. ``/tmp/before/src 480 480 2 model=mrcfa encoder=mit_b1
stm.p=0.5``). One worker (experiments/speed_train_worker.py) per tree, each warmed up, then R rounds of one step
each in turn (old, new, old, ...; the other idles); medians of wall and process CPU time and their ratios.
``--new KEY=VALUE`` (repeatable) sets an option on the new side only: with OLD_SRC = this tree's src it compares
options (e.g. ``--new precision=bf16-mixed``)."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("old_src")
    p.add_argument("h")
    p.add_argument("w")
    p.add_argument("b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new", action="append", default=[], help="an override for the new side only (repeatable)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    workers = {}
    for name, src, extra in (("old", a.old_src, []), ("new", str(ROOT / "src"), a.new)):
        env = dict(os.environ, PYTHONPATH=src)
        worker = str(ROOT / "experiments" / "speed_train_worker.py")
        cmd = [sys.executable, worker, a.h, a.w, a.b, *a.overrides, *extra]
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        while (line := proc.stdout.readline()) and line.strip() != "ready":
            pass
        workers[name] = proc
    rows: dict[str, list[list[float]]] = {k: [] for k in workers}
    load = os.getloadavg()[0]
    for r in range(a.rounds):
        for name, proc in workers.items():
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("step 1\n")
            proc.stdin.flush()
            rows[name].append([float(x) for x in proc.stdout.readline().split()])
            print(f"round {r + 1} {name}: wall {rows[name][-1][0]:.0f} ms, cpu {rows[name][-1][1]:.0f} ms", flush=True)
    for proc in workers.values():
        assert proc.stdin is not None
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        proc.wait()
    med = {k: [statistics.median(r[i] for r in v) for i in range(6)] for k, v in rows.items()}
    keys = ("step_ms", "step_cpu_ms", "forward_ms", "backward_ms", "optimizer_ms", "peak_rss_MiB")
    new = f" (new: {' '.join(a.new)})" if a.new else ""
    print(f"{a.h}x{a.w} batch {a.b} {' '.join(a.overrides)}{new} (load {load:.1f} -> {os.getloadavg()[0]:.1f}):")
    for i, k in enumerate(keys):
        print(
            f"  {k:13s} old {med['old'][i]:9.1f}  new {med['new'][i]:9.1f}  old/new {med['old'][i] / med['new'][i]:.2f}"
        )


if __name__ == "__main__":
    main()
