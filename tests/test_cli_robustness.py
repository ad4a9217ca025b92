"""What a hostile tester tries on the training CLI: SIGTERM, resume with ``ckpt_path=`` alone, stale temporary
files, mistyped keys and bad values (one line, exit 2, before torch), checkpoint modes, overlays, sweep tables."""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO_ROOT, cli_command
from vss.cli import check_command_line, resume_arguments, run_dir_of_checkpoint
from vss.errors import ConfigError, friendly_errors
from vss.validation import check_wandb_login


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a refused command (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# -- SIGTERM, then resume with ckpt_path= alone ----------------------------------------------------------
def test_sigterm_exits_nonzero_and_ckpt_path_alone_finishes_the_run(tiny_args, cli_env, run_cli, tmp_path):
    args = [
        *tiny_args(tmp_path / "logs"),
        "trainer.max_steps=30",
        "trainer.val_check_interval=4",
        "data.train_repeat=8",
        "data.num_workers=1",  # a DataLoader worker gets the signal too, as from SLURM or kill -- -PGID
    ]
    proc = subprocess.Popen(
        cli_command(args),
        cwd=REPO_ROOT,
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    runs = tmp_path / "logs" / "train" / "runs"
    deadline = time.monotonic() + 300
    while not list(runs.glob("*/checkpoints/last.ckpt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be terminated"
    os.killpg(proc.pid, signal.SIGTERM)  # the whole process group: the run and its worker
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, out[-2000:], err[-2000:])
    (run_dir,) = runs.iterdir()
    last = run_dir / "checkpoints" / "last.ckpt"
    message = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(message) == 1, err
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+)", message[0]).group(1))
    assert 4 <= stopped < 30
    saved = int(re.search(rf"last checkpoint: {re.escape(str(last))} \(step (\d+)\)", message[0]).group(1))
    assert saved == int(torch.load(last, weights_only=False)["global_step"])
    # written when SIGTERM arrived in training; arriving mid-validation, the last validation's checkpoint stays
    assert saved == stopped or (saved % 4 == 0 and stopped - saved <= 4), (saved, stopped)
    assert f"resume with: python -m vss.train ckpt_path={last}" in message[0]
    assert not (run_dir / "metrics.json").exists()  # nothing claims the run completed
    assert "[vss] step" not in out
    assert "SIGTERM" in (run_dir / "train.log").read_text()

    stale = run_dir / "checkpoints" / ".last.ckpt.x1y2z3.tmp"  # a write killed half-way
    stale.write_bytes(b"PK\x03\x04 half")
    resumed = run_cli(f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"[vss] run directory: {run_dir}" in resumed.stdout  # the same run directory
    assert f"resuming from {last} (step {saved}) with its stored config" in resumed.stdout
    assert "removed 1 stale temporary file" in resumed.stdout and not stale.exists()
    assert re.search(r"^\[vss\] step 30: val mIoU", resumed.stdout, re.MULTILINE)  # the original max_steps
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 30
    assert [p.name for p in runs.iterdir()] == [run_dir.name]
    rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [int(r.split(",")[header.index("step")]) for r in rows[1:] if r.split(",")[header.index("train/loss")]]
    assert steps == list(range(30)), "one training row per step, before and after the resume"


# -- resume: the stored config, overrides reported, a mismatching model refused ---------------------------
def test_resume_config_reuses_the_checkpoint_and_reports_overrides(compose_cfg) -> None:
    from vss.stages import resume_config

    stored = OmegaConf.to_container(compose_cfg("trainer.max_steps=4", "optim.optimizer.lr=2e-3"), resolve=False)
    stored["paths"] = {"output_dir": "/runs/a", "data_dir": "/data"}
    stored["callbacks"] = {"ckpt": {"dirpath": "/runs/a/checkpoints"}}
    current = compose_cfg("trainer.max_steps=8", "trainer=gpu", "ckpt_path=/runs/a/checkpoints/last.ckpt")
    current.paths.output_dir = "/runs/b"
    merged, changes = resume_config(
        current, stored, ["trainer=gpu", "trainer.max_steps=8", "ckpt_path=/x"], groups={"trainer", "model"}
    )
    assert merged.optim.optimizer.lr == 2e-3  # from the checkpoint, not the defaults (1e-3)
    assert merged.trainer.accelerator == "gpu" and merged.trainer.max_steps == 8
    assert changes == ["trainer=gpu", "trainer.max_steps=8 (was 4)"]
    assert merged.ckpt_path == current.ckpt_path and merged.init_from is None
    assert merged.callbacks.ckpt.dirpath == "/runs/b/checkpoints"  # the run directory moved
    with pytest.raises(ConfigError, match="experiment=vspw: the group experiment .*init_from="):
        resume_config(current, stored, ["experiment=vspw"], groups={"experiment"})


def test_a_resume_announces_the_checkpoints_model_not_the_default_groups(
    compose_cfg, monkeypatch, capsys, tmp_path: Path
) -> None:
    """``ckpt_path=`` alone leaves Hydra's group choices at their defaults (model=segformer encoder=mit_b0): the
    run line names the resumed run's own model (here a PSPNet stage), read from the checkpoint's config."""
    import pytorch_lightning as pl
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from vss.lit import build_module
    from vss.train import train

    run = tmp_path / "run"
    stored = compose_cfg("model=pspnet", "encoder=resnet18", "model.channels=16", f"paths.output_dir={run}")
    with open_dict(stored):
        del stored["hydra"]
    module = build_module(stored, 5, list("abcde"))
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    config = OmegaConf.to_container(stored, resolve=True)
    torch.save({"state_dict": module.state_dict(), "optimizer_states": [{}], "global_step": 2,
                "hyper_parameters": {"config": config}}, ckpt)  # fmt: skip
    current = compose_cfg(f"ckpt_path={ckpt}", f"paths.output_dir={run}")  # as `vss.train ckpt_path=...` composes
    assert current.hydra.runtime.choices.model == "segformer"
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # restored after the test: no Hydra run leaks out
    HydraConfig.instance().set_config(current)
    with open_dict(current):
        del current["hydra"]

    class Announced(Exception):
        pass

    def stop(*args, **kwargs):
        raise Announced

    monkeypatch.setattr(pl, "seed_everything", stop)  # the first thing train() does after the announcement
    with pytest.raises(Announced):
        train(current)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("[vss] train "))
    assert line.startswith("[vss] train model=PSPNet encoder=resnet18: "), line
    assert "segformer" not in out.lower() and "mit_b0" not in out


def test_resume_continues_in_the_checkpoints_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    assert run_dir_of_checkpoint(ckpt) == run
    assert resume_arguments([f"ckpt_path={ckpt}"]) == [
        f"ckpt_path={ckpt}",
        f'hydra.run.dir="{run}"',
        "hydra.output_subdir=null",
    ]
    assert resume_arguments(["-m", f"ckpt_path={ckpt}", "seed=1,2"]) == ["-m", f"ckpt_path={ckpt}", "seed=1,2"]
    loose = tmp_path / "elsewhere.ckpt"  # not inside a run directory: a new run directory
    assert resume_arguments([f"ckpt_path={loose}"]) == [f"ckpt_path={loose}"]


# -- bad input: one line, exit 2, before torch ------------------------------------------------------------
def test_mistyped_key_suggests_the_closest_one_without_importing_torch(cli_env, tmp_path) -> None:
    start = time.monotonic()
    cmd = [sys.executable, "-X", "importtime", "-m", "vss.train", "model=mrcfa", "stm.pp=0.5"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=cli_env, capture_output=True, text=True, timeout=120)
    line = one_line_error(proc)
    assert (
        line == "error: stm.pp is not a key of the train config; did you mean `stm.p`? (`+stm.pp=...` adds a new key)"
    )
    imported = {x.split("|")[-1].strip() for x in proc.stderr.splitlines() if x.startswith("import time:")}
    assert "torch" not in imported and "pytorch_lightning" not in imported and "timm" not in imported
    assert time.monotonic() - start < 60


def test_bad_value_is_reported_before_torch_is_imported(cli_env, tmp_path) -> None:
    cmd = [sys.executable, "-X", "importtime", "-m", "vss.train", "data.train_repeat=0", f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=cli_env, capture_output=True, text=True, timeout=120)
    assert "data.train_repeat=0 is invalid: expected a positive integer" in one_line_error(proc)
    imported = {x.split("|")[-1].strip() for x in proc.stderr.splitlines() if x.startswith("import time:")}
    assert "torch" not in imported, "the value check imported torch"
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["modle=mrcfa"], "modle is not a key of the train config; did you mean `model`?"),
        (["model=mrcfaa"], "Could not find 'model/mrcfaa'; available: feature_pyramid, mrcfa, msaf, "),
        (["trainer.max_step=3"], "did you mean `trainer.max_steps`?"),
    ],
)
def test_command_line_typos(argv: list[str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_command_line("train", argv)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_wandb_without_login_says_how_to_go_offline(compose_cfg, monkeypatch, tmp_path) -> None:
    cfg = compose_cfg("logger=wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(ConfigError, match=r"logger=wandb needs a W&B login .*WANDB_MODE=offline"):
        check_wandb_login(cfg)
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_wandb_login(cfg)
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    check_wandb_login(cfg)  # logged in (wandb login writes this entry)
    check_wandb_login(compose_cfg("logger=csv"))


def test_error_line_starts_on_a_new_line_after_a_progress_bar(capfd) -> None:
    from tqdm import tqdm

    @friendly_errors
    def fails() -> None:
        bar = tqdm(total=10, desc="step", file=sys.stderr)
        bar.update(3)
        raise ConfigError("trainer.max_steps=0 is invalid")

    with pytest.raises(SystemExit) as info:
        fails()
    assert info.value.code == 2
    err = capfd.readouterr().err
    assert "\nerror: trainer.max_steps=0 is invalid\n" in err, repr(err)


# -- checkpoint files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_checkpoints_follow_the_umask(mask: int, mode: int, tmp_path: Path) -> None:
    from vss.checkpoint import atomic_torch_save

    old = os.umask(mask)
    try:
        atomic_torch_save({"x": torch.zeros(2)}, tmp_path / "last.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == mode


def test_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    from vss.checkpoint import remove_stale_temporary_files

    keep = [tmp_path / "last.ckpt", tmp_path / "best-step0000002.ckpt", tmp_path / "notes.tmp"]
    stale = [tmp_path / ".last.ckpt.ab12.tmp", tmp_path / ".best-step0000004.ckpt.cd34.tmp"]
    for p in keep + stale:
        p.write_bytes(b"x")
    assert remove_stale_temporary_files(tmp_path) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(keep)
    assert remove_stale_temporary_files(tmp_path / "missing") == []


# -- overlays -----------------------------------------------------------------------------------------------
def test_overlays_use_the_data_palette_and_draw_a_legend() -> None:
    from vss.callbacks import class_palette, overlay_panel

    colours = [(128, 128, 128), (220, 45, 45), (45, 200, 60), (55, 85, 235), (230, 210, 35)]
    pal = class_palette(5, colours)
    assert pal[1].tolist() == [220, 45, 45] and pal[4].tolist() == [230, 210, 35] and pal[255].tolist() == [0, 0, 0]
    image = np.full((8, 8, 3), 100, np.uint8)
    gt = np.ones((8, 8), np.uint8)  # red everywhere
    gt[0, 0] = 255
    pred = np.full((8, 8), 4, np.uint8)  # yellow everywhere
    panel = overlay_panel(image, pred, gt, pal, ["background", "red", "green", "blue", "yellow"])
    assert panel.shape[1] == 24 and panel.shape[0] > 8  # frame | prediction | truth, legend below
    assert panel[4, 12].tolist() == [165, 155, 67]  # 0.5 * 100 + 0.5 * yellow, floored
    assert panel[4, 20].tolist() == [160, 72, 72]  # 0.5 * 100 + 0.5 * red
    assert panel[0, 16].tolist() == [50, 50, 50]  # ignore: black at 50%
    legend = panel[8:]
    for colour in ([220, 45, 45], [230, 210, 35]):  # the swatches of the classes shown
        assert (legend.reshape(-1, 3) == colour).all(1).any()
    assert not (legend.reshape(-1, 3) == [45, 200, 60]).all(1).any()  # green is not shown


def test_overlay_frames_spread_over_videos_and_hidden_frames(tmp_path: Path) -> None:
    from vss.callbacks import pick_overlay_frames
    from vss.data.vspw import Video

    frames, masks = tuple(Path(f"{t}.jpg") for t in range(20)), tuple(Path(f"{t}.png") for t in range(20))
    videos = [Video(f"v{i}", frames, masks) for i in range(8)]
    for i, hidden in ((0, [5, 6, 7]), (7, [12, 13])):
        (tmp_path / "data" / f"v{i}").mkdir(parents=True)
        info = {"storm": [], "objects": [{"hidden": hidden}]}
        (tmp_path / "data" / f"v{i}" / "hidden.json").write_text(json.dumps(info))
    picks = pick_overlay_frames(videos, 4, tmp_path)
    assert [v for v, _ in picks] == ["v0", "v2", "v5", "v7"]  # spread over the 8 videos
    assert dict(picks)["v0"] == 5 and dict(picks)["v7"] == 12  # where the colour was hidden
    assert dict(picks)["v2"] == 10  # no hidden.json: the middle of the video
    two = pick_overlay_frames(videos[:2], 4, tmp_path)  # fewer videos than images: frames spread inside them
    assert sorted(two) == [("v0", 5), ("v0", 6), ("v1", 6), ("v1", 13)]


def test_overlays_of_sparse_labels_show_labelled_frames(make_data_dir, compose_cfg) -> None:
    """Masks on every 5th frame (as Cityscapes' one in 30): the overlays are of labelled frames, found in the
    pieces the stream runs (numbered from the piece's start), never a frame whose truth is all ignore."""
    from types import SimpleNamespace

    from hydra.utils import instantiate

    from conftest import TINY_DATA
    from vss.callbacks import ValidationImages, pick_overlay_frames
    from vss.data.vspw import Video

    knobs = (*TINY_DATA, "data.synthetic.label_every=5")
    cfg = compose_cfg(*knobs, f"paths.data_dir={make_data_dir(*knobs)}", "model=mrcfa", "data.num_workers=0")
    dm = instantiate(cfg.data)  # MRCFA reads t-9, t-6, t-3: the stream runs frames 0..15 of each video
    videos = dm.videos("val")
    assert all(v.labelled == (0, 5, 10, 15) for v in videos)
    picks = pick_overlay_frames(videos, 4)
    assert picks == [(videos[0].name, 5), (videos[0].name, 10), (videos[1].name, 5), (videos[1].name, 10)]
    odd = [Video("w", tuple(Path(f"{t}.jpg") for t in range(30)), (None,) * 19 + (Path("19.png"),) + (None,) * 10)]
    assert pick_overlay_frames(odd, 4) == [("w", 19)]  # one labelled frame in 30: that one, once

    callback = ValidationImages(num_images=4)
    trainer = SimpleNamespace(datamodule=dm, sanity_checking=False, is_global_zero=True)
    callback.on_validation_epoch_start(trainer, None)
    for item in dm.eval_dataset("val"):
        callback.on_validation_batch_end(trainer, None, {"items": [item], "preds": [item["labels"]]}, None, 0)
    kept = callback._kept
    assert [o["name"] for o in kept] == [f"{v}_{t:05d}" for v, t in picks]
    assert all((o["gt"] != 255).any() for o in kept)


# -- sweeps -------------------------------------------------------------------------------------------------
def test_sweep_table_marks_the_best_job(tmp_path: Path) -> None:
    from vss.sweep import sweep_rows, write_sweep_table

    for job, (lr, miou) in enumerate([("1e-3", 0.61), ("2e-3", 0.66), ("4e-3", 0.58)]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(f"- seed=42\n- optim.optimizer.lr={lr}\n")
        metrics = {"step": 4, "val": {"mIoU": miou, "mVC8": 0.9}}
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps(metrics))
    text = write_sweep_table(tmp_path, sweep_rows(tmp_path, ("mIoU", "mVC8")), ("mIoU", "mVC8"), "mIoU")
    assert "| job | optim.optimizer.lr | mIoU | mVC8 | best |" in text  # seed is the same in every job
    assert "| 1 | 2e-3 | 66.0 | 90.0 | * |" in text and "| 0 | 1e-3 | 61.0 | 90.0 |  |" in text
    assert (tmp_path / "sweep.md").read_text().count("*") == 2  # the note and the best row
    csv_rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert csv_rows[0] == "job,optim.optimizer.lr,mIoU,mVC8,best" and csv_rows[2] == "1,2e-3,0.66,0.9,1"


@pytest.mark.parametrize("program", ["eval", "predict", "bench"])
def test_every_entry_point_reports_a_mistyped_key_in_one_line(program: str, monkeypatch, capsys) -> None:
    """``vss.eval`` / ``vss.predict`` / ``vss.bench`` check the command line before Hydra runs, as ``vss.train``."""
    module = importlib.import_module(f"vss.{program}")
    monkeypatch.setattr(sys, "argv", [program, "ckpt_pth=x.ckpt"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"ckpt_pth is not a key of the {program} config" in err[0], err


# -- issue 27: every bad file and value is one line; no untrusted pickle is ever executed -------------------------
def _module_cli(program: str, *args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"vss.{program}", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


class SideEffect:
    """Unpickling it runs ``touch MARKER`` (what a hostile checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _vss_checkpoint(embed_dim: int = 8) -> dict[str, Any]:
    """A small vss checkpoint as vss.train writes it (state_dict with the ``segmenter.`` prefix + the config)."""
    from conftest import TINY_DATA, compose_train
    from vss.lit import build_module

    cfg = compose_train([*TINY_DATA, "data.scale=[32,32]", f"model.embed_dim={embed_dim}"])
    config = OmegaConf.to_container(cfg, resolve=False)
    config.pop("hydra")
    config["paths"] = {"output_dir": "/unused", "data_dir": "/unused", "log_dir": "/unused", "root_dir": "."}
    cfg = OmegaConf.create(config)
    config = OmegaConf.to_container(cfg, resolve=True)  # as vss.train stores it: resolved, plain containers
    module = build_module(cfg, int(cfg.data.num_classes), [str(i) for i in range(int(cfg.data.num_classes))])
    return {"state_dict": module.state_dict(), "hyper_parameters": {"config": config}, "global_step": 3}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-ckpt") / "tiny.ckpt"
    torch.save(_vss_checkpoint(), path)
    return path


def _bad_files(root: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of bad model file and the words of its one-line refusal."""
    files: dict[str, tuple[Path, str]] = {}
    (root / "random.bin").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    files["random bytes"] = (root / "random.bin", "cannot be read as a checkpoint: it is binary data")
    (root / "notes.txt").write_text("not a checkpoint at all\n")
    files["text"] = (root / "notes.txt", "it is a text file (it starts with 'not a checkpoint at all')")
    raw = good.read_bytes()
    (root / "truncated.ckpt").write_bytes(raw[: len(raw) // 2])
    files["truncated"] = (root / "truncated.ckpt", "is a truncated or damaged archive")
    torch.save(torch.zeros(3), root / "tensor.pt")
    files["bare tensor"] = (root / "tensor.pt", "is not a vss checkpoint: it holds a bare tensor; expected a vss")
    ckpt = torch.load(good, weights_only=True)
    torch.save(ckpt["state_dict"], root / "state.pt")
    files["state dict without config"] = (root / "state.pt", "holds a bare state dict of")
    torch.save({**ckpt, "hyper_parameters": {"num_classes": 5}}, root / "noconfig.ckpt")
    files["Lightning without config"] = (root / "noconfig.ckpt", "has a state_dict but no hyper_parameters.config")
    return files


@pytest.mark.parametrize(
    "kind",
    ["random bytes", "text", "truncated", "bare tensor", "state dict without config", "Lightning without config"],
)
def test_each_kind_of_bad_model_file_is_one_line(kind: str, tiny_ckpt: Path, tmp_path: Path) -> None:
    from vss.checkpoint import CheckpointError, load_checkpoint

    path, words = _bad_files(tmp_path, tiny_ckpt)[kind]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, key="ckpt_path")
    message = str(info.value)
    assert message.startswith(f"ckpt_path={str(path)!r}") and words in message and "\n" not in message


def test_bad_model_files_on_the_command_lines(tiny_ckpt: Path, cli_env, tmp_path: Path) -> None:
    """vss.eval ckpt_path= and vss.convert --src: one line, exit 2 (a trace, exit 1, before)."""
    files = _bad_files(tmp_path, tiny_ckpt)
    path, words = files["bare tensor"]
    eval_line = one_line_error(_module_cli("eval", f"ckpt_path={path}", f"hydra.run.dir={tmp_path}/e", env=cli_env))
    assert words in eval_line
    path, words = files["random bytes"]
    convert = _module_cli("convert", "--src", str(path), "--dst", str(tmp_path / "x.ckpt"), env=cli_env)
    assert f"--src={str(path)!r} cannot be read as a checkpoint: it is binary data" in one_line_error(convert)


def test_a_vss_train_checkpoint_loads_weights_only(five_step_run) -> None:
    """What vss.train writes (hyper_parameters, callback and loop state) is plain containers and tensors: it loads
    with weights_only=True, no trust needed."""
    from vss.checkpoint import load_checkpoint

    assert five_step_run.returncode == 0, five_step_run.stderr[-2000:]
    run_dir = Path(re.search(r"\[vss\] run directory: (\S+)", five_step_run.stdout).group(1))
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        ckpt = load_checkpoint(path, expect="vss")
        assert ckpt["global_step"] == 5 or "best" in path.name
        assert isinstance(ckpt["hyper_parameters"]["config"], dict)


@pytest.fixture
def side_effect_file(tiny_ckpt: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A vss checkpoint carrying an object whose unpickling creates ``marker``; returns (file, marker)."""
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / "hostile.ckpt"
    torch.save({**torch.load(tiny_ckpt, weights_only=True), "extra": SideEffect(marker)}, path)
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize(
    ("program", "args", "flag"),
    [
        ("eval", ["ckpt_path={f}", "hydra.run.dir={d}/run"], "trust_pickle=true"),
        pytest.param(  # the same reader as eval's (load_module); under -m slow
            "predict",
            ["ckpt_path={f}", "source={d}", "output={d}/out", "hydra.run.dir={d}/run"],
            "trust_pickle=true",
            marks=pytest.mark.slow,
        ),
        ("convert", ["--model", "mrcfa", "--src", "{f}", "--dst", "{d}/x.ckpt"], "--trust-pickle"),
        pytest.param(  # the same reader as eval's (load_checkpoint); a training run under -m slow
            "train",
            ["init_from={f}", "paths.log_dir={d}/logs", "trainer.max_steps=1"],
            "trust_pickle=true",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_pickle_with_a_side_effect_is_never_unpickled(
    program: str, args: list[str], flag: str, side_effect_file: tuple[Path, Path], cli_env, tmp_path: Path
) -> None:
    path, marker = side_effect_file
    cv2 = pytest.importorskip("cv2")
    cv2.imwrite(str(tmp_path / "000.png"), np.zeros((32, 32, 3), np.uint8))  # predict's source folder
    proc = _module_cli(program, *(a.format(f=path, d=tmp_path) for a in args), env=cli_env)
    line = one_line_error(proc)
    assert "needs full unpickling (it names the Python object posix.system)" in line and line.endswith(flag), line
    assert str(path) in line
    assert not marker.exists(), "the file's code ran"


def test_model_memory_and_resume_refuse_a_pickle(side_effect_file: tuple[Path, Path]) -> None:
    from vss.models.aggregators.stf_mar import load_memory
    from vss.stages import read_checkpoint

    path, marker = side_effect_file
    with pytest.raises(ConfigError, match=r"^model.memory=.* needs full unpickling .*expected tensors and plain"):
        load_memory(path)
    with pytest.raises(ConfigError, match=r"^ckpt_path=.* needs full unpickling .*pass trust_pickle=true$"):
        read_checkpoint(path, "ckpt_path", mmap=True)
    assert not marker.exists()


def test_trust_pickle_does_unpickle(side_effect_file: tuple[Path, Path]) -> None:
    """The one controlled run of the flag: it reaches full unpickling (the marker appears), as documented."""
    from vss.checkpoint import load_checkpoint

    path, marker = side_effect_file
    ckpt = load_checkpoint(path, trust_pickle=True)
    assert marker.exists() and ckpt["global_step"] == 3


# -- a checkpoint that does not fit its overrides ---------------------------------------------------------------
def test_a_shape_changing_override_names_the_tensor_and_the_override(tiny_ckpt: Path) -> None:
    from vss.lit import load_module

    with pytest.raises(ConfigError) as info:
        load_module(tiny_ckpt, overrides={"model": {"embed_dim": 16}})
    message = str(info.value)
    assert "\n" not in message
    assert re.search(
        r"does not fit the model built with the overrides model.embed_dim=16 \(stored: 8\): segmenter\.\S+ is "
        r"\(8(, \d+)*\) in the checkpoint, \(16(, \d+)*\) in the model \(\d+ tensors differ\)",
        message,
    ), message
    loaded = load_module(tiny_ckpt, overrides={"model": {"embed_dim": 8}})  # the stored value: fits
    assert loaded.config.model.embed_dim == 8 and not loaded.module.training


def test_eval_applies_and_checks_model_overrides(tiny_ckpt: Path, cli_env, tmp_path: Path) -> None:
    proc = _module_cli(
        "eval", f"ckpt_path={tiny_ckpt}", "+model.embed_dim=16", f"hydra.run.dir={tmp_path}", env=cli_env
    )
    assert "the overrides model.embed_dim=16 (stored: 8)" in one_line_error(proc)


# -- config values refused at config time ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("seed=abc", "seed='abc' is invalid: expected an integer"),
        ("seed=-1", "seed=-1 is invalid"),
        ("data.num_workers=-1", "data.num_workers=-1 is invalid: expected a non-negative integer"),
        ("optim.optimizer.lr=inf", "optim.optimizer.lr=inf is invalid: expected a positive finite number"),
        ("optim.optimizer.lr=nan", "optim.optimizer.lr=nan is invalid"),
        ("optim.optimizer.lr=0", "optim.optimizer.lr=0 is invalid"),
        ("optim.optimizer.lr=-1", "optim.optimizer.lr=-1 is invalid"),
        ("optim.optimizer.weight_decay=inf", "optim.optimizer.weight_decay=inf is invalid"),
        ("model.dropout=1.5", "model.dropout=1.5 is invalid: expected a rate in [0, 1)"),
        ("optim.optimizer._target_=os.system", "optim.optimizer._target_='os.system' is refused"),
    ],
)
def test_bad_train_values_are_refused_at_config_time(override: str, words: str, compose_cfg) -> None:
    from vss.validation import check_train_values

    with pytest.raises(ConfigError) as info:
        check_train_values(compose_cfg(override))
    assert words in str(info.value)


def test_lr_inf_is_one_line_before_training(cli_env, tmp_path: Path) -> None:
    """It was a trace ending in ``loss is nan at step 1`` after Lightning's banner; now refused before torch."""
    proc = _module_cli("train", "optim.optimizer.lr=inf", f"paths.log_dir={tmp_path}", env=cli_env)
    assert "optim.optimizer.lr=inf is invalid" in one_line_error(proc)
    assert "GPU available" not in proc.stdout + proc.stderr and not list(tmp_path.rglob("*.ckpt"))


def _numeric_leaves(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys of the int/float leaves of a composed config (a list element: ``key.[i]``)."""
    from omegaconf import DictConfig, ListConfig

    keys: list[str] = []
    if isinstance(node, DictConfig):
        for k in node:
            if not OmegaConf.is_missing(node, k) and k != "hydra":
                keys += _numeric_leaves(node._get_node(k), f"{prefix}{k}.")
    elif isinstance(node, ListConfig) and not node._is_none():
        for i in range(len(node)):
            keys += _numeric_leaves(node._get_node(i), f"{prefix}[{i}].")
    elif isinstance(node._value(), int | float) and not isinstance(node._value(), bool):
        keys.append(prefix[:-1])
    return keys


CHECKED_ELSEWHERE = {
    "model.offsets": "vss.offsets.check_offsets, from check_model_values (a list of ints, its own rules)",
    "model.memory": "STFMAR's memory builder reads the file (its keys_per_class, values_per_class)",
}
"""Numeric keys that ``validate_train_config`` leaves to another check (where, in the value)."""

TRAIN_VARIANTS = [
    [],
    *([f"model={m.stem}"] for m in sorted((REPO_ROOT / "conf" / "model").glob("*.yaml"))),
    *([f"data={d.stem}"] for d in sorted((REPO_ROOT / "conf" / "data").glob("*.yaml"))),
    ["optim=sgd"],
]


@pytest.mark.parametrize("variant", TRAIN_VARIANTS, ids=lambda v: " ".join(v) or "default")
def test_every_numeric_key_of_the_train_config_is_checked(variant: list[str], compose_cfg, tmp_path: Path) -> None:
    """Each int/float leaf set to nan (no valid value of any key) is refused by check_train_values naming it: a new
    numeric key without a check fails here (or gets a line in CHECKED_ELSEWHERE saying where it is checked). The
    method's own keys (``stm.*``) are its ``check_config``'s, which validate_train_config calls."""
    from vss.validation import check_train_values, validate_train_config

    base = compose_cfg(*variant, f"data.root={tmp_path}")
    check_train_values(base)  # the shipped config passes
    keys = _numeric_leaves(base)
    assert "optim.optimizer.lr" in keys and "seed" in keys
    unchecked = _unchecked_numeric_keys(base, validate_train_config, lambda owner: (owner, f" {owner}="), contains=True)
    assert not unchecked, f"numeric keys without a check (add a row to vss.validation.NUMERIC_CHECKS): {unchecked}"


def _unchecked_numeric_keys(
    base: Any, check: Any, names: Any = lambda owner: (f"{owner}=",), contains: bool = False
) -> list[str]:
    """The numeric leaves of ``base`` (save :data:`CHECKED_ELSEWHERE`) that ``check`` accepts when set to nan; a
    refusal must name the key (its message starts with one of ``names(owner)``, or contains one with ``contains``)."""
    unchecked = []
    for key in _numeric_leaves(base):
        owner = key.split(".[", 1)[0]
        if any(owner == k or owner.startswith(k + ".") for k in CHECKED_ELSEWHERE):
            continue
        cfg = base.copy()
        if ".[" in key:
            OmegaConf.select(cfg, owner)[int(key.rsplit("[", 1)[1][:-1])] = float("nan")
        else:
            OmegaConf.update(cfg, key, float("nan"), merge=False)
        try:
            check(cfg)
            unchecked.append(key)
        except ConfigError as e:
            message, expected = str(e), names(owner)
            named = any(n in message for n in expected) if contains else message.startswith(expected)
            assert named, (key, message)
    return unchecked


@pytest.mark.parametrize(
    ("program", "override", "words"),
    [
        ("eval", "num_workers=-1", "num_workers=-1 is invalid: expected a non-negative integer"),
        ("eval", "+model.embed_dim=0", "model.embed_dim=0 is invalid"),
        ("predict", "opacity=nan", "opacity=nan is invalid"),
        ("predict", "batch_size=0", "batch_size=0 is invalid"),
        ("predict", "fps=inf", "fps=inf is invalid"),
        ("bench", "height=0", "height=0 is invalid"),
        ("bench", "model.dropout=inf", "model.dropout=inf is invalid"),
    ],
)
def test_bad_eval_predict_bench_values_are_one_line(
    program: str, override: str, words: str, monkeypatch, capsys, tmp_path: Path
) -> None:
    module = importlib.import_module(f"vss.{program}")
    given = {"eval": ["ckpt_path=/nonexistent.ckpt"], "predict": ["ckpt_path=/x.ckpt", f"source={tmp_path}"]}
    argv = [*given.get(program, []), override, f"hydra.run.dir={tmp_path}/run", "device=cpu"]
    monkeypatch.setattr(sys, "argv", [program, *argv])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


@pytest.mark.parametrize("program", ["eval", "predict", "bench"])
def test_device_cuda_without_cuda_is_one_line(program: str, monkeypatch, capsys, tmp_path: Path) -> None:
    module = importlib.import_module(f"vss.{program}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    given = {"eval": ["ckpt_path=/nonexistent.ckpt"], "predict": ["ckpt_path=/x.ckpt", f"source={tmp_path}"]}
    monkeypatch.setattr(sys, "argv", [program, *given.get(program, []), "device=cuda", f"hydra.run.dir={tmp_path}/r"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: device=cuda but torch.cuda.is_available() is False (no GPU): use device=cpu"]


def test_device_auto_picks_what_exists(monkeypatch) -> None:
    from vss.validation import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match="^device='gpu0' is invalid: expected auto, cpu or cuda"):
        resolve_device("gpu0")


# -- outputs: a file, a read-only disk, a full disk --------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``tmpfs(options)``: a fresh tmpfs mounted in tmp_path (root only; skipped where mount is not permitted)."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        path = tmp_path / f"mnt{len(mounted)}"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip() or 'not root'})")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_predict_output_that_is_a_file(tiny_ckpt: Path, cli_env, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x")
    cv2 = pytest.importorskip("cv2")
    cv2.imwrite(str(tmp_path / "000.png"), np.zeros((32, 32, 3), np.uint8))
    args = [f"ckpt_path={tiny_ckpt}", f"source={tmp_path / '000.png'}", f"hydra.run.dir={tmp_path}/run"]
    line = one_line_error(_module_cli("predict", *args, f"output={tmp_path / 'taken'}", env=cli_env))
    taken = str(tmp_path / "taken")
    assert line == f"error: output={taken!r} is a file, not a directory: pass a directory (created if missing)"


def test_read_only_outputs_are_one_line(tiny_ckpt: Path, tmpfs, cli_env, tmp_path: Path) -> None:
    ro = tmpfs("ro,size=1m")
    cv2 = pytest.importorskip("cv2")
    cv2.imwrite(str(tmp_path / "000.png"), np.zeros((32, 32, 3), np.uint8))
    args = [f"ckpt_path={tiny_ckpt}", f"source={tmp_path / '000.png'}", f"hydra.run.dir={tmp_path}/run"]
    line = one_line_error(_module_cli("predict", *args, f"output={ro}/p", env=cli_env))
    assert line.startswith(f"error: output='{ro}/p' cannot be written: Read-only file system"), line
    line = one_line_error(_module_cli("eval", f"ckpt_path={tiny_ckpt}", f"hydra.run.dir={ro}/e", env=cli_env))
    assert f"the run directory {ro}/e cannot be created: {ro} is on a read-only file system" in line, line


def test_a_disk_that_fills_up_mid_prediction(tiny_ckpt: Path, tmpfs, cli_env, tmp_path: Path) -> None:
    """A full disk mid-run: one line naming the file; what is left does not look complete (no predict.json, no
    video, no temporary file); with room again the same command completes (the leftovers are cleared)."""
    cv2 = pytest.importorskip("cv2")
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # noise: each PNG ~240 KB, the videos larger still
        cv2.imwrite(str(frames / f"{i:03d}.png"), rng.integers(0, 256, (256, 320, 3), dtype=np.uint8))
    disk = tmpfs("size=256k")
    args = [f"ckpt_path={tiny_ckpt}", f"source={frames}", f"output={disk}/p", "side_by_side=true"]
    args += [f"hydra.run.dir={tmp_path}/run", "device=cpu", "progress=false"]
    line = one_line_error(_module_cli("predict", *args, env=cli_env))
    assert re.match(rf"error: cannot write '{disk}/p/\S+': No space left on device \(the disk is full", line), line
    left = sorted(p.name for p in (disk / "p").rglob("*") if p.is_file())
    assert "predict.json" not in left and not [n for n in left if n.endswith((".mp4", ".partial"))], left
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    again = _module_cli("predict", *args, env=cli_env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "files of an unfinished prediction (no predict.json)" in again.stdout + again.stderr
    summary = json.loads((disk / "p" / "predict.json").read_text())
    assert summary["frames"] == 6 and len(list((disk / "p" / "masks").glob("*.png"))) == 6


# -- quiet errors ------------------------------------------------------------------------------------------------
def test_a_data_error_has_no_lightning_banner_before_it(tiny_args, cli_env, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a for a in tiny_args(tmp_path / "logs") if a != "debug=tiny" and "synthetic" not in a]  # real data
    proc = subprocess.run(
        cli_command([*args, "data=vspw", f"data.root={empty}", "data.num_classes=5", "data.num_workers=0"]),
        cwd=REPO_ROOT,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert f"split file {empty}/train.txt is missing" in one_line_error(proc)
    assert "GPU available" not in proc.stdout + proc.stderr and "TPU available" not in proc.stdout + proc.stderr


def test_a_crafted_target_in_a_checkpoint_is_one_line(tiny_ckpt: Path, tmp_path: Path) -> None:
    from vss.lit import read_module_checkpoint

    ckpt = torch.load(tiny_ckpt, weights_only=True)
    for key, allowed in (("model", "vss.models.aggregators."), ("data", "'torch.optim.', 'vss.'")):
        crafted = json.loads(json.dumps(ckpt["hyper_parameters"]))
        crafted["config"][key]["_target_"] = "os.system"
        torch.save({**ckpt, "hyper_parameters": crafted}, tmp_path / f"{key}.ckpt")
        with pytest.raises(ConfigError) as info:
            read_module_checkpoint(tmp_path / f"{key}.ckpt")
        assert f"its config's {key}._target_='os.system' is refused: a _target_ must name a callable under" in str(
            info.value
        )
        assert allowed in str(info.value)


def test_target_prefixes_come_from_the_shipped_configs() -> None:
    from vss.validation import target_prefixes

    prefixes = target_prefixes()
    assert "vss." in prefixes and "torch.optim." in prefixes and "pytorch_lightning.callbacks." in prefixes
    assert not any(p.startswith(("os", "subprocess", "builtins")) for p in prefixes)


ENTRY_CHECKS = {  # config -> (module, the function that checks it first, the required values)
    "eval": ("vss.eval", "evaluate", ["ckpt_path=/nonexistent.ckpt"]),
    "predict": ("vss.predict", "predict", ["ckpt_path=/nonexistent.ckpt", "source=/nonexistent.mp4"]),
    "export": ("vss.export", "export", ["ckpt_path=/nonexistent.ckpt", "height=64", "width=64"]),
    "bench": ("vss.bench", "check_bench_config", []),
    "bench model=msaf": ("vss.bench", "check_bench_config", ["model=msaf", "encoder=resnet18", "mode=train"]),
}


@pytest.mark.parametrize("name", list(ENTRY_CHECKS))
def test_every_numeric_key_of_the_other_entry_configs_is_checked(name: str, tmp_path: Path) -> None:
    """eval / predict / export / bench: each int/float leaf of the composed config set to nan is refused first,
    naming the key (before any checkpoint or source is read): a new numeric key without a check fails here."""
    import importlib

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vss.config import CONF_DIR, register_resolvers

    module, function, required = ENTRY_CHECKS[name]
    check = getattr(importlib.import_module(module), function)
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose(name.split()[0], overrides=[*required, *name.split()[1:], f"hydra.run.dir={tmp_path}"])
    GlobalHydra.instance().clear()
    if "output" in base:
        base.output = str(tmp_path / "out")
    assert _numeric_leaves(base)
    # bench's batch_size follows batch: a bad batch is named as either
    unchecked = _unchecked_numeric_keys(
        base, check, lambda k: ("batch_size=", "batch=") if k == "batch" else (f"{k}=",)
    )
    assert not unchecked, f"numeric keys of {name} without a check: {unchecked}"
