"""The end of a ``-m`` sweep: a table of the swept values -> metrics per job (``sweep.md``, ``sweep.csv``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf


class SweepSummary(HydraCallback):
    """At the end of a ``-m`` sweep: a table of the swept values -> mIoU / mVC8 per job, the best job marked,
    printed and written as ``sweep.md`` and ``sweep.csv`` in the sweep directory."""

    def __init__(self, metrics: tuple[str, ...] = ("mIoU", "mVC8"), sort_by: str = "mIoU") -> None:
        self.metrics, self.sort_by = tuple(metrics), sort_by

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = sweep_rows(sweep_dir, self.metrics)
        if rows:
            print(write_sweep_table(sweep_dir, rows, self.metrics, self.sort_by), flush=True)


def sweep_rows(sweep_dir: Path, metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per job of a sweep directory: job number, its overrides and its final validation metrics."""
    import json

    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
        values = dict(o.split("=", 1) for o in overrides if "=" in o)
        result = job / "metrics.json"
        val = json.loads(result.read_text()).get("val", {}) if result.is_file() else {}
        rows.append({"job": int(job.name), "overrides": values, **{m: val.get(m) for m in metrics}})
    return rows


def write_sweep_table(sweep_dir: Path, rows: list[dict[str, Any]], metrics: tuple[str, ...], sort_by: str) -> str:
    """Write ``sweep.md`` / ``sweep.csv``: the overrides that differ between jobs -> metrics; returns the table."""
    import csv

    keys = sorted({k for r in rows for k in r["overrides"]})
    swept = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1] or keys
    scored = [r for r in rows if r.get(sort_by) is not None]
    best = max(scored, key=lambda r: r[sort_by])["job"] if scored else None

    def cell(v: Any) -> str:
        return "-" if v is None else (f"{100 * v:.1f}" if isinstance(v, float) else str(v))

    header = ["job", *swept, *metrics, "best"]
    table = [
        [str(r["job"]), *(r["overrides"].get(k, "") for k in swept), *(cell(r[m]) for m in metrics)]
        + ["*" if r["job"] == best else ""]
        for r in rows
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    text = "\n".join(lines) + "\n"
    (sweep_dir / "sweep.md").write_text(f"# Sweep {sweep_dir}\n\nmetrics in %, {metrics[0]} best marked *\n\n{text}")
    with (sweep_dir / "sweep.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            writer.writerow(
                [r["job"], *(r["overrides"].get(k, "") for k in swept), *(r[m] for m in metrics), int(r["job"] == best)]
            )
    return f"[vss] sweep of {len(rows)} jobs ({sweep_dir / 'sweep.md'}):\n{text}"
