"""``vss.bench mode=train``: one optimizer step of the real module and optimizer, timed in parts; option checks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from omegaconf import DictConfig

from vss import bench
from vss.errors import ConfigError

TINY = ("mode=train", "height=32", "width=32", "batch=2", "iters=2", "warmup=1", "device=cpu", "progress=false")
MRCFA = ("model=mrcfa", "encoder=mit_b0", "model.embed_dim=16")
KEYS = (
    "params_total_M",
    "step_ms",
    "forward_ms",
    "backward_ms",
    "optimizer_ms",
    "step_cpu_ms",
    "clips_per_s",
    "peak_rss_MiB",
)


def test_train_bench_steps_the_real_optimizer_on_clips_and_reports_the_parts(
    compose_bench: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[tuple[str, tuple[int, ...], tuple[int, ...], int, list[float]]] = []
    call = bench.TrainStep.__call__

    def recording(self: bench.TrainStep, clips: torch.Tensor, labels: torch.Tensor, *args: object) -> float:
        before = [p.detach().clone() for g in self.optimizer.param_groups for p in g["params"]]
        out = call(self, clips, labels, *args)
        after = [p for g in self.optimizer.param_groups for p in g["params"]]
        assert all(p.grad is None for p in after)  # zero_grad(set_to_none) ran
        moved = sum(not torch.equal(a, b) for a, b in zip(after, before, strict=True)) / len(after)
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        steps.append((self.name, tuple(clips.shape), tuple(labels.shape), int(labels.max()), [moved, *lrs]))
        return out

    monkeypatch.setattr(bench.TrainStep, "__call__", recording)
    cfg = compose_bench(*MRCFA, *TINY)
    result = bench.bench(cfg)

    assert set(KEYS) <= set(result.figures) and all(result[k] > 0 for k in KEYS)
    assert result["step_ms"] == pytest.approx(result["forward_ms"] + result["backward_ms"] + result["optimizer_ms"])
    assert result["clips_per_s"] == pytest.approx(2e3 / result["step_ms"])
    assert result["ratio_to_baseline"] == pytest.approx(result["step_ms"] / result["baseline_step_ms"])
    assert result.line().startswith("[vss.bench] MRCFA mit_b0 (train, 32x32, batch 2, clip 4, 32-true, cpu): ")
    # 3 rounds (1 warm-up + 2), each the model's step (4-frame clips) then its baseline's (the target alone)
    names = [s[0] for s in steps]
    assert names == ["MRCFA", "SegFormer (baseline)"] * 3
    assert {s[1:3] for s in steps[::2]} == {((2, 4, 3, 32, 32), (2, 4, 32, 32))}
    assert {s[1:3] for s in steps[1::2]} == {((2, 1, 3, 32, 32), (2, 1, 32, 32))}
    assert all(0 <= s[3] < 124 for s in steps)
    # the official parameter groups (aggregator lr x10) of vss.train's AdamW; the step moves the weights
    lr = float(cfg.optim.optimizer.lr)
    assert sorted(set(steps[0][4][1:])) == pytest.approx([lr, 10 * lr])
    assert all(s[4][0] > 0.9 for s in steps)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("mode=fit", "mode='fit' is invalid: expected one of ['infer', 'train', 'step', 'backends']"),
        ("precision=bf16", "precision='bf16' is invalid: expected one of"),
        ("precision=16-mixed", "precision=16-mixed needs a GPU"),
        ("compile=yes", "compile='yes' is invalid: expected true or false"),
    ],
)
def test_train_bench_bad_options_are_one_line(
    override: str, message: str, compose_bench: Callable[..., DictConfig]
) -> None:
    with pytest.raises(ConfigError) as info:
        bench.bench(compose_bench(*MRCFA, *TINY, override))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_compile_and_channels_last_are_train_options(compose_bench: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigError, match=r"^compile=true is a mode=train option"):
        bench.bench(compose_bench(*MRCFA, "device=cpu", "compile=true"))


def test_train_bench_bf16_and_channels_last_run(compose_bench: Callable[..., DictConfig]) -> None:
    overrides = ("model=msaf", "encoder=resnet18", "model.embed_dim=16", "model.num_heads=2", *TINY)
    result = bench.bench(compose_bench(*overrides, "precision=bf16-mixed", "channels_last=true", "iters=1"))
    assert result.line().startswith("[vss.bench] MSAF resnet18 (train, 32x32, batch 2, clip 3, bf16-mixed, cpu): ")
    assert set(KEYS) <= set(result.figures)
