"""Benchmarks: ``python -m vss.bench`` prints parameter counts and the time per target frame of two paths.

One command gives a speed claim: the model's streaming time, FLOPs and memory beside its single-frame
baseline's, timed in the same process with interleaved repeats (model video, baseline video, model video, ...)
and medians, with the load average printed (on a shared machine a ratio of interleaved medians is the figure to
trust, not an absolute time).

**Clip path** (``clip_*``): one ``model(clip)`` per target, the clip (``batch_size``, T, 3, H, W) holding
the references in ``model.offsets`` order and the target last, T = 1 + len(model.offsets) from the
instantiated model (the official MRCFA/CFFM test code: every frame of the clip is encoded again for
every target). Time per call / ``batch_size``, after ``warmup`` untimed calls, median of ``iters`` calls.

**Streaming path** (``stream_*``): a video of ``frames`` random frames (B = 1) pushed through the real
:class:`vss.models.streamer.Streamer`, ``stream_batch_size`` frames per ``push`` (1: frame by frame, as a
live camera), then ``end``. Each frame goes through ``encode`` (encoder + the aggregator's per-frame part)
exactly once; its :data:`FrameFeatures` are cached and reused as long as a later target reads them, and
``aggregate`` runs on the target's and the cached references' features, under the model's own
start-of-video policy (``model.references``). Warm-up: ``warmup`` short videos of
``min(frames, max(stream_batch_size, 1 + span + lookahead))`` frames (span = the farthest reference back),
enough to run every start-of-video case and the steady state once. Then ``iters`` whole videos are timed,
from the first ``push`` to the return of ``end``; ``stream_ms_per_frame`` = the median over the videos of their
time / ``frames``, and ``stream_fps`` = 1000 / it. The bench checks that every video yields exactly
``frames`` predictions, each frame once.

**Baseline** (``baseline=true``): the model's single-frame baseline (SegFormer with the same encoder and decoder
width for MRCFA and other MiT models; MSAF with every branch off, the FCN head, for MSAF; none for SegFormer
itself) streams the same video, its timed videos interleaved with the model's; ``baseline_ms_per_frame`` and
``ratio_to_baseline`` (model / baseline).

**FLOPs** (``gflops_per_frame``, ``aggregator_gflops_pct``; ``baseline_gflops_per_frame``, ``flop_ratio``):
``torch.utils.flop_counter.FlopCounterMode`` over the push of the last frame of a video of
``min(frames, 2 + span + lookahead)`` frames (the steady state when the video is long enough): the encoder's
part and the rest (the aggregator). Inference runs under ``inference_mode`` in eval mode, so outputs only the
training loss reads (MRCFA's auxiliary and per-frame logits, MSAF's pixel classifier) are not computed and
not counted.

**Memory**: ``peak_rss_MiB``, the process's peak resident set (``getrusage``; weights, both models and the
bench's buffers included) on every device; on GPU also the allocator peaks below. ``load_1m``: the 1-minute
load average at the end of the run.

**Precision** (``precision``): ``32-true`` (fp32) or ``bf16-mixed`` (``torch.autocast``), as
``trainer.precision``.

**Training** (``mode=train``): one optimizer step as ``vss.train`` takes it: the model and its optimizer over the
real parameter groups built by :func:`vss.lit.build_module` (``optim`` group, default ``adamw`` with the official
paramwise rule), :func:`vss.lit.training_loss` (forward + the model's loss terms) on ``batch`` random clips of
1 + len(offsets) frames at ``height`` x ``width`` with random labels in [0, num_classes), backward, optimizer step,
``zero_grad``. ``warmup`` untimed then ``iters`` timed rounds, each round one step of the model then one of its
single-frame baseline (``baseline=true``; on the target frame alone). Medians over the rounds: ``step_ms`` and its
parts ``forward_ms`` (forward + losses), ``backward_ms``, ``optimizer_ms`` (step + zero_grad); ``step_cpu_ms``
(the process's CPU time of a step, all threads: steadier than wall time on a loaded machine);
``ratio_to_baseline``, ``cpu_ratio_to_baseline``. Memory: ``peak_rss_MiB`` (the process) and on GPU
``peak_MiB`` (the model's step). Options: ``precision`` (autocast as Lightning's mixed precision; a GradScaler
for 16-mixed), ``compile=true`` (forward + losses through ``torch.compile``; AOTAutograd compiles the
backward), ``channels_last=true`` (model and frames).

Lookahead: a model with positive offsets (``lookahead`` L > 0) can only predict target t once frame t + L
has been pushed; the last L targets are predicted at ``end``. The whole video is timed, so those targets'
compute is in the figure, but the *wait* is not: the figure is throughput, and a live stream also delays
each prediction by L frame intervals of the camera (printed as ``lookahead L``; 0 for causal models).

**Shares** (``encoder_pct``, ``aggregator_pct``, ``bookkeeping_pct``): one more, separate, streaming video
with timers around ``model.encoder`` (the backbone), ``model.aggregator.encode`` (the aggregator's
per-frame part) and ``model.aggregate`` (temporal part); aggregator = the last two. Bookkeeping is the
remainder (the Streamer's cache, eviction, stacking, grouping and the loop). On GPU each timed call is
synchronised, so this pass is not the one that gives ``stream_ms_per_frame``.

**Progress** (``progress``, on by default): a ``[vss.bench] progress <Model> <encoder>: ...`` line on stderr
for the plan and after every forward and every streaming video, with its count (``streaming video 3/6``), its
time and the time so far; the result row alone goes to stdout (``2>&1 | grep '[vss.bench]'`` shows both).

**Step path** (``step_*``, ``streams_*``; ``mode=step`` runs it alone, ``mode=infer`` adds it when one of its
options is set): the fixed-shape :class:`vss.models.step.Step` and the class ids at frame size, one frame a call,
``warmup`` untimed then ``iters`` timed passes over the ``frames``-frame video; every call is timed until its ids
are ready: ``step_ms_per_frame`` (mean), ``step_fps``, ``step_p95_ms`` for one stream; with ``streams`` N > 1,
:class:`vss.models.streams.Streams` over N independent streams in one batch (stream b starts at frame b, so
their start-of-video positions differ): ``streams_total_fps`` (N frames a call), ``streams_latency_mean_ms`` and
``streams_latency_p95_ms`` (each stream's frame waits for the whole call). Options (``vss.models.ops.cuda_graph``):
``graph=true`` (CUDA: captured once in a CUDA graph, replayed per frame; ``graph=dry`` runs the same static step
uncaptured, any device), ``tf32=true`` (CUDA), ``ids_first=true`` (argmax before a nearest upsampling of the ids),
``dtype=bf16`` (weights and activations cast, no autocast). ``agreement_pct``: where an option changes the
arithmetic, the share of pixels whose class equals the eager fp32 step's (bilinear logits, no TF32) on the first
pass's frames.

**Backends** (``mode=backends``, ``backends=[streamer, step, onnx]``, two or more): the same random uint8 video of
``frames`` frames, one frame a call, the end of the video included, through each backend: ``streamer`` (the
:class:`~vss.models.streamer.Streamer`, as ``vss.predict backend=eager``), ``step`` (the eager
:class:`~vss.models.step.Step` and its flush), ``onnx`` (the step exported as ``vss.export format=onnx`` does, run
by ONNX Runtime's CPU provider as ``vss.predict backend=onnx``; CPU only). Logits only (no upsampling). ``warmup``
untimed then ``iters`` timed rounds, each round every backend in turn, the order rotated each round:
``<name>_ms_per_frame`` (median over rounds), ``<name>_cpu_ms_per_frame`` (process CPU time, all threads: steadier
on a loaded machine), ``<name>_ratio`` and ``<name>_cpu_ratio`` to the first backend; ``threads`` (torch's intra-op
threads), ``load_1m``.

Time is wall clock (``time.perf_counter``), with ``torch.cuda.synchronize`` on GPU before a timer stops;
fp32, no_grad, eval mode, random weights (as the papers' ``tools/benchmark.py``). Parameters are trainable
parameters in millions. On GPU, ``clip_peak_MiB`` / ``stream_peak_MiB`` are ``torch.cuda.max_memory_allocated``
during each path (weights included; the streaming figure leaves out the bench's buffer of the whole video
but the frames of one ``push``).
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vss.cli import check_command_line
from vss.config import CONF_DIR, register_resolvers
from vss.errors import ConfigError, friendly_errors
from vss.models.precision import PRECISIONS, inference_precision
from vss.runtime import tune_host_allocator
from vss.validation import _get, check_numeric_keys, check_optim_values, check_targets, resolve_device

register_resolvers()

BENCH_KEYS = {
    "mode",
    "batch",
    "compile",
    "channels_last",
    "optim",
    "model",
    "encoder",
    "height",
    "width",
    "batch_size",
    "warmup",
    "iters",
    "frames",
    "stream_batch_size",
    "device",
    "baseline",
    "precision",
    "progress",
    "streams",
    "graph",
    "tf32",
    "ids_first",
    "dtype",
    "backends",
}
"""Overrides that set the measurement, not the model; any other override names the row's variant."""
MODES = ("infer", "train", "step", "backends")
BACKENDS = ("streamer", "step", "onnx")
"""``mode=backends``: the :class:`~vss.models.streamer.Streamer`, the eager :class:`~vss.models.step.Step`, the
step exported to ONNX and run by ONNX Runtime (see :func:`bench_backends`)."""
POSITIVE = ("num_classes", "height", "width", "batch_size", "iters", "frames", "stream_batch_size", "streams")
GRAPHS = ("false", "true", "dry")


