"""Evaluation entry point: ``python -m vss.eval`` (also ``vss-eval``).

Two modes, both writing ``metrics.json`` (mIoU, fwIoU, mVC8, mVC16, flicker, per_class_iou) in the run directory
(``flicker``: the share of pixels whose predicted class changes between consecutive scored frames, no labels used;
``flicker_per_video`` per video):

- ``ckpt_path=RUN/checkpoints/last.ckpt [mode=stream|clip] [data=vspw data.root=...] [split=val]
  [save_predictions=true]`` evaluates a checkpoint (its training config rebuilds the model and its clip;
  ``data`` overrides its data, ``+data.root=DIR`` only its root) or a model folder (``ckpt_path=FOLDER`` or
  ``model=FOLDER``, written by ``vss.export format=folder``; its data config has no root: ``+data.root=DIR``)
  and can save the predictions under ``predictions/`` in the dataset's
  ``prediction_format`` (``auto``: VSPW, CamVid, synthetic: ``<video>/<frame>.png``, class ids 0..C-1;
  Cityscapes: ``<city>/<city>_<seq>_<frame>_pred_labelIds.png``, label ids, as cityscapesScripts' evaluator
  reads them). ``mode=stream`` (default) runs the :class:`~vss.models.streamer.Streamer`: each frame is
  encoded once and the references come from a cache; ``mode=clip`` is the official path (every target
  re-encodes its whole clip). Both give the same predictions up to float rounding.
- ``pred_root=DIR data=vspw data.root=GT [split=val] [prediction_format=auto]`` scores saved predictions
  (written in that format) against the ground truth.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from vss.checkpoint import load_checkpoint  # noqa: F401 (the one reader; vss.eval.load_checkpoint kept for callers)
from vss.cli import model_command_line
from vss.config import CONF_DIR, register_resolvers
from vss.errors import ConfigError, friendly_errors
from vss.runtime import tune_host_allocator
from vss.validation import _check, _int, check_numeric_keys, check_targets, resolve_device

if TYPE_CHECKING:
    from vss.data.predictions import PredictionFormat

log = logging.getLogger("vss.eval")
register_resolvers()


MODEL_KEYS = ("model", "encoder", "stm", "freeze")
"""Keys of the training config an evaluation may override (``+model.embed_dim=64``): merged into the stored
config; a shape they change is one line naming the tensor and the override."""


def model_overrides(cfg: DictConfig) -> dict[str, Any]:
    """The training-config keys (:data:`MODEL_KEYS`) given on the command line, as plain containers."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in MODEL_KEYS if cfg.get(k) is not None}


def save_prediction(pred: np.ndarray, path: Path) -> None:
    """Write one stored-value map (H,W) uint8 as an 8-bit grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pred.astype(np.uint8, copy=False), mode="L").save(path)


def prediction_format(datamodule: Any, name: str) -> PredictionFormat:
    """The data module's format for ``prediction_format=name``, a ConfigError listing its formats."""
    try:
        return datamodule.prediction_format(str(name))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def eval_data_config(cfg: DictConfig, train_cfg: DictConfig) -> DictConfig:
    """The data config of an evaluation: ``cfg.data`` when given as a group (``data=vspw``: resolved against the
    checkpoint's model, so ``data.clip.offsets`` still follows it), the checkpoint's own with the keys given
    (``+data.root=DIR``: a model folder's data config has no root), else the checkpoint's own."""
    given = cfg.get("data")
    if given is None:
        data = train_cfg.data
    elif "_target_" not in given:  # +data.KEY=VALUE without a group: the checkpoint's data with these keys
        data = OmegaConf.merge(train_cfg.data, given)
    else:
        root = OmegaConf.create({"model": train_cfg.model, "seed": train_cfg.get("seed", 0)})
        root = OmegaConf.merge(root, {"paths": cfg.paths, "data": cfg.data})
        data = root.data
    return OmegaConf.merge(data, {"num_workers": cfg.num_workers, "persistent_workers": False})


