"""Tests for the clip datasets, the DDP video sharding and the LightningDataModule (vss.data.datamodule)."""

from __future__ import annotations

import random
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler, RandomSampler

from vss.data.datamodule import SyntheticDataModule, VSSDataModule
from vss.data.datasets import VideoShardSampler
from vss.data.synthetic import ensure_synthetic
from vss.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from vss.data.vspw import IGNORE_INDEX, DatasetError, LabelMap, read_image, read_mask
from vss.models.aggregators.base import clamp_references
from vss.models.ops.normalize import normalize_frames

KNOBS: dict[str, Any] = dict(train_videos=3, val_videos=2, min_frames=12, max_frames=14, height=32, width=48)
NUM_CLASSES = 5  # background + 4 object classes (the synthetic default)
LOADER: dict[str, Any] = dict(num_workers=0, pin_memory=False, persistent_workers=False)


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic VSPW-layout dataset (32x48 frames, 12-14 frames per video)."""
    return ensure_synthetic(tmp_path_factory.mktemp("syn") / "ds", progress=False, **KNOBS)


def _dm(root: Path, **kwargs: Any) -> VSSDataModule:
    """A data module on ``root`` with single-process loaders and small sizes."""
    args: dict[str, Any] = dict(
        num_classes=NUM_CLASSES,
        scale=(48, 32),
        crop_size=(32, 32),
        train_repeat=2,
        batch_size=2,
        clip={"offsets": [-9, -6, -3]},
        **LOADER,
    )
    args.update(kwargs)
    return VSSDataModule(root=str(root), **args)


def _normalised(frames: np.ndarray) -> torch.Tensor:
    """(T,H,W,3) uint8 -> (T,3,H,W) float, as Normalize + ToTensorV2."""
    x = (frames.astype(np.float32) / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _write_vspw(root: Path, videos: dict[str, list[tuple[np.ndarray, np.ndarray]]], splits: tuple[str, ...]) -> None:
    """Hand-written VSPW layout: ``videos[name]`` is a list of (RGB frame, raw mask) pairs."""
    for name, pairs in videos.items():
        origin, mask_dir = root / "data" / name / "origin", root / "data" / name / "mask"
        origin.mkdir(parents=True)
        mask_dir.mkdir(parents=True)
        for k, (frame, mask) in enumerate(pairs):
            stem = f"{100 + k:08d}"
            assert cv2.imwrite(str(origin / f"{stem}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            Image.fromarray(mask, mode="L").save(mask_dir / f"{stem}.png")
    for split in splits:
        (root / f"{split}.txt").write_text("".join(f"{n}\n" for n in videos))


def _pair(h: int, w: int, value: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random frame and a constant raw mask of size h x w."""
    frame = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return frame, np.full((h, w), value, np.uint8)


# ---------------------------------------------------------------------------------------------
# training clips


@pytest.mark.parametrize(("offsets", "frames"), [((-9, -6, -3), 4), ((-6, -3), 3), ((-1,), 2)])
def test_train_items_shapes_and_values(syn_root: Path, offsets: tuple[int, ...], frames: int) -> None:
    dm = SyntheticDataModule(
        root=str(syn_root),
        synthetic=KNOBS,
        num_classes=NUM_CLASSES,
        clip={"offsets": list(offsets)},
        scale=(48, 32),
        crop_size=(32, 32),
        train_repeat=3,
        **LOADER,
    )
    assert dm.num_classes == NUM_CLASSES
    assert dm.class_names == ["background", "red", "green", "blue", "yellow"]
    dm.setup("fit")
    ds = dm.train_dataset()
    assert len(ds) == KNOBS["train_videos"] * 3
    seen: set[int] = set()
    for i in range(len(ds)):
        item = ds[i]
        assert item["images"].shape == (frames, 3, 32, 32)
        assert item["images"].dtype == torch.uint8  # normalised on the model's device
        assert item["labels"].shape == (frames, 32, 32)
        assert item["labels"].dtype == torch.uint8
        values = set(item["labels"].unique().tolist())
        assert values <= {*range(NUM_CLASSES), IGNORE_INDEX}
        seen |= values
    assert 0 in seen and seen & set(range(1, NUM_CLASSES)), "background and objects should both appear"


