"""LightningModule: losses, AdamW with poly schedule and warm-up, VSPW metrics, validation overlays."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from vss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from vss.data.vspw import IGNORE_INDEX
from vss.metrics import SegmentationIoU, VideoConsistency
from vss.models.segmenter import Segmenter

NORM_LAYERS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def poly_warmup_factor(step: int, max_steps: int, warmup_steps: int, warmup_ratio: float, power: float) -> float:
    """mmcv poly schedule with linear warm-up: lr(step) / base lr."""
    poly = (1.0 - min(step, max_steps) / max_steps) ** power
    if step < warmup_steps:
        k = (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
        return poly * (1.0 - k)
    return poly


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


class VSSModule(pl.LightningModule):
    """Trains a :class:`Segmenter` on clips and evaluates mIoU, fwIoU and mVC_n as the VSPW code does."""

    def __init__(
        self,
        segmenter: Segmenter,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        vc_windows: Sequence[int] = (8, 16),
        num_overlays: int = 4,
        overlay_dir: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["segmenter"])
        self.segmenter = segmenter
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        self.optim_cfg = {
            "lr": 6e-5,
            "weight_decay": 0.01,
            "betas": (0.9, 0.999),
            "head_lr_mult": 10.0,
            **(optimizer or {}),
        }
        self.sched_cfg = {"warmup_steps": 1500, "warmup_ratio": 1e-6, "power": 1.0, **(scheduler or {})}
        self.vc_windows = tuple(int(n) for n in vc_windows)
        self.num_overlays = int(num_overlays)
        self.overlay_dir = Path(overlay_dir) if overlay_dir else None
        self.metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict(
                    {
                        "iou": SegmentationIoU(self.num_classes),
                        **{f"vc{n}": VideoConsistency(n) for n in self.vc_windows},
                    }
                )
                for stage in ("val", "test")
            }
        )
        self._overlays: list[dict[str, Any]] = []
        self.last_metrics: dict[str, Any] = {}

    def forward(self, clip: Tensor) -> dict[str, Tensor]:
        return self.segmenter(clip)

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        outputs = self.segmenter(batch["images"])
        terms = self.segmenter.losses(outputs, batch["labels"])
        loss = torch.stack(list(terms.values())).sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step} (terms: "
                f"{ {k: float(v) for k, v in terms.items()} }); lower optimizer.lr or check the data"
            )
        bs = batch["images"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if len(terms) > 1:
            self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=bs)
        return loss

    # -- evaluation ---------------------------------------------------------------------------
    def update_metrics(self, stage: str, batch: dict[str, Any], preds: Tensor) -> None:
        """Add a batch of target predictions (at label size) to the stage's IoU and VC metrics."""
        m = self.metrics[stage]
        m["iou"].update(preds, batch["labels"][:, -1])
        for n in self.vc_windows:
            m[f"vc{n}"].update(preds, batch["raw_target"], list(batch["video"]), [int(f) for f in batch["frame"]])

    def compute_metrics(self, stage: str) -> dict[str, Any]:
        """Headline metrics and per-class IoU of the stage (synced over ranks), then reset its metrics."""
        m = self.metrics[stage]
        iou = m["iou"].compute()
        scores = {k: float(iou[k]) for k in ("mIoU", "fwIoU", "pixel_accuracy")}
        scores |= {f"mVC{n}": float(m[f"vc{n}"].compute()) for n in self.vc_windows}
        per_class = iou["per_class_iou"].tolist()
        scores["per_class_iou"] = {
            n: (None if math.isnan(v) else v) for n, v in zip(self.class_names, per_class, strict=True)
        }
        for metric in m.values():
            metric.reset()
        return scores

    def _eval_step(self, stage: str, batch: dict[str, Any], batch_idx: int) -> None:
        preds = self.segmenter.predict(batch["images"], batch["labels"].shape[-2:], batch.get("single_frame"))
        self.update_metrics(stage, batch, preds)
        if stage == "val" and len(self._overlays) < self.num_overlays and self.global_rank == 0:
            self._keep_overlay(batch, preds)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)

    def _epoch_end(self, stage: str) -> None:
        self.last_metrics = self.compute_metrics(stage)
        headline = {k: v for k, v in self.last_metrics.items() if k != "per_class_iou"}
        self.log_dict({f"{stage}/{k}": float(v) for k, v in headline.items()}, sync_dist=False)
        if stage == "val" and not self.trainer.sanity_checking:
            self._log_per_class_table(stage, self.last_metrics["per_class_iou"])
            self._flush_overlays()

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    # -- logging helpers ----------------------------------------------------------------------
    def _wandb(self):
        from pytorch_lightning.loggers import WandbLogger

        return next((lg for lg in self.loggers if isinstance(lg, WandbLogger)), None)

    def _log_per_class_table(self, stage: str, per_class: dict[str, float | None]) -> None:
        wb = self._wandb()
        if wb is not None and self.global_rank == 0:
            rows = [[n, v] for n, v in per_class.items()]
            wb.log_table(key=f"{stage}/per_class_iou", columns=["class", "IoU"], data=rows, step=self.global_step)

    def _keep_overlay(self, batch: dict[str, Any], preds: Tensor) -> None:
        for i in range(preds.shape[0]):
            if len(self._overlays) >= self.num_overlays:
                return
            img = batch["images"][i, -1].float().cpu()
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
            img = ((img * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            self._overlays.append(
                {
                    "name": f"{batch['video'][i]}_{int(batch['frame'][i]):05d}",
                    "image": img,
                    "pred": preds[i].cpu().numpy().astype(np.uint8),
                    "gt": batch["labels"][i, -1].cpu().numpy().astype(np.uint8),
                }
            )

    def _flush_overlays(self) -> None:
        """Write frame | prediction | truth panels as PNGs and send mask overlays to W&B."""
        import cv2

        overlays, self._overlays = self._overlays, []
        if not overlays or self.global_rank != 0:
            return
        pal = palette(self.num_classes)
        pal[IGNORE_INDEX] = 0
        for o in overlays:  # the frame was resized for the network; bring it back to the mask size
            o["image"] = cv2.resize(o["image"], o["gt"].shape[::-1], interpolation=cv2.INTER_LINEAR)
        if self.overlay_dir is not None:
            out = self.overlay_dir / f"step{self.global_step:07d}"
            out.mkdir(parents=True, exist_ok=True)
            for o in overlays:
                img = o["image"]
                panel = np.concatenate(
                    [img] + [(0.5 * img + 0.5 * pal[o[k]]).astype(np.uint8) for k in ("pred", "gt")], 1
                )
                cv2.imwrite(str(out / f"{o['name']}.png"), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
        wb = self._wandb()
        if wb is not None:
            labels = dict(enumerate(self.class_names)) | {IGNORE_INDEX: "ignore"}
            masks = [
                {
                    "predictions": {"mask_data": o["pred"], "class_labels": labels},
                    "ground_truth": {"mask_data": o["gt"], "class_labels": labels},
                }
                for o in overlays
            ]
            wb.log_image(
                "val/overlays",
                images=[o["image"] for o in overlays],
                masks=masks,
                caption=[o["name"] for o in overlays],
                step=self.global_step,
            )

    # -- optimisation -------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: head (aggregator) at lr x head_lr_mult; no weight decay on normalisation layers."""
        lr, wd, mult = (
            float(self.optim_cfg["lr"]),
            float(self.optim_cfg["weight_decay"]),
            float(self.optim_cfg["head_lr_mult"]),
        )
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        no_decay_names = set()
        if hasattr(self.segmenter.encoder, "no_weight_decay_names"):
            no_decay_names = {f"encoder.{n}" for n in self.segmenter.encoder.no_weight_decay_names()}
        for mod_name, module in self.segmenter.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                is_head = full.startswith("aggregator.")
                no_decay = isinstance(module, NORM_LAYERS) or full in no_decay_names
                groups.setdefault((is_head, no_decay), []).append(p)
        return [
            {
                "params": ps,
                "lr": lr * (mult if head else 1.0),
                "weight_decay": 0.0 if nd else wd,
                "name": f"{'head' if head else 'encoder'}{'_no_decay' if nd else ''}",
            }
            for (head, nd), ps in sorted(groups.items())
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.param_groups(), betas=tuple(self.optim_cfg["betas"]))
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps <= 0:
            raise ValueError(
                "trainer.max_steps must be a positive integer: training is iteration-based (poly schedule)"
            )
        s = self.sched_cfg
        factor = partial(
            poly_warmup_factor,
            max_steps=max_steps,
            warmup_steps=int(s["warmup_steps"]),
            warmup_ratio=float(s["warmup_ratio"]),
            power=float(s["power"]),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
