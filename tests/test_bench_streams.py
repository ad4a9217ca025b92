"""``vss.bench``'s step path: one stream and N streams batched (``streams=``), the CUDA-graph options (``graph=dry`` on
the CPU, ``ids_first``, ``dtype=bf16``: they run and report their agreement), and the checks of their values."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from conftest import bench_numbers
from vss import bench
from vss.errors import ConfigError

TINY = ("height=64", "width=64", "frames=4", "iters=1", "warmup=0", "device=cpu", "progress=false")
MRCFA = ("model=mrcfa", "encoder=mit_b0", "model.embed_dim=32")
STEP_KEYS = ("step_ms_per_frame", "step_fps", "step_p95_ms")
STREAMS_KEYS = ("streams", "streams_total_fps", "streams_latency_mean_ms", "streams_latency_p95_ms")


def test_streams_2_prints_total_fps_and_latency_beside_one_stream(compose_bench: Callable[..., DictConfig]) -> None:
    line = bench.bench(compose_bench(*MRCFA, *TINY, "streams=2", "baseline=false")).line()
    assert line.startswith("[vss.bench] MRCFA mit_b0 (64x64, clip 4, lookahead 0, cpu): "), line
    numbers = bench_numbers(line)
    assert {*STEP_KEYS, *STREAMS_KEYS, "clip_fps", "stream_fps"} <= set(numbers), line
    assert numbers["streams"] == 2 and "agreement_pct" not in numbers  # eager fp32: the reference itself
    assert numbers["streams_latency_p95_ms"] >= numbers["streams_latency_mean_ms"] * 0.999 > 0
    assert numbers["streams_total_fps"] == pytest.approx(2e3 / numbers["streams_latency_mean_ms"], rel=1e-2)


def test_mode_step_with_the_graph_options_reports_agreement(compose_bench: Callable[..., DictConfig]) -> None:
    cfg = compose_bench(*MRCFA, *TINY, "mode=step", "graph=dry", "ids_first=true", "dtype=bf16", "streams=2")
    numbers = bench_numbers(bench.bench(cfg).line())
    assert {*STEP_KEYS, *STREAMS_KEYS, "agreement_pct"} <= set(numbers) and "clip_fps" not in numbers
    assert 50 < numbers["agreement_pct"] < 100  # bf16 + nearest ids: most pixels, not all (see test_cuda_graph)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("streams=0", r"^streams=0 is invalid: expected a positive integer$"),
        ("streams=-1", r"^streams=-1 is invalid: expected a positive integer$"),
        ("streams=abc", r"^streams='abc' is invalid: expected a positive integer$"),
        ("graph=maybe", r"^graph='maybe' is invalid: expected true, false or dry \(the static step"),
        ("dtype=fp16", r"^dtype='fp16' is invalid: expected one of \['fp32', 'bf16'\]$"),
        ("ids_first=2", r"^ids_first=2 is invalid: expected true or false$"),
        ("mode=serve", r"^mode='serve' is invalid: expected one of \['infer', 'train', 'step', 'backends'\]$"),
    ],
)
def test_step_path_options_are_checked(override: str, message: str, compose_bench: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigError, match=message):
        bench.check_bench_config(compose_bench(override))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_graph_and_tf32_need_cuda(compose_bench: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigError, match=r"^graph=true needs CUDA \(device=cpu\): CUDA graphs replay CUDA kernels"):
        bench.check_bench_config(compose_bench("graph=true", "device=cpu"))
    with pytest.raises(ConfigError, match=r"^tf32=true sets TF32 for CUDA matmuls and convolutions \(device=cpu\)"):
        bench.check_bench_config(compose_bench("tf32=true", "device=cpu"))


def test_bad_streams_on_the_command_line_is_one_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "vss.bench", "streams=0", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
    assert lines == ["error: streams=0 is invalid: expected a positive integer"], lines