def test_train_labels_loaded_for_every_frame(syn_root: Path) -> None:
    """With identity geometry, each of the T labels is the mapped mask of its own clip frame."""
    dm = _dm(
        syn_root,
        crop_size=(32, 48),
        ratio_range=(1.0, 1.0),
        flip_prob=0.0,
        photometric="none",
        clip={"offsets": [-9, -6, -3], "reverse_prob": 0.5},
    )
    dm.setup("fit")
    ds = dm.train_dataset()
    videos = dm.videos("train")
    lm = LabelMap(NUM_CLASSES)
    moved, directions = 0, set()
    for seed in range(12):
        i = seed % len(videos)
        video = videos[i]
        ds.rng = random.Random(seed)  # the dataset's own clip-draw stream
        item = ds[i]
        idx = dm.clip_sampler.train_indices(len(video), random.Random(seed))  # the same draw as the dataset's
        directions.add(idx[0] < idx[-1])
        expected = np.stack([lm(read_mask(video.masks[j])) for j in idx])
        assert np.array_equal(item["labels"].numpy(), expected)
        frames = np.stack([read_image(video.frames[j]) for j in idx])
        assert item["valid"].tolist() == [32, 48]  # the crop is the frame: no padding
        assert torch.allclose(normalize_frames(item["images"]), _normalised(frames), atol=1e-5)
        moved += not torch.equal(item["labels"][0], item["labels"][-1])
    assert moved >= 10  # objects move: reference labels are not copies of the target label
    assert directions == {True, False}  # forward and reversed clips both occurred


# ---------------------------------------------------------------------------------------------
# evaluation clips


def _check_item(item: dict[str, Any], video: Any, lm: LabelMap) -> np.ndarray:
    """Metadata, the target's label (stored resolution) and raw mask of an evaluation item; returns the raw mask."""
    t = item["frame"]
    assert item["frame_name"] == video.masks[t].name
    assert item["video_length"] == len(video)
    assert item["labels"].shape == (32, 48) and item["labels"].dtype == torch.uint8
    raw = np.array(Image.open(video.masks[t]))
    assert np.array_equal(item["raw_target"].numpy(), raw)
    assert np.array_equal(item["labels"].numpy(), lm(raw))
    ignored = (raw == 0) | (raw == IGNORE_INDEX)
    assert (item["labels"].numpy()[ignored] == IGNORE_INDEX).all()
    return raw


def test_eval_frames_every_frame_once_in_order(syn_root: Path) -> None:
    """The stream path's input: each frame once, alone, resized; its label at the stored size."""
    dm = _dm(syn_root, scale=(80, 48))  # 32x48 -> keep ratio 48x72 -> multiples of 32: 64x96
    dm.setup("validate")
    ds = dm.eval_dataset("val")
    videos = dm.videos("val")
    assert len(ds) == sum(len(v) for v in videos)
    lm, tf = LabelMap(NUM_CLASSES), build_eval_transform((80, 48))
    seen, raw_values = [], set()
    for i in range(len(ds)):
        item = ds[i]
        seen.append((item["video"], item["frame"]))
        video = next(v for v in videos if v.name == item["video"])
        assert item["images"].shape == (3, 64, 96) and item["images"].dtype == torch.uint8
        raw_values |= set(np.unique(_check_item(item, video, lm)).tolist())
        if item["frame"] in (0, 5):
            frame = read_image(video.frames[item["frame"]])[None]
            assert torch.equal(item["images"], tf(images=frame)["images"][0])
    assert seen == [(v.name, t) for v in videos for t in range(len(v))]
    assert {0, IGNORE_INDEX} <= raw_values  # "others" and void both occur and stay distinct in raw_target


