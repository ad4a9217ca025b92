"""Parity tests for the VSPW metrics: Evaluator mIoU/FWIoU, VC_n (streaming and plain) and folder scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from vss.data.vspw import IGNORE_INDEX, DatasetError, LabelMap, read_split
from vss.metrics import (
    SegmentationIoU,
    VideoConsistency,
    read_prediction,
    score_predictions,
    video_consistency,
    write_metrics_json,
)

# ----------------------------------------------------------------------------- helpers


def t(x: list | np.ndarray) -> torch.Tensor:
    """Integer tensor from nested lists / arrays."""
    return torch.as_tensor(np.asarray(x), dtype=torch.int64)


def brute_force_evaluator(gts: list[np.ndarray], preds: list[np.ndarray], c: int) -> dict[str, object]:
    """Pixel-by-pixel re-implementation of VSPW utils.Evaluator (rows = GT, cols = pred)."""
    cm = np.zeros((c, c), dtype=np.int64)
    for gt, pr in zip(gts, preds, strict=True):
        for g, p in zip(gt.ravel().tolist(), pr.ravel().tolist(), strict=True):
            if 0 <= g < c:
                cm[g, p] += 1
    iou = []
    for k in range(c):
        inter = cm[k, k]
        union = cm[k, :].sum() + cm[:, k].sum() - inter
        iou.append(inter / union if union > 0 else float("nan"))
    present = [k for k in range(c) if cm[k, :].sum() > 0]
    total = cm.sum()
    return {
        "confmat": cm,
        "per_class_iou": iou,
        "mIoU": sum(iou[k] for k in present) / len(present),
        "fwIoU": sum(cm[k, :].sum() / total * iou[k] for k in present),
        "pixel_accuracy": np.trace(cm) / total,
        "mean_class_accuracy": sum(cm[k, k] / cm[k, :].sum() for k in present) / len(present),
    }


def random_video(rng: np.random.Generator, length: int, h: int, w: int, values: int, p_change: float):
    """Piecewise-constant random label video (T,H,W): each pixel changes with probability p_change."""
    frames = [rng.integers(0, values, (h, w))]
    for _ in range(length - 1):
        change = rng.random((h, w)) < p_change
        frames.append(np.where(change, rng.integers(0, values, (h, w)), frames[-1]))
    return np.stack(frames).astype(np.int64)


def stream(metric: VideoConsistency, preds: list[np.ndarray], gts: list[np.ndarray], cuts: list[int]) -> None:
    """Feed whole videos as one frame stream, cut into batches at the given global frame offsets."""
    p_all = np.concatenate(preds)
    g_all = np.concatenate(gts)
    vids = [f"vid{v}" for v, p in enumerate(preds) for _ in range(len(p))]
    idx = [100 + i for p in preds for i in range(len(p))]  # VSPW frame numbers do not start at 0
    bounds = [0, *sorted(set(cuts)), len(p_all)]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b > a:
            metric.update(t(p_all[a:b]), t(g_all[a:b]), vids[a:b], idx[a:b])


# ----------------------------------------------------------------------------- SegmentationIoU


def test_evaluator_worked_example() -> None:
    m = SegmentationIoU(3)
    m.update(t([[0, 0, 1, 1, 2, 0]]), t([[0, 0, 0, 1, 1, 255]]))
    assert m.confmat.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 0]]
    r = m.compute()
    assert r["mIoU"].dtype == torch.float64
    assert r["mIoU"].item() == pytest.approx(0.5)
    assert r["fwIoU"].item() == pytest.approx(0.6 * 2 / 3 + 0.4 * 1 / 3)  # 0.5333
    assert r["pixel_accuracy"].item() == pytest.approx(0.6)
    assert r["mean_class_accuracy"].item() == pytest.approx((2 / 3 + 1 / 2) / 2)  # 0.5833
    assert r["per_class_iou"].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_predicted_but_absent_class_does_not_lower_miou() -> None:
    preds, target = t([[0, 2, 1, 1]]), t([[0, 0, 1, 1]])
    m = SegmentationIoU(3)
    m.update(preds, target)
    r = m.compute()
    # IoU0 = 1/2, IoU1 = 1, IoU2 = 0 but class 2 is absent from the GT -> not averaged.
    assert r["mIoU"].item() == pytest.approx(0.75)
    assert r["per_class_iou"][2].item() == 0.0
    # torchmetrics' macro Jaccard counts class 2 and gives 0.5: the two definitions really differ here.
    tm = MulticlassJaccardIndex(num_classes=3, ignore_index=255, average="macro")
    assert tm(preds, target).item() == pytest.approx(0.5)


def test_class_absent_everywhere_is_nan_and_ignored() -> None:
    m = SegmentationIoU(4)
    m.update(t([[0, 1, 1, 3]]), t([[0, 1, 255, 255]]))  # pred 3 lands on ignore only
    r = m.compute()
    iou = r["per_class_iou"]
    assert iou[0].item() == 1.0 and iou[1].item() == 1.0
    assert math.isnan(iou[2].item()) and math.isnan(iou[3].item())
    assert r["mIoU"].item() == 1.0 and r["fwIoU"].item() == 1.0
    assert r["mean_class_accuracy"].item() == 1.0


def test_empty_confmat_gives_nan() -> None:
    m = SegmentationIoU(3)
    with pytest.warns(UserWarning, match="before the ``update``"):
        r = m.compute()
    assert all(math.isnan(r[k].item()) for k in ("mIoU", "fwIoU", "pixel_accuracy", "mean_class_accuracy"))
    m.update(t([[0, 1]]), t([[255, 255]]))  # only ignore pixels
    r = m.compute()
    assert math.isnan(r["mIoU"].item()) and torch.isnan(r["per_class_iou"]).all()


def test_prediction_out_of_range_raises_only_on_counted_pixels() -> None:
    m = SegmentationIoU(3)
    with pytest.raises(ValueError, match=r"\[3, 7\]"):
        m.update(t([[0, 3, 7, 1]]), t([[0, 1, 2, 255]]))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        m.update(t([[-1]]), t([[0]]))
    m.update(t([[0, 200]]), t([[0, 255]]))  # bad pred on an ignored pixel: not counted, no error
    assert m.confmat.sum().item() == 1
    with pytest.raises(ValueError, match="integer"):
        m.update(torch.zeros(1, 2), t([[0, 1]]))
    with pytest.raises(ValueError, match="shape"):
        m.update(t([[0, 1]]), t([[0]]))


def test_uint8_target_and_target_values_above_c_are_ignored() -> None:
    m = SegmentationIoU(2)
    m.update(t([[0, 1, 1, 0]]), torch.tensor([[0, 1, 5, 255]], dtype=torch.uint8))
    assert m.confmat.tolist() == [[1, 0], [0, 1]]


def test_iou_matches_brute_force_evaluator_on_random_data() -> None:
    rng = np.random.default_rng(0)
    c = 6
    gts, preds = [], []
    m = SegmentationIoU(c)
    for _ in range(4):
        gt = rng.integers(0, c - 1, (3, 9, 11))  # class c-1 never in GT (predicted-only class)
        gt[rng.random(gt.shape) < 0.2] = IGNORE_INDEX
        pr = rng.integers(0, c, gt.shape)
        m.update(t(pr), t(gt))
        gts.append(gt)
        preds.append(pr)
    ref = brute_force_evaluator(gts, preds, c)
    r = m.compute()
    assert m.confmat.numpy().tolist() == ref["confmat"].tolist()
    for key in ("mIoU", "fwIoU", "pixel_accuracy", "mean_class_accuracy"):
        assert r[key].item() == pytest.approx(ref[key], abs=1e-12), key
    np.testing.assert_allclose(r["per_class_iou"].numpy(), ref["per_class_iou"], rtol=0, atol=1e-12)
    # Per-class IoU agrees with torchmetrics (dataset-level confusion matrix, ignore 255).
    tm = MulticlassJaccardIndex(num_classes=c, ignore_index=255, average="none")
    for gt, pr in zip(gts, preds, strict=True):
        tm.update(t(pr), t(gt))
    np.testing.assert_allclose(r["per_class_iou"].numpy(), tm.compute().double().numpy(), atol=1e-6)


def test_iou_two_halves_merged_equals_one_pass() -> None:
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 5, (6, 7, 8))
    gt[rng.random(gt.shape) < 0.3] = 255
    pr = rng.integers(0, 5, gt.shape)
    full, a, b = SegmentationIoU(5), SegmentationIoU(5), SegmentationIoU(5)
    full.update(t(pr), t(gt))
    a.update(t(pr[:2]), t(gt[:2]))
    b.update(t(pr[2:]), t(gt[2:]))
    # DDP all-reduce of the "sum" state, done by hand.
    assert torch.equal(a.confmat + b.confmat, full.confmat)
    a.merge_state(b)
    ra, rf = a.compute(), full.compute()
    for key in rf:
        torch.testing.assert_close(ra[key], rf[key], equal_nan=True)


# ----------------------------------------------------------------------------- VC_n


def vc_both(preds: list, gts: list, n: int) -> tuple[float, float, int]:
    """VC_n from the plain loop and from the streaming metric (frame by frame), plus the window count."""
    plain = video_consistency([np.asarray(p) for p in preds], [np.asarray(g) for g in gts], n)
    m = VideoConsistency(n)
    stream(m, [np.asarray(p) for p in preds], [np.asarray(g) for g in gts], cuts=list(range(100)))
    return plain, m.compute().item(), int(m.windows)


def test_vc_worked_example_a() -> None:
    gts = [[[[1, 1, 2, 255]], [[1, 2, 2, 255]], [[7, 7, 7, 7]]]]
    preds = [[[[1, 1, 2, 5]], [[1, 1, 3, 5]], [[0, 0, 0, 0]]]]
    plain, streamed, windows = vc_both(preds, gts, 2)
    assert plain == pytest.approx(2 / 3)
    assert streamed == pytest.approx(2 / 3)
    assert windows == 1  # the window starting at len-n = 1 is dropped


def test_vc_worked_example_b() -> None:
    gts = [[[[0, 0, 1, 1]]] * 5]
    preds = [[[[0, 0, 1, 1]], [[0, 0, 1, 0]], [[0, 0, 1, 1]], [[0, 1, 1, 1]], [[0, 1, 1, 1]]]]
    plain, streamed, windows = vc_both(preds, gts, 3)
    assert plain == pytest.approx(0.625)  # windows i=0 -> 3/4, i=1 -> 2/4, i=2 dropped
    assert streamed == pytest.approx(0.625)
    assert windows == 2


def test_vc_short_videos_skipped_and_len_n_plus_1_gives_one_window() -> None:
    n = 3
    rng = np.random.default_rng(2)
    short = [rng.integers(0, 3, (k, 2, 2)) for k in (1, 2, 3)]  # len <= n: all skipped
    plain, streamed, windows = vc_both(short, short, n)
    assert math.isnan(plain) and math.isnan(streamed) and windows == 0
    gt = np.zeros((n + 1, 1, 2), dtype=np.int64)
    pr = np.array([[[0, 0]], [[0, 1]], [[0, 1]], [[5, 5]]])  # only window 0 (frames 0..2) counts
    plain, streamed, windows = vc_both([pr], [gt], n)
    assert windows == 1
    assert plain == streamed == pytest.approx(0.5)


def test_vc_raw_zero_and_void_are_distinct() -> None:
    gts = [[[[0, 5]], [[255, 5]], [[9, 9]]]]
    preds = [[[[1, 1]], [[2, 1]], [[3, 3]]]]
    # GT pixel 0 goes 0 -> 255: not consistent, so only pixel 1 is in g, and it is consistent in P.
    plain, streamed, _ = vc_both(preds, gts, 2)
    assert plain == streamed == 1.0
    # Had 0 and 255 been merged (both ignore), g would be both pixels and VC would be 0.5.


def test_vc_constant_gt_region() -> None:
    gts = [np.full((6, 2, 3), 4)]
    pr = np.zeros((6, 2, 3), dtype=np.int64)
    pr[2, 0, 0] = 1  # pixel (0,0) flickers at frame 2: windows 0,1,2 (n=3) see it, window 3 is dropped
    pr[5, 1, 2] = 1  # frame 5 only appears in the dropped last window
    plain, streamed, windows = vc_both([pr], gts, 3)
    assert windows == 3
    assert plain == streamed == pytest.approx(5 / 6)


def test_vc_windows_with_empty_gt_consistency_are_excluded() -> None:
    # n=2, 4 frames: window 0 has every GT pixel changing (sum(g)==0 -> NaN, excluded), windows 1, 2 not.
    gts = [[[[1, 2]], [[3, 4]], [[3, 4]], [[3, 9]]]]
    preds = [[[[0, 0]], [[0, 0]], [[0, 1]], [[0, 1]]]]
    plain, streamed, windows = vc_both(preds, gts, 2)
    assert windows == 1  # window 1 only: g=[T,T], p=[T,F] -> 1/2 ; window 2 is the dropped last one
    assert plain == streamed == pytest.approx(0.5)
    gts2 = [[[[1, 2]], [[3, 4]], [[5, 6]]]]
    plain, streamed, windows = vc_both([[[[0, 0]], [[0, 0]], [[0, 0]]]], gts2, 2)
    assert windows == 0 and math.isnan(plain) and math.isnan(streamed)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_streaming_vc_matches_plain_loop_on_random_videos(n: int) -> None:
    rng = np.random.default_rng(10 + n)
    lengths = [3, n, n + 1, 17, 1, 12, 25]
    gts = [random_video(rng, k, 5, 6, 4, 0.08) for k in lengths]
    preds = [np.where(rng.random(g.shape) < 0.1, rng.integers(0, 4, g.shape), g) for g in gts]
    gts[1][:, 0, 0] = 0
    gts[1][1:, 0, 1] = 255  # raw 0 and 255 in the same video
    expected = video_consistency(preds, gts, n)
    assert not math.isnan(expected)
    total = sum(lengths)
    for trial in range(6):
        m = VideoConsistency(n)
        if trial == 0:
            cuts: list[int] = []  # everything in one batch: several videos per batch
        elif trial == 1:
            cuts = list(range(total))  # one frame per batch
        else:
            cuts = rng.choice(np.arange(1, total), size=int(rng.integers(1, 12)), replace=False).tolist()
        stream(m, preds, gts, cuts)
        assert m.compute().item() == pytest.approx(expected, abs=1e-12), (n, cuts)
    # Window count: sum over videos of max(len - n, 0).
    assert int(m.windows) <= sum(max(k - n, 0) for k in lengths)


def test_vc_uint8_gt_with_int64_preds_and_tensor_indices() -> None:
    gt = torch.tensor([[[0, 255]], [[0, 255]], [[0, 0]]], dtype=torch.uint8)
    pr = torch.tensor([[[1, 1]], [[1, 2]], [[1, 1]]])
    m = VideoConsistency(2)
    m.update(pr, gt, ["a"] * 3, torch.tensor([4, 5, 6]))
    assert m.compute().item() == pytest.approx(0.5)


def test_vc_order_errors() -> None:
    m = VideoConsistency(2)
    m.update(t(np.zeros((2, 1, 1))), t(np.zeros((2, 1, 1))), ["a", "a"], [0, 1])
    with pytest.raises(ValueError, match="increasing"):
        m.update(t(np.zeros((1, 1, 1))), t(np.zeros((1, 1, 1))), ["a"], [1])
    m = VideoConsistency(2)
    with pytest.raises(ValueError, match="increasing"):
        m.update(t(np.zeros((2, 1, 1))), t(np.zeros((2, 1, 1))), ["a", "a"], [3, 2])
    m = VideoConsistency(2)
    m.update(t(np.zeros((2, 1, 1))), t(np.zeros((2, 1, 1))), ["a", "b"], [0, 0])
    with pytest.raises(ValueError, match="reappears"):
        m.update(t(np.zeros((1, 1, 1))), t(np.zeros((1, 1, 1))), ["a"], [1])
    with pytest.raises(ValueError, match="video ids"):
        m.update(t(np.zeros((2, 1, 1))), t(np.zeros((2, 1, 1))), ["c"], [0, 1])
    with pytest.raises(ValueError, match="earlier frames"):
        m.update(t(np.zeros((2, 1, 2))), t(np.zeros((2, 1, 2))), ["b", "b"], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        VideoConsistency(0)


def test_vc_reset_clears_stream_and_forward_updates() -> None:
    gts = [[[[0, 0, 1, 1]]] * 5]
    preds = [[[[0, 0, 1, 1]], [[0, 0, 1, 0]], [[0, 0, 1, 1]], [[0, 1, 1, 1]], [[0, 1, 1, 1]]]]
    m = VideoConsistency(3)
    m.update(t(preds[0][:4]), t(gts[0][:4]), ["v"] * 4, [0, 1, 2, 3])  # half a video, then reset
    m.reset()
    assert int(m.windows) == 0
    m(t(preds[0]), t(gts[0]), ["v"] * 5, [0, 1, 2, 3, 4])  # same video again: no "reappears"/order error
    assert m.compute().item() == pytest.approx(0.625)
    assert int(m.windows) == 2


def test_vc_merge_state_over_disjoint_videos() -> None:
    rng = np.random.default_rng(5)
    gts = [random_video(rng, k, 4, 4, 3, 0.1) for k in (12, 20, 9, 15)]
    preds = [np.where(rng.random(g.shape) < 0.1, 0, g) for g in gts]
    a, b = VideoConsistency(8), VideoConsistency(8)
    stream(a, preds[:2], gts[:2], [5])
    stream(b, preds[2:], gts[2:], [3, 11])
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(video_consistency(preds, gts, 8), abs=1e-12)


# ----------------------------------------------------------------------------- folder scoring

# LabelMap(4), reduce_zero_label: raw 1,2,3,4 -> 0,1,2,3 ; raw 0 and 255 -> ignore. Class 3 never occurs.
FOLDER_GT = {
    "v1": [[[1, 1, 2, 255]], [[1, 2, 2, 255]], [[1, 1, 2, 0]]],
    "v2": [[[3, 3, 0, 1]], [[3, 3, 0, 1]], [[3, 1, 0, 1]]],
}
FOLDER_PRED = {
    "v1": [[[0, 0, 1, 2]], [[0, 0, 2, 2]], [[0, 1, 1, 2]]],
    "v2": [[[2, 1, 0, 0]], [[2, 2, 0, 0]], [[2, 2, 1, 0]]],
}


def write_vspw(root: Path, preds: Path) -> None:
    """Write a tiny VSPW-layout dataset (frames numbered from 00000166) and its predictions."""
    (root).mkdir(parents=True)
    (root / "val.txt").write_text("v1\nv2\n")
    for video, masks in FOLDER_GT.items():
        (root / "data" / video / "origin").mkdir(parents=True)
        (root / "data" / video / "mask").mkdir(parents=True)
        (preds / video).mkdir(parents=True)
        for k, mask in enumerate(masks):
            stem = f"{166 + k:08d}"
            m = np.asarray(mask, dtype=np.uint8)
            assert cv2.imwrite(str(root / "data" / video / "origin" / f"{stem}.jpg"), np.zeros((*m.shape, 3)))
            assert cv2.imwrite(str(root / "data" / video / "mask" / f"{stem}.png"), m)
            pred = np.asarray(FOLDER_PRED[video][k], dtype=np.uint8)
            assert cv2.imwrite(str(preds / video / f"{stem}.png"), pred)


def test_score_predictions_hand_computed(tmp_path: Path) -> None:
    root, preds = tmp_path / "VSPW", tmp_path / "preds"
    write_vspw(root, preds)
    # Confusion matrix by hand (rows GT train id, cols pred) over the counted pixels of all 6 frames:
    #   row0 = [7,1,1,0], row1 = [1,2,1,0], row2 = [0,1,4,0], row3 = 0 ; total 18
    iou = [7 / (9 + 8 - 7), 2 / (4 + 4 - 2), 4 / (5 + 6 - 4)]
    out = score_predictions(preds, read_split(root, "val"), LabelMap(4), vc_windows=(2, 3))
    assert out["mIoU"] == pytest.approx(sum(iou) / 3)
    assert out["fwIoU"] == pytest.approx((9 * iou[0] + 4 * iou[1] + 5 * iou[2]) / 18)
    assert out["pixel_accuracy"] == pytest.approx(13 / 18)
    assert out["mean_class_accuracy"] == pytest.approx((7 / 9 + 2 / 4 + 4 / 5) / 3)
    per_class = out["per_class_iou"]
    assert list(per_class) == ["0", "1", "2", "3"]
    assert [per_class[k] for k in "012"] == pytest.approx(iou) and per_class["3"] is None
    # VC2 (raw GT): v1 window 0 -> g=[T,F,T,T], p=[T,T,F,T] -> 2/3 ; v2 window 0 -> g all, p=[T,F,T,T] -> 3/4
    assert out["mVC2"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert "mVC3" not in out and "VC_3" in out["not_applicable"]["mVC3"]  # both videos have len 3 <= 3
    # flicker (predictions only): v1 1 then 2 of 4 pixels change -> 3/8 ; v2 1 then 1 -> 2/8 ; pooled 5/16
    assert out["flicker"] == pytest.approx(5 / 16)
    assert out["flicker_per_video"] == {"v1": pytest.approx(3 / 8), "v2": pytest.approx(2 / 8)}
    assert out["num_videos"] == 2 and out["num_frames"] == 6
    json.dumps(out)
    default = score_predictions(preds, read_split(root, "val"), LabelMap(4))
    assert set(default["not_applicable"]) == {"mVC8", "mVC16"} and "mVC8" not in default
    assert default["mIoU"] == out["mIoU"]


def test_score_predictions_errors(tmp_path: Path) -> None:
    root, preds = tmp_path / "VSPW", tmp_path / "preds"
    write_vspw(root, preds)
    missing = preds / "v2" / "00000167.png"
    missing.unlink()
    with pytest.raises(DatasetError, match="00000167.png") as e:
        score_predictions(preds, read_split(root, "val"), LabelMap(4))
    assert str(missing) in str(e.value)
    cv2.imwrite(str(missing), np.zeros((2, 4), np.uint8))
    with pytest.raises(DatasetError, match="must match") as e:
        score_predictions(preds, read_split(root, "val"), LabelMap(4))
    assert str(missing) in str(e.value) and str(root / "data" / "v2" / "mask" / "00000167.png") in str(e.value)
    cv2.imwrite(str(missing), np.array([[9, 9, 9, 9]], np.uint8))
    with pytest.raises(DatasetError, match=r"\[9\]") as e:
        score_predictions(preds, read_split(root, "val"), LabelMap(4))
    assert str(missing) in str(e.value)


def test_read_prediction_palette_png(tmp_path: Path) -> None:
    a = np.array([[0, 1, 2], [3, 123, 5]], dtype=np.uint8)
    im = Image.new("P", (3, 2))
    im.putdata(a.ravel().tolist())
    im.putpalette(list(range(256)) * 3)
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_prediction(tmp_path / "p.png"), a)
    cv2.imwrite(str(tmp_path / "rgb.png"), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(DatasetError, match="rgb.png"):
        read_prediction(tmp_path / "rgb.png")


def test_write_metrics_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "out" / "metrics.json"
    metrics = {"mIoU": 0.5, "mVC16": float("nan"), "per_class_iou": [0.1, None], "t": torch.tensor(2.5)}
    write_metrics_json(metrics, path)
    assert json.loads(path.read_text()) == {
        "mIoU": 0.5,
        "mVC16": None,
        "per_class_iou": [0.1, None],
        "t": 2.5,
    }
    before = path.read_text()
    with pytest.raises(TypeError):
        write_metrics_json({"bad": object()}, path)
    assert path.read_text() == before  # old file intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temp file left
