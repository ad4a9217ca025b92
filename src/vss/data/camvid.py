"""CamVid video: the 701 labelled frames (367/101/233) inside the decoded frames of the 4 source videos.

Layout (frames decoded 0-based with OpenCV, one folder per sequence; labels under their original names)::

    root/frames/<seq>/<seq>_<k:06d>.png     every decoded frame k of 0001TP, 0006R0, 0016E5, Seq05VD
    root/labels/<stem>.png                  11-class index PNGs (0..10; 11 and 255 void), or
    root/labels/<stem>_L.png                the original 32-class colour PNGs (``label_form=colour``)
    root/{train,val,test}.txt               label stems, one per line, e.g. ``0016E5_07959``

A label stem's number N is the frame index in the source video; the decoded frame is ``k = N - 6660``
for 0001TP and ``k = N + 1`` for the other three (the alignment DAVSS, TMANet and AR-Seg agree on). One
sequence of a split is one :class:`~vss.data.vspw.Video` over all its decoded frames, labelled at the
split's frames only. Classes in SegNet order (:data:`CLASSES`), void = 255. Colour labels are mapped
with one named convention (:data:`COLOUR_CONVENTIONS`): ``grouped`` (TMANet's grouping of all 32
classes, the default) or ``exact`` (AR-Seg's: only the 11 class colours, everything else void).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vss.data.datamodule import VSSDataModule
from vss.data.vspw import IGNORE_INDEX, DatasetError, Video, check_choice, fail, read_mask

#: The 11 classes in SegNet order.
CLASSES: tuple[str, ...] = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip
#: Their colours in the 32-class legend (RGB), used for overlays too.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
SEQUENCES = ("0001TP", "0006R0", "0016E5", "Seq05VD")
#: decoded frame index k = label number N + shift (0-based OpenCV decoding).
FRAME_SHIFT = {"0001TP": -6660, "0006R0": 1, "0016E5": 1, "Seq05VD": 1}
#: The 32-class colour legend -> SegNet id under each convention (255 = void).
_LEGEND: dict[tuple[int, int, int], tuple[int, int]] = {
    (64, 128, 64): (9, 255), (192, 0, 128): (1, 255), (0, 128, 192): (10, 10), (0, 128, 64): (1, 255),
    (128, 0, 0): (1, 1), (64, 0, 128): (8, 8), (64, 0, 192): (9, 255), (192, 128, 64): (9, 255),
    (192, 192, 128): (2, 2), (64, 64, 128): (7, 7), (128, 0, 192): (3, 255), (192, 0, 64): (3, 255),
    (128, 128, 64): (6, 255), (192, 0, 192): (10, 255), (128, 64, 64): (8, 255), (64, 192, 128): (4, 255),
    (64, 64, 0): (9, 9), (128, 64, 128): (3, 3), (128, 128, 192): (4, 255), (0, 0, 192): (4, 4),
    (192, 128, 128): (6, 6), (128, 128, 128): (0, 0), (64, 128, 192): (8, 255), (0, 0, 64): (2, 255),
    (0, 64, 64): (6, 255), (192, 64, 128): (8, 255), (128, 128, 0): (5, 5), (192, 128, 192): (8, 255),
    (64, 0, 64): (1, 255), (192, 192, 0): (5, 255), (0, 0, 0): (255, 255), (64, 192, 0): (1, 255),
}  # fmt: skip
COLOUR_CONVENTIONS = ("grouped", "exact")
LABEL_FORMS = ("index", "colour")
_STEM = re.compile(r"^(?P<seq>0001TP|0006R0|0016E5|Seq05VD)_f?(?P<num>\d+)$")


def colour_table(convention: str) -> dict[int, int]:
    """Packed RGB (r<<16 | g<<8 | b) -> SegNet id for a 32 -> 11 convention."""
    col = COLOUR_CONVENTIONS.index(check_choice("data.colour_convention", convention, COLOUR_CONVENTIONS))
    return {(r << 16) | (g << 8) | b: ids[col] for (r, g, b), ids in _LEGEND.items()}


def read_colour_label(path: Path | str, convention: str = "grouped") -> np.ndarray:
    """A 32-class colour label PNG as SegNet ids (H,W) uint8; raise naming the file on a colour not in the legend."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetError(f"cannot read label {path} (missing, empty or not an image)")
    packed = (bgr[..., 2].astype(np.int32) << 16) | (bgr[..., 1].astype(np.int32) << 8) | bgr[..., 0]
    table = colour_table(convention)
    keys = np.array(sorted(table), np.int32)
    values = np.array([table[k] for k in keys.tolist()], np.uint8)
    pos = np.clip(np.searchsorted(keys, packed), 0, len(keys) - 1)
    known = keys[pos] == packed
    if not known.all():
        bad = [f"({v >> 16},{(v >> 8) & 255},{v & 255})" for v in np.unique(packed[~known])[:5].tolist()]
        raise DatasetError(f"{path}: colours {', '.join(bad)} are not in the CamVid 32-class legend")
    return values[pos]


