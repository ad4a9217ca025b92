"""Flicker rate: the share of pixels whose predicted class changes between consecutive frames (no labels).

For one video with predictions ``P_0..P_{T-1}`` (frames passed in temporal order)::

    flicker(video) = sum_t sum_px [P_t != P_{t-1}] / ((T - 1) * H * W)      # t = 1..T-1

and, pooled over videos, the total of changed pixels over the total of compared pixels of all consecutive
pairs of all videos (a longer or larger video weighs more; it is not the mean of the per-video rates).

- Every pixel counts: predictions have no ignore pixels and no labels are read (a predicted value 255 is a
  class like any other).
- A video with a single frame (or no two consecutive frames, see below) has no pair: its rate is NaN (not
  applicable, ``null`` in JSON) and it adds nothing to the pooled figure; pooled is NaN without any pair.
- ``frame_indices`` (optional) mark consecutive frames: a gap (index not previous + 1) ends the run, the pair
  across it is not compared (sparse labels score only labelled frames; 30 frames apart is not flicker).
- The two frames of a pair must have the same size: a ValueError names the video and the frame.

This is the "flicker rate" TV3S users computed for temporal stability on unlabelled video; lower is steadier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from vss.metrics.streaming import StreamingMetric

__all__ = ["FlickerRate", "not_applicable_flicker"]


def not_applicable_flicker() -> str:
    """Why the flicker rate has no value: no two consecutive frames in any video."""
    return "not applicable: the flicker rate needs two consecutive frames in a video and none has them"


class FlickerRate(StreamingMetric):
    """Streaming flicker rate: frames arrive in temporal order, each video contiguous; one frame is buffered.

    ``changed`` and ``compared`` (pixel counts over all pairs) are synced (summed) across processes; the
    per-video counts (:meth:`per_video`) and the previous frame are local, so under DDP every rank must
    receive whole videos. ``forward`` only updates (a per-batch value is meaningless here).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    changed: Tensor
    compared: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("changed", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("compared", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self._clear_stream()

    def _clear_stream(self) -> None:
        """Forget the current video's last frame and the per-video counts."""
        self._video: str | None = None
        self._prev: Tensor | None = None
        self._last_index: int | None = None
        self._position = 0  # frames of the current video so far (names a frame when no indices are given)
        self._counts: dict[str, list[Any]] = {}  # video -> [changed (tensor or 0), compared], arrival order

    def update(
        self, preds: Tensor, video_ids: Sequence[str], frame_indices: Sequence[int] | Tensor | None = None
    ) -> None:
        """Add (N,H,W) class maps of frames in temporal order with their video ids (and frame indices)."""
        if preds.ndim != 3:
            raise ValueError(f"preds {tuple(preds.shape)} must be (N,H,W) class maps")
        if isinstance(video_ids, str):
            raise ValueError("video_ids must be a sequence of video ids, one per frame, not a single string")
        if isinstance(frame_indices, Tensor):
            frame_indices = frame_indices.tolist()
        num = preds.shape[0]
        if len(video_ids) != num or (frame_indices is not None and len(frame_indices) != num):
            given = "no" if frame_indices is None else len(frame_indices)
            raise ValueError(f"got {num} frames but {len(video_ids)} video ids and {given} frame indices")
        for k in range(num):
            self._add_frame(preds[k], str(video_ids[k]), None if frame_indices is None else int(frame_indices[k]))
        if self._prev is not None:
            self._prev = self._prev.clone()  # keep the last frame only, so the caller's batch is not pinned

    def _add_frame(self, pred: Tensor, video: str, index: int | None) -> None:
        """Compare ``pred`` with the video's previous frame (if consecutive) and keep it."""
        pair = video == self._video and self._prev is not None
        if video != self._video:
            if video in self._counts:
                raise ValueError(
                    f"video {video!r} reappears after other videos started; each video's frames must "
                    "arrive contiguously (and under DDP on a single rank)"
                )
            self._counts[video] = [0, 0]
            self._video, self._position = video, 0
        elif index is not None and self._last_index is not None:
            if index <= self._last_index:
                raise ValueError(
                    f"video {video!r}: frame index {index} arrived after {self._last_index}; frames must "
                    "arrive in increasing temporal order"
                )
            pair = pair and index == self._last_index + 1  # a gap ends the run
        if pair:
            assert self._prev is not None
            if pred.shape != self._prev.shape:
                raise ValueError(
                    f"video {video!r}: frame {self._position if index is None else index} is {tuple(pred.shape)} "
                    "but the frame before it is "
                    f"{tuple(self._prev.shape)}; the flicker rate compares frames of one size"
                )
            changed = (pred != self._prev.to(pred.device)).sum()  # a device tensor: no sync per frame
            counts = self._counts[video]
            counts[0] = counts[0] + changed
            counts[1] += pred.numel()
            self.changed += changed.to(self.changed.device)
            self.compared += pred.numel()
        self._prev, self._last_index = pred, index
        self._position += 1

    def compute(self) -> Tensor:
        """Pooled rate: changed / compared pixels over all pairs of all videos (float64); NaN without a pair."""
        if int(self.compared) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.changed.device)
        return self.changed.to(torch.float64) / self.compared.to(torch.float64)

    def per_video(self) -> dict[str, float]:
        """Each video's rate (this process's videos, arrival order); NaN for a video without a pair."""
        return {v: int(c) / n if n else math.nan for v, (c, n) in self._counts.items()}

    def summary(self) -> dict[str, Any]:
        """For JSON: ``pooled`` and ``per_video`` rates (None: no pair) and the pixel counts behind ``pooled``."""
        pooled = float(self.compute())
        return {
            "pooled": None if math.isnan(pooled) else pooled,
            "per_video": {v: None if math.isnan(r) else r for v, r in self.per_video().items()},
            "changed_pixels": int(self.changed),
            "compared_pixels": int(self.compared),
        }
