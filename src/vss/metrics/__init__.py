"""Evaluation metrics with parity to the official VSPW scripts (mIoU / FWIoU and VC_n) and the flicker rate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vss.metrics.consistency import VideoConsistency, video_consistency
from vss.metrics.flicker import FlickerRate, not_applicable_flicker
from vss.metrics.folder import read_prediction, score_predictions, write_metrics_json
from vss.metrics.iou import SegmentationIoU, iou_from_confmat

SUMMARY_KEYS = ("mIoU", "fwIoU", "mVC8", "mVC16", "flicker")


def format_summary(metrics: Mapping[str, Any], prefix: str = "val") -> str:
    """One line with the headline metrics, e.g. ``val mIoU 0.6123 | fwIoU ...``."""
    return " | ".join(f"{prefix} {k} {metrics[k]:.4f}" for k in SUMMARY_KEYS if metrics.get(k) is not None)


__all__ = [
    "SUMMARY_KEYS",
    "format_summary",
    "FlickerRate",
    "SegmentationIoU",
    "VideoConsistency",
    "iou_from_confmat",
    "not_applicable_flicker",
    "read_prediction",
    "score_predictions",
    "video_consistency",
    "write_metrics_json",
]
