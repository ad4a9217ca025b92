"""Streaming inference: each frame is encoded once, references come from a cache of per-frame features.

``Streamer`` is the inference loop of every model, as ``generate`` sits beside a language model: evaluation
(``vss.eval mode=stream`` and validation during training), ``vss.predict`` and ``vss.bench`` all run through
it. It keeps the :data:`FrameFeatures` of the frames still needed (keyed by frame index; once a frame is
predicted only its ``reference_features`` are kept, and it is evicted as soon as no later target can
reference it), waits ``lookahead`` frames for non-causal models, flushes at
the end of a video (references past the last frame clamp to it, as the model's policy says) and resets per
video. New frames are encoded in batches of up to ``batch_size``; targets that become ready together and
read the same number of references are aggregated in batches of up to ``aggregate_batch_size`` (default 1:
on 480p frames MRCFA's per-token affinity maps outgrow the CPU caches, and one target at a time was 0.43 s
against 0.60 s per target in batches of 4; on tiny frames batches save a little Python overhead).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vss.models.aggregators.base import FrameFeatures
from vss.models.segmenter import Segmenter


@dataclass
class StreamOutput:
    """The prediction of one target frame: its index in the video, what was pushed with it, its logits (C,h,w)."""

    index: int
    item: Any
    logits: Tensor


def unbatch(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A collated batch -> one dict per sample (tensors sliced on dim 0, lists indexed)."""
    n = len(batch["images"])
    return [
        {k: v[i] if isinstance(v, Tensor | list | tuple) and len(v) == n else v for k, v in batch.items()}
        for i in range(n)
    ]


class Streamer:
    """Runs a :class:`Segmenter` over the frames of one video after another; see the module docstring."""

    def __init__(self, model: Segmenter, batch_size: int = 8, aggregate_batch_size: int = 1) -> None:
        for key, value in (("batch_size", batch_size), ("aggregate_batch_size", aggregate_batch_size)):
            if int(value) < 1:
                raise ValueError(f"Streamer {key} must be a positive integer, got {value!r}")
        self.model, self.batch_size, self.aggregate_batch_size = model, int(batch_size), int(aggregate_batch_size)
        self.reset()

    def reset(self) -> None:
        """Forget the current video."""
        self.cache: dict[int, FrameFeatures] = {}
        self.items: dict[int, Any] = {}
        self.count = 0  # frames pushed so far
        self.next = 0  # the next target to predict
        self.video: Any = None

    @torch.no_grad()
    def push(self, frames: Tensor, items: Sequence[Any] | None = None) -> list[StreamOutput]:
        """Add the next frames (N,3,H,W) of the current video; return the targets that became ready."""
        if frames.ndim == 3:
            frames = frames.unsqueeze(0)
        items = [None] * len(frames) if items is None else list(items)
        if len(items) != len(frames):
            raise ValueError(f"Streamer.push: {len(frames)} frames but {len(items)} items")
        for start in range(0, len(frames), self.batch_size):
            feats = self.model.encode(frames[start : start + self.batch_size])
            for j in range(len(next(iter(feats.values())))):
                self.cache[self.count] = {k: v[j : j + 1] for k, v in feats.items()}
                self.items[self.count] = items[start + j]
                self.count += 1
        return self._emit(length=None)

    @torch.no_grad()
    def end(self) -> list[StreamOutput]:
        """End of the video: predict every target still waiting, then reset for the next video."""
        out = self._emit(length=self.count)
        self.reset()
        return out

    def feed(self, batch: Mapping[str, Any]) -> list[StreamOutput]:
        """A loader batch of frames with ``video`` and ``frame`` (consecutive frames, videos in order):
        push each run of one video, ending the previous video where a new one starts."""
        out: list[StreamOutput] = []
        samples = unbatch(batch)
        i = 0
        while i < len(samples):
            video = samples[i]["video"]
            j = i
            while j < len(samples) and samples[j]["video"] == video:
                j += 1
            if video != self.video and self.count:
                out += self.end()
            self.video = video
            first = int(samples[i]["frame"])
            if first != self.count:
                raise ValueError(
                    f"Streamer: video {video!r} frame {first} arrived after {self.count} frame(s); a stream needs "
                    "every frame of a video in order (an unshuffled loader over whole videos)"
                )
            out += self.push(batch["images"][i:j], samples[i:j])
            i = j
        return out

    def finish(self) -> list[StreamOutput]:
        """End of the input: flush the last video (``end``) if any frame is pending."""
        return self.end() if self.count else []

    def run(self, frames: Iterable[Tensor]) -> Iterator[StreamOutput]:
        """Predict every frame of one video given as an iterable of (3,H,W) or (N,3,H,W) tensors, in order."""
        self.reset()
        for f in frames:
            yield from self.push(f)
        yield from self.end()

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _emit(self, length: int | None) -> list[StreamOutput]:
        """Aggregate every target whose references have all arrived (all of them when ``length`` is known)."""
        last_ready = self.count - 1 - (0 if length is not None else self.model.lookahead)
        ready = list(range(self.next, last_ready + 1))
        if not ready:
            return []
        refs = {t: self.model.references(t, length) for t in ready}
        groups: dict[int, list[int]] = {}
        for t in ready:
            groups.setdefault(len(refs[t]), []).append(t)
        size = self.aggregate_batch_size
        chunks = [(n, ts[i : i + size]) for n, ts in groups.items() for i in range(0, len(ts), size)]
        logits: dict[int, Tensor] = {}
        for n, targets in chunks:
            target = self._stack(targets)
            references = [self._stack([refs[t][k] for t in targets]) for k in range(n)]
            out = self.model.aggregate(target, references)["logits"]
            logits.update({t: out[i] for i, t in enumerate(targets)})
        self.next = ready[-1] + 1
        self._evict(length)
        for t in ready:  # predicted: from now on only a reference, so keep only what references are read for
            if t in self.cache:
                self.cache[t] = self.model.reference_features(self.cache[t])
        return [StreamOutput(t, self.items.pop(t), logits[t]) for t in ready]

    def _stack(self, indices: Sequence[int]) -> FrameFeatures:
        missing = [i for i in indices if i not in self.cache]
        if missing:
            raise RuntimeError(
                f"Streamer: frame(s) {missing} were evicted but are still referenced; the model's start-of-video "
                "policy (references) must not reach further back for a later target"
            )
        if len(indices) == 1:
            return self.cache[indices[0]]
        return {k: torch.cat([self.cache[i][k] for i in indices]) for k in self.cache[indices[0]]}

    def _evict(self, length: int | None) -> None:
        """Drop the features of frames no later target reads.

        A policy reads frames within ``span`` (the earliest offset) before its target, so the targets
        ``next .. next + span`` are the only ones that can still read a frame before ``next``.
        """
        if length is not None and self.next >= length:
            self.cache.clear()
            return
        span = max(0, -min(self.model.offsets, default=0))
        last = self.next + span if length is None else min(length - 1, self.next + span)
        keep_from = min([self.next, *(r for t in range(self.next, last + 1) for r in self.model.references(t, length))])
        for i in [i for i in self.cache if i < keep_from]:
            del self.cache[i]
