"""Lightning callbacks of the suite: validation images (PNGs and W&B masks) and the per-class IoU table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from vss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from vss.data.vspw import IGNORE_INDEX


def palette(num_classes: int) -> np.ndarray:
    """Distinct RGB colours per class (PASCAL-style bit pattern); ignore is black."""
    pal = np.zeros((256, 3), np.uint8)
    for c in range(num_classes):
        lab, r, g, b = c + 1, 0, 0, 0
        for shift in range(8):
            r |= ((lab >> 0) & 1) << (7 - shift)
            g |= ((lab >> 1) & 1) << (7 - shift)
            b |= ((lab >> 2) & 1) << (7 - shift)
            lab >>= 3
        pal[c] = (r, g, b)
    return pal


def _wandb(trainer: pl.Trainer) -> Any:
    from pytorch_lightning.loggers import WandbLogger

    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


class ValidationImages(pl.Callback):
    """Keeps the first ``num_images`` validation targets; after each validation writes frame | prediction |
    truth panels under ``dirpath/stepNNNNNNN/`` and, with W&B, logs them as mask overlays plus the per-class
    IoU table (rank 0 only)."""

    def __init__(self, num_images: int = 4, dirpath: str | None = None) -> None:
        super().__init__()
        self.num_images = int(num_images)
        self.dirpath = Path(dirpath) if dirpath else None
        self._kept: list[dict[str, Any]] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._kept = []

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not isinstance(outputs, dict):
            return
        for item, pred in zip(outputs.get("items", []), outputs.get("preds", []), strict=True):
            if len(self._kept) >= self.num_images:
                return
            img = item["images"][-1] if item["images"].ndim == 4 else item["images"]
            mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
            img = ((img.float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            self._kept.append(
                {
                    "name": f"{item['video']}_{int(item['frame']):05d}",
                    "image": img,
                    "pred": pred.cpu().numpy().astype(np.uint8),
                    "gt": item["labels"].cpu().numpy().astype(np.uint8),
                }
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        kept, self._kept = self._kept, []
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        wb = _wandb(trainer)
        per_class = (getattr(pl_module, "last_metrics", {}) or {}).get("per_class_iou")
        if wb is not None and per_class:
            rows = [[n, v] for n, v in per_class.items()]
            wb.log_table(key="val/per_class_iou", columns=["class", "IoU"], data=rows, step=trainer.global_step)
        if not kept:
            return
        import cv2

        pal = palette(pl_module.num_classes)
        pal[IGNORE_INDEX] = 0
        for o in kept:  # the frame was resized for the network; bring it back to the mask size
            o["image"] = cv2.resize(o["image"], o["gt"].shape[::-1], interpolation=cv2.INTER_LINEAR)
        if self.dirpath is not None:
            out = self.dirpath / f"step{trainer.global_step:07d}"
            out.mkdir(parents=True, exist_ok=True)
            for o in kept:
                img = o["image"]
                panel = np.concatenate(
                    [img] + [(0.5 * img + 0.5 * pal[o[k]]).astype(np.uint8) for k in ("pred", "gt")], 1
                )
                cv2.imwrite(str(out / f"{o['name']}.png"), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
        if wb is not None:
            labels = dict(enumerate(pl_module.class_names)) | {IGNORE_INDEX: "ignore"}
            masks = [
                {
                    "predictions": {"mask_data": o["pred"], "class_labels": labels},
                    "ground_truth": {"mask_data": o["gt"], "class_labels": labels},
                }
                for o in kept
            ]
            wb.log_image(
                "val/overlays",
                images=[o["image"] for o in kept],
                masks=masks,
                caption=[o["name"] for o in kept],
                step=trainer.global_step,
            )
