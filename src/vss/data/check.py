"""Validate a dataset before training: ``python -m vss.data.check ROOT`` (VSPW, Cityscapes video, CamVid video).

Every frame of every listed video is read (image, mask, same size) and its mask is passed through
the label map. All problems are collected (each message names the file), printed, and the exit
code is 1; a clean dataset prints a summary (videos, frames, class pixel histogram) and exits 0.

Without ``--num-classes`` the class count comes from ``ROOT/meta.json`` of a synthetic dataset,
else VSPW's 124.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vss.data.datasets import LabelReader
from vss.data.synthetic import load_config
from vss.data.vspw import (
    FRAME_SUFFIXES,
    IGNORE_INDEX,
    DatasetError,
    LabelMap,
    Video,
    no_mask_message,
    read_image,
    read_mask,
    read_split,
    read_video,
)

VSPW_NUM_CLASSES = 124


@dataclass
class CheckReport:
    """Problems found plus counts and the training-id pixel histogram of the readable frames."""

    problems: list[str] = field(default_factory=list)
    videos: dict[str, int] = field(default_factory=dict)  # split -> videos checked
    frames: dict[str, int] = field(default_factory=dict)  # split -> frames checked
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))  # train id -> pixels
    labelled: int = 0  # frames with a mask that passed the label map


def _split_names(root: Path, split: str, problems: list[str]) -> list[str]:
    """Video ids of ``root/<split>.txt`` (deduplicated); append problems with the split file."""
    split_file = root / f"{split}.txt"
    if not split_file.is_file():
        problems.append(f"split file {split_file} is missing (expected one video id per line)")
        return []
    try:
        lines = split_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"split file {split_file} cannot be read: {e}")
        return []
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        problems.append(f"split file {split_file} lists no videos")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"split file {split_file} lists videos more than once: {dupes[:5]}")
    return list(dict.fromkeys(names))


def _scan_video(root: Path, name: str, problems: list[str], sparse: bool = False) -> Video | None:
    """The video's frame/mask pairs; on a structural problem list every one of them (and keep the pairs)."""
    try:
        return read_video(root, name, sparse)
    except DatasetError as e:
        first = str(e)
    found: list[str] = []
    vdir = root / "data" / name
    origin, mask_dir = vdir / "origin", vdir / "mask"
    frames, masks = [], []
    if not origin.is_dir():
        found.append(f"video {name!r}: frame folder {origin} is missing")
    else:
        listed = sorted(p for p in origin.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not listed:
            found.append(f"video {name!r}: {origin} holds no frames (*.jpg / *.png)")
        if not mask_dir.is_dir():
            found.append(f"video {name!r}: mask folder {mask_dir} is missing")
        else:
            for f in listed:
                m = mask_dir / f"{f.stem}.png"
                if m.is_file():
                    frames.append(f)
                    masks.append(m)
                elif sparse:
                    frames.append(f)
                    masks.append(None)
                else:
                    found.append(no_mask_message(f, m))
    if first not in found:
        found.insert(0, first)
    problems.extend(found)
    return Video(name=name, frames=tuple(frames), masks=tuple(masks)) if frames else None


def scan_vspw(root: Path, split: str, problems: list[str], sparse: bool = False) -> list[Video]:
    """The videos of a VSPW-layout split, every structural problem collected instead of raised."""
    before = len(problems)
    names = _split_names(root, split, problems)
    videos = [v for v in (_scan_video(root, n, problems, sparse) for n in names) if v is not None]
    if names and len(problems) == before:
        try:  # the reader must agree with the scan; report anything it rejects that we missed
            read_split(root, split, sparse)
        except DatasetError as e:
            problems.append(str(e))
    return videos


Scan = Callable[[Path, str, list[str]], list[Video]]


def _check_frames(video: Video, label_map: LabelMap, report: CheckReport, read_label: LabelReader) -> int:
    """Read every frame (and mask) of ``video``; record problems and the histogram; return frames checked."""
    size: tuple[int, int] | None = None
    for frame, mask in zip(video.frames, video.masks, strict=True):
        try:
            img = read_image(frame)
            raw = None if mask is None else read_label(mask)
        except DatasetError as e:
            report.problems.append(str(e))
            continue
        if size is None:
            size = img.shape[:2]
        elif img.shape[:2] != size:
            report.problems.append(
                f"frame {frame} is {img.shape[1]}x{img.shape[0]} but the first frame of video "
                f"{video.name!r} is {size[1]}x{size[0]} (width x height); a video's frames must share a size"
            )
        if raw is None:
            continue
        if raw.shape != img.shape[:2]:
            report.problems.append(
                f"mask {mask} is {raw.shape[1]}x{raw.shape[0]} but its frame {frame} is "
                f"{img.shape[1]}x{img.shape[0]} (width x height); they must match"
            )
            continue
        try:
            ids = label_map(raw, path=mask)
        except DatasetError as e:
            report.problems.append(str(e))
            continue
        report.histogram += np.bincount(ids.ravel(), minlength=256)
        report.labelled += 1
    return len(video.frames)


def run_check(
    root: Path | str,
    splits: Sequence[str],
    label_map: LabelMap,
    progress: bool = False,
    sparse: bool = False,
    scan: Scan | None = None,
    read_label: LabelReader = read_mask,
) -> CheckReport:
    """Check ``splits`` of the dataset at ``root`` (``scan``: the layout, default VSPW); never stops early."""
    root = Path(root)
    report = CheckReport()
    if not root.is_dir():
        report.problems.append(f"dataset root {root} does not exist or is not a directory")
        return report
    for split in splits:
        videos = scan(root, split, report.problems) if scan else scan_vspw(root, split, report.problems, sparse)
        report.videos[split] = len(videos)
        n_frames = 0
        for video in tqdm(videos, desc=f"check {split}", unit="video", disable=not progress):
            n_frames += _check_frames(video, label_map, report, read_label)
        report.frames[split] = n_frames
    return report


def check_dataset(root: Path | str, splits: Sequence[str], label_map: LabelMap, sparse: bool = False) -> list[str]:
    """Problem messages (each naming the file) for ``splits`` of a VSPW-layout dataset; [] if clean."""
    return run_check(root, splits, label_map, sparse=sparse).problems


def _summary(report: CheckReport, class_names: Sequence[str] | None, top: int = 10) -> str:
    """Human-readable counts and the top classes by pixel share."""
    lines = [f"{s}: {report.videos[s]} videos, {report.frames[s]} frames" for s in report.videos]
    lines.append(f"labelled frames: {report.labelled}")
    hist = report.histogram
    total = int(hist.sum())
    if total:
        ignored = int(hist[IGNORE_INDEX])
        lines.append(f"pixels: {total} ({ignored / total:.2%} ignore)")
        counts = hist[:IGNORE_INDEX]
        present = np.flatnonzero(counts)
        lines.append(f"classes present: {len(present)}; top by pixel share:")
        for c in present[np.argsort(-counts[present], kind="stable")][:top].tolist():
            name = class_names[c] if class_names is not None and c < len(class_names) else ""
            lines.append(f"  {c:3d} {name:<16} {counts[c] / total:7.2%}")
    return "\n".join(lines)


GENERIC_LAYOUT = "vspw"
"""The layout every other one falls back to (``root/{split}.txt``, ``data/<video>/{origin,mask}``)."""
DATA_OPTIONS = {
    "sequence_dir": "--sequence-dir",
    "label_form": "--label-form",
    "colour_convention": "--colour-convention",
}
"""Options of this command that set a key of a data group's config (``data.<key>``), where the group has it."""


def data_groups() -> dict[str, str]:
    """The ``data`` config groups that read a tree on disk (name -> ``_target_``); the synthetic set is generated."""
    from omegaconf import OmegaConf

    from vss.config import CONF_DIR

    groups = {}
    for path in sorted((CONF_DIR / "data").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if path.stem == GENERIC_LAYOUT or (isinstance(target, str) and target.startswith("vss.data.")):
            groups[path.stem] = str(target)
    groups.pop("synthetic", None)
    return groups


def detect_layout(root: Path) -> str:
    """The data group whose data module :meth:`~vss.data.datamodule.VSSDataModule.detects` ``root``'s layout,
    else ``vspw``."""
    from hydra.utils import get_class

    for name, target in data_groups().items():
        if name != GENERIC_LAYOUT and get_class(target).detects(root):
            return name
    return GENERIC_LAYOUT


def compose_data(layout: str, root: Path, overrides: Sequence[str] = ()) -> object:
    """The data module of ``data=<layout>`` at ``root`` (its reader, label files and label map), composed as
    ``vss.train`` composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from vss.config import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"data={layout}", f"data.root={root}", *overrides])
    return instantiate(cfg.data)


def _layout_check(
    layout: str, root: Path, splits: Sequence[str], args: argparse.Namespace
) -> tuple[CheckReport, int, Sequence[str]]:
    """Check a tree through its data group's data module (Cityscapes, CamVid, ...)."""
    from omegaconf import OmegaConf

    from vss.config import CONF_DIR

    keys = OmegaConf.load(CONF_DIR / "data" / f"{layout}.yaml")
    overrides = [f"data.{key}={getattr(args, key)}" for key in DATA_OPTIONS if key in keys]
    dm = compose_data(layout, root, overrides)
    return dm.check_report(splits, progress=not args.no_progress), dm.num_classes, dm.class_names


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m vss.data.check", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="dataset root (VSPW: train.txt, val.txt, data/; Cityscapes; CamVid)")
    layouts = ["auto", *data_groups()]
    parser.add_argument(
        "--layout", choices=layouts, default="auto", help="dataset layout: a data group (default: detected)"
    )
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to check")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="VSPW layout: training classes (default: from a synthetic meta.json, else VSPW's 124)",
    )
    parser.add_argument(
        "--no-reduce-zero-label",
        action="store_true",
        help="VSPW layout: raw value k is class k (default: VSPW map, 0 and 255 ignored, k -> k-1)",
    )
    parser.add_argument(
        "--mapping",
        default=None,
        help='VSPW layout: an explicit raw -> train id table (data.label_map.mapping), JSON, e.g. \'{"1": 0, "2": 1}\'',
    )
    parser.add_argument("--sparse", action="store_true", help="VSPW layout: frames without a mask are unlabelled")
    parser.add_argument("--sequence-dir", default="leftImg8bit_sequence", help="Cityscapes: the sequence folder")
    parser.add_argument("--label-form", default="index", choices=["index", "colour"], help="CamVid label PNGs")
    parser.add_argument("--colour-convention", default="grouped", choices=["grouped", "exact"], help="CamVid colours")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    layout = detect_layout(args.root) if args.layout == "auto" else args.layout
    if layout != GENERIC_LAYOUT:
        report, num_classes, class_names = _layout_check(layout, args.root, args.splits, args)
    else:
        synth = load_config(args.root) if args.root.is_dir() else None
        num_classes = args.num_classes or (synth.num_classes if synth else VSPW_NUM_CLASSES)
        class_names = synth.class_names if synth and num_classes == synth.num_classes else None
        sparse = args.sparse or bool(synth and synth.label_every > 1)
        try:
            if args.mapping is not None:
                import json

                mapping = {int(k): int(v) for k, v in json.loads(args.mapping).items()}
                label_map = LabelMap(num_classes, mapping=mapping)
            else:
                label_map = LabelMap(num_classes, reduce_zero_label=not args.no_reduce_zero_label)
        except (ValueError, AttributeError) as e:
            parser.error(f"--mapping / --num-classes: {e}")
        report = run_check(args.root, args.splits, label_map, progress=not args.no_progress, sparse=sparse)
    if report.problems:
        print(f"{len(report.problems)} problem(s) in {args.root} ({layout} layout):")
        for p in report.problems:
            print(f"  - {p}")
        return 1
    print(f"{args.root}: OK ({layout} layout, {num_classes} classes)")
    print(_summary(report, class_names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
