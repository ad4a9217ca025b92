"""Cityscapes video (``leftImg8bit_sequence`` + ``gtFine``): one labelled frame per 30-frame snippet.

Layout (cityscapesScripts names; ``data.sequence_dir`` may be ``leftImg8bit`` for trees that merged them)::

    root/leftImg8bit_sequence/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png   every snippet frame
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png            annotated frames
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelTrainIds.png       (optional, generated)

Each annotated frame ``k`` is frame 19 (0-based) of its snippet ``k-19 .. k+10``. One snippet is one
:class:`~vss.data.vspw.Video` holding the frames a clip needs around ``k`` (the model's offsets, mirrored
too when training clips may be played backwards), with the mask on ``k`` only. Labels are read as the 19
train ids (255 ignore): a ``_labelTrainIds.png`` where present (``label_file=auto``), else the
``_labelIds.png`` mapped by :data:`LABEL_ID_TO_TRAIN_ID` (the cityscapesScripts ``labels.py`` table).
Saved predictions are label ids named as cityscapesScripts' evaluator looks for them
(:class:`LabelIdPredictions`), or train ids under names it does not take (:class:`TrainIdPredictions`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from vss.data.datamodule import VSSDataModule
from vss.data.predictions import PredictionFormat
from vss.data.vspw import IGNORE_INDEX, DatasetError, Video, check_choice, fail, read_mask

log = logging.getLogger("vss.data")

#: The 19 evaluation classes, in train-id order (cityscapesScripts ``labels.py``).
CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
#: Their standard colours (RGB), as cityscapesScripts draws them.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
#: labelIds -> train ids (cityscapesScripts ``labels.py``); every other id 0..33 is ignore (255).
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
MAX_LABEL_ID = 33  # ids 0..33 exist (-1, the licence plate, is never drawn into labelIds PNGs)
SNIPPET_BEFORE, SNIPPET_AFTER = 19, 10  # the annotated frame is snippet frame 19 of 0..29
LABEL_FILES = ("auto", "labelIds", "labelTrainIds")
MISSING_FRAMES = ("error", "clamp")
_GT_NAME = re.compile(r"^(?P<city>.+)_(?P<seq>\d{6})_(?P<frame>\d{6})_gtFine_(?P<kind>labelIds|labelTrainIds)\.png$")

_LABEL_ID_LUT = np.full(256, -1, np.int16)
_LABEL_ID_LUT[: MAX_LABEL_ID + 1] = IGNORE_INDEX
for _lid, _tid in LABEL_ID_TO_TRAIN_ID.items():
    _LABEL_ID_LUT[_lid] = _tid
_TRAIN_ID_LUT = np.full(256, -1, np.int16)
_TRAIN_ID_LUT[: len(CLASSES)] = np.arange(len(CLASSES))
_TRAIN_ID_LUT[IGNORE_INDEX] = IGNORE_INDEX


def read_label(path: Path | str) -> np.ndarray:
    """A Cityscapes label PNG as train ids (H,W) uint8; raise naming the file on unknown ids."""
    path = Path(path)
    raw = read_mask(path)
    train_ids = path.name.endswith("_labelTrainIds.png")
    out = (_TRAIN_ID_LUT if train_ids else _LABEL_ID_LUT)[raw]
    if (out < 0).any():
        bad = np.unique(raw[out < 0])[:10].tolist()
        allowed = f"0..{len(CLASSES) - 1}, 255 (train ids)" if train_ids else f"0..{MAX_LABEL_ID} (labelIds)"
        raise DatasetError(f"{path}: label values {bad} are not Cityscapes ids (allowed: {allowed})")
    return out.astype(np.uint8)


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids (255 ignore) back to labelIds (ignore -> 0, "unlabeled"), as the official evaluator wants."""
    lut = np.zeros(256, np.uint8)
    for lid, tid in LABEL_ID_TO_TRAIN_ID.items():
        lut[tid] = lid
    return lut[train_ids]


def _frame_id(label_name: str) -> tuple[str, str, str]:
    """(city, seq, frame) of a gtFine label file name."""
    m = _GT_NAME.match(label_name)
    if m is None:
        raise DatasetError(f"{label_name!r} is not a Cityscapes label name (<city>_<seq>_<frame>_gtFine_labelIds.png)")
    return m["city"], m["seq"], m["frame"]


