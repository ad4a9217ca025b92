"""``vss.bench``: both paths in-process on tiny models (the clip path, the real Streamer over a video), option
checks, and the CLI line."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

import battery
from vss import bench
from vss.errors import ConfigError
from vss.models.aggregators.mrcfa import MRCFA
from vss.models.aggregators.msaf import MSAF
from vss.models.aggregators.segformer import SegFormer
from vss.models.encoders import build_encoder
from vss.models.segmenter import Segmenter
from vss.models.streamer import Streamer

TINY = ("height=64", "width=64", "frames=6", "iters=1", "warmup=0", "device=cpu", "batch_size=1")
KEYS = (
    "params_total_M",
    "params_encoder_M",
    "params_aggregator_M",
    "clip_ms_per_frame",
    "clip_fps",
    "stream_ms_per_frame",
    "stream_fps",
    "encoder_pct",
    "aggregator_pct",
    "bookkeeping_pct",
    "gflops_per_frame",
    "aggregator_gflops_pct",
    "peak_rss_MiB",
    "load_1m",
)
BASELINE_KEYS = ("baseline_ms_per_frame", "ratio_to_baseline", "baseline_gflops_per_frame", "flop_ratio")


@pytest.mark.parametrize("name", battery.MODELS)
def test_bench_times_both_paths_through_the_streamer(
    name: str, compose_bench: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every model config at the battery's test size (tests/battery.py)."""
    cfg = compose_bench(*battery.overrides(name), *TINY)
    offsets = list(cfg.model.offsets)
    clip, lookahead, span = 1 + len(offsets), max((0, *offsets)), max(0, -min(offsets, default=0))
    predicted: list[tuple[int, int]] = []  # (references the model reads, index) of every prediction returned
    pushes: list[int] = []
    push, end = Streamer.push, Streamer.end

    def counting_push(self: Streamer, frames: torch.Tensor, items: object = None) -> list:
        pushes.append(len(frames))
        out = push(self, frames, items)
        predicted.extend((len(self.model.offsets), o.index) for o in out)
        return out

    def counting_end(self: Streamer) -> list:
        out = end(self)
        predicted.extend((len(self.model.offsets), o.index) for o in out)
        return out

    monkeypatch.setattr(Streamer, "push", counting_push)
    monkeypatch.setattr(Streamer, "end", counting_end)
    result = bench.bench(cfg)

    assert set(KEYS) <= set(result.figures)
    assert all(result[k] > 0 for k in KEYS if not k.endswith("_pct"))
    assert (result.clip, result.lookahead, result.height, result.width, result.device) == (
        clip,
        lookahead,
        64,
        64,
        "cpu",
    )
    assert result["stream_fps"] == pytest.approx(1e3 / result["stream_ms_per_frame"])
    assert result["encoder_pct"] + result["aggregator_pct"] + result["bookkeeping_pct"] == pytest.approx(100)
    assert result["encoder_pct"] > 0 and result["aggregator_pct"] > 0
    assert 0 < result["aggregator_gflops_pct"] < 100
    # warmup=0, iters=1: the timed video of the model then its baseline's (single-frame, no references), the
    # instrumented one, 6 frames each, pushed one at a time; then the FLOP-counted videos of 2 + span + lookahead
    # frames (at most 6) and 2 frames (the baseline)
    refs, has_baseline = clip - 1, bench.baseline_of(cfg) is not None
    video = lambda k, n: [(k, i) for i in range(n)]  # noqa: E731
    flop_frames = min(6, 2 + span + lookahead)
    expected = video(refs, 6) + (video(0, 6) if has_baseline else []) + video(refs, 6) + video(refs, flop_frames)
    assert predicted == expected + (video(0, 2) if has_baseline else [])
    assert set(pushes) == {1}
    if has_baseline:
        assert set(BASELINE_KEYS) <= set(result.figures)
        assert result["ratio_to_baseline"] == pytest.approx(
            result["stream_ms_per_frame"] / result["baseline_ms_per_frame"]
        )
        assert result["flop_ratio"] >= 1  # at least its baseline's work (elementwise fusion is not counted)
    else:
        assert not set(BASELINE_KEYS) & set(result.figures)

    model = Segmenter(instantiate(cfg.encoder), instantiate(cfg.model), cfg.num_classes)
    assert result["params_total_M"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert result["params_encoder_M"] == pytest.approx(sum(p.numel() for p in model.encoder.parameters()) / 1e6)
    assert result["params_aggregator_M"] == pytest.approx(sum(p.numel() for p in model.aggregator.parameters()) / 1e6)
    assert result.clip == 1 + len(model.offsets)


def test_bench_warms_up_on_short_videos_and_pushes_stream_batches(
    compose_bench: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    lengths: list[int] = []
    stream_video = bench.stream_video

    def recording(model: torch.nn.Module, video: torch.Tensor, batch_size: int) -> int:
        lengths.append(len(video))
        assert batch_size == 4
        return stream_video(model, video, batch_size)

    monkeypatch.setattr(bench, "stream_video", recording)
    mrcfa = battery.overrides("mrcfa", "mit_b0")
    overrides = (*mrcfa, *TINY, "frames=12", "warmup=2", "iters=2", "stream_batch_size=4")
    bench.bench(compose_bench(*overrides))
    # warm-up: 1 + 9 (MRCFA reads t-9) frames, the baseline's 4 (a push); then 2 timed videos of each model in turn
    # and the instrumented one, 12 frames each
    assert lengths == [10, 10, 4, 4, 12, 12, 12, 12, 12]


def test_bench_progress_is_a_counted_line_per_step_on_stderr(
    compose_bench: Callable[..., DictConfig], capsys: pytest.CaptureFixture
) -> None:
    """A slow bench (the README's MRCFA-B1 at 480x864 on CPU) says what it is doing; stdout keeps the row only."""
    overrides = (*battery.overrides("mrcfa", "mit_b0"), *TINY, "warmup=1", "iters=2")
    result = bench.bench(compose_bench(*overrides))
    out, err = capsys.readouterr()
    assert out == "" and result.line().startswith("[vss.bench] MRCFA mit_b0 (64x64, clip 4, lookahead 0, cpu): ")
    head = "[vss.bench] progress MRCFA mit_b0: "
    lines = err.splitlines()
    assert all(x.startswith(head) and re.search(r" \(\d+ s so far\)$", x) for x in lines), err
    assert lines[0].startswith(head + "64x64 on cpu: 1 warm-up + 2 timed clip forward(s); per model (MRCFA, SegFormer")
    steps = [re.match(rf"{re.escape(head)}(.*): [\d.]+ s \(", x)[1] for x in lines[1:]]  # type: ignore[index]
    model, base = "MRCFA, 6 frames", "SegFormer (baseline), 6 frames"
    assert steps == [
        "clip forward 1/3 (warm-up)",
        "clip forward 2/3",
        "clip forward 3/3",
        "streaming warm-up 1/1 (MRCFA, 6 frames)",
        "streaming warm-up 1/1 (SegFormer (baseline), 1 frames)",
        f"streaming video 1/4 ({model})",
        f"streaming video 2/4 ({base})",
        f"streaming video 3/4 ({model})",
        f"streaming video 4/4 ({base})",
        f"instrumented video 1/1 ({model})",
        "FLOPs 1/2 (MRCFA)",
        "FLOPs 2/2 (SegFormer (baseline))",
    ]
    bench.bench(compose_bench(*overrides, "progress=false"))
    assert capsys.readouterr() == ("", "")
    with pytest.raises(ConfigError, match=r"progress='yes' is invalid: expected true or false"):
        bench.check_bench_config(compose_bench("progress=yes"))


def test_stream_video_predicts_every_frame_once() -> None:
    model = Segmenter(build_encoder("mit_b0"), partial(MRCFA, embed_dim=16, encoder_name="mit_b0"), 5).eval()
    with torch.no_grad():
        assert bench.stream_video(model, torch.randn(11, 3, 32, 32), 3) == 11


def test_timed_stages_restores_the_model(compose_bench: Callable[..., DictConfig]) -> None:
    model = Segmenter(build_encoder("mit_b0"), partial(SegFormer, embed_dim=16), 5).eval()
    with torch.no_grad(), bench.timed_stages(model, torch.device("cpu")) as spent:
        model(torch.randn(1, 1, 3, 32, 32))
    assert all(v > 0 for v in spent.values())
    assert {"forward", "encode", "aggregate"}.isdisjoint({*vars(model), *vars(model.encoder), *vars(model.aggregator)})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("frames=0", r"frames=0 is invalid: expected a positive integer"),
        ("stream_batch_size=-1", r"stream_batch_size=-1 is invalid"),
        ("iters=1.5", r"iters=1.5 is invalid"),
        ("warmup=-1", r"warmup=-1 is invalid: expected a non-negative integer"),
        ("height=0", r"height=0 is invalid"),
        ("device=tpu", r"device='tpu' is invalid: expected auto, cpu or cuda"),
    ],
)
def test_bench_options_are_checked(override: str, message: str, compose_bench: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigError, match=message):
        bench.check_bench_config(compose_bench(override))


