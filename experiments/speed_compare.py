"""Interleaved speed comparison of two code trees: ``python experiments/speed_compare.py OLD_SRC [--rounds R]``.

For each case (model, encoder, size) one worker (experiments/speed_worker.py) runs on ``OLD_SRC`` (e.g. the
commit before a change, unpacked by ``git archive HEAD | tar -x -C /tmp/today``: ``/tmp/today/src``) and one
on this tree's ``src``; they get their timing commands in turn (old, new, old, new, ...; the other one idles
meanwhile), each command the median of ``--steps`` streaming steps, and the table gives the median over
``--rounds`` rounds of each and their ratio, with the load average before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "segformer_b1": ("segformer", "mit_b1", 480, 864),
    "segformer_b0": ("segformer", "mit_b0", 480, 864),
    "mrcfa_b1": ("mrcfa", "mit_b1", 480, 864),
    "mrcfa_b0": ("mrcfa", "mit_b0", 480, 864),
    "mrcfa_b1_p1": ("mrcfa", "mit_b1", 480, 864, "token_ratio=1.0"),
    "segformer_b1_256": ("segformer", "mit_b1", 256, 448),
    "mrcfa_b1_256": ("mrcfa", "mit_b1", 256, 448),
    "msaf_r18": ("msaf", "resnet18", 512, 1024),
    "fcn_r18": ("msaf", "resnet18", 512, 1024, "motion=0", "offsets=[]", "state=0", "semantics=0"),
}


class Worker:
    """One speed_worker.py process on a source tree."""

    def __init__(self, src: Path, case: tuple, threads: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(threads))
        args = [str(a) for a in case]
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "experiments" / "speed_worker.py"), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.ask("") == "ready"

    def ask(self, cmd: str) -> str:
        if cmd:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old_src", type=Path)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--official", action="store_true", help="also time the official clip path (MRCFA cases)")
    a = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    print("| case | old ms | new ms | old/new |" + (" official clip ms | official/new |" if a.official else ""))
    print("|---|---|---|---|" + ("---|---|" if a.official else ""))
    for name in a.cases.split(","):
        case = CASES[name]
        old, new = Worker(a.old_src, case, a.threads), Worker(ROOT / "src", case, a.threads)
        times: dict[str, list[float]] = {"old": [], "new": [], "official": []}
        for _ in range(a.rounds):
            times["old"].append(float(old.ask(f"stream {a.steps}")))
            times["new"].append(float(new.ask(f"stream {a.steps}")))
            if a.official and case[0] == "mrcfa":
                times["official"].append(float(new.ask("official 1")))
        old.close()
        new.close()
        o, n = statistics.median(times["old"]), statistics.median(times["new"])
        row = f"| {name} | {o:.0f} | {n:.0f} | {o / n:.2f} |"
        if a.official and times["official"]:
            f = statistics.median(times["official"])
            row += f" {f:.0f} | {f / n:.2f} |"
        print(row, flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
