"""The method protocol on ``Aggregator``: shared code asks the class that ``model._target_`` names, and every
default says what it means (no baseline, no importer) instead of guessing."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from vss import bench
from vss.config import CONF_DIR, register_resolvers
from vss.convert import find_importer
from vss.errors import ConfigError
from vss.models.aggregators.base import Aggregator, aggregator_class
from vss.models.aggregators.mrcfa import MRCFA
from vss.models.aggregators.pspnet import PSPNet
from vss.models.aggregators.segformer import SegFormer
from vss.validation import validate_train_config

TINY_BENCH = ("height=64", "width=64", "frames=4", "iters=1", "warmup=0", "device=cpu", "batch_size=1")


@pytest.fixture
def compose_config() -> Iterator[Callable[..., DictConfig]]:
    """``compose_config(name, *overrides)``: a config of ``conf/`` composed in-process."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield lambda name, *overrides: compose(name, overrides=list(overrides))
    GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("os.system", "expected a class under vss.models.aggregators."),
        (42, "expected a class under vss.models.aggregators."),
        ("vss.models.aggregators.mrcfa.NoSuchClass", "no such class"),
        ("vss.models.aggregators.base.resize", "expected a subclass of vss.models.aggregators.base.Aggregator"),
    ],
)
def test_aggregator_class_refuses_what_is_not_a_method(target: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        aggregator_class(target)
    assert str(info.value).startswith("model._target_=")


def test_aggregator_class_names_the_class() -> None:
    assert aggregator_class("vss.models.aggregators.mrcfa.MRCFA") is MRCFA


def test_defaults_say_none_and_no_importer() -> None:
    assert Aggregator.single_frame_baseline({}) is None
    assert SegFormer.single_frame_baseline({}) is None  # single-frame itself
    assert PSPNet.single_frame_baseline({}) is None
    Aggregator.check_config({})  # no extra checks
    with pytest.raises(ConfigError, match=r"vss.models.aggregators.segformer.SegFormer has no importer"):
        SegFormer.import_official({})


def test_convert_asks_the_class_for_its_importer() -> None:
    assert find_importer("mrcfa") == MRCFA.import_official
    with pytest.raises(ConfigError, match=r"model=segformer \(vss.models.aggregators.segformer.SegFormer\) has no"):
        find_importer("segformer")


def test_validation_runs_the_method_own_check(
    compose_config: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    monkeypatch.setattr(MRCFA, "check_config", classmethod(lambda cls, cfg: seen.append(cfg.model._target_)))
    validate_train_config(compose_config("train", "model=mrcfa"))
    validate_train_config(compose_config("train", "model=segformer"))  # not MRCFA's check
    assert seen == ["vss.models.aggregators.mrcfa.MRCFA"]


def test_bench_says_when_a_temporal_method_names_no_baseline(
    compose_config: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(MRCFA, "single_frame_baseline", classmethod(lambda cls, model_cfg: None))
    cfg = compose_config("bench", "model=mrcfa", "encoder=mit_b0", "model.embed_dim=16", *TINY_BENCH)
    result = bench.bench(cfg)
    assert "ratio_to_baseline" not in result.figures
    assert result.baseline == "none (MRCFA.single_frame_baseline names no honest single-frame counterpart)"
    assert result.line().endswith(
        "| baseline: none (MRCFA.single_frame_baseline names no honest single-frame counterpart)"
    )
    single = bench.bench(
        compose_config("bench", "model=segformer", "encoder=mit_b0", "model.embed_dim=16", *TINY_BENCH)
    )
    assert single.baseline == "none (SegFormer is single-frame itself)"