@torch.no_grad()
def evaluate_checkpoint(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Run the checkpoint's model over every frame of ``cfg.split`` (``cfg.mode``: stream or clip)."""
    from vss.lit import load_module, read_module_checkpoint, use_eval_path

    if cfg.mode not in ("stream", "clip"):
        raise ConfigError(f"mode={cfg.mode!r} is invalid: expected stream (cached features) or clip (official path)")
    device = resolve_device(cfg.device)  # before the checkpoint is read: a missing GPU is one line at once
    ckpt, train_cfg = read_module_checkpoint(cfg.ckpt_path, trust_pickle=bool(cfg.get("trust_pickle", False)))
    data_cfg = eval_data_config(cfg, train_cfg)
    if OmegaConf.is_missing(data_cfg, "root"):  # e.g. a vss.convert checkpoint converted without data.root
        where = "pass data.root=DIR with data=..." if cfg.get("data") is not None else "its config has none"
        if "model_folder" in ckpt:
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path}: a model folder carries no data root: pass +data.root=DIR (its data "
                f"config, {OmegaConf.select(data_cfg, '_target_')}, on your copy of the data), or data=GROUP "
                f"data.root=DIR data.num_classes={train_cfg.data.num_classes}"
            )
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: data.root is not set ({where}): convert with data.root=DIR, or pass "
            f"data=GROUP data.root=DIR data.num_classes={train_cfg.data.num_classes}"
        )
    check_targets(OmegaConf.create({"data": data_cfg}))  # data._target_ given on the command line
    datamodule = instantiate(data_cfg)
    fmt = prediction_format(datamodule, cfg.prediction_format)
    if datamodule.num_classes != train_cfg.data.num_classes:
        raise ConfigError(
            f"data.num_classes={datamodule.num_classes} differs from the checkpoint's {train_cfg.data.num_classes}"
        )
    module = load_module(
        cfg.ckpt_path,
        device=device,
        overrides=model_overrides(cfg),
        class_names=datamodule.class_names,
        val_mode=cfg.mode,
        checkpoint=(ckpt, train_cfg),
    ).module
    datamodule.setup("test")
    use_eval_path(module, datamodule)
    loader = datamodule._eval_loader(cfg.split)
    pred_dir = output_dir / "predictions"

    def consume(items: list[dict[str, Any]], preds: list[torch.Tensor]) -> None:
        preds = [p.cpu() for p in preds]
        module.update_metrics("test", items, preds)
        if cfg.save_predictions:  # the scored (labelled) frames, under their whole video's name
            for item, p in zip(items, preds, strict=True):
                if bool(item.get("labelled", True)):
                    rel = fmt.relative_path(item.get("source_video", item["video"]), item["frame_name"])
                    save_prediction(fmt.encode(p.to(torch.uint8).numpy()), pred_dir / rel)

    from vss.models.precision import inference_precision

    start, frames = time.perf_counter(), 0
    with inference_precision(OmegaConf.select(cfg, "trainer.precision", default="32-true"), device):
        for batch in tqdm(loader, desc=f"eval {cfg.split} ({cfg.mode})", disable=not cfg.progress):
            frames += len(batch["images"])
            consume(*module.eval_step({**batch, "images": batch["images"].to(device)}))
        consume(*module.eval_finish())
    seconds = time.perf_counter() - start
    metrics = module.compute_metrics("test")
    metrics |= {"ckpt_path": str(cfg.ckpt_path), "split": cfg.split, "global_step": ckpt.get("global_step")}
    metrics |= {"mode": cfg.mode, "seconds": seconds, "frames": frames}
    if cfg.save_predictions:
        metrics |= {"pred_root": str(pred_dir), "prediction_format": fmt.name}
    print(f"[vss] {cfg.mode} mode: {frames} frames in {seconds:.1f} s ({frames / max(seconds, 1e-9):.2f} fps)")
    if cfg.save_predictions:
        print(f"[vss] predictions written to {pred_dir}/ ({fmt.layout})")
    return metrics


