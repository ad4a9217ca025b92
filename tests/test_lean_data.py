"""The lean data path: uint8 batches, normalised on the model's device, equal the float batches the workers used to
build (the old pipeline, kept here as the oracle), for training clips (padding included) and evaluation items."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import pytest
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader

from fake_video_datasets import write_camvid, write_cityscapes, write_vspw
from vss.data.camvid import CamVidVideoDataModule
from vss.data.cityscapes import CityscapesVideoDataModule
from vss.data.datamodule import SyntheticDataModule, VSSDataModule
from vss.data.datasets import TrainClips
from vss.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CatMaxRatioCrop,
    KeepRatioRescale,
    PhotoMetricDistortion,
    build_eval_transform,
    seed_transform,
)
from vss.data.vspw import IGNORE_INDEX
from vss.lit import VSSModule
from vss.models.aggregators.base import clamp_references
from vss.models.aggregators.segformer import SegFormer
from vss.models.encoders import build_encoder
from vss.models.ops.normalize import normalize_frames
from vss.models.segmenter import Segmenter
from vss.models.streamer import Streamer

LOADER: dict[str, Any] = dict(num_workers=0, pin_memory=False, persistent_workers=False, seed=0)
OFFSETS = (-3, -1)


# ---------------------------------------------------------------------------------------------
# the old pipeline: normalised and padded float32 frames, int64 labels, built in the worker


def old_train_transform(
    scale: Sequence[int],
    crop_size: Sequence[int],
    ratio_range: Sequence[float],
    cat_max_ratio: float,
    flip_prob: float,
    photometric: str,
    seed: int | None = None,
) -> A.Compose:
    """The training pipeline before the lean data path: Normalize, then PadIfNeeded (fill 0), then ToTensorV2."""
    ch, cw = int(crop_size[0]), int(crop_size[1])
    steps: list[A.BasicTransform] = [
        KeepRatioRescale(scale, ratio_range),
        CatMaxRatioCrop(ch, cw, cat_max_ratio),
        A.HorizontalFlip(p=flip_prob),
    ]
    if photometric != "none":
        steps.append(PhotoMetricDistortion(per_frame=photometric == "per_frame"))
    steps += [
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        A.PadIfNeeded(ch, cw, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX),
        ToTensorV2(),
    ]
    return seed_transform(A.Compose(steps, strict=True), seed)


def old_eval_transform(scale: Sequence[int], size_divisor: int) -> A.Compose:
    """The evaluation pipeline before the lean data path: the resizes, then Normalize in the worker."""
    steps = build_eval_transform(scale, size_divisor).transforms[:-1]  # KeepRatioRescale, AlignedResize
    return A.Compose([*steps, A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()], strict=True)


class OldTrainClips(TrainClips):
    """Training clips as the workers used to give them: float32 normalised padded frames, int64 labels."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from vss.data.datasets import _load_clip

        v = i % len(self.videos)
        video = self.videos[v]
        indices = self.sampler.train_indices(len(video), self.rng, self.targets[v])
        frames, labels, _ = _load_clip(video, indices, self.label_map, self.read_label)
        out = self.transform(images=frames, masks=labels)
        return {"images": out["images"].float(), "labels": torch.as_tensor(out["masks"]).long()}


def old_train_dataset(dm: VSSDataModule) -> OldTrainClips:
    new = dm.train_dataset()
    tf = old_train_transform(dm.scale, dm.crop_size, **dm.aug)
    return OldTrainClips(new.videos, new.sampler, new.label_map, tf, new.repeat, new.read_label, new.seed, new.rank)


def batches(dataset: Any, n: int, batch_size: int = 2) -> Iterator[dict[str, Any]]:
    """The first ``n`` collated batches of ``dataset`` in order (one process, as a worker makes them)."""
    for k, batch in enumerate(DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)):
        if k == n:
            return
        yield batch


# ---------------------------------------------------------------------------------------------
# the datasets: synthetic, fake VSPW, fake Cityscapes and CamVid (sparse labels), crops larger than some rescales


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("lean")
    return {
        "vspw": write_vspw(base / "vspw"),
        "cityscapes": write_cityscapes(base / "cityscapes"),
        "camvid": write_camvid(base / "camvid"),
        "synthetic": base / "synthetic",
    }


def datamodule(name: str, roots: dict[str, Path]) -> VSSDataModule:
    """A data module of ``name`` whose crop is larger than a rescaled frame at small ratios (padding happens)."""
    clip = {"offsets": list(OFFSETS)}
    if name == "synthetic":
        knobs = dict(train_videos=3, val_videos=2, min_frames=8, max_frames=10, height=32, width=48)
        return SyntheticDataModule(
            str(roots[name]), synthetic=knobs, scale=(48, 32), crop_size=(40, 40), clip=clip, **LOADER
        )
    if name == "vspw":
        return VSSDataModule(
            str(roots[name]), num_classes=124, scale=(72, 40), crop_size=(40, 48), clip=clip, train_repeat=3, **LOADER
        )
    if name == "cityscapes":
        return CityscapesVideoDataModule(
            str(roots[name]), scale=(128, 64), crop_size=(48, 48), clip=clip, train_repeat=4, **LOADER
        )
    return CamVidVideoDataModule(
        str(roots[name]), scale=(64, 48), crop_size=(40, 40), clip=clip, train_repeat=3, **LOADER
    )


