"""CUDA-graph streaming: the fixed-shape step (:class:`~vss.models.step.Step`, or :class:`~vss.models.streams.Streams`
for many streams) captured once in a ``torch.cuda.CUDAGraph`` with static frame and state buffers, replayed per
frame; the class ids at frame size computed inside the graph.

On a GPU the streaming step is launch-bound (hundreds of small kernels a frame; 256x448 costs as much as 480x864
on an H200): one replay launches them all at once. The static buffers follow the graph's rules: the frame is
copied into ``frame``, the state is updated in place (``copy_`` of the step's next state, inside the graph),
and the outputs are the graph's own tensors, overwritten by the next replay (clone what you keep). The step runs
in its traced form (:func:`~vss.models.step.static_branches`: both branches and ``torch.where``, no host reads).

Options (``vss.bench``): :func:`tf32` (TF32 matmuls and convolutions), ``ids_first`` (:func:`frame_ids`: the
argmax at the model's output size, then nearest upsampling of the ids, instead of bilinear logits at frame size
then argmax; not the same ids at class borders: measure the agreement), a bfloat16 model (the caller casts
weights; the frame and the state take the model's dtype, no autocast).

``dry_run=True`` (any device) runs the same static body uncaptured: static buffers, in-place state, the traced
branches, with :class:`CaptureCheck` refusing what a capture cannot hold (a host read of a tensor, an output
whose shape depends on data); the CPU rehearsal of everything but the capture itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from vss.errors import ConfigError
from vss.models.aggregators.base import resize
from vss.models.ops.classes import class_map
from vss.models.step import State, Step, static_branches
from vss.models.streams import Streams

HOST_READS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "unique_dim", "unique_consecutive")
"""Ops a CUDA graph cannot capture: ``.item()``/``bool()``/``int()`` of a tensor, outputs sized by data."""


class CaptureCheck(TorchDispatchMode):
    """Records the ops in :data:`HOST_READS` and tensors built from host data (``torch.tensor(...)``: a host to
    device copy under capture) while active; :meth:`check` raises naming them."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if name in HOST_READS or name.startswith("lift_fresh"):
            self.found[name] = self.found.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def check(self, what: str) -> None:
        if self.found:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.found.items()))
            raise RuntimeError(f"{what} cannot be captured in a CUDA graph: it runs {ops} (host reads / host data)")


@contextmanager
def tf32(enabled: bool = True) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions inside (restored after)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``dtype`` of a graphed step (``vss.bench``, ``vss.predict``): the model's weights and activations (bf16: a cast,
no autocast)."""


def check_tf32(enabled: bool, device: torch.device) -> None:
    """``tf32=true`` is for CUDA: refused in one line on another device."""
    if enabled and device.type != "cuda":
        raise ConfigError(f"tf32=true sets TF32 for CUDA matmuls and convolutions (device={device.type}): use a GPU")


def nearest_ids(ids: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest upsampling of class ids (B,h,w) to ``size`` (source pixel ``floor(dst * in / out)``, exact in
    integers)."""
    h, w = ids.shape[-2:]
    rows = torch.arange(size[0], device=ids.device) * h // size[0]
    cols = torch.arange(size[1], device=ids.device) * w // size[1]
    return ids[:, rows][:, :, cols]


def frame_ids(logits: Tensor, size: tuple[int, int], ids_first: bool = False) -> Tensor:
    """Class ids (B,H,W) at frame size: bilinear logits then the argmax (the default, as ``vss.predict``), or with
    ``ids_first`` the argmax at the logits' size then :func:`nearest_ids`."""
    if ids_first:
        return nearest_ids(class_map(logits), size)
    return class_map(resize(logits, size))


class GraphedStep:
    """A :class:`Step` / :class:`Streams` at one frame size and batch, captured in a CUDA graph (or run uncaptured
    with ``dry_run``): ``graphed(frame[, active])`` -> ``logits``, ``valid``, ``index``, ``ids`` (static tensors)."""

    def __init__(
        self,
        step: Step,
        height: int,
        width: int,
        batch: int = 1,
        ids_first: bool = False,
        dry_run: bool = False,
        warmup: int = 2,
        frame_dtype: torch.dtype | None = None,
    ) -> None:
        param = next(step.model.parameters())
        if param.device.type != "cuda" and not dry_run:
            raise ConfigError(
                f"graph=true needs CUDA (the model is on {param.device.type}): CUDA graphs replay CUDA kernels; "
                "graph=dry runs the same static step uncaptured"
            )
        self.step, self.size, self.ids_first, self.dry_run = step, (int(height), int(width)), ids_first, dry_run
        # frames as given: normalised floats (the model's dtype) or uint8, normalised inside the graph
        self.frame = torch.zeros(batch, 3, *self.size, dtype=frame_dtype or param.dtype, device=param.device)
        self.state: State = step.init_state(*self.size, batch)
        self.streams = isinstance(step, Streams)
        self.active = torch.ones(batch, dtype=torch.bool, device=param.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if dry_run:
            self._body()  # the warm-up a capture has first (per-device caches, e.g. normalisation constants, filled)
            self.reset()
            check = CaptureCheck()
            with check:
                self._body()
            check.check(f"{type(step.model.aggregator).__name__}'s step")
            self.reset()
            return
        current = torch.cuda.current_stream(param.device)
        side = torch.cuda.Stream(param.device)  # warm-up off the default stream, as torch.cuda.graphs asks
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._body()
        current.wait_stream(side)
        self.reset()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._body()

    def _body(self) -> dict[str, Tensor]:
        """One step on the static buffers: the state updated in place, the ids at frame size."""
        with static_branches():
            if self.streams:
                out, new = self.step.step(self.frame, self.state, self.active)
            else:
                out, new = self.step.step(self.frame, self.state)
            for k, v in self.state.items():
                v.copy_(new[k])
            return {**out, "ids": frame_ids(out["logits"], self.size, self.ids_first)}

    def __call__(self, frame: Tensor, active: Tensor | None = None) -> dict[str, Tensor]:
        """Push one frame (B,3,H,W) (and which streams have one); the outputs are overwritten by the next call."""
        self.frame.copy_(frame)
        if active is not None:
            self.active.copy_(active)
        if self.graph is None:
            self.out = self._body()
        else:
            self.graph.replay()
        return self.out

    def reset(self, slot: int | Tensor | None = None) -> None:
        """Start over: every stream (zero state), or one stream slot of :class:`Streams` (in place)."""
        if slot is None:
            for v in self.state.values():
                v.zero_()
        else:
            Streams.reset(self.state, slot)
