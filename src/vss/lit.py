"""LightningModule: losses, optimizer groups and schedule, VSPW metrics on the stream or the clip path."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

from vss.errors import ConfigError
from vss.metrics import FlickerRate, SegmentationIoU, VideoConsistency
from vss.metrics.consistency import not_applicable_vc
from vss.metrics.flicker import not_applicable_flicker
from vss.models.ops.classes import upsampled_class_map
from vss.models.segmenter import Segmenter
from vss.models.streamer import Streamer, StreamOutput, unbatch
from vss.optim import check_paramwise, param_groups

VAL_MODES = ("stream", "clip")
log = logging.getLogger("vss")


def poly_warmup_factor(step: int, max_steps: int, warmup_steps: int, warmup_ratio: float, power: float) -> float:
    """mmcv poly schedule with linear warm-up: lr(step) / base lr."""
    poly = (1.0 - min(step, max_steps) / max_steps) ** power
    if step < warmup_steps:
        k = (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
        return poly * (1.0 - k)
    return poly


def poly_warmup(
    optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int, warmup_ratio: float, power: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """The mmcv poly schedule with linear warm-up as a per-step LambdaLR (conf/optim: ``scheduler``)."""
    factor = partial(
        poly_warmup_factor, max_steps=max_steps, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, power=power
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training_loss(segmenter: Segmenter, clips: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The training objective of a batch of clips (B,T,3,H,W) with their labels (B,T,H,W): the sum of the model's
    loss terms, and the terms (``VSSModule.training_step`` and ``vss.bench mode=train``)."""
    terms = segmenter.losses(segmenter(clips), labels)
    return torch.stack(list(terms.values())).sum(), terms


