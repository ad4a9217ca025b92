"""A pure streaming step: ``step(frame, state) -> (output, state)`` with the temporal state as fixed-shape tensors.

The :class:`~vss.models.streamer.Streamer` keeps its cache in a Python dict keyed by frame index; :class:`Step`
keeps the same information in tensors whose shapes never change, so the whole per-frame computation is a
function of tensors (exportable, compilable, capturable), in the pattern of RobustVideoMatting's recurrent
state. It is generic: it reads only the model's ``offsets``, ``lookahead``, start-of-video policy
``references`` and ``reference_features``.

**State** (a flat dict of tensors, names sorted; ``B`` videos advance in lockstep):

- ``count`` (int64, shape ()): frames pushed so far; the next frame's index.
- ``ring.<key>`` (S, B, ...): each :meth:`Aggregator.reference_features` tensor of the last ``S = span +
  lookahead + 1`` frames, frame ``i`` in slot ``i % S`` (``span``: the farthest the policy reaches back).
  Absent for single-frame models.
- ``pending.<key>`` (P, B, ...): the full features of the ``P = lookahead + 1`` frames not yet predicted,
  frame ``i`` in slot ``i % P``. Absent for causal models (the target is the frame just encoded).

The start-of-video policy is a constant of the model, not state: it is tabulated once for the first ``T0``
frames (a small int64 table of reference frame indices per target, a bool per target predicted alone);
from ``T0`` on the references are ``t + offsets``. References are clamped to frame 0 and, at the end of a
video, to its last frame. The table is checked against ``references`` (streaming and every end-of-video
length a flush meets) over a horizon of frames at construction; a policy the form cannot express is refused
with :class:`~vss.errors.ConfigError`.

**Output** of each call: ``logits`` (B,C,h,w) of target ``t = count - lookahead`` (the frame that became
ready), ``valid`` (bool, shape (); false while ``t < 0``) and ``index`` (``t``). Logits are at the model's own
output size where every branch the policy uses gives the same size; where a policy mixes branches of different
sizes (MRCFA's official start: per-frame logits at 1/4, temporal ones at 1/8) both are resized bilinearly to
the frame size, the size ``vss.predict`` upsamples to. :meth:`Step.flush` predicts the ``lookahead`` frames
still pending at the end of a video (``Streamer.end``).

In eager mode a branch the target does not take is skipped (``valid``/per-frame read on the host); under
``torch.compile`` / ``torch.export``, CUDA-graph capture and :func:`static_branches` both are computed and selected
by ``torch.where`` (no data-dependent Python control flow).

:class:`vss.models.streams.Streams` is the same step over independent streams (a count per stream).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vss.errors import ConfigError
from vss.models.aggregators.base import FrameFeatures, resize
from vss.models.segmenter import Segmenter

State = dict[str, Tensor]
HORIZON = 64
"""Frames over which the policy is checked against its tabulated form (at least twice the table's length)."""


_STATIC = [False]


@contextmanager
def static_branches() -> Iterator[None]:
    """Inside: the step takes its traced form in eager mode too (both branches and ``torch.where``, no host reads),
    as a CUDA graph captures it (:mod:`vss.models.ops.cuda_graph`: its warm-up, and the CPU dry run)."""
    before, _STATIC[0] = _STATIC[0], True
    try:
        yield
    finally:
        _STATIC[0] = before


def _tracing() -> bool:
    """Whether the step is being compiled, exported or captured in a CUDA graph (then no host reads of tensors)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or _STATIC[0]:
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass(frozen=True)
class Layout:
    """What a frame size gives: per-frame feature shapes/dtypes (no batch), reference keys, the output size."""

    features: dict[str, tuple[tuple[int, ...], torch.dtype]]
    reference_keys: tuple[str, ...]
    logits: tuple[int, ...]  # (C, h, w) of the output
    dtype: torch.dtype


class Step(nn.Module):
    """``init_state`` / ``step`` / ``flush`` of a :class:`Segmenter`; see the module docstring."""

    def __init__(self, model: Segmenter, horizon: int = HORIZON) -> None:
        super().__init__()
        self.model = model
        self.offsets = tuple(model.offsets)
        self.lookahead = int(model.lookahead)
        self.num_references = len(self.offsets)
        table, alone, span = self._tabulate(horizon)
        self.span = span
        self.slots = span + self.lookahead + 1  # S: the ring
        self.pending_slots = self.lookahead + 1  # P
        self.start_frames = len(table)  # T0
        self.register_buffer("start_table", torch.tensor(table or [[0] * self.num_references], dtype=torch.int64))
        self.register_buffer("start_alone", torch.tensor(alone or [False], dtype=torch.bool))
        self.register_buffer("offset_tensor", torch.tensor(self.offsets, dtype=torch.int64))
        self.alone_used = any(alone) or not self.offsets
        self.temporal_used = bool(self.offsets)
        self._layouts: dict[tuple[int, int], Layout] = {}

    # -- the policy as a table -----------------------------------------------------------------------
    def _tabulate(self, horizon: int) -> tuple[list[list[int]], list[bool], int]:
        """The start table (reference indices per target before T0), the per-frame flags and the span; the
        policy is checked against ``clamp(base(t), 0, length - 1)`` for every target of ``horizon`` frames."""
        name = type(getattr(self.model, "aggregator", self.model)).__name__
        offsets, r, la = self.offsets, self.num_references, self.lookahead

        def steady(t: int) -> list[int]:
            return [max(0, t + o) for o in offsets]

        policy = [list(self.model.references(t, None)) for t in range(horizon)]
        unsettled = [t for t in range(horizon) if policy[t] != steady(t)]
        t0 = unsettled[-1] + 1 if unsettled else 0
        if t0 > horizon // 2:
            raise ConfigError(
                f"Step: {name}'s start policy (references) does not settle into t + offsets {list(offsets)} within "
                f"{horizon // 2} frames (it differs at frame {t0 - 1}); a fixed-shape step tabulates a finite start"
            )
        table: list[list[int]] = []
        alone: list[bool] = []
        for t in range(t0):
            refs = policy[t]
            if refs and len(refs) != r:
                raise ConfigError(
                    f"Step: {name}'s start policy gives frame {t} {len(refs)} reference(s) {refs}; a fixed-shape step "
                    f"needs none (predicted alone) or len(offsets) = {r}"
                )
            table.append(refs or [max(0, t + o) for o in offsets])
            alone.append(not refs)

        def expressed(t: int, length: int | None) -> list[int]:
            if t < t0 and alone[t]:
                return []
            base = table[t] if t < t0 else [t + o for o in offsets]
            return [max(0, b if length is None else min(length - 1, b)) for b in base]

        span = 0
        for t in range(horizon):
            for length in [None, *range(t + 1, t + la + 1)]:  # streaming, and every length where t is flushed
                got = list(self.model.references(t, length))
                if got != expressed(t, length):
                    raise ConfigError(
                        f"Step: {name}'s references({t}, length={length}) = {got} is not the tabulated start + "
                        f"clamped offsets ({expressed(t, length)}); this policy has no fixed-shape form"
                    )
                if any(i > t + la for i in got):
                    raise ConfigError(f"Step: {name} reads frame(s) {got} for target {t}, past its lookahead {la}")
                span = max(span, *(t - i for i in got), 0) if got else span
        return table, alone, span

    # -- shapes --------------------------------------------------------------------------------------
    @torch.no_grad()
    def layout(self, height: int, width: int) -> Layout:
        """Feature shapes and the output size at a frame size (one zero frame through the model, cached)."""
        key = (int(height), int(width))
        if key not in self._layouts:
            param = next(self.model.parameters())
            frame = torch.zeros(1, 3, *key, device=param.device, dtype=param.dtype)  # a bfloat16 model: bf16
            feats = self.model.encode(frame)
            refs = self.model.reference_features(feats)
            sizes = []
            if self.alone_used:
                sizes.append(tuple(self.model.aggregate(feats, [])["logits"].shape[1:]))
            if self.temporal_used:
                sizes.append(tuple(self.model.aggregate(feats, [refs] * self.num_references)["logits"].shape[1:]))
            logits = sizes[0] if len(set(sizes)) == 1 else (sizes[0][0], *key)
            self._layouts[key] = Layout(
                {k: (tuple(v.shape[1:]), v.dtype) for k, v in feats.items()},
                tuple(sorted(refs)) if self.offsets else (),
                logits,
                next(iter(feats.values())).dtype,
            )
        return self._layouts[key]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def init_state(self, height: int, width: int, batch: int = 1) -> State:
        """The zero state of ``batch`` videos of ``height`` x ``width`` frames."""
        lay = self.layout(height, width)
        device = self._device()
        state: State = {"count": torch.zeros((), dtype=torch.int64, device=device)}
        if self.offsets:
            for k in lay.reference_keys:
                shape, dtype = lay.features[k]
                state[f"ring.{k}"] = torch.zeros(self.slots, batch, *shape, dtype=dtype, device=device)
        if self.lookahead:
            for k, (shape, dtype) in lay.features.items():
                state[f"pending.{k}"] = torch.zeros(self.pending_slots, batch, *shape, dtype=dtype, device=device)
        return dict(sorted(state.items()))

    # -- the step ------------------------------------------------------------------------------------
    def forward(self, frame: Tensor, state: State) -> tuple[dict[str, Tensor], State]:
        """:meth:`step`."""
        return self.step(frame, state)

    @torch.no_grad()
    def step(self, frame: Tensor, state: State) -> tuple[dict[str, Tensor], State]:
        """Push frame ``count`` (B,3,H,W) of each video; predict target ``count - lookahead``."""
        n = state["count"]
        feats = self.model.encode(frame)
        new = dict(state)
        if self.offsets:
            slot = torch.remainder(n, self.slots).reshape(1)
            for k, v in self.model.reference_features(feats).items():
                new[f"ring.{k}"] = state[f"ring.{k}"].index_copy(0, slot, v.unsqueeze(0))
        if self.lookahead:
            slot = torch.remainder(n, self.pending_slots).reshape(1)
            for k, v in feats.items():
                new[f"pending.{k}"] = state[f"pending.{k}"].index_copy(0, slot, v.unsqueeze(0))
        t = n - self.lookahead
        target = self._pending(new, t) if self.lookahead else feats
        out = self._predict(target, new, t, last=None, size=tuple(frame.shape[-2:]), valid=t >= 0)
        new["count"] = n + 1
        return out, new

    @torch.no_grad()
    def drain(self, state: State, k: int, size: tuple[int, int]) -> dict[str, Tensor]:
        """End of the video: the ``k``-th frame still pending (``count - lookahead + k``), references clamped
        to the last frame."""
        n = state["count"]
        t = n - self.lookahead + k
        return self._predict(self._pending(state, t), state, t, last=n - 1, size=size, valid=(t >= 0) & (t < n))

    def flush(self, state: State, height: int, width: int) -> list[dict[str, Tensor]]:
        """End of the video: one output per frame still pending (``lookahead`` of them, those before frame 0
        not valid); the state is then spent (start the next video from :meth:`init_state`)."""
        return [self.drain(state, k, (height, width)) for k in range(self.lookahead)]

    # -- helpers -------------------------------------------------------------------------------------
    def _pending(self, state: State, t: Tensor) -> FrameFeatures:
        slot = torch.remainder(t, self.pending_slots).reshape(1)
        return {k[len("pending.") :]: v.index_select(0, slot)[0] for k, v in state.items() if k.startswith("pending.")}

    def _references(self, state: State, t: Tensor, last: Tensor | None) -> tuple[list[FrameFeatures], Tensor]:
        """The references of target ``t`` from the ring, and whether ``t`` is predicted alone."""
        row = t.clamp(0, self.start_table.shape[0] - 1).reshape(1)  # a tensor index (no item() in a graph)
        early = t < self.start_frames
        base = torch.where(early, self.start_table.index_select(0, row)[0], t + self.offset_tensor)
        index = base.clamp(min=0) if last is None else torch.minimum(base, last).clamp(min=0)
        slots = torch.remainder(index, self.slots)
        ring = {k[len("ring.") :]: v.index_select(0, slots) for k, v in state.items() if k.startswith("ring.")}
        refs = [{k: v[i] for k, v in ring.items()} for i in range(self.num_references)]
        return refs, early & self.start_alone.index_select(0, row)[0]

    def _logits(self, target: FrameFeatures, refs: list[FrameFeatures], lay: Layout) -> Tensor:
        """The target's logits aggregated over ``refs`` (none: per frame), at the step's output size."""
        return resize(self.model.aggregate(target, refs)["logits"], lay.logits[1:])

    def _predict(
        self, target: FrameFeatures, state: State, t: Tensor, last: Tensor | None, size: tuple[int, ...], valid: Tensor
    ) -> dict[str, Tensor]:
        lay = self.layout(*size)
        batch = next(iter(target.values())).shape[0]
        refs, alone = self._references(state, t, last) if self.offsets else ([], torch.ones((), dtype=torch.bool))

        def temporal() -> Tensor:
            return self._logits(target, refs, lay)

        def per_frame() -> Tensor:
            return self._logits(target, [], lay)

        if _tracing():
            if not self.temporal_used:
                logits = per_frame()
            elif not self.alone_used:
                logits = temporal()
            else:
                logits = torch.where(alone, per_frame(), temporal())
        elif not bool(valid):
            logits = torch.zeros(batch, *lay.logits, dtype=lay.dtype, device=t.device)
        else:
            logits = per_frame() if bool(alone) else temporal()
        return {"logits": logits, "valid": valid, "index": t}
