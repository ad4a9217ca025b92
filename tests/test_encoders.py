"""Tests for vss.models.encoders: shapes, parameter counts, official-MiT parity, checkpoint loading."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from timm.layers import DropPath
from torch import Tensor, nn

from random_weights import randomize_
from reference_mit import build_reference_mit
from vss.errors import ConfigError
from vss.models.encoders import ENCODER_NAMES, build_encoder, convert_mit_checkpoint

# Backbone parameters without the ImageNet head, counted on the official MiT design (tests/reference_mit.py).
MIT_PARAMS = {"mit_b0": 3_319_392, "mit_b1": 13_151_424}


def max_abs_diff(a: list[Tensor], b: list[Tensor]) -> float:
    """Largest absolute difference over a list of feature maps of equal shapes."""
    assert [t.shape for t in a] == [t.shape for t in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def official_mit_b0(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A randomised reference MiT-B0 and its state dict saved in the official layout (with head.*)."""
    ref = randomize_(build_reference_mit("mit_b0"))
    path = tmp_path_factory.mktemp("ckpt") / "mit_b0.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


@pytest.mark.parametrize(
    ("name", "channels", "strides"),
    [
        ("mit_b0", [32, 64, 160, 256], [4, 8, 16, 32]),
        ("mit_b1", [64, 128, 320, 512], [4, 8, 16, 32]),
        ("resnet18", [64, 128, 256, 512], [4, 8, 8, 8]),
        ("resnet50", [256, 512, 1024, 2048], [4, 8, 8, 8]),
    ],
)
def test_shapes_channels_strides(name: str, channels: list[int], strides: list[int]) -> None:
    enc = build_encoder(name).eval()
    assert enc.out_channels == channels
    assert enc.reductions == strides
    h, w = 64, 96
    with torch.no_grad():
        feats = enc(torch.randn(2, 3, h, w))
    assert isinstance(feats, list)
    expected = [(2, c, h // s, w // s) for c, s in zip(channels, strides, strict=True)]
    assert [tuple(f.shape) for f in feats] == expected


def test_unknown_name_lists_allowed() -> None:
    with pytest.raises(ValueError, match="mit_b0") as info:
        build_encoder("mit_b9")
    for name in ENCODER_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", ["mit_b0", "mit_b1"])
def test_mit_param_count(name: str) -> None:
    enc = build_encoder(name)
    n = sum(p.numel() for p in enc.parameters())
    ref = build_reference_mit(name)
    n_ref = sum(p.numel() for k, p in ref.named_parameters() if not k.startswith("head."))
    assert n == n_ref == MIT_PARAMS[name]
    paper = {"mit_b0": 3.3e6, "mit_b1": 13.2e6}[name]
    assert abs(n - paper) / paper < 0.02


def test_mit_drop_path_linear_over_all_blocks() -> None:
    enc = build_encoder("mit_b2")
    rates = [m.drop_prob for m in enc.modules() if isinstance(m, DropPath)]
    # Official MiT: linspace(0, 0.1, sum(depths)), one rate per block, used for both residual branches.
    expected = torch.linspace(0, 0.1, 16).tolist()[1:]  # block 0 has rate 0 -> Identity, no DropPath
    assert rates == pytest.approx([r for r in expected for _ in range(2)])
    assert not any(isinstance(m, DropPath) for m in build_encoder("mit_b0", drop_path_rate=0.0).modules())


def test_mit_layers_match_official_hyperparameters() -> None:
    """Every reference parameter maps to a timm module with the same conv geometry and LayerNorm eps."""
    ref = build_reference_mit("mit_b0")
    enc = build_encoder("mit_b0")
    ref_modules = dict(ref.named_modules())
    enc_modules = dict(enc.body.named_modules())
    checked = 0
    for key in ref.state_dict():
        if key.startswith("head."):
            continue
        (new_key,) = convert_mit_checkpoint({key: torch.empty(0)})
        a = ref_modules[key.rsplit(".", 1)[0]]
        b = enc_modules[new_key.rsplit(".", 1)[0]]
        assert isinstance(b, type(a)), (key, new_key)
        if isinstance(a, nn.LayerNorm):
            assert b.eps == a.eps, (key, new_key, a.eps, b.eps)
            checked += 1
        if isinstance(a, nn.Conv2d):
            geometry = ("kernel_size", "stride", "padding", "dilation", "groups")
            assert [getattr(b, g) for g in geometry] == [getattr(a, g) for g in geometry], key
    assert checked > 0


def test_convert_mit_checkpoint_table() -> None:
    t = torch.zeros(1)
    official = {
        "patch_embed1.proj.weight": "patch_embed.proj.weight",
        "patch_embed3.norm.bias": "stages.2.downsample.norm.bias",
        "block2.1.attn.sr.weight": "stages.1.blocks.1.attn.sr.weight",
        "block4.0.norm1.weight": "stages.3.blocks.0.norm1.weight",
        "block1.0.mlp.dwconv.dwconv.bias": "stages.0.blocks.0.mlp.dwconv.bias",
        "norm3.weight": "stages.2.norm.weight",
    }
    out = convert_mit_checkpoint({**{k: t for k in official}, "head.weight": t, "head.bias": t})
    assert sorted(out) == sorted(official.values())
    # Keys already in timm layout pass unchanged.
    assert sorted(convert_mit_checkpoint(out)) == sorted(out)


@pytest.mark.parametrize("layout", ["official", "mmseg"])
def test_mit_b0_parity_with_official(official_mit_b0: tuple[nn.Module, Path], tmp_path: Path, layout: str) -> None:
    ref, path = official_mit_b0
    if layout == "mmseg":
        state = {"backbone." + k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}
        state["decode_head.conv_seg.weight"] = torch.zeros(3, 256, 1, 1)
        path = tmp_path / "mmseg_iter_160000.pth"
        torch.save({"meta": {"iter": 160000}, "state_dict": state}, path)
    enc = build_encoder("mit_b0", pretrained=str(path)).eval()
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(x), enc(x)
    assert [tuple(f.shape[-2:]) for f in got] == [(24, 40), (12, 20), (6, 10), (3, 5)]
    assert max_abs_diff(got, expected) < 1e-5
    # Random weights really changed the features (the comparison is not between two default inits).
    assert max_abs_diff(got, build_encoder("mit_b0").eval()(x)) > 1e-2


def test_mit_b1_parity_with_official(tmp_path: Path) -> None:
    ref = randomize_(build_reference_mit("mit_b1"), seed=2)
    path = tmp_path / "mit_b1.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    enc = build_encoder("mit_b1", pretrained=path).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert max_abs_diff(enc(x), ref(x)) < 1e-5


def test_mit_timm_layout_checkpoint(official_mit_b0: tuple[nn.Module, Path], tmp_path: Path) -> None:
    _, path = official_mit_b0
    enc = build_encoder("mit_b0", pretrained=path)
    timm_path = tmp_path / "timm_layout.pth"
    torch.save({"model": enc.body.state_dict()}, timm_path)
    again = build_encoder("mit_b0", pretrained=timm_path)
    for k, v in enc.body.state_dict().items():
        assert torch.equal(again.body.state_dict()[k], v), k


def test_mit_bad_keys_are_named(official_mit_b0: tuple[nn.Module, Path], tmp_path: Path) -> None:
    ref, _ = official_mit_b0
    state = dict(ref.state_dict())
    del state["block3.1.attn.kv.weight"]
    state["block3.1.attn.qkv.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        build_encoder("mit_b0", pretrained=path)
    msg = str(info.value)
    assert str(path) in msg
    assert "stages.2.blocks.1.attn.kv.weight" in msg  # missing
    assert "stages.2.blocks.1.attn.qkv.weight" in msg  # unexpected


def test_mit_wrong_variant_shape_mismatch(official_mit_b0: tuple[nn.Module, Path]) -> None:
    _, path = official_mit_b0
    with pytest.raises(ValueError, match="size mismatch") as info:
        build_encoder("mit_b1", pretrained=path)
    assert str(path) in str(info.value)


def test_missing_checkpoint_names_path_and_key(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "mit_b1.pth"
    with pytest.raises(FileNotFoundError) as info:
        build_encoder("mit_b1", pretrained=str(path))
    assert str(path) in str(info.value)
    assert "encoder.pretrained" in str(info.value)


def test_non_weights_only_checkpoint_is_refused_unless_trusted(
    official_mit_b0: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    """A file that needs full unpickling is never unpickled silently (it could run code): one line saying how to
    trust it; with ``+encoder.trust_pickle=true`` it loads."""
    ref, _ = official_mit_b0
    path = tmp_path / "with_meta.pth"
    torch.save({"meta": argparse.Namespace(config="x"), "state_dict": ref.state_dict()}, path)
    with pytest.raises(ConfigError, match=r"needs full unpickling .*argparse.Namespace.*\+encoder.trust_pickle=true"):
        build_encoder("mit_b0", pretrained=path)
    enc = build_encoder("mit_b0", pretrained=path, trust_pickle=True)
    assert torch.equal(enc.body.stages[3].norm.weight, ref.norm4.weight)


def test_resnet18_pretrained_round_trip(tmp_path: Path) -> None:
    src = randomize_(timm.create_model("resnet18", pretrained=False), seed=3)
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)  # includes fc.*
    enc = build_encoder("resnet18", pretrained=path).eval()
    plain = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    assert enc.body.state_dict().keys() == plain.keys()
    for k, v in plain.items():
        assert torch.equal(enc.body.state_dict()[k], v), k
    # Same weights, undilated: the stride-4 layer1 output must agree with the classifier network's.
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = enc(x)
        stem = src.maxpool(src.act1(src.bn1(src.conv1(x))))
        torch.testing.assert_close(feats[0], src.layer1(stem))
        assert max_abs_diff(feats, build_encoder("resnet18").eval()(x)) > 1e-2


def test_resnet50_matches_torchvision_dilated(tmp_path: Path) -> None:
    """A torchvision checkpoint loads, and timm's output stride 8 equals torchvision's dilated layer3/4."""
    tv = randomize_(torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]), seed=4)
    path = tmp_path / "resnet50_tv.pth"
    torch.save(tv.state_dict(), path)
    enc = build_encoder("resnet50", pretrained=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        expected = []
        for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
            y = layer(y)
            expected.append(y)
        assert max_abs_diff(enc(x), expected) < 1e-4


def test_resnet_bad_keys_are_named(tmp_path: Path) -> None:
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    del state["layer2.0.downsample.1.running_var"]
    path = tmp_path / "resnet18_broken.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match=r"layer2\.0\.downsample\.1\.running_var") as info:
        build_encoder("resnet18", pretrained=path)
    assert str(path) in str(info.value)
