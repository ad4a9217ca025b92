"""Score a folder of predicted PNGs against a dataset's videos (any layout), like the official eval scripts."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vss.data.predictions import PredictionFormat
from vss.data.vspw import DatasetError, LabelMap, Video, read_mask
from vss.metrics.consistency import VideoConsistency, not_applicable_vc
from vss.metrics.flicker import FlickerRate, not_applicable_flicker
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
    videos: Sequence[Video],
    label_map: LabelMap,
    class_names: Sequence[str] | None = None,
    vc_windows: Sequence[int] = (8, 16),
    iou_mean: str = "gt_present",
    read_label: Callable[[Path], np.ndarray] = read_mask,
    prediction_format: PredictionFormat | None = None,
) -> dict[str, Any]:
    """mIoU/fwIoU (official Evaluator) and mVC_n of the predictions under ``pred_root`` over ``videos``.

    ``prediction_format`` names each labelled frame's file and decodes its values to train ids (default:
    ``<video>/<mask name>``, class ids). Only labelled frames are scored (sparse labels: the annotated
    frames). The GT is mapped with ``label_map`` for the IoU metrics and used raw for VC (as VSPW_code
    does); a prediction value outside ``0..C-1`` is refused. ``per_class_iou`` is keyed by class name (None:
    absent from GT and prediction); an mVC_n without any window is left out and explained under
    ``not_applicable``. ``flicker`` (:class:`~vss.metrics.flicker.FlickerRate`, pooled) and ``flicker_per_video``
    compare the scored frames of consecutive indices (the flicker rate, if no pair: ``not_applicable``).
    """
    pred_root = Path(pred_root)
    fmt = prediction_format or PredictionFormat()
    num_classes = label_map.num_classes
    names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    iou = SegmentationIoU(num_classes, mean=iou_mean)
    vcs = {int(n): VideoConsistency(int(n)) for n in vc_windows}
    flicker = FlickerRate()
    num_frames = 0
    for video in videos:
        for index in video.labelled:
            mask_path = video.masks[index]
            assert mask_path is not None
            pred_path = pred_root / fmt.relative_path(video.name, mask_path.name)
            if not pred_path.is_file():
                raise DatasetError(
                    f"video {video.name!r}: prediction for {mask_path} is missing (expected {pred_path}: "
                    f"prediction_format={fmt.name}, {fmt.layout})"
                )
            gt_raw = read_label(mask_path)
            pred = fmt.decode(read_prediction(pred_path), pred_path)
            if pred.shape != gt_raw.shape:
                raise DatasetError(
                    f"prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]} but its mask {mask_path} is "
                    f"{gt_raw.shape[1]}x{gt_raw.shape[0]} (width x height); they must match"
                )
            if int(pred.max()) >= num_classes:
                bad = np.unique(pred[pred >= num_classes])[:10].tolist()
                raise DatasetError(
                    f"prediction {pred_path}: values {bad} are outside 0..{num_classes - 1} "
                    f"(the data config's {num_classes} classes)"
                )
            gt_train = label_map(gt_raw, mask_path)
            pred_t = torch.from_numpy(pred)[None]
            iou.update(pred_t, torch.from_numpy(gt_train)[None])
            gt_t = torch.from_numpy(gt_raw)[None]
            for vc in vcs.values():
                vc.update(pred_t, gt_t, [video.name], [index])
            flicker.update(pred_t, [video.name], [index])
            num_frames += 1
    res = iou.compute()
    out: dict[str, Any] = {"mIoU": float(res["mIoU"]), "fwIoU": float(res["fwIoU"])}
    for n, vc in vcs.items():
        value = float(vc.compute())
        if math.isnan(value):
            out.setdefault("not_applicable", {})[f"mVC{n}"] = not_applicable_vc(n)
        else:
            out[f"mVC{n}"] = value
    rate = float(flicker.compute())
    if math.isnan(rate):
        out.setdefault("not_applicable", {})["flicker"] = not_applicable_flicker()
    else:
        out["flicker"] = rate
    out["flicker_per_video"] = {v: None if math.isnan(r) else r for v, r in flicker.per_video().items()}
    out.update(
        {
            "pixel_accuracy": float(res["pixel_accuracy"]),
            "mean_class_accuracy": float(res["mean_class_accuracy"]),
            "per_class_iou": {
                name: None if math.isnan(v) else v for name, v in zip(names, res["per_class_iou"].tolist(), strict=True)
            },
            "iou_mean": iou_mean,
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
