"""Tiny Cityscapes-video and CamVid-video trees in the real file-name patterns (random pixels)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from vss.data.camvid import PALETTE as CAMVID_PALETTE
from vss.data.cityscapes import LABEL_ID_TO_TRAIN_ID

CITY_SNIPPETS = {"train": [("aachen", "000000", 19), ("aachen", "000001", 19)], "val": [("frankfurt", "000000", 294)]}


def write_cityscapes(root: Path, size: tuple[int, int] = (64, 128), seed: int = 0, trainids: bool = False) -> Path:
    """leftImg8bit_sequence + gtFine (labelIds, optionally labelTrainIds) with 30 frames per snippet."""
    rng = np.random.default_rng(seed)
    h, w = size
    ids = np.array([0, 1, 4, *LABEL_ID_TO_TRAIN_ID], np.uint8)  # void ids and all 19 class ids
    for split, snippets in CITY_SNIPPETS.items():
        for city, seq, k in snippets:
            seq_dir = root / "leftImg8bit_sequence" / split / city
            gt_dir = root / "gtFine" / split / city
            seq_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            for f in range(k - 19, k + 11):
                img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                assert cv2.imwrite(str(seq_dir / f"{city}_{seq}_{f:06d}_leftImg8bit.png"), img)
            label = ids[rng.integers(0, len(ids), (h, w))]
            assert cv2.imwrite(str(gt_dir / f"{city}_{seq}_{k:06d}_gtFine_labelIds.png"), label)
            if trainids:
                lut = np.full(256, 255, np.uint8)
                for lid, tid in LABEL_ID_TO_TRAIN_ID.items():
                    lut[lid] = tid
                assert cv2.imwrite(str(gt_dir / f"{city}_{seq}_{k:06d}_gtFine_labelTrainIds.png"), lut[label])
    return root


#: label stems per split: 0001TP (k = N - 6660) and 0016E5 (k = N + 1), one 15 Hz pair in val
CAMVID_SPLITS = {
    "train": ["0001TP_006690", "0001TP_006720", "0016E5_00390"],
    "val": ["0016E5_00419", "0016E5_00421"],
    "test": ["0001TP_006750"],
}
CAMVID_FRAMES = {"0001TP": 100, "0016E5": 430}


def write_camvid(root: Path, size: tuple[int, int] = (48, 64), seed: int = 0, colour: bool = False) -> Path:
    """frames/<seq>/<seq>_<k:06d>.png, labels/<stem>.png (or _L.png colours) and the split lists."""
    rng = np.random.default_rng(seed)
    h, w = size
    for seq, n in CAMVID_FRAMES.items():
        d = root / "frames" / seq
        d.mkdir(parents=True)
        for k in range(n):
            assert cv2.imwrite(str(d / f"{seq}_{k:06d}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    (root / "labels").mkdir()
    for split, stems in CAMVID_SPLITS.items():
        (root / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
        for stem in stems:
            ids = rng.integers(0, 12, (h, w)).astype(np.uint8)  # 11 = void
            if colour:
                rgb = np.array([*CAMVID_PALETTE, (0, 0, 0)], np.uint8)[ids]
                assert cv2.imwrite(str(root / "labels" / f"{stem}_L.png"), rgb[..., ::-1])
            else:
                assert cv2.imwrite(str(root / "labels" / f"{stem}.png"), ids)
    return root


def write_vspw(
    root: Path,
    videos: int = 3,
    frames: int = 12,
    size: tuple[int, int] = (40, 72),
    num_classes: int = 124,
    seed: int = 0,
) -> Path:
    """VSPW_480p layout: data/<video>/origin/*.jpg and mask/*.png (raw 0 = others, 1..C, 255 void), train/val lists."""
    rng = np.random.default_rng(0)
    h, w = size
    names = [f"{k}_video{k}" for k in range(videos)]
    for name in names:
        origin, mask_dir = root / "data" / name / "origin", root / "data" / name / "mask"
        origin.mkdir(parents=True)
        mask_dir.mkdir(parents=True)
        for f in range(frames):
            img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            assert cv2.imwrite(str(origin / f"{f:08d}.jpg"), img)
            coarse = rng.choice(np.array([0, 1, 2, 7, num_classes, 255], np.uint8), (h // 8, w // 8))
            mask = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_NEAREST)
            assert cv2.imwrite(str(mask_dir / f"{f:08d}.png"), mask)
    for split in ("train", "val"):
        (root / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root