def count_parameters(module: torch.nn.Module) -> int:
    """Trainable parameters, as the papers' ``count_parameters``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@dataclass
class BenchResult:
    """One bench row: what was measured and the figures (``result[key]`` reads a figure)."""

    model: str
    encoder: str
    height: int
    width: int
    clip: int
    lookahead: int
    device: str
    figures: dict[str, float] = field(default_factory=dict)
    baseline: str = ""
    """Why no baseline was timed next to the model (``baseline=true``), or ""."""

    def __getitem__(self, key: str) -> float:
        return self.figures[key]

    @classmethod
    def of(
        cls, model: Any, cfg: DictConfig, height: int, width: int, device: torch.device, figures: dict, **rest: Any
    ) -> BenchResult:
        """The row of a :class:`Segmenter`: its method and encoder, clip length and lookahead; the machine's load
        (``load_1m``) closes the figures."""
        figures["load_1m"] = os.getloadavg()[0]
        return cls(
            model=type(model.aggregator).__name__,
            encoder=str(cfg.encoder.get("name", type(model.encoder).__name__)),
            height=height,
            width=width,
            clip=1 + len(model.offsets),
            lookahead=model.lookahead,
            device=device.type,
            figures=figures,
            **rest,
        )

    mode: str = "infer"
    batch: int = 1
    precision: str = "32-true"

    def line(self, variant: str = "") -> str:
        """``[vss.bench] <Model> <encoder> [variant] (HxW, clip T, lookahead L, device): key value | ...``; a training
        row: ``(train, HxW, batch B, clip T, precision, device)``."""
        name = f"{self.model} {self.encoder}" + (f" [{variant}]" if variant else "")
        where = f"{self.height}x{self.width}, clip {self.clip}, lookahead {self.lookahead}, {self.device}"
        if self.mode == "train":
            size, clips = f"{self.height}x{self.width}", f"batch {self.batch}, clip {self.clip}"
            where = f"train, {size}, {clips}, {self.precision}, {self.device}"
        figures = " | ".join(f"{k} {v:.2f}" for k, v in self.figures.items())
        return f"[vss.bench] {name} ({where}): {figures}" + (f" | baseline: {self.baseline}" if self.baseline else "")


def graph_mode(cfg: DictConfig) -> str:
    """``graph``: false, true or dry (a bool from the command line is its lower-case name)."""
    graph = _get(cfg, "graph")
    return str(graph).lower() if isinstance(graph, bool) else str(graph)


def check_bench_config(cfg: DictConfig) -> torch.device:
    """Positive integer options, ``warmup`` >= 0, ``baseline`` a bool, a known ``precision``, and a device that
    exists; returns the device."""
    for key in (*POSITIVE, "warmup"):
        value = _get(cfg, key)
        low = 0 if key == "warmup" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            what = "a non-negative integer" if low == 0 else "a positive integer"
            raise ConfigError(f"{key}={value!r} is invalid: expected {what}")
    if str(_get(cfg, "mode")) not in MODES:
        raise ConfigError(f"mode={_get(cfg, 'mode')!r} is invalid: expected one of {list(MODES)}")
    for key in ("baseline", "progress", "compile", "channels_last", "tf32", "ids_first"):
        if not isinstance(_get(cfg, key), bool):
            raise ConfigError(f"{key}={_get(cfg, key)!r} is invalid: expected true or false")
    graph = _get(cfg, "graph")
    if graph_mode(cfg) not in GRAPHS:
        raise ConfigError(f"graph={graph!r} is invalid: expected true, false or dry (the static step uncaptured)")
    if str(_get(cfg, "mode")) == "backends":
        backends = _get(cfg, "backends")
        if not isinstance(backends, Sequence) or isinstance(backends, str) or len(backends) < 2:
            raise ConfigError(f"backends={backends!r} is invalid: expected a list of two or more of {list(BACKENDS)}")
        for name in backends:
            if name not in BACKENDS or list(backends).count(name) > 1:
                raise ConfigError(
                    f"backends={list(backends)}: {name!r} is invalid: expected each of {list(BACKENDS)} once"
                )
    from vss.models.ops.cuda_graph import DTYPES, check_tf32

    if str(_get(cfg, "dtype")) not in DTYPES:
        raise ConfigError(f"dtype={_get(cfg, 'dtype')!r} is invalid: expected one of {list(DTYPES)}")
    if str(_get(cfg, "precision")) not in PRECISIONS:
        raise ConfigError(f"precision={_get(cfg, 'precision')!r} is invalid: expected one of {list(PRECISIONS)}")
    for key in ("compile", "channels_last"):
        if _get(cfg, key) and str(_get(cfg, "mode")) != "train":
            raise ConfigError(
                f"{key}=true is a mode=train option (mode={_get(cfg, 'mode')}); model.compile=true "
                "compiles the temporal part at inference"
            )
    check_numeric_keys(cfg)  # the model's and encoder's own (model.embed_dim, encoder.drop_path_rate, ...)
    if OmegaConf.select(cfg, "optim", default=None) is not None:  # mode=train builds the training optimizer
        check_optim_values(cfg)
    check_targets(cfg)
    device = resolve_device(_get(cfg, "device"))
    if device.type != "cuda" and graph_mode(cfg) == "true":
        raise ConfigError(
            f"graph=true needs CUDA (device={device.type}): CUDA graphs replay CUDA kernels; graph=dry runs the same "
            "static step (fixed buffers, in-place state, no host reads) uncaptured, as a rehearsal"
        )
    check_tf32(bool(_get(cfg, "tf32")), device)
    return device


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _time(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    iters: int,
    tick: Callable[[int, float], None] = lambda i, seconds: None,
) -> float:
    """Median seconds per call of the ``iters`` calls after ``warmup`` untimed ones; ``tick(i, seconds)`` after
    each call (``i`` counts the warm-up calls too)."""
    sync = _sync(device)
    times = []
    for i in range(warmup + iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds = time.perf_counter() - start
        if i >= warmup:
            times.append(seconds)
        tick(i, seconds)
    return statistics.median(times)


class Progress:
    """``[vss.bench] progress <label>: <message>`` lines on stderr (none when ``enabled`` is false), each with
    the seconds its step took and the time since the bench started."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label, self.enabled, self.start = label, enabled, time.perf_counter()

    def __call__(self, message: str, seconds: float | None = None) -> None:
        if not self.enabled:
            return
        took = "" if seconds is None else f": {seconds:.1f} s"
        total = time.perf_counter() - self.start
        print(f"[vss.bench] progress {self.label}: {message}{took} ({total:.0f} s so far)", file=sys.stderr, flush=True)


