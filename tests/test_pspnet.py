"""PSPNet R50-D8 (STF+MAR's base network): resnet50c = mmseg ResNetV1c OS8, PSPHead, model=pspnet, mmseg import.

Counts and layer settings against the official modules as instantiated (mmseg PSPNet R50-D8 with ResNetV1c; see
experiments/stf_mar.md).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from conftest import compose_train
from random_weights import randomize_
from vss.config import CONF_DIR
from vss.convert import convert
from vss.convert import main as convert_main
from vss.data.transforms import build_eval_transform
from vss.errors import ConfigError
from vss.eval import evaluate_checkpoint, load_checkpoint
from vss.lit import build_module
from vss.models.aggregators.pspnet import PSPNet, import_official_checkpoint, pspnet_keys
from vss.models.encoders import build_encoder
from vss.models.heads import PSPHead
from vss.models.ops.normalize import normalize_frames
from vss.models.segmenter import Segmenter
from vss.predict import predict

RESNET50C_PARAMS = 23_527_264
PSP_HEAD_PARAMS = {"psp_modules": 4_198_400, "bottleneck": 18_875_392, "conv_seg": 9_747}
BATTERY = {"pspnet": {"encoder": "resnet18"}}  # the model battery (tests/battery.py): the paper's ResNet
PSPNET_R50_D8_PARAMS = 46_610_803  # without the auxiliary FCN head


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_mmseg_resnet(timm_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A timm resnet50c state dict under mmseg ResNetV1c names (the inverse of the importer's renaming)."""
    out = {}
    for k, v in timm_state.items():
        if k.startswith("conv1."):
            k = "stem." + k[len("conv1.") :]
        elif k.startswith("bn1."):
            k = "stem.7." + k[len("bn1.") :]
        out[k] = v
    return out


# -- encoder resnet50c ---------------------------------------------------------------------------------
def test_resnet50c_is_resnet_v1c_with_output_stride_8() -> None:
    with torch.device("meta"):
        enc = build_encoder("resnet50c")
    assert count(enc) == RESNET50C_PARAMS
    stem = [m for m in enc.body.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in stem] == [
        (3, 32, (3, 3), (2, 2)),
        (32, 32, (3, 3), (1, 1)),
        (32, 64, (3, 3), (1, 1)),
    ]
    conv2 = {
        f"layer{i}": [
            (b.conv2.stride[0], b.conv2.dilation[0], b.conv2.padding[0]) for b in getattr(enc.body, f"layer{i}")
        ]
        for i in range(1, 5)
    }
    assert conv2["layer1"] == [(1, 1, 1)] * 3
    assert conv2["layer2"] == [(2, 1, 1)] + [(1, 1, 1)] * 3
    assert conv2["layer3"] == [(1, 1, 1)] + [(1, 2, 2)] * 5  # contract_dilation: the first block at half
    assert conv2["layer4"] == [(1, 2, 2)] + [(1, 4, 4)] * 2
    for i, stride in ((3, 1), (4, 1)):  # stage-3/4 downsample: 1x1 stride-1 conv + BN (no avg-down)
        down = getattr(enc.body, f"layer{i}")[0].downsample
        assert [type(m) for m in down] == [nn.Conv2d, nn.BatchNorm2d] and down[0].stride == (stride, stride)
    assert enc.out_channels == [256, 512, 1024, 2048] and enc.reductions == [4, 8, 8, 8]


def test_resnet50c_output_shape() -> None:
    enc = build_encoder("resnet50c").eval()
    with torch.no_grad():
        feats = enc(torch.randn(1, 3, 256, 512, generator=gen(0)))
    assert tuple(feats[-1].shape) == (1, 2048, 32, 64)


