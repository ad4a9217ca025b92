"""Profile one training step (torch.profiler, CPU, self time): ``python experiments/speed_train_profile.py
MODEL ENCODER H W [BATCH] [override ...]``, e.g. ``mrcfa mit_b1 256 256 1 stm.p=0.5``."""

from __future__ import annotations

import sys

import torch
from hydra import compose, initialize_config_dir

import vss.config
from vss.bench import train_step


def main(model: str, encoder: str, h: int, w: int, b: int = 1, *overrides: str) -> None:
    """Warm-up step, then one profiled step; the top operators by self CPU time."""
    vss.config.register_resolvers()
    with initialize_config_dir(config_dir=str(vss.config.CONF_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=[f"model={model}", f"encoder={encoder}", "mode=train", *overrides])
    torch.manual_seed(0)
    step = train_step(cfg, torch.device("cpu"))
    t = 1 + len(step.segmenter.offsets)
    clips, labels = torch.randn(b, t, 3, h, w), torch.randint(0, 124, (b, t, h, w))
    step(clips, labels, "32-true", torch.device("cpu"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(clips, labels, "32-true", torch.device("cpu"))
    print("forward / backward / optimizer s:", [f"{s:.2f}" for s in step.seconds[-1]])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35, max_name_column_width=50))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]) if len(a) > 4 else 1, *a[5:])