class VSSModule(pl.LightningModule):
    """Trains a :class:`Segmenter` on clips and evaluates mIoU, fwIoU and mVC_n as the VSPW code does.

    Evaluation runs the stream path (``val_mode="stream"``: a :class:`Streamer` over every frame of each
    video, each frame encoded once) or the official clip path (``"clip"``: every target with its clip).
    Validation overlays and the W&B tables are :class:`vss.callbacks.ValidationImages`' job.
    """

    def __init__(
        self,
        segmenter: Segmenter,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer] | None,
        scheduler: Callable[..., Any] | None = None,
        paramwise: Mapping[str, Mapping[str, float]] | None = None,
        class_names: Sequence[str] | None = None,
        vc_windows: Sequence[int] = (8, 16),
        val_mode: str = "stream",
        stream_batch_size: int = 8,
        iou_mean: str = "gt_present",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if val_mode not in VAL_MODES:
            raise ConfigError(f"val_mode={val_mode!r} is invalid: expected one of {list(VAL_MODES)}")
        self.save_hyperparameters(ignore=["segmenter", "optimizer", "scheduler"])
        self.segmenter = segmenter
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.paramwise = check_paramwise(paramwise)
        self.vc_windows = tuple(int(n) for n in vc_windows)
        self.val_mode = val_mode
        self.streamer = Streamer(segmenter, stream_batch_size)
        self.metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict(
                    {
                        "iou": SegmentationIoU(self.num_classes, mean=iou_mean),
                        **{f"vc{n}": VideoConsistency(n) for n in self.vc_windows},
                        "flicker": FlickerRate(),
                    }
                )
                for stage in ("val", "test")
            }
        )
        self.last_metrics: dict[str, Any] = {}
        self._told_not_applicable: dict[str, bool] = {}

    def forward(self, clip: Tensor) -> dict[str, Tensor]:
        return self.segmenter(clip)

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # uint8 clips from the workers, normalised here on the device (the padding beyond ``valid`` zeroed)
        images = self.segmenter.normalize(batch["images"], batch.get("valid"))
        loss, terms = training_loss(self.segmenter, images, batch["labels"].long())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step} (terms: "
                f"{ {k: float(v) for k, v in terms.items()} }); lower optim.optimizer.lr or check the data"
            )
        bs = batch["images"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if len(terms) > 1:
            self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=bs)
        return loss

    # -- evaluation ---------------------------------------------------------------------------
    def update_metrics(self, stage: str, items: Sequence[Mapping[str, Any]], preds: Sequence[Tensor]) -> None:
        """Add target predictions (each at its label's size, frames in video order) to the stage's metrics."""
        m = self.metrics[stage]
        for item, pred in zip(items, preds, strict=True):
            if not bool(item.get("labelled", True)):  # sparse labels: a reference-only frame is not scored
                continue
            m["iou"].update(pred[None], item["labels"][None])
            for n in self.vc_windows:
                m[f"vc{n}"].update(pred[None], item["raw_target"][None], [item["video"]], [int(item["frame"])])
            m["flicker"].update(pred[None], [item["video"]], [int(item["frame"])])

    def compute_metrics(self, stage: str) -> dict[str, Any]:
        """Headline metrics and per-class IoU of the stage (synced over ranks), then reset its metrics."""
        m = self.metrics[stage]
        iou = m["iou"].compute()
        scores = {k: float(iou[k]) for k in ("mIoU", "fwIoU", "pixel_accuracy")}
        for n in self.vc_windows:
            vc = float(m[f"vc{n}"].compute())
            if math.isnan(vc):  # no window: reported as not applicable, never as a number
                scores.setdefault("not_applicable", {})[f"mVC{n}"] = not_applicable_vc(n)
            else:
                scores[f"mVC{n}"] = vc
        flicker = float(m["flicker"].compute())  # scored frames, pairs of consecutive indices only
        if math.isnan(flicker):
            scores.setdefault("not_applicable", {})["flicker"] = not_applicable_flicker()
        else:
            scores["flicker"] = flicker
        # per video: this process's videos (under DDP each rank holds whole videos; the pooled figure is synced)
        scores["flicker_per_video"] = {v: None if math.isnan(r) else r for v, r in m["flicker"].per_video().items()}
        per_class = iou["per_class_iou"].tolist()
        scores["per_class_iou"] = {
            n: (None if math.isnan(v) else v) for n, v in zip(self.class_names, per_class, strict=True)
        }
        for metric in m.values():
            metric.reset()
        return scores

    @staticmethod
    def stream_predictions(outputs: Sequence[StreamOutput]) -> list[Tensor]:
        """Class maps of streamed targets at their labels' size (bilinear upsampling, then argmax), batched."""
        groups: dict[tuple, list[int]] = {}
        for i, o in enumerate(outputs):
            groups.setdefault((tuple(o.logits.shape), tuple(o.item["labels"].shape[-2:])), []).append(i)
        preds: list[Tensor | None] = [None] * len(outputs)
        for (_, size), idx in groups.items():
            maps = upsampled_class_map(torch.stack([outputs[i].logits for i in idx]), size)
            for i, pred in zip(idx, maps, strict=True):
                preds[i] = pred
        return preds  # type: ignore[return-value]

    def eval_step(self, batch: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Tensor]]:
        """The targets this batch completes and their class maps: streamed (delayed by the lookahead) or clips."""
        if self.val_mode == "stream":
            outputs = self.streamer.feed(batch)
            return [o.item for o in outputs], self.stream_predictions(outputs)
        preds = self.segmenter.predict(batch["images"], batch["labels"].shape[-2:], batch.get("num_references"))
        return unbatch(batch), list(preds)

    def eval_finish(self) -> tuple[list[dict[str, Any]], list[Tensor]]:
        """The targets still waiting in the stream at the end of the data (its last video)."""
        outputs = self.streamer.finish()
        return [o.item for o in outputs], self.stream_predictions(outputs)

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> dict[str, Any]:
        items, preds = self.eval_step(batch)
        self.update_metrics(stage, items, preds)
        return {"items": items, "preds": preds}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step("test", batch)

    def on_validation_epoch_start(self) -> None:
        self.streamer.reset()

    def on_test_epoch_start(self) -> None:
        self.streamer.reset()

    def _epoch_end(self, stage: str) -> None:
        self.update_metrics(stage, *self.eval_finish())
        self.last_metrics = self.compute_metrics(stage)
        headline = {
            k: v
            for k, v in self.last_metrics.items()
            if k not in ("per_class_iou", "not_applicable", "flicker_per_video")
        }
        for key, reason in self.last_metrics.get("not_applicable", {}).items():
            if not self._told_not_applicable.get(key):
                log.warning("%s %s", key, reason)
                self._told_not_applicable[key] = True
        scalars = {f"{stage}/{k}": float(v) for k, v in headline.items()}
        # callback_metrics (checkpoint monitor, progress bar) here; the loggers below, at the trainer's step
        bar = "val/mIoU" if stage == "val" and "val/mIoU" in scalars else None
        self.log_dict({k: v for k, v in scalars.items() if k != bar}, logger=False, sync_dist=False)
        if bar is not None:
            self.log(bar, scalars[bar], prog_bar=True, logger=False, sync_dist=False)
        per_class = self.last_metrics.get("per_class_iou") or {}
        self.log_to_loggers(scalars | {f"{stage}/iou/{n}": v for n, v in per_class.items() if v is not None})

    def log_to_loggers(self, metrics: Mapping[str, float]) -> None:
        """Log ``metrics`` at ``global_step``, the step of the weights evaluated (as checkpoints, overlays and the
        summary say); Lightning would log epoch-end metrics of a validation inside fit at ``global_step - 1``."""
        if self._trainer is None or self.trainer.sanity_checking:
            return
        for logger in self.loggers:
            logger.log_metrics(dict(metrics), step=self.global_step)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    # -- optimisation -------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """The segmenter's trainable parameters grouped by the rules ``paramwise`` (conf/optim/paramwise, mmcv's
        matching on the Segmenter's names: :mod:`vss.optim`); the base lr and weight decay are the optimizer's."""
        defaults = self.optimizer_factory.keywords if isinstance(self.optimizer_factory, partial) else {}
        lr, wd = float(defaults.get("lr", 1e-3)), float(defaults.get("weight_decay", 0.0))
        return param_groups(self.segmenter, self.paramwise, lr, wd)

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None:
            raise ConfigError("this module was built without optim.optimizer (a model folder's config): no training")
        opt = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return {"optimizer": opt}
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps <= 0:
            raise ConfigError(
                "trainer.max_steps must be a positive integer: training is iteration-based (poly schedule)"
            )
        sched = self.scheduler_factory(opt, max_steps=max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def build_module(
    cfg: DictConfig, num_classes: int, class_names: list[str] | None = None, aggregator: Any = None
) -> Any:
    """Encoder + aggregator from ``cfg.encoder`` / ``cfg.model`` (``freeze`` applied), in the LightningModule;
    ``aggregator`` (an instance or a factory of the encoder's channels) replaces ``cfg.model``'s."""
    from hydra.utils import instantiate

    from vss.lit import VSSModule
    from vss.models.segmenter import Segmenter

    freeze = list(cfg.get("freeze") or [])
    aggregator = instantiate(cfg.model) if aggregator is None else aggregator
    segmenter = Segmenter(instantiate(cfg.encoder), aggregator, num_classes, freeze=freeze)
    optim = cfg.get("optim") or OmegaConf.create({})  # none in a model folder's config (inference only)
    return VSSModule(
        segmenter,
        num_classes=num_classes,
        optimizer=instantiate(optim.optimizer, _convert_="all") if optim.get("optimizer") else None,
        scheduler=instantiate(optim.scheduler, _convert_="all") if optim.get("scheduler") else None,
        paramwise=OmegaConf.to_container(optim.paramwise, resolve=True) if optim.get("paramwise") else None,
        class_names=class_names,
        val_mode=str(cfg.get("val_mode", "stream")),
        iou_mean=str((cfg.get("data") or {}).get("iou_mean", "gt_present")),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def use_eval_path(module: Any, datamodule: Any) -> None:
    """Point the data module's evaluation at the module's path: frames (stream) or the model's clips (clip)."""
    seg = module.segmenter
    clip = module.val_mode == "clip"
    datamodule.use_clip_path(seg.references if clip else None, 1 + len(seg.offsets))


@dataclass
class LoadedModule:
    """A checkpoint's :class:`VSSModule` (in eval mode on its device), the config that built it (the stored
    training config with the overrides applied) and the checkpoint itself (``global_step``, ``hyper_parameters``)."""

    module: VSSModule
    config: DictConfig
    checkpoint: Mapping[str, Any]


def read_module_checkpoint(
    path: str | Path, *, key: str = "ckpt_path", trust_pickle: bool = False
) -> tuple[dict[str, Any], DictConfig]:
    """A vss checkpoint (:func:`vss.checkpoint.load_checkpoint`) or a model folder (:func:`vss.folder.read_folder`)
    and its stored config, every ``_target_`` of it checked (:func:`vss.validation.check_targets`): nothing it names
    is built before that."""
    from vss.folder import CONFIG, read_model_file
    from vss.validation import check_targets

    ckpt = read_model_file(path, key=key, trust_pickle=trust_pickle, expect="vss")
    cfg = OmegaConf.create(dict(ckpt["hyper_parameters"]["config"]))
    check_targets(cfg, where=f"{key}={str(path)!r}" + (f" ({CONFIG})" if "model_folder" in ckpt else ""))
    return ckpt, cfg


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping | DictConfig):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out |= _leaves(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: node}