def baseline_of(cfg: DictConfig) -> Callable[..., object] | None:
    """The single-frame baseline (a factory) that the method's class names for ``cfg.model``
    (:meth:`vss.models.aggregators.base.Aggregator.single_frame_baseline`); None when it names none."""
    from vss.models.aggregators.base import aggregator_class

    return aggregator_class(cfg.model.get("_target_")).single_frame_baseline(cfg.model)


def step_flops(model: torch.nn.Module, video: torch.Tensor) -> tuple[float, float]:
    """FLOPs of pushing the last frame of ``video`` (N,3,H,W) into a Streamer that has seen the others (frame by
    frame): the total and the encoder's part."""
    from torch.utils.flop_counter import FlopCounterMode

    from vss.models.streamer import Streamer

    streamer = Streamer(model, 1)
    for i in range(len(video) - 1):
        streamer.push(video[i : i + 1])
    with FlopCounterMode(display=False) as counter:
        streamer.push(video[-1:])
    streamer.end()
    counts = counter.get_flop_counts()
    encoder = sum(counts.get(type(model.encoder).__name__, {}).values())  # Segmenter.encode calls it as a root
    return float(counter.get_total_flops()), float(encoder)


def stream_video(model: torch.nn.Module, video: torch.Tensor, batch_size: int) -> int:
    """Push ``video`` (N,3,H,W) through a fresh :class:`Streamer`, ``batch_size`` frames a push, then ``end``;
    checks that every frame is predicted once, in order, and returns the number of predictions."""
    from vss.models.streamer import Streamer

    streamer = Streamer(model, batch_size)
    indices: list[int] = []
    for start in range(0, len(video), batch_size):
        indices += [o.index for o in streamer.push(video[start : start + batch_size])]
    indices += [o.index for o in streamer.end()]
    if indices != list(range(len(video))):
        raise RuntimeError(f"Streamer predicted frames {indices} of a {len(video)}-frame video")
    return len(indices)


