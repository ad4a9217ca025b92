"""Temporal clips: a target frame plus reference frames at fixed negative offsets.

Rule at the start of a video (evaluation, and training on videos shorter than the clip span): a
reference index before the first frame is clamped to frame 0, i.e. the first frame is repeated.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ClipSampler:
    """Frame indices of clips; references first (in offset order), target last.

    Training: with probability ``reverse_prob`` the video is played backwards (official MRCFA
    ``flip_video``), then the target is drawn uniformly among frames whose references all lie inside
    the video (MRCFA: index >= 9 for offsets [-9,-6,-3]). Evaluation: every frame is a target once.
    """

    offsets: tuple[int, ...] = (-9, -6, -3)
    reverse_prob: float = 0.5

    def __post_init__(self) -> None:
        offsets = tuple(int(o) for o in self.offsets)
        if any(o >= 0 for o in offsets):
            raise ValueError(
                f"data.clip.offsets must be negative integers (frames before the target), got {list(offsets)}"
            )
        if len(set(offsets)) != len(offsets):
            raise ValueError(f"data.clip.offsets must not repeat a value, got {list(offsets)}")
        if list(offsets) != sorted(offsets):
            raise ValueError(f"data.clip.offsets must be in increasing order (e.g. [-9,-6,-3]), got {list(offsets)}")
        if not 0.0 <= self.reverse_prob <= 1.0:
            raise ValueError(f"data.clip.reverse_prob must be in [0, 1], got {self.reverse_prob}")
        object.__setattr__(self, "offsets", offsets)

    @property
    def num_frames(self) -> int:
        """Frames per clip (references + target)."""
        return len(self.offsets) + 1

    @property
    def span(self) -> int:
        """How far back the earliest reference lies."""
        return -min(self.offsets, default=0)

    def eval_indices(self, length: int, t: int) -> list[int]:
        """Clip for target ``t`` of a video of ``length`` frames; references before frame 0 clamp to 0."""
        if not 0 <= t < length:
            raise IndexError(f"target frame {t} outside a video of {length} frames")
        return [max(0, t + o) for o in self.offsets] + [t]

    def train_indices(self, length: int, rng: random.Random | None = None) -> list[int]:
        """Random training clip (indices into the original frame order)."""
        rng = rng or random
        order = list(range(length))
        if rng.random() < self.reverse_prob:
            order.reverse()
        low = self.span if length > self.span else 0
        t = rng.randint(low, length - 1)
        return [order[i] for i in self.eval_indices(length, t)]


def validate_offsets(offsets: Sequence[int]) -> tuple[int, ...]:
    """Check ``data.clip.offsets`` early and return them as a tuple."""
    return ClipSampler(tuple(offsets)).offsets
