"""STF + MAR specifics: parity with the re-implemented official modules (tests/reference_stf_mar.py), the official
parameter counts, the checkpoint and memory importers, time order, the causal variant and staged freezing.
The contract battery (tests/test_contract.py) covers streaming == clip, gradients and frozen parts generically."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import reference_stf_mar as ref
from conftest import compose_train
from contract import assert_stream_equals_clip
from random_weights import randomize_
from vss.convert import choose_data, class_table
from vss.errors import ConfigError
from vss.models.aggregators.stf_mar import (
    MemoryAugmentedRefinement,
    MemorySampler,
    SpatialTemporalFusion,
    auto_block,
    check_input_size,
    check_train_config,
    collect_memory,
    convert_official_state_dict,
    import_official_checkpoint,
    load_memory,
    load_official_memory,
    official_names,
    save_memory,
)
from vss.models.segmenter import Segmenter
from vss.passes import build_memory, memory_batches

TOL = 1e-4
SMALL = ["model.channels=16", "model.mlp_dim=16", "model.block_size=[4,4]", "model.pe_size=[4,4]"]
# the model battery (tests/battery.py): a dilated ResNet (output stride 8), ISA blocks and positional tables sized
# for the 8x8 features of a 64x64 frame
BATTERY = {
    "stf": {"encoder": "resnet18", "overrides": ["model.block_size=[4,4]", "model.pe_size=[4,4]"]},
    "stf_mar": {"encoder": "resnet18", "overrides": ["model.block_size=[4,4]", "model.pe_size=[4,4]"]},
}


def _official_stf(dim: int, mlp: int, pe: tuple[int, int], block: tuple[int, int], seed: int = 0) -> ref.STF:
    """A reference STF with random weights and well-scaled (not near-zero) positional tables."""
    torch.manual_seed(seed)
    stf = randomize_(ref.STF(dim, 1, 2, mlp, pe, block), seed)
    with torch.no_grad():
        stf.pe_enc.normal_()
        stf.pe_dec.normal_()
    return stf


def _ours(official: torch.nn.Module, attr: str) -> dict[str, torch.Tensor]:
    """An official ``STF`` / ``MAR`` module's tensors (under ``attr.``) through the importer, as keys of our module."""
    converted, _, _, missing, unexpected = convert_official_state_dict(
        {f"{attr}.{k}": v for k, v in official.state_dict().items()}
    )
    assert not unexpected and all(k.startswith(("pspnet.", "STF.")) for k in missing), (unexpected, missing)
    prefix = f"aggregator.{attr.lower()}."
    return {k.removeprefix(prefix): v for k, v in converted.items()}


def _official_stf_output(stf: ref.STF, x: torch.Tensor, target: int) -> torch.Tensor:
    """x (n,T,c,h,w) in time order -> the official STF's output: ``STF(x0, x1, x2)`` for the target at index 1; for
    another target (the causal variant, not an official configuration) the same official encoder and decoder with
    that frame as the query."""
    frames = x.transpose(1, 2)
    if target == 1:
        return stf(*frames.split(1, 2))
    pe_enc, pe_dec = stf.positions(x.shape[0], *x.shape[-2:])
    memory = stf.encoder(frames, pos=pe_enc)
    return stf.decoder(frames[:, :, target : target + 1], memory, pos=pe_enc, query_pos=pe_dec).squeeze(2)


