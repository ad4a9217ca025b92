"""Tests for temporal clip indices (vss.data.clips) and clip-consistent augmentation (vss.data.transforms)."""

from __future__ import annotations

import random
from collections import Counter

import albumentations as A
import numpy as np
import pytest
import torch

from vss.data.clips import ClipSampler
from vss.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AlignedResize,
    CatMaxRatioCrop,
    KeepRatioRescale,
    build_eval_transform,
    build_train_transform,
    keep_ratio_size,
)
from vss.data.vspw import IGNORE_INDEX
from vss.errors import ConfigError
from vss.models.aggregators.base import check_offsets, clamp_references
from vss.models.ops.normalize import normalize_frames

# ---------------------------------------------------------------------------------------------
# helpers


def _draws(sampler: ClipSampler, length: int, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` training clips of a video of ``length`` frames from a seeded generator."""
    rng = random.Random(seed)
    return [sampler.train_indices(length, rng) for _ in range(n)]


def _position_mask(t: int, h: int, w: int) -> np.ndarray:
    """(T,H,W) uint8 masks whose value encodes the pixel position (same for every frame)."""
    ys, xs = np.mgrid[0:h, 0:w]
    return np.broadcast_to(((7 * ys + xs) % 250).astype(np.uint8), (t, h, w)).copy()


def _normalised(frames: np.ndarray) -> np.ndarray:
    """(T,H,W,3) uint8 -> (T,3,H,W) float as the pipelines' Normalize + ToTensorV2."""
    x = (frames.astype(np.float32) / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return x.transpose(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# The default start-of-video policy (Aggregator.references): offsets clamped into the video


def _eval_clip(offsets: tuple[int, ...], length: int, t: int) -> list[int]:
    """The default evaluation clip of target ``t``: references (clamped), then the target."""
    return clamp_references(offsets, t, length) + [t]


def test_eval_clips_default_offsets() -> None:
    s = ClipSampler()
    assert s.offsets == (-9, -6, -3)
    assert s.num_frames == 4
    assert (s.before, s.after) == (9, 0)
    length = 30
    for t in range(9, length):
        assert _eval_clip(s.offsets, length, t) == [t - 9, t - 6, t - 3, t]
    # Start of the video: references before frame 0 repeat frame 0.
    assert _eval_clip(s.offsets, length, 0) == [0, 0, 0, 0]
    assert _eval_clip(s.offsets, length, 1) == [0, 0, 0, 1]
    assert _eval_clip(s.offsets, length, 4) == [0, 0, 1, 4]
    assert _eval_clip(s.offsets, length, 7) == [0, 1, 4, 7]
    assert _eval_clip(s.offsets, length, 8) == [0, 2, 5, 8]
    assert _eval_clip(s.offsets, 1, 0) == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("offsets", "t", "expected"),
    [
        ([-1], 0, [0, 0]),
        ([-1], 5, [4, 5]),
        ([-6, -3], 0, [0, 0, 0]),
        ([-6, -3], 2, [0, 0, 2]),
        ([-6, -3], 4, [0, 1, 4]),
        ([-6, -3], 10, [4, 7, 10]),
        ([-12, -2], 13, [1, 11, 13]),
        ([-1, 1], 0, [0, 1, 0]),  # after the target: clamped at the end of the video too
        ([-1, 1], 19, [18, 19, 19]),
        ([2, -3], 18, [19, 15, 18]),  # any order: the order aggregate receives them
    ],
)
def test_eval_clips_other_offsets(offsets: list[int], t: int, expected: list[int]) -> None:
    assert _eval_clip(tuple(offsets), 20, t) == expected


def test_streaming_policy_clamps_only_the_start_until_the_end_is_known() -> None:
    assert clamp_references((-2, 3), 1, None) == [0, 4]
    assert clamp_references((-2, 3), 18, 20) == [16, 19]


# ---------------------------------------------------------------------------------------------
# ClipSampler: training


def test_train_indices_forward_all_references_inside() -> None:
    s = ClipSampler(reverse_prob=0.0)
    length = 20
    clips = _draws(s, length, 3000)
    targets = Counter(c[-1] for c in clips)
    for c in clips:
        t = c[-1]
        assert c == [t - 9, t - 6, t - 3, t]  # never clamped: every reference is a real earlier frame
    # Targets cover exactly [span, len-1], roughly uniformly (3000/11 ~ 273 each).
    assert set(targets) == set(range(9, length))
    assert min(targets.values()) > 180


def test_train_indices_other_offsets_forward() -> None:
    s = ClipSampler((-6, -3), reverse_prob=0.0)
    clips = _draws(s, 15, 1500, seed=3)
    assert {c[-1] for c in clips} == set(range(6, 15))
    assert all(c == [c[-1] - 6, c[-1] - 3, c[-1]] for c in clips)


def test_train_indices_reversed_uses_future_frames() -> None:
    s = ClipSampler(reverse_prob=1.0)
    length = 20
    clips = _draws(s, length, 2000, seed=1)
    for c in clips:
        t = c[-1]
        assert c == [t + 9, t + 6, t + 3, t]  # references are later frames, spaced by the offsets
        assert all(0 <= i < length for i in c)
    assert {c[-1] for c in clips} == set(range(0, length - 9))


@pytest.mark.parametrize("prob", [0.0, 0.3, 0.5, 1.0])
def test_train_indices_reverse_probability(prob: float) -> None:
    s = ClipSampler(reverse_prob=prob)
    n = 4000
    clips = _draws(s, 25, n, seed=7)
    reversed_ = [c[0] > c[-1] for c in clips]
    forward = [c[0] < c[-1] for c in clips]
    assert all(r or f for r, f in zip(reversed_, forward, strict=True))  # never clamped on a long video
    frac = sum(reversed_) / n
    if prob in (0.0, 1.0):
        assert frac == prob
    else:
        assert abs(frac - prob) < 0.04


def test_train_indices_uses_the_given_rng() -> None:
    s = ClipSampler()
    assert _draws(s, 40, 50, seed=11) == _draws(s, 40, 50, seed=11)
    assert _draws(s, 40, 50, seed=11) != _draws(s, 40, 50, seed=12)


def test_train_indices_references_after_the_target() -> None:
    """Offsets of both signs: the target has room on both sides; reversed, the roles of the sides swap."""
    s = ClipSampler((-2, 1), reverse_prob=0.0)
    clips = _draws(s, 10, 1500, seed=5)
    assert {c[-1] for c in clips} == set(range(2, 9))
    assert all(c == [c[-1] - 2, c[-1] + 1, c[-1]] for c in clips)
    s = ClipSampler((-2, 1), reverse_prob=1.0)
    clips = _draws(s, 10, 1500, seed=5)
    assert {c[-1] for c in clips} == set(range(1, 8))
    assert all(c == [c[-1] + 2, c[-1] - 1, c[-1]] for c in clips)  # time reversed: still inside the video


@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_train_indices_short_videos_clamp(length: int) -> None:
    """Videos no longer than the span still give clips (references clamp to the first played frame)."""
    for prob in (0.0, 1.0):
        s = ClipSampler(reverse_prob=prob)
        clips = _draws(s, length, 300, seed=length)
        targets = set()
        for c in clips:
            assert len(c) == 4
            assert all(0 <= i < length for i in c)
            t = c[-1]
            targets.add(t)
            if prob == 0.0:
                assert c == _eval_clip(s.offsets, length, t)
            else:  # played backwards: eval clip in the reversed order
                r = length - 1 - t
                assert c == [length - 1 - i for i in _eval_clip(s.offsets, length, r)]
        assert targets == set(range(length))


def test_train_indices_exactly_span_plus_one() -> None:
    s = ClipSampler(reverse_prob=0.0)
    assert all(c == [0, 3, 6, 9] for c in _draws(s, 10, 100))
    s = ClipSampler(reverse_prob=1.0)
    assert all(c == [9, 6, 3, 0] for c in _draws(s, 10, 100))


@pytest.mark.parametrize("offsets", [[0], [-3, 0], [-3, -3], [-6, -3, -6], [1.5], ["a"]])
def test_invalid_offsets_raise(offsets: list) -> None:
    with pytest.raises(ConfigError, match=r"data\.clip\.offsets"):
        ClipSampler(tuple(offsets))
    with pytest.raises(ConfigError, match=r"model\.offsets"):
        check_offsets(offsets)


def test_valid_offsets_and_reverse_prob() -> None:
    assert check_offsets([-9, -6, -3]) == (-9, -6, -3)
    assert check_offsets((1, -1)) == (1, -1)
    assert check_offsets([]) == ()
    for prob in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"data\.clip\.reverse_prob"):
            ClipSampler(reverse_prob=prob)


# ---------------------------------------------------------------------------------------------
# keep-ratio sizes and the evaluation transform


@pytest.mark.parametrize(
    ("hw", "scale", "ratio", "expected"),
    [
        ((480, 853), (853, 480), 1.0, (480, 853)),
        ((720, 1280), (853, 480), 1.0, (480, 853)),
        ((1080, 1920), (853, 480), 1.0, (480, 853)),
        ((480, 853), (853, 480), 0.5, (240, 426)),  # mmseg: scale (int(853*.5), int(480*.5)) = (426, 240)
        ((480, 853), (853, 480), 2.0, (960, 1706)),
        ((853, 480), (853, 480), 1.0, (853, 480)),  # portrait: long side fits the long scale
        ((240, 320), (853, 480), 1.0, (480, 640)),  # upscaling, short side limits
        ((100, 1000), (853, 480), 1.0, (85, 853)),  # very wide: long side limits
        ((32, 48), (96, 64), 1.0, (64, 96)),
        ((32, 48), (80, 48), 1.0, (48, 72)),
    ],
)
def test_keep_ratio_size_matches_mmseg(
    hw: tuple[int, int], scale: tuple[int, int], ratio: float, expected: tuple[int, int]
) -> None:
    assert keep_ratio_size(*hw, scale, ratio) == expected
    assert keep_ratio_size(*hw, scale[::-1], ratio) == expected  # (long, short) order does not matter


def test_keep_ratio_rescale_transform() -> None:
    img = np.random.default_rng(0).integers(0, 256, (3, 30, 40, 3), dtype=np.uint8)
    masks = np.random.default_rng(1).integers(0, 5, (3, 30, 40), dtype=np.uint8)
    tf = A.Compose([KeepRatioRescale((80, 60), ratio_range=(1.0, 1.0))], strict=True)
    out = tf(images=img, masks=masks)
    assert out["images"].shape == (3, 60, 80, 3)
    assert out["masks"].shape == (3, 60, 80)
    # Nearest for masks: an exact 2x upscale repeats each label.
    assert np.array_equal(out["masks"], masks.repeat(2, axis=1).repeat(2, axis=2))


def test_aligned_resize() -> None:
    tf = AlignedResize(32)
    img = np.zeros((100, 50, 3), np.uint8)
    assert tf(image=img)["image"].shape == (128, 64, 3)
    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    assert np.array_equal(tf(image=img)["image"], img)  # already aligned: untouched
    assert AlignedResize(16)(image=np.zeros((17, 33, 3), np.uint8))["image"].shape == (32, 48, 3)


def test_eval_transform_sizes() -> None:
    tf = build_eval_transform((853, 480))
    frames = np.random.default_rng(0).integers(0, 256, (4, 480, 853, 3), dtype=np.uint8)
    out = tf(images=frames)["images"]
    assert isinstance(out, torch.Tensor)
    assert out.shape == (4, 3, 480, 864)  # MRCFA: 853x480 -> AlignedResize -> 864x480
    assert out.dtype == torch.uint8  # normalised on the model's device
    small = build_eval_transform((80, 48))(images=frames[:, :32, :48])["images"]
    assert small.shape == (4, 3, 64, 96)  # 32x48 -> keep ratio 48x72 -> multiples of 32
    # Already the base size and aligned: untouched, and normalised on the device as the ImageNet formula.
    frames = frames[:, :64, :96]
    out = build_eval_transform((96, 64))(images=frames)["images"]
    assert torch.equal(out, torch.from_numpy(frames.transpose(0, 3, 1, 2)))
    assert torch.allclose(normalize_frames(out), torch.from_numpy(_normalised(frames)), atol=1e-5)


def test_eval_transform_identical_frames_stay_identical() -> None:
    frame = np.random.default_rng(3).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    out = build_eval_transform((853, 480))(images=np.stack([frame] * 3))["images"]
    assert out.shape == (3, 3, 480, 768)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


# ---------------------------------------------------------------------------------------------
# training transform: one set of parameters for the whole clip


def test_train_transform_identical_frames_stay_identical() -> None:
    """Geometric and (per_clip) photometric parameters are drawn once: a clip of T equal frames stays equal."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask = rng.integers(0, 6, (40, 60), dtype=np.uint8)
    frames, masks = np.stack([frame] * 4), np.stack([mask] * 4)
    results = []
    for seed in range(25):
        tf = build_train_transform((96, 64), (48, 48), ratio_range=(0.5, 2.0), photometric="per_clip", seed=seed)
        out = tf(images=frames, masks=masks)
        imgs, ms = out["images"], out["masks"]
        assert imgs.shape == (4, 3, 48, 48) and ms.shape == (4, 48, 48)
        for k in range(1, 4):
            assert torch.equal(imgs[k], imgs[0]), f"seed {seed}: frame {k} got other parameters"
            assert torch.equal(ms[k], ms[0])
        results.append(imgs[0])
    # The pipeline is random at all (otherwise the test above proves nothing).
    assert len({tuple(r.flatten()[:50].tolist()) for r in results}) > 20


def test_train_transform_same_crop_and_flip_for_distinct_frames() -> None:
    t, h, w = 4, 40, 60
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    frames[..., 0] = np.tile(np.linspace(0, 255, w).astype(np.uint8), (t, h, 1))  # same ramp in channel 0
    masks = _position_mask(t, h, w)
    flips = set()
    windows = set()
    for seed in range(30):
        tf = build_train_transform((96, 64), (48, 48), ratio_range=(0.5, 2.0), photometric="none", seed=seed)
        out = tf(images=frames, masks=masks)
        imgs, ms = out["images"], out["masks"]
        for k in range(1, t):
            assert torch.equal(ms[k], ms[0]), f"seed {seed}: frame {k} cropped/flipped differently"
            assert torch.equal(imgs[k, 0], imgs[0, 0])
        assert not torch.equal(imgs[1, 1], imgs[0, 1])  # the frames themselves stay distinct
        row = ms[0, 0].long()
        valid = row != IGNORE_INDEX
        steps = (row[valid][1:] - row[valid][:-1]) % 250
        if len(steps):
            flips.add(bool((steps > 125).float().mean() > 0.5))
        windows.add(tuple(ms[0].flatten()[:20].tolist()))
    assert flips == {True, False}  # both flipped and unflipped clips occurred
    assert len(windows) > 15  # and many different crops


def test_train_transform_seed_reproducible() -> None:
    frames = np.random.default_rng(2).integers(0, 256, (3, 40, 60, 3), dtype=np.uint8)
    masks = _position_mask(3, 40, 60)
    a = build_train_transform((96, 64), (48, 48), seed=5)(images=frames, masks=masks)
    b = build_train_transform((96, 64), (48, 48), seed=5)(images=frames, masks=masks)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["masks"], b["masks"])


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_train_transform_padding_bottom_right(flip: float) -> None:
    """A frame smaller than the crop: image padded with 0, mask with 255, at the bottom/right."""
    t, h, w = 3, 20, 30
    rng = np.random.default_rng(4)
    frames = rng.integers(1, 256, (t, h, w, 3), dtype=np.uint8)
    masks = rng.integers(0, 5, (t, h, w), dtype=np.uint8)
    tf = build_train_transform((30, 20), (48, 40), ratio_range=(1.0, 1.0), flip_prob=flip, photometric="none", seed=0)
    out = tf(images=frames, masks=masks)
    imgs, ms = out["images"], out["masks"]
    assert imgs.shape == (t, 3, 48, 40) and ms.shape == (t, 48, 40)
    assert (ms[:, h:, :] == IGNORE_INDEX).all() and (ms[:, :, w:] == IGNORE_INDEX).all()
    assert (imgs[:, :, h:, :] == 0).all() and (imgs[:, :, :, w:] == 0).all()
    exp_masks, exp_frames = (masks, frames) if flip == 0.0 else (masks[:, :, ::-1], frames[:, :, ::-1])
    assert np.array_equal(ms[:, :h, :w].numpy(), exp_masks)  # padded after the flip: content stays top-left
    assert torch.equal(imgs[:, :, :h, :w], torch.from_numpy(np.ascontiguousarray(exp_frames).transpose(0, 3, 1, 2)))
    assert (ms[:, :h, :w] != IGNORE_INDEX).all()
    assert out["valid"].tolist() == [h, w]
    # on the device: normalised inside, 0 in the padding (mmseg pads after Normalize)
    x = normalize_frames(imgs[None], out["valid"][None])[0]
    assert torch.allclose(x[:, :, :h, :w], torch.from_numpy(_normalised(np.ascontiguousarray(exp_frames))), atol=1e-5)
    assert (x[:, :, h:, :] == 0).all() and (x[:, :, :, w:] == 0).all()


def test_train_transform_padding_with_random_scale() -> None:
    """Padded pixels are ignore in every frame, at the same place."""
    frames = np.random.default_rng(5).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    masks = np.zeros((2, 32, 48), np.uint8)
    padded = 0
    for seed in range(20):
        tf = build_train_transform((48, 32), (40, 40), ratio_range=(0.5, 2.0), seed=seed)
        ms = tf(images=frames, masks=masks)["masks"]
        assert ms.shape == (2, 40, 40)
        assert torch.equal(ms[0], ms[1])
        assert set(ms.unique().tolist()) <= {0, IGNORE_INDEX}
        padded += int((ms == IGNORE_INDEX).any())
    assert padded > 0


def test_mask_values_are_never_interpolated() -> None:
    values = np.array([1, 5, 9, 200], np.uint8)
    rng = np.random.default_rng(6)
    masks = values[rng.integers(0, len(values), (3, 37, 53))]
    frames = rng.integers(0, 256, (3, 37, 53, 3), dtype=np.uint8)
    seen: set[int] = set()
    for seed in range(40):
        tf = build_train_transform((80, 50), (40, 40), ratio_range=(0.5, 2.0), seed=seed)
        ms = tf(images=frames, masks=masks)["masks"]
        assert ms.dtype == torch.uint8
        got = set(ms.unique().tolist())
        assert got <= {*values.tolist(), IGNORE_INDEX}, f"seed {seed}: interpolated mask values {got}"
        seen |= got
    assert {*values.tolist()} <= seen


# ---------------------------------------------------------------------------------------------
# cat_max_ratio


def _dominant_ratio(mask: np.ndarray) -> float:
    """Largest class share of a crop, ignoring 255 (as mmseg's RandomCrop)."""
    labels, counts = np.unique(mask, return_counts=True)
    counts = counts[labels != IGNORE_INDEX]
    return float(counts.max() / counts.sum())


def _cat_max_success(cat_max_ratio: float, seeds: int) -> float:
    """Fraction of seeded crops whose target mask has its dominant class below 75%."""
    h = w = 64
    target = np.ones((h, w), np.uint8)
    target[40:56, 4:20] = 2  # a 16x16 object in a 64x64 frame of background
    ref = np.ones((h, w), np.uint8)  # references are all background: only the target counts
    masks = np.stack([ref, ref, target])
    frames = np.zeros((3, h, w, 3), np.uint8)
    ok = 0
    for seed in range(seeds):
        tf = A.Compose([CatMaxRatioCrop(24, 24, cat_max_ratio)], strict=True, seed=seed)
        out = tf(images=frames, masks=masks)
        assert out["masks"].shape == (3, 24, 24)
        assert np.array_equal(out["masks"][0], out["masks"][1])
        ok += _dominant_ratio(out["masks"][-1]) < 0.75
    return ok / seeds


def test_cat_max_ratio_prefers_mixed_crops() -> None:
    with_ratio = _cat_max_success(0.75, 150)
    without = _cat_max_success(1.0, 150)
    # A random 24x24 window catches >= 144 object pixels ~16% of the time; 10 retries make it ~80%.
    assert without < 0.35
    assert with_ratio > 0.6
    assert with_ratio > without + 0.3


def test_cat_max_ratio_gives_up_on_single_class_masks() -> None:
    masks = np.full((2, 50, 50), 3, np.uint8)
    masks[:, :5, :5] = IGNORE_INDEX  # ignore pixels are not a class
    frames = np.zeros((2, 50, 50, 3), np.uint8)
    out = A.Compose([CatMaxRatioCrop(30, 30, 0.75)], strict=True, seed=0)(images=frames, masks=masks)
    assert out["masks"].shape == (2, 30, 30)
    assert out["images"].shape == (2, 30, 30, 3)


def test_crop_smaller_frame_keeps_its_size() -> None:
    frames = np.zeros((2, 20, 30, 3), np.uint8)
    masks = np.zeros((2, 20, 30), np.uint8)
    out = A.Compose([CatMaxRatioCrop(24, 24, 0.75)], strict=True, seed=0)(images=frames, masks=masks)
    assert out["masks"].shape == (2, 20, 24)


# ---------------------------------------------------------------------------------------------
# strict Compose


def test_compose_is_strict() -> None:
    frames = np.zeros((2, 32, 48, 3), np.uint8)
    masks = np.zeros((2, 32, 48), np.uint8)
    tf = build_train_transform((48, 32), (32, 32), seed=0)
    with pytest.raises(ValueError, match="foo"):
        tf(images=frames, masks=masks, foo=masks)
    with pytest.raises(ValueError):
        tf(images=frames, mask=masks)  # singular `mask` is one 2-D mask, not a clip
    with pytest.raises(ValueError, match="foo"):
        build_eval_transform((48, 32))(images=frames, foo=1)
