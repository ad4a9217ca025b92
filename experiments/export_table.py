"""Which model exports to which format (issue 24): every ``conf/model/*.yaml`` at the test battery's tiny size
(tests/battery.py: its encoder, tiny widths and declared overrides), random weights, through ``vss.export``
``format=onnx``, ``format=pt2`` and ``format=folder`` (in-process); a markdown table of yes (parity figure) / no
(the one-line reason).

Usage::

    python experiments/export_table.py [--side 64] [--models segformer mrcfa ...] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    import battery
    from conftest import TINY_DATA, compose_train
    from random_weights import randomize_
    from test_export import compose_export
    from vss.errors import ConfigError
    from vss.export import export
    from vss.lit import build_module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=battery.MODELS)
    parser.add_argument("--formats", nargs="+", default=["onnx", "pt2", "folder"])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="export-table-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        over = battery.overrides(name)
        cfg = compose_train([*TINY_DATA, *over, f"data.scale=[{args.side},{args.side}]", f"paths.output_dir={work}"])
        GlobalHydra.instance().clear()
        with open_dict(cfg):
            del cfg["hydra"]
        module = build_module(cfg, cfg.data.num_classes, list(cfg.data.class_names))
        randomize_(module.segmenter, seed=1)
        ckpt = work / f"{name}.ckpt"
        config = OmegaConf.to_container(cfg, resolve=True)
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": config}}, ckpt)
        cells = []
        for fmt in args.formats:
            size = [] if fmt == "folder" else [f"height={args.side}", f"width={args.side}"]
            start = time.perf_counter()
            try:
                spec = export(
                    compose_export(f"ckpt_path={ckpt}", f"format={fmt}", *size, f"output={work / name / fmt}")
                )
                check = spec.get("check")
                cell = f"yes (max diff {check['max_abs_diff']:.1g})" if check else "yes"
            except ConfigError as e:
                cell = f"no: {e}"
            cells.append(cell)
            print(f"{name} {fmt}: {cell} ({time.perf_counter() - start:.0f} s)", flush=True)
        rows.append((name, " ".join(over), *cells))
    print()
    print("| model | tiny config | " + " | ".join(args.formats) + " |")
    print("|---|---|" + "---|" * len(args.formats))
    for row in rows:
        print("| " + " | ".join(f"`{row[1]}`" if i == 1 else str(c) for i, c in enumerate(row)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
