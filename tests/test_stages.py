"""Staged training: ``init_from`` (weights only) + ``init_exclude`` + ``freeze`` on a two-stage toy run,
frozen BatchNorm through ``train()`` and a Lightning fit, SyncBN conversion of the non-frozen parts only,
the ``init_from`` / ``ckpt_path`` errors, and ``vss.convert``'s weights-only checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from conftest import TINY_DATA, TINY_RUN, compose_job
from vss.errors import ConfigError
from vss.lit import build_module
from vss.stages import check_stages, convert_sync_batchnorm, init_weights, load_weights
from vss.train import train

CLASSIFIER = "aggregator.decode_head.linear_pred"
FUSE = "aggregator.decode_head.linear_fuse"
QUIET = (
    "encoder=resnet18",  # BatchNorm in the frozen encoder: its running statistics must not move
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "++trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
    "callbacks.validation_images=null",
    "logger=csv",
)


def compose_run(data_dir: Path, output_dir: Path, *overrides: str) -> DictConfig:
    """A tiny training config as ``python -m vss.train`` would see it (no ``hydra`` node), run in ``output_dir``."""
    cfg = compose_job([*TINY_DATA, *TINY_RUN, *QUIET, f"paths.data_dir={data_dir}", *overrides])
    cfg.paths.output_dir = str(output_dir)
    return cfg


def segmenter_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor (parameters and buffers) of the Segmenter in a Lightning checkpoint, without the prefix."""
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k.removeprefix("segmenter."): v for k, v in state.items()}


def under(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix + ".")}


def fresh_module(cfg: DictConfig) -> Any:
    """The module as ``train(cfg)`` builds it (same seed), before any weights are loaded."""
    pl.seed_everything(cfg.seed, workers=True)
    n = int(cfg.data.num_classes)
    return build_module(cfg, n, [str(i) for i in range(n)])