def test_bench_cuda_without_a_gpu_is_a_config_error(
    compose_bench: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "instantiate", lambda *a, **k: pytest.fail("a model was built before the check"))
    with pytest.raises(ConfigError, match=r"device=cuda but torch.cuda.is_available\(\) is False"):
        bench.bench(compose_bench("device=cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_cli_cuda_without_a_gpu_exits_2_with_one_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "vss.bench", "device=cuda", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
    assert lines == ["error: device=cuda but torch.cuda.is_available() is False (no GPU): use device=cpu"], lines


def test_baseline_is_the_single_frame_model(compose_bench: Callable[..., DictConfig]) -> None:
    assert bench.baseline_of(compose_bench("model=segformer")) is None
    mrcfa = bench.baseline_of(compose_bench("model=mrcfa", "model.embed_dim=32"))
    assert mrcfa.func is SegFormer and mrcfa.keywords["embed_dim"] == 32
    msaf = bench.baseline_of(compose_bench("model=msaf", "encoder=resnet18"))
    agg = msaf(in_channels=[64, 128, 256, 512], num_classes=5)
    assert isinstance(agg, MSAF) and agg.offsets == () and not (agg.motion or agg.state or agg.semantics)
    with pytest.raises(ConfigError, match=r"baseline=2 is invalid"):
        bench.check_bench_config(compose_bench("baseline=2"))
    with pytest.raises(ConfigError, match=r"precision='fp8' is invalid"):
        bench.check_bench_config(compose_bench("precision=fp8"))


def test_variant_names_the_model_overrides_only() -> None:
    overrides = [
        "model=mrcfa",
        "encoder=mit_b1",
        "stm.p=0.5",
        "frames=12",
        "+experiment/msaf_table3=baseline",
        "hydra.run.dir=x",
    ]
    assert bench.variant(overrides) == "stm.p=0.5 +experiment/msaf_table3=baseline"


def test_bench_cli_prints_the_row(cli_env: dict[str, str], tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "vss.bench", "model=msaf", "encoder=resnet18", "+experiment/msaf_table3=baseline"]
    cmd += ["model.embed_dim=16", "model.num_heads=2", *TINY, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("[vss.bench]")]  # the row alone on stdout
    progress = [x for x in proc.stderr.splitlines() if x.startswith("[vss.bench] progress MSAF resnet18: ")]
    assert any(": streaming video 2/2 (MSAF (baseline), 6 frames): " in x for x in progress), proc.stderr[-3000:]
    head = "[vss.bench] MSAF resnet18 [+experiment/msaf_table3=baseline model.embed_dim=16 model.num_heads=2] "
    assert line.startswith(head + "(64x64, clip 1, lookahead 0, cpu): params_total_M ")
    numbers = dict(re.findall(r"(\w+) ([\d.]+)", line.split(": ", 1)[1]))
    assert set(KEYS) <= set(numbers)
    baseline = partial(MSAF, motion=False, offsets=(), state=False, semantics=False, embed_dim=16, num_heads=2)
    model = Segmenter(build_encoder("resnet18"), baseline, 124)
    assert float(numbers["params_total_M"]) == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6, abs=0.01)