def test_resnet50c_loads_mmseg_and_timm_layouts_alike(tmp_path: Path) -> None:
    src = randomize_(timm.create_model("resnet50c", pretrained=False), seed=3)
    timm_state = src.state_dict()  # with the ImageNet fc.*
    mmseg_state = {"backbone." + k: v for k, v in to_mmseg_resnet(timm_state).items()}
    mmseg_state["decode_head.conv_seg.weight"] = torch.zeros(19, 512, 1, 1)  # a whole mmseg model: head ignored
    assert "backbone.stem.7.running_var" in mmseg_state and "backbone.stem.6.weight" in mmseg_state
    torch.save(timm_state, tmp_path / "timm.pth")
    torch.save({"meta": {"iter": 80000}, "state_dict": mmseg_state}, tmp_path / "mmseg.pth")
    x = torch.randn(1, 3, 64, 96, generator=gen(1))
    with torch.no_grad():
        from_timm = build_encoder("resnet50c", pretrained=tmp_path / "timm.pth").eval()(x)
        from_mmseg = build_encoder("resnet50c", pretrained=tmp_path / "mmseg.pth").eval()(x)
        fresh = build_encoder("resnet50c").eval()(x)
    for a, b in zip(from_timm, from_mmseg, strict=True):
        assert torch.equal(a, b)
    assert (from_mmseg[-1] - fresh[-1]).abs().max() > 1e-2  # the weights were really loaded
    # layer1 does not depend on the dilation: equal to timm's undilated network
    with torch.no_grad():
        layer1 = src.layer1(src.maxpool(src.act1(src.bn1(src.conv1(x)))))
    torch.testing.assert_close(from_mmseg[0], layer1)


def test_resnet50c_refuses_a_v1b_checkpoint(tmp_path: Path) -> None:
    torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), tmp_path / "v1b.pth")
    with pytest.raises(ValueError, match="does not match the encoder"):
        build_encoder("resnet50c", pretrained=tmp_path / "v1b.pth")


# -- PSPHead -------------------------------------------------------------------------------------------
def test_psp_head_sizes_and_mmseg_names() -> None:
    with torch.device("meta"):
        head = PSPHead(2048, 19)
    assert {name: count(getattr(head, name)) for name in PSP_HEAD_PARAMS} == PSP_HEAD_PARAMS
    assert count(head) == 23_083_539
    names = set(head.state_dict())
    for k in range(4):
        assert {f"psp_modules.{k}.1.conv.weight", f"psp_modules.{k}.1.bn.running_var"} <= names
        assert f"psp_modules.{k}.1.conv.bias" not in names
    assert {"bottleneck.conv.weight", "bottleneck.bn.weight", "conv_seg.weight", "conv_seg.bias"} <= names
    assert "bottleneck.conv.bias" not in names
    assert head.bottleneck.conv.kernel_size == (3, 3) and head.bottleneck.conv.padding == (1, 1)
    assert [m[0].output_size for m in head.psp_modules] == [1, 2, 3, 6]


