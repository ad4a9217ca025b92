"""MRCFA: STM, affinity-decoder ablations, loss, per-frame branch, start-of-video policy, configs, checkpoint import,
parameter counts.

The contract every model meets (stream = clip over a whole video, per-frame ``encode``, gradients, frozen parts,
presets that construct) is in test_contract.py; this file keeps what is MRCFA's own."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from random_weights import randomize_
from reference_mit import build_reference_mit
from reference_mrcfa import OfficialMRCFAHead
from vss.config import CONF_DIR, register_resolvers
from vss.convert import convert
from vss.convert import main as convert_main
from vss.errors import ConfigError
from vss.eval import load_checkpoint
from vss.lit import build_module
from vss.models.aggregators.mrcfa import (
    MRCFA,
    OFFICIAL_START_CLIPS,
    SCALES,
    SelectiveTokenMasking,
    official_head_key,
)
from vss.models.aggregators.segformer import SegFormer
from vss.models.encoders import MIT_SETTINGS, Encoder, build_encoder
from vss.models.segmenter import Segmenter

register_resolvers()
B0_CHANNELS = [32, 64, 160, 256]
# Table 5 of the paper (VSPW, 124 classes), millions of parameters
PAPER_PARAMS = {
    "segformer": {"mit_b0": 3.8, "mit_b1": 13.8, "mit_b2": 24.8, "mit_b5": 82.1},
    "mrcfa": {"mit_b0": 5.2, "mit_b1": 16.2, "mit_b2": 27.3, "mit_b5": 84.5},
}


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class TinyEncoder(Encoder):
    """A small conv stand-in for MiT with its strides 4/8/16/32 (kernel = stride): fast logic tests."""

    def __init__(self, channels: tuple[int, ...] = (8, 16, 24, 32)) -> None:
        super().__init__()
        self.out_channels, self.reductions = list(channels), [4, 8, 16, 32]
        ins, strides = (3, *channels[:-1]), (4, 2, 2, 2)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(i, o, s, s), nn.GELU()) for i, o, s in zip(ins, channels, strides, strict=True)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def mrcfa_model(seed: int = 0, encoder: str = "tiny", **kwargs: Any) -> Segmenter:
    """MRCFA (5 classes) on the tiny encoder (or a MiT), random weights, eval mode."""
    torch.manual_seed(seed)
    kwargs.setdefault("token_ratio", 0.5)
    kwargs.setdefault("embed_dim", 64)  # a narrower decoder keeps the tests fast (the official width is 256)
    enc = TinyEncoder() if encoder == "tiny" else build_encoder(encoder, drop_path_rate=0.0)
    return randomize_(Segmenter(enc, partial(MRCFA, **kwargs), 5), seed)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def model() -> Segmenter:
    return mrcfa_model(sar_layout="b1")


# -- Selective Token Masking -------------------------------------------------------------------------


def test_stm_keeps_exactly_the_top_p_tokens() -> None:
    affinity = torch.randn(2, 3, 10, 20, generator=gen(0))
    stm = SelectiveTokenMasking(0.3, top_n=5)
    index = stm(affinity)
    assert index is not None and index.shape == (2, 3, 6)  # S = int(0.3 * 20)
    for b in range(2):
        for r in range(3):
            cols = affinity[b, r]  # (target tokens, reference tokens)
            importance = [sorted(cols[:, j].tolist(), reverse=True)[:5] for j in range(20)]
            scores = [sum(v) for v in importance]
            best = sorted(range(20), key=lambda j: -scores[j])[:6]
            assert index[b, r].tolist() == sorted(best)  # the top-p tokens, in raster order
    assert SelectiveTokenMasking(0.5).num_selected(225) == 112 and SelectiveTokenMasking(0.8).num_selected(225) == 180
    assert SelectiveTokenMasking(1.0)(affinity) is None
    assert SelectiveTokenMasking(0.5, top_n=50).importance(affinity).shape == (2, 3, 20)  # n capped at HW_t


@pytest.mark.parametrize("p", [0.0, 1.5, -0.1])
def test_stm_ratio_must_be_in_0_1(p: float) -> None:
    with pytest.raises(ConfigError, match="stm.p"):
        SelectiveTokenMasking(p)


def test_p_one_equals_no_masking_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    m = mrcfa_model(token_ratio=1.0)
    clip = torch.randn(2, 4, 3, 64, 96, generator=gen(1))
    with torch.no_grad():
        unmasked = m(clip)["logits"]

        def keep_all(affinity: Tensor) -> Tensor:
            n = affinity.shape[-1]
            return torch.arange(n).expand(*affinity.shape[:2], n)

        monkeypatch.setattr(m.aggregator.token_masking, "forward", keep_all)
        selected_all = m(clip)["logits"]
    assert torch.equal(unmasked, selected_all)


def test_p_sets_the_number_of_selected_tokens(model: Segmenter) -> None:
    clip = torch.randn(1, 4, 3, 128, 128, generator=gen(2))  # 4x4 = 16 tokens on the 1/32 grid
    seen: list[int] = []
    hook = model.aggregator.affinity_decoder.register_forward_hook(
        lambda mod, args, out: seen.append(args[0]["s32"].shape[0] * args[0]["s32"].shape[1])
    )
    stm = model.aggregator.token_masking
    try:
        with torch.no_grad():
            frames = [model.encode(clip[:, i]) for i in range(4)]
            for p in (0.3, 0.5, 1.0):
                stm.token_ratio = p
                model.aggregate(frames[3], frames[:3])
    finally:
        stm.token_ratio = 0.5
        hook.remove()
    assert seen == [3 * 4, 3 * 8, 3 * 16]  # B * R items x S token maps, S = int(p * 16)


def test_result_does_not_depend_on_reference_token_order(model: Segmenter) -> None:
    clip = torch.randn(2, 4, 3, 128, 96, generator=gen(3))
    with torch.no_grad():
        frames = [model.encode(clip[:, i]) for i in range(4)]
        expected = model.aggregate(frames[3], frames[:3])["logits"]
        shuffled = []
        for i, f in enumerate(frames[:3]):
            perm = torch.randperm(f["value"].shape[1], generator=gen(10 + i))
            shuffled.append({k: (v[:, perm] if k.startswith(("key_", "value")) else v) for k, v in f.items()})
        got = model.aggregate(frames[3], shuffled)["logits"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# -- ablations: build and train a step ---------------------------------------------------------------

ABLATIONS = [
    dict(num_scales=1),
    dict(num_scales=2),
    dict(num_scales=3, sar_layout="b1"),
    dict(num_scales=3, sar_layout="light"),
    dict(sar=False),
    dict(maa=False),
    dict(sar=False, maa=False),
    dict(num_scales=2, sar_layout="b1", maa=False),
    dict(fusion="feature_pyramid"),
    dict(merge="paper", key_order="paper"),
    dict(offsets=(-6, -3), start="clamp"),
]


@pytest.mark.parametrize("kwargs", ABLATIONS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_ablations_build_and_train_a_step(kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    refs = len(kwargs.get("offsets", (-9, -6, -3)))
    m = Segmenter(TinyEncoder(), partial(MRCFA, token_ratio=0.8, embed_dim=32, **kwargs), 5).train()
    agg = m.aggregator
    scales = agg.scales
    assert scales == ("s8", "s16", "s32")[3 - kwargs.get("num_scales", 3) :]
    assert set(agg.query_proj) == set(agg.key_proj) == set(scales)
    assert set(agg.key_reduction) == set(scales) - {"s32"}
    if kwargs.get("fusion") == "feature_pyramid":
        assert agg.affinity_decoder is None
    else:
        dec = agg.affinity_decoder
        assert set(dec.refine) == (set(scales) if kwargs.get("sar", True) else set())
        assert set(dec.aggregate) == (set(scales[:-1]) if kwargs.get("maa", True) else set())
    clip = torch.randn(2, refs + 1, 3, 64, 64, generator=gen(4))
    labels = torch.randint(0, 5, (2, refs + 1, 64, 64), generator=gen(5))
    labels[:, :, :4] = 255
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    out = m(clip)
    assert out["logits"].shape == (2, 5, 16, 16) and out["aux_logits"].shape == (2, refs, 5, 16, 16)
    assert out["frame_logits"].shape == (2, refs + 1, 5, 16, 16)
    terms = m.losses(out, labels)
    assert set(terms) == {"ce_per_frame", "ce_target"}
    loss = sum(terms.values())
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad  # every parameter is used: DDP without find_unused_parameters works
    before = agg.classifier[1].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, agg.classifier[1].weight)


def test_ablation_toggles_change_the_affinity_path() -> None:
    """SAR and MAA blocks run only when enabled; L=1 never computes the shallow affinities."""
    clip = torch.randn(1, 4, 3, 64, 64, generator=gen(6))
    for kwargs, expected in (
        (dict(), {"refine.s32", "refine.s16", "refine.s8", "aggregate.s16", "aggregate.s8"}),
        (dict(sar=False), {"aggregate.s16", "aggregate.s8"}),
        (dict(maa=False), {"refine.s32", "refine.s16", "refine.s8"}),
        (dict(num_scales=1), {"refine.s32"}),
        (dict(num_scales=2), {"refine.s32", "refine.s16", "aggregate.s16"}),
    ):
        m = mrcfa_model(**kwargs)
        called: set[str] = set()
        for name, mod in m.aggregator.affinity_decoder.named_children():
            for scale, block in mod.items():
                block.register_forward_hook(lambda *a, key=f"{name}.{scale}", called=called: called.add(key))
        with torch.no_grad():
            feats = m.encode(clip[:, 0])
            m(clip)
        assert called == expected, kwargs
        assert {k for k in feats if k.startswith("query_")} == {f"query_{s}" for s in m.aggregator.scales}


def test_official_decoder_widths_and_feature_pyramid_parameter_count() -> None:
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(mrcfa_model(sar_layout="b1").aggregator.affinity_decoder) == 271  # official B1 HPN
    assert count(mrcfa_model(sar_layout="light").aggregator.affinity_decoder) == 92  # official B0/B2/B5 HPN
    full, fp = mrcfa_model(sar_layout="b1"), mrcfa_model(fusion="feature_pyramid")
    assert 0 < count(full) - count(fp) == 271  # Table 4: "a similar number of parameters"


def test_paper_variants_change_the_output(model: Segmenter) -> None:
    clip = torch.randn(1, 4, 3, 64, 64, generator=gen(7))
    state = model.state_dict()
    with torch.no_grad():
        base = model(clip)["logits"]
        for kwargs in (dict(merge="paper"), dict(key_order="paper"), dict(fusion="feature_pyramid")):
            other = mrcfa_model(sar_layout="b1", **kwargs)
            other.load_state_dict(state, strict=False)
            logits = other(clip)["logits"]
            assert logits.shape == base.shape and not torch.allclose(logits, base, atol=1e-4), kwargs


def test_non_mit_encoder_is_rejected_naming_encoder_name() -> None:
    with pytest.raises(ConfigError, match="encoder.name='resnet18'"):
        Segmenter(build_encoder("resnet18"), partial(MRCFA, encoder_name="resnet18"), 5)
    m = Segmenter(build_encoder("resnet18"), partial(MRCFA), 5)  # no name given: the strides are checked
    with pytest.raises(ValueError, match="strides"):
        m.encode(torch.randn(1, 3, 64, 64))


# -- loss ------------------------------------------------------------------------------------------


def test_loss_matches_hand_computed_value() -> None:
    agg = MRCFA([8, 8, 8, 8], num_classes=2, embed_dim=8, offsets=(-3,), start="clamp")
    ln3 = math.log(3.0)
    labels = torch.tensor([[[[0, 255]], [[1, 0]]]])  # (B=1, T=2, H=1, W=2): reference frame, then target
    frame_logits = torch.tensor([[[[ln3, 0.0]], [[0.0, 0.0]]], [[[0.0, 0.0]], [[0.0, ln3]]]])  # (T, C, H, W)
    outputs = {
        "frame_logits": frame_logits.unsqueeze(0),
        "logits": torch.tensor([[[[0.0, ln3]], [[ln3, 0.0]]]]),
        "aux_logits": torch.zeros(1, 1, 2, 1, 2),
    }
    terms = agg.losses(outputs, labels)
    # per frame: -ln(3/4) and an ignored pixel (counted in the mean) on the reference; ln 2 and ln 4 on the target
    per_frame = 0.5 * (math.log(4 / 3) + 0.0 + math.log(2) + math.log(4)) / 4
    # final output: -ln(3/4) on both pixels; auxiliary (all zero logits): ln 2; averaged
    target = (math.log(4 / 3) + math.log(2)) / 2
    assert terms["ce_per_frame"].item() == pytest.approx(per_frame, rel=1e-6)
    assert terms["ce_target"].item() == pytest.approx(target, rel=1e-6)
    paper = MRCFA([8, 8, 8, 8], num_classes=2, embed_dim=8, per_frame_loss_weight=0.0, aux_loss=False)
    assert paper.losses(outputs, labels) == {"ce_target": pytest.approx(math.log(4 / 3))}


# -- per-frame branch and start-of-video policy -------------------------------------------------------


def test_encode_gives_the_official_per_frame_features(model: Segmenter) -> None:
    with torch.no_grad():
        feats = model.encode(torch.randn(2, 3, 64, 96, generator=gen(9)))
    assert set(feats) == {"fused", "feat8", "value", *(f"{a}_{s}" for a in ("query", "key") for s in SCALES)}
    assert feats["fused"].shape == (2, 64, 16, 24) and feats["feat8"].shape == (2, 64, 8, 12)  # _c, _c2
    assert model.aggregator.frame_logits(feats).shape == (2, 5, 16, 24)  # the per-frame branch
    assert feats["value"].shape == (2, 2 * 3, 64)  # the 1/32 grid's tokens (official sr1_feat)
    assert feats["query_s8"].shape == (2, 8, 12, 16) and feats["key_s8"].shape == (2, 2 * 3, 16)  # eq. 9


def test_targets_without_references_use_the_per_frame_branch(model: Segmenter) -> None:
    """``aggregate(target, [])`` (the official frames 0-2) is the per-frame SegFormer logits; ``clip_logits``
    batches targets that read different numbers of references."""
    clip = torch.randn(3, 4, 3, 64, 64, generator=gen(11))
    counts = [0, 3, 0]
    with torch.no_grad():
        own = model.aggregator.frame_logits(model.encode(clip[:, -1]))
        assert torch.equal(model.aggregate(model.encode(clip[:, -1]), [])["logits"], own)
        temporal = model(clip)["logits"]
        mixed = model.clip_logits(clip, counts)
        pred = model.predict(clip, (64, 64), counts)
    torch.testing.assert_close(mixed[[0, 2]], own[[0, 2]])
    torch.testing.assert_close(mixed[1], temporal[1])
    assert not torch.allclose(own[1], temporal[1], atol=1e-4)
    assert pred.shape == (3, 64, 64)


def test_training_needs_the_whole_clip() -> None:
    m = mrcfa_model().train()
    with pytest.raises(ConfigError, match="model.offsets has 3 reference frames but the clip has 2"):
        m(torch.randn(1, 3, 3, 64, 64, generator=gen(12)))


def test_official_start_policy_gives_the_official_clips() -> None:
    official = MRCFA(B0_CHANNELS, 5, embed_dim=8)  # start=official, offsets [-9,-6,-3]
    clips = {3: [0, 1, 2], 4: [0, 2, 3], 5: [0, 2, 4], 6: [0, 2, 4], 7: [0, 3, 5], 8: [0, 3, 6]}
    assert {t: list(c) for t, c in OFFICIAL_START_CLIPS.items()} == clips  # references only, the target excluded
    for length in (None, 21):  # streaming (end unknown) and evaluation clips
        for t in range(21):
            expected = [] if t < 3 else clips.get(t, [t - 9, t - 6, t - 3])
            assert official.references(t, length) == expected, (t, length)
    assert official.references(9, None) == [0, 3, 6] and official.references(20, None) == [11, 14, 17]
    assert official.lookahead == 0
    clamp = MRCFA(B0_CHANNELS, 5, embed_dim=8, start="clamp")  # the first frame repeats
    assert clamp.references(0, 20) == [0, 0, 0] and clamp.references(4, 20) == [0, 0, 1]
    after = MRCFA(B0_CHANNELS, 5, embed_dim=8, offsets=(-3, 2), start="clamp")  # the last frame repeats too
    assert after.references(19, 20) == [16, 19] and after.references(19, None) == [16, 21] and after.lookahead == 2
    with pytest.raises(ConfigError, match=r"model\.start=official .* needs model\.offsets=\[-9, -6, -3\]"):
        MRCFA(B0_CHANNELS, 5, offsets=(-6, -3))
    with pytest.raises(ConfigError, match="model.start"):
        MRCFA(B0_CHANNELS, 5, start="first")
    with pytest.raises(ConfigError, match="at least one reference"):
        MRCFA(B0_CHANNELS, 5, offsets=(), start="clamp")


# -- configs ---------------------------------------------------------------------------------------


def _compose_many(overrides: list[list[str]]) -> list[Any]:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return [compose("train", overrides=o) for o in overrides]


def _aggregator(cfg: Any) -> MRCFA:
    """``cfg.model`` built on ``cfg.encoder``'s MiT channels (a narrow decoder)."""
    channels = MIT_SETTINGS[cfg.encoder.name]["embed_dims"]
    return instantiate(cfg.model, embed_dim=16)(in_channels=channels, num_classes=5)


