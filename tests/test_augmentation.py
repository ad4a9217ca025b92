"""mmseg's photometric distortion (per frame / per clip) and the per-worker, per-rank augmentation streams."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vss.data.datamodule import VSSDataModule, worker_init
from vss.data.datasets import stream_seed
from vss.data.synthetic import ensure_synthetic
from vss.data.transforms import PhotoMetricDistortion, build_train_transform, check_photometric

# ---------------------------------------------------------------------------------------------
# oracle: mmseg's PhotoMetricDistortion_clips (GuoleiSun/VSS-MRCFA mmseg/datasets/pipelines/transforms.py),
# written out on a BGR uint8 frame with numpy and OpenCV, drawing from `rng` in the official call order.


def _convert(img: np.ndarray, alpha: float = 1, beta: float = 0) -> np.ndarray:
    img = img.astype(np.float32) * alpha + beta
    img = np.clip(img, 0, 255)
    return img.astype(np.uint8)


def _official_clip(frames_rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The official per-frame loop (BGR frames, as mmcv loads them); ``rng`` stands in for numpy.random."""
    out = []
    for rgb in frames_rgb:
        img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if rng.integers(2):  # brightness
            img = _convert(img, beta=rng.uniform(-32, 32))
        mode = rng.integers(2)
        if mode == 1 and rng.integers(2):  # contrast first
            img = _convert(img, alpha=rng.uniform(0.5, 1.5))
        if rng.integers(2):  # saturation (mmcv.bgr2hsv / hsv2bgr)
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 1] = _convert(img[:, :, 1], alpha=rng.uniform(0.5, 1.5))
            img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        if rng.integers(2):  # hue
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 0] = (img[:, :, 0].astype(int) + rng.integers(-18, 18)) % 180
            img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        if mode == 0 and rng.integers(2):  # contrast last
            img = _convert(img, alpha=rng.uniform(0.5, 1.5))
        out.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    return np.stack(out)


def _frames(t: int = 3, h: int = 6, w: int = 7, seed: int = 0) -> np.ndarray:
    """Random RGB frames with saturated and grey pixels (the clipping and HSV corner cases)."""
    frames = np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    frames[:, 0, :3] = [[255, 0, 0], [250, 250, 250], [3, 3, 3]]
    return frames


def _distortion(per_frame: bool, seed: int) -> PhotoMetricDistortion:
    tf = PhotoMetricDistortion(per_frame=per_frame)
    tf.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return tf


@pytest.mark.parametrize("seed", range(40))
def test_photometric_equals_official_formulas(seed: int) -> None:
    """Same draws, same pixels: our transform on RGB frames = the official loop on BGR frames, for every frame."""
    frames = _frames(seed=seed)
    ours = _distortion(True, seed)(images=frames)["images"]
    official = _official_clip(frames, np.random.default_rng(seed))
    assert ours.dtype == np.uint8
    assert np.array_equal(ours, official)


def test_photometric_oracle_exercises_every_step() -> None:
    """The 40 seeds above cover every step firing and not firing, and both contrast positions."""
    seen: dict[str, set[Any]] = {}
    for seed in range(40):
        for params in _distortion(True, seed).get_params_dependent_on_data({}, {"images": _frames()})["frames"]:
            for key, value in params.items():
                seen.setdefault(key, set()).add(value is None if key != "contrast_first" else value)
    assert all(v == {True, False} for v in seen.values()), seen