def _bn(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def test_psp_head_matches_the_pyramid_pooling_formula() -> None:
    """Eval mode, written out: concat [x, up(relu(bn(conv1x1(pool_s(x))))) for s=1,2,3,6], 3x3 conv+BN+ReLU, 1x1."""
    head = randomize_(PSPHead(8, 3, channels=4), seed=5)
    x = torch.randn(2, 8, 11, 13, generator=gen(2))
    branches = [x]
    for k, s in enumerate((1, 2, 3, 6)):
        unit = head.psp_modules[k][1]
        y = F.relu(_bn(F.conv2d(F.adaptive_avg_pool2d(x, s), unit.conv.weight), unit.bn))
        branches.append(F.interpolate(y, size=(11, 13), mode="bilinear", align_corners=False))
    feature = F.relu(_bn(F.conv2d(torch.cat(branches, 1), head.bottleneck.conv.weight, padding=1), head.bottleneck.bn))
    logits = F.conv2d(feature, head.conv_seg.weight, head.conv_seg.bias)
    with torch.no_grad():
        got_feature = head.bottleneck_features(x)
        got = head(x)
    assert got_feature.shape == (2, 4, 11, 13) and got.shape == (2, 3, 11, 13)
    torch.testing.assert_close(got_feature, feature)
    torch.testing.assert_close(head.classify(got_feature), logits)
    torch.testing.assert_close(got, logits)


def test_psp_head_dropout_is_channel_dropout_before_conv_seg() -> None:
    head = PSPHead(8, 3, channels=4, dropout=0.5).train()
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.5
    feature = torch.ones(1, 4, 5, 5)
    torch.manual_seed(0)
    dropped = head.dropout(feature)
    per_channel = dropped.flatten(2)
    assert torch.all(per_channel.amin(-1) == per_channel.amax(-1))  # whole channels are dropped


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"channels": 0}, "model.channels"),
        ({"pool_scales": []}, "model.pool_scales"),
        ({"pool_scales": [1, 0]}, "model.pool_scales"),
        ({"dropout": 1.5}, "model.dropout"),
    ],
)
def test_psp_head_bad_values_raise_config_error(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        PSPHead(8, 3, **kwargs)


# -- model=pspnet --------------------------------------------------------------------------------------
def test_pspnet_r50_d8_size_and_logits_at_one_eighth() -> None:
    cfg = compose_train(["model=pspnet", "encoder=resnet50c", "data=cityscapes_video", "data.root=/none"])
    assert list(cfg.model.pool_scales) == [1, 2, 3, 6] and cfg.model.channels == 512 and cfg.model.dropout == 0.1
    with torch.device("meta"):
        seg = Segmenter(build_encoder("resnet50c"), partial(PSPNet), 19)
        assert count(seg) == PSPNET_R50_D8_PARAMS
        assert seg.offsets == () and seg.lookahead == 0
        out = seg.eval()(torch.empty(1, 1, 3, 128, 256))
    assert tuple(out["logits"].shape) == (1, 19, 16, 32)


def test_pspnet_refuses_offsets() -> None:
    with pytest.raises(ConfigError, match="model.offsets"):
        PSPNet([64, 128, 256, 512], 5, offsets=[-1])


# -- vss.convert --model pspnet ------------------------------------------------------------------------
def _official_checkpoint(
    path: Path, num_classes: int = 19, channels: int = 16, meta: dict | None = None, backbone: nn.Module | None = None
) -> tuple[nn.Module, PSPHead]:
    """A fake mmseg PSPNet R50-D8 checkpoint: random weights under mmseg names, an aux head and ``meta``
    (default: mmseg 0.x's, with ``CLASSES``).

    The head is narrow (``channels``, read back by the importer) to keep the file small.
    """
    backbone = backbone or randomize_(build_encoder("resnet50c"), seed=1)
    head = randomize_(PSPHead(2048, num_classes, channels=channels), seed=2)
    state = {"backbone." + k: v for k, v in to_mmseg_resnet(backbone.body.state_dict()).items()}
    state |= {"decode_head." + k: v for k, v in head.state_dict().items()}
    g = gen(4)
    state |= {
        "auxiliary_head.convs.0.conv.weight": torch.randn(4, 1024, 3, 3, generator=g),
        "auxiliary_head.convs.0.bn.weight": torch.ones(4),
        "auxiliary_head.conv_seg.weight": torch.randn(num_classes, 4, 1, 1, generator=g),
        "auxiliary_head.conv_seg.bias": torch.zeros(num_classes),
    }
    meta = {"iter": 80000, "CLASSES": ("road",) * num_classes} if meta is None else meta
    torch.save({"meta": meta, "state_dict": state}, path)
    return backbone, head


def test_mmseg_checkpoint_converts_and_gives_the_same_logits(tmp_path: Path) -> None:
    src, dst = tmp_path / "pspnet_r50-d8.pth", tmp_path / "pspnet.ckpt"
    backbone, head = _official_checkpoint(src)
    report = convert(src, dst, "pspnet", verbose=False)
    assert report["overrides"] == [
        "data=cityscapes_video",
        "model=pspnet",
        "encoder=resnet50c",
        "data.num_classes=19",
        "model.channels=16",
    ]
    assert (
        report["dropped"] == sorted(k for k in torch.load(src)["state_dict"] if k.startswith("auxiliary_head."))
        and len(report["dropped"]) == 4
    )
    ckpt = load_checkpoint(dst)  # what `python -m vss.eval ckpt_path=...` reads
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    assert cfg.encoder.name == "resnet50c" and cfg.data.num_classes == 19 and cfg.model.channels == 16
    module = build_module(cfg, 19, [str(i) for i in range(19)])
    module.load_state_dict(ckpt["state_dict"], strict=True)
    direct = Segmenter(backbone, partial(PSPNet, channels=16), 19)
    direct.aggregator.decode_head.load_state_dict(head.state_dict())
    clip = torch.randn(2, 1, 3, 64, 96, generator=gen(7))
    with torch.no_grad():
        got = module.segmenter.eval()(clip)["logits"]
        expected = direct.eval()(clip)["logits"]
        by_hand = head(backbone(clip[:, 0])[-1])
    assert got.shape == (2, 19, 8, 12)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(got, by_hand, atol=0, rtol=0)


def test_pspnet_keys_names_and_unknown_keys() -> None:
    state = {
        "backbone.stem.0.weight": torch.zeros(1),
        "backbone.stem.7.running_mean": torch.zeros(1),
        "backbone.layer3.0.downsample.1.weight": torch.zeros(1),
        "decode_head.psp_modules.2.1.bn.running_mean": torch.zeros(1),
        "decode_head.bottleneck.conv.weight": torch.zeros(1),
        "decode_head.conv_seg.bias": torch.zeros(1),
        "decode_head.conv_seg_extra.weight": torch.zeros(1),
        "auxiliary_head.conv_seg.weight": torch.zeros(1),
        "neck.weight": torch.zeros(1),
    }
    converted, origin, dropped, unknown = pspnet_keys(state)
    assert origin == {
        "encoder.body.conv1.0.weight": "backbone.stem.0.weight",
        "encoder.body.bn1.running_mean": "backbone.stem.7.running_mean",
        "encoder.body.layer3.0.downsample.1.weight": "backbone.layer3.0.downsample.1.weight",
        "aggregator.decode_head.psp_modules.2.1.bn.running_mean": "decode_head.psp_modules.2.1.bn.running_mean",
        "aggregator.decode_head.bottleneck.conv.weight": "decode_head.bottleneck.conv.weight",
        "aggregator.decode_head.conv_seg.bias": "decode_head.conv_seg.bias",
    }
    # BN counters absent from the file are added (they do not affect outputs)
    assert set(converted) - set(origin) == {
        "encoder.body.bn1.num_batches_tracked",
        "aggregator.decode_head.psp_modules.2.1.bn.num_batches_tracked",
    }
    assert dropped == ["auxiliary_head.conv_seg.weight"]
    assert unknown == ["decode_head.conv_seg_extra.weight", "neck.weight"]
    assert set(pspnet_keys(state, head_prefix="aggregator.psp.")[1]) >= {"aggregator.psp.conv_seg.bias"}


def test_import_refuses_other_backbones() -> None:
    v1b = {"backbone." + k: v for k, v in timm.create_model("resnet50", pretrained=False).state_dict().items()}
    with pytest.raises(ConfigError, match="ResNetV1c.*7x7 stem"):
        import_official_checkpoint(v1b)
    with torch.device("meta"):
        r101 = timm.create_model("resnet101c", pretrained=False).state_dict()
    with pytest.raises(ConfigError, match=r"blocks \(3, 4, 23, 3\)"):
        import_official_checkpoint({"backbone." + k: v for k, v in to_mmseg_resnet(r101).items()})


def test_unknown_and_missing_keys_are_reported(tmp_path: Path) -> None:
    src, dst = tmp_path / "pspnet_r50-d8.pth", tmp_path / "pspnet.ckpt"
    _official_checkpoint(src, num_classes=5)
    state = torch.load(src)["state_dict"]
    state["decode_head.psp_modules.4.1.conv.weight"] = torch.zeros(16, 2048, 1, 1)
    del state["decode_head.bottleneck.bn.bias"]
    torch.save({"state_dict": state}, src)
    with pytest.raises(ConfigError) as info:
        convert(src, dst, "pspnet", ["data=synthetic"], verbose=False)
    msg = str(info.value)
    assert "decode_head.psp_modules.4.1.conv.weight" in msg and "aggregator.decode_head.bottleneck.bn.bias" in msg
    assert not dst.exists()


# -- any class count: a 150-class (ADE20K) mmseg checkpoint ------------------------------------------------
ADE_CLASSES = 150
#: mmseg 0.x's meta as tools/train.py saves it: the data set's CLASSES and PALETTE (names with spaces, as ADE's)
ADE_NAMES = ("wall", "building", "sky", "floor", "tree", *(f"thing no. {i}" for i in range(5, ADE_CLASSES)))
ADE_PALETTE = [[(37 * i) % 256, (91 * i) % 256, (151 * i) % 256] for i in range(ADE_CLASSES)]
ADE_META = {"mmseg_version": "0.20.2", "config": "...", "CLASSES": ADE_NAMES, "PALETTE": ADE_PALETTE, "iter": 160000}


@pytest.fixture(scope="module")
def ade(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A fake 150-class mmseg PSPNet R50-D8 (official names and shapes; head 16 wide) with and without ``meta``
    class names, and a tiny VSPW-layout data set with raw mask values 0..150 (0: ignore)."""
    root = tmp_path_factory.mktemp("ade")
    backbone, head = _official_checkpoint(root / "meta.pth", ADE_CLASSES, meta=ADE_META)
    _official_checkpoint(root / "no_meta.pth", ADE_CLASSES, meta={"iter": 160000}, backbone=backbone)
    data = root / "data"
    rng = np.random.default_rng(0)
    for video in ("v0", "v1"):
        for kind in ("origin", "mask"):
            (data / "data" / video / kind).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(data / "data" / video / "origin" / f"{i:03d}.png"), rng.integers(0, 256, (32, 48, 3)))
            mask = rng.integers(0, ADE_CLASSES + 1, (32, 48)).astype(np.uint8)
            cv2.imwrite(str(data / "data" / video / "mask" / f"{i:03d}.png"), mask)
    (data / "val.txt").write_text("v0\nv1\n")
    return {"root": root, "backbone": backbone, "head": head, "data": data}


def _eval_cfg(ckpt_path: Path, out: Path) -> DictConfig:
    """``conf/eval.yaml`` for ``vss.eval ckpt_path=... save_predictions=true`` on the CPU, in-process."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        overrides = ["save_predictions=true", "progress=false", "num_workers=0", "device=cpu"]
        cfg = compose("eval", [f"ckpt_path={ckpt_path}", *overrides, f"paths.output_dir={out}"])
    GlobalHydra.instance().clear()
    return cfg


def _stored(ckpt_path: Path) -> tuple[DictConfig, dict]:
    ckpt = load_checkpoint(ckpt_path)
    return OmegaConf.create(ckpt["hyper_parameters"]["config"]), ckpt


def test_150_class_checkpoint_converts_with_its_meta_names(ade: dict, tmp_path: Path) -> None:
    """No data set has 150 classes: the VSPW-layout reader, the names and colours mmseg saved; the same logits."""
    dst = tmp_path / "ade.ckpt"
    report = convert(ade["root"] / "meta.pth", dst, "pspnet", verbose=False)
    assert report["overrides"][:2] == ["data=vspw", "model=pspnet"] and "data.num_classes=150" in report["overrides"]
    assert (
        report["classes"] == "150, names from the checkpoint's meta['CLASSES'], its palette (data=vspw reads the data)"
    )
    cfg, ckpt = _stored(dst)
    assert cfg.data.num_classes == 150 and cfg.data._target_ == "vss.data.datamodule.VSSDataModule"
    assert list(cfg.data.class_names) == list(ADE_NAMES) and OmegaConf.to_container(cfg.data.palette) == ADE_PALETTE
    assert ckpt["hyper_parameters"]["class_names"] == list(ADE_NAMES)
    module = build_module(cfg, 150, list(cfg.data.class_names))
    module.load_state_dict(ckpt["state_dict"], strict=True)
    x = torch.randn(1, 1, 3, 32, 48, generator=gen(9))
    with torch.no_grad():
        got = module.segmenter.eval()(x)["logits"]
        by_hand = ade["head"](ade["backbone"](x[:, 0])[-1])
    assert got.shape == (1, 150, 4, 6)
    torch.testing.assert_close(got, by_hand, atol=0, rtol=0)
    # converted without data.root: vss.eval says what to pass (one line, no traceback)
    with pytest.raises(ConfigError, match=r"data.root is not set .*data=GROUP data.root=DIR data.num_classes=150$"):
        evaluate_checkpoint(_eval_cfg(dst, tmp_path / "eval"), tmp_path / "eval")


def test_150_class_checkpoint_without_meta_names_is_numbered(ade: dict, tmp_path: Path) -> None:
    dst = tmp_path / "ade.ckpt"
    report = convert(ade["root"] / "no_meta.pth", dst, "pspnet", verbose=False)
    assert report["classes"].startswith("150, numbered names class_0...class_149 (no class names in the meta)")
    cfg, ckpt = _stored(dst)
    assert list(cfg.data.class_names) == [f"class_{i}" for i in range(150)] and cfg.data.palette is None
    build_module(cfg, 150, list(cfg.data.class_names)).load_state_dict(ckpt["state_dict"], strict=True)


def test_150_class_checkpoint_data_of_another_count_is_a_clear_error(ade: dict, tmp_path: Path) -> None:
    src, dst = ade["root"] / "meta.pth", tmp_path / "ade.ckpt"
    with pytest.raises(ConfigError, match=r"data=cityscapes_video has 19 classes but the checkpoint has 150: "):
        convert(src, dst, "pspnet", ["data=cityscapes_video"], verbose=False)
    with pytest.raises(ConfigError, match=r"data=synthetic \(experiment=synthetic\) has 5 classes but .* has 150"):
        convert(src, dst, "pspnet", ["experiment=synthetic"], verbose=False)
    assert convert_main(["--model", "pspnet", "--src", str(src), "--dst", str(dst), "data=camvid_video"]) == 2
    assert not dst.exists()


def test_150_class_checkpoint_evaluates(ade: dict, tmp_path: Path) -> None:
    """vss.eval on a 150-class VSPW-layout set: per-class IoU under the meta names; mIoU recomputed by hand."""
    dst = tmp_path / "ade.ckpt"
    convert(ade["root"] / "meta.pth", dst, "pspnet", [f"data.root={ade['data']}", "data.scale=[64,64]"], verbose=False)
    metrics = evaluate_checkpoint(_eval_cfg(dst, tmp_path / "eval"), tmp_path / "eval")
    assert list(metrics["per_class_iou"]) == list(ADE_NAMES) and metrics["frames"] == 4
    confmat, top = np.zeros((150, 150), np.int64), 0
    for video in ("v0", "v1"):
        for i in range(2):
            pred = cv2.imread(str(tmp_path / "eval" / "predictions" / video / f"{i:03d}.png"), cv2.IMREAD_UNCHANGED)
            raw = cv2.imread(str(ade["data"] / "data" / video / "mask" / f"{i:03d}.png"), cv2.IMREAD_UNCHANGED)
            keep = raw > 0  # VSPW label map: raw 0 is ignored, raw k is class k-1
            np.add.at(confmat, ((raw[keep] - 1).astype(int), pred[keep].astype(int)), 1)
            top = max(top, int(pred.max()))
    assert top > 18  # classes past Cityscapes' 19 are predicted
    tp, gt, predicted = np.diag(confmat), confmat.sum(1), confmat.sum(0)
    iou = tp[gt > 0] / (gt + predicted - tp)[gt > 0]
    assert metrics["mIoU"] == pytest.approx(iou.mean(), abs=1e-6)


def test_150_class_checkpoint_predicts_with_its_names_and_colours(ade: dict, tmp_path: Path) -> None:
    """vss.predict on three frames: masks = the mmseg model by hand; predict.json lists the 150 meta classes."""
    dst, frames_dir, out = tmp_path / "ade.ckpt", tmp_path / "frames", tmp_path / "out"
    convert(ade["root"] / "meta.pth", dst, "pspnet", ["data.scale=[64,64]"], verbose=False)
    frames_dir.mkdir()
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(3)]
    for i, f in enumerate(frames):
        cv2.imwrite(str(frames_dir / f"{i}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("predict", [f"ckpt_path={dst}", f"source={frames_dir}", f"output={out}", "progress=false"])
    GlobalHydra.instance().clear()
    summary = predict(cfg)
    assert [c["name"] for c in summary["classes"]] == list(ADE_NAMES)
    assert [c["color"] for c in summary["classes"]] == ADE_PALETTE  # the checkpoint's palette, not a generated one
    x = normalize_frames(build_eval_transform([64, 64], 32)(images=np.stack(frames))["images"])
    with torch.no_grad():
        logits = ade["head"](ade["backbone"](x)[-1])
        expected = F.interpolate(logits, size=(40, 56), mode="bilinear", align_corners=False).argmax(1).numpy()
    for i in range(3):
        np.testing.assert_array_equal(cv2.imread(str(out / "masks" / f"{i}.png"), cv2.IMREAD_UNCHANGED), expected[i])
    assert expected.max() > 18