def test_eval_clips_follow_the_model_policy(syn_root: Path) -> None:
    """The clip path's input: the references the policy picks (here: none for frames 0-1), padded with the target."""
    dm = _dm(syn_root, scale=(80, 48))
    dm.setup("validate")

    def policy(t: int, length: int) -> list[int]:
        return [] if t < 2 else clamp_references((-9, 1), t, length)

    dm.use_clip_path(policy, 3)
    ds = dm.eval_dataset("val")
    videos = dm.videos("val")
    lm, tf = LabelMap(NUM_CLASSES), build_eval_transform((80, 48))
    for i in range(len(ds)):
        item = ds[i]
        video = next(v for v in videos if v.name == item["video"])
        t = item["frame"]
        _check_item(item, video, lm)
        assert item["images"].shape == (3, 3, 64, 96)
        refs = policy(t, len(video))
        assert item["num_references"] == len(refs)
        if t in (0, 5, len(video) - 1):
            idx = [t] * (2 - len(refs)) + refs + [t]
            frames = np.stack([read_image(video.frames[j]) for j in idx])
            assert torch.allclose(item["images"], tf(images=frames)["images"])
    assert ds[len(videos[0]) - 1]["num_references"] == 2  # last frame: t+1 clamps to itself
    dm.use_clip_path(None)
    assert dm.eval_dataset("val")[0]["images"].shape == (3, 64, 96)


def test_val_loader_batches(syn_root: Path) -> None:
    dm = _dm(syn_root, scale=(80, 48), val_batch_size=3)
    dm.setup("fit")
    loader = dm.val_dataloader()
    assert isinstance(loader.sampler, VideoShardSampler)
    assert list(loader.sampler) == list(range(len(loader.dataset)))
    batch = next(iter(loader))
    assert batch["images"].shape == (3, 3, 64, 96)
    assert batch["labels"].shape == (3, 32, 48)
    assert batch["raw_target"].shape == (3, 32, 48)
    assert batch["frame"].tolist() == [0, 1, 2]
    assert list(batch["video"]) == ["val_000"] * 3


# ---------------------------------------------------------------------------------------------
# VideoShardSampler


def _check_shards(lengths: list[int], world: int) -> list[list[int]]:
    """Build the samplers of every rank and check the sharding invariants; return their indices."""
    ds = SimpleNamespace(videos=[range(n) for n in lengths])
    shards = [list(VideoShardSampler(ds, world, r)) for r in range(world)]  # type: ignore[arg-type]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    total = int(starts[-1])
    assert sorted(i for s in shards for i in s) == list(range(total))  # every item once, no padding
    owner: dict[int, int] = {}
    for r, s in enumerate(shards):
        assert len(VideoShardSampler(ds, world, r)) == len(s)  # type: ignore[arg-type]
        assert s == sorted(s)  # video order, then frame order
        for v in {int(np.searchsorted(starts, i, side="right")) - 1 for i in s}:
            assert v not in owner, f"video {v} split over ranks {owner[v]} and {r}"
            owner[v] = r
            assert set(range(starts[v], starts[v + 1])) <= set(s)
    counts = [len(s) for s in shards]
    assert max(counts) - min(counts) <= max(lengths), f"unbalanced shares {counts} for {lengths}"
    return shards


@pytest.mark.parametrize("world", [1, 2, 3])
def test_video_shard_sampler_partitions_by_video(world: int) -> None:
    rng = np.random.default_rng(world)
    cases = [
        [7, 7, 10, 6, 6, 10, 7, 7],  # straddling videos that a "middle frame" split would unbalance
        [12],
        [5, 40],
        [1, 1, 1, 30, 1, 1],
        [3, 3, 3, 3, 3, 3, 3],
    ] + [rng.integers(11, 242, int(rng.integers(1, 40))).tolist() for _ in range(40)]
    for lengths in cases:
        shards = _check_shards(lengths, world)
        if world == 1:
            assert shards == [list(range(sum(lengths)))]


