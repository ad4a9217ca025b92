"""optim.paramwise: mmcv 1.3's custom_keys matching, the presets' rules against the official ones, config errors.

The official groups are computed the way mmcv 1.3.0's ``DefaultOptimizerConstructor.add_params``
(``mmcv/runner/optimizer/default_constructor.py``) computes them: recursively over the official module tree,
keys sorted by length (longest first) after an alphabetical sort, the first key that is a substring of
``f"{prefix}.{name}"`` decides. The official modules are the test oracles with the official attribute names
(reference_mit.py, reference_mrcfa.py); official names reach vss names through the checkpoint importer's tables.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from reference_mit import build_reference_mit
from reference_mrcfa import MLP, ConvModule, OfficialMRCFAHead
from vss.cli import check_command_line
from vss.errors import ConfigError
from vss.lit import VSSModule
from vss.models.aggregators.mrcfa import DROPPED_HEAD, official_head_key
from vss.models.aggregators.segformer import SegFormer
from vss.models.encoders import build_encoder, convert_mit_checkpoint
from vss.models.segmenter import Segmenter
from vss.optim import key_order, multipliers, norm_layers, param_groups
from vss.validation import validate_train_config

# The official optimizer of both configs (SegFormer local_configs/segformer/B1/segformer.b1.1024x1024.city.160k.py,
# VSS-MRCFA local_configs/mrcfa/B1/mrcfa.b1.480x480.vspw2_hypercorr.160k.py), as written there.
OFFICIAL_LR, OFFICIAL_WD = 6e-5, 0.01
OFFICIAL_CUSTOM_KEYS = {"pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0}, "head": {"lr_mult": 10.0}}


def mmcv_add_params(module: nn.Module, custom_keys: dict, base_lr: float, base_wd: float, prefix: str = "") -> dict:
    """mmcv 1.3.0 ``add_params`` with ``paramwise_cfg=dict(custom_keys=...)`` only: name -> (lr, weight decay).

    Without bias_lr_mult, norm_decay_mult, ... in paramwise_cfg, every multiplier of the non-custom branch is 1.
    """
    sorted_keys = sorted(sorted(custom_keys.keys()), key=len, reverse=True)
    out = {}
    for name, _ in module.named_parameters(recurse=False):
        lr, wd = base_lr, base_wd
        for key in sorted_keys:
            if key in f"{prefix}.{name}":
                lr = base_lr * custom_keys[key].get("lr_mult", 1.0)
                wd = base_wd * custom_keys[key].get("decay_mult", 1.0)
                break
        out[f"{prefix}.{name}" if prefix else name] = (lr, wd)
    for child_name, child in module.named_children():
        child_prefix = f"{prefix}.{child_name}" if prefix else child_name
        out |= mmcv_add_params(child, custom_keys, base_lr, base_wd, child_prefix)
    return out


class OfficialSegFormerHead(nn.Module):
    """NVlabs/SegFormer ``SegFormerHead`` (mmseg BaseDecodeHead: conv_seg, dropout) with its attribute names."""

    def __init__(self, in_channels: list[int], num_classes: int, embed_dim: int = 256, channels: int = 128) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)  # BaseDecodeHead; SegFormerHead never calls it
        self.dropout = nn.Dropout2d(0.1)
        self.linear_c4 = MLP(in_channels[3], embed_dim)
        self.linear_c3 = MLP(in_channels[2], embed_dim)
        self.linear_c2 = MLP(in_channels[1], embed_dim)
        self.linear_c1 = MLP(in_channels[0], embed_dim)
        self.linear_fuse = ConvModule(4 * embed_dim, embed_dim)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)


def official_model(head: nn.Module, variant: str = "mit_b1") -> nn.Module:
    """mmseg's EncoderDecoder(_clips): ``backbone`` (the official MiT) + ``decode_head``, no auxiliary head."""
    model = nn.Module()
    model.backbone = build_reference_mit(variant)
    del model.backbone.head  # mix_transformer.py builds no classifier (its `self.head = ...` is commented out)
    model.decode_head = head
    return model


