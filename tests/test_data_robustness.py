"""Issue 12 items 3 and 13: one synthetic cache per generator setting; validation headers checked first."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from vss.data.datamodule import VSSDataModule
from vss.data.vspw import DatasetError


def test_synthetic_cache_is_keyed_by_every_knob(compose_cfg) -> None:
    base = compose_cfg("paths.data_dir=/d").data.root
    other = compose_cfg("paths.data_dir=/d", "data.synthetic.train_videos=3").data.root
    again = compose_cfg("paths.data_dir=/d", "data.synthetic.train_videos=24").data.root
    assert base != other and base == again and base.startswith("/d/synthetic-s0-64x64-")


def _vspw(root: Path, bad_mask: bool) -> Path:
    root.mkdir(parents=True)
    for split, video in (("train", "a"), ("val", "b")):
        (root / f"{split}.txt").write_text(f"{video}\n")
        for sub in ("origin", "mask"):
            (root / "data" / video / sub).mkdir(parents=True)
        for t in range(3):
            cv2.imwrite(str(root / "data" / video / "origin" / f"{t:05d}.jpg"), np.zeros((8, 8, 3), np.uint8))
            size = (4, 8) if bad_mask and split == "val" and t == 2 else (8, 8)
            cv2.imwrite(str(root / "data" / video / "mask" / f"{t:05d}.png"), np.ones(size, np.uint8))
    return root


def test_validation_headers_are_checked_before_training(tmp_path: Path) -> None:
    kw = {"num_classes": 2, "clip": {"offsets": []}, "num_workers": 0}
    VSSDataModule(root=str(_vspw(tmp_path / "ok", False)), **kw).setup("fit")
    root = _vspw(tmp_path / "bad", True)
    with pytest.raises(DatasetError, match=r"mask .*b/mask/00002.png is 8x4 but its frame .*00002.jpg is 8x8"):
        VSSDataModule(root=str(root), **kw).setup("fit")
    VSSDataModule(root=str(root), check_val_headers=False, **kw).setup("fit")  # off: found only when read


def test_a_bad_training_frame_mid_run_names_the_file_and_the_checker(tmp_path: Path) -> None:
    root = _vspw(tmp_path / "d", False)
    frame = root / "data" / "a" / "origin" / "00001.jpg"
    frame.write_bytes(frame.read_bytes()[:40])  # truncated: found only when read (headers of train are not checked)
    module = VSSDataModule(root=str(root), num_classes=2, clip={"offsets": [-1]}, num_workers=0)
    module.setup("fit")
    clips = module.train_dataset()
    with pytest.raises(DatasetError, match=r"00001\.jpg.*python -m vss\.data\.check lists every broken file"):
        for i in range(20):  # the sampled clip covers frame 1 (of 0..2) with a reference at t-1
            clips[i % len(clips)]