class ModeProbe(pl.Callback):
    """Records the training flag of every encoder module and of the aggregator at each train/val batch."""

    seen: list[tuple[str, bool, bool]] = []

    def _record(self, stage: str, pl_module: Any) -> None:
        enc = pl_module.segmenter.encoder
        ModeProbe.seen.append((stage, any(m.training for m in enc.modules()), pl_module.segmenter.aggregator.training))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self._record("train", pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self._record("train", pl_module)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self._record("val", pl_module)


@pytest.fixture(scope="module")
def stage1(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage 1: SegFormer on a ResNet-18, 2 steps from scratch; its last.ckpt."""
    out = tmp_path_factory.mktemp("stage1")
    train(compose_run(tiny_data_dir, out))
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


def stage2_overrides(ckpt: Path) -> list[str]:
    return [f"init_from={ckpt}", "freeze=[encoder]", f"init_exclude=[{CLASSIFIER}]"]


# -- the two-stage run -------------------------------------------------------------------------------
def test_stage2_starts_from_stage1_with_the_classifier_reinitialised(
    stage1: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    cfg = compose_run(tiny_data_dir, tmp_path, *stage2_overrides(stage1))
    before = segmenter_tensors(stage1)
    module = fresh_module(cfg)
    fresh = {k: v.clone() for k, v in module.segmenter.state_dict().items()}
    report = init_weights(module.segmenter, cfg, check_stages(cfg))
    loaded = module.segmenter.state_dict()
    assert report.excluded == [f"{CLASSIFIER}.bias", f"{CLASSIFIER}.weight"]
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(before) - 2
    for k, v in loaded.items():
        if k.startswith(CLASSIFIER):  # re-initialised: the fresh model's tensor, not stage 1's
            assert torch.equal(v, fresh[k]) and not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k
    # frozen: no gradient, not in the optimizer
    encoder_params = {id(p) for p in module.segmenter.encoder.parameters()}
    assert not any(p.requires_grad for p in module.segmenter.encoder.parameters())
    grouped = [p for g in module.param_groups() for p in g["params"]]
    assert grouped and not {id(p) for p in grouped} & encoder_params
    assert {id(p) for p in grouped} == {id(p) for p in module.segmenter.aggregator.parameters()}


def test_two_stage_run_keeps_the_frozen_part_bit_identical(
    stage1: Path, tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ModeProbe.seen.clear()
    probe = f"+callbacks.mode_probe._target_={__name__}.ModeProbe"
    result = train(compose_run(tiny_data_dir, tmp_path, *stage2_overrides(stage1), probe))
    printed = capsys.readouterr().out
    before, after = segmenter_tensors(stage1), segmenter_tensors(tmp_path / "checkpoints" / "last.ckpt")
    assert result["step"] == 2
    line = next(x for x in printed.splitlines() if x.startswith("[vss] init_from"))
    print(line)
    assert str(stage1) in line and f"loaded {len(before) - 2} tensors" in line and f"{CLASSIFIER}.weight" in line
    assert "missing 0: []" in line and "unexpected 0: []" in line, line
    assert before.keys() == after.keys()
    encoder = under(before, "encoder")
    assert any(k.endswith("running_var") for k in encoder) and any(k.endswith("num_batches_tracked") for k in encoder)
    for k in encoder:  # weights, BatchNorm running statistics and num_batches_tracked: bit-identical
        assert torch.equal(before[k], after[k]), k
    for k in under(before, "aggregator"):  # trained (the BatchNorm of linear_fuse too)
        if not k.endswith("num_batches_tracked"):
            assert not torch.equal(before[k], after[k]), k
    assert after[f"{FUSE}.bn.num_batches_tracked"] == before[f"{FUSE}.bn.num_batches_tracked"] + 2
    # the frozen encoder stayed in eval mode through the fit (training and validation), the rest trained
    stages = {s for s, _, _ in ModeProbe.seen}
    assert stages == {"train", "val"}
    assert not any(enc for _, enc, _ in ModeProbe.seen)
    assert all(agg for s, _, agg in ModeProbe.seen if s == "train")


def test_frozen_batchnorm_stays_in_eval_mode_through_train(tiny_data_dir: Path, tmp_path: Path) -> None:
    cfg = compose_run(tiny_data_dir, tmp_path, f"freeze=[{FUSE}]")
    module = fresh_module(cfg)
    fuse_bn = module.segmenter.aggregator.decode_head.linear_fuse.bn
    assert isinstance(fuse_bn, nn.BatchNorm2d)
    for mode in (True, False, True):
        module.train(mode)
        assert not fuse_bn.training and not module.segmenter.aggregator.decode_head.linear_fuse.training
        assert module.segmenter.encoder.training is mode and module.segmenter.aggregator.training is mode
    stats = {k: v.clone() for k, v in fuse_bn.state_dict().items()}  # running mean/var, num_batches_tracked
    module.segmenter(torch.randn(2, 1, 3, 32, 32))  # a training-mode forward
    assert all(torch.equal(v, fuse_bn.state_dict()[k]) for k, v in stats.items())


def test_sync_batchnorm_leaves_the_frozen_parts_alone(tiny_data_dir: Path, tmp_path: Path) -> None:
    for frozen, plain in (("encoder", "encoder"), (FUSE, FUSE)):
        module = fresh_module(compose_run(tiny_data_dir, tmp_path, f"freeze=[{frozen}]"))
        seg = convert_sync_batchnorm(module.segmenter)
        bns = {n: m for n, m in seg.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        assert any(n.startswith(plain) for n in bns) and any(not n.startswith(plain) for n in bns)
        for name, m in bns.items():
            assert isinstance(m, nn.SyncBatchNorm) is (not name.startswith(plain)), name
        assert dict(seg.named_modules())[frozen] is seg.frozen[frozen]  # still the frozen module


# -- errors ------------------------------------------------------------------------------------------
def test_init_from_errors_name_the_file(tiny_data_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    no_tensors = tmp_path / "dict.ckpt"
    torch.save({"epoch": 3}, no_tensors)
    for path, words in ((missing, "does not exist"), (text, "not a checkpoint"), (no_tensors, "not a vss checkpoint")):
        with pytest.raises(ConfigError, match="init_from") as info:
            train(compose_run(tiny_data_dir, tmp_path / "run", f"init_from={path}"))  # fails before anything runs
        assert str(path) in str(info.value) and words in str(info.value)
    assert not (tmp_path / "run").exists()


def test_init_from_shape_mismatch_is_an_error_unless_excluded(
    stage1: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    cfg = compose_run(tiny_data_dir, tmp_path, f"init_from={stage1}", "data.num_classes=3")
    state = check_stages(cfg)
    with pytest.raises(ConfigError) as info:
        init_weights(fresh_module(cfg).segmenter, cfg, state)
    msg = str(info.value)
    assert f"{CLASSIFIER}.weight: checkpoint (5, 32, 1, 1) vs model (3, 32, 1, 1)" in msg
    assert f"init_exclude=[{CLASSIFIER}]" in msg and str(stage1) in msg
    report = load_weights(fresh_module(cfg).segmenter, state, [CLASSIFIER], stage1)
    assert report.excluded == [f"{CLASSIFIER}.bias", f"{CLASSIFIER}.weight"] and not report.missing
    official = {"backbone.patch_embed1.proj.weight": torch.zeros(1)}  # not converted: no key of the model
    with pytest.raises(ConfigError, match="none of its 1 tensors is a key of the model .*vss.convert"):
        load_weights(fresh_module(cfg).segmenter, official, path="official.pth")


def test_init_exclude_typo_and_freeze_typo_suggest_the_module(
    stage1: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    cfg = compose_run(
        tiny_data_dir, tmp_path, f"init_from={stage1}", "init_exclude=[aggregator.decode_head.linear_prd]"
    )
    with pytest.raises(ConfigError, match=r"init_exclude: .*did you mean aggregator\.decode_head\.linear_pred"):
        init_weights(fresh_module(cfg).segmenter, cfg, check_stages(cfg))
    with pytest.raises(ConfigError, match=r"freeze: 'encodr' is not a module .*did you mean encoder"):
        fresh_module(compose_run(tiny_data_dir, tmp_path, "freeze=[encodr]"))


def test_init_from_with_ckpt_path_is_an_error(stage1: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    cfg = compose_run(tiny_data_dir, tmp_path, f"init_from={stage1}", f"ckpt_path={stage1}")
    with pytest.raises(ConfigError, match="exclude each other") as info:
        train(cfg)
    assert "pass only ckpt_path=" in str(info.value) and "pass only init_from=" in str(info.value)


# -- vss.convert: a weights-only checkpoint ----------------------------------------------------------
def test_converted_checkpoint_is_weights_only_and_starts_a_run(tiny_data_dir: Path, tmp_path: Path) -> None:
    from random_weights import randomize_
    from reference_mit import build_reference_mit
    from reference_mrcfa import OfficialMRCFAHead
    from vss.convert import convert
    from vss.eval import load_checkpoint

    mit = randomize_(build_reference_mit("mit_b0"), seed=1)
    head = randomize_(OfficialMRCFAHead([32, 64, 160, 256], 5, backbone="b1"), seed=2)
    state = {"backbone." + k: v for k, v in mit.state_dict().items()}
    state |= {"decode_head." + k: v for k, v in head.state_dict().items()}
    src, dst = tmp_path / "official.pth", tmp_path / "converted.ckpt"
    torch.save({"meta": {"iter": 160000}, "state_dict": state}, src)
    report = convert(src, dst, "mrcfa", ["stm.p=0.5"], verbose=False)
    # 5 classes, no names in the meta: the one data set with 5 classes (the synthetic set) is stored
    assert report["overrides"][:3] == ["data=synthetic", "experiment=mrcfa_vspw", "model=mrcfa"]

    ckpt = load_checkpoint(dst)  # vss.eval accepts it
    assert set(ckpt) == {"state_dict", "hyper_parameters", "vss_converted_from"}
    stored = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    assert (stored.model.sar_layout, stored.model.token_ratio, stored.data.num_classes) == ("b1", 0.5, 5)

    # init_from: every tensor of a model built like the checkpoint's, nothing missing or unexpected
    same = ("model=mrcfa", "encoder=mit_b0", "model.sar_layout=b1", "model.embed_dim=256", "stm.p=0.5")
    cfg = compose_run(tiny_data_dir, tmp_path, *same, f"init_from={dst}")
    module = fresh_module(cfg)
    report = init_weights(module.segmenter, cfg, check_stages(cfg))
    assert report.missing == [] and report.unexpected == [] and len(report.loaded) == len(ckpt["state_dict"])
    for k, v in module.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k

    # resuming from it says to use init_from
    cfg = compose_run(tiny_data_dir, tmp_path, *same, f"ckpt_path={dst}")
    with pytest.raises(ConfigError, match=f"weights-only checkpoint .*use init_from={dst}"):
        train(cfg)
