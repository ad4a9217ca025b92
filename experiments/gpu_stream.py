"""Issue 25's GPU measurement in one run (about 5 minutes on an H100/H200): MRCFA-B1 (p=0.5) and SegFormer-B1,
batch 1, 480x864, random weights and frames (no downloads), through ``vss.bench``'s step path:

    eager -> graph (CUDA graph) -> + tf32 -> + ids_first -> + bf16        (ms/frame, fps, p95, agreement)
    8 streams batched, eager and graph + tf32 + ids_first                  (total fps, per-stream latency)

then the CUDA-graph parity test (tests/test_cuda_graph.py: replay == eager within 1e-4 fp32), and a table with the
card's name and the MRCFA/SegFormer time ratio of each row.

    python experiments/gpu_stream.py             # on a GPU machine
    python experiments/gpu_stream.py --dry-run   # the CPU rehearsal: every code path but the capture (graph=dry),
                                                 # tf32 rows skipped (CUDA only), 64x128, 4 frames
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vss import bench  # noqa: E402
from vss.config import CONF_DIR, register_resolvers  # noqa: E402
from vss.models.segmenter import Segmenter  # noqa: E402

MODELS = {"MRCFA-B1 p=0.5": ["model=mrcfa", "encoder=mit_b1", "stm.p=0.5"], "SegFormer-B1": ["encoder=mit_b1"]}
ROWS = {  # cumulative, in the order
    "eager": [],
    "graph": ["graph=G"],
    "+ tf32": ["graph=G", "tf32=true"],
    "+ ids_first": ["graph=G", "tf32=true", "ids_first=true"],
    "+ bf16": ["graph=G", "tf32=true", "ids_first=true", "dtype=bf16"],
    "8 streams eager": ["streams=8"],
    "8 streams graph+tf32+ids_first": ["streams=8", "graph=G", "tf32=true", "ids_first=true"],
}


def cfg_of(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("bench", overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal: graph=dry, no tf32, 64x128, 4 frames")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    register_resolvers()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("error: no CUDA device: run with --dry-run for the CPU rehearsal")
    size = ["height=64", "width=128", "frames=4", "warmup=1", "iters=1"] if dry else [
        "height=480", "width=864", f"frames={args.frames}", "warmup=1", "iters=3"]
    device_name = "cpu (dry run)" if dry else torch.cuda.get_device_name(0)
    common = [*size, "device=" + ("cpu" if dry else "cuda"), "mode=step", "progress=false"]
    print(f"[gpu_stream] {device_name}, torch {torch.__version__}, {' '.join(size)}", flush=True)

    tests = None
    if not args.skip_tests:  # the parity test first: a failing capture is the first thing to know
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_cuda_graph.py", "-p", "no:cacheprovider"]
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        tail = [x for x in proc.stdout.splitlines() if x.strip()][-8:]
        tests = f"rc {proc.returncode} ({time.perf_counter() - start:.0f} s): " + " / ".join(tail)
        print(f"[gpu_stream] parity test: {tests}", flush=True)

    table: dict[tuple[str, str], dict[str, float]] = {}
    for model_name, model_args in MODELS.items():
        cfg = cfg_of([*model_args, *common])
        device = bench.check_bench_config(cfg)
        torch.manual_seed(0)
        model = Segmenter(instantiate(cfg.encoder), instantiate(cfg.model), int(cfg.num_classes)).to(device).eval()
        for row, options in ROWS.items():
            opts = [o.replace("graph=G", "graph=" + ("dry" if dry else "true")) for o in options]
            if dry and "tf32=true" in opts:
                opts.remove("tf32=true")  # CUDA only: the rehearsal runs the row without it
            cfg = cfg_of([*model_args, *common, *opts])
            bench.check_bench_config(cfg)
            start = time.perf_counter()
            with torch.inference_mode():
                figures = bench.step_path(cfg, device, model, bench.Progress("", enabled=False))
            table[(model_name, row)] = figures
            shown = " | ".join(f"{k} {v:.2f}" for k, v in figures.items())
            print(f"[gpu_stream] {model_name} [{row}] {' '.join(opts)}: {shown} ({time.perf_counter() - start:.0f} s)")
            sys.stdout.flush()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n## Step path, {device_name}, batch 1, {size[0][7:]}x{size[1][6:]}, random weights" + (
        " (DRY RUN: no capture, no tf32; CPU times mean nothing)" if dry else ""))
    print("| row | MRCFA-B1 ms | fps | p95 ms | agree % | SegFormer-B1 ms | fps | agree % | MRCFA/SegFormer |")
    print("|---|---|---|---|---|---|---|---|---|")
    mrcfa, segformer = MODELS
    for row in ROWS:
        a, b = table[(mrcfa, row)], table[(segformer, row)]
        if "streams" in a:
            print(
                f"| {row} | {a['streams_latency_mean_ms']:.2f} (p95 {a['streams_latency_p95_ms']:.2f}) | total "
                f"{a['streams_total_fps']:.0f} | | | {b['streams_latency_mean_ms']:.2f} | total "
                f"{b['streams_total_fps']:.0f} | | {a['streams_latency_mean_ms'] / b['streams_latency_mean_ms']:.2f} |"
            )
            continue
        agree = [f"{x['agreement_pct']:.2f}" if "agreement_pct" in x else "(ref)" for x in (a, b)]
        print(
            f"| {row} | {a['step_ms_per_frame']:.2f} | {a['step_fps']:.0f} | {a['step_p95_ms']:.2f} | {agree[0]} | "
            f"{b['step_ms_per_frame']:.2f} | {b['step_fps']:.0f} | {agree[1]} | "
            f"{a['step_ms_per_frame'] / b['step_ms_per_frame']:.2f} |"
        )
    if tests is not None:
        print(f"\nCUDA-graph parity test (tests/test_cuda_graph.py): {tests}")


if __name__ == "__main__":
    main()