@pytest.mark.parametrize(
    ("dim", "pe", "target"),
    [(32, (32, 32), 1), (32, (16, 24), 1), (32, (40, 24), 2), (512, (32, 32), 1)],
    ids=["C32-same-size-PE", "C32-PE-upsized", "C32-PE-resized-causal-target", "C512"],
)
def test_stf_equals_the_official_module(dim: int, pe: tuple[int, int], target: int) -> None:
    """Same weights (copied through the importer) -> same output within 1e-4, with and without the PE resize."""
    mlp = 256 if dim == 512 else 16
    official = _official_stf(dim, mlp, pe, (16, 16))
    ours = SpatialTemporalFusion(dim, 3, 1, 2, mlp, (16, 16), pe, 0.1, target).eval()
    ours.load_state_dict(_ours(official, "STF"))
    x = torch.randn(2, 3, dim, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _official_stf_output(official, x, target)
        got = ours(x, target)
    assert got.shape == (2, dim, 32, 32)
    err = (got - expected).abs().max().item()
    assert err < TOL, f"max |ours - official| = {err:.3g}"
    assert expected.std() > 0.5  # a real signal, not a near-constant output


def test_stf_groups_matter() -> None:
    """The parity test can fail: the same weights with other ISA groups (8x8 blocks) give another output."""
    official = _official_stf(32, 16, (32, 32), (16, 16))
    ours = SpatialTemporalFusion(32, 3, 1, 2, 16, (16, 16), (32, 32), 0.1, 1).eval()
    ours.load_state_dict(_ours(official, "STF"))
    ours.block_size = (8, 8)  # other groups, same weights
    for layer in [*ours.encoder_layers, *ours.decoder_layers]:
        for attn in [getattr(layer, n) for n in ("attn", "self_attn", "cross_attn") if hasattr(layer, n)]:
            attn.block_size = (8, 8)
    x = torch.randn(1, 3, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(x, 1) - _official_stf_output(official, x, 1)).abs().max().item()
    assert diff > 1e-2


def test_mar_equals_the_official_module() -> None:
    torch.manual_seed(0)
    official = randomize_(ref.MAR(32, 16, 10, 10, 5))  # the official layer width: dim // 2 = 16
    with torch.no_grad():
        official.memory_key.normal_()
        official.memory_value.normal_()
    ours = MemoryAugmentedRefinement(32, 5, 10, 16).eval()
    ours.load_state_dict(_ours(official, "MAR"))
    x = 3 * torch.randn(2, 32, 8, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = official(x), ours(x)
    assert (got - expected).abs().max().item() < TOL
    assert not torch.allclose(got, x, atol=1e-2)


def test_official_parameter_counts_and_names() -> None:
    """STF(512, depth 1, 2 heads, mlp 256, pe (128,256)) and MAR(512, 256, KL=KH=10, 19 classes), on meta: every
    official STF.* / MAR.* tensor of the MAR stage's SegRefine maps onto ours with its shape."""
    with torch.device("meta"):
        stf = SpatialTemporalFusion(512, 3, 1, 2, 256, (16, 16), (128, 256))
        mar = MemoryAugmentedRefinement(512, 19, 10, 256)
        official = ref.SegRefine(19, mar=True).state_dict()
    assert sum(p.numel() for p in stf.parameters()) == 73_943_552
    assert stf.pe_enc.numel() + stf.pe_dec.numel() == 67_108_864
    assert sum(p.numel() for p in mar.parameters()) == 1_967_360
    assert mar.memory_key.numel() + mar.memory_value.numel() == 194_560
    converted, _, dropped, missing, unexpected = convert_official_state_dict(official)
    assert not missing and not unexpected and len(dropped) == 8  # pspnet.auxiliary_head.*
    assert set(official_names(1, mar=True)) == {k for k in official if k.startswith(("STF.", "MAR."))}
    ours = {f"aggregator.stf.{k}": v for k, v in stf.state_dict().items()}
    ours |= {f"aggregator.mar.{k}": v for k, v in mar.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items() if k.startswith(("aggregator.stf.", "aggregator.mar."))}
    assert got == {k: tuple(v.shape) for k, v in ours.items()}


def test_positional_tables_start_like_the_official_weight_init() -> None:
    """xavier-uniform on the 5-D tables: bound sqrt(6 / (C*T*h*w + T*h*w)) (about 3.4e-4 at full size)."""
    stf = SpatialTemporalFusion(32, 3, 1, 2, 16, (16, 16), (16, 16))
    bound = (6 / (32 * 3 * 256 + 3 * 256)) ** 0.5
    assert stf.pe_enc.abs().max() <= bound and stf.pe_enc.abs().max() > 0.9 * bound


def test_memory_file_roundtrip_and_layout(tmp_path) -> None:
    key, proto, count = torch.randn(50, 16), torch.randn(5, 16), torch.arange(5)
    path = tmp_path / "memory.pt"
    save_memory(path, key, proto, count)
    memory = load_memory(path)
    assert torch.equal(memory["key"], key) and torch.equal(memory["prototype"], proto)
    assert torch.equal(memory["count"], count)
    seg = _build("stf_mar", f"model.memory={path}")
    mar = seg.aggregator.mar
    assert torch.equal(mar.memory_key, key)
    for r in range(50):  # value slot r holds the prototype of class r // K (repeat-interleave)
        assert torch.equal(mar.memory_value[r], proto[r // 10])


def test_a_memory_of_other_shapes_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "memory.pt"
    save_memory(path, torch.randn(190, 16), torch.randn(19, 16), torch.zeros(19))
    with pytest.raises(ConfigError, match=r"memory\.pt.*\(190, 16\).*\(50, 16\)"):
        _build("stf_mar", f"model.memory={path}")
    with pytest.raises(ConfigError, match="does not exist"):
        _build("stf_mar", f"model.memory={tmp_path / 'missing.pt'}")


def test_official_memory_files(tmp_path) -> None:
    key = np.random.default_rng(0).standard_normal((190, 32)).astype(np.float32)
    value = np.random.default_rng(1).standard_normal((19, 32)).astype(np.float32)
    np.save(tmp_path / "key.npy", key)
    np.save(tmp_path / "value.npy", value)
    memory = load_official_memory(tmp_path / "key.npy", tmp_path / "value.npy")
    assert torch.equal(memory["key"], torch.from_numpy(key)) and torch.equal(
        memory["prototype"], torch.from_numpy(value)
    )
    assert memory["count"].shape == (19,)
    from vss.passes import main

    assert (
        main(
            [
                "--key",
                str(tmp_path / "key.npy"),
                "--value",
                str(tmp_path / "value.npy"),
                "--out",
                str(tmp_path / "m.pt"),
            ]
        )
        == 0
    )
    assert torch.equal(load_memory(tmp_path / "m.pt")["key"], memory["key"])
    np.save(tmp_path / "value.npy", value[:18])
    with pytest.raises(ConfigError, match="value.npy"):
        load_official_memory(tmp_path / "key.npy", tmp_path / "value.npy")


def _build(model: str, *extra: str, freeze: tuple[str, ...] = (), encoder: str = "resnet18") -> Segmenter:
    cfg = compose_train([f"model={model}", f"encoder={encoder}", *SMALL, *extra])
    torch.manual_seed(0)
    return Segmenter(instantiate(cfg.encoder), instantiate(cfg.model), 5, freeze=freeze)


def test_frames_are_stacked_in_time_order() -> None:
    """offsets [-1,1] and [1,-1] read the same clip: references in offsets order, STF input in time order."""
    a = randomize_(_build("stf"))
    b = _build("stf", "model.offsets=[1,-1]").eval()
    b.load_state_dict(a.state_dict())
    video = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fa = [a.encode(video[i : i + 1]) for i in range(3)]
        out_a = a.aggregate(fa[1], [fa[0], fa[2]])
        out_b = b.aggregate(fa[1], [fa[2], fa[0]])
        stacked = torch.stack([f["feature"] for f in fa], 1)
        direct = a.aggregator.stf(stacked, 1)
    torch.testing.assert_close(out_a["logits"], out_b["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_a["features"], direct, atol=1e-5, rtol=1e-5)


def test_features_are_returned_at_inference() -> None:
    seg = randomize_(_build("stf_mar")).eval()
    with torch.no_grad():
        out = seg(torch.randn(1, 3, 3, 64, 64))
    assert set(out) == {"logits", "features"} and out["features"].shape == (1, 16, 8, 8)
    assert out["logits"].shape == (1, 5, 8, 8)


def test_the_causal_variant_streams_like_its_clips() -> None:
    seg = randomize_(_build("stf", "model.offsets=[-2,-1]")).eval()
    assert seg.lookahead == 0 and seg.aggregator.target_index == 2
    video = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    assert_stream_equals_clip(seg, video, (1, 4), "stf [-2,-1]")


def test_a_target_alone_reads_its_own_positional_slice() -> None:
    seg = randomize_(_build("stf", "model.offsets=[-2,-1]")).eval()
    stf = seg.aggregator.stf
    with torch.no_grad():
        stf.pe_enc.normal_()
    alone = SpatialTemporalFusion(16, 1, 1, 2, 16, (4, 4), (4, 4)).eval()
    state = stf.state_dict()
    state["pe_enc"] = stf.pe_enc[:, :, 2:3]
    alone.load_state_dict(state)
    with torch.no_grad():
        target = seg.encode(torch.randn(1, 3, 64, 64))
        got = seg.aggregate(target, [])["features"]
        expected = alone(target["feature"].unsqueeze(1), 0)
    torch.testing.assert_close(got, expected)


def test_stage_two_freezes_the_base_and_stf() -> None:
    """freeze=[encoder, psp_modules, bottleneck, stf]: only MAR and conv_seg train; BN statistics stay."""
    freeze = ("encoder", "aggregator.decode_head.psp_modules", "aggregator.decode_head.bottleneck", "aggregator.stf")
    seg = randomize_(_build("stf_mar", freeze=freeze)).train()
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    clip = torch.randn(2, 3, 3, 64, 64)
    labels = torch.randint(0, 5, (2, 3, 64, 64))
    sum(seg.losses(seg(clip), labels).values()).backward()
    trained = {n for n, p in seg.named_parameters() if p.grad is not None}
    assert trained == {
        n for n, _ in seg.named_parameters() if n.startswith(("aggregator.mar.", "aggregator.decode_head.conv_seg."))
    }
    changed = [k for k, v in seg.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, changed
    assert not seg.aggregator.stf.training and seg.aggregator.mar.training


def test_input_size_checks() -> None:
    check_input_size(768, 1536)
    check_input_size(1024, 2048)
    with pytest.raises(ConfigError, match="multiple of 128x128"):
        check_input_size(769, 769, key="data.crop_size")
    check_train_config(
        OmegaConf.create({"model": {"block_size": [16, 16]}, "data": {"crop_size": [768, 768], "size_divisor": 128}})
    )
    with pytest.raises(ConfigError, match="data.size_divisor=32"):
        check_train_config(
            OmegaConf.create({"model": {"block_size": [16, 16]}, "data": {"crop_size": [768, 768], "size_divisor": 32}})
        )
    with pytest.raises(ConfigError, match="data.crop_size"):
        check_train_config(OmegaConf.create({"model": {"block_size": [16, 16]}, "data": {"crop_size": [769, 769]}}))


def test_training_mar_from_a_random_memory_warns_and_building_does_not(recwarn) -> None:
    """The memory may come from a checkpoint (vss.eval, vss.convert, init_from): only training without one warns."""
    cfg = {"model": {"mar": True, "memory": None, "block_size": "auto"}, "init_from": None}
    with pytest.warns(UserWarning, match="model.mar=true without model.memory"):
        check_train_config(OmegaConf.create(cfg))
    check_train_config(OmegaConf.create(cfg | {"init_from": "stf_mar.ckpt"}))
    check_train_config(OmegaConf.create({**cfg, "model": {**cfg["model"], "memory": "memory.pt"}}))
    _build("stf_mar")
    assert not [w for w in recwarn if "memory" in str(w.message)]


def test_auto_block_is_the_official_block_where_it_fits() -> None:
    assert auto_block(128, 256) == (16, 16) and auto_block(96, 192) == (16, 16)  # 1024x2048, 768x1536
    assert auto_block(8, 8) == (8, 8) and auto_block(60, 108) == (15, 12) and auto_block(13, 32) == (13, 16)
    check_train_config(OmegaConf.create({"model": {"block_size": "auto"}, "data": {"crop_size": [64, 64]}}))
    seg = _build("stf", "model.block_size=auto").eval()
    with torch.no_grad():
        auto = seg(torch.randn(1, 3, 3, 64, 64, generator=torch.Generator().manual_seed(0)))["logits"]
        seg.aggregator.stf.block_size = (8, 8)  # what auto picks on 8x8 features
        explicit = seg(torch.randn(1, 3, 3, 64, 64, generator=torch.Generator().manual_seed(0)))["logits"]
    assert torch.equal(auto, explicit)


def test_the_training_cli_checks_the_block_against_the_crop_before_building(tmp_path) -> None:
    import subprocess
    import sys

    args = ["model=stf", "encoder=resnet50c", "model.block_size=[16,16]", f"paths.log_dir={tmp_path}"]
    done = subprocess.run([sys.executable, "-m", "vss.train", *args], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert lines[-1].startswith(
        "error: data.crop_size=[64, 64] is invalid for STF: the input must be a multiple of 128x128"
    ), lines[-3:]
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_feature_map_not_divisible_by_the_block_is_a_config_error() -> None:
    seg = _build("stf", "model.block_size=[16,16]").eval()
    with torch.no_grad(), pytest.raises(ConfigError, match="block_size"):
        seg(torch.randn(1, 3, 3, 64, 64))  # 8x8 features


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (("model.mar=yes",), "mar"),
        (("model.channels=30", "model.num_heads=4"), "num_heads"),
        (("model.block_size=[4]",), "block_size"),
        (("model.pe_size=[0,4]",), "pe_size"),
        (("model.keys_per_class=0",), "keys_per_class"),
        (("model.memory=x.pt",), "memory"),  # model=stf: no MAR
        (("model.offsets=[]",), "offsets"),
    ],
)
def test_bad_values(extra: tuple[str, ...], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        _build("stf", *extra)


def test_a_mit_encoder_is_refused() -> None:
    with torch.device("meta"), pytest.raises(ConfigError, match="dilated ResNet"):
        _build("stf", encoder="mit_b0")


# -- official checkpoints (python -m vss.convert --model stf / stf_mar) -------------------------------------
#: A small official SegRefine: the official module tree (ResNetV1c-50, PSPHead, FCNHead, STF, MAR) at narrow widths.
TINY = {"channels": 32, "mlp_dim": 16, "pe_dim": (6, 10), "block_size": (8, 8), "aux_channels": 8}


def _segrefine(mar: bool, seed: int = 0, device: str = "cpu", **sizes: Any) -> ref.SegRefine:
    """The official network of the STF (``mar=False``) or MAR stage, random weights, tables and memory ~N(0, 1)."""
    with torch.device(device):
        net = ref.SegRefine(19, mar=mar, **(TINY | sizes))
    if device == "meta":
        return net
    randomize_(net, seed)
    with torch.no_grad():
        for p in (net.STF.pe_enc, net.STF.pe_dec, *((net.MAR.memory_key, net.MAR.memory_value) if mar else ())):
            p.normal_()
    return net


@pytest.mark.parametrize(("mar", "prefix"), [(False, ""), (True, "module.")], ids=["stf", "stf_mar-module."])
def test_an_official_checkpoint_converts_and_gives_the_official_logits(tmp_path, mar: bool, prefix: str) -> None:
    """What STF/python/train.py saves (``net.module.state_dict()``; ``module.`` as a wrapped net would save it)
    -> ``python -m vss.convert`` -> the checkpoint vss.eval reads -> the official network's logits (1/8)."""
    from vss.convert import main as convert_main
    from vss.eval import load_checkpoint
    from vss.lit import build_module

    official = _segrefine(mar)
    src, dst = tmp_path / "best.pth", tmp_path / "converted.ckpt"
    torch.save({prefix + k: v for k, v in official.state_dict().items()}, src)
    model = "stf_mar" if mar else "stf"
    assert convert_main(["--model", model, "--src", str(src), "--dst", str(dst), "model.block_size=[8,8]"]) == 0
    ckpt = load_checkpoint(dst)
    report = ckpt["vss_converted_from"]
    assert report["dropped"] == sorted(k for k in official.state_dict() if k.startswith("pspnet.auxiliary_head."))
    assert {f"model={model}", "data.num_classes=19", "model.channels=32", "model.pe_size=[6,10]"} <= set(
        report["overrides"]
    )
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    module = build_module(cfg, 19, [str(i) for i in range(19)])
    module.load_state_dict(ckpt["state_dict"], strict=True)
    frames = [torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]  # t-1, t, t+1
    clip = torch.stack([frames[0], frames[2], frames[1]], 1)  # vss: the references in offsets order, target last
    with torch.no_grad():
        expected = official.logits(frames)
        got = module.segmenter.eval()(clip)["logits"]
    assert got.shape == expected.shape == (1, 19, 8, 8)
    err = (got - expected).abs().max().item()
    assert err < TOL, f"max |vss - official| = {err:.3g}"
    assert expected.std() > 0.3 and torch.equal(got.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("mar", [False, True], ids=["stf", "stf_mar"])
def test_the_module_prefix_imports_the_same_tensors(mar: bool) -> None:
    state = _segrefine(mar, device="meta").state_dict()
    plain = import_official_checkpoint(state)
    wrapped = import_official_checkpoint({f"module.{k}": v for k, v in state.items()})
    assert plain.overrides == wrapped.overrides and plain.overrides[0] == f"model={'stf_mar' if mar else 'stf'}"
    assert {k: v.shape for k, v in plain.state_dict.items()} == {k: v.shape for k, v in wrapped.state_dict.items()}
    assert plain.origin == wrapped.origin and plain.dropped == wrapped.dropped  # each tensor from the same name


def test_the_official_memory_shapes_and_sizes_are_read_from_the_file() -> None:
    """MAR's (1, K*num_class, C) memory imports as (K*num_class, C); K, widths and the table grid become overrides."""
    state = _segrefine(True, device="meta").state_dict()
    result = import_official_checkpoint(state)
    assert result.overrides == [
        "model=stf_mar",
        "encoder=resnet50c",
        "data.num_classes=19",
        "model.channels=32",
        "model.pe_size=[6,10]",
        "model.depth=1",
        "model.mlp_dim=16",
        "model.keys_per_class=10",
    ]
    assert result.defaults == []  # vss.convert picks the data set from the class count:
    assert choose_data(result.overrides, [], 19, class_table({}, 19)).overrides == ["data=cityscapes_video"]
    assert result.state_dict["aggregator.mar.memory_key"].shape == (190, 32)
    assert result.origin["aggregator.mar.proj.weight"] == "MAR.HEdecoder.attn.to_out.0.weight"
    assert result.origin["aggregator.stf.decoder_layers.0.cross_attn.long_range.in_proj_weight"] == (
        "STF.decoder.layers.0.multihead_attn.self_attn_long.in_proj_weight"
    )
    assert result.origin["encoder.body.conv1.0.weight"] == "pspnet.backbone.stem.0.weight"


def test_a_file_of_another_layout_names_the_missing_and_unexpected_keys(tmp_path, capsys) -> None:
    from vss.convert import main as convert_main

    state = _segrefine(True, device="meta").state_dict()
    n_stf = sum(k.startswith("STF.") for k in state)
    n_mar = sum(k.startswith("MAR.") for k in state)
    # the names this suite used to guess (lower-case stf.* / mar.*): every STF key missing, all of them unexpected
    guessed = {k.replace("STF.", "stf.", 1).replace("MAR.", "mar.", 1): v for k, v in state.items()}
    with pytest.raises(ConfigError) as info:
        import_official_checkpoint(guessed)
    msg = str(info.value)
    assert f"{n_stf} expected keys missing (STF.pe_enc, STF.pe_dec, " in msg
    assert f"{n_stf + n_mar} unexpected keys found (stf.pe_enc, stf.pe_dec, " in msg
    assert "more)" in msg and "\n" not in msg
    # one key renamed: exactly that one missing and its new name unexpected, through the command line
    real = _segrefine(True)
    broken = dict(real.state_dict())
    broken["STF.decoder.layers.0.multihead_attn.long.in_proj_weight"] = broken.pop(
        "STF.decoder.layers.0.multihead_attn.self_attn_long.in_proj_weight"
    )
    src = tmp_path / "broken.pth"
    torch.save(broken, src)
    assert convert_main(["--model", "stf_mar", "--src", str(src), "--dst", str(tmp_path / "x.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {src}: not an official ST_Memory checkpoint (the state_dict of SegRefine: pspnet.*, STF.*, MAR.* "
        "in the MAR stage): 1 expected keys missing (STF.decoder.layers.0.multihead_attn.self_attn_long."
        "in_proj_weight); 1 unexpected keys found (STF.decoder.layers.0.multihead_attn.long.in_proj_weight)"
    )
    assert not (tmp_path / "x.ckpt").exists()
    # an mmseg PSPNet file: the STF keys are missing and the hint names the right importer
    psp = {k.removeprefix("pspnet."): v for k, v in state.items() if k.startswith("pspnet.")}
    with pytest.raises(ConfigError, match=r"STF\.pe_enc.*unexpected keys found \(backbone\.stem\..*--model pspnet$"):
        import_official_checkpoint(psp)


def test_a_mar_the_model_cannot_build_is_a_config_error() -> None:
    """vss builds MAR with model.mlp_dim (official: 512 // 2 = STF's 256) and as many keys as values per class."""
    with pytest.raises(ConfigError, match=r"MAR's width 16 .* differs from STF's 8"):
        import_official_checkpoint(_segrefine(True, device="meta", mlp_dim=8).state_dict())
    state = dict(_segrefine(True, device="meta").state_dict())
    state["MAR.memory_value"] = torch.empty(1, 95, 32, device="meta")
    with pytest.raises(ConfigError, match="190 slots and MAR.memory_value 95 for 19 classes"):
        import_official_checkpoint(state)


# -- the memory pass ---------------------------------------------------------------------------------------
def test_memory_sampler_keeps_the_lowest_as_keys_and_averages_the_highest() -> None:
    sampler = MemorySampler(num_classes=3, dim=2, keys_per_class=2, values_per_class=2)
    feats = torch.tensor([[1.0, 0], [2, 0], [3, 0], [4, 0], [5, 0], [6, 0], [0, 7]])
    scores = torch.tensor([0.9, 0.5, 0.7, 0.5, 0.99, 0.95, 0.6])
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1])
    uids = torch.tensor([10, 11, 12, 3, 14, 15, 16])
    sampler.update(feats[:3], scores[:3], labels[:3], uids[:3])
    sampler.update(feats[3:], scores[3:], labels[3:], uids[3:])
    memory, notes = sampler.memory()
    # class 0: lowest scores 0.5 (uid 3: feature 4, then uid 11: feature 2); highest 0.99 and 0.95 (5 and 6)
    assert memory["key"][:2, 0].tolist() == [4.0, 2.0]
    assert memory["prototype"][0].tolist() == [5.5, 0.0]
    # class 1: one pixel, tiled over its 2 key slots and alone in its prototype; class 2: none, zero slots
    assert memory["key"][2:4].tolist() == [[0.0, 7.0], [0.0, 7.0]] and memory["prototype"][1].tolist() == [0, 7]
    assert memory["key"][4:].abs().sum() == 0 and memory["count"].tolist() == [6, 1, 0]
    assert notes == [
        "class 1: 1 correct pixel(s) < 2 keys; its keys are tiled",
        "class 2: no correctly predicted pixel; its 2 key slots and prototype are 0",
    ]


def test_memory_sampler_shards_merge_to_one_pass() -> None:
    g = torch.Generator().manual_seed(0)
    n = 600
    feats, labels = torch.randn(n, 4, generator=g), torch.randint(0, 4, (n,), generator=g)
    scores = torch.randint(0, 5, (n,), generator=g).float() / 4  # many ties: the pixel ids decide
    uids = torch.randperm(n, generator=g)

    def run(parts: list[torch.Tensor]) -> MemorySampler:
        sampler = MemorySampler(4, 4, 3, 5)
        for idx in parts:
            sampler.update(feats[idx], scores[idx], labels[idx], uids[idx])
        return sampler

    one = run([torch.arange(n)])
    perm = torch.randperm(n, generator=g)
    a, b = run(list(perm[:250].split(7))), run(list(perm[250:].split(50)))
    a.merge(b)
    for key in ("key", "prototype", "count"):
        assert torch.equal(a.memory()[0][key], one.memory()[0][key]), key
    for c in range(4):  # the keys are the lowest-score correct pixels, ties by id
        rows = torch.nonzero(labels == c)[:, 0]
        order = sorted(rows.tolist(), key=lambda i: (scores[i].item(), uids[i].item()))[:3]
        assert torch.equal(one.memory()[0]["key"][3 * c : 3 * c + 3], feats[order])


@pytest.fixture(scope="module")
def stf_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir) -> str:
    """A vss checkpoint of a small model=stf (random weights: about 1 pixel in 5 is correct) on the tiny synthetic
    set, its config stored as vss.train stores it."""
    from conftest import TINY_DATA
    from vss.lit import build_module

    out = tmp_path_factory.mktemp("stf-ckpt")
    cfg = compose_train(["model=stf", "encoder=resnet18", *SMALL, *TINY_DATA, f"paths.data_dir={tiny_data_dir}"])
    del cfg.hydra
    cfg.paths.output_dir = str(out)
    module = build_module(cfg, 5, None)
    torch.manual_seed(0)
    randomize_(module.segmenter, 1)
    path = out / "stf.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}, path)
    return str(path)


def test_memory_pass_counts_the_correct_pixels_and_shards_merge(stf_checkpoint: str, tmp_path) -> None:
    import json

    from vss.eval import load_checkpoint
    from vss.lit import build_module

    path = build_memory(stf_checkpoint, str(tmp_path), progress=False)
    memory = load_memory(path)
    report = json.loads((tmp_path / "memory.json").read_text())
    assert memory["key"].shape == (5 * 10, 16) and memory["prototype"].shape == (5, 16)
    # independently: the clip path's argmax at 1/8 against the labels downsampled to 1/8
    ckpt = load_checkpoint(stf_checkpoint)
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    dm = instantiate(cfg.data)
    module = build_module(cfg, dm.num_classes, dm.class_names)
    module.load_state_dict(ckpt["state_dict"])
    seg = module.segmenter.eval()
    dm.setup("fit")
    dm.use_clip_path(seg.references, 1 + len(seg.offsets))
    dataset = dm.eval_dataset(dm.splits["fit"])
    counts = torch.zeros(5, dtype=torch.long)
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            logits = seg.clip_logits(item["images"][None], [item["num_references"]])
            labels = torch.nn.functional.interpolate(item["labels"][None, None].float(), logits.shape[-2:])[0, 0]
            hit = logits.argmax(1)[0] == labels.long()
            counts += torch.bincount(labels.long()[hit], minlength=5)[:5]
    assert counts.sum() > 0
    assert memory["count"].tolist() == counts.tolist() == list(report["correct_pixels"].values())
    assert report["split"] == dm.splits["fit"] and report["clips"] == len(dataset)
    # two DDP ranks' whole videos, merged, equal the one pass
    from vss.data.datasets import VideoShardSampler

    shards = []
    for rank in range(2):
        sampler = MemorySampler(5, 16, 10, 10)
        collect_memory(seg, memory_batches(dataset, VideoShardSampler(dataset, 2, rank).indices), sampler)
        shards.append(sampler)
    shards[0].merge(shards[1])
    merged = shards[0].memory()[0]
    assert all(torch.equal(merged[k], memory[k]) for k in ("key", "prototype", "count"))


def test_memory_pass_refuses_a_model_without_stf(tmp_path) -> None:
    from vss.passes import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])  # neither --ckpt nor --key/--value
    assert main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path)]) == 2


def _memory_rank(rank: int, world: int, port: int, checkpoint: str, out: str) -> None:
    """One DDP rank (gloo) of the memory pass."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # as the in-process pass (conftest): the same rounding, the same bits
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        build_memory(checkpoint, out, progress=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 2 DDP processes; the shard merge is checked in one process in the default run
def test_memory_pass_under_ddp_equals_one_process(stf_checkpoint: str, tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_memory_rank, args=(2, port, stf_checkpoint, str(tmp_path / "ddp")), nprocs=2, join=True)
    one = load_memory(build_memory(stf_checkpoint, str(tmp_path / "one"), progress=False))
    ddp = load_memory(tmp_path / "ddp" / "memory.pt")
    assert all(torch.equal(ddp[k], one[k]) for k in ("key", "prototype", "count"))


def test_mar_runs_under_the_flop_counter() -> None:
    """vss.bench counts FLOPs with FlopCounterMode (torch's module tracker) under inference mode: MAR's memory,
    a Parameter, must not be a module input there (torch raised AttributeError on it)."""
    from torch.utils.flop_counter import FlopCounterMode

    mar = MemoryAugmentedRefinement(16, 5, 2, 8).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        mar(torch.randn(1, 16, 4, 4))
    assert counter.get_total_flops() > 0
