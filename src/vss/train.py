"""Training entry point: ``python -m vss.train [overrides]`` (also ``vss-train``)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from vss.config import CONF_DIR, check_ddp_multirun, friendly_errors, register_resolvers, validate_train_config
from vss.stages import check_stages, convert_sync_batchnorm, init_weights

log = logging.getLogger("vss.train")
SUMMARY_KEYS = ("mIoU", "fwIoU", "mVC8", "mVC16")

register_resolvers()


def build_module(cfg: DictConfig, num_classes: int, class_names: list[str]) -> Any:
    """Encoder + aggregator from ``cfg.encoder`` / ``cfg.model`` (``freeze`` applied), in the LightningModule."""
    from vss.lit import VSSModule
    from vss.models.segmenter import Segmenter

    freeze = list(cfg.get("freeze") or [])
    segmenter = Segmenter(instantiate(cfg.encoder), instantiate(cfg.model), num_classes, freeze=freeze)
    return VSSModule(
        segmenter,
        num_classes=num_classes,
        optimizer=instantiate(cfg.optim.optimizer, _convert_="all"),
        scheduler=instantiate(cfg.optim.scheduler, _convert_="all") if cfg.optim.get("scheduler") else None,
        head_lr_mult=float(cfg.optim.get("head_lr_mult", 1.0)),
        class_names=class_names,
        val_mode=str(cfg.get("val_mode", "stream")),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def use_eval_path(module: Any, datamodule: Any) -> None:
    """Point the data module's evaluation at the module's path: frames (stream) or the model's clips (clip)."""
    seg = module.segmenter
    clip = module.val_mode == "clip"
    datamodule.use_clip_path(seg.references if clip else None, 1 + len(seg.offsets))


def _instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every child with a ``_target_`` (callbacks, loggers)."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def format_summary(metrics: dict[str, Any], prefix: str = "val") -> str:
    """One line with the headline metrics, e.g. ``val mIoU 0.6123 | fwIoU ...``."""
    return " | ".join(f"{prefix} {k} {metrics[k]:.4f}" for k in SUMMARY_KEYS if k in metrics)


class ShareResults(pl.Callback):
    """``ddp_spawn`` runs fit/validate/test in worker processes and hands back only the weights and rank 0's
    ``trainer.callback_metrics``: keep the final step and the per-class IoU there too, as tensors."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        trainer.callback_metrics["vss/step"] = torch.tensor(trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._per_class(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._per_class(trainer, pl_module, "test")

    @staticmethod
    def _per_class(trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if trainer.sanity_checking:
            return
        values = (pl_module.last_metrics.get("per_class_iou") or {}).values()
        iou = [math.nan if v is None else float(v) for v in values]
        trainer.callback_metrics[f"vss/{stage}_per_class_iou"] = torch.tensor(iou, dtype=torch.float64)


def _stage_results(module: Any, trainer: pl.Trainer, stage: str) -> dict[str, Any]:
    """The module's metrics of the last ``stage`` loop; rebuilt from callback_metrics when that loop ran in
    spawned workers (``ddp_spawn``), which leave this process's module untouched."""
    if module.last_metrics:
        return dict(module.last_metrics)
    cm = trainer.callback_metrics
    out: dict[str, Any] = {k.split("/", 1)[1]: float(v) for k, v in cm.items() if k.startswith(f"{stage}/")}
    per_class = cm.get(f"vss/{stage}_per_class_iou")
    if per_class is not None:
        names = module.class_names
        out["per_class_iou"] = {n: None if math.isnan(v) else v for n, v in zip(names, per_class.tolist(), strict=True)}
    return out


def _on_cpu(cfg: DictConfig) -> bool:
    """Whether the trainer will run on CPU (``accelerator: cpu``, or ``auto`` without CUDA)."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate the config, build data/model/trainer, fit, and return the final validation metrics."""
    from vss.checkpoint import AtomicCheckpointIO
    from vss.metrics import write_metrics_json

    validate_train_config(cfg)
    init_state = check_stages(cfg)  # init_from / ckpt_path errors before anything is built
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    check_ddp_multirun(cfg, multirun=hc is not None and hc.mode == RunMode.MULTIRUN)
    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule.num_classes, datamodule.class_names)
    if init_state is not None:
        rank_zero_only(print)(init_weights(module.segmenter, cfg, init_state).summary())
        del init_state
    use_eval_path(module, datamodule)
    loggers = _instantiate_dict(cfg.get("logger"))
    if cfg.trainer.get("sync_batchnorm"):
        if _on_cpu(cfg):
            # torch's DistributedDataParallel rejects SyncBatchNorm on CPU modules (gloo): keep per-process BN there.
            log.warning("trainer.sync_batchnorm=true needs GPUs; running CPU DDP with per-process BatchNorm")
        else:  # here, not by Lightning: the frozen parts (freeze=...) keep plain, frozen BatchNorm
            convert_sync_batchnorm(module.segmenter)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=[*_instantiate_dict(cfg.get("callbacks")), ShareResults()],
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        sync_batchnorm=False,
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        step = trainer.global_step or int(trainer.callback_metrics.get("vss/step", 0))  # ddp_spawn: from rank 0
        validated = bool(module.last_metrics) or "val/mIoU" in trainer.callback_metrics
        if step % int(cfg.trainer.val_check_interval) != 0 or not validated:
            trainer.validate(module, datamodule=datamodule, verbose=False)  # metrics of the final weights
        metrics = _stage_results(module, trainer, "val")
        result = {"step": step, "val": metrics}
        if cfg.get("test"):
            trainer.test(module, datamodule=datamodule, ckpt_path="best", verbose=False)
            result["test"] = _stage_results(module, trainer, "test")
        if trainer.is_global_zero:
            write_metrics_json(result, output_dir / "metrics.json")
            print(f"[vss] step {step}: {format_summary(metrics)}")
            print(f"[vss] run directory: {output_dir}")
        return result
    finally:
        _finish_wandb()


def _finish_wandb() -> None:
    """Close the W&B run so the next job of a multirun starts a new one."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@friendly_errors
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``optimized_metric`` for sweepers."""
    result = train(cfg)
    key = str(cfg.get("optimized_metric", "val/mIoU")).split("/")[-1]
    value = result["val"].get(key)
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