def check_scoring_pair(datamodule: Any, pred_root: Path) -> None:
    """Refuse ground truth and predictions that would score, silently, with the wrong classes.

    A prediction value of C or more is refused per file (:func:`~vss.metrics.folder.score_predictions`); a value
    below C cannot tell a 124-class VSPW map from a 5-class synthetic one. What can is where the files come from:
    a root in another data set's layout (Cityscapes ``gtFine/``, CamVid ``frames/`` + ``labels/``) given to a data
    config that reads the VSPW layout; a synthetic set (its ``meta.json``) whose class count is not the data
    config's (its masks share VSPW's encoding, so the VSPW reader takes them); predictions written by
    ``vss.eval save_predictions=true`` (the ``metrics.json`` beside them names the folder and holds the model's
    per-class IoU) for another class count.
    """
    from vss.data.check import detect_layout
    from vss.data.datamodule import VSSDataModule
    from vss.data.synthetic import load_config

    root, num_classes = Path(datamodule.root), int(datamodule.num_classes)
    layout = detect_layout(root) if root.is_dir() else "vspw"
    if layout != "vspw" and type(datamodule).read_videos is VSSDataModule.read_videos:
        raise ConfigError(
            f"data.root={root} holds a {layout} tree, but the data config reads the VSPW layout "
            f"(ROOT/<split>.txt, ROOT/data/<video>/origin|mask): pass data={layout} data.root={root}"
        )
    synthetic = load_config(root) if root.is_dir() else None
    if synthetic is not None and synthetic.num_classes != num_classes:
        names = ",".join(synthetic.class_names)
        sparse = " data.sparse_labels=true" if synthetic.label_every > 1 else ""
        raise ConfigError(
            f"data.root={root} is a vss synthetic set of {synthetic.num_classes} classes (its meta.json), but the "
            f"data config scores {num_classes}: pass data=vspw data.num_classes={synthetic.num_classes} "
            f"'data.class_names=[{names}]'{sparse}"
        )
    written = pred_root.parent / "metrics.json"
    try:
        meta = json.loads(written.read_text())
    except (OSError, ValueError):
        return
    per_class = meta.get("per_class_iou") if isinstance(meta, dict) else None
    same = isinstance(meta, dict) and Path(str(meta.get("pred_root", ""))).resolve() == pred_root.resolve()
    if same and isinstance(per_class, dict) and len(per_class) != num_classes:
        raise ConfigError(
            f"pred_root={pred_root} holds the predictions of a {len(per_class)}-class model ({written}), but the "
            f"data config scores {num_classes} classes: pass the data group and data.root the model was evaluated on"
        )


def score_folder(cfg: DictConfig) -> dict[str, Any]:
    """Score ``cfg.pred_root`` against the ground truth of ``cfg.data`` (its reader, classes and mIoU rule)."""
    from vss.metrics import score_predictions

    if cfg.get("data") is None:
        raise ConfigError(
            "pred_root needs the ground truth: pass data=vspw data.root=/path/to/VSPW (or another data group)"
        )
    # scoring reads no clips (and has no model.offsets for data.clip to follow)
    fixed = {"num_workers": 0, "persistent_workers": False, "clip": {"offsets": []}, "seed": 0}
    data = OmegaConf.merge(cfg.data, fixed)
    datamodule = instantiate(data)
    datamodule.prepare_data()  # the synthetic set: generated if not cached
    fmt = prediction_format(datamodule, cfg.prediction_format)
    check_scoring_pair(datamodule, Path(cfg.pred_root))
    videos = datamodule.videos(cfg.split)
    metrics = score_predictions(
        cfg.pred_root,
        videos,
        datamodule.label_map,
        datamodule.class_names,
        iou_mean=datamodule.iou_mean,
        read_label=datamodule.read_label,
        prediction_format=fmt,
    )
    return metrics | {"pred_root": str(cfg.pred_root), "split": cfg.split, "prediction_format": fmt.name}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Dispatch on ``ckpt_path`` / ``pred_root``; write and return the metrics."""
    from vss.metrics import format_summary, write_metrics_json

    if (cfg.get("ckpt_path") is None) == (cfg.get("pred_root") is None):
        raise ConfigError(
            "pass exactly one of ckpt_path=... (evaluate a checkpoint) or pred_root=... (score predictions)"
        )
    _check(cfg, "num_workers", lambda v: _int(v) and v >= 0, "a non-negative integer (DataLoader workers)")
    check_numeric_keys(cfg)  # +model.* overrides of the checkpoint's config
    output_dir = Path(cfg.paths.output_dir)
    metrics = evaluate_checkpoint(cfg, output_dir) if cfg.get("ckpt_path") else score_folder(cfg)
    path = write_metrics_json(metrics, output_dir / "metrics.json")
    print(f"[vss] {format_summary(metrics, cfg.split)}")
    print(f"[vss] metrics written to {path}")
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
@friendly_errors
def _hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    evaluate(cfg)


def main() -> None:
    """``python -m vss.eval`` / ``vss-eval``: a mistyped key or a missing option is one line first."""
    tune_host_allocator()
    sys.argv[1:] = friendly_errors(model_command_line)("eval", sys.argv[1:])  # model=FOLDER -> ckpt_path=FOLDER
    _hydra_main()


if __name__ == "__main__":
    main()
