"""Benchmarks: ``python -m vss.bench`` prints parameter counts and forward time per target frame.

Two inference paths are timed: the clip path (every frame of a clip encoded for every target, as the
official MRCFA/CFFM test code) and the streaming path (each new frame encoded once, references taken
from a cache of per-frame features, then ``aggregate``). Time is wall clock after ``warmup`` calls,
with ``torch.cuda.synchronize`` around each call on GPU; fp32, no_grad, random weights (as the papers'
``tools/benchmark.py``). Peak memory is ``torch.cuda.max_memory_allocated`` in MiB (GPU only).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vss.config import CONF_DIR, friendly_errors, register_resolvers, resolve_device

register_resolvers()

BENCH_KEYS = {"model", "encoder", "height", "width", "batch_size", "warmup", "iters", "device", "clip_frames"}


def count_parameters(module: torch.nn.Module) -> int:
    """Trainable parameters, as the papers' ``count_parameters``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _time(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Mean seconds per call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def clip_frames(cfg: DictConfig) -> int:
    """``clip_frames``, else 1 + the reference offsets a model config sets (``data.clip.offsets``), else 4."""
    if cfg.get("clip_frames") is not None:
        return int(cfg.clip_frames)
    offsets = OmegaConf.select(cfg, "data.clip.offsets")
    return 4 if offsets is None else 1 + len(offsets)


@torch.no_grad()
def bench(cfg: DictConfig) -> dict[str, float]:
    """Parameter counts and per-frame forward times of the configured encoder + model."""
    from vss.models.segmenter import Segmenter

    device = resolve_device(cfg.device)
    model = Segmenter(instantiate(cfg.encoder), instantiate(cfg.model), int(cfg.num_classes)).to(device).eval()
    b, t = int(cfg.batch_size), clip_frames(cfg)
    clip = torch.randn(b, t, 3, int(cfg.height), int(cfg.width), device=device)
    refs = [model.encode(clip[:, i]) for i in range(t - 1)] if model.uses_references else []

    def streaming() -> None:
        model.aggregate(model.encode(clip[:, -1]), refs)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = {
        "params_total_M": count_parameters(model) / 1e6,
        "params_encoder_M": count_parameters(model.encoder) / 1e6,
        "params_aggregator_M": count_parameters(model.aggregator) / 1e6,
        "clip_ms_per_frame": 1e3 * _time(lambda: model(clip), device, int(cfg.warmup), int(cfg.iters)) / b,
        "streaming_ms_per_frame": 1e3 * _time(streaming, device, int(cfg.warmup), int(cfg.iters)) / b,
    }
    if device.type == "cuda":
        result["peak_memory_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
@friendly_errors
def main(cfg: DictConfig) -> None:
    """Print one table row per run."""
    r = bench(cfg)
    name = f"{cfg.model._target_.rsplit('.', 1)[-1]} {cfg.encoder.name}"
    keys = {o: o.lstrip("+~").split("=")[0] for o in HydraConfig.get().overrides.task}
    variant = [o for o, k in keys.items() if k not in BENCH_KEYS and not k.startswith(("hydra.", "paths."))]
    if variant:  # e.g. `+msaf_table3=baseline` or `stm.p=0.3`: rows of one sweep stay apart
        name += f" [{' '.join(variant)}]"
    device = "cuda" if torch.cuda.is_available() and cfg.device == "auto" else cfg.device
    where = f"{cfg.height}x{cfg.width}, clip {clip_frames(cfg)}, {device}"
    print(f"[vss.bench] {name} ({where}): " + " | ".join(f"{k} {v:.2f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