DATASETS = ("synthetic", "vspw", "cityscapes", "camvid")


@pytest.mark.parametrize("name", DATASETS)
def test_training_batches_equal_the_old_float_batches(name: str, roots: dict[str, Path]) -> None:
    """uint8 clips + valid sizes, normalised on the device, are the old batches exactly; labels too (ids in uint8)."""
    dm = datamodule(name, roots)
    dm.setup("fit")
    new, old = dm.train_dataset(), old_train_dataset(dm)
    crop = torch.tensor(dm.crop_size)
    padded = 0
    for b_new, b_old in zip(batches(new, 6), batches(old, 6), strict=True):
        assert b_new["images"].dtype == torch.uint8 and b_new["labels"].dtype == torch.uint8
        assert b_old["images"].dtype == torch.float32 and b_old["labels"].dtype == torch.int64
        images = normalize_frames(b_new["images"], b_new["valid"])
        torch.testing.assert_close(images, b_old["images"], rtol=0, atol=0)
        torch.testing.assert_close(b_new["labels"].long(), b_old["labels"], rtol=0, atol=0)
        padded += int((b_new["valid"] < crop).any())
    assert padded > 0, "no clip was padded: the padding path went untested"


@pytest.mark.parametrize("path", ["stream", "clip"])
@pytest.mark.parametrize("name", DATASETS)
def test_eval_items_equal_the_old_float_items(name: str, path: str, roots: dict[str, Path]) -> None:
    """Evaluation frames (stream path) and clips (clip path): uint8 normalised on the device = the old floats."""
    dm = datamodule(name, roots)
    dm.setup("validate")
    if path == "clip":
        dm.use_clip_path(lambda t, n: clamp_references(OFFSETS, t, n), 1 + len(OFFSETS))
    new = dm.eval_dataset(dm.splits["validate"])
    old = copy.copy(new)
    old.transform = old_eval_transform(dm.scale, dm.size_divisor)
    for b_new, b_old in zip(batches(new, 3), batches(old, 3), strict=True):
        assert b_new["images"].dtype == torch.uint8 and b_new["labels"].dtype == torch.uint8
        torch.testing.assert_close(normalize_frames(b_new["images"]), b_old["images"], rtol=0, atol=0)
        torch.testing.assert_close(b_new["labels"], b_old["labels"], rtol=0, atol=0)
        assert b_new["video"] == b_old["video"] and torch.equal(b_new["frame"], b_old["frame"])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # no Trainer: the step's logging is a no-op
def test_training_loss_unchanged_on_one_batch(roots: dict[str, Path]) -> None:
    """VSSModule.training_step on the uint8 batch (normalised on the device) gives the old batch's loss, bit for bit."""
    dm = datamodule("synthetic", roots)
    dm.setup("fit")
    b_new = next(batches(dm.train_dataset(), 1, batch_size=4))
    b_old = next(batches(old_train_dataset(dm), 1, batch_size=4))
    assert (b_new["valid"] < torch.tensor(dm.crop_size)).any()  # padded clips in the batch
    torch.manual_seed(0)
    seg = Segmenter(build_encoder("mit_b0"), partial(SegFormer, embed_dim=16), num_classes=dm.num_classes)
    module = VSSModule(seg, num_classes=dm.num_classes, optimizer=partial(torch.optim.AdamW, lr=1e-4))
    losses = []
    for batch in (b_new, b_old):
        torch.manual_seed(1)  # the same dropout draws
        losses.append(module.training_step(batch, 0))
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the model's input: uint8 normalised inside, floats taken as normalised


def test_normalize_frames_formula_padding_and_dtypes() -> None:
    """(x / 255 - mean) / std per channel; the padding beyond ``valid`` is 0; floats pass; other dtypes are refused."""
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 5).contiguous()
    out = normalize_frames(x, valid=torch.tensor([[4, 5], [2, 3]]))
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = (torch.tensor([0.0, 128.0, 255.0]) / 255 - mean) / std  # channel c holds value (0, 128, 255)[c]
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    assert (out[0] != 0).all()  # the whole first sample is valid
    assert (out[1, :, 2:] == 0).all() and (out[1, :, :, 3:] == 0).all() and (out[1, :, :2, :3] != 0).all()
    f = torch.randn(1, 3, 4, 4)
    assert normalize_frames(f) is f  # a float input is already normalised
    assert normalize_frames(x, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="uint8"):
        normalize_frames(x.long())


def test_segmenter_and_streamer_take_uint8_frames() -> None:
    """The clip path and the Streamer give the same logits for uint8 frames as for the frames normalised outside."""
    torch.manual_seed(0)
    seg = Segmenter(build_encoder("mit_b0"), partial(SegFormer, embed_dim=16), num_classes=5).eval()
    video = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(seg(video[None])["logits"], seg(normalize_frames(video)[None])["logits"])
    lean = [o.logits for o in Streamer(seg, 2).run([video])]
    old = [o.logits for o in Streamer(seg, 2).run([normalize_frames(video)])]
    assert len(lean) == 4
    for a, b in zip(lean, old, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
