"""Helpers of the model contract battery (tests/test_contract.py), shared with the method test files: the clip
path and the stream path over one video, and their comparison."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vss.models.segmenter import Segmenter
from vss.models.streamer import Streamer, StreamOutput

LOGIT_ATOL = 1e-4  # stream vs clip: the same arithmetic batched differently
TIE = 1e-5  # top-2 logits closer than this may swap under float rounding


def clip_path(model: Segmenter, video: Tensor) -> list[Tensor]:
    """Logits (C,h,w) of every frame of ``video`` (N,3,H,W) by the clip path: for target t the clip is
    ``video[model.references(t, N) + [t]]`` through ``model(clip)``."""
    n = len(video)
    with torch.no_grad():
        return [model(video[[*model.references(t, n), t]].unsqueeze(0))["logits"][0] for t in range(n)]


def stream(
    model: Segmenter, video: Tensor, batch_size: int, chunk: int | None = None, streamer: Streamer | None = None
) -> list[StreamOutput]:
    """Every frame of ``video`` (N,3,H,W) through ``streamer`` (default: a new :class:`Streamer` of
    ``batch_size``), ``chunk`` frames a push (default: the batch size), then ``end``.

    Checks on the way: frame k is pushed with item k and comes back with it; a push of one frame k returns
    target ``k - lookahead`` (none before), ``end`` the rest; each frame is predicted once, in order; between
    pushes the cache holds at most ``span + lookahead`` frames (span = the farthest reference back) and it is
    empty after ``end``.
    """
    streamer = streamer or Streamer(model, batch_size, aggregate_batch_size=batch_size)
    chunk = chunk or batch_size
    span = max(0, -min(model.offsets, default=0))
    lookahead = model.lookahead
    out: list[StreamOutput] = []
    for start in range(0, len(video), chunk):
        frames = video[start : start + chunk]
        ready = streamer.push(frames, list(range(start, start + len(frames))))
        if chunk == 1:
            expected = [start - lookahead] if start >= lookahead else []
            assert [o.index for o in ready] == expected, f"push of frame {start} returned {[o.index for o in ready]}"
        assert len(streamer.cache) <= span + lookahead, (
            f"after frame {start + len(frames) - 1} the cache holds frames {sorted(streamer.cache)} "
            f"(span {span}, lookahead {lookahead})"
        )
        out += ready
    out += streamer.end()
    assert not streamer.cache and streamer.count == 0, "end() must reset the stream"
    assert [o.index for o in out] == list(range(len(video))), f"streamed targets {[o.index for o in out]}"
    assert [o.item for o in out] == list(range(len(video))), "each target must come back with its own item"
    return out


def assert_logits_match(got: Tensor, expected: Tensor, what: str = "") -> None:
    """Logits within :data:`LOGIT_ATOL`; class maps identical except where the expected top-2 logits tie
    within :data:`TIE`."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    err = (got - expected).abs().max().item()
    assert err <= LOGIT_ATOL, f"{what}: logits differ by {err:.3g} (> {LOGIT_ATOL})"
    top2 = expected.topk(2, dim=0).values
    tie = (top2[0] - top2[1]) <= TIE
    differ = (got.argmax(0) != expected.argmax(0)) & ~tie
    assert not differ.any(), f"{what}: argmax differs at {int(differ.sum())} pixel(s) without a tie"


def assert_stream_equals_clip(
    model: Segmenter, video: Tensor, batch_sizes: Sequence[int] = (1, 4), label: str = ""
) -> None:
    """The stream path (each batch size; size 1 pushed frame by frame, others in pushes of size + 1 so that
    encode batches do not line up with pushes, after a short unrelated video on the same streamer, which
    ``end`` must forget) gives the clip path's logits for every frame."""
    expected = clip_path(model, video)
    for bs in batch_sizes:
        chunk = 1 if bs == 1 else bs + 1
        streamer = Streamer(model, bs, aggregate_batch_size=bs)  # batched aggregation too
        if bs > 1:  # a previous video on the same Streamer must not leak into the next one
            streamer.push(torch.randn(3, *video.shape[1:], generator=torch.Generator().manual_seed(99)))
            streamer.end()
        for o in stream(model, video, bs, chunk, streamer):
            assert_logits_match(o.logits, expected[o.index], f"{label} batch_size={bs} frame {o.index}")
