"""vss.eval: the stream path (Streamer, each frame encoded once) equals the official clip path, for every model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import battery
import vss.config
from conftest import REPO_ROOT, TINY_DATA, compose_train
from random_weights import randomize_
from vss.errors import ConfigError
from vss.eval import evaluate_checkpoint
from vss.lit import build_module


def _checkpoint(name: str, data_dir: Path, tmp: Path, extra: tuple[str, ...] = ()) -> Path:
    """A vss checkpoint of ``model=name`` at the battery's test size (tests/battery.py) with random (non-trivial)
    weights on the tiny synthetic data."""
    cfg = battery.compose(
        name,
        None,
        *TINY_DATA,
        "data.scale=[64,64]",
        "data.val_batch_size=5",
        "data.num_workers=0",
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp}",
        *extra,
    )
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    del cfg["hydra"]
    torch.manual_seed(0)
    module = build_module(cfg, cfg.data.num_classes, list(cfg.data.class_names))
    randomize_(module)
    path = tmp / f"{name}.ckpt"
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": {"config": OmegaConf.to_container(cfg, resolve=True)}},
        path,
    )
    GlobalHydra.instance().clear()
    return path


def _eval_cfg(ckpt: Path, out: Path, mode: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(vss.config.CONF_DIR), version_base="1.3"):
        cfg = compose(
            "eval",
            [
                f"ckpt_path={ckpt}",
                f"mode={mode}",
                "save_predictions=true",
                "progress=false",
                "num_workers=0",
                "device=cpu",
                f"paths.output_dir={out}",
            ],
        )
    GlobalHydra.instance().clear()
    return cfg


def _predictions(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.array(Image.open(p)) for p in sorted(root.rglob("*.png"))}


def _flicker(preds: dict[str, np.ndarray]) -> float:
    """Changed over compared pixels between consecutive saved masks of each video (names in frame order)."""
    changed = compared = 0
    for video in {Path(k).parent for k in preds}:
        frames = [v for k, v in preds.items() if Path(k).parent == video]
        for prev, cur in zip(frames, frames[1:], strict=False):
            changed, compared = changed + int((prev != cur).sum()), compared + cur.size
    return changed / compared


@pytest.fixture(scope="module")
def data_dir(make_data_dir: Callable[..., Path]) -> Path:
    return make_data_dir(*TINY_DATA)


@pytest.mark.parametrize("name", battery.MODELS)
def test_stream_mode_equals_clip_mode(name: str, data_dir: Path, tmp_path: Path) -> None:
    """Same checkpoint, both paths: identical predictions (but for float-rounding ties), metrics within 1e-4."""
    ckpt = _checkpoint(name, data_dir, tmp_path)
    results = {}
    for mode in ("stream", "clip"):
        out = tmp_path / mode
        results[mode] = (evaluate_checkpoint(_eval_cfg(ckpt, out, mode), out), _predictions(out / "predictions"))
    (stream, s_pred), (clip, c_pred) = results["stream"], results["clip"]
    assert len(s_pred) == 36 and s_pred.keys() == c_pred.keys()  # 2 videos x 18 frames, each frame once
    same = sum(int((s_pred[k] == c_pred[k]).sum()) for k in s_pred)
    total = sum(v.size for v in s_pred.values())
    assert same / total > 0.999, f"{name}: {total - same} of {total} pixels differ between stream and clip"
    for key in ("mIoU", "fwIoU", "pixel_accuracy", "mVC8", "mVC16", "flicker"):
        assert stream[key] == pytest.approx(clip[key], abs=1e-4), key
    assert stream["flicker"] == pytest.approx(_flicker(s_pred)) and clip["flicker"] == pytest.approx(_flicker(c_pred))
    assert stream["frames"] == clip["frames"] == 36
    assert (stream["mode"], clip["mode"]) == ("stream", "clip")


def test_references_after_the_target_stream_like_clips(data_dir: Path, tmp_path: Path) -> None:
    """A non-causal clip (t-3, t+2): the stream waits two frames and clamps at the video's end like the clips."""
    ckpt = _checkpoint("mrcfa", data_dir, tmp_path, ("model.offsets=[-3,2]", "model.start=clamp"))
    preds = {}
    for mode in ("stream", "clip"):
        out = tmp_path / mode
        evaluate_checkpoint(_eval_cfg(ckpt, out, mode), out)
        preds[mode] = _predictions(out / "predictions")
    assert len(preds["stream"]) == 36
    for k, v in preds["stream"].items():
        assert (v == preds["clip"][k]).mean() > 0.999, k


