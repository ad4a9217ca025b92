"""Training clips: a target frame plus reference frames at the model's offsets (any sign, no 0).

The offsets belong to the model (``model.offsets``; ``data.clip.offsets`` follows them). Evaluation clips
are the model's business too: :meth:`vss.models.aggregators.base.Aggregator.references` is its
start-of-video policy (default: references outside the video clamp to its first / last frame).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ClipSampler:
    """Frame indices of training clips: references first (in offset order), target last.

    With probability ``reverse_prob`` the video is played backwards (official MRCFA ``flip_video``),
    then the target is drawn uniformly among the frames whose references all lie inside the (possibly
    reversed) video: room before it for negative offsets, after it for positive ones (MRCFA: index >= 9
    for offsets [-9,-6,-3]). A video shorter than the clip's span clamps its references into the video.
    """

    offsets: tuple[int, ...] = (-9, -6, -3)
    reverse_prob: float = 0.5

    def __post_init__(self) -> None:
        from vss.offsets import check_offsets

        object.__setattr__(self, "offsets", check_offsets(self.offsets, "data.clip.offsets"))
        if not 0.0 <= self.reverse_prob <= 1.0:
            raise ValueError(f"data.clip.reverse_prob must be in [0, 1], got {self.reverse_prob}")

    @property
    def num_frames(self) -> int:
        """Frames per clip (references + target)."""
        return len(self.offsets) + 1

    @property
    def before(self) -> int:
        """How far back the earliest reference lies (0 when none lies before the target)."""
        return max(0, -min(self.offsets, default=0))

    @property
    def after(self) -> int:
        """How far ahead the latest reference lies (the model's lookahead)."""
        return max((0, *self.offsets))

    def _clamped(self, length: int, t: int) -> list[int]:
        """References outside the video clamp to its first / last frame."""
        if not 0 <= t < length:
            raise IndexError(f"target frame {t} outside a video of {length} frames")
        return [min(length - 1, max(0, t + o)) for o in self.offsets] + [t]

    def train_indices(
        self, length: int, rng: random.Random | None = None, targets: Sequence[int] | None = None
    ) -> list[int]:
        """Random training clip (indices into the original frame order); the target is one of ``targets``.

        ``targets`` are the labelled frames (sparse labels: Cityscapes, CamVid); None means every frame.
        """
        rng = rng or random
        order = list(range(length))
        if rng.random() < self.reverse_prob:
            order.reverse()
        low, high = self.before, length - 1 - self.after
        if targets is None:
            if high < low:  # too short for the whole span: any target, references clamped
                low, high = 0, length - 1
            t = rng.randint(low, high)
        else:
            if not targets:
                raise ValueError("no labelled frame to draw a training target from")
            labelled = set(targets)
            positions = [i for i in range(length) if order[i] in labelled]
            roomy = [i for i in positions if low <= i <= high]
            t = rng.choice(roomy or positions)  # none with room on both sides: references clamped
        return [order[i] for i in self._clamped(length, t)]