@contextmanager
def timed_stages(model: torch.nn.Module, device: torch.device) -> Iterator[dict[str, float]]:
    """Seconds spent in ``model.encoder``, ``model.aggregator.encode`` and ``model.aggregate`` while inside."""
    sync = _sync(device)
    spent = {"encoder": 0.0, "aggregator_encode": 0.0, "aggregate": 0.0}

    def timer(fn: Callable[..., object], key: str) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            spent[key] += time.perf_counter() - start
            return out

        return wrapper

    stages = [(model.encoder, "forward", "encoder"), (model.aggregator, "encode", "aggregator_encode")]
    stages.append((model, "aggregate", "aggregate"))
    for obj, attr, key in stages:  # instance attributes shadow the methods; deleting them restores the methods
        setattr(obj, attr, timer(getattr(obj, attr), key))
    try:
        yield spent
    finally:
        for obj, attr, _ in stages:
            delattr(obj, attr)


def step_wanted(cfg: DictConfig) -> bool:
    """The step path runs in ``mode=step``, and in ``mode=infer`` when one of its options is set."""
    options = int(cfg.streams) > 1 or graph_mode(cfg) != "false" or cfg.tf32 or cfg.ids_first or cfg.dtype != "fp32"
    return str(cfg.mode) == "step" or (str(cfg.mode) == "infer" and bool(options))