def test_photometric_parameter_distributions() -> None:
    """Each step fires with p = 0.5 on its own; values U(-32, 32), U(0.5, 1.5), integer hue -18..17 (= +-36 deg)."""
    tf = _distortion(True, 0)
    draws = [tf.draw() for _ in range(20000)]
    fired = {k: np.array([d[k] is not None for d in draws]) for k in ("brightness", "contrast", "saturation", "hue")}
    for key, f in fired.items():
        assert abs(f.mean() - 0.5) < 0.015, (key, f.mean())
    contrast_first = np.array([d["contrast_first"] for d in draws])
    assert abs(contrast_first.mean() - 0.5) < 0.015
    stacked = np.stack(list(fired.values()))
    assert np.abs(np.corrcoef(stacked)[np.triu_indices(4, 1)]).max() < 0.03  # independent of each other
    altered = stacked.any(axis=0).mean()
    print(f"\nshare of frames altered: {altered:.4f} (official 1 - 0.5^4 = 0.9375)")
    assert abs(altered - 0.9375) < 0.006
    b = np.array([d["brightness"] for d in draws if d["brightness"] is not None])
    c = np.array([d["contrast"] for d in draws if d["contrast"] is not None])
    s = np.array([d["saturation"] for d in draws if d["saturation"] is not None])
    h = np.array([d["hue"] for d in draws if d["hue"] is not None])
    assert -32 <= b.min() < -31.5 and 31.5 < b.max() <= 32 and abs(b.mean()) < 0.5
    for values in (c, s):
        assert 0.5 <= values.min() < 0.51 and 1.49 < values.max() <= 1.5 and abs(values.mean() - 1.0) < 0.01
    print(f"hue delta range: {h.min()}..{h.max()} OpenCV units (x2 = degrees)")
    assert set(h.tolist()) == set(range(-18, 18))  # numpy's randint(-18, 18): high exclusive, as mmseg draws it
    counts = np.bincount(h + 18)
    assert counts.min() > 0.7 * counts.mean()  # every delta about equally likely (~280 each, sd ~17)


def test_photometric_step_order_by_hand() -> None:
    """Brightness comes before contrast in both modes: (100 + 30) x 2 clips to 255; contrast then brightness is 230."""
    frame = np.full((1, 1, 3), 100, np.uint8)
    for first in (True, False):
        params = {"brightness": 30.0, "contrast": 2.0, "contrast_first": first, "saturation": None, "hue": None}
        assert PhotoMetricDistortion.distort(frame, params).tolist() == [[[255, 255, 255]]]
    # contrast x2 then saturation x0.5 on (200, 100, 100): (255, 200, 200), S = 55 -> 27, min = 255 (1 - 27/255);
    # saturation first: S ~ 128 -> ~64, (200, ~150, ~150), then x2 clips every channel
    px = np.array([[[200, 100, 100]]], np.uint8)
    sat = {"brightness": None, "contrast": 2.0, "saturation": 0.5, "hue": None}
    first = PhotoMetricDistortion.distort(px, {**sat, "contrast_first": True})
    last = PhotoMetricDistortion.distort(px, {**sat, "contrast_first": False})
    assert first.tolist() == [[[255, 228, 228]]]
    assert last.tolist() == [[[255, 255, 255]]]


def test_photometric_per_frame_independent_per_clip_shared() -> None:
    """per_frame: frames of one clip draw independently (identical frames come out different); per_clip: one draw."""
    frames = np.repeat(_frames(t=1, h=8, w=8), 4, axis=0)
    differ, fired = 0, []
    for seed in range(200):
        tf = _distortion(True, seed)
        params = tf.get_params_dependent_on_data({}, {"images": frames})["frames"]
        fired.append([p["brightness"] is not None for p in params])
        out = tf.apply_to_images(frames, frames=params)
        differ += any(not np.array_equal(out[k], out[0]) for k in range(1, 4))
        clip = _distortion(False, seed)(images=frames)["images"]
        assert all(np.array_equal(clip[k], clip[0]) for k in range(1, 4))
    assert differ > 190
    fired_arr = np.array(fired, float)
    assert abs(np.corrcoef(fired_arr[:, 0], fired_arr[:, 1])[0, 1]) < 0.2  # frame 0 and frame 1 draw apart


def test_photometric_refuses_float_frames_and_bad_modes() -> None:
    params = {"brightness": 1.0, "contrast": None, "contrast_first": True, "saturation": None, "hue": None}
    with pytest.raises(TypeError, match="uint8"):
        PhotoMetricDistortion.distort(np.zeros((2, 2, 3), np.float32), params)
    for bad in (True, False, "per-frame", None):
        with pytest.raises(ValueError, match=r"data\.photometric=.*per_frame, per_clip, none"):
            check_photometric(bad)
    with pytest.raises(ValueError, match=r"data\.photometric"):
        build_train_transform((96, 64), (48, 48), photometric=True)  # type: ignore[arg-type]


