"""Training-step worker for experiments/speed_train_compare.py: ``python experiments/speed_train_worker.py H W B
override...`` builds the step with whichever ``vss`` is on the path (``vss.bench.train_step``) and answers the
commands ``step N`` (prints the medians of N steps: wall ms, process CPU ms, forward / backward / optimizer wall
ms; the process's peak RSS MiB) and ``quit`` on stdin. glibc's allocator is tuned as ``vss.train`` and ``vss.bench``
tune it (experiments/speed_worker.py's ``_tune_host_allocator``: this checkout's ``vss.runtime``, for both trees):
untuned, every large tensor is page-faulted afresh and a tree that allocates more pays more (MRCFA-B1 at 480x480:
07bd860 24.3 s untuned against 17.1 s tuned)."""

from __future__ import annotations

import resource
import statistics
import sys

import torch
from hydra import compose, initialize_config_dir
from speed_worker import _tune_host_allocator

import vss.config
from vss.bench import train_step


def main() -> None:
    _tune_host_allocator()
    h, w, b, *overrides = sys.argv[1:]
    vss.config.register_resolvers()
    with initialize_config_dir(config_dir=str(vss.config.CONF_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=["mode=train", *overrides])
    torch.manual_seed(0)
    step = train_step(cfg, torch.device("cpu"))
    t = 1 + len(step.segmenter.offsets)
    clips = torch.randn(int(b), t, 3, int(h), int(w))
    labels = torch.randint(0, int(cfg.num_classes), (int(b), t, int(h), int(w)))
    step(clips, labels, str(cfg.precision), torch.device("cpu"))  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        n = int(cmd[1])
        step.seconds.clear()
        step.cpu_seconds.clear()
        for _ in range(n):
            step(clips, labels, str(cfg.precision), torch.device("cpu"))
        parts = [1e3 * statistics.median(s[i] for s in step.seconds) for i in range(3)]
        wall = 1e3 * statistics.median(sum(s) for s in step.seconds)
        cpu = 1e3 * statistics.median(step.cpu_seconds)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB: the process's peak so far
        print(wall, cpu, *parts, rss, flush=True)


if __name__ == "__main__":
    main()
