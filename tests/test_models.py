"""SegFormer head, loss, optimiser groups and schedule, ``freeze`` names, ``predict``.

What every model must do (stream = clip, ``encode`` per frame, gradients, frozen parts) is in test_contract.py.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from vss.errors import ConfigError
from vss.lit import VSSModule, poly_warmup_factor
from vss.models.aggregators.base import cross_entropy
from vss.models.aggregators.segformer import SegFormer
from vss.models.encoders import build_encoder
from vss.models.segmenter import Segmenter


@pytest.fixture(scope="module")
def segformer() -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(build_encoder("mit_b0"), partial(SegFormer, embed_dim=32), num_classes=5).eval()


def test_segformer_reads_one_frame_and_predicts_at_quarter_resolution(segformer: Segmenter) -> None:
    assert segformer.offsets == () and segformer.lookahead == 0 and segformer.references(5, 10) == []
    with torch.no_grad():
        assert segformer(torch.randn(2, 1, 3, 64, 96))["logits"].shape == (2, 5, 16, 24)


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


def test_param_groups_follow_the_paramwise_rule(segformer: Segmenter) -> None:
    adamw = partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01)
    rule = {"aggregator": {"lr_mult": 10.0}, "pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0}}
    module = VSSModule(segformer, num_classes=5, optimizer=adamw, paramwise=rule)
    groups = {g["name"]: g for g in module.param_groups()}
    assert set(groups) == {"lr_x1_decay_x0", "lr_x1_decay_x1", "lr_x10_decay_x1"}
    assert groups["lr_x1_decay_x1"]["lr"] == pytest.approx(1e-4) and groups["lr_x10_decay_x1"]["lr"] == pytest.approx(
        1e-3
    )
    assert groups["lr_x1_decay_x0"]["weight_decay"] == 0.0 and groups["lr_x10_decay_x1"]["weight_decay"] == 0.01
    ids = {n: id(p) for n, p in segformer.named_parameters()}
    grouped = {id(p): name for name, g in groups.items() for p in g["params"]}
    assert len(grouped) == len(ids)  # every parameter exactly once
    # 'aggregator' is tried first (longest key, as mmcv): the head's BatchNorm decays, as the official 'head' rule
    assert grouped[ids["aggregator.decode_head.linear_fuse.bn.weight"]] == "lr_x10_decay_x1"
    assert grouped[ids["aggregator.decode_head.linear_pred.weight"]] == "lr_x10_decay_x1"
    norm_name = next(n for n in ids if n.startswith("encoder.") and ".norm" in n and n.endswith("weight"))
    assert grouped[ids[norm_name]] == "lr_x1_decay_x0"


def test_param_groups_leave_out_frozen_parameters() -> None:
    torch.manual_seed(0)
    seg = Segmenter(build_encoder("mit_b0"), partial(SegFormer, embed_dim=16), 5, freeze=["encoder"])
    module = VSSModule(seg, num_classes=5, optimizer=partial(torch.optim.AdamW, lr=1e-4))
    groups = module.param_groups()
    assert {g["name"] for g in groups} == {"lr_x1_decay_x1"}  # no rule: one group
    assert sum(len(g["params"]) for g in groups) == len(list(seg.aggregator.parameters()))


def test_freeze_names_an_unknown_prefix() -> None:
    with pytest.raises(ConfigError, match=r"freeze: 'encodr' is not a module.*did you mean encoder"):
        Segmenter(build_encoder("mit_b0"), partial(SegFormer, embed_dim=16), 5, freeze=["encodr"])


def test_predict_returns_label_size_class_map(segformer: Segmenter) -> None:
    pred = segformer.predict(torch.randn(2, 1, 3, 64, 64), (50, 70))
    assert pred.shape == (2, 50, 70) and pred.dtype == torch.int64
    assert int(pred.min()) >= 0 and int(pred.max()) < 5


def test_class_map_is_argmax_with_first_index_on_ties() -> None:
    from vss.models.aggregators.base import class_map

    x = torch.randn(3, 7, 20, 30)
    x[0, 2:5, 4, 5] = 10.0  # a three-way tie: the first index wins, as argmax
    assert torch.equal(class_map(x), x.argmax(1))
    assert int(class_map(x)[0, 4, 5]) == 2