def changed_overrides(stored: DictConfig, overrides: Mapping[str, Any]) -> list[str]:
    """``key=value (stored: old)`` for each leaf of ``overrides`` that differs from the stored config."""
    plain = OmegaConf.to_container(overrides, resolve=True) if isinstance(overrides, DictConfig) else overrides
    out = []
    for key, value in _leaves(plain).items():
        old = OmegaConf.select(stored, key, default="<absent>")
        old = OmegaConf.to_container(old) if isinstance(old, DictConfig | ListConfig) else old
        if old != value:
            out.append(f"{key}={value} (stored: {old})")
    return out


def check_fit(
    module: nn.Module, state: Mapping[str, Tensor], where: str, changed: Sequence[str], folder: bool = False
) -> None:
    """``state`` has exactly the module's keys and shapes, else one :class:`ConfigError`: the first mismatching
    tensor (key, checkpoint shape, model shape) and the overrides that changed the stored config (``folder``: the
    tensors of a model folder's model.safetensors, the model of its config.yaml)."""
    own = module.state_dict()
    stored = "its config.yaml" if folder else "its own stored config (another vss version?)"
    cause = f"the overrides {', '.join(changed)}" if changed else stored
    holder = "the file" if folder else "the checkpoint"
    for k, v in state.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            differ = sum(1 for j, t in state.items() if j in own and tuple(t.shape) != tuple(own[j].shape))
            hint = "; drop or change the override" if changed else ""
            name = k.removeprefix("segmenter.") if folder else k
            raise ConfigError(
                f"{where} does not fit the model built with {cause}: {name} is {tuple(v.shape)} in {holder}, "
                f"{tuple(own[k].shape)} in the model ({differ} tensors differ){hint}"
            )
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if folder:
        missing, unexpected = ([k.removeprefix("segmenter.") for k in keys] for keys in (missing, unexpected))
    if missing or unexpected:
        raise ConfigError(
            f"{where} does not fit the model built with {cause}: {len(missing)} model tensors missing from it "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), {len(unexpected)} unknown "
            f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
        )


