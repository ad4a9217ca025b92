"""The run's ``metrics.csv``: Lightning's CSV logger made safe against kills and resumes. Every save replaces the
file atomically (a kill leaves the previous complete file), every checkpoint saves it (the history reaches the
checkpoint's step), and a resumed run continues the file from the rows logged before its checkpoint instead of
deleting it."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from vss.checkpoint import umask


def logged_before(row: Mapping[str, str], step: int) -> bool:
    """Whether a ``metrics.csv`` row was logged before a checkpoint of ``step``: earlier steps, and the validation of
    the checkpoint's own step (the training rows of that step come again from the resumed run)."""
    s = int(row["step"])
    return s < step or (s == step and any(v and k.startswith(("val/", "test/")) for k, v in row.items()))


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of a ``metrics.csv`` (none when the file is absent)."""
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r.get("step")]  # not a torn last line
        return list(reader.fieldnames or []), rows


def write_rows_atomically(path: Path, keys: list[str], rows: list[Mapping[str, Any]]) -> None:
    """Write ``rows`` under the header ``keys`` to a temporary file next to ``path``, fsync, rename over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class HistoryWriter(ExperimentWriter):
    """Lightning's CSV experiment writer, keeping every row of the run in memory and replacing ``metrics.csv``
    atomically at each save; ``kept`` rows (a resumed run's history) come first, the file is not deleted."""

    def __init__(self, log_dir: str, kept: tuple[list[str], list[dict[str, str]]] | None = None) -> None:
        self.kept = kept
        super().__init__(log_dir)
        self.rows: list[Mapping[str, Any]] = []
        if kept is not None:
            self.metrics_keys, self.rows = sorted(kept[0]), list(kept[1])

    def _check_log_dir_exists(self) -> None:
        folder = Path(self.metrics_file_path).parent
        for stale in folder.glob(f".{Path(self.metrics_file_path).name}.*.tmp") if folder.is_dir() else []:
            stale.unlink(missing_ok=True)  # a save killed half-way
        if self.kept is None:  # a new run: Lightning's check (an older metrics.csv in its folder is deleted)
            super()._check_log_dir_exists()

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()
        self.rows += self.metrics
        self.metrics = []
        write_rows_atomically(Path(self.metrics_file_path), self.metrics_keys, self.rows)


class CSVLogger(LightningCSVLogger):
    """``pytorch_lightning.loggers.CSVLogger`` writing through :class:`HistoryWriter`, saved at every checkpoint;
    :meth:`resume_at` (before the first log) continues the run's ``metrics.csv`` from a checkpoint's step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kept: tuple[list[str], list[dict[str, str]]] | None = None

    def resume_at(self, step: int) -> dict[int, dict[str, float]]:
        """Keep the rows of ``metrics.csv`` logged before a checkpoint of ``step``; returns their validation
        metrics by step (``{2: {"mIoU": ...}}``)."""
        if self._experiment is not None:
            raise RuntimeError("CSVLogger.resume_at must be called before the first log")
        keys, rows = read_rows(Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE)
        self._kept = keys, [r for r in rows if logged_before(r, step)]
        history: dict[int, dict[str, float]] = {}
        for row in self._kept[1]:
            val = {k[4:]: float(v) for k, v in row.items() if k.startswith("val/") and "/" not in k[4:] and v}
            if val:
                history.setdefault(int(row["step"]), {}).update(val)
        return history

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = HistoryWriter(self.log_dir, self._kept)
        return self._experiment

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.save()


WANDB_RUN_DIR = re.compile(r"^(?:offline-)?run-\d{8}_\d{6}-(?P<id>[A-Za-z0-9]+)$")


def continue_wandb_run(logger: Any, run_dir: Path) -> str | None:
    """A resumed run (``ckpt_path=``, a SLURM requeue) logs to the W&B run it started, not a new one: the id of
    the newest ``RUN/wandb/[offline-]run-<time>-<id>`` folder, with ``resume="allow"``. Returns that id, or None
    (not a W&B logger, or the run never logged to W&B)."""
    init = getattr(logger, "_wandb_init", None)
    if not isinstance(init, dict) or getattr(logger, "_experiment", None) is not None:
        return None
    runs = [p for p in (run_dir / "wandb").glob("*run-*") if p.is_dir() and WANDB_RUN_DIR.match(p.name)]
    if not runs:
        return None
    newest = max(runs, key=lambda p: p.name.removeprefix("offline-"))  # the names start with the start time
    run_id = WANDB_RUN_DIR.match(newest.name)["id"]  # type: ignore[index]
    init.update(id=run_id, resume="allow")
    logger._id = run_id
    return run_id


def finish_wandb() -> None:
    """Close the W&B run so the next job of a multirun starts a new one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
