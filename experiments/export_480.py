"""``vss.export`` at 480x864 (VSPW's prepared size) of random-initialised full-size models (issue 24).

Writes a checkpoint per model (VSPW's 124 classes and evaluation transform, random weights: no download), then
runs ``python -m vss.export ckpt_path=... format=onnx|pt2 height=480 width=864`` on each and prints what the
exporter printed (the parity line and the size) and the wall time.

Usage::

    python experiments/export_480.py [--models segformer_b1 mrcfa_b1 msaf_r18] [--formats onnx pt2] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DATA = ["data=vspw", "data.root=/nonexistent"]  # the class table and transform; nothing is read
MODELS = {
    "segformer_b1": ["model=segformer", "encoder=mit_b1"],
    "mrcfa_b1": ["model=mrcfa", "encoder=mit_b1", "stm.p=0.5"],
    "msaf_r18": ["model=msaf", "encoder=resnet18"],
    "stf_r18": ["model=stf", "encoder=resnet18"],
}


def write_checkpoint(name: str, overrides: list[str], path: Path) -> None:
    """A random-initialised checkpoint in the vss.train layout (``state_dict`` + the config)."""
    from conftest import compose_train
    from vss.lit import build_module

    cfg = compose_train([*DATA, *overrides, f"paths.output_dir={path.parent}"])
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        del cfg["hydra"]
    torch.manual_seed(0)
    names = cfg.data.get("class_names")
    module = build_module(cfg, cfg.data.num_classes, list(names) if names else None)
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": config}}, path)
    params = sum(p.numel() for p in module.segmenter.parameters()) / 1e6
    print(f"{name}: {' '.join(overrides)}: {params:.2f} M parameters -> {path}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["segformer_b1", "mrcfa_b1", "msaf_r18"], choices=MODELS)
    parser.add_argument("--formats", nargs="+", default=["onnx", "pt2"])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=864)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="export480-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline"}
    failed = 0
    for name in args.models:
        ckpt = work / f"{name}.ckpt"
        if not ckpt.exists():
            write_checkpoint(name, MODELS[name], ckpt)
        for fmt in args.formats:
            cmd = [
                "vss.export", f"ckpt_path={ckpt}", f"format={fmt}", f"height={args.height}", f"width={args.width}",
                f"output={work / name / fmt}", "overwrite=true", "hydra.run.dir=" + tempfile.mkdtemp(),
            ]  # fmt: skip
            print("$ python -m", " ".join(cmd[:-1]), flush=True)
            t0 = time.perf_counter()
            ran = subprocess.run([sys.executable, "-m", *cmd], env=env, capture_output=True, text=True)
            took = time.perf_counter() - t0
            lines = [ln for ln in (ran.stdout + ran.stderr).splitlines() if ln.startswith(("[vss.export]", "error"))]
            print("\n".join(lines) or (ran.stdout + ran.stderr)[-3000:])
            print(f"  exit {ran.returncode}, {took:.0f} s", flush=True)
            failed += ran.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