def load_module(
    path: str | Path,
    *,
    device: Any = "cpu",
    overrides: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    val_mode: str | None = None,
    key: str = "ckpt_path",
    trust_pickle: bool = False,
    checkpoint: tuple[dict[str, Any], DictConfig] | None = None,
) -> LoadedModule:
    """Checkpoint -> config -> module -> weights: the one way eval, predict and the pipeline's passes rebuild a
    trained model.

    ``overrides`` (nested, e.g. ``{"val_mode": "clip", "model": {...}}``) are merged into the stored config (a
    shape they change is an error naming the tensor and the override); ``encoder.pretrained`` is dropped (the
    checkpoint holds the weights). ``class_names``: the data module's, else the config's, else numbered.
    ``val_mode``: the evaluation path (``stream`` or ``clip``), else the stored one.
    ``checkpoint``: what :func:`read_module_checkpoint` returned for ``path``, not read again.
    """
    import torch

    ckpt, stored = checkpoint or read_module_checkpoint(path, key=key, trust_pickle=trust_pickle)
    where = f"{key}={str(path)!r}"
    cfg = OmegaConf.merge(stored, overrides or {}, {"val_mode": val_mode} if val_mode else {})
    if overrides:
        from vss.validation import check_targets

        check_targets(OmegaConf.create(dict(overrides)))
    if OmegaConf.select(cfg, "encoder.pretrained") is not None:
        cfg.encoder.pretrained = None  # ImageNet weights are replaced by the checkpoint's (and may not exist here)
    num_classes = int(cfg.data.num_classes)
    if class_names is None:
        names = OmegaConf.select(cfg, "data.class_names") or ckpt["hyper_parameters"].get("class_names") or []
        class_names = [str(names[i]) if i < len(names) else str(i) for i in range(num_classes)]
    module = build_module(cfg, num_classes, list(class_names))
    changed, folder = changed_overrides(stored, overrides or {}), "model_folder" in ckpt
    check_fit(module, ckpt["state_dict"], where + (": model.safetensors" if folder else ""), changed, folder)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    module.to(torch.device(device) if isinstance(device, str) else device).eval()
    return LoadedModule(module, cfg, ckpt)