def test_config_stm_p_is_top_level_and_defaults_follow_the_encoder() -> None:
    """``stm.p=...`` works as typed; p and the SAR layout left at null take the official per-encoder values."""
    cases = [
        (["encoder=mit_b1", "stm.p=0.3"], 0.3, "b1"),
        (["encoder=mit_b1", "model.sar_layout=light"], 0.5, "light"),
        (["encoder=mit_b0"], 0.8, "light"),
        (["encoder=mit_b1"], 0.5, "b1"),
        (["encoder=mit_b2"], 0.5, "light"),
    ]
    others = [
        ["model=segformer"],
        ["model=mrcfa", "model.offsets=[-6,-3]", "model.start=clamp"],
        ["model=feature_pyramid"],
        ["model=mrcfa", "model.offsets=[-6,-3]"],
    ]
    cfgs = _compose_many([["model=mrcfa", *o] for o, _, _ in cases] + others)
    for cfg, (overrides, p, layout) in zip(cfgs, cases, strict=False):
        assert cfg.model.token_ratio == cfg.stm.p == (0.3 if "stm.p=0.3" in overrides else None)
        agg = _aggregator(cfg)
        assert (agg.token_masking.token_ratio, agg.affinity_decoder.layout) == (p, layout), overrides
    segformer, clamp, feature_pyramid, official_other_offsets = cfgs[len(cases) :]
    assert list(segformer.data.clip.offsets) == []  # the data loads the frames the model reads
    assert list(clamp.data.clip.offsets) == [-6, -3] and _aggregator(clamp).offsets == (-6, -3)
    assert feature_pyramid.model.fusion == "feature_pyramid" and _aggregator(feature_pyramid).affinity_decoder is None
    with pytest.raises(ConfigError, match="use model.start=clamp"):
        _aggregator(official_other_offsets)