def official_to_vss(name: str, head_key: Callable[[str], str | None]) -> str | None:
    """The vss parameter name of an official one (the importers' renaming), None for a dropped parameter."""
    part, _, rest = name.partition(".")
    if part == "backbone":
        (timm_name,) = convert_mit_checkpoint({rest: torch.empty(0)})
        return f"encoder.body.{timm_name}"
    new = head_key(rest)
    return None if new is None else f"aggregator.{new}"


def build_from_preset(*overrides: str) -> tuple[VSSModule, dict]:
    """The VSSModule that ``vss.train`` builds from the composed config (no data needed), and its config."""
    from conftest import compose_train

    cfg = compose_train(overrides)
    segmenter = Segmenter(instantiate(cfg.encoder), instantiate(cfg.model), int(cfg.data.num_classes))
    module = VSSModule(
        segmenter,
        num_classes=int(cfg.data.num_classes),
        optimizer=instantiate(cfg.optim.optimizer, _convert_="all"),
        paramwise=OmegaConf.to_container(cfg.optim.paramwise),
    )
    return module, cfg


def per_parameter(module: VSSModule) -> dict[str, tuple[float, float]]:
    """Segmenter parameter name -> (lr, weight decay) of its optimizer group."""
    names = {id(p): n for n, p in module.segmenter.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in module.param_groups() for p in g["params"]}


def compare_with_official(
    module: VSSModule, official: nn.Module, head_key: Callable[[str], str | None], title: str
) -> Counter:
    """Print the per-parameter table; assert 0 differences and a bijection; return the (lr x, decay x) counts."""
    ours = per_parameter(module)
    reference = mmcv_add_params(official, OFFICIAL_CUSTOM_KEYS, OFFICIAL_LR, OFFICIAL_WD)
    mapped = {name: official_to_vss(name, head_key) for name in reference}
    dropped = sorted(n for n, v in mapped.items() if v is None)
    assert dropped == ["decode_head.conv_seg.bias", "decode_head.conv_seg.weight"]  # mmseg's unused base classifier
    assert sorted(v for v in mapped.values() if v is not None) == sorted(ours)  # every parameter, each once

    def mult(lr_wd: tuple[float, float]) -> tuple[float, float]:
        return round(lr_wd[0] / OFFICIAL_LR, 6), round(lr_wd[1] / OFFICIAL_WD, 6)

    print(f"\n{title}: official name | vss name | official (lr x, decay x) | ours | same")
    differences = []
    for name, vss in mapped.items():
        if vss is None:
            continue
        same = mult(reference[name]) == mult(ours[vss])
        print(f"  {name} | {vss} | {mult(reference[name])} | {mult(ours[vss])} | {'yes' if same else 'NO'}")
        if not same:
            differences.append(name)
    counts = Counter(mult(v) for v in ours.values())
    print(f"{title}: {len(ours)} parameters, {len(differences)} differences; per (lr x, decay x): {dict(counts)}")
    assert differences == []
    return counts


def test_mrcfa_b1_groups_are_the_official_ones() -> None:
    module, cfg = build_from_preset("experiment=mrcfa_vspw")
    assert (cfg.encoder.name, cfg.data.num_classes, cfg.optim.optimizer.lr) == ("mit_b1", 124, OFFICIAL_LR)
    assert cfg.optim.optimizer.weight_decay == OFFICIAL_WD
    official = official_model(OfficialMRCFAHead([64, 128, 320, 512], 124, backbone="b1"))

    def head_key(key: str) -> str | None:
        return None if key.startswith(DROPPED_HEAD) else official_head_key(key)

    counts = compare_with_official(module, official, head_key, "MRCFA-B1")
    # MiT-B1: 60 LayerNorm tensors (no decay), 116 others; the head: 79 tensors at lr x10 with decay, among them
    # linear_fuse's BatchNorm (2) and the 10 GroupNorms of the b1 affinity decoder (20)
    assert counts == {(1.0, 0.0): 60, (1.0, 1.0): 116, (10.0, 1.0): 79}
    ours = per_parameter(module)
    head_norms = [
        n
        for n, m in module.segmenter.aggregator.named_modules()
        if isinstance(m, norm_layers())
        for n in (f"aggregator.{n}.weight", f"aggregator.{n}.bias")
    ]
    assert len(head_norms) == 22
    assert {ours[n] for n in head_norms} == {(OFFICIAL_LR * 10, OFFICIAL_WD)}


