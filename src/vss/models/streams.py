"""Many streams at once: :class:`Streams`, the fixed-shape :class:`~vss.models.step.Step` batched over ``B``
independent videos (several cameras served by one model), each with its own state slot and start-of-video
position.

:class:`Step` advances its ``B`` videos in lockstep (one scalar ``count``); here ``count`` has shape (B,), and every
per-frame quantity of the step is gathered per stream: the ring slot a frame is written to (``count[b] % S``),
the pending slot of its target, the row of the start table and whether the target is predicted alone, the
reference slots, the end-of-video clamp and ``valid``. The per-frame vs temporal branch is chosen per stream with
``torch.where`` (both branches computed only when the batch mixes them in eager mode, always under tracing or
CUDA-graph capture); nothing reads a tensor on the host under tracing.

``active`` (bool, (B,)) says which streams have a frame in this call: an inactive stream's slot keeps its state
(its ring and pending slots are written back unchanged, its count does not advance) and its output is not
``valid``; its frame is computed (the batch has a fixed shape) and discarded. :meth:`reset` starts a new video
in a slot while the others run (in place, so a captured graph's static state sees it); :meth:`flush` gives the
``lookahead`` frames still pending in one stream at its end.

Why a subclass rather than a (B,) count inside :class:`Step`: the lockstep step is what ``vss.export`` exports
(ONNX / ``torch.export``, checked against ONNX Runtime); its graph keeps its scalar indices and ops
(``index_copy`` / ``index_select`` on one slot), while the per-stream gathers here (advanced indexing with a
(B,) slot per stream) are a different graph. Both share the policy table, the layout and the state's layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vss.models.aggregators.base import FrameFeatures
from vss.models.step import State, Step, _tracing


class Streams(Step):
    """:class:`Step` over independent streams: ``count`` (B,), ``step(frames, state, active)``, ``reset``,
    ``flush`` per stream; see the module docstring."""

    def init_state(self, height: int, width: int, batch: int = 1) -> State:
        """The zero state of ``batch`` stream slots (every stream at the start of a video)."""
        state = super().init_state(height, width, batch)
        state["count"] = torch.zeros(batch, dtype=torch.int64, device=state["count"].device)
        return state

    @staticmethod
    def reset(state: State, slot: int | Tensor) -> State:
        """Start a new video in ``slot`` (an index or a (B,) bool mask), in place: its count goes to 0 (its ring
        and pending slots are overwritten before any target reads them)."""
        count = state["count"]
        if isinstance(slot, Tensor) and slot.dtype == torch.bool:
            count.masked_fill_(slot.to(count.device), 0)
        else:
            count[slot] = 0
        return state

    @torch.no_grad()
    def step(self, frame: Tensor, state: State, active: Tensor | None = None) -> tuple[dict[str, Tensor], State]:
        """Push one frame (B,3,H,W) per active stream; predict each stream's target ``count[b] - lookahead``.
        Outputs: ``logits`` (B,C,h,w), ``valid`` (B,) (false for an inactive stream or ``t < 0``), ``index`` (B,)."""
        n = state["count"]
        batch = n.shape[0]
        on = torch.ones(batch, dtype=torch.bool, device=n.device) if active is None else active.to(n.device)
        streams = torch.arange(batch, device=n.device)
        feats = self.model.encode(frame)
        new = dict(state)

        def write(buffer: Tensor, slot: Tensor, value: Tensor) -> Tensor:
            keep = buffer[slot, streams]  # an inactive stream writes its slot back unchanged
            value = torch.where(on.view(-1, *[1] * (value.dim() - 1)), value, keep)
            return buffer.index_put((slot, streams), value)

        if self.offsets:
            slot = torch.remainder(n, self.slots)
            for k, v in self.model.reference_features(feats).items():
                new[f"ring.{k}"] = write(state[f"ring.{k}"], slot, v)
        if self.lookahead:
            slot = torch.remainder(n, self.pending_slots)
            for k, v in feats.items():
                new[f"pending.{k}"] = write(state[f"pending.{k}"], slot, v)
        t = n - self.lookahead
        target = self._pending(new, t) if self.lookahead else feats
        out = self._predict(target, new, t, last=None, size=tuple(frame.shape[-2:]), valid=(t >= 0) & on)
        new["count"] = n + on.to(n.dtype)
        return out, new

    @torch.no_grad()
    def flush(self, state: State, height: int, width: int, slot: int = 0) -> list[dict[str, Tensor]]:  # type: ignore[override]
        """End of the video in ``slot``: one output (batch 1) per frame still pending there (``lookahead`` of
        them, those before frame 0 not valid), references clamped to its last frame; :meth:`reset` it next."""
        one = {k: v[slot : slot + 1] if k == "count" else v[:, slot : slot + 1] for k, v in state.items()}
        n = one["count"]
        outs = []
        for k in range(self.lookahead):
            t = n - self.lookahead + k
            valid = (t >= 0) & (t < n)
            outs.append(self._predict(self._pending(one, t), one, t, last=n - 1, size=(height, width), valid=valid))
        return outs

    # -- per-stream gathers --------------------------------------------------------------------------
    def _pending(self, state: State, t: Tensor) -> FrameFeatures:
        slot = torch.remainder(t, self.pending_slots)
        streams = torch.arange(t.shape[0], device=t.device)
        return {k[len("pending.") :]: v[slot, streams] for k, v in state.items() if k.startswith("pending.")}

    def _references(self, state: State, t: Tensor, last: Tensor | None) -> tuple[list[FrameFeatures], Tensor]:
        """Each stream's references from its ring slot (B,R gathered indices) and whether its target is alone."""
        row = t.clamp(0, self.start_table.shape[0] - 1)  # (B,)
        early = t < self.start_frames
        base = torch.where(early[:, None], self.start_table[row], t[:, None] + self.offset_tensor)  # (B,R)
        index = base.clamp(min=0) if last is None else torch.minimum(base, last[:, None]).clamp(min=0)
        slots = torch.remainder(index, self.slots)
        streams = torch.arange(t.shape[0], device=t.device)
        ring = {k[len("ring.") :]: v for k, v in state.items() if k.startswith("ring.")}
        refs = [{k: v[slots[:, i], streams] for k, v in ring.items()} for i in range(self.num_references)]
        return refs, early & self.start_alone[row]

    def _predict(
        self, target: FrameFeatures, state: State, t: Tensor, last: Tensor | None, size: tuple[int, ...], valid: Tensor
    ) -> dict[str, Tensor]:
        lay = self.layout(*size)
        batch = t.shape[0]
        if self.offsets:
            refs, alone = self._references(state, t, last)
        else:
            refs, alone = [], torch.ones(batch, dtype=torch.bool, device=t.device)

        def temporal() -> Tensor:
            return self._logits(target, refs, lay)

        def per_frame() -> Tensor:
            return self._logits(target, [], lay)

        def mixed() -> Tensor:
            return torch.where(alone.view(-1, 1, 1, 1), per_frame(), temporal())

        if _tracing():
            logits = per_frame() if not self.temporal_used else temporal() if not self.alone_used else mixed()
        else:
            alone_wanted, temporal_wanted = bool((valid & alone).any()), bool((valid & ~alone).any())
            if not (alone_wanted or temporal_wanted):
                logits = torch.zeros(batch, *lay.logits, dtype=lay.dtype, device=t.device)
            else:
                logits = mixed() if alone_wanted and temporal_wanted else per_frame() if alone_wanted else temporal()
                logits = torch.where(valid.view(-1, 1, 1, 1), logits, torch.zeros((), dtype=logits.dtype))
        return {"logits": logits, "valid": valid, "index": t}
