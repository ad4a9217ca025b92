"""Temporal clips: a target frame plus reference frames at fixed negative offsets.

Rule at the start of a video (``start_rule``, evaluation only; training on videos shorter than the
clip span always clamps):

- ``"clamp"`` (default): a reference index before the first frame is clamped to frame 0, i.e. the
  first frame is repeated.
- ``"mrcfa"``: the official MRCFA/CFFM test clips (``prepare_test_img2``), only for offsets
  [-9,-6,-3]: frames 0-2 are *single-frame* targets (predicted by the per-frame branch; their clip is
  the clamped one, only the target is used), frames 3-8 use the fixed clips of :data:`MRCFA_START_CLIPS`,
  frames >= 9 the offsets.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

START_RULES = ("clamp", "mrcfa")
#: Official MRCFA test clips (references, then the target) for targets 3..8 with offsets [-9,-6,-3].
MRCFA_START_CLIPS: dict[int, tuple[int, ...]] = {
    3: (0, 1, 2, 3),
    4: (0, 2, 3, 4),
    5: (0, 2, 4, 5),
    6: (0, 2, 4, 6),
    7: (0, 3, 5, 7),
    8: (0, 3, 6, 8),
}
_MRCFA_OFFSETS = (-9, -6, -3)


@dataclass(frozen=True)
class ClipSampler:
    """Frame indices of clips; references first (in offset order), target last.

    Training: with probability ``reverse_prob`` the video is played backwards (official MRCFA
    ``flip_video``), then the target is drawn uniformly among frames whose references all lie inside
    the video (MRCFA: index >= 9 for offsets [-9,-6,-3]). Evaluation: every frame is a target once.
    """

    offsets: tuple[int, ...] = (-9, -6, -3)
    reverse_prob: float = 0.5
    start_rule: str = "clamp"

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
        if self.start_rule not in START_RULES:
            raise ValueError(f"data.clip.start_rule must be one of {list(START_RULES)}, got {self.start_rule!r}")
        if self.start_rule == "mrcfa" and offsets != _MRCFA_OFFSETS:
            raise ValueError(
                f"data.clip.start_rule='mrcfa' (the official MRCFA test clips) needs data.clip.offsets=[-9,-6,-3], "
                f"got {list(offsets)}; use data.clip.start_rule=clamp with other offsets"
            )
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
        """Clip for target ``t`` of a video of ``length`` frames, following ``start_rule``."""
        if self.start_rule == "mrcfa" and t in MRCFA_START_CLIPS and t < length:
            return list(MRCFA_START_CLIPS[t])
        return self._clamped(length, t)

    def single_frame(self, t: int) -> bool:
        """Whether target ``t`` is predicted from its own frame alone (``start_rule='mrcfa'``: frames 0-2)."""
        return self.start_rule == "mrcfa" and t < min(MRCFA_START_CLIPS)

    def _clamped(self, length: int, t: int) -> list[int]:
        """References before frame 0 clamp to 0."""
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
        return [order[i] for i in self._clamped(length, t)]


def validate_offsets(offsets: Sequence[int], start_rule: str = "clamp") -> tuple[int, ...]:
    """Check ``data.clip.offsets`` (and ``data.clip.start_rule``) early and return the offsets as a tuple."""
    return ClipSampler(tuple(offsets), start_rule=start_rule).offsets