def test_video_shard_sampler_on_eval_dataset(syn_root: Path) -> None:
    dm = _dm(syn_root)
    dm.setup("validate")
    ds = dm.eval_dataset("val")
    lengths = [len(v) for v in ds.videos]
    shards = _check_shards(lengths, 2)
    assert all(shards)  # two videos, two ranks: one video each
    for r, s in enumerate(shards):
        assert list(VideoShardSampler(ds, 2, r)) == s
        assert len({ds[i]["video"] for i in s[:: max(1, len(s) // 3)]}) == 1


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_root_fails_at_setup(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dataset"
    for stage in ("fit", "validate", "test"):
        dm = _dm(missing)
        with pytest.raises(DatasetError, match=re.escape(str(missing))):
            dm.setup(stage)


def test_missing_split_file_names_it(tmp_path: Path) -> None:
    _write_vspw(tmp_path, {"vid": [_pair(32, 48)]}, splits=("train",))
    dm = _dm(tmp_path)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "val.txt"))):
        dm.setup("fit")


def test_frames_of_different_sizes_name_the_files(tmp_path: Path) -> None:
    pairs = [_pair(32, 48, seed=0), _pair(32, 48, seed=1), _pair(40, 48, seed=2)]
    _write_vspw(tmp_path, {"vid": pairs}, splits=("train", "val"))
    dm = _dm(tmp_path, clip={"offsets": [-1]}, check_val="off")  # on, it stops setup (tests/test_val_check.py)
    dm.setup("fit")
    video = dm.videos("val")[0]
    dm.use_clip_path(lambda t, length: clamp_references((-1,), t, length), 2)
    ds = dm.eval_dataset("val")
    assert ds[0]["images"].shape[0] == ds[1]["images"].shape[0] == 2  # same-size clips load fine
    with pytest.raises(ValueError, match=re.escape(str(video.frames[2]))) as info:
        ds[2]
    assert str(video.frames[1]) in str(info.value)
    train = dm.train_dataset()
    # Video of 3 frames, offsets [-1]: targets 1..2 (forward) or 0..1 (reversed); some clips mix sizes.
    errors = 0
    for seed in range(20):
        train.rng = random.Random(seed)
        try:
            train[0]
        except ValueError as e:
            assert str(video.frames[2]) in str(e)
            errors += 1
    assert errors > 0


def test_mask_value_outside_label_map_names_the_mask(tmp_path: Path) -> None:
    _write_vspw(tmp_path, {"vid": [_pair(32, 48, value=2), _pair(32, 48, value=77)]}, splits=("train", "val"))
    dm = _dm(tmp_path)
    dm.setup("validate")
    video = dm.videos("val")[0]
    ds = dm.eval_dataset("val")
    assert ds[0]["labels"].shape == (32, 48)
    with pytest.raises(DatasetError, match=re.escape(str(video.masks[1]))):
        ds[1]


@pytest.mark.parametrize("mapping", [{1: 9}, {300: 1}, {1: -1}])
def test_invalid_label_map_mapping(tmp_path: Path, mapping: dict[int, int]) -> None:
    with pytest.raises(ValueError, match="label_map"):
        _dm(tmp_path, label_map={"mapping": mapping})


def test_explicit_label_map_mapping(syn_root: Path) -> None:
    """A mapping equal to the VSPW rule gives the same labels; one missing a value fails naming the mask."""
    mapping = {0: 255, 1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    dm = _dm(syn_root, label_map={"mapping": mapping})
    ref = _dm(syn_root)
    for d in (dm, ref):
        d.setup("validate")
    assert torch.equal(dm.eval_dataset("val")[3]["labels"], ref.eval_dataset("val")[3]["labels"])
    bad = _dm(syn_root, label_map={"mapping": {0: 255, 1: 0}})
    bad.setup("validate")
    with pytest.raises(DatasetError, match=r"outside the label map"):
        bad.eval_dataset("val")[0]


def test_config_errors_name_their_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.class_names"):
        _dm(tmp_path, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"data\.clip\.offsets"):
        _dm(tmp_path, clip={"offsets": [-3, 0]})
    with pytest.raises(ValueError, match=r"data\.clip\.offsets"):
        _dm(tmp_path, clip={"offsets": [-3, -3]})
    with pytest.raises(ValueError, match=r"data\.clip has unknown key\(s\) \['start_rule'\]"):
        _dm(tmp_path, clip={"offsets": [-3], "start_rule": "mrcfa"})


def test_synthetic_num_classes_must_match_object_classes(tmp_path: Path) -> None:
    root = str(tmp_path / "syn")
    for num_classes, synthetic in ((3, {"object_classes": 4}), (4, None), (5, {"object_classes": 2})):
        with pytest.raises(ValueError, match=r"data\.num_classes") as info:
            SyntheticDataModule(root=root, synthetic=synthetic, num_classes=num_classes, **LOADER)
        assert "data.synthetic.object_classes" in str(info.value)
    dm = SyntheticDataModule(root=root, synthetic={"object_classes": 2}, num_classes=3, **LOADER)
    assert dm.num_classes == 3
    assert dm.class_names == ["background", "red", "green"]
    assert SyntheticDataModule(root=root, **LOADER).num_classes == 5  # num_classes may be left out
    with pytest.raises(ValueError, match=r"data\.synthetic"):
        SyntheticDataModule(root=root, synthetic={"object_classes": 99}, **LOADER)
    with pytest.raises(ValueError, match=r"data\.synthetic"):
        SyntheticDataModule(root=root, synthetic={"no_such_knob": 1}, **LOADER)
    assert not (tmp_path / "syn").exists()  # nothing generated before prepare_data/setup


# ---------------------------------------------------------------------------------------------
# loaders under (fake) DDP


def test_train_loader_single_process(syn_root: Path) -> None:
    dm = _dm(syn_root, train_repeat=2, batch_size=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, RandomSampler)
    assert loader.drop_last
    batch = next(iter(loader))
    assert batch["images"].shape == (2, 4, 3, 32, 32)
    assert batch["labels"].shape == (2, 4, 32, 32)
    assert batch["labels"].dtype == torch.uint8 and batch["images"].dtype == torch.uint8
    assert batch["valid"].shape == (2, 2)


def test_too_few_training_clips_for_one_batch_is_an_error(syn_root: Path) -> None:
    dm = _dm(syn_root, train_repeat=1, batch_size=8)  # 3 videos x 1 < 8: drop_last would give no step at all
    dm.setup("fit")
    with pytest.raises(DatasetError, match=r"data\.batch_size=8"):
        dm.train_dataloader()


def test_loaders_under_fake_two_ranks(syn_root: Path) -> None:
    dm = _dm(syn_root, train_repeat=5, batch_size=2)
    dm.setup("fit")
    n_train = KNOBS["train_videos"] * 5
    train_idx, val_idx, test_idx = [], [], []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # type: ignore[assignment]
        loader = dm.train_dataloader()
        sampler = loader.sampler
        assert isinstance(sampler, DistributedSampler)
        assert (sampler.num_replicas, sampler.rank) == (2, rank)
        assert sampler.shuffle and sampler.drop_last and loader.drop_last
        train_idx.append(list(sampler))
        for eval_loader, out in ((dm.val_dataloader(), val_idx), (dm.test_dataloader(), test_idx)):
            assert isinstance(eval_loader.sampler, VideoShardSampler)
            out.append(list(eval_loader.sampler))
    assert len(train_idx[0]) == len(train_idx[1]) == n_train // 2
    assert not set(train_idx[0]) & set(train_idx[1])
    assert set(train_idx[0]) | set(train_idx[1]) <= set(range(n_train))
    n_val = sum(len(v) for v in dm.videos("val"))
    for shards in (val_idx, test_idx):
        assert sorted(shards[0] + shards[1]) == list(range(n_val))
        assert shards[0] and shards[1]
    dm.trainer = None
    assert isinstance(dm.train_dataloader().sampler, RandomSampler)
    assert list(dm.val_dataloader().sampler) == list(range(n_val))


EXIT_WITH_A_LIVE_WORKER = """
from types import SimpleNamespace
from vss.data.datamodule import VSSDataModule
owner = SimpleNamespace(num_workers=1, pin_memory=False, persistent_workers=False)
batches = iter(VSSDataModule._loader(owner, list(range(100)), 1))
next(batches)
print("exiting", flush=True)  # with the iterator and its worker alive, as a run stopped by SIGTERM or a crash
"""


def test_exit_with_a_live_dataloader_worker_does_not_hang() -> None:
    """Workers ignore SIGTERM, which multiprocessing's exit handler sends before joining them: the exit must still
    end (a SIGTERM-stopped run used to hang after printing its resume hint, now and then)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", EXIT_WITH_A_LIVE_WORKER], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr[-2000:]
