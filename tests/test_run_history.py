"""A run's ``metrics.csv`` survives kills: a resume goes on from the rows logged before its checkpoint (never
deleting the file), every save replaces it atomically, every checkpoint saves it; a completed resume has each row
once."""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

import pytest
import torch

from test_train_cli import ckpt_step, only_run_dir, read_csv, report
from vss.loggers import CSVLogger, HistoryWriter, logged_before, write_rows_atomically


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def holds(rows: list[dict[str, str]], row: dict[str, str]) -> bool:
    """Whether ``rows`` has ``row`` (its non-empty values; columns added later are empty in it)."""
    want = {k: v for k, v in row.items() if v}
    return any(all(r.get(k) == v for k, v in want.items()) for r in rows)


@pytest.mark.slow  # a SIGKILLed resume; the default run keeps the SIGTERM and resume-row tests
def test_a_resume_killed_with_sigkill_keeps_every_earlier_row(five_step_run, start_cli, run_cli, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(only_run_dir(five_step_run), run_dir)
    metrics_csv = run_dir / "csv" / "metrics.csv"
    before = csv_rows(metrics_csv)
    assert [int(r["step"]) for r in before if r.get("val/mIoU")] == [2, 4, 5]
    # a checkpoint of a run started before vss.loggers: its stored config names Lightning's CSVLogger, which
    # deletes metrics.csv when it starts; the resume uses vss's
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["config"]["logger"]["csv"]["_target_"] = "pytorch_lightning.loggers.CSVLogger"
    torch.save(ckpt, last)

    proc = start_cli("trainer.max_steps=200", f"ckpt_path={last}")
    deadline = time.monotonic() + 300
    while not (run_dir / "overlays" / "step0000010").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.kill()  # SIGKILL: no handler, no finally
    proc.communicate(timeout=60)

    after = csv_rows(metrics_csv)
    missing = [r for r in before if not holds(after, r)]
    assert not missing, f"{len(missing)} rows of the run before the resume are gone, e.g. {missing[0]}"
    saved = ckpt_step(last)
    assert saved >= 8
    val_steps = [int(r["step"]) for r in after if r.get("val/mIoU")]
    assert val_steps[: 3 + (saved - 4) // 2] == [2, 4, 5, *range(6, saved + 1, 2)]  # as far as last.ckpt, once

    # resumed again, to completion: each training step and each validation exactly once
    done = run_cli(f"trainer.max_steps={saved + 3}", f"ckpt_path={last}")
    assert only_run_dir(done) == run_dir, report(done)
    rows = read_csv(run_dir)
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(saved + 3))
    assert [int(r["step"]) for r in rows if r.get("val/mIoU")] == [2, 4, 5, *range(6, saved + 3, 2), saved + 3]
    assert all(holds(rows, r) for r in before)
    assert not list((run_dir / "csv").glob(".*.tmp")), "a temporary file of a killed save was left behind"


def test_a_kill_mid_save_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    write_rows_atomically(path, ["step", "val/mIoU"], [{"step": 2, "val/mIoU": 0.5}])
    before = path.read_text()

    def killed(*args: object) -> None:
        raise KeyboardInterrupt  # as a signal arriving mid-write

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        write_rows_atomically(path, ["step", "val/mIoU"], [{"step": 2, "val/mIoU": 0.5}, {"step": 4, "val/mIoU": 0.6}])
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_resume_at_keeps_the_rows_before_the_checkpoint(tmp_path):
    log_dir = tmp_path / "csv"
    log_dir.mkdir()
    rows = [
        {"step": "3", "train/loss": "1.0", "val/mIoU": ""},
        {"step": "4", "train/loss": "", "val/mIoU": "0.25"},  # the checkpoint's own validation: kept
        {"step": "4", "train/loss": "0.9", "val/mIoU": ""},  # trained again by the resume: dropped
        {"step": "5", "train/loss": "0.8", "val/mIoU": ""},
    ]
    write_rows_atomically(log_dir / "metrics.csv", ["step", "train/loss", "val/mIoU"], rows)
    assert [logged_before(r, 4) for r in rows] == [True, True, False, False]
    (log_dir / ".metrics.csv.ab12.tmp").write_text("step,tor")  # a save killed half-way

    logger = CSVLogger(save_dir=tmp_path, name="csv", version="")
    assert logger.resume_at(4) == {4: {"mIoU": 0.25}}
    assert isinstance(logger.experiment, HistoryWriter)
    assert csv_rows(log_dir / "metrics.csv") == rows  # nothing deleted or rewritten before the first save
    assert not (log_dir / ".metrics.csv.ab12.tmp").exists()
    logger.log_metrics({"train/loss": 0.7, "val/fwIoU": 0.1}, step=4)
    logger.save()
    got = csv_rows(log_dir / "metrics.csv")
    assert [(r["step"], r["train/loss"], r["val/mIoU"], r["val/fwIoU"]) for r in got] == [
        ("3", "1.0", "", ""),
        ("4", "", "0.25", ""),
        ("4", "0.7", "", "0.1"),
    ]
    with pytest.raises(RuntimeError, match="before the first log"):
        logger.resume_at(4)
