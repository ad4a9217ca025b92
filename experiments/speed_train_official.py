"""The official MRCFA training step against ours, interleaved in one process (issue 26's official/ours ratio):
``python experiments/speed_train_official.py [H W B] [--rounds R] [--encoder mit_b1]``.

"Official" is the official formulation as re-typed from the official source for the tests
(tests/reference_mit.py, tests/reference_mrcfa.py: the MiT, ``OfficialMRCFAHead`` in training mode) with mmseg
0.x's loss (each output resized bilinearly to the label size, then ``F.cross_entropy``; 0.5 x the mean over the
clip's per-frame outputs + the mean of the three auxiliary outputs' and the final output's terms against the
target label) and the official optimizer (AdamW; mmcv on torch 1.7 updates one parameter at a time:
``foreach=False``). The official head fixes its token ratio by backbone (0.5 for B1, 0.8 for B0); ours runs with
the same ``stm.p``. "Ours" is ``vss.bench``'s training step of ``model=mrcfa`` (``vss.lit.training_loss``, the
official parameter groups, fused AdamW). Both take the same random clips and labels (B clips of 4 frames at
H x W, 124 classes); one thread; medians of process CPU time and wall time over R rounds (ours, official, ours,
...) after a warm-up step of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import vss.config
from vss.bench import train_step
from vss.runtime import tune_host_allocator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_mit import build_reference_mit  # noqa: E402
from reference_mrcfa import OfficialMRCFAHead  # noqa: E402


def mmseg_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mmseg 0.x: resize to the label size, pixel cross-entropy, mean over all pixels (ignored ones count 0)."""
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, labels, ignore_index=255, reduction="none").mean()


def official_step(encoder: str, classes: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    """The official model, optimizer and loss of one clip batch (B,T,3,H,W) with labels (B,T,H,W)."""
    mit = build_reference_mit(encoder)
    layout = "b1" if encoder == "mit_b1" else "b0"
    head = OfficialMRCFAHead([64, 128, 320, 512] if encoder == "mit_b1" else [32, 64, 160, 256], classes, layout)
    model = torch.nn.ModuleDict({"backbone": mit, "decode_head": head}).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01, foreach=False)

    def loss(clips: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, t = clips.shape[:2]
        out = head(mit(clips.flatten(0, 1)), b, t)  # (B, T + 3 + 1, C, h, w)
        per_frame = mmseg_ce(out[:, :t].flatten(0, 1), labels.flatten(0, 1))
        target = labels[:, -1]
        final = torch.stack([mmseg_ce(out[:, i], target) for i in range(t, out.shape[1])]).mean()
        return 0.5 * per_frame + final

    return model, optimizer, loss


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("height", type=int, nargs="?", default=480)
    p.add_argument("width", type=int, nargs="?", default=480)
    p.add_argument("batch", type=int, nargs="?", default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--encoder", default="mit_b1")
    a = p.parse_args()
    tune_host_allocator()
    torch.set_num_threads(1)
    vss.config.register_resolvers()
    a.p = 0.5 if a.encoder == "mit_b1" else 0.8  # the official threshold (HyperCorreTopk2.threh)
    overrides = ["mode=train", "model=mrcfa", f"encoder={a.encoder}", f"stm.p={a.p}"]
    with initialize_config_dir(config_dir=str(vss.config.CONF_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=overrides)
    torch.manual_seed(0)
    ours = train_step(cfg, torch.device("cpu"))
    model, optimizer, official_loss = official_step(a.encoder, 124)
    gen = torch.Generator().manual_seed(0)
    clips = torch.randn(a.batch, 4, 3, a.height, a.width, generator=gen)
    labels = torch.randint(0, 124, (a.batch, 4, a.height, a.width), generator=gen)

    def official() -> None:
        official_loss(clips, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run(fn: object) -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        fn()  # type: ignore[operator]
        return 1e3 * (time.perf_counter() - w0), 1e3 * (time.process_time() - c0)

    sides = {"ours": lambda: ours(clips, labels, "32-true", torch.device("cpu")), "official": official}
    for fn in sides.values():
        fn()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
    load = os.getloadavg()[0]
    for r in range(a.rounds):
        for name, fn in sides.items():
            times[name].append(run(fn))
            print(
                f"round {r + 1} {name}: wall {times[name][-1][0]:.0f} ms, cpu {times[name][-1][1]:.0f} ms", flush=True
            )
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in times.items()}
    print(
        f"MRCFA {a.encoder} p={a.p}, {a.batch} clips of 4 frames at {a.height}x{a.width}, 1 thread, {a.rounds} rounds, "
        f"load_1m {load:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    print("| side | wall ms | CPU ms |\n|---|---|---|")
    for k, (w, c) in med.items():
        print(f"| {k} | {w:.0f} | {c:.0f} |")
    print(f"official / ours (CPU): {med['official'][1] / med['ours'][1]:.2f}")


if __name__ == "__main__":
    main()
