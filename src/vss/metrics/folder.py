"""Score a folder of predicted PNGs against a VSPW-layout dataset, like the official eval scripts."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vss.data.vspw import DatasetError, LabelMap, read_mask, read_split
from vss.metrics.consistency import VideoConsistency
from vss.metrics.iou import SegmentationIoU

__all__ = ["read_prediction", "score_predictions", "write_metrics_json"]


def read_prediction(path: Path | str) -> np.ndarray:
    """Read a predicted label PNG (8-bit grayscale or palette indices) as HxW uint8; raise naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"prediction {path} is missing")
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.array(im) if mode in ("L", "P") else None
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read prediction {path}: {e}") from e
    if arr is None:
        raise DatasetError(f"prediction {path} must be an 8-bit class-id PNG (PIL mode L or P), got mode {mode}")
    return arr.astype(np.uint8, copy=False)


def score_predictions(
    pred_root: Path | str,
    gt_root: Path | str,
    split: str,
    label_map: LabelMap,
    vc_windows: Sequence[int] = (8, 16),
) -> dict[str, Any]:
    """mIoU/fwIoU (official Evaluator) and mVC_n of ``pred_root/<video>/<mask name>`` over a split.

    The GT is mapped with ``label_map`` for the IoU metrics and used raw for VC (as VSPW_code does).
    Returns a JSON-serialisable dict; NaN per-class IoUs (class absent from GT and prediction) are None.
    """
    pred_root = Path(pred_root)
    videos = read_split(gt_root, split)
    num_classes = label_map.num_classes
    iou = SegmentationIoU(num_classes)
    vcs = {int(n): VideoConsistency(int(n)) for n in vc_windows}
    num_frames = 0
    for video in videos:
        for index, mask_path in enumerate(video.masks):
            pred_path = pred_root / video.name / mask_path.name
            if not pred_path.is_file():
                raise DatasetError(
                    f"video {video.name!r}: prediction for {mask_path} is missing (expected {pred_path})"
                )
            gt_raw = read_mask(mask_path)
            pred = read_prediction(pred_path)
            if pred.shape != gt_raw.shape:
                raise DatasetError(
                    f"prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]} but its mask {mask_path} is "
                    f"{gt_raw.shape[1]}x{gt_raw.shape[0]} (width x height); they must match"
                )
            gt_train = label_map(gt_raw, mask_path)
            pred_t = torch.from_numpy(pred)[None]
            try:
                iou.update(pred_t, torch.from_numpy(gt_train)[None])
            except ValueError as e:
                raise DatasetError(f"prediction {pred_path}: {e}") from e
            gt_t = torch.from_numpy(gt_raw)[None]
            for vc in vcs.values():
                vc.update(pred_t, gt_t, [video.name], [index])
            num_frames += 1
    res = iou.compute()
    out: dict[str, Any] = {
        "mIoU": float(res["mIoU"]),
        "fwIoU": float(res["fwIoU"]),
    }
    for n, vc in vcs.items():
        out[f"mVC{n}"] = float(vc.compute())
    out.update(
        {
            "pixel_accuracy": float(res["pixel_accuracy"]),
            "mean_class_accuracy": float(res["mean_class_accuracy"]),
            "per_class_iou": [None if math.isnan(v) else v for v in res["per_class_iou"].tolist()],
            "num_videos": len(videos),
            "num_frames": num_frames,
        }
    )
    return out


def _jsonable(obj: Any) -> Any:
    """Convert tensors/numpy values to plain Python and non-finite floats to None (strict JSON)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.item() if obj.numel() == 1 else obj.tolist()
    elif isinstance(obj, np.ndarray):
        obj = obj.tolist()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_metrics_json(metrics: Mapping[str, Any], path: Path | str) -> Path:
    """Write ``metrics`` as JSON atomically (temp file in the same folder, then os.replace); NaN -> null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(metrics), indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
