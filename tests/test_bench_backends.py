"""``vss.bench mode=backends``: the Streamer, the eager step and the step exported to ONNX timed on one video in
interleaved rounds (every frame predicted by each, the ratios to the first backend), and its bad values."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from omegaconf import DictConfig

from conftest import bench_numbers
from vss import bench
from vss.errors import ConfigError

TINY = ("height=32", "width=32", "frames=5", "iters=2", "warmup=0", "device=cpu", "progress=false")
LOOKAHEAD = ("model=mrcfa", "encoder=mit_b0", "model.embed_dim=16", "model.offsets=[-2,1]", "model.start=clamp")


def test_streamer_step_and_onnx_are_timed_with_ratios_to_the_first(compose_bench: Callable[..., DictConfig]) -> None:
    pytest.importorskip("onnxruntime", reason="pip install -e '.[export]'")
    cfg = compose_bench(*LOOKAHEAD, *TINY, "mode=backends", "backends=[streamer,step,onnx]")
    result = bench.bench(cfg)  # a backend that loses a frame (the lookahead's flush) raises
    line = result.line()
    assert line.startswith("[vss.bench] MRCFA mit_b0 (32x32, clip 3, lookahead 1, cpu): "), line
    n = bench_numbers(line)
    for name in ("streamer", "step", "onnx"):
        assert n[f"{name}_ms_per_frame"] > 0 and n[f"{name}_cpu_ms_per_frame"] > 0, line
    for name in ("step", "onnx"):
        ratio = result[f"{name}_ms_per_frame"] / result["streamer_ms_per_frame"]
        assert result[f"{name}_ratio"] == pytest.approx(ratio)
    assert "streamer_ratio" not in n and "load_1m" in n and "clip_fps" not in n


def test_the_first_backend_is_the_reference(compose_bench: Callable[..., DictConfig]) -> None:
    result = bench.bench(compose_bench(*LOOKAHEAD, *TINY, "mode=backends", "backends=[step,streamer]"))
    assert "step_ratio" not in result.figures
    assert result["streamer_ratio"] == pytest.approx(result["streamer_ms_per_frame"] / result["step_ms_per_frame"])


@pytest.mark.parametrize(
    ("backends", "message"),
    [
        ("[streamer]", r"backends=\['streamer'\] is invalid: expected a list of two or more of"),
        ("[streamer,tensorrt]", r"'tensorrt' is invalid: expected each of \['streamer', 'step', 'onnx'\] once"),
        ("[step,step]", r"'step' is invalid: expected each of"),
    ],
)
def test_bad_backends_are_one_line(compose_bench: Callable[..., DictConfig], backends: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        bench.bench(compose_bench(*LOOKAHEAD, *TINY, "mode=backends", f"backends={backends}"))
