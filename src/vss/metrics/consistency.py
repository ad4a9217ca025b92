"""Video Consistency VC_n with exact parity to the official VSPW ``VC_perclip.get_common``.

Official definition, for each video with more than ``n`` frames::

    for i in range(len(frames) - n):            # the last window (start len-n) is never used
        g = AND_{j=1..n-1} (G[i] == G[i+j])     # raw GT values: 0 "others" and 255 "void" differ
        p = AND_{j=1..n-1} (P[i] == P[i+j])
        acc_i = sum(g & p) / sum(g)             # NaN if sum(g) == 0, dropped by nanmean
    VC_n = nanmean(acc_i over all windows of all videos)

Ignore pixels are *not* excluded. With sparse labels (Cityscapes, CamVid) only labelled frames are
passed in; a gap in the frame indices ends a run as the end of a video does, so VC_n is computed over
the runs of consecutive labelled frames (none longer than ``n``: no window, NaN = not applicable).

Note: MRCFA/CFFM's copy remaps the GT first and skips videos with ``len <= 16`` for both VC8 and
VC16; this module follows the VSPW_code definition (skip ``len <= n``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vss.metrics.streaming import StreamingMetric

__all__ = ["VideoConsistency", "not_applicable_vc", "video_consistency"]


def video_consistency(
    preds_per_video: Sequence[np.ndarray | Tensor],
    gts_per_video: Sequence[np.ndarray | Tensor],
    n: int,
) -> float:
    """Plain (non-streaming) VC_n over lists of (T,H,W) prediction and raw-GT arrays; NaN if no window."""
    _check_n(n)
    if len(preds_per_video) != len(gts_per_video):
        raise ValueError(f"{len(preds_per_video)} prediction videos but {len(gts_per_video)} GT videos")
    accs: list[float] = []
    for vid, (pred, gt) in enumerate(zip(preds_per_video, gts_per_video, strict=True)):
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape or pred.ndim != 3:
            raise ValueError(f"video {vid}: preds {pred.shape} and GT {gt.shape} must both be (T,H,W)")
        num_frames = gt.shape[0]
        if num_frames <= n:
            continue
        for i in range(num_frames - n):
            g = np.ones(gt.shape[1:], dtype=bool)
            p = np.ones(gt.shape[1:], dtype=bool)
            for j in range(1, n):
                g &= gt[i] == gt[i + j]
                p &= pred[i] == pred[i + j]
            den = int(g.sum())
            if den > 0:
                accs.append(int((g & p).sum()) / den)
    return math.fsum(accs) / len(accs) if accs else float("nan")


def not_applicable_vc(n: int) -> str:
    """Why mVC_n has no value: no video (or run of consecutive labelled frames) longer than ``n`` frames."""
    return (
        f"not applicable: VC_{n} needs more than {n} consecutive labelled frames in a video and none has them "
        "(sparse labels, or videos too short)"
    )


def _check_n(n: int) -> None:
    """Validate the window length."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"VC window length n must be a positive int, got {n!r}")


def _advance_run(run: Tensor, changed: Tensor, n: int) -> None:
    """In place: run length of identical values ending at the new frame, capped at ``n``."""
    run.add_(1).clamp_(max=n).masked_fill_(changed, 1)


