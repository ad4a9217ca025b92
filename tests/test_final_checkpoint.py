"""Nothing lost at the end of a run: the final step is validated and saved as ``last.ckpt`` whatever ``max_steps``
(not a multiple of ``val_check_interval``, or below it), and the summary compares the best checkpoint with the final
weights by their numbers."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_train_cli import STEP_RE, ckpt_step, only_run_dir, read_csv, read_metrics, report
from vss.train import compare_best

BEST_RE = re.compile(r"^\[vss\] best checkpoint: (\S+) \(step (\d+): (.*)\); (.*)$", re.MULTILINE)


def val_miou(run_dir: Path) -> dict[int, float]:
    """metrics.csv's validation rows: step -> val/mIoU, in file order."""
    return {int(r["step"]): float(r["val/mIoU"]) for r in read_csv(run_dir) if r.get("val/mIoU")}


def assert_summary(proc: subprocess.CompletedProcess, run_dir: Path, final_step: int) -> None:
    """The summary lines name the final step's numbers and the best checkpoint's, as metrics.json/.csv hold them."""
    metrics, val = read_metrics(run_dir), val_miou(run_dir)
    assert metrics["step"] == final_step and val[final_step] == pytest.approx(metrics["val"]["mIoU"], abs=1e-6)
    (step_line,) = STEP_RE.findall(proc.stdout)
    assert step_line[0] == str(final_step) and f"val mIoU {metrics['val']['mIoU']:.4f}" in step_line[1]
    best_step = max(val, key=lambda s: (round(val[s], 6), -s))  # Lightning keeps the earlier of equal scores
    (best_ckpt,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    assert ckpt_step(best_ckpt) == best_step == metrics["best"]["step"]
    (line,) = BEST_RE.findall(proc.stdout)
    assert line[:2] == (str(best_ckpt), str(best_step)) and f"val mIoU {val[best_step]:.4f}" in line[2], line
    if best_step == final_step:
        assert line[3] == "the final weights"
    else:  # the final step was validated in fit, so the best one beats it (or ties at 4 decimals)
        shown = f"the final weights (step {final_step}, last.ckpt: mIoU {val[final_step]:.4f})"
        assert line[3] in (f"beats {shown}", f"ties with {shown}"), line[3]
        assert val[best_step] >= val[final_step]


@pytest.fixture
def five_steps(five_step_run) -> tuple[subprocess.CompletedProcess, Path]:
    """The session's 5-step run (validation every 2 steps): (process, run directory)."""
    return five_step_run, only_run_dir(five_step_run)


def test_max_steps_not_a_multiple_of_the_interval(five_steps):
    proc, run_dir = five_steps
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 5, report(proc)
    assert list(val_miou(run_dir)) == [2, 4, 5]  # the final step validated once, in fit
    assert sorted(p.name for p in (run_dir / "overlays").iterdir()) == ["step0000002", "step0000004", "step0000005"]
    assert_summary(proc, run_dir, 5)
    train_steps = [int(r["step"]) for r in read_csv(run_dir) if r.get("train/loss")]
    assert train_steps == [0, 1, 2, 3, 4]


def test_max_steps_below_the_interval(run_cli, tiny_overrides):
    proc = run_cli(*tiny_overrides, "trainer.max_steps=3", "trainer.val_check_interval=10")
    run_dir = only_run_dir(proc)
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 3
    assert list(val_miou(run_dir)) == [3]
    assert_summary(proc, run_dir, 3)
    assert BEST_RE.search(proc.stdout)[4] == "the final weights"


def test_resume_from_a_final_step_off_the_interval(five_steps, run_cli, tmp_path):
    """last.ckpt of step 5 (validation every 2 steps) resumes to step 8: each step trained and logged once, the
    validations of steps 6 and 8 follow, last.ckpt is step 8."""
    run_dir = tmp_path / "run"
    shutil.copytree(five_steps[1], run_dir)
    proc = run_cli("trainer.max_steps=8", f"ckpt_path={run_dir}/checkpoints/last.ckpt")
    assert only_run_dir(proc) == run_dir
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 8
    rows = read_csv(run_dir)
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(8))
    assert list(val_miou(run_dir)) == [2, 4, 5, 6, 8]
    assert re.search(r"^\[vss\] step 8: val mIoU", proc.stdout, re.MULTILINE), report(proc)


@pytest.mark.parametrize(
    ("best", "final", "step", "mode", "verdict"),
    [
        (0.1682, 0.1781, 10, "max", "the final weights do better (step 15, last.ckpt: mIoU 0.1781)"),
        (0.5753, 0.5638, 10, "max", "beats the final weights (step 15, last.ckpt: mIoU 0.5638)"),
        (0.56381, 0.56379, 10, "max", "ties with the final weights (step 15, last.ckpt: mIoU 0.5638)"),
        (0.30, 0.40, 10, "min", "beats the final weights (step 15, last.ckpt: mIoU 0.4000)"),
        (0.5753, 0.5753, 15, "max", "the final weights"),
    ],
)
def test_compare_best_says_what_the_numbers_say(best, final, step, mode, verdict):
    assert compare_best(best, final, step, 15, "mIoU", mode) == verdict
