"""Dataset-level IoU metrics with exact parity to the official VSPW ``utils.Evaluator``.

The official evaluator accumulates one confusion matrix (rows = ground truth, columns = prediction)
over every frame, counting only pixels whose ground truth lies in ``0..C-1``. Its mIoU averages the
per-class IoU over the classes *present in the ground truth* (``rowsum > 0``), so a class that is
only predicted does not lower the score (unlike mmseg's table or ``MulticlassJaccardIndex``).

``mean="union"`` is the other convention: the mean over classes with a non-empty union (TP+FP+FN > 0),
as the cityscapesscripts pixel-level evaluator, mmseg's table and the CamVid VSS code (DAVSS
``runningScore``) compute it; a class that is only predicted counts as 0 there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["IOU_MEANS", "SegmentationIoU", "iou_from_confmat"]

#: mIoU conventions: over the classes present in the GT (VSPW Evaluator) or with a non-empty union.
IOU_MEANS = ("gt_present", "union")


def check_iou_mean(mean: str) -> str:
    """Validate an mIoU convention name."""
    if mean not in IOU_MEANS:
        raise ValueError(f"iou_mean={mean!r} is invalid: expected one of {list(IOU_MEANS)}")
    return mean


def iou_from_confmat(confmat: Tensor, mean: str = "gt_present") -> dict[str, Tensor]:
    """Evaluator metrics (float64) from a (C, C) confusion matrix with rows = GT, cols = prediction."""
    check_iou_mean(mean)
    if confmat.device.type == "mps":  # no float64 on MPS
        confmat = confmat.cpu()
    cm = confmat.to(torch.float64)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=cm.device)
    diag = torch.diagonal(cm)
    rowsum, colsum = cm.sum(1), cm.sum(0)
    total = cm.sum()
    # Official formula: diag / (rowsum + colsum - diag), NaN where 0/0 (class absent from GT and pred).
    per_class_iou = diag / (rowsum + colsum - diag)
    present = rowsum > 0 if mean == "gt_present" else (rowsum + colsum) > 0
    if total > 0:
        miou = torch.nansum(torch.where(present, per_class_iou, 0.0)) / present.sum()
        freq = rowsum / total
        fw = freq > 0
        fwiou = (freq[fw] * per_class_iou[fw]).sum()
        pixel_accuracy = diag.sum() / total
        mean_class_accuracy = torch.nanmean(diag / rowsum)
    else:
        miou = fwiou = pixel_accuracy = mean_class_accuracy = nan.clone()
    return {
        "mIoU": miou,
        "fwIoU": fwiou,
        "per_class_iou": per_class_iou,
        "pixel_accuracy": pixel_accuracy,
        "mean_class_accuracy": mean_class_accuracy,
    }


class SegmentationIoU(Metric):
    """Confusion-matrix mIoU / FWIoU / accuracies exactly as VSPW ``utils.Evaluator`` (DDP-exact).

    ``mean``: ``"gt_present"`` (VSPW) or ``"union"`` (Cityscapes / CamVid evaluators), see the module text.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confmat: Tensor

    def __init__(self, num_classes: int, mean: str = "gt_present", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.mean = check_iou_mean(mean)
        self.add_state(
            "confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.int64), dist_reduce_fx="sum"
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add (N,H,W) integer predictions and training-id targets (255 / out of 0..C-1 = not counted)."""
        if preds.shape != target.shape:
            raise ValueError(f"preds shape {tuple(preds.shape)} != target shape {tuple(target.shape)}")
        if preds.is_floating_point() or preds.is_complex():
            raise ValueError(f"preds must be integer class ids (argmax of logits), got {preds.dtype}")
        if target.is_floating_point() or target.is_complex():
            raise ValueError(f"target must be integer class ids, got dtype {target.dtype}")
        c = self.num_classes
        target = target.reshape(-1).long()
        preds = preds.reshape(-1).long()
        counted = (target >= 0) & (target < c)
        t, p = target[counted], preds[counted]
        if p.numel() == 0:
            return
        bad = (p < 0) | (p >= c)
        if bool(bad.any()):
            values = torch.unique(p[bad])[:10].tolist()
            raise ValueError(f"predictions {values} are outside 0..{c - 1} (num_classes={c}) on pixels with a valid GT")
        counts = torch.bincount(t * c + p, minlength=c * c)
        self.confmat += counts.reshape(c, c).to(self.confmat.dtype)

    def compute(self) -> dict[str, Tensor]:
        """Return mIoU, fwIoU, per_class_iou (NaN for 0/0), pixel_accuracy, mean_class_accuracy."""
        return iou_from_confmat(self.confmat, self.mean)