def test_photometric_none_leaves_colours() -> None:
    """photometric=none: with identity geometry the output is the normalised input."""
    frames = _frames(t=2, h=16, w=16)
    masks = np.zeros((2, 16, 16), np.uint8)
    kw: dict[str, Any] = dict(ratio_range=(1.0, 1.0), flip_prob=0.0, cat_max_ratio=1.0)
    none = build_train_transform((16, 16), (16, 16), photometric="none", seed=1, **kw)
    ref = build_train_transform((16, 16), (16, 16), photometric="none", seed=2, **kw)
    assert torch.equal(none(images=frames, masks=masks)["images"], ref(images=frames, masks=masks)["images"])
    per_frame = [build_train_transform((16, 16), (16, 16), seed=s, **kw) for s in range(10)]
    outs = [tf(images=frames, masks=masks)["images"] for tf in per_frame]
    assert sum(not torch.equal(o, outs[0]) for o in outs[1:]) >= 8


def test_compose_steps_draw_from_one_stream() -> None:
    """albumentations' Compose(seed=s) gives every step the same stream (k-th draws equal); ours shares one."""
    tf = build_train_transform((96, 64), (48, 48), seed=3)
    steps = tf.augment.transforms
    assert all(t.py_random is tf.augment.py_random and t.random_generator is tf.augment.random_generator for t in steps)


# ---------------------------------------------------------------------------------------------
# per-worker, per-rank streams


@pytest.fixture(scope="module")
def stream_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    knobs = dict(train_videos=2, val_videos=1, min_frames=8, max_frames=8, height=32, width=48)
    return ensure_synthetic(tmp_path_factory.mktemp("streams") / "ds", progress=False, **knobs)


def _clips(root: Path, rank: int, base: int, n: int = 4, workers: int = 2) -> list[torch.Tensor]:
    """The clips item 0 gives, ``n`` times, through a real DataLoader with ``workers`` workers of ``rank``."""
    dm = VSSDataModule(
        root=str(root), num_classes=5, scale=(48, 32), crop_size=(24, 24), clip={"offsets": [-2]}, seed=42
    )
    dm.setup("fit")
    ds = dm.train_dataset(rank)
    loader = DataLoader(
        ds,
        batch_size=None,
        sampler=[0] * n,  # the same item every time: any difference comes from the random streams
        num_workers=workers,
        worker_init_fn=worker_init,
        generator=torch.Generator().manual_seed(base),
    )
    return [item["images"] for item in loader]


def test_workers_and_ranks_draw_distinct_streams(stream_root: Path) -> None:
    """2 workers x 2 ranks: four different streams; the same seed, rank, worker (and epoch) give the same clips."""
    streams = {}
    for rank in (0, 1):
        clips = _clips(stream_root, rank, base=7)
        streams[(rank, 0)], streams[(rank, 1)] = clips[0::2], clips[1::2]  # worker k serves items k, k+2, ...
    keys = list(streams)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not any(torch.equal(x, y) for x, y in zip(streams[a], streams[b], strict=True)), (a, b)
    print(f"\n{len(streams)} streams (rank, worker): {keys}; first clips pairwise different")
    again = _clips(stream_root, 1, base=7)
    assert all(torch.equal(x, y) for x, y in zip(again[0::2], streams[(1, 0)], strict=True))
    assert all(torch.equal(x, y) for x, y in zip(again[1::2], streams[(1, 1)], strict=True))
    next_epoch = _clips(stream_root, 1, base=8)  # workers restarted with the loader's next base seed
    assert not any(torch.equal(x, y) for x, y in zip(next_epoch, again, strict=True))


def test_main_process_stream_per_rank(stream_root: Path) -> None:
    """num_workers=0: each rank still has its own reproducible stream (clip draw and augmentation)."""
    rank0, rank1, rank0_again = (_clips(stream_root, r, base=0, n=3, workers=0) for r in (0, 1, 0))
    assert not any(torch.equal(x, y) for x, y in zip(rank0, rank1, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(rank0, rank0_again, strict=True))


def test_stream_seed() -> None:
    """A function of (seed, rank, worker, base seed); no seed: fresh entropy."""
    seeds = {stream_seed(42, r, w, b) for r in (0, 1) for w in (0, 1) for b in (0, 1)}
    assert len(seeds) == 8 and stream_seed(42, 1, 1, 1) == stream_seed(42, 1, 1, 1)
    assert stream_seed(None, 0, 0) is None
