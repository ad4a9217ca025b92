"""Config checks: every bad value fails before anything is built, with a ConfigError naming the key."""

from __future__ import annotations

import time

import pytest
from hydra.errors import ConfigCompositionException

from vss.errors import ConfigError
from vss.validation import validate_train_config

INVALID = [
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["model.offsets=[0]"], "model.offsets"),
    (["model.offsets=[-3,-3]"], "model.offsets"),
    (["model=mrcfa", "model.offsets=[-3,x]"], "model.offsets"),
    (["data.clip.offsets=[-3]"], "data.clip.offsets"),  # the clip follows the model (segformer: [])
    (["model=mrcfa", "data.clip.offsets=[-6,-3]"], "model.offsets"),
    (["val_mode=fast"], "val_mode"),
    (["+optim.head_lr_mult=10"], "optim.head_lr_mult"),
    (["optim.paramwise.norm.decay_mult=-1"], "optim.paramwise.norm.decay_mult"),
    (["encoder.name=mit_b9"], "encoder.name"),
    (["data=vspw", "data.root=/nonexistent"], "data.root"),
    (["data=vspw"], "data.root"),  # root: ??? (mandatory)
    (["encoder.pretrained=/nonexistent.pth"], "encoder.pretrained"),
    (["optim.optimizer.lr=-1"], "optim.optimizer.lr"),
    (["trainer.precision=17"], "trainer.precision"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.clip.offsets=-3"], "data.clip.offsets"),
    (["model=mrcfa", "stm.p=abc"], "stm.p"),
    (["model=mrcfa", "stm.p=1.5"], "stm.p"),
    (["model=msaf", "encoder=resnet18", "data.clip.offsets=[-9,-6,-3]"], "data.clip.offsets"),
    (["model.embed_dim=0"], "model.embed_dim"),
    (["data.train_repeat=0"], "data.train_repeat"),
    (["data.iou_mean=mean"], "data.iou_mean"),
    (["data.photometric=true"], "data.photometric"),
    (["data.photometric=per-frame"], "data.photometric"),
    (["data.synthetic.label_every=0"], "data.synthetic.label_every"),
    (["data.check_val=pixels"], "data.check_val"),
    (["data.check_val=true"], "data.check_val"),
    (["data.check_val_max_mb=0"], "data.check_val_max_mb"),
    (["data=cityscapes_video", "data.root=/tmp", "data.missing_frames=maybe"], "data.missing_frames"),
    (["data=cityscapes_video", "data.root=/tmp", "data.label_file=ids"], "data.label_file"),
    (["data=cityscapes_video", "data.root=/nonexistent"], "data.root"),
    (["data=camvid_video", "data.root=/tmp", "data.label_form=rgb"], "data.label_form"),
    (["data=camvid_video", "data.root=/tmp", "data.colour_convention=fancy"], "data.colour_convention"),
]


@pytest.mark.parametrize(("overrides", "key"), INVALID, ids=[" ".join(o) for o, _ in INVALID])
def test_invalid_value_names_the_key(compose_cfg, overrides, key):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    assert key in str(info.value)


def test_default_config_is_valid(compose_cfg):
    validate_train_config(compose_cfg())


def test_default_config_with_tiny_overrides_is_valid(compose_cfg, tiny_overrides):
    validate_train_config(compose_cfg(*tiny_overrides))


@pytest.mark.parametrize("experiment", ["synthetic", "msaf_cityscapes", "stf_mar_camvid", "mrcfa_table2"])
def test_debug_tiny_makes_any_experiment_a_tiny_synthetic_run(compose_cfg, experiment):
    """``debug=tiny`` (conf/debug/tiny.yaml) on top of an experiment: its model, the tiny synthetic set, 4 steps."""
    plain, tiny = compose_cfg(f"experiment={experiment}"), compose_cfg(f"experiment={experiment}", "debug=tiny")
    validate_train_config(tiny)
    assert tiny.model == plain.model and tiny.encoder == plain.encoder
    assert tiny.data._target_ == "vss.data.datamodule.SyntheticDataModule"
    knobs = {k: tiny.data.synthetic[k] for k in ("train_videos", "val_videos", "min_frames", "max_frames", "height")}
    assert knobs == {"train_videos": 2, "val_videos": 2, "min_frames": 18, "max_frames": 18, "height": 32}
    assert (tiny.trainer.max_steps, tiny.trainer.val_check_interval, tiny.data.num_workers) == (4, 2, 0)
    assert list(tiny.data.crop_size) == [32, 32] and tiny.data.batch_size == 2


def test_unknown_top_level_key_is_rejected_by_hydra(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="foo"):
        compose_cfg("foo.bar=1")


def test_cli_fails_fast_with_the_key(run_cli, tmp_path):
    start = time.monotonic()
    proc = run_cli("model.offsets=[0]", f"paths.log_dir={tmp_path / 'logs'}", timeout=120)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "model.offsets" in out
    assert "Traceback" not in out  # one clear line, not a stack trace
    for progress in ("Epoch 0", "Training", "Validation", "[vss] step"):
        assert progress not in out
    assert not list((tmp_path / "logs").rglob("*.ckpt"))
    assert elapsed < 60, f"took {elapsed:.0f} s to reject a bad value"


# the hostile tester's list: one line naming the key, exit status 2, before anything is built
ONE_LINE = [
    (["data.clip.offsets=-3"], "data.clip.offsets=-3 is invalid: expected a list"),
    (["model=mrcfa", "stm.p=abc"], "stm.p='abc' is invalid: expected a token ratio in (0, 1]"),
    (["model=msaf", "encoder=resnet18", "data.clip.offsets=[-9,-6,-3]"], "data.clip.offsets=[-9, -6, -3] differs"),
    (["model.embed_dim=0"], "model.embed_dim=0 is invalid: expected a positive integer"),
    (["data.train_repeat=0"], "data.train_repeat=0 is invalid: expected a positive integer"),
]


@pytest.mark.parametrize(("overrides", "words"), ONE_LINE, ids=[" ".join(o) for o, _ in ONE_LINE])
def test_cli_bad_value_is_one_line_and_exit_2(run_cli, tmp_path, overrides, words):
    proc = run_cli(*overrides, f"paths.log_dir={tmp_path / 'logs'}", timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "[vss] train" not in out  # nothing was built
    errors = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and words in errors[0], proc.stderr