def _p95(values: list[float]) -> float:
    """The 95th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, -(-95 * len(ordered) // 100) - 1)]


def step_path(cfg: DictConfig, device: torch.device, model: torch.nn.Module, note: Progress) -> dict[str, float]:
    """The fixed-shape step with the class ids at frame size, per frame: one stream (``step_*``), and ``streams``
    N > 1 independent streams batched (``streams_*``: stream b starts at frame b), eager or captured in a CUDA
    graph (``graph``), with ``tf32``, ``ids_first``, ``dtype``; ``agreement_pct`` against the eager fp32 step's
    default ids on the same frames where an option changes the arithmetic. See the module docstring."""
    import copy

    from vss.models.ops.cuda_graph import DTYPES, GraphedStep, frame_ids, tf32
    from vss.models.step import Step
    from vss.models.streams import Streams

    h, w, frames, n = int(cfg.height), int(cfg.width), int(cfg.frames), int(cfg.streams)
    warmup, iters, graph, ids_first = int(cfg.warmup), int(cfg.iters), graph_mode(cfg), bool(cfg.ids_first)
    dtype = DTYPES[str(cfg.dtype)]
    run = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    video = torch.randn(frames, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    sync = _sync(device)
    size = (h, w)

    def runner(step: Step, batch: int, eager: bool, first: bool = ids_first) -> Callable[..., dict[str, torch.Tensor]]:
        if not eager:
            return GraphedStep(step, h, w, batch, ids_first=first, dry_run=graph == "dry")
        state = step.init_state(h, w, batch)

        def call(frame: torch.Tensor, active: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            nonlocal state
            out, state = step.step(frame, state) if active is None else step.step(frame, state, active)
            return {**out, "ids": frame_ids(out["logits"], size, first)}

        return call

    def timed(call: Callable[..., dict[str, torch.Tensor]], batch: int, label: str) -> tuple[list[float], dict]:
        """Latency (s) of each timed call (the ids ready); the ids of the valid outputs of the first pass."""
        latencies, kept = [], {}
        ticks = (warmup + iters) * frames
        for tick in range(ticks):
            frame = video[tick % frames].to(dtype)
            active = None
            if batch > 1:  # stream b starts at tick b
                frame = frame.expand(batch, -1, -1, -1)
                active = torch.arange(batch, device=device) <= tick
            sync()
            start = time.perf_counter()
            out = call(frame, active) if batch > 1 else call(frame[None])
            sync()
            if tick >= warmup * frames:
                latencies.append(time.perf_counter() - start)
            if batch == 1 and tick < frames and bool(out["valid"]):
                kept[int(out["index"])] = out["ids"][0].clone()
            if (tick + 1) % frames == 0:
                note(f"step path ({label}) frame {tick + 1}/{ticks}" + (" (warm-up)" if tick < warmup * frames else ""))
        return latencies, kept

    eager = graph == "false"
    what = ("eager" if eager else f"graph={graph}") + ", tf32" * bool(cfg.tf32) + ", ids_first" * ids_first
    figures: dict[str, float] = {}
    with tf32(bool(cfg.tf32)):
        one, ids = timed(runner(Step(run), 1, eager), 1, f"{what}, {cfg.dtype}, 1 stream")
        figures.update(
            step_ms_per_frame=1e3 * statistics.mean(one), step_fps=1 / statistics.mean(one), step_p95_ms=1e3 * _p95(one)
        )
        if n > 1:
            many, _ = timed(runner(Streams(run), n, eager), n, f"{what}, {cfg.dtype}, {n} streams")
            figures.update(
                streams=n,
                streams_total_fps=n / statistics.mean(many),
                streams_latency_mean_ms=1e3 * statistics.mean(many),
                streams_latency_p95_ms=1e3 * _p95(many),
            )
    if not eager or cfg.tf32 or ids_first or dtype != torch.float32:  # the arithmetic differs: how much?
        with tf32(False):
            reference = {}
            call = runner(Step(model), 1, eager=True, first=False)
            for i in range(frames):
                out = call(video[i][None])
                if bool(out["valid"]):
                    reference[int(out["index"])] = out["ids"][0]
        common = sorted(set(reference) & set(ids))
        equal = sum(int((reference[i] == ids[i]).sum()) for i in common)
        figures["agreement_pct"] = 100 * equal / max(1, sum(reference[i].numel() for i in common))
    return figures


def bench(cfg: DictConfig) -> BenchResult:
    """Parameter counts, clip-path and streaming-path time per target frame, FLOPs and memory of the configured
    model, and the same for its single-frame baseline (timed interleaved)."""
    from vss.models.segmenter import Segmenter

    device = check_bench_config(cfg)  # before any model is built
    if str(cfg.mode) == "train":
        return bench_train(cfg, device)
    model = Segmenter(instantiate(cfg.encoder), instantiate(cfg.model), int(cfg.num_classes)).to(device).eval()
    base_agg = baseline_of(cfg) if cfg.baseline and str(cfg.mode) in ("infer", "train") else None
    baseline = None
    if base_agg is not None:
        baseline = Segmenter(instantiate(cfg.encoder), base_agg, int(cfg.num_classes)).to(device).eval()
    label = f"{type(model.aggregator).__name__} {cfg.encoder.get('name', type(model.encoder).__name__)}"
    progress = Progress(label, bool(cfg.get("progress", True)))
    if str(cfg.mode) == "backends":
        return bench_backends(cfg, device, model, progress)
    with torch.inference_mode(), inference_precision(cfg.precision, device, key="precision"):
        if str(cfg.mode) == "step":
            result = _step_only(cfg, device, model, progress)
        else:
            result = _bench(cfg, device, model, baseline, progress)
        if step_wanted(cfg) and str(cfg.mode) == "infer":
            result.figures.update(step_path(cfg, device, model, progress))
    if str(cfg.mode) == "step":
        return result
    if cfg.baseline and baseline is None:
        name = type(model.aggregator).__name__
        result.baseline = (
            f"none ({name} is single-frame itself)"
            if not model.aggregator.offsets
            else f"none ({name}.single_frame_baseline names no honest single-frame counterpart)"
        )
    return result


def backend_runners(
    names: Sequence[str], model: torch.nn.Module, height: int, width: int, workdir: Path
) -> dict[str, Callable[[torch.Tensor], int]]:
    """One callable per backend that segments a whole video (N,3,H,W) uint8 one frame a call (a live stream), the
    end of the video included, and returns the number of predictions: ``streamer``: :class:`Streamer` push + end;
    ``step``: :meth:`Step.step` + :meth:`Step.flush`; ``onnx``: the step exported as ``vss.export format=onnx``
    does (into ``workdir``) and run by ONNX Runtime on the CPU, the flush by repeating the last frame."""
    import numpy as np

    from vss.exported import OUTPUTS, StepGraph, _require_onnx
    from vss.models.step import Step

    step = Step(model).eval()
    runners: dict[str, Callable[[torch.Tensor], int]] = {"streamer": partial(stream_video, model, batch_size=1)}

    def run_step(video: torch.Tensor) -> int:
        state, count = step.init_state(height, width, 1), 0
        with torch.inference_mode():
            for frame in video:
                out, state = step.step(frame[None], state)
                count += bool(out["valid"])
            return count + sum(bool(o["valid"]) for o in step.flush(state, height, width))

    runners["step"] = run_step
    if "onnx" in names:
        _require_onnx()
        import onnxruntime as ort

        from vss.export import export_onnx

        zero = step.init_state(height, width, 1)
        graph = StepGraph(step, list(zero)).eval()
        frame0 = torch.zeros(1, 3, height, width, dtype=torch.uint8)
        path = workdir / "step.onnx"
        outputs = [*OUTPUTS, *(f"next.{k}" for k in zero)]
        export_onnx(graph, (frame0, *zero.values()), path, ["frame", *zero], outputs)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        zero_np = {k: v.numpy() for k, v in zero.items()}

        def run_onnx(video: torch.Tensor) -> int:
            frames, state, count = video.cpu().numpy(), dict(zero_np), 0
            for frame in [*frames, *[frames[-1]] * step.lookahead]:
                _, valid, _, *new = session.run(None, {"frame": np.ascontiguousarray(frame[None]), **state})
                state = dict(zip(state, new, strict=True))
                count += bool(valid)
            return count

        runners["onnx"] = run_onnx
    return {n: runners[n] for n in names}


def bench_backends(cfg: DictConfig, device: torch.device, model: torch.nn.Module, note: Progress) -> BenchResult:
    """``mode=backends``: the same random uint8 video of ``frames`` frames through each of ``backends`` (one frame
    a call), ``warmup`` untimed rounds then ``iters`` timed rounds, each round every backend in turn (the order
    rotated each round, so none always runs first on a loaded machine); the median ms per frame and CPU ms per
    frame of each, and each one's ratio to the first backend (``<name>_ratio``: wall, ``<name>_cpu_ratio``: CPU)."""
    import tempfile

    names = [str(n) for n in cfg.backends]
    if "onnx" in names and device.type != "cpu":
        raise ConfigError("backends=[..., onnx] is timed on the CPU (ONNX Runtime's CPU provider): pass device=cpu")
    h, w, frames, warmup, iters = (int(cfg[k]) for k in ("height", "width", "frames", "warmup", "iters"))
    video = torch.randint(0, 256, (frames, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    video = video.to(device)
    sync = _sync(device)
    with tempfile.TemporaryDirectory(prefix="vss-bench-") as workdir:
        start = time.perf_counter()
        runners = backend_runners(names, model, h, w, Path(workdir))
        if "onnx" in names:
            note("exported the step to ONNX", time.perf_counter() - start)
        wall: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        for k in range(warmup + iters):
            order = names[k % len(names) :] + names[: k % len(names)]
            for name in order:
                sync()
                start, cpu_start = time.perf_counter(), time.process_time()
                with torch.inference_mode():
                    count = runners[name](video)
                sync()
                seconds = time.perf_counter() - start
                if count != frames:
                    raise RuntimeError(f"backend {name} predicted {count} of {frames} frames")
                if k >= warmup:
                    wall[name].append(seconds)
                    cpu[name].append(time.process_time() - cpu_start)
                note(
                    f"round {k + 1}/{warmup + iters} {name} ({frames} frames)" + (" (warm-up)" if k < warmup else ""),
                    seconds,
                )
    figures: dict[str, float] = {"params_total_M": count_parameters(model) / 1e6}
    first = names[0]
    for name in names:
        figures[f"{name}_ms_per_frame"] = 1e3 * statistics.median(wall[name]) / frames
        figures[f"{name}_cpu_ms_per_frame"] = 1e3 * statistics.median(cpu[name]) / frames
    for name in names[1:]:
        figures[f"{name}_ratio"] = figures[f"{name}_ms_per_frame"] / figures[f"{first}_ms_per_frame"]
        figures[f"{name}_cpu_ratio"] = figures[f"{name}_cpu_ms_per_frame"] / figures[f"{first}_cpu_ms_per_frame"]
    figures["threads"] = torch.get_num_threads()
    return BenchResult.of(model, cfg, h, w, device, figures, mode="backends")


def _step_only(cfg: DictConfig, device: torch.device, model: torch.nn.Module, note: Progress) -> BenchResult:
    """``mode=step``: the parameters and the step path alone."""
    figures = {"params_total_M": count_parameters(model) / 1e6, **step_path(cfg, device, model, note)}
    figures["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if device.type == "cuda":
        figures["peak_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
    return BenchResult.of(model, cfg, int(cfg.height), int(cfg.width), device, figures, mode="step")


def _bench(
    cfg: DictConfig,
    device: torch.device,
    model: torch.nn.Module,
    baseline: torch.nn.Module | None,
    progress: Progress | None = None,
) -> BenchResult:
    h, w, b, t = int(cfg.height), int(cfg.width), int(cfg.batch_size), 1 + len(model.offsets)
    warmup, iters, frames, sb = int(cfg.warmup), int(cfg.iters), int(cfg.frames), int(cfg.stream_batch_size)
    cuda, sync = device.type == "cuda", _sync(device)
    note = progress or Progress("", enabled=False)
    runs = [m for m in (model, baseline) if m is not None]
    names = {id(m): type(m.aggregator).__name__ + (" (baseline)" if m is baseline else "") for m in runs}
    note(
        f"{h}x{w} on {device.type}: {warmup} warm-up + {iters} timed clip forward(s); per model "
        f"({', '.join(names.values())}) {warmup} warm-up + {iters} timed streaming video(s) of {frames} frames; "
        "1 instrumented video; FLOPs"
    )
    figures = {
        "params_total_M": count_parameters(model) / 1e6,
        "params_encoder_M": count_parameters(model.encoder) / 1e6,
        "params_aggregator_M": count_parameters(model.aggregator) / 1e6,
    }

    # clip path
    clip = torch.randn(b, t, 3, h, w, device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def clip_tick(i: int, seconds: float) -> None:
        note(f"clip forward {i + 1}/{warmup + iters}" + (" (warm-up)" if i < warmup else ""), seconds)

    clip_ms = 1e3 * _time(partial(model, clip), device, warmup, iters, clip_tick) / b
    figures.update(clip_ms_per_frame=clip_ms, clip_fps=1e3 / clip_ms)
    clip_peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else 0.0
    del clip

    # streaming path, interleaved with the baseline's
    video = torch.randn(frames, 3, h, w, device=device)
    span = max(0, -min(model.offsets, default=0))
    for m in runs:
        m_span = max(0, -min(m.offsets, default=0))
        length = min(frames, max(sb, 1 + m_span + m.lookahead))
        for k in range(warmup):
            start = time.perf_counter()
            stream_video(m, video[:length], sb)
            sync()
            note(f"streaming warm-up {k + 1}/{warmup} ({names[id(m)]}, {length} frames)", time.perf_counter() - start)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    seconds: dict[int, list[float]] = {id(m): [] for m in runs}
    stream_peak = 0.0
    for k in range(iters):
        for j, m in enumerate(runs):
            start = time.perf_counter()
            stream_video(m, video, sb)
            sync()
            seconds[id(m)].append(time.perf_counter() - start)
            count = f"{k * len(runs) + j + 1}/{iters * len(runs)}"
            note(f"streaming video {count} ({names[id(m)]}, {frames} frames)", seconds[id(m)][-1])
            if cuda and m is model:
                stream_peak = max(stream_peak, torch.cuda.max_memory_allocated(device))
                torch.cuda.reset_peak_memory_stats(device)
    stream_ms = 1e3 * statistics.median(seconds[id(model)]) / frames
    figures.update(stream_ms_per_frame=stream_ms, stream_fps=1e3 / stream_ms)
    if baseline is not None:
        base_ms = 1e3 * statistics.median(seconds[id(baseline)]) / frames
        figures.update(baseline_ms_per_frame=base_ms, ratio_to_baseline=stream_ms / base_ms)
    stream_peak = (stream_peak - video.nbytes + video[:sb].nbytes) / 2**20 if cuda else 0.0

    # shares of one more (instrumented) streaming video
    with timed_stages(model, device) as spent:
        start = time.perf_counter()
        stream_video(model, video, sb)
        sync()
        total = time.perf_counter() - start
    note(f"instrumented video 1/1 ({names[id(model)]}, {frames} frames)", total)
    aggregator = spent["aggregator_encode"] + spent["aggregate"]
    figures.update(
        encoder_pct=100 * spent["encoder"] / total,
        aggregator_pct=100 * aggregator / total,
        bookkeeping_pct=100 * (total - spent["encoder"] - aggregator) / total,
    )

    # FLOPs of one streaming step
    start = time.perf_counter()
    flops, encoder_flops = step_flops(model, video[: min(frames, 2 + span + model.lookahead)])
    note(f"FLOPs 1/{len(runs)} ({names[id(model)]})", time.perf_counter() - start)
    figures.update(gflops_per_frame=flops / 1e9, aggregator_gflops_pct=100 * (flops - encoder_flops) / max(flops, 1))
    if baseline is not None:
        start = time.perf_counter()
        base_flops, _ = step_flops(baseline, video[: min(frames, 2)])
        note(f"FLOPs 2/2 ({names[id(baseline)]})", time.perf_counter() - start)
        figures.update(baseline_gflops_per_frame=base_flops / 1e9, flop_ratio=flops / max(base_flops, 1))
    figures["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if cuda:
        figures.update(clip_peak_MiB=clip_peak, stream_peak_MiB=stream_peak)
    return BenchResult.of(model, cfg, h, w, device, figures)


@dataclass
class TrainStep:
    """One model's optimizer step, as training takes it (:func:`vss.lit.training_loss`, the optimizer over
    :meth:`vss.lit.VSSModule.param_groups`), in three timed parts: forward + losses, backward, optimizer step +
    ``zero_grad``."""

    name: str
    segmenter: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scaler: torch.amp.GradScaler | None = None
    seconds: list[tuple[float, float, float]] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    """Process CPU time of each step (all threads): on a loaded machine steadier than wall time."""
    peak: float = 0.0

    def __call__(self, clips: torch.Tensor, labels: torch.Tensor, precision: str, device: torch.device) -> float:
        """Run one step; returns its seconds (its parts appended to ``seconds``)."""
        sync = _sync(device)
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        with inference_precision(precision, device, key="precision"):  # autocast: the forward and the losses
            loss = self.loss(clips, labels)
        sync()
        forward = time.perf_counter()
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        sync()
        backward = time.perf_counter()
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        end = time.perf_counter()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: the training loss is {loss.item()} on random clips")
        self.seconds.append((forward - start, backward - forward, end - backward))
        self.cpu_seconds.append(time.process_time() - cpu)
        return end - start


def train_step(cfg: DictConfig, device: torch.device, aggregator: object = None) -> TrainStep:
    """The model of ``cfg`` (or the encoder with ``aggregator``) and its optimizer, built as ``vss.train`` builds
    them (:func:`vss.lit.build_module`, the optimizer factory over the module's parameter groups)."""
    from vss.lit import build_module, training_loss

    model_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("paths", "hydra")])  # no run directory
    module = build_module(model_cfg, int(cfg.num_classes), None, aggregator=aggregator)
    segmenter = module.segmenter.to(device).train()
    if cfg.channels_last:
        segmenter.to(memory_format=torch.channels_last)
    optimizer = module.optimizer_factory(module.param_groups())  # configure_optimizers without the scheduler
    loss = partial(training_loss, segmenter)

    def loss_fn(clips: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss(clips, labels)[0]

    step_loss = torch.compile(loss_fn) if cfg.compile else loss_fn
    scaler = torch.amp.GradScaler(device.type) if str(cfg.precision) == "16-mixed" else None
    name = type(segmenter.aggregator).__name__ + ("" if aggregator is None else " (baseline)")
    return TrainStep(name, segmenter, optimizer, step_loss, scaler)


def bench_train(cfg: DictConfig, device: torch.device) -> BenchResult:
    """``mode=train``: the optimizer step of the configured model (and of its single-frame baseline, in turn) on
    ``batch`` random clips at ``height`` x ``width`` with random labels in range; medians of ``iters`` timed steps
    after ``warmup`` untimed ones, and the peak memory."""
    torch.manual_seed(0)
    h, w, b = int(cfg.height), int(cfg.width), int(cfg.batch_size)
    model = train_step(cfg, device)
    segmenter = model.segmenter
    label = f"{type(segmenter.aggregator).__name__} {cfg.encoder.get('name', type(segmenter.encoder).__name__)}"
    note = Progress(label, bool(cfg.get("progress", True)))
    base_agg = baseline_of(cfg) if cfg.baseline else None
    runs = [model]
    if base_agg is not None:
        runs.append(train_step(cfg, device, base_agg))
    t = 1 + len(segmenter.offsets)
    clips = torch.randn(b, t, 3, h, w, device=device)
    if cfg.channels_last:  # each frame (B*T,3,H,W) in NHWC
        clips = clips.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (b, t))
    labels = torch.randint(0, int(cfg.num_classes), (b, t, h, w), device=device)
    warmup, iters, precision = int(cfg.warmup), int(cfg.iters), str(cfg.precision)
    names = ", ".join(r.name for r in runs)
    note(f"{h}x{w}, batch {b} on {device.type} ({precision}): {warmup} warm-up + {iters} timed step(s) of {names}")
    cuda = device.type == "cuda"
    for k in range(warmup + iters):  # rounds: each model's step in turn
        for run in runs:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            n = len(run.seconds)
            first = t - 1 - len(run.segmenter.offsets)  # the baseline reads the target alone
            seconds = run(clips[:, first:], labels[:, first:], precision, device)
            if cuda:
                run.peak = max(run.peak, torch.cuda.max_memory_allocated(device) / 2**20)
            if k < warmup:
                del run.seconds[n:], run.cpu_seconds[n:]
            note(f"step {k + 1}/{warmup + iters} ({run.name})" + (" (warm-up)" if k < warmup else ""), seconds)

    def ms(run: TrainStep, part: int | None = None) -> float:
        return 1e3 * statistics.median(sum(s) if part is None else s[part] for s in run.seconds)

    figures = {
        "params_total_M": count_parameters(segmenter) / 1e6,
        "step_ms": ms(model),
        "forward_ms": ms(model, 0),
        "backward_ms": ms(model, 1),
        "optimizer_ms": ms(model, 2),
        "step_cpu_ms": 1e3 * statistics.median(model.cpu_seconds),
    }
    figures["clips_per_s"] = 1e3 * b / figures["step_ms"]
    if len(runs) > 1:
        base_cpu = 1e3 * statistics.median(runs[1].cpu_seconds)
        figures.update(
            baseline_step_ms=ms(runs[1]),
            ratio_to_baseline=figures["step_ms"] / ms(runs[1]),
            baseline_step_cpu_ms=base_cpu,
            cpu_ratio_to_baseline=figures["step_cpu_ms"] / base_cpu,
        )
    figures["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if cuda:
        figures["peak_MiB"] = model.peak
        if len(runs) > 1:
            figures["baseline_peak_MiB"] = runs[1].peak
    result = BenchResult.of(segmenter, cfg, h, w, device, figures, mode="train", batch=b, precision=precision)
    if cfg.baseline and base_agg is None:
        result.baseline = f"none ({result.model} names no single-frame baseline)"
    return result


def variant(overrides: list[str]) -> str:
    """The overrides that are not bench options (e.g. ``+experiment/msaf_table3=baseline stm.p=0.3``): rows of one
    sweep stay apart."""
    keys = {o: o.lstrip("+~").split("=")[0] for o in overrides}
    return " ".join(o for o, k in keys.items() if k not in BENCH_KEYS and not k.startswith(("hydra.", "paths.")))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
@friendly_errors
def _hydra_main(cfg: DictConfig) -> None:
    """Print one table row per run."""
    print(bench(cfg).line(variant(list(HydraConfig.get().overrides.task))))


def main() -> None:
    """``python -m vss.bench`` / ``vss-bench``: a mistyped key or a missing option is one line first."""
    tune_host_allocator()
    friendly_errors(check_command_line)("bench", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
