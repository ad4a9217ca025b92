"""MRCFA: STM, affinity-decoder ablations, loss, streaming, start rule, checkpoint import, parameter counts."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import Tensor, nn

from random_weights import randomize_
from reference_mit import build_reference_mit
from reference_mrcfa import OfficialMRCFAHead
from vss.config import CONF_DIR, ConfigError, register_resolvers
from vss.convert import convert, official_head_key
from vss.convert import main as convert_main
from vss.data.clips import ClipSampler, validate_offsets
from vss.eval import load_checkpoint
from vss.models.aggregators.mrcfa import MRCFA, SCALES, SelectiveTokenMasking
from vss.models.aggregators.segformer import SegFormer
from vss.models.encoders import Encoder, build_encoder
from vss.models.segmenter import Segmenter
from vss.train import build_module

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
        lambda mod, args, out: seen.append(args[0]["s32"].shape[0])
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
    assert seen == [3 * 4, 3 * 8, 3 * 16]  # B * R * S affinity maps, S = int(p * 16)


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
    dict(num_references=2),
]


@pytest.mark.parametrize("kwargs", ABLATIONS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_ablations_build_and_train_a_step(kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    refs = kwargs.get("num_references", 3)
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
    agg = MRCFA([8, 8, 8, 8], num_classes=2, embed_dim=8, num_references=1)
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


# -- streaming and per-frame features ----------------------------------------------------------------


def test_streaming_equals_clip_forward() -> None:
    model = mrcfa_model(encoder="mit_b0", sar_layout="b1")  # the real encoder: no coupling within its batch
    video = torch.randn(1, 11, 3, 64, 96, generator=gen(8))
    with torch.no_grad():
        cache = {t: model.encode(video[:, t]) for t in range(11)}  # every frame encoded once
        for t in (9, 10):
            clip = video[:, [t - 9, t - 6, t - 3, t]]
            whole = model(clip)["logits"]
            streamed = model.aggregate(cache[t], [cache[t - 9], cache[t - 6], cache[t - 3]])["logits"]
            torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-5)
    assert whole.shape == (1, 5, 16, 24)


def test_per_frame_features_depend_on_own_frame_only(model: Segmenter) -> None:
    frames = torch.randn(3, 3, 64, 64, generator=gen(9))
    with torch.no_grad():
        batched = model.encode(frames)
        alone = model.encode(frames[1:2])
    assert set(batched) == {"logits", "feat8", "value", *(f"{a}_{s}" for a in ("query", "key") for s in SCALES)}
    for k, v in batched.items():
        torch.testing.assert_close(v[1:2], alone[k], atol=1e-5, rtol=1e-5)


def test_single_frame_samples_use_the_per_frame_logits(model: Segmenter) -> None:
    clip = torch.randn(3, 4, 3, 64, 64, generator=gen(11))
    flags = torch.tensor([True, False, True])
    with torch.no_grad():
        mixed = model(clip, single_frame=flags)["logits"]
        temporal = model(clip)["logits"]
        own = model.encode(clip[:, -1])["logits"]
        pred = model.predict(clip, (64, 64), flags)
    torch.testing.assert_close(mixed[flags], own[flags])
    torch.testing.assert_close(mixed[~flags], temporal[~flags])
    assert pred.shape == (3, 64, 64)
    assert model.aggregate(model.encode(clip[:, -1]), [])["logits"].shape == own.shape  # no references yet


# -- start-of-video rule ---------------------------------------------------------------------------


def test_start_rule_gives_the_official_clips() -> None:
    s = ClipSampler(start_rule="mrcfa")
    official = {3: [0, 1, 2, 3], 4: [0, 2, 3, 4], 5: [0, 2, 4, 5], 6: [0, 2, 4, 6], 7: [0, 3, 5, 7], 8: [0, 3, 6, 8]}
    for t in range(20):
        clip = s.eval_indices(20, t)
        assert s.single_frame(t) == (t < 3)
        assert clip[-1] == t
        if t in official:
            assert clip == official[t]
        elif t >= 9:
            assert clip == [t - 9, t - 6, t - 3, t]
    assert not any(ClipSampler().single_frame(t) for t in range(5))  # clamp: no single-frame targets
    assert ClipSampler().eval_indices(20, 4) == [0, 0, 1, 4]
    with pytest.raises(ValueError, match="data.clip.start_rule"):
        ClipSampler((-6, -3), start_rule="mrcfa")
    with pytest.raises(ValueError, match="data.clip.start_rule"):
        validate_offsets([-9, -6, -3], "first")


# -- configs ---------------------------------------------------------------------------------------


def _compose(*overrides: str) -> Any:
    return _compose_many([list(overrides)])[0]


def _compose_many(overrides: list[list[str]]) -> list[Any]:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return [compose("train", overrides=o) for o in overrides]


def test_config_stm_p_is_top_level_and_defaults_follow_the_encoder() -> None:
    defaults = (("mit_b0", 0.8, "light"), ("mit_b1", 0.5, "b1"), ("mit_b2", 0.5, "light"))
    cfgs = _compose_many(
        [
            ["model=mrcfa", "encoder=mit_b1", "stm.p=0.3"],
            ["model=mrcfa", "encoder=mit_b1", "model.sar_layout=light"],
            ["model=segformer"],
            ["model=mrcfa", "data.clip.offsets=[-6,-3]", "data.clip.start_rule=clamp"],
            ["model=feature_pyramid"],
            *(["model=mrcfa", f"encoder={e}"] for e, _, _ in defaults),
        ]
    )
    cfg = cfgs[0]
    assert cfg.model.token_ratio == 0.3 and cfg.model.sar_layout == "b1" and cfg.data.clip.start_rule == "mrcfa"
    assert cfgs[1].model.sar_layout == "light"
    assert cfgs[2].data.clip.start_rule == "clamp"
    assert cfgs[3].model.num_references == 2
    assert cfgs[4].model.fusion == "feature_pyramid"
    for cfg, (_, p, layout) in zip(cfgs[5:], defaults, strict=True):
        assert (cfg.stm.p, cfg.model.token_ratio, cfg.model.sar_layout) == (p, p, layout)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "experiment").glob("mrcfa_*.yaml")))
def test_mrcfa_experiment_presets_compose_and_build(name: str) -> None:
    cfg = _compose(f"experiment={name}", "data.root=/nonexistent", "paths.output_dir=unused")
    assert cfg.model._target_.endswith("MRCFA")
    resolved = OmegaConf.to_container(cfg.model, resolve=True)
    assert 0 < resolved["token_ratio"] <= 1
    with torch.device("meta"):
        build_module(cfg, int(cfg.data.num_classes), [str(i) for i in range(int(cfg.data.num_classes))])
    offsets = list(cfg.data.clip.offsets)
    validate_offsets(offsets, cfg.data.clip.start_rule)


# -- checkpoint import -----------------------------------------------------------------------------


def _official_checkpoint(path: Path, backbone: str, num_classes: int = 7) -> tuple[nn.Module, nn.Module]:
    mit = randomize_(build_reference_mit("mit_b0"), seed=1)
    head = randomize_(OfficialMRCFAHead(B0_CHANNELS, num_classes, backbone=backbone), seed=2)
    state = {"backbone." + k: v for k, v in mit.state_dict().items()}  # includes the ImageNet head.*
    state |= {"decode_head." + k: v for k, v in head.state_dict().items()}
    torch.save({"meta": {"iter": 160000}, "state_dict": state}, path)
    return mit, head


@pytest.mark.parametrize("backbone", ["b1", "b0"])
def test_checkpoint_import_round_trip(tmp_path: Path, backbone: str, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "official.pth", tmp_path / "converted.ckpt"
    mit, head = _official_checkpoint(src, backbone)
    p = head.hypercorre_module.threh
    assert convert_main(["--src", str(src), "--dst", str(dst), "--token-ratio", str(p)]) == 0
    printed = capsys.readouterr().out
    assert "decode_head.conv_seg.weight" in printed and "backbone.head.weight" in printed  # dropped and reported
    ckpt = load_checkpoint(dst)  # what `python -m vss.eval ckpt_path=...` reads
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    assert cfg.encoder.name == "mit_b0" and cfg.data.num_classes == 7 and cfg.model.token_ratio == p
    assert cfg.model.sar_layout == ("b1" if backbone == "b1" else "light")
    assert {"optimizer_states", "lr_schedulers"} <= set(ckpt)  # `vss.train ckpt_path=` can start from it
    module = build_module(cfg, 7, [str(i) for i in range(7)])
    module.load_state_dict(ckpt["state_dict"], strict=True)
    module.eval()
    clip = torch.randn(2, 4, 3, 64, 96, generator=gen(12))  # 2x3 tokens at 1/32 (>= top-5): no top-k ties
    with torch.no_grad():
        expected = head(mit(clip.flatten(0, 1)), 2, 4)
        got = module.segmenter(clip)["logits"]
        single = head(mit(clip[:, -1]), 2, 1)  # the official per-frame fallback (num_clips != 4)
        own = module.segmenter(clip, single_frame=torch.tensor([True, True]))["logits"]
    assert got.shape == expected.shape == (2, 7, 16, 24)
    assert (got - expected).abs().max().item() < 1e-4
    assert (own - single).abs().max().item() < 1e-4


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
    cfg = _compose("model=mrcfa", f"encoder={encoder}")
    layout = cfg.model.sar_layout
    with torch.device("meta"):  # counted without allocating (B5 has 82M parameters)
        seg = Segmenter(build_encoder(encoder), partial(SegFormer), 124)
        mrcfa = Segmenter(build_encoder(encoder), partial(MRCFA, sar_layout=layout), 124)
    for name, m in (("segformer", seg), ("mrcfa", mrcfa)):
        n = sum(p.numel() for p in m.parameters() if p.requires_grad) / 1e6
        assert abs(n - PAPER_PARAMS[name][encoder]) / PAPER_PARAMS[name][encoder] < 0.02, (name, encoder, n)