def test_segformer_b1_groups_are_the_official_ones() -> None:
    module, _ = build_from_preset("experiment=segformer_cityscapes", "data.root=/tmp")
    official = official_model(OfficialSegFormerHead([64, 128, 320, 512], 19))

    def head_key(key: str) -> str | None:  # our SegFormer head keeps the official names under decode_head
        return None if key.startswith("conv_seg.") else f"decode_head.{key}"

    counts = compare_with_official(module, official, head_key, "SegFormer-B1")
    assert counts == {(1.0, 0.0): 60, (1.0, 1.0): 116, (10.0, 1.0): 13}


class Toy(nn.Module):
    """``backbone.fc``, ``backbone.bn`` (BatchNorm), ``head.fc``, ``head.norm`` (LayerNorm): 2 tensors each."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.fc = nn.Linear(2, 2)
        self.backbone.bn = nn.BatchNorm1d(2)
        self.head = nn.Module()
        self.head.fc = nn.Linear(2, 2)
        self.head.norm = nn.LayerNorm(2)


def test_matching_is_mmcv_longest_key_first_then_alphabetical() -> None:
    rules = {"norm": {"decay_mult": 0.0}, "head": {"lr_mult": 10.0}, "fc": {"lr_mult": 2.0}, "head.fc": {"lr_mult": 3}}
    assert key_order(rules) == ["head.fc", "head", "norm", "fc"]
    assert multipliers("head.norm.weight", rules) == (10.0, 1.0)  # head before norm (same length, alphabetical)
    assert multipliers("head.fc.bias", rules) == (3.0, 1.0)  # the longest matching key, not the first listed
    assert multipliers("backbone.fc.weight", rules) == (2.0, 1.0)
    assert multipliers("backbone.norm1.weight", rules) == (1.0, 0.0)
    assert multipliers("backbone.bn.weight", rules) == (1.0, 1.0)  # no key: the base lr and decay
    assert multipliers("x", {}) == (1.0, 1.0)


def test_norm_decay_mult_applies_to_normalisation_layers_of_its_key_only() -> None:
    rules = {"head": {"lr_mult": 10.0, "norm_decay_mult": 0.0}, "backbone": {"norm_decay_mult": 0.0}}
    groups = param_groups(Toy(), rules, lr=0.1, weight_decay=0.5)
    by_name = {g["name"]: len(g["params"]) for g in groups}
    assert by_name == {"lr_x1_decay_x0": 2, "lr_x1_decay_x1": 2, "lr_x10_decay_x0": 2, "lr_x10_decay_x1": 2}
    lr_wd = {(g["lr"], g["weight_decay"]) for g in groups}
    assert lr_wd == {(0.1, 0.0), (0.1, 0.5), (1.0, 0.0), (1.0, 0.5)}


def test_no_rule_is_one_group_and_frozen_parameters_are_left_out() -> None:
    toy = Toy()
    toy.backbone.requires_grad_(False)
    groups = param_groups(toy, {}, lr=0.1, weight_decay=0.5)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [(0.1, 0.5, 4)]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in toy.head.parameters()}


def test_a_shared_parameter_is_grouped_once_by_its_first_name() -> None:
    toy = Toy()
    toy.head.fc.weight = toy.backbone.fc.weight  # tied: torch refuses a parameter in two groups
    groups = param_groups(toy, {"head": {"lr_mult": 10.0}}, lr=0.1, weight_decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == 7
    first = next(g for g in groups if any(p is toy.backbone.fc.weight for p in g["params"]))
    assert first["lr"] == 0.1  # backbone.fc.weight comes first in module order


def test_module_builds_the_optimizer_from_the_groups() -> None:
    seg = Segmenter(build_encoder("mit_b0"), partial(SegFormer, embed_dim=16), 5)
    adamw = partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01)
    module = VSSModule(seg, num_classes=5, optimizer=adamw, paramwise={"aggregator": {"lr_mult": 10}})
    opt = module.configure_optimizers()["optimizer"]
    n_encoder, n_head = len(list(seg.encoder.parameters())), len(list(seg.aggregator.parameters()))
    assert sorted((g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups) == [
        (1e-3, 0.01, n_encoder),
        (1e-2, 0.01, n_head),
    ]


def test_presets_state_the_official_rules(compose_cfg) -> None:
    segformer = {"aggregator": {"lr_mult": 10.0}, "pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0}}
    for experiment in ("mrcfa_vspw", "segformer_cityscapes", "vspw"):
        cfg = compose_cfg(f"experiment={experiment}")
        assert OmegaConf.to_container(cfg.optim.paramwise) == segformer, experiment
    msaf = {"aggregator": {"lr_mult": 10.0, "norm_decay_mult": 0.0}, "encoder": {"norm_decay_mult": 0.0}}
    for experiment in ("msaf_cityscapes", "msaf_camvid"):
        assert OmegaConf.to_container(compose_cfg(f"experiment={experiment}").optim.paramwise) == msaf
    # mmseg PSPNet (the pspnet stage): SGD with no rule; the STF / MAR stages: ST_Memory's AdamW with no rule
    for experiment in ("stf_mar_cityscapes", "stf_mar_camvid"):
        cfg = compose_cfg(f"experiment={experiment}")
        assert cfg.optim.optimizer._target_ == "torch.optim.SGD" and dict(cfg.optim.paramwise) == {}
        for stage in cfg.pipeline:
            optim = [o for o in stage.get("train") or [] if o.startswith("optim")]
            if optim:
                staged = compose_cfg(f"experiment={experiment}", *optim)
                assert staged.optim.optimizer._target_ == "torch.optim.AdamW", stage.name
                assert (staged.optim.optimizer.lr, staged.optim.optimizer.weight_decay) == (1e-5, 1e-4)
                assert dict(staged.optim.paramwise) == {}, stage.name


def test_msaf_preset_keeps_the_previous_rule() -> None:
    """MSAF (no official code): the aggregator at lr x10, no decay on any normalisation layer, as before."""
    module, _ = build_from_preset("experiment=msaf_cityscapes", "data.root=/tmp", "encoder=resnet18")
    ours = per_parameter(module)
    norms = norm_layers()
    expected = {}
    for mod_name, mod in module.segmenter.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}"
            lr = 6e-5 * (10.0 if name.startswith("aggregator.") else 1.0)
            expected[name] = (lr, 0.0 if isinstance(mod, norms) else 0.01)
    assert ours.keys() == expected.keys()
    assert all(ours[n] == pytest.approx(expected[n]) for n in ours)
    assert len(set(ours.values())) == 4


BAD_RULES = [
    (["+optim.paramwise.norm.lr=2"], "optim.paramwise.norm.lr is not a rule field"),
    (["optim.paramwise.norm.decay_mult=-1"], "optim.paramwise.norm.decay_mult=-1"),
    (["optim.paramwise.aggregator.lr_mult=fast"], "optim.paramwise.aggregator.lr_mult='fast'"),
    (["+optim.paramwise.bias=0"], "optim.paramwise.bias=0 is invalid"),
    (["+optim.head_lr_mult=10"], "optim.head_lr_mult=10 is no longer read"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_RULES, ids=[o[0] for o, _ in BAD_RULES])
def test_bad_rules_name_the_key(compose_cfg, overrides, message) -> None:
    with pytest.raises(ConfigError) as info:
        validate_train_config(compose_cfg(*overrides))
    assert message in str(info.value)


def test_head_lr_mult_on_the_command_line_says_what_replaced_it() -> None:
    with pytest.raises(ConfigError, match=r"optim.head_lr_mult=10 is no longer read: .*optim.paramwise"):
        check_command_line("train", ["optim.head_lr_mult=10"])
