"""Issue 25's GPU measurement: MRCFA-B1 (p=0.5) and SegFormer-B1, batch 1, 480x864, random weights and frames
(no downloads), through ``vss.bench``'s step path:

    eager -> graph (CUDA graph) -> + tf32 -> + ids_first -> + bf16        (ms/frame, fps, p95, agreement)
    8 streams batched, eager and graph + tf32 + ids_first                  (total fps, per-stream latency)

then the CUDA-graph parity test (tests/test_cuda_graph.py: replay == eager within 1e-4 fp32), and a table with the
card's name and the MRCFA/SegFormer time ratio of each row. Last, the accuracy of each mode on a short synthetic
run (the issue's "mIoU/mVC within 0.1 point"): MRCFA-B1 trained ``--steps`` steps on the embedded synthetic set
(``vss.train trainer=gpu``), its val videos through ``vss.predict`` in each mode (eager fp32, graph, + tf32,
+ ids_first, + bf16), each scored by ``vss.eval pred_root=``: mIoU, mVC8, mVC16 and the share of pixels equal
to eager fp32.

    python experiments/gpu_stream.py             # on a GPU machine (~5 min, and ~5 more for the accuracy run)
    python experiments/gpu_stream.py --skip-accuracy; python experiments/gpu_stream.py --only-accuracy
                                                 # the same as two commands (the device tool's 10-minute limit)
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


def cfg_of(overrides: list[str], name: str = "bench"):
    """``conf/<name>.yaml`` composed in-process."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal: graph=dry, no tf32, 64x128, 4 frames")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the accuracy run (dry run: 2)")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "gpu_stream", help="the accuracy run's files")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--only-accuracy", action="store_true", help="the accuracy run alone (a second command)")
    args = parser.parse_args()
    register_resolvers()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("error: no CUDA device: run with --dry-run for the CPU rehearsal")
    size = (
        ["height=64", "width=128", "frames=4", "warmup=1", "iters=1"]
        if dry
        else ["height=480", "width=864", f"frames={args.frames}", "warmup=1", "iters=3"]
    )
    device_name = "cpu (dry run)" if dry else torch.cuda.get_device_name(0)
    if args.only_accuracy:
        synthetic_accuracy(dry, args.work, 2 if dry else args.steps, device_name)
        return
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

    print(
        f"\n## Step path, {device_name}, batch 1, {size[0][7:]}x{size[1][6:]}, random weights"
        + (" (DRY RUN: no capture, no tf32; CPU times mean nothing)" if dry else "")
    )
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
    if not args.skip_accuracy:
        synthetic_accuracy(dry, args.work, 2 if dry else args.steps, device_name)


ACCURACY = {  # vss.predict options of each accuracy row, cumulative as ROWS
    "eager fp32": [],
    "graph": ["graph=G"],
    "+ tf32": ["graph=G", "tf32=true"],
    "+ ids_first": ["graph=G", "tf32=true", "ids_first=true"],
    "+ bf16": ["graph=G", "tf32=true", "ids_first=true", "dtype=bf16"],
}


def synthetic_accuracy(dry: bool, work: Path, steps: int, device_name: str) -> None:
    """MRCFA-B1 trained ``steps`` steps on the synthetic set, its val videos predicted in each mode, each scored."""
    import json
    import shutil

    import numpy as np

    from vss.metrics import read_prediction
    from vss.predict import predict

    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("WANDB_MODE", "offline")
    data, run = work / "data", work / "train"
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    train = [
        sys.executable,
        "-m",
        "vss.train",
        "model=mrcfa",
        "encoder=mit_b1",
        "stm.p=0.5",
        f"paths.data_dir={data}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"hydra.run.dir={run}",
        "trainer=" + ("cpu" if dry else "gpu"),
    ]
    subprocess.run(train, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    root = next(data.glob("synthetic-*"))
    videos = (root / "val.txt").read_text().split()
    print(
        f"\n[gpu_stream] accuracy run: {steps} training steps ({time.perf_counter() - start:.0f} s), "
        f"{len(videos)} val videos",
        flush=True,
    )
    rows: dict[str, dict[str, float]] = {}
    reference: dict[str, np.ndarray] = {}
    for name, options in ACCURACY.items():
        opts = [o.replace("graph=G", "graph=" + ("dry" if dry else "true")) for o in options]
        if dry and "tf32=true" in opts:
            opts.remove("tf32=true")
        preds = work / "pred" / name.replace(" ", "_").replace("+", "p")
        masks: dict[str, np.ndarray] = {}
        for video in videos:
            out = work / "predict" / preds.name / video
            cfg = cfg_of(
                [
                    f"ckpt_path={ckpt}",
                    f"source={root / 'data' / video / 'origin'}",
                    f"output={out}",
                    "save_overlay=false",
                    "progress=false",
                    "device=" + ("cpu" if dry else "cuda"),
                    *opts,
                ],
                "predict",
            )
            predict(cfg)
            (preds / video).parent.mkdir(parents=True, exist_ok=True)
            (preds / video).symlink_to(out / "masks", target_is_directory=True)
            for mask in sorted((out / "masks").glob("*.png")):
                masks[f"{video}/{mask.name}"] = read_prediction(mask)
        scored = work / "eval" / preds.name
        score = [
            sys.executable,
            "-m",
            "vss.eval",
            f"pred_root={preds}",
            "data=synthetic",
            f"paths.data_dir={data}",
            f"hydra.run.dir={scored}",
            "progress=false",
        ]
        subprocess.run(score, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        metrics = json.loads((scored / "metrics.json").read_text())
        reference = reference or masks
        equal = sum(int((masks[k] == reference[k]).sum()) for k in reference)
        total = sum(v.size for v in reference.values())
        rows[name] = {k: float(metrics[k]) for k in ("mIoU", "mVC8", "mVC16") if k in metrics}
        rows[name]["equal_pct"] = 100 * equal / total
        print(
            f"[gpu_stream] accuracy [{name}] {' '.join(opts)}: "
            + " | ".join(f"{k} {v:.4f}" for k, v in rows[name].items()),
            flush=True,
        )
    print(
        f"\n## Accuracy of each mode, {device_name}: MRCFA-B1 p=0.5 after {steps} synthetic training steps, "
        f"{len(videos)} val videos" + (" (DRY RUN: graph uncaptured, no tf32)" if dry else "")
    )
    print("| mode | mIoU | mVC8 | mVC16 | pixels equal to eager fp32 % | mIoU / mVC8 / mVC16 - eager (points) |")
    print("|---|---|---|---|---|---|")
    base = rows["eager fp32"]
    for name, r in rows.items():
        keys = [k for k in ("mIoU", "mVC8", "mVC16") if k in r and k in base]
        cells = " | ".join(f"{r[k]:.4f}" if k in r else "n/a" for k in ("mIoU", "mVC8", "mVC16"))
        deltas = " / ".join(f"{100 * (r[k] - base[k]):+.2f}" for k in keys)
        print(f"| {name} | {cells} | {r['equal_pct']:.2f} | {deltas} |")


if __name__ == "__main__":
    main()