# -- checkpoint import -----------------------------------------------------------------------------


def _official_checkpoint(
    path: Path, backbone: str, num_classes: int = 7, meta: dict | None = None
) -> tuple[nn.Module, nn.Module]:
    mit = randomize_(build_reference_mit("mit_b0"), seed=1)
    head = randomize_(OfficialMRCFAHead(B0_CHANNELS, num_classes, backbone=backbone), seed=2)
    state = {"backbone." + k: v for k, v in mit.state_dict().items()}  # includes the ImageNet head.*
    state |= {"decode_head." + k: v for k, v in head.state_dict().items()}
    torch.save({"meta": meta or {"iter": 160000}, "state_dict": state}, path)
    return mit, head


@pytest.mark.parametrize("backbone", ["b1", "b0"])
def test_checkpoint_import_round_trip(tmp_path: Path, backbone: str, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "official.pth", tmp_path / "converted.ckpt"
    mit, head = _official_checkpoint(src, backbone)
    p = head.hypercorre_module.threh
    assert convert_main(["--model", "mrcfa", "--src", str(src), "--dst", str(dst), f"stm.p={p}"]) == 0
    printed = capsys.readouterr().out
    assert "decode_head.conv_seg.weight" in printed and "backbone.head.weight" in printed  # dropped and reported
    ckpt = load_checkpoint(dst)  # what `python -m vss.eval ckpt_path=...` reads
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    assert cfg.encoder.name == "mit_b0" and cfg.data.num_classes == 7 and cfg.model.token_ratio == p
    assert cfg.model.sar_layout == ("b1" if backbone == "b1" else "light")
    assert not {"optimizer_states", "lr_schedulers", "epoch", "global_step"} & set(ckpt)  # weights only: init_from=
    module = build_module(cfg, 7, [str(i) for i in range(7)])
    module.load_state_dict(ckpt["state_dict"], strict=True)
    module.eval()
    clip = torch.randn(2, 4, 3, 64, 96, generator=gen(12))  # 2x3 tokens at 1/32 (>= top-5): no top-k ties
    with torch.no_grad():
        expected = head(mit(clip.flatten(0, 1)), 2, 4)
        got = module.segmenter(clip)["logits"]
        single = head(mit(clip[:, -1]), 2, 1)  # the official per-frame fallback (num_clips != 4)
        own = module.segmenter(clip[:, -1:])["logits"]  # T = 1: the target alone (the per-frame branch)
    assert got.shape == expected.shape == (2, 7, 16, 24)
    assert (got - expected).abs().max().item() < 1e-4
    assert (own - single).abs().max().item() < 1e-4


def test_checkpoint_import_of_any_class_count(tmp_path: Path) -> None:
    """The shared vss.convert rule: 19 classes -> data=cityscapes_video (over the preset's VSPW); 150 with
    mmseg 0.x meta names -> the VSPW-layout reader with those names and colours; 7 and no names -> class_i."""
    src, dst = tmp_path / "official.pth", tmp_path / "converted.ckpt"
    cases = {
        19: ({"iter": 1}, "data=cityscapes_video", None),
        150: ({"CLASSES": [f"c {i}" for i in range(150)], "PALETTE": [[i, i, i] for i in range(150)]}, None, None),
        7: ({"iter": 1}, None, [f"class_{i}" for i in range(7)]),
    }
    for num_classes, (meta, data, names) in cases.items():
        _official_checkpoint(src, "b0", num_classes, meta)
        report = convert(src, dst, "mrcfa", ["stm.p=0.5"], verbose=False)
        assert report["overrides"][0] == (data or "experiment=mrcfa_vspw"), num_classes
        cfg = OmegaConf.create(load_checkpoint(dst)["hyper_parameters"]["config"])
        assert cfg.data.num_classes == num_classes and cfg.model._target_.endswith("MRCFA")
        if num_classes == 19:
            assert cfg.data._target_.endswith("CityscapesVideoDataModule") and cfg.data.class_names is None
        elif num_classes == 150:
            assert list(cfg.data.class_names) == meta["CLASSES"] and cfg.data.palette[149] == [149] * 3
        else:
            assert list(cfg.data.class_names) == names and cfg.data.palette is None


def test_checkpoint_import_lists_unknown_and_missing_keys(tmp_path: Path) -> None:
    src, dst = tmp_path / "official.pth", tmp_path / "converted.ckpt"
    _official_checkpoint(src, "b0")
    state = torch.load(src)["state_dict"]
    state["decode_head.hypercorre_module.q9.weight"] = torch.zeros(1)
    del state["decode_head.sr1_feat.bias"]
    torch.save({"state_dict": state}, src)
    with pytest.raises(ConfigError) as info:
        convert(src, dst, verbose=False)
    msg = str(info.value)
    assert "decode_head.hypercorre_module.q9.weight" in msg and "aggregator.value_reduction.bias" in msg
    assert not dst.exists()


def test_official_key_names() -> None:
    table = {
        "linear_fuse.bn.running_var": "decode_head.linear_fuse.bn.running_var",
        "deco1.smalldecoder.1.weight": "aux_classifiers.0.1.weight",
        "deco4.smalldecoder.1.bias": "classifier.1.bias",
        "hypercorre_module.q1.weight": "query_proj.s8.weight",
        "hypercorre_module.k3.bias": "key_proj.s32.bias",
        "sr2.weight": "key_reduction.s8.weight",
        "sr1_feat.bias": "value_reduction.bias",
        "hypercorre_module.hpn.encoder_layer4.3.conv2.weight": "affinity_decoder.refine.s32.3.weight",
        "hypercorre_module.hpn.encoder_layer3to2.1.bias": "affinity_decoder.aggregate.s8.1.bias",
    }
    for official, ours in table.items():
        assert official_head_key(official) == ours
    assert official_head_key("conv_seg.weight") is None


# -- parameter counts (Table 5) ------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["mit_b0", "mit_b1", "mit_b2", "mit_b5"])
def test_parameter_counts_match_table5(encoder: str) -> None:
    with torch.device("meta"):  # counted without allocating (B5 has 82M parameters)
        seg = Segmenter(build_encoder(encoder), partial(SegFormer), 124)
        mrcfa = Segmenter(build_encoder(encoder), partial(MRCFA, encoder_name=encoder), 124)  # official p, layout
    for name, m in (("segformer", seg), ("mrcfa", mrcfa)):
        n = sum(p.numel() for p in m.parameters() if p.requires_grad) / 1e6
        assert abs(n - PAPER_PARAMS[name][encoder]) / PAPER_PARAMS[name][encoder] < 0.02, (name, encoder, n)
