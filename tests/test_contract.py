"""The contract every model meets, in the style of segmentation_models.pytorch's ``BaseModelTester``.

Parametrised over every ``conf/model/*.yaml`` (a new model config gets the battery for free) and the smallest
encoder of every family in ``conf/encoder/`` (mit_b*, resnet*). A model supports a family when it builds on
it; a combination the constructor refuses with :class:`ConfigError` is skipped, and every model must support
at least one family. Models are composed as a user would (``model=NAME encoder=ENC`` with small widths:
tests/battery.py, where a method's own test file declares what it needs) and run on 64x64 frames. The default
run tests each model on its own encoder (tests/battery.py ``encoder_of``); the other families run under
``-m slow``:

- the stream path (:class:`Streamer`, batch sizes 1 and 4) equals the clip path (``model(clip)`` on
  ``references(t, length) + [t]``) over a whole 14-frame video, with the default offsets and with offsets
  after the target (lookahead 1, end-of-video clamping);
- ``encode`` depends on its own frame only;
- a training step gives named, finite scalar losses and a finite gradient for every trainable parameter;
- frozen parts (``freeze=``) stay in eval mode, get no gradient, and keep their weights and BN statistics;
- ``aggregate(target, [])`` predicts the target alone or raises ``ConfigError``;
- bad values raise ``ConfigError``.

A second group composes and constructs every ``conf/experiment/*.yaml`` (each value of its sweep too) and
every ``conf/experiment/msaf_table3/*.yaml`` row, on the meta device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from torch import nn

from battery import ENCODERS, MODELS, NUM_CLASSES, build, combos, compose, encoder_of, model_keys, supported
from conftest import compose_train
from contract import assert_stream_equals_clip
from random_weights import randomize_
from vss.config import CONF_DIR
from vss.errors import ConfigError
from vss.lit import build_module
from vss.models.segmenter import Segmenter
from vss.validation import validate_train_config

SIZE = (64, 64)  # a multiple of 32 (MRCFA's 1/32 token grid)
VIDEO_FRAMES = 14  # MRCFA's official start clips (frames 0-8) and then its steady state
AFTER_TARGET = "[-2,1]"  # references before and after the target: lookahead 1
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
MSAF_ROWS = sorted(p.stem for p in (CONF_DIR / "experiment" / "msaf_table3").glob("*.yaml"))


@pytest.fixture(params=combos())
def combo(request: pytest.FixtureRequest) -> tuple[str, str]:
    model, encoder = request.param
    if not supported(model, encoder):
        pytest.skip(f"model={model} does not support encoder={encoder} (ConfigError)")
    return model, encoder


def build_variant(model: str, encoder: str, variant: str) -> Segmenter:
    """``default``: the model's own offsets. ``after_target``: references before and after the target (a model
    with a start-of-video policy switch, ``start``, clamps). A model with references must accept them; a
    single-frame model may refuse them (the test is skipped)."""
    if variant == "default":
        return build(model, encoder)
    extra = [f"model.offsets={AFTER_TARGET}", *(["model.start=clamp"] if "start" in model_keys(model) else [])]
    try:
        seg = build(model, encoder, *extra)
    except ConfigError as e:
        if not compose(model, encoder).model.offsets:
            pytest.skip(f"model={model} is single-frame: {e}")
        raise
    assert seg.offsets == (-2, 1) and seg.lookahead == 1
    return seg


def frames(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def test_every_model_config_supports_an_encoder_family() -> None:
    assert MODELS and len(ENCODERS) >= 2, (MODELS, ENCODERS)
    for model in MODELS:
        assert any(supported(model, e) for e in ENCODERS), f"model={model} builds on none of {ENCODERS}"


@pytest.mark.parametrize("model", MODELS)
def test_every_model_builds_on_its_own_encoder(model: str) -> None:
    """The default run tests the model on this encoder: a model that does not build on it would skip there."""
    encoder = encoder_of(model)
    assert supported(model, encoder), (
        f"model={model} does not build on encoder={encoder}: declare the encoder it runs on in its test file, "
        f'BATTERY = {{"{model}": {{"encoder": ...}}}} (tests/battery.py)'
    )


@pytest.mark.parametrize("variant", ["default", "after_target"])
def test_streaming_equals_the_clip_path(combo: tuple[str, str], variant: str) -> None:
    model, encoder = combo
    seg = randomize_(build_variant(model, encoder, variant)).eval()
    assert seg.lookahead == max((0, *seg.offsets))
    assert_stream_equals_clip(seg, frames(VIDEO_FRAMES), (1, 4), f"{model}-{encoder} {variant}")


def test_encode_depends_on_its_own_frame_only(combo: tuple[str, str]) -> None:
    seg = randomize_(build(*combo)).eval()
    x = frames(3, seed=1)
    changed = x.clone()
    changed[0] = frames(1, seed=2)[0]
    with torch.no_grad():
        batched, other = seg.encode(x), seg.encode(changed)
        alone = [seg.encode(x[i : i + 1]) for i in range(3)]
    assert batched and all(v.shape[0] == 3 for v in batched.values()), {k: v.shape for k, v in batched.items()}
    for i in range(3):
        assert set(alone[i]) == set(batched)
        for k, v in batched.items():
            torch.testing.assert_close(v[i : i + 1], alone[i][k], atol=1e-5, rtol=1e-5, msg=f"{k} of frame {i}")
    for k, v in batched.items():
        torch.testing.assert_close(v[1:], other[k][1:], atol=1e-5, rtol=1e-5, msg=f"{k} after frame 0 changed")
    assert any(not torch.allclose(v[0], other[k][0]) for k, v in batched.items()), "frame 0's change was not seen"


def _clip_and_labels(seg: Segmenter, batch: int = 2, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = 1 + len(seg.offsets)
    labels = torch.randint(0, NUM_CLASSES, (batch, t, *SIZE), generator=g)
    labels[:, :, :8] = 255  # ignored pixels
    return torch.randn(batch, t, 3, *SIZE, generator=g), labels


@pytest.mark.parametrize("variant", ["default", "after_target"])
def test_a_training_step_gives_named_finite_losses_and_every_gradient(combo: tuple[str, str], variant: str) -> None:
    seg = build_variant(*combo, variant).train()
    clip, labels = _clip_and_labels(seg)
    out = seg(clip)
    assert out["logits"].shape[:2] == (2, NUM_CLASSES)
    terms = seg.losses(out, labels)
    assert isinstance(terms, dict) and terms, terms
    for name, value in terms.items():
        assert isinstance(name, str) and name, terms
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and value.is_floating_point(), (name, value)
        assert torch.isfinite(value), f"loss term {name} = {value}"
    torch.stack(list(terms.values())).sum().backward()
    trainable = [(n, p) for n, p in seg.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"{len(no_grad)} trainable parameter(s) got no gradient: {no_grad}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


def _frozen_prefixes(model: str, encoder: str) -> list[str]:
    """The encoder plus every direct child of the aggregator holding a BatchNorm (so its statistics are checked
    on every model, whatever the encoder)."""
    with torch.device("meta"):
        agg = build(model, encoder).aggregator
    with_bn = [
        n for n, m in agg.named_children() if any(isinstance(c, nn.modules.batchnorm._BatchNorm) for c in m.modules())
    ]
    return ["encoder", *(f"aggregator.{n}" for n in with_bn)]


def test_frozen_parts_stay_frozen(combo: tuple[str, str]) -> None:
    prefixes = _frozen_prefixes(*combo)
    seg = randomize_(build(*combo, freeze=tuple(prefixes))).train()

    def frozen(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    def check_modes() -> None:
        modes = {n: m.training for n, m in seg.named_modules()}
        assert not [n for n, t in modes.items() if frozen(n) and t], "frozen modules in training mode"
        assert not [n for n, t in modes.items() if not frozen(n) and not t], "trainable modules in eval mode"

    check_modes()
    assert all(not p.requires_grad for n, p in seg.named_parameters() if frozen(n))
    before = {k: v.clone() for k, v in seg.state_dict().items() if frozen(k)}
    clip, labels = _clip_and_labels(seg)
    with torch.no_grad():
        features_train = seg.encoder(clip[:, -1])
    loss = torch.stack(list(seg.losses(seg(clip), labels).values())).sum()
    if loss.requires_grad:  # something is left to train
        loss.backward()
    assert not [n for n, p in seg.named_parameters() if frozen(n) and p.grad is not None], "frozen parameters got grad"
    changed = [k for k, v in seg.state_dict().items() if frozen(k) and not torch.equal(v, before[k])]
    assert not changed, f"frozen weights or statistics changed in a training-mode forward: {changed}"
    seg.eval()
    with torch.no_grad():  # no dropout / drop-path in the frozen encoder: its train-mode output is the eval one
        for a, b in zip(features_train, seg.encoder(clip[:, -1]), strict=True):
            assert torch.equal(a, b)
    seg.train()
    check_modes()


def test_aggregate_without_references_predicts_the_target_or_raises_config_error(combo: tuple[str, str]) -> None:
    seg = randomize_(build(*combo)).eval()
    with torch.no_grad():
        target = seg.encode(frames(1))
        try:
            out = seg.aggregate(target, [])
        except ConfigError:
            return
        clip_out = seg(frames(1).unsqueeze(0))  # T = 1: the clip path of a target alone
    assert out["logits"].shape[:2] == (1, NUM_CLASSES) and torch.isfinite(out["logits"]).all()
    torch.testing.assert_close(out["logits"], clip_out["logits"], atol=1e-5, rtol=1e-5)


BAD_VALUES = [
    "model.offsets=[0]",
    "model.offsets=[-3,-3]",
    "model.offsets=[1.5]",
    "model.embed_dim=0",
    "model.dropout=1.5",
    "model.avg_non_ignore=maybe",
    "model.mlp_ratio=0",
]


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("model", MODELS)
def test_bad_values_raise_config_error(model: str, bad: str) -> None:
    key = bad.split("=")[0].removeprefix("model.")
    if key not in model_keys(model):
        pytest.skip(f"model={model} has no {key}")
    encoder = next(e for e in ENCODERS if supported(model, e))
    try:
        with torch.device("meta"):
            build(model, encoder, bad)
    except ConfigError as e:
        assert key.split(".")[-1] in str(e), f"the message does not name {key}: {e}"
        return
    except Exception as e:
        raise AssertionError(f"model={model} {bad} raised {type(e).__name__}, not ConfigError: {e}") from e
    raise AssertionError(f"model={model} {bad} was accepted")


# -- every preset composes and constructs ------------------------------------------------------------------


def _sweep_overrides(cfg: DictConfig) -> list[str]:
    """One override per value of each ``hydra.sweeper.params`` entry (the rows of the preset's table)."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    parser = OverridesParser.create()
    out = []
    for key, values in params.items():
        override = parser.parse_override(f"{key}={values}")
        out += [f"{key}={v}" for v in override.sweep_string_iterator()]
    return out


def _preset(overrides: list[str], tmp: Path) -> list[str]:
    """``overrides`` plus what running them needs here: no pretrained weights, ``paths.output_dir`` (Hydra sets
    it in a run) and ``data.root`` = ``tmp`` where the preset requires one (``???``)."""
    overrides = [*overrides, "encoder.pretrained=null", f"paths.output_dir={tmp}"]
    if OmegaConf.is_missing(compose_train(overrides).data, "root"):
        overrides.append(f"data.root={tmp}")
    return overrides


def _construct(overrides: list[str]) -> DictConfig:
    """Compose, check as ``vss.train`` does and build the LightningModule on the meta device."""
    cfg = compose_train(overrides)
    validate_train_config(cfg)
    train_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    n = int(train_cfg.data.num_classes)
    with torch.device("meta"):
        module = build_module(train_cfg, n, [str(i) for i in range(n)])
    seg = module.segmenter
    assert seg.offsets == tuple(train_cfg.data.clip.offsets), "the data clip must follow the model's offsets"
    assert seg.num_classes == n
    return cfg


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_preset_and_its_sweep_compose_and_construct(name: str, tmp_path: Path) -> None:
    overrides = _preset([f"experiment={name}"], tmp_path)
    cfg = _construct(overrides)
    for override in _sweep_overrides(cfg):
        _construct([*overrides, override])


@pytest.mark.parametrize("row", MSAF_ROWS)
def test_msaf_table3_row_composes_and_constructs(row: str, tmp_path: Path) -> None:
    cfg = _construct(_preset(["experiment=msaf_synthetic", f"+experiment/msaf_table3={row}"], tmp_path))
    assert list(cfg.model.offsets) == ([-6, -3] if cfg.model.motion else [])