class LabelIdPredictions(PredictionFormat):
    """cityscapesScripts' result format: labelIds at ``<city>/<city>_<seq>_<frame>_pred_labelIds.png``.

    ``csEvalPixelLevelSemanticLabeling`` takes, for each ground truth, the one file under
    ``CITYSCAPES_RESULTS`` (searched recursively) named ``<city>_<seq>_<frame>*.png``, and reads its values as
    label ids; the names do not end like the ground truth's (``_gtFine_labelIds.png``).
    """

    name = "cityscapes"
    layout = "<city>/<city>_<seq>_<frame>_pred_labelIds.png, label ids as cityscapesScripts reads them"

    def relative_path(self, video: str, label_name: str) -> Path:
        city, seq, frame = _frame_id(label_name)
        return Path(city) / f"{city}_{seq}_{frame}_pred_labelIds.png"

    def encode(self, train_ids: np.ndarray) -> np.ndarray:
        return train_ids_to_label_ids(train_ids)

    def decode(self, stored: np.ndarray, path: Path) -> np.ndarray:
        train_ids = _LABEL_ID_LUT[stored]
        bad = (train_ids < 0) | (train_ids == IGNORE_INDEX)
        if bad.any():
            values = np.unique(stored[bad])[:10].tolist()
            raise DatasetError(
                f"prediction {path}: values {values} are not label ids of the 19 evaluation classes "
                f"{sorted(LABEL_ID_TO_TRAIN_ID)} (prediction_format=cityscapes reads label ids; prediction_format="
                "train_ids reads train ids)"
            )
        return train_ids.astype(np.uint8)


class TrainIdPredictions(PredictionFormat):
    """Train ids 0..18 at ``<city>/trainIds_<city>_<seq>_<frame>.png``.

    The name does not start with ``<city>_``, so cityscapesScripts' evaluator, which would read the values as
    label ids, finds no prediction and says so instead of scoring them.
    """

    layout = "<city>/trainIds_<city>_<seq>_<frame>.png, train ids 0..18 (not for cityscapesScripts)"

    def relative_path(self, video: str, label_name: str) -> Path:
        city, seq, frame = _frame_id(label_name)
        return Path(city) / f"trainIds_{city}_{seq}_{frame}.png"


def frame_path(root: Path, sequence_dir: str, split: str, city: str, seq: str, frame: int) -> Path:
    """The file of one sequence frame."""
    return root / sequence_dir / split / city / f"{city}_{seq}_{frame:06d}_leftImg8bit.png"


def annotated_frames(
    root: Path, split: str, label_file: str = "auto", problems: list[str] | None = None
) -> list[tuple[str, str, int, Path]]:
    """(city, seq, frame, label file) of every annotated frame of ``gtFine/<split>``, in name order."""
    check_choice("data.label_file", label_file, LABEL_FILES)
    gt_dir = root / "gtFine" / split
    if not gt_dir.is_dir():
        raise DatasetError(
            f"Cityscapes labels folder {gt_dir} is missing (expected gtFine/{split}/<city>/*_gtFine_labelIds.png)"
        )
    found: dict[tuple[str, str, int], dict[str, Path]] = {}
    for path in sorted(gt_dir.glob("*/*_gtFine_label*Ids.png")):
        m = _GT_NAME.match(path.name)
        if m is None:
            continue
        if m["city"] != path.parent.name:
            fail(problems, f"{path}: city {m['city']!r} in the name but the file is in folder {path.parent.name!r}")
            continue
        found.setdefault((m["city"], m["seq"], int(m["frame"])), {})[m["kind"]] = path
    if not found:
        raise DatasetError(f"{gt_dir} holds no *_gtFine_labelIds.png or *_gtFine_labelTrainIds.png files")
    out = []
    for (city, seq, frame), kinds in sorted(found.items()):
        kind = label_file if label_file != "auto" else ("labelTrainIds" if "labelTrainIds" in kinds else "labelIds")
        if kind not in kinds:
            fail(
                problems,
                f"{next(iter(kinds.values()))}: no _gtFine_{kind}.png beside it (data.label_file={label_file})",
            )
            continue
        out.append((city, seq, frame, kinds[kind]))
    return out


