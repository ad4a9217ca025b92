"""Tests for the dataset checker (vss.data.check) and the reader's error messages on bad inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from vss.data.check import check_dataset, main
from vss.data.vspw import DatasetError, LabelMap, read_split

LABEL_MAP = LabelMap(3)  # raw 0 and 255 ignored, 1..3 -> 0..2


def _write_video(root: Path, name: str, n: int = 3, size: tuple[int, int] = (12, 16), start: int = 5) -> None:
    """Write a small valid video (frames .jpg, masks with values 0..3 and 255)."""
    h, w = size
    rng = np.random.default_rng(len(name))
    for t in range(n):
        stem = f"{start + t:08d}"
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = rng.integers(0, 4, (h, w)).astype(np.uint8)
        mask[0, 0] = 255
        (root / "data" / name / "origin").mkdir(parents=True, exist_ok=True)
        (root / "data" / name / "mask").mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / "data" / name / "origin" / f"{stem}.jpg"), img)
        assert cv2.imwrite(str(root / "data" / name / "mask" / f"{stem}.png"), mask)


def _good_dataset(root: Path) -> Path:
    """A clean two-split dataset."""
    for split, names in (("train", ["v1", "v2"]), ("val", ["v3"])):
        for name in names:
            _write_video(root, name)
        (root / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def _frame(root: Path, video: str, i: int = 0) -> Path:
    return sorted((root / "data" / video / "origin").iterdir())[i]


def _mask(root: Path, video: str, i: int = 0) -> Path:
    return sorted((root / "data" / video / "mask").iterdir())[i]


def test_good_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _good_dataset(tmp_path / "ds")
    assert check_dataset(root, ["train", "val"], LABEL_MAP) == []
    assert main([str(root), "--num-classes", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "train: 2 videos, 6 frames" in out and "val: 1 videos, 3 frames" in out


def test_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "nope"
    problems = check_dataset(root, ["train", "val"], LABEL_MAP)
    assert len(problems) == 1 and str(root) in problems[0]
    with pytest.raises(DatasetError, match=str(root)):
        read_split(root, "train")


def test_missing_split_file(tmp_path: Path) -> None:
    root = _good_dataset(tmp_path / "ds")
    (root / "val.txt").unlink()
    problems = check_dataset(root, ["train", "val"], LABEL_MAP)
    assert len(problems) == 1 and str(root / "val.txt") in problems[0]
    with pytest.raises(DatasetError, match=str(root / "val.txt")):
        read_split(root, "val")


def test_video_without_frames(tmp_path: Path) -> None:
    root = _good_dataset(tmp_path / "ds")
    origin = root / "data" / "v2" / "origin"
    for f in origin.iterdir():
        f.unlink()
    problems = check_dataset(root, ["train"], LABEL_MAP)
    assert len(problems) == 1 and str(origin) in problems[0]
    with pytest.raises(DatasetError, match=str(origin)):
        read_split(root, "train")


def test_frames_without_masks(tmp_path: Path) -> None:
    root = _good_dataset(tmp_path / "ds")
    masks = [_mask(root, "v1", 0), _mask(root, "v1", 2)]
    frames = [_frame(root, "v1", 0), _frame(root, "v1", 2)]
    for m in masks:
        m.unlink()
    problems = check_dataset(root, ["train"], LABEL_MAP)
    assert len(problems) == 2  # every missing mask, not just the first
    for f, m in zip(frames, masks, strict=True):
        assert any(str(f) in p and str(m) in p for p in problems)
    with pytest.raises(DatasetError, match=str(frames[0])):
        read_split(root, "train")


def test_unreadable_image(tmp_path: Path) -> None:
    root = _good_dataset(tmp_path / "ds")
    bad = _frame(root, "v3", 1)
    bad.write_bytes(b"this is not a jpeg at all \x00\xff" * 10)
    problems = check_dataset(root, ["train", "val"], LABEL_MAP)
    assert len(problems) == 1 and str(bad) in problems[0]


def test_unreadable_mask(tmp_path: Path) -> None:
    root = _good_dataset(tmp_path / "ds")
    bad = _mask(root, "v2", 0)
    bad.write_bytes(b"")
    rgb = _mask(root, "v2", 1)
    assert cv2.imwrite(str(rgb), np.ones((12, 16, 3), np.uint8))
    problems = check_dataset(root, ["train"], LABEL_MAP)
    assert len(problems) == 2
    assert str(bad) in problems[0] and str(rgb) in problems[1]


def test_mask_size_mismatch(tmp_path: Path) -> None:
    root = _good_dataset(tmp_path / "ds")
    bad = _mask(root, "v1", 1)
    assert cv2.imwrite(str(bad), np.ones((10, 16), np.uint8))
    problems = check_dataset(root, ["train"], LABEL_MAP)
    assert len(problems) == 1 and str(bad) in problems[0] and str(_frame(root, "v1", 1)) in problems[0]


def test_frame_size_changes_within_video(tmp_path: Path) -> None:
    root = _good_dataset(tmp_path / "ds")
    frame, mask = _frame(root, "v3", 2), _mask(root, "v3", 2)
    assert cv2.imwrite(str(frame), np.zeros((20, 20, 3), np.uint8))
    assert cv2.imwrite(str(mask), np.ones((20, 20), np.uint8))
    problems = check_dataset(root, ["val"], LABEL_MAP)
    assert len(problems) == 1 and str(frame) in problems[0]


def test_labels_outside_map(tmp_path: Path) -> None:
    root = _good_dataset(tmp_path / "ds")
    bad = _mask(root, "v2", 2)
    m = np.ones((12, 16), np.uint8)
    m[3, 3] = 4  # LabelMap(3) accepts raw 0..3 and 255
    m[4, 4] = 200
    assert cv2.imwrite(str(bad), m)
    problems = check_dataset(root, ["train"], LABEL_MAP)
    assert len(problems) == 1 and str(bad) in problems[0] and "[4, 200]" in problems[0]
    assert check_dataset(root, ["train"], LabelMap(201, reduce_zero_label=False)) == []


def test_all_problems_collected_and_cli(tmp_path: Path) -> None:
    root = _good_dataset(tmp_path / "ds")
    _write_video(root, "v4")
    _write_video(root, "v5")
    (root / "train.txt").write_text("v1\nv2\nv4\nv5\nmissing_video\n")
    expected = []
    garbage = _frame(root, "v1", 0)
    garbage.write_bytes(b"garbage")
    expected.append(garbage)
    small = _mask(root, "v2", 1)
    assert cv2.imwrite(str(small), np.ones((5, 5), np.uint8))
    expected.append(small)
    no_mask = _mask(root, "v4", 1)
    no_mask.unlink()
    expected.append(_frame(root, "v4", 1))
    out_of_map = _mask(root, "v5", 0)
    assert cv2.imwrite(str(out_of_map), np.full((12, 16), 9, np.uint8))
    expected.append(out_of_map)
    expected.append(root / "data" / "missing_video" / "origin")
    (root / "val.txt").unlink()
    expected.append(root / "val.txt")

    problems = check_dataset(root, ["train", "val"], LABEL_MAP)
    assert len(problems) == len(expected)
    for path in expected:
        assert any(str(path) in p for p in problems), path

    proc = subprocess.run(
        [sys.executable, "-m", "vss.data.check", str(root), "--num-classes", "3", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    for path in expected:
        assert str(path) in proc.stdout
    good = _good_dataset(tmp_path / "good")
    proc = subprocess.run(
        [sys.executable, "-m", "vss.data.check", str(good), "--splits", "train", "val", "--num-classes", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


def test_cli_reads_synthetic_meta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vss.data.synthetic import ensure_synthetic

    root = ensure_synthetic(tmp_path / "syn", progress=False, train_videos=2, val_videos=1, min_frames=4, max_frames=4)
    assert main([str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(vspw layout, 5 classes)" in out and "background" in out
    # the VSPW default of 124 classes also accepts it; a too-small map does not
    assert main([str(root), "--num-classes", "2", "--no-progress"]) == 1
    assert "outside the label map" in capsys.readouterr().out