def test_bad_mode_is_a_config_error(data_dir: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint("segformer", data_dir, tmp_path)
    with pytest.raises(ConfigError, match="mode='fast'"):
        evaluate_checkpoint(_eval_cfg(ckpt, tmp_path / "x", "fast"), tmp_path / "x")


def test_eval_cli_prints_mode_and_time(data_dir: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    ckpt = _checkpoint("segformer", data_dir, tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "vss.eval",
        f"ckpt_path={ckpt}",
        "mode=stream",
        "progress=false",
        "num_workers=0",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[vss] stream mode: 36 frames in" in proc.stdout
    (metrics_file,) = (tmp_path / "logs").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["mode"] == "stream" and metrics["frames"] == 36 and 0 <= metrics["mIoU"] <= 1
    assert 0 < metrics["flicker"] < 1 and len(metrics["flicker_per_video"]) == 2
    assert f" | val flicker {metrics['flicker']:.4f}\n" in proc.stdout  # the summary line, beside mVC


# -- pred_root: ground truth and predictions of another class count are refused, not scored --------------------
def _score_cfg(out: Path, *overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(vss.config.CONF_DIR), version_base="1.3"):
        cfg = compose("eval", ["progress=false", "num_workers=0", f"paths.output_dir={out}", *overrides])
    GlobalHydra.instance().clear()
    return cfg


def _perfect_predictions(root: Path, pred_root: Path) -> int:
    """The ground truth of the synthetic val split as train-id PNGs (ignore as 0); returns the frame count."""
    from vss.data.vspw import LabelMap, read_mask, read_split

    frames = 0
    for video in read_split(root, "val"):
        for mask in video.masks:
            assert mask is not None
            ids = LabelMap(5)(read_mask(mask))
            ids[ids == 255] = 0
            (pred_root / video.name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(ids, mode="L").save(pred_root / video.name / mask.name)
            frames += 1
    return frames


def test_a_synthetic_root_scored_as_vspw_is_refused(data_dir: Path, tmp_path: Path) -> None:
    """data=vspw reads the synthetic set (the same layout and mask encoding) but would score 124 classes."""
    from vss.eval import evaluate

    # the tiny set's root (other tests may write other sets into the shared data dir)
    root = compose_train([*TINY_DATA, f"paths.data_dir={data_dir}"]).data.root
    GlobalHydra.instance().clear()
    preds = tmp_path / "eval" / "predictions"
    frames = _perfect_predictions(root, preds)
    with pytest.raises(ConfigError) as info:
        evaluate(_score_cfg(tmp_path / "s1", f"pred_root={preds}", "data=vspw", f"data.root={root}"))
    message = str(info.value)
    assert "\n" not in message and not (tmp_path / "s1" / "metrics.json").exists()
    assert message == (
        f"data.root={root} is a vss synthetic set of 5 classes (its meta.json), but the data config scores 124: "
        "pass data=vspw data.num_classes=5 'data.class_names=[background,red,green,blue,yellow]'"
    )
    # the advised command scores the 5 classes (the predictions are the ground truth: 1.0)
    advised = (
        "data=vspw",
        f"data.root={root}",
        "data.num_classes=5",
        "data.class_names=[background,red,green,blue,yellow]",
    )
    scored = evaluate(_score_cfg(tmp_path / "s2", f"pred_root={preds}", *advised))
    assert scored["num_frames"] == frames and scored["mIoU"] == pytest.approx(1.0)
    assert list(scored["per_class_iou"]) == ["background", "red", "green", "blue", "yellow"]

    # predictions vss.eval wrote for a 19-class model (the metrics.json beside them) are refused too
    (tmp_path / "eval" / "metrics.json").write_text(
        json.dumps({"pred_root": str(preds), "per_class_iou": {str(c): 0.5 for c in range(19)}})
    )
    with pytest.raises(ConfigError, match=r"holds the predictions of a 19-class model .* scores 5 classes"):
        evaluate(_score_cfg(tmp_path / "s3", f"pred_root={preds}", *advised))


def test_a_cityscapes_root_scored_with_the_vspw_reader_is_refused(tmp_path: Path) -> None:
    from fake_video_datasets import write_cityscapes
    from vss.eval import evaluate

    root = write_cityscapes(tmp_path / "cs", size=(16, 32))
    (tmp_path / "preds").mkdir()
    with pytest.raises(ConfigError) as info:
        evaluate(_score_cfg(tmp_path / "s", f"pred_root={tmp_path / 'preds'}", "data=vspw", f"data.root={root}"))
    assert str(info.value) == (
        f"data.root={root} holds a cityscapes_video tree, but the data config reads the VSPW layout "
        f"(ROOT/<split>.txt, ROOT/data/<video>/origin|mask): pass data=cityscapes_video data.root={root}"
    )