class VideoConsistency(StreamingMetric):
    """Streaming VC_n: frames arrive in temporal order, each video contiguous; only O(H*W) is buffered.

    Instead of keeping the last ``n`` frames, the metric keeps, per pixel, the length of the run of
    identical values ending at the latest frame (capped at ``n``) for GT and prediction: the window
    ending at frame ``k`` is constant exactly where that run length is ``>= n``. When frame ``k >= n``
    of a video arrives, the window ``k-n..k-1`` is complete and known not to be the video's last
    window, so it is committed then; this drops window ``len-n`` and skips videos with ``len <= n``
    exactly like the official loop.

    Only ``ratio_sum`` and ``windows`` are synced (summed) across processes. The per-video run state
    is local, so under DDP every rank must receive whole videos (no video split across ranks, no
    padded duplicate frames). ``forward`` only updates (a per-batch value is meaningless here).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    ratio_sum: Tensor
    windows: Tensor

    def __init__(self, n: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_n(n)
        self.n = n
        self.add_state("ratio_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("windows", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self._clear_stream()

    def _clear_stream(self) -> None:
        """Forget the current video and the list of finished ones."""
        self._video: str | None = None
        self._last_index: int | None = None
        self._count = 0  # frames of the current video seen so far
        self._prev_gt: Tensor | None = None
        self._prev_pred: Tensor | None = None
        self._run_gt: Tensor | None = None
        self._run_pred: Tensor | None = None
        self._finished: set[str] = set()

    def update(
        self,
        preds: Tensor,
        target_raw: Tensor,
        video_ids: Sequence[str],
        frame_indices: Sequence[int] | Tensor,
    ) -> None:
        """Add (N,H,W) predictions and raw GT masks of frames in temporal order with their video ids."""
        if preds.shape != target_raw.shape or preds.ndim != 3:
            raise ValueError(
                f"preds {tuple(preds.shape)} and target_raw {tuple(target_raw.shape)} must both be (N,H,W)"
            )
        if isinstance(frame_indices, Tensor):
            frame_indices = frame_indices.tolist()
        if isinstance(video_ids, str):
            raise ValueError("video_ids must be a sequence of video ids, one per frame, not a single string")
        num = preds.shape[0]
        if len(video_ids) != num or len(frame_indices) != num:
            msg = f"got {num} frames but {len(video_ids)} video ids and {len(frame_indices)} frame indices"
            raise ValueError(msg)
        for k in range(num):
            self._add_frame(preds[k], target_raw[k], str(video_ids[k]), int(frame_indices[k]))
        if self._prev_gt is not None and self._prev_pred is not None:
            # Keep a copy of the last frame only, so the caller's batch is not pinned.
            self._prev_gt, self._prev_pred = self._prev_gt.clone(), self._prev_pred.clone()

    def _add_frame(self, pred: Tensor, gt: Tensor, video: str, index: int) -> None:
        """Advance the stream by one frame, committing the window that ends just before it."""
        if video != self._video:
            if video in self._finished:
                raise ValueError(
                    f"video {video!r} reappears after other videos started; each video's frames must "
                    "arrive contiguously (and under DDP on a single rank)"
                )
            if self._video is not None:
                self._finished.add(self._video)
            self._video, self._last_index, self._count = video, None, 0
        elif self._last_index is not None and index <= self._last_index:
            raise ValueError(
                f"video {video!r}: frame index {index} arrived after {self._last_index}; frames must "
                "arrive in increasing temporal order"
            )
        elif self._last_index is not None and index != self._last_index + 1:
            self._count = 0  # sparse labels: a gap ends the run of consecutive frames, as the end of a video
        if self._count == 0:
            run_dtype = torch.uint8 if self.n < 255 else torch.int32
            self._run_gt = torch.ones(gt.shape, dtype=run_dtype, device=gt.device)
            self._run_pred = torch.ones(pred.shape, dtype=run_dtype, device=pred.device)
        else:
            assert self._prev_gt is not None and self._prev_pred is not None
            assert self._run_gt is not None and self._run_pred is not None
            if gt.shape != self._prev_gt.shape:
                raise ValueError(
                    f"video {video!r}: frame {index} is {tuple(gt.shape)} but earlier frames are "
                    f"{tuple(self._prev_gt.shape)}"
                )
            if self._count >= self.n:
                # Frames count-n..count-1 form a complete window that is not the video's last one.
                self._commit(self._run_gt >= self.n, self._run_pred >= self.n)
            _advance_run(self._run_gt, gt != self._prev_gt, self.n)
            _advance_run(self._run_pred, pred != self._prev_pred, self.n)
        self._prev_gt, self._prev_pred = gt, pred
        self._last_index = index
        self._count += 1

    def _commit(self, g: Tensor, p: Tensor) -> None:
        """Add one window's ratio sum(g & p) / sum(g), skipping it (NaN) when sum(g) == 0."""
        den = g.sum()
        num = (g & p).sum()
        valid = den > 0
        ratio = torch.where(valid, num.to(torch.float64) / den.clamp_min(1).to(torch.float64), 0.0)
        self.ratio_sum += ratio.to(self.ratio_sum.device)
        self.windows += valid.to(self.windows.device, torch.int64)

    def compute(self) -> Tensor:
        """Pooled mean of the per-window ratios (float64); NaN if no window was committed."""
        if int(self.windows) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.ratio_sum.device)
        return self.ratio_sum / self.windows.to(torch.float64)
