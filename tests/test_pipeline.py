"""vss.pipeline: stages checked before anything runs, placeholders, total steps, skip / resume of stages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vss.errors import ConfigError
from vss.pipeline import compose_stages, parse_stages, run_pipeline, split_arguments, total_steps


def record_product(checkpoint: str, output_dir: str) -> str:
    """A pass for the test: writes the checkpoint path it was given and returns the file."""
    out = Path(output_dir) / "product.txt"
    out.write_text(checkpoint)
    return str(out)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ([], "pipeline is empty"),
        ([{"name": "a", "train": []}, {"name": "a", "train": []}], "pipeline[1].name='a' is repeated"),
        ([{"name": "a"}], "give exactly one of train (overrides) or run"),
        ([{"name": "a", "train": [], "run": {"_target_": "x.y"}}], "give exactly one of train"),
        ([{"name": "a", "train": ["init_from={b}"]}, {"name": "b", "train": []}], "refers to {b}, which is not an"),
        ([{"name": "1a", "train": []}], "pipeline[0].name='1a' is invalid"),
        ([{"name": "a", "train": "model=stf"}], "pipeline[0].train is invalid"),
        ([{"name": "a", "run": {"fn": 1}}], "pipeline[0].run is invalid: expected a mapping with _target_"),
        ([{"name": "a", "train": [], "steps": 3}], "unknown key(s) ['steps']"),
    ],
)
def test_bad_stage_lists_are_config_errors(spec: list, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_stages(spec)
    assert words in str(info.value)


def test_own_arguments_and_multirun() -> None:
    assert split_arguments(["experiment=x", "pipeline_dir=/p", "seed=1"]) == (
        ["experiment=x", "seed=1"],
        {"pipeline_dir": "/p"},
    )
    with pytest.raises(ConfigError, match="-m / --multirun is not supported"):
        split_arguments(["-m", "seed=1,2"])


def test_total_steps_follow_init_from_to_the_best_checkpoints() -> None:
    stages = parse_stages(
        [
            {"name": "base", "train": []},
            {"name": "mem", "run": {"_target_": "f", "ckpt": "{base}"}},
            {"name": "one", "train": ["init_from={base}"]},
            {"name": "two", "train": ["init_from={one}", "model.memory={mem}"]},
        ]
    )
    assert [s.parent for s in stages] == [None, None, "base", "one"] and stages[3].needs == ["one", "mem"]
    records = {"base": {"step": 600, "best_step": 300}, "one": {"step": 200, "best_step": 100}, "two": {"step": 50}}
    # two: its own 50 + one's best 100 + base's best 300 (the checkpoints each stage started from)
    assert total_steps(stages, records, "two") == 450
    assert total_steps(stages, records, "one") == 500
    assert total_steps(stages, records, "base") == 600


def test_an_experiments_pipeline_composes() -> None:
    """Every experiment that lists stages composes and its stage list is valid (before anything runs)."""
    from vss.config import CONF_DIR

    found = 0
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        if "pipeline:" not in path.read_text():
            continue
        stages, name = compose_stages([f"experiment={path.stem}"])
        assert name == path.stem and len(stages) >= 2
        found += 1
    if not found:
        pytest.skip("no experiment lists a pipeline")


def test_two_training_stages_and_a_pass_run_skip_and_resume(tiny_overrides, cli_env, monkeypatch, tmp_path) -> None:
    for k, v in cli_env.items():
        monkeypatch.setenv(k, v)
    for k in [k for k in os.environ if k.startswith("VSS_")]:
        monkeypatch.delenv(k)
    stages = parse_stages(
        [
            {"name": "base", "train": ["trainer.max_steps=4"]},
            {"name": "mark", "run": {"_target_": "test_pipeline.record_product", "checkpoint": "{base}"}},
            {"name": "fine", "label": "fine-tuned", "train": ["init_from={base}", "trainer.max_steps=2"]},
        ]
    )
    user = [o for o in tiny_overrides if not o.startswith("trainer.max_steps=")]
    out = tmp_path / "pipe"
    records = run_pipeline(stages, user, out)
    base = json.loads((out / "base" / "stage.json").read_text())
    assert Path(base["product"]).is_file() and base["product"].startswith(str((out / "base").resolve()))
    assert (out / "mark" / "product.txt").read_text() == base["product"]  # the pass got {base}
    fine_log = (out / "fine" / "train.log").read_text()
    assert f"init_from {base['product']}" in fine_log or base["product"] in fine_log
    assert records["fine"]["step"] == 2 and records["fine"]["total_steps"] == base["best_step"] + 2
    table = (out / "pipeline.md").read_text()
    assert "| fine-tuned | base |" in table and "| base | - | 4 |" in table
    assert (
        json.loads((out / "pipeline.json").read_text())["stages"]["fine"]["total_steps"]
        == records["fine"]["total_steps"]
    )

    # a finished pipeline: every stage is skipped
    mtime = (out / "base" / "checkpoints" / "last.ckpt").stat().st_mtime
    run_pipeline(stages, user, out)
    assert (out / "base" / "checkpoints" / "last.ckpt").stat().st_mtime == mtime

    # an interrupted stage (no stage.json, a last.ckpt): resumed in its own run directory, steps intact
    (out / "fine" / "stage.json").unlink()
    (out / "fine" / "metrics.json").unlink()
    again = run_pipeline(stages, user, out)
    assert again["fine"]["step"] == 2
    assert "resuming from" in (out / "fine" / "train.log").read_text()


def test_every_stage_is_checked_before_the_first_runs(tmp_path: Path) -> None:
    """A bad value that only a later stage reads (STF's 128-multiple evaluation size) stops the pipeline before
    stage 1 trains, naming the stage; the products of earlier stages stand in as placeholders."""
    from fake_video_datasets import write_cityscapes
    from vss.pipeline import check_stage_configs

    root = write_cityscapes(tmp_path / "cs")
    good = ["experiment=stf_mar_cityscapes", f"data.root={root}"]
    stages, _ = compose_stages(good)
    check_stage_configs(stages, good)
    assert [s.name for s in stages] == ["pspnet", "stf", "memory", "stf_mar"]
    assert stages[2].run["data"] == {"scale": [2048, 1024]}  # the pass reads the composed config
    bad = [*good, "data.size_divisor=32"]
    with pytest.raises(ConfigError, match=r"^stage stf: data.size_divisor=32 is invalid for STF"):
        check_stage_configs(compose_stages(bad)[0], bad)


def test_vss_train_on_a_pipeline_experiment_says_to_run_vss_pipeline(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "VSS_PIPELINE_STAGE"}
    cmd = [sys.executable, "-m", "vss.train", "experiment=stf_mar_synthetic", f"paths.log_dir={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: experiment=stf_mar_synthetic is a pipeline of 6 stages (pspnet, stf, memory, stf_mar, pspnet_long, "
        "stf_long): run them with python -m vss.pipeline experiment=stf_mar_synthetic [overrides]; to train its base "
        "config alone, add pipeline=[]"
    )
    assert not list(tmp_path.rglob("*.ckpt"))