def read_snippets(
    root: Path | str,
    split: str,
    before: int,
    after: int,
    sequence_dir: str = "leftImg8bit_sequence",
    label_file: str = "auto",
    missing_frames: str = "error",
    problems: list[str] | None = None,
) -> list[Video]:
    """One video per annotated frame ``k``: frames ``k-before .. k+after`` of its snippet, the mask on ``k``.

    A missing frame is an error naming the file; ``missing_frames="clamp"`` uses the nearest existing frame
    of the snippet instead (with a warning). With ``problems`` given, problems are collected, not raised.
    """
    root = Path(root)
    check_choice("data.missing_frames", missing_frames, MISSING_FRAMES)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a directory")
    seq_dir = root / sequence_dir / split
    if not seq_dir.is_dir():
        raise DatasetError(
            f"Cityscapes sequence folder {seq_dir} is missing (expected {sequence_dir}/{split}/<city>/"
            "<city>_<seq>_<frame>_leftImg8bit.png; the leftImg8bit_sequence package)"
        )
    videos, clamped = [], 0
    for city, seq, k, label in annotated_frames(root, split, label_file, problems):
        snippet = range(k - SNIPPET_BEFORE, k + SNIPPET_AFTER + 1)
        present = {f for f in snippet if frame_path(root, sequence_dir, split, city, seq, f).is_file()}
        target = frame_path(root, sequence_dir, split, city, seq, k)
        if k not in present:
            fail(problems, f"label {label} has no frame: {target} is missing")
            continue
        frames = []
        for f in range(k - before, k + after + 1):
            if f not in present:
                path = frame_path(root, sequence_dir, split, city, seq, f)
                if missing_frames == "error":
                    fail(
                        problems,
                        f"snippet {city}_{seq}_{k:06d}: frame {path} is missing; a clip needs frames "
                        f"{k - before}..{k + after} (data.missing_frames=clamp uses the nearest frame instead)",
                    )
                    break
                f = min(present, key=lambda p, f=f: (abs(p - f), p))
                clamped += 1
            frames.append(frame_path(root, sequence_dir, split, city, seq, f))
        else:
            masks = tuple(label if f == k else None for f in range(k - before, k + after + 1))
            videos.append(Video(name=f"{city}_{seq}_{k:06d}", frames=tuple(frames), masks=masks))
    if clamped:
        log.warning("Cityscapes %s: %d missing snippet frame(s) replaced by the nearest frame", split, clamped)
    return videos


def scan_snippets(
    root: Path, split: str, problems: list[str], sequence_dir: str = "leftImg8bit_sequence"
) -> list[Video]:
    """For ``vss.data.check``: every annotated frame with its whole 30-frame snippet, problems collected."""
    try:
        return read_snippets(
            root, split, SNIPPET_BEFORE, SNIPPET_AFTER, sequence_dir, "auto", "error", problems=problems
        )
    except DatasetError as e:
        problems.append(str(e))
        return []


class CityscapesVideoDataModule(VSSDataModule):
    """Clips from Cityscapes snippets: the target is the annotated frame, references are unlabelled frames."""

    @classmethod
    def detects(cls, root: Path) -> bool:
        """A Cityscapes tree: ``gtFine/`` under the root."""
        return (root / "gtFine").is_dir()

    def __init__(
        self,
        root: str,
        sequence_dir: str = "leftImg8bit_sequence",
        label_file: str = "auto",
        missing_frames: str = "error",
        **kwargs: Any,
    ) -> None:
        check_choice("data.label_file", label_file, LABEL_FILES)
        check_choice("data.missing_frames", missing_frames, MISSING_FRAMES)
        num_classes = int(kwargs.pop("num_classes", len(CLASSES)))
        if num_classes != len(CLASSES):
            raise ValueError(f"data.num_classes={num_classes}: Cityscapes has {len(CLASSES)} train ids")
        kwargs["class_names"] = kwargs.get("class_names") or list(CLASSES)
        kwargs["palette"] = kwargs.get("palette") or [list(c) for c in PALETTE]
        kwargs["label_map"] = {"reduce_zero_label": False}  # read_label already gives train ids
        kwargs["sparse_labels"] = True
        super().__init__(root=root, num_classes=num_classes, **kwargs)
        self.sequence_dir, self.label_file, self.missing_frames = sequence_dir, label_file, missing_frames

    def span(self, split: str) -> tuple[int, int]:
        """Frames a clip reads before / after the target in ``split`` (training: mirrored if played backwards)."""
        offsets = list(self.clip_sampler.offsets)
        if split == self.splits["fit"] and self.clip_sampler.reverse_prob > 0:
            offsets += [-o for o in offsets]
        return max(0, -min(offsets, default=0)), max((0, *offsets))

    def read_videos(self, split: str) -> list[Video]:
        before, after = self.span(split)
        if before > SNIPPET_BEFORE or after > SNIPPET_AFTER:
            raise ValueError(
                f"data.clip.offsets={list(self.clip_sampler.offsets)} reach {before} frames before / {after} after "
                f"the annotated frame (reverse_prob={self.clip_sampler.reverse_prob} mirrors them in training); a "
                f"Cityscapes snippet has {SNIPPET_BEFORE} before and {SNIPPET_AFTER} after"
            )
        return read_snippets(self.root, split, before, after, self.sequence_dir, self.label_file, self.missing_frames)

    def read_label(self, path: Path) -> np.ndarray:
        return read_label(path)

    def prediction_formats(self) -> dict[str, PredictionFormat]:
        """Label ids for cityscapesScripts' evaluator (the default), or train ids."""
        return {"cityscapes": LabelIdPredictions(), "train_ids": TrainIdPredictions()}

    def scan(self, root: Path, split: str, problems: list[str]) -> list[Video]:
        """For the check: every annotated frame with its whole 30-frame snippet."""
        return scan_snippets(root, split, problems, self.sequence_dir)
