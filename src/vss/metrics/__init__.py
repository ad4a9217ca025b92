"""Evaluation metrics with parity to the official VSPW scripts (mIoU / FWIoU and VC_n)."""

from vss.metrics.consistency import VideoConsistency, video_consistency
from vss.metrics.folder import read_prediction, score_predictions, write_metrics_json
from vss.metrics.iou import SegmentationIoU, iou_from_confmat

__all__ = [
    "SegmentationIoU",
    "VideoConsistency",
    "iou_from_confmat",
    "read_prediction",
    "score_predictions",
    "video_consistency",
    "write_metrics_json",
]
