"""Saved Cityscapes predictions: cityscapesScripts' evaluator finds them, reads them as they are, and agrees."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

import fake_video_datasets
import vss.config
from conftest import compose_train
from fake_video_datasets import write_cityscapes
from random_weights import randomize_
from vss.data import cityscapes
from vss.data.datamodule import VSSDataModule
from vss.data.vspw import DatasetError
from vss.errors import ConfigError
from vss.eval import evaluate
from vss.lit import build_module

ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")

#: ``csEvalPixelLevelSemanticLabeling`` as its console script runs it (cityscapesscripts 2.3.0 still calls
#: ``np.in1d``, which numpy 2.4 removed: ``np.isin`` is the same test, and its result is reshaped anyway)
CS_EVAL = (
    "import numpy; numpy.in1d = getattr(numpy, 'in1d', numpy.isin); "
    "from cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling import main; main()"
)
#: val snippets in two cities (the evaluator walks the result folder recursively and matches by name)
SNIPPETS = {
    "train": [("aachen", "000000", 19)],
    "val": [("frankfurt", "000000", 294), ("frankfurt", "000001", 19), ("lindau", "000002", 25)],
}


def _tree(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake Cityscapes tree with three val frames and the ``_instanceIds.png`` the official evaluator opens."""
    monkeypatch.setattr(fake_video_datasets, "CITY_SNIPPETS", SNIPPETS)
    root = write_cityscapes(root, size=(48, 96))
    for path in (root / "gtFine" / "val").rglob("*_gtFine_labelIds.png"):
        ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # no instances: stuff ids, as for the stuff classes
        assert cv2.imwrite(str(path).replace("_labelIds.png", "_instanceIds.png"), ids)
    return root


def _checkpoint(root: Path, tmp: Path) -> Path:
    """A SegFormer-B0 checkpoint (random weights, so it predicts many classes) trained on ``root``'s config."""
    cfg = compose_train(
        [
            "experiment=segformer_cityscapes",
            "encoder=mit_b0",
            "model.embed_dim=16",
            f"data.root={root}",
            "data.scale=[96,48]",
            "data.crop_size=[32,32]",
            "data.num_workers=0",
            f"paths.output_dir={tmp}",
        ]
    )
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    del cfg["hydra"]
    GlobalHydra.instance().clear()
    torch.manual_seed(0)
    module = randomize_(build_module(cfg, len(cityscapes.CLASSES), list(cityscapes.CLASSES)))
    path = tmp / "segformer.ckpt"
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": config}}, path)
    return path


def _eval_cfg(out: Path, *overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(vss.config.CONF_DIR), version_base="1.3"):
        cfg = compose("eval", ["progress=false", "num_workers=0", "device=cpu", f"paths.output_dir={out}", *overrides])
    GlobalHydra.instance().clear()
    return cfg


def _official(dataset: Path, results: Path, export: Path) -> dict:
    """cityscapesScripts' evaluator with no arguments: gtFine/val of CITYSCAPES_DATASET, CITYSCAPES_RESULTS."""
    export.mkdir(parents=True)
    env = {**os.environ, "CITYSCAPES_DATASET": str(dataset), "CITYSCAPES_RESULTS": str(results)}
    env["CITYSCAPES_EXPORT_DIR"] = str(export)
    out = subprocess.run([sys.executable, "-c", CS_EVAL], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Evaluating 3 pairs of images" in out.stdout
    return json.loads((export / "resultPixelLevelSemanticLabeling.json").read_text())


def test_saved_predictions_score_the_same_in_cityscapesscripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path / "cs", monkeypatch)
    ckpt = _checkpoint(root, tmp_path)
    ours = evaluate(_eval_cfg(tmp_path / "eval", f"ckpt_path={ckpt}", "save_predictions=true"))
    preds = tmp_path / "eval" / "predictions"
    assert ours["prediction_format"] == "cityscapes" and ours["frames"] == 3
    assert sorted(str(p.relative_to(preds)) for p in preds.rglob("*.png")) == [
        "frankfurt/frankfurt_000000_000294_pred_labelIds.png",
        "frankfurt/frankfurt_000001_000019_pred_labelIds.png",
        "lindau/lindau_000002_000025_pred_labelIds.png",
    ]
    stored = np.unique(np.concatenate([cv2.imread(str(p), 0).ravel() for p in preds.rglob("*.png")]))
    assert set(stored.tolist()) <= set(cityscapes.LABEL_ID_TO_TRAIN_ID) and len(stored) >= 5  # label ids, varied
    theirs = _official(root, preds, tmp_path / "export")
    print(f"cityscapesscripts averageScoreClasses {theirs['averageScoreClasses']!r}, vss mIoU {ours['mIoU']!r}")
    assert ours["mIoU"] > 0.005
    assert ours["mIoU"] == pytest.approx(theirs["averageScoreClasses"], rel=1e-12, abs=1e-15)
    for name, iou in ours["per_class_iou"].items():  # None / NaN: the class is in neither GT nor prediction
        official = theirs["classScores"][name]
        assert (iou is None) == math.isnan(official), name
        assert iou is None or iou == pytest.approx(official, rel=1e-12, abs=1e-15), name
    # pred_root scoring reads the same folder back (the data's format, auto)
    scored = evaluate(_eval_cfg(tmp_path / "score", f"pred_root={preds}", "data=cityscapes_video", f"data.root={root}"))
    assert scored["mIoU"] == pytest.approx(ours["mIoU"], abs=1e-12) and scored["num_frames"] == 3
    # the train-id format: scored alike by vss, invisible to the official evaluator (never read as label ids)
    evaluate(_eval_cfg(tmp_path / "ev2", f"ckpt_path={ckpt}", "save_predictions=true", "prediction_format=train_ids"))
    train_dir = tmp_path / "ev2" / "predictions"
    over = ("data=cityscapes_video", f"data.root={root}", "prediction_format=train_ids")
    again = evaluate(_eval_cfg(tmp_path / "score2", f"pred_root={train_dir}", *over))
    assert again["mIoU"] == pytest.approx(ours["mIoU"], abs=1e-12)
    labelled = next(preds.rglob("frankfurt_000000_000294_*.png"))
    train_ids = cv2.imread(str(train_dir / "frankfurt" / "trainIds_frankfurt_000000_000294.png"), 0)
    np.testing.assert_array_equal(cityscapes.train_ids_to_label_ids(train_ids), cv2.imread(str(labelled), 0))