def read_index_label(path: Path | str) -> np.ndarray:
    """An 11-class index label PNG (0..10; 11 = SegNet's void, 255 void) as SegNet ids with void 255."""
    raw = read_mask(path)
    bad = (raw > 11) & (raw != IGNORE_INDEX)
    if bad.any():
        raise DatasetError(
            f"{path}: label values {np.unique(raw[bad])[:10].tolist()} are not CamVid ids (0..10, void 11 or 255)"
        )
    out = raw.copy()
    out[raw == 11] = IGNORE_INDEX
    return out


def label_frame(stem: str) -> tuple[str, int]:
    """(sequence, decoded frame index) of a label stem such as ``0016E5_07959`` or ``Seq05VD_f00030``."""
    m = _STEM.match(stem)
    if m is None:
        raise DatasetError(f"{stem!r} is not a CamVid label name (<{'|'.join(SEQUENCES)}>_<frame number>)")
    return m["seq"], int(m["num"]) + FRAME_SHIFT[m["seq"]]


def read_camvid_split(
    root: Path | str, split: str, label_form: str = "index", problems: list[str] | None = None
) -> list[Video]:
    """One video per sequence of ``root/<split>.txt``: all its decoded frames, masks on the split's frames."""
    root = Path(root)

    check_choice("data.label_form", label_form, LABEL_FORMS)
    split_file = root / f"{split}.txt"
    if not split_file.is_file():
        raise DatasetError(f"split file {split_file} is missing (expected one label stem per line, e.g. 0016E5_07959)")
    stems = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    if not stems:
        raise DatasetError(f"split file {split_file} lists no labels")
    labels: dict[str, dict[int, Path]] = {}
    for stem in stems:
        try:
            seq, k = label_frame(stem)
        except DatasetError as e:
            fail(problems, f"{split_file}: {e}")
            continue
        path = root / "labels" / (f"{stem}_L.png" if label_form == "colour" else f"{stem}.png")
        if not path.is_file():
            fail(problems, f"{split_file} lists {stem} but its label {path} is missing")
            continue
        labels.setdefault(seq, {})[k] = path
    videos = []
    for seq in sorted(labels):
        folder = root / "frames" / seq
        frames = sorted(folder.glob(f"{seq}_*.png")) if folder.is_dir() else []
        if not frames:
            fail(
                problems,
                f"sequence {seq}: no decoded frames in {folder} (expected {seq}_<k:06d>.png; vss.data.prepare)",
            )
            continue
        index = {int(f.stem.rsplit("_", 1)[1]): f for f in frames}
        first, last = min(index), max(index)
        gaps = [k for k in range(first, last + 1) if k not in index]
        if gaps:
            fail(
                problems,
                f"sequence {seq}: frames {folder / f'{seq}_{gaps[0]:06d}.png'} (and {len(gaps) - 1} more) are missing",
            )
            continue
        masks: list[Path | None] = [None] * (last - first + 1)
        for k, path in sorted(labels[seq].items()):
            if k not in index:
                fail(problems, f"label {path} has no frame: {folder / f'{seq}_{k:06d}.png'} is missing")
                continue
            masks[k - first] = path
        if any(m is not None for m in masks):
            videos.append(Video(name=seq, frames=tuple(index[k] for k in range(first, last + 1)), masks=tuple(masks)))
    return videos


class CamVidVideoDataModule(VSSDataModule):
    """Clips from the CamVid sequences: targets are the split's labelled frames, references any decoded frame."""

    @classmethod
    def detects(cls, root: Path) -> bool:
        """A CamVid video tree: ``frames/`` and ``labels/`` under the root."""
        return (root / "frames").is_dir() and (root / "labels").is_dir()

    def __init__(self, root: str, label_form: str = "index", colour_convention: str = "grouped", **kwargs: Any) -> None:
        check_choice("data.label_form", label_form, LABEL_FORMS)
        check_choice("data.colour_convention", colour_convention, COLOUR_CONVENTIONS)
        num_classes = int(kwargs.pop("num_classes", len(CLASSES)))
        if num_classes != len(CLASSES):
            raise ValueError(f"data.num_classes={num_classes}: CamVid has {len(CLASSES)} classes")
        kwargs["class_names"] = kwargs.get("class_names") or list(CLASSES)
        kwargs["palette"] = kwargs.get("palette") or [list(c) for c in PALETTE]
        kwargs["label_map"] = {"reduce_zero_label": False}  # read_label gives SegNet ids, void 255
        kwargs["sparse_labels"] = True
        super().__init__(root=root, num_classes=num_classes, **kwargs)
        self.label_form, self.colour_convention = label_form, colour_convention

    def read_videos(self, split: str) -> list[Video]:
        return read_camvid_split(self.root, split, self.label_form)

    def read_label(self, path: Path) -> np.ndarray:
        if self.label_form == "colour":
            return read_colour_label(path, self.colour_convention)
        return read_index_label(path)

    def scan(self, root: Path, split: str, problems: list[str]) -> list[Video]:
        """For the check: the split's sequences, problems collected."""
        try:
            return read_camvid_split(root, split, self.label_form, problems)
        except DatasetError as e:
            problems.append(str(e))
            return []
