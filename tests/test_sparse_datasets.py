"""Sparse labels, Cityscapes video and CamVid video: readers, label tables, clips, metrics, check, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fake_video_datasets import CAMVID_SPLITS, write_camvid, write_cityscapes
from vss.data import camvid, cityscapes
from vss.data.check import main as check_main
from vss.data.clips import ClipSampler
from vss.data.vspw import IGNORE_INDEX, DatasetError, Video, read_image
from vss.metrics import SegmentationIoU, VideoConsistency
from vss.metrics.iou import iou_from_confmat


def cityscapes_dm(root: Path, offsets=(-2, -1), **kw) -> cityscapes.CityscapesVideoDataModule:
    kw = {"scale": [128, 64], "crop_size": [32, 32], "num_workers": 0, "seed": 0, **kw}
    return cityscapes.CityscapesVideoDataModule(root=str(root), clip={"offsets": list(offsets)}, **kw)


# ----------------------------------------------------------------------------- metrics
def test_iou_union_mean_worked_example() -> None:
    # metrics-and-datasets.md §1: GT=[0,0,0,1,1,255], pred=[0,0,1,1,2,0]: Evaluator 0.5, mmseg/cityscapes 1/3
    confmat = torch.tensor([[2, 1, 0], [0, 1, 1], [0, 0, 0]])
    assert float(iou_from_confmat(confmat)["mIoU"]) == pytest.approx(0.5)
    assert float(iou_from_confmat(confmat, "union")["mIoU"]) == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="iou_mean='mean'"):
        SegmentationIoU(3, mean="mean")


def test_vc_counts_runs_of_consecutive_labelled_frames() -> None:
    gt = torch.zeros(1, 2, 2, dtype=torch.uint8)
    vc = VideoConsistency(2)
    for t in (0, 2, 4):  # every 2nd frame labelled: no two consecutive labelled frames
        vc.update(gt, gt, ["v"], [t])
    assert torch.isnan(vc.compute())
    vc = VideoConsistency(2)
    pred_b = torch.ones(1, 2, 2, dtype=torch.uint8)
    for t, p in ((0, gt), (1, gt), (2, pred_b), (10, gt), (11, pred_b), (12, pred_b)):
        vc.update(p, gt, ["v"], [t])
    # run 0..2: windows 0-1 (p same) -> 1; run 10..12: window 10-11 (p changes) -> 0; last windows dropped
    assert float(vc.compute()) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- clips and pieces
def test_train_target_is_a_labelled_frame() -> None:
    sampler = ClipSampler((-2, -1), reverse_prob=0.5)
    rng = random.Random(0)
    for _ in range(50):
        idx = sampler.train_indices(30, rng, targets=[19])
        assert idx[-1] == 19 and sorted(idx[:2]) in ([17, 18], [20, 21])


def test_segments_cover_every_labelled_frame_with_its_references() -> None:
    frames = tuple(Path(f"{i}.png") for i in range(40))
    masks = tuple(Path(f"m{i}.png") if i in (3, 20, 22) else None for i in range(40))
    pieces = Video("v", frames, masks).segments(before=2, after=1)
    assert [(p.start, len(p)) for p in pieces] == [(1, 4), (18, 6)]  # 1..4 and 18..23 (20 and 22 merged)
    assert all(p.source == "v" for p in pieces) and pieces[1].labelled == (2, 4)


# ----------------------------------------------------------------------------- Cityscapes
def test_cityscapes_label_table_and_inverse() -> None:
    assert len(cityscapes.CLASSES) == 19 and len(cityscapes.PALETTE) == 19
    assert cityscapes.LABEL_ID_TO_TRAIN_ID[7] == 0 and cityscapes.LABEL_ID_TO_TRAIN_ID[33] == 18
    train_ids = np.array([[0, 18, 255, 13]], np.uint8)
    np.testing.assert_array_equal(cityscapes.train_ids_to_label_ids(train_ids), [[7, 33, 0, 26]])


def test_cityscapes_reader_and_clips(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cs")
    dm = cityscapes_dm(root)
    dm.setup("fit")
    train = dm.videos("train")
    assert [v.name for v in train] == ["aachen_000000_000019", "aachen_000001_000019"]
    # training clips may be played backwards (reverse_prob 0.5): frames 17..21 around the annotated 19
    assert len(train[0]) == 5 and train[0].labelled == (2,)
    assert train[0].frames[0].name == "aachen_000000_000017_leftImg8bit.png"
    item = dm.train_dataset()[0]
    assert item["images"].shape == (3, 3, 32, 32)
    assert (item["labels"][:2] == IGNORE_INDEX).all()  # references are unlabelled
    assert (item["labels"][2] != IGNORE_INDEX).any()
    val = dm.eval_dataset("val")
    assert len(val) == 3 and [val[i]["labelled"] for i in range(3)] == [False, False, True]
    gt = cv2.imread(str(root / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"), 0)
    np.testing.assert_array_equal(val[2]["labels"].numpy(), cityscapes._LABEL_ID_LUT[gt])
    dm.use_clip_path(lambda t, n: [max(0, t - 2), max(0, t - 1)], 3)
    clips = dm.eval_dataset("val")
    assert len(clips) == 1 and clips[0]["images"].shape[0] == 3


def test_cityscapes_train_ids_preferred(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cs", trainids=True)
    (video,) = cityscapes_dm(root).videos("val")
    assert video.masks[2].name.endswith("_labelTrainIds.png")
    forced = cityscapes_dm(root, label_file="labelIds").videos("val")[0]
    assert forced.masks[2].name.endswith("_labelIds.png")
    np.testing.assert_array_equal(cityscapes.read_label(video.masks[2]), cityscapes.read_label(forced.masks[2]))


def test_cityscapes_bad_input_names_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_cityscapes(tmp_path / "cs")
    gone = root / "leftImg8bit_sequence/val/frankfurt/frankfurt_000000_000293_leftImg8bit.png"
    gone.unlink()
    with pytest.raises(DatasetError, match="frankfurt_000000_000293_leftImg8bit.png is missing"):
        cityscapes_dm(root).videos("val")
    (video,) = cityscapes_dm(root, missing_frames="clamp").videos("val")
    assert video.frames[1].name == "frankfurt_000000_000292_leftImg8bit.png"  # nearest frame (ties: earlier)
    assert "replaced by the nearest frame" in caplog.text
    with pytest.raises(ValueError, match="reach 19 frames before / 19 after"):
        cityscapes_dm(root, offsets=(-19,)).videos("train")  # mirrored by reverse_prob: 19 after > 10
    label = root / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
    cv2.imwrite(str(label), np.full((64, 128), 40, np.uint8))
    with pytest.raises(DatasetError, match=r"label values \[40\] are not Cityscapes ids"):
        cityscapes.read_label(label)
    with pytest.raises(DatasetError, match="leftImg8bit_sequence/test is missing"):
        cityscapes_dm(root).videos("test")


def test_data_check_names_three_planted_faults(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_cityscapes(tmp_path / "cs")
    seq = root / "leftImg8bit_sequence"
    (seq / "train/aachen/aachen_000000_000005_leftImg8bit.png").unlink()  # 1: a missing snippet frame
    (seq / "train/aachen/aachen_000001_000019_leftImg8bit.png").unlink()  # 2: a label without its frame
    bad = root / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
    label = cv2.imread(str(bad), 0)
    label[0, 0] = 77
    cv2.imwrite(str(bad), label)  # 3: an unknown label id
    assert check_main([str(root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "3 problem(s)" in out
    assert "aachen_000000_000005_leftImg8bit.png is missing" in out
    assert "aachen_000001_000019_gtFine_labelIds.png has no frame" in out
    assert "label values [77] are not Cityscapes ids" in out and "frankfurt_000000_000294" in out


def test_data_check_clean_cityscapes_and_camvid(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert check_main([str(write_cityscapes(tmp_path / "cs")), "--no-progress"]) == 0
    assert "cityscapes_video layout" in capsys.readouterr().out
    assert check_main([str(write_camvid(tmp_path / "cv")), "--splits", "train", "val", "test", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "camvid_video layout" in out and "labelled frames: 6" in out


def test_cityscapes_miou_equals_cityscapesscripts(tmp_path: Path) -> None:
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    rng = np.random.default_rng(0)
    label_ids = np.arange(34, dtype=np.uint8)  # every labelId, including the ignored ones
    for case in range(20):
        h, w = 24, 40
        gt_ids = label_ids[rng.integers(0, 34, (2, h, w))]
        if case % 3 == 0:  # some classes absent from GT and prediction, some only predicted
            gt_ids[gt_ids == 26] = 7
        pred_train = rng.integers(0, 19 - (case % 4), (2, h, w)).astype(np.uint8)
        ours = SegmentationIoU(19, mean="union")
        preds, gts = [], []
        for i in range(2):
            gt_path, pred_path = tmp_path / f"gt{case}_{i}.png", tmp_path / f"pred{case}_{i}.png"
            cv2.imwrite(str(gt_path), gt_ids[i])
            cv2.imwrite(str(pred_path), cityscapes.train_ids_to_label_ids(pred_train[i]))
            preds.append(str(pred_path))
            gts.append(str(gt_path))
            target = torch.from_numpy(cityscapes.read_label(gt_path)).long()
            ours.update(torch.from_numpy(pred_train[i]).long()[None], target[None])
        args = ev.args
        args.quiet, args.JSONOutput, args.evalInstLevelScore = True, False, False
        result = ev.evaluateImgLists(preds, gts, args)
        theirs = result["averageScoreClasses"]
        assert float(ours.compute()["mIoU"]) == pytest.approx(theirs, abs=1e-12), case


# ----------------------------------------------------------------------------- CamVid
def test_camvid_frame_alignment_and_tables() -> None:
    assert camvid.label_frame("0001TP_006690") == ("0001TP", 30)
    assert camvid.label_frame("0006R0_f00930") == ("0006R0", 931)
    assert camvid.label_frame("0016E5_07959") == ("0016E5", 7960)
    assert camvid.label_frame("Seq05VD_f00030") == ("Seq05VD", 31)
    with pytest.raises(DatasetError, match="not a CamVid label name"):
        camvid.label_frame("0002XX_000001")
    grouped, exact = camvid.colour_table("grouped"), camvid.colour_table("exact")
    lane = (128 << 16) | (0 << 8) | 192  # LaneMkgsDriv: road when grouped, void for the exact-colour rule
    assert (grouped[lane], exact[lane]) == (3, 255)
    assert len(grouped) == 32 and sum(v != 255 for v in exact.values()) == 11


def test_camvid_reader_colour_and_index_agree(tmp_path: Path) -> None:
    index_root = write_camvid(tmp_path / "idx")
    colour_root = write_camvid(tmp_path / "col", colour=True)
    kw = {"clip": {"offsets": [-2, -1]}, "scale": [64, 48], "crop_size": [32, 32], "num_workers": 0}
    a = camvid.CamVidVideoDataModule(root=str(index_root), **kw)
    b = camvid.CamVidVideoDataModule(root=str(colour_root), label_form="colour", **kw)
    train = a.videos("train")
    assert [(v.name, len(v), v.labelled) for v in train] == [("0001TP", 100, (30, 60)), ("0016E5", 430, (391,))]
    for va, vb in zip(train, b.videos("train"), strict=True):
        for k in va.labelled:
            np.testing.assert_array_equal(a.read_label(va.masks[k]), b.read_label(vb.masks[k]))
    val = a.eval_dataset("val")  # 15 Hz pair 420, 422: one piece 418..422
    assert len(val) == 5 and sum(bool(val[i]["labelled"]) for i in range(5)) == 2
    assert val[4]["source_frame"] == 422
    assert sum(len(v.labelled) for split in CAMVID_SPLITS for v in a.videos(split)) == 6
    (colour_root / "labels" / "0016E5_00421_L.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="0016E5_00421_L.png"):
        b.read_label(b.videos("val")[0].masks[422])


# ----------------------------------------------------------------------------- corrupt files
def test_truncated_jpeg_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "f.jpg"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"f\.jpg is corrupt \(truncated JPEG"):
        read_image(path)


# ----------------------------------------------------------------------------- CLI on fake trees
@pytest.mark.parametrize(
    "dataset",
    [pytest.param("cityscapes", marks=pytest.mark.slow), pytest.param("camvid", marks=pytest.mark.slow)],
    # the default run trains MSAF on sparse labels in test_msaf_trains_on_sparse_synthetic_labels
)
def test_msaf_preset_trains_and_evaluates_on_a_fake_tree(dataset: str, tmp_path: Path, run_cli, cli_env) -> None:
    import subprocess
    import sys

    root = write_cityscapes(tmp_path / "cs") if dataset == "cityscapes" else write_camvid(tmp_path / "cv")
    size = ["data.scale=[128,64]"] if dataset == "cityscapes" else ["data.scale=[64,48]"]
    res = run_cli(
        f"experiment=msaf_{dataset}",
        f"data.root={root}",
        "encoder=resnet18",
        "model.embed_dim=32",
        "model.num_heads=2",
        *size,
        "data.crop_size=[32,32]",
        "data.num_workers=0",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "optim.scheduler.warmup_steps=1",
        f"paths.log_dir={tmp_path / 'logs'}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (metrics_path,) = (tmp_path / "logs").rglob("metrics.json")
    metrics = json.loads(metrics_path.read_text())["val"]
    assert 0.0 <= metrics["mIoU"] <= 1.0 and "mVC8" not in metrics
    assert set(metrics["not_applicable"]) == {"mVC8", "mVC16", "flicker"}  # no two consecutive labelled frames
    ckpt = metrics_path.parent / "checkpoints" / "last.ckpt"
    out = subprocess.run(
        [sys.executable, "-m", "vss.eval", f"ckpt_path={ckpt}", "save_predictions=true", "progress=false",
         f"hydra.run.dir={tmp_path / 'eval'}", "num_workers=0"],
        env=cli_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-6)
    preds = sorted(p.relative_to(tmp_path / "eval" / "predictions") for p in (tmp_path / "eval").rglob("*.png"))
    expected = 1 if dataset == "cityscapes" else 2  # the labelled val frames only
    assert len(preds) == expected
    score = subprocess.run(
        [sys.executable, "-m", "vss.eval", f"pred_root={tmp_path / 'eval' / 'predictions'}",
         f"data={dataset}_video", f"data.root={root}", f"hydra.run.dir={tmp_path / 'score'}"],
        env=cli_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert score.returncode == 0, score.stderr[-3000:]
    folder = json.loads((tmp_path / "score" / "metrics.json").read_text())
    assert folder["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-9) and folder["num_frames"] == expected
    assert folder["iou_mean"] == "union" and len(folder["per_class_iou"]) == (19 if dataset == "cityscapes" else 11)


def test_msaf_trains_on_sparse_synthetic_labels(tmp_path: Path, run_cli, tiny_args) -> None:
    res = run_cli(
        "experiment=msaf_synthetic",
        *tiny_args(tmp_path / "logs"),
        "data.synthetic.label_every=5",
        "model.embed_dim=32",
        "model.num_heads=2",
        "data.verify=true",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (metrics_path,) = (tmp_path / "logs").rglob("metrics.json")
    metrics = json.loads(metrics_path.read_text())["val"]
    assert 0.0 <= metrics["mIoU"] <= 1.0
    assert (
        "mVC8" not in metrics and "needs more than 8 consecutive labelled frames" in metrics["not_applicable"]["mVC8"]
    )
    assert "mVC8 not applicable" in res.stderr + res.stdout
    root = next(Path(p) for p in (tmp_path.parent).glob("**/meta.json") if '"label_every": 5' in Path(p).read_text())
    masks = sorted((root.parent / "data").glob("train_000/mask/*.png"))
    frames = sorted((root.parent / "data").glob("train_000/origin/*"))
    assert len(frames) == 18 and len(masks) == 4  # frames 0, 5, 10, 15


def _write_video(path: Path, frames: int, size: tuple[int, int] = (48, 64)) -> None:
    tmp = path.with_suffix(".tmp.avi")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), 30, (size[1], size[0]))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    writer.release()
    tmp.rename(path)  # the reader probes the content, not the extension (.MXF here)


def test_prepare_camvid_decodes_lays_out_and_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vss.data.prepare import main as prepare_main

    src = write_camvid(tmp_path / "src")  # its labels/ and split lists are the user's download
    videos = tmp_path / "videos"
    videos.mkdir()
    _write_video(videos / "01TP_extract.avi", 95)
    _write_video(videos / "0016E5.MXF", 425)
    out = tmp_path / "camvid"
    args = ["camvid", "--videos", str(videos), "--labels", str(src / "labels"), "--splits", str(src), "--out", str(out)]
    assert prepare_main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "0001TP: 95 frames (OpenCV reads 3751 from the official file)" in printed
    assert "train: 3 labelled frames" in printed
    assert len(list((out / "frames" / "0016E5").glob("*.png"))) == 425
    assert check_main([str(out), "--splits", "train", "val", "test", "--no-progress"]) == 0
    first = (out / "frames" / "0001TP" / "0001TP_000000.png").stat().st_mtime_ns
    assert prepare_main([*args, "--no-progress"]) == 0  # idempotent: nothing decoded again
    assert (out / "frames" / "0001TP" / "0001TP_000000.png").stat().st_mtime_ns == first
    (videos / "0016E5.MXF").unlink()
    _write_video(videos / "0016E5.MXF", 300)
    import shutil

    shutil.rmtree(out / "frames" / "0016E5")
    assert prepare_main([*args, "--no-progress"]) == 2
    assert "0016E5.MXF decoded to 300 frames but a label needs frame 422" in capsys.readouterr().err


def test_segformer_cityscapes_preset_trains_on_a_fake_tree(tmp_path: Path, run_cli) -> None:
    root = write_cityscapes(tmp_path / "cs")
    res = run_cli(
        "experiment=segformer_cityscapes",
        f"data.root={root}",
        "encoder=mit_b0",
        "data.scale=[128,64]",
        "data.crop_size=[32,32]",
        "data.num_workers=0",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "optim.scheduler.warmup_steps=1",
        f"paths.log_dir={tmp_path / 'logs'}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (metrics_path,) = (tmp_path / "logs").rglob("metrics.json")
    metrics = json.loads(metrics_path.read_text())["val"]
    assert 0.0 <= metrics["mIoU"] <= 1.0 and len(metrics["per_class_iou"]) == 19
