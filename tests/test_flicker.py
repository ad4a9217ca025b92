"""The label-free flicker rate (vss.metrics.flicker) on hand-made predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vss.metrics import FlickerRate

# 3 frames of 2x2: one of 4 pixels changes, then two of 4 -> (1 + 2) / (2 * 4) = 3/8
VIDEO_A = [[[0, 1], [2, 3]], [[0, 1], [2, 0]], [[1, 1], [0, 0]]]
# 2 frames of 3x1 (another size is fine across videos): 3 of 3 change -> 3/3
VIDEO_B = [[[0], [0], [0]], [[1], [1], [1]]]


def t(frames: list) -> torch.Tensor:
    return torch.tensor(frames, dtype=torch.uint8)


def test_one_video_hand_computed() -> None:
    m = FlickerRate()
    m.update(t(VIDEO_A), ["a"] * 3)
    assert float(m.compute()) == pytest.approx(3 / 8)
    assert m.per_video() == {"a": pytest.approx(3 / 8)}
    assert m.summary() == {"pooled": 3 / 8, "per_video": {"a": 3 / 8}, "changed_pixels": 3, "compared_pixels": 8}


def test_frames_one_at_a_time_equal_one_batch() -> None:
    m = FlickerRate()
    for k, frame in enumerate(VIDEO_A):
        m.update(t([frame]), ["a"], [k])
    assert float(m.compute()) == pytest.approx(3 / 8)


def test_two_videos_pooled_over_pixels_not_videos() -> None:
    """Pooled = (3 + 3) / (8 + 3) = 6/11, not the mean of 3/8 and 1; the pair across the videos is not compared."""
    m = FlickerRate()
    m.update(t(VIDEO_A), ["a"] * 3, [0, 1, 2])
    m.update(t(VIDEO_B), ["b"] * 2, [0, 1])
    assert float(m.compute()) == pytest.approx(6 / 11)
    assert m.per_video() == {"a": pytest.approx(3 / 8), "b": pytest.approx(1.0)}


def test_one_frame_video_has_no_pair() -> None:
    """A single frame: NaN (None in the summary) and nothing added to the pooled figure."""
    m = FlickerRate()
    m.update(t(VIDEO_A[:1]), ["single"])
    assert math.isnan(float(m.compute())) and math.isnan(m.per_video()["single"])
    assert m.summary()["pooled"] is None and m.summary()["per_video"] == {"single": None}
    m.update(t(VIDEO_A), ["a"] * 3)
    assert float(m.compute()) == pytest.approx(3 / 8)
    assert m.summary()["per_video"] == {"single": None, "a": 3 / 8}


def test_index_gap_ends_the_run() -> None:
    """Frames 0, 1, 3: only the pair (0, 1) is compared -> 1/4 (sparse labels: a gap is not flicker)."""
    m = FlickerRate()
    m.update(t(VIDEO_A), ["a"] * 3, [0, 1, 3])
    assert float(m.compute()) == pytest.approx(1 / 4)


def test_ignore_value_is_a_class_like_any_other() -> None:
    m = FlickerRate()
    m.update(t([[[255, 0]], [[255, 255]]]), ["a", "a"])
    assert float(m.compute()) == pytest.approx(1 / 2)


def test_errors_name_the_video() -> None:
    m = FlickerRate()
    m.update(t(VIDEO_A[:1]), ["clip7"], [4])
    with pytest.raises(ValueError, match=r"video 'clip7': frame 5 is \(3, 1\) but the frame before it is \(2, 2\)"):
        m.update(t(VIDEO_B[:1]), ["clip7"], [5])
    m = FlickerRate()
    m.update(t(VIDEO_A[:1]), ["clip7"])
    with pytest.raises(ValueError, match=r"video 'clip7': frame 1 is \(3, 1\)"):  # no indices: its position
        m.update(t(VIDEO_B[:1]), ["clip7"])
    m = FlickerRate()
    m.update(t(VIDEO_A[:2]), ["a", "a"], [0, 1])
    with pytest.raises(ValueError, match="frame index 1 arrived after 1"):
        m.update(t(VIDEO_A[:1]), ["a"], [1])
    m.update(t(VIDEO_B[:1]), ["b"])
    with pytest.raises(ValueError, match="video 'a' reappears"):
        m.update(t(VIDEO_A[:1]), ["a"])
    with pytest.raises(ValueError, match=r"\(N,H,W\)"):
        m.update(t(VIDEO_A[0]), ["a"])


def test_reset_and_random_videos_equal_numpy() -> None:
    rng = np.random.default_rng(0)
    videos = {f"v{i}": rng.integers(0, 3, size=(int(rng.integers(1, 6)), 4, 5)) for i in range(5)}
    m = FlickerRate()
    m.update(t(VIDEO_A), ["x"] * 3)
    m.reset()
    changed = compared = 0
    for name, frames in videos.items():
        m.update(torch.from_numpy(frames), [name] * len(frames))
        changed += int((frames[1:] != frames[:-1]).sum())
        compared += frames[1:].size
    assert float(m.compute()) == pytest.approx(changed / compared)
    for name, frames in videos.items():
        expected = (frames[1:] != frames[:-1]).mean() if len(frames) > 1 else math.nan
        assert m.per_video()[name] == pytest.approx(expected, nan_ok=True)
