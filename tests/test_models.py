"""Segmenter split (encode/aggregate), SegFormer head, loss, optimiser groups and schedule."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from vss.lit import VSSModule, poly_warmup_factor
from vss.models.aggregators.base import cross_entropy
from vss.models.aggregators.segformer import SegFormer
from vss.models.encoders import build_encoder
from vss.models.segmenter import Segmenter


@pytest.fixture(scope="module")
def segformer() -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(build_encoder("mit_b0"), partial(SegFormer, embed_dim=32), num_classes=5).eval()


def test_forward_equals_encode_then_aggregate(segformer: Segmenter) -> None:
    clip = torch.randn(2, 4, 3, 64, 96)
    with torch.no_grad():
        whole = segformer(clip)["logits"]
        cache = {i: segformer.encode(clip[:, i]) for i in range(4)}
        streamed = segformer.aggregate(cache[3], [cache[0], cache[1], cache[2]])["logits"]
    assert whole.shape == (2, 5, 16, 24)  # 1/4 resolution
    torch.testing.assert_close(whole, streamed, atol=1e-5, rtol=1e-5)


def test_single_frame_model_ignores_references(segformer: Segmenter) -> None:
    clip = torch.randn(1, 4, 3, 64, 64)
    other = clip.clone()
    other[:, :3] = torch.randn(1, 3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(segformer(clip)["logits"], segformer(other)["logits"])


def test_per_frame_features_depend_on_own_frame_only(segformer: Segmenter) -> None:
    frames = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batched = segformer.encode(frames)["logits"]
        alone = segformer.encode(frames[1:2])["logits"]
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-5)  # eval-mode BN: no batch coupling


def test_head_state_dict_names_follow_official_segformer(segformer: Segmenter) -> None:
    keys = set(segformer.aggregator.decode_head.state_dict())
    for k in (
        "linear_c1.proj.weight",
        "linear_c4.proj.bias",
        "linear_fuse.conv.weight",
        "linear_fuse.bn.running_mean",
        "linear_pred.weight",
        "linear_pred.bias",
    ):
        assert k in keys
    assert "linear_fuse.conv.bias" not in keys


def test_cross_entropy_matches_hand_computed_value() -> None:
    # two pixels, two classes: logits (0, ln 3) -> p(class 1) = 3/4; one ignored pixel
    logits = torch.tensor([[0.0, 0.0, 5.0], [torch.log(torch.tensor(3.0)), 0.0, -5.0]]).view(1, 2, 1, 3)
    labels = torch.tensor([[[1, 0, 255]]])
    per_pixel = [-torch.log(torch.tensor(0.75)), -torch.log(torch.tensor(0.5))]
    mmseg = (per_pixel[0] + per_pixel[1]) / 3  # ignored pixel counted in the denominator (mmseg 0.x)
    non_ignore = (per_pixel[0] + per_pixel[1]) / 2
    torch.testing.assert_close(cross_entropy(logits, labels), mmseg)
    torch.testing.assert_close(cross_entropy(logits, labels, avg_non_ignore=True), non_ignore)


def test_cross_entropy_upsamples_logits_to_labels() -> None:
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 16, 16))
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(cross_entropy(logits, labels), F.cross_entropy(up, labels))


def test_poly_warmup_schedule_values() -> None:
    f = partial(poly_warmup_factor, max_steps=100, warmup_steps=10, warmup_ratio=1e-6, power=1.0)
    assert f(0) == pytest.approx(1e-6)
    assert f(5) == pytest.approx((1 - 5 / 100) * (1 - 0.5 * (1 - 1e-6)))
    assert f(10) == pytest.approx(0.9)
    assert f(50) == pytest.approx(0.5)
    assert f(100) == 0.0


def test_param_groups_head_lr_and_no_decay_on_norms(segformer: Segmenter) -> None:
    module = VSSModule(segformer, num_classes=5, optimizer={"lr": 1e-4, "weight_decay": 0.01, "head_lr_mult": 10})
    groups = {g["name"]: g for g in module.param_groups()}
    assert set(groups) == {"encoder", "encoder_no_decay", "head", "head_no_decay"}
    assert groups["encoder"]["lr"] == pytest.approx(1e-4) and groups["head"]["lr"] == pytest.approx(1e-3)
    assert groups["encoder_no_decay"]["weight_decay"] == 0.0 and groups["head"]["weight_decay"] == 0.01
    ids = {n: id(p) for n, p in segformer.named_parameters()}
    grouped = {id(p): name for name, g in groups.items() for p in g["params"]}
    assert len(grouped) == len(ids)  # every parameter exactly once
    assert grouped[ids["aggregator.decode_head.linear_fuse.bn.weight"]] == "head_no_decay"
    assert grouped[ids["aggregator.decode_head.linear_pred.weight"]] == "head"
    norm_name = next(n for n in ids if n.startswith("encoder.") and ".norm" in n and n.endswith("weight"))
    assert grouped[ids[norm_name]] == "encoder_no_decay"


def test_predict_returns_label_size_class_map(segformer: Segmenter) -> None:
    pred = segformer.predict(torch.randn(2, 4, 3, 64, 64), (50, 70))
    assert pred.shape == (2, 50, 70) and pred.dtype == torch.int64
    assert int(pred.min()) >= 0 and int(pred.max()) < 5
