"""Evaluation entry point: ``python -m vss.eval`` (also ``vss-eval``).

Two modes, both writing ``metrics.json`` (mIoU, fwIoU, mVC8, mVC16, per_class_iou) in the run directory:

- ``ckpt_path=RUN/checkpoints/last.ckpt [data=vspw data.root=...] [split=val] [save_predictions=true]``
  evaluates a checkpoint (its training config rebuilds the model; ``data`` overrides its data) and can
  save the predictions as ``predictions/<video>/<frame>.png`` (class ids 0..C-1).
- ``pred_root=DIR data=vspw data.root=GT [split=val]`` scores saved predictions against the ground truth.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from vss.config import CONF_DIR, ConfigError, friendly_errors, register_resolvers, resolve_device

log = logging.getLogger("vss.eval")
register_resolvers()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a vss Lightning checkpoint; it must carry the training config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={str(path)!r} is invalid: the file does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # a local file written by vss.train
    config = ckpt.get("hyper_parameters", {}).get("config")
    if not isinstance(ckpt.get("state_dict"), dict) or config is None:
        raise ConfigError(
            f"ckpt_path={str(path)!r}: not a vss checkpoint (needs state_dict and hyper_parameters.config)"
        )
    return ckpt


def save_prediction(pred: torch.Tensor, path: Path) -> None:
    """Write one class-id map as an 8-bit PNG (the VSPW submission layout)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pred.to(torch.uint8).cpu().numpy(), mode="L").save(path)


@torch.no_grad()
def evaluate_checkpoint(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Run the checkpoint's model over every frame of ``cfg.split``; return the metrics."""
    from vss.train import build_module

    ckpt = load_checkpoint(cfg.ckpt_path)
    train_cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    data_cfg = cfg.data if cfg.get("data") is not None else train_cfg.data
    if cfg.get("data") is not None and train_cfg.data.get("clip") is not None:
        # the clip (offsets, start-of-video rule) belongs to the model: keep the checkpoint's unless set here
        task = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        given = {o.split("=", 1)[0].lstrip("+~") for o in task}
        kept = {k: v for k, v in train_cfg.data.clip.items() if not {"data.clip", f"data.clip.{k}"} & given}
        data_cfg = OmegaConf.merge(data_cfg, {"clip": kept})
    data_cfg = OmegaConf.merge(data_cfg, {"num_workers": cfg.num_workers, "persistent_workers": False})
    datamodule = instantiate(data_cfg)
    if datamodule.num_classes != train_cfg.data.num_classes:
        raise ConfigError(
            f"data.num_classes={datamodule.num_classes} differs from the checkpoint's {train_cfg.data.num_classes}"
        )
    module = build_module(train_cfg, datamodule.num_classes, datamodule.class_names)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    device = resolve_device(cfg.device)
    module.to(device).eval()
    datamodule.setup("test")
    loader = datamodule._eval_loader(cfg.split)
    pred_dir = output_dir / "predictions"
    for batch in tqdm(loader, desc=f"eval {cfg.split}", disable=not cfg.progress):
        images = batch["images"].to(device)
        preds = module.segmenter.predict(images, batch["labels"].shape[-2:], batch.get("single_frame")).cpu()
        module.update_metrics("test", batch, preds)
        if cfg.save_predictions:
            for p, video, name in zip(preds, batch["video"], batch["frame_name"], strict=True):
                save_prediction(p, pred_dir / video / name)
    metrics = module.compute_metrics("test")
    metrics |= {"ckpt_path": str(cfg.ckpt_path), "split": cfg.split, "global_step": ckpt.get("global_step")}
    if cfg.save_predictions:
        metrics["pred_root"] = str(pred_dir)
    return metrics


def score_folder(cfg: DictConfig) -> dict[str, Any]:
    """Score ``cfg.pred_root`` against the ground truth of ``cfg.data``."""
    from vss.data.vspw import LabelMap
    from vss.metrics import score_predictions

    if cfg.get("data") is None:
        raise ConfigError(
            "pred_root needs the ground truth: pass data=vspw data.root=/path/to/VSPW (or another data group)"
        )
    lm = OmegaConf.to_container(cfg.data.get("label_map") or {"reduce_zero_label": True})
    label_map = LabelMap(int(cfg.data.num_classes), **lm)
    metrics = score_predictions(cfg.pred_root, cfg.data.root, cfg.split, label_map)
    return metrics | {"pred_root": str(cfg.pred_root), "split": cfg.split}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Dispatch on ``ckpt_path`` / ``pred_root``; write and return the metrics."""
    from vss.metrics import write_metrics_json
    from vss.train import format_summary

    if (cfg.get("ckpt_path") is None) == (cfg.get("pred_root") is None):
        raise ConfigError(
            "pass exactly one of ckpt_path=... (evaluate a checkpoint) or pred_root=... (score predictions)"
        )
    output_dir = Path(cfg.paths.output_dir)
    metrics = evaluate_checkpoint(cfg, output_dir) if cfg.get("ckpt_path") else score_folder(cfg)
    path = write_metrics_json(metrics, output_dir / "metrics.json")
    print(f"[vss] {format_summary(metrics, cfg.split)}")
    print(f"[vss] metrics written to {path}")
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
@friendly_errors
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