def _match(results: Path, gt_name: str) -> str:
    """cityscapesScripts' own look-up of the prediction of one ground-truth file under ``results``."""
    args = SimpleNamespace(predictionPath=str(results), predictionWalk=None)
    return ev.getPrediction(args, f"/gt/{gt_name}")


def test_file_names_and_values_as_the_official_evaluator_reads_them(tmp_path: Path) -> None:
    fmt = cityscapes.CityscapesVideoDataModule(str(tmp_path), clip={"offsets": []}).prediction_format("auto")
    train_ids_fmt = cityscapes.TrainIdPredictions()
    assert fmt.name == "cityscapes"
    for label in ("lindau_000002_000025_gtFine_labelIds.png", "lindau_000002_000025_gtFine_labelTrainIds.png"):
        for f in (fmt, train_ids_fmt):
            path = tmp_path / f.relative_path("lindau_000002_000025", label)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    # one match per ground truth (a second one would be "Found multiple predictions"): the label-id file
    found = _match(tmp_path, "lindau_000002_000025_gtFine_labelIds.png")
    assert found == str(tmp_path / "lindau" / "lindau_000002_000025_pred_labelIds.png")
    (tmp_path / "lindau" / "lindau_000002_000025_pred_labelIds.png").unlink()
    with pytest.raises(SystemExit):  # "Found no prediction": train ids are never taken for label ids
        _match(tmp_path, "lindau_000002_000025_gtFine_labelIds.png")
    train_ids = np.arange(19, dtype=np.uint8)[None]
    label_ids = fmt.encode(train_ids)
    assert label_ids.tolist() == [sorted(cityscapes.LABEL_ID_TO_TRAIN_ID)]  # the labels.py table, in order
    np.testing.assert_array_equal(fmt.decode(label_ids, Path("p.png")), train_ids)
    with pytest.raises(DatasetError, match=r"p\.png: values \[0, 6\] are not label ids of the 19 evaluation"):
        fmt.decode(np.array([[0, 7, 6]], np.uint8), Path("p.png"))


def test_wrong_format_or_folder_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path / "cs", monkeypatch)
    with pytest.raises(ValueError, match=r"prediction_format='cityscapes' is invalid for VSSDataModule: .*'train_ids'"):
        VSSDataModule(str(tmp_path), num_classes=3).prediction_format("cityscapes")
    data = ("data=cityscapes_video", f"data.root={root}")
    with pytest.raises(ConfigError, match=r"prediction_format='labelIds' is invalid for CityscapesVideoDataModule"):
        evaluate(_eval_cfg(tmp_path / "s1", f"pred_root={tmp_path}", *data, "prediction_format=labelIds"))
    old = tmp_path / "old" / "frankfurt_000000_000294" / "frankfurt_000000_000294_gtFine_labelIds.png"
    old.parent.mkdir(parents=True)  # the layout vss wrote before: train ids under the ground truth's name
    assert cv2.imwrite(str(old), np.zeros((48, 96), np.uint8))
    expected = "frankfurt/frankfurt_000000_000294_pred_labelIds.png: prediction_format=cityscapes"
    with pytest.raises(DatasetError, match=expected):
        evaluate(_eval_cfg(tmp_path / "s2", f"pred_root={tmp_path / 'old'}", *data))
