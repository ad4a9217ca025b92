"""Collect ablation runs into a results table: ``python experiments/collect.py TABLE DIR [DIR ...] [--page PAGE]``.

TABLE is ``table1`` .. ``table4`` (MRCFA's Tables 1-4, pages ``mrcfa_TABLE.md``) or ``msaf_table3`` (MSAF's
Table 3, page ``msaf_table3.md``). Every ``metrics.json`` below the DIRs (written by
``vss.train`` into each run directory; a multirun has one job directory each, with ``.hydra/config.yaml``)
becomes a row, keyed by what the table varies (offsets, ``stm.p``, ``model.num_scales``, SAR/MAA/fusion);
runs with the same key are averaged.

The runs of a table may differ only in what the table varies (:data:`SWEPT`; rows of different methods, e.g.
SegFormer beside MRCFA, in their model) and in the seed: any other difference of their stored configs
(``optim.optimizer.lr``, ``data.*``, ...) is refused, naming the keys and values (``--allow KEY`` accepts one).
Bookkeeping keys (:data:`IGNORED`: paths, loggers, callbacks, tags, ...) are not compared.

Output: the table (one section per dataset) on stdout and in ``collect_TABLE.md`` in the first DIR. Only with
``--page PAGE`` are the rows written into a page: they replace its block between
``<!-- ours-synthetic:start -->`` and ``<!-- ours-synthetic:end -->`` (runs on the synthetic set) or
``<!-- ours-vspw:... -->`` (other data), or ``<!-- ours:start/end -->`` when the page has only that. A sweep
without a row of the table is an error (exit 1, one line).

Parameter counts come from the runs' configs (model built on the meta device); speed (``--bench``, on by
default) is ``vss.bench``'s streaming time per frame of each row's model on this machine (random weights,
batch 1, the run's crop size for the synthetic set, 480x864 for VSPW; ``--bench-size HxW`` to change it).
``table2`` also plots mIoU and speed against p: ``collect_table2[_synthetic].png`` in the first DIR (with
``--page``: ``<page stem>[_synthetic].png`` next to the page; ``--plot`` to choose).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

HERE = Path(__file__).resolve().parent
TABLES = ("table1", "table2", "table3", "table4", "msaf_table3")
METRICS = ("mIoU", "mVC8", "mVC16")


@dataclass
class Run:
    """One finished training run: its directory, config and final validation metrics."""

    path: Path
    cfg: DictConfig
    metrics: dict[str, float]
    step: int

    @property
    def method(self) -> str:
        return str(self.cfg.model._target_).rsplit(".", 1)[-1]

    @property
    def synthetic(self) -> bool:
        return "Synthetic" in str(self.cfg.data._target_)

    def model_value(self, key: str) -> Any:
        return OmegaConf.select(self.cfg, f"model.{key}")


@dataclass
class Row:
    """One table row: its key, label cells and the runs averaged into it."""

    key: tuple
    cells: list[str]
    runs: list[Run] = field(default_factory=list)
    speed_ms: float | None = None
    params_m: float | None = None

    def mean(self, metric: str) -> float:
        values = [r.metrics[metric] for r in self.runs if metric in r.metrics]
        return sum(values) / len(values) if values else math.nan


def find_runs(dirs: Sequence[Path]) -> list[Run]:
    """Every run below ``dirs`` that wrote metrics.json and kept its Hydra config."""
    from vss.config import register_resolvers

    register_resolvers()
    runs = []
    for d in dirs:
        for metrics_file in sorted(Path(d).rglob("metrics.json")):
            run_dir = metrics_file.parent
            cfg_file = run_dir / ".hydra" / "config.yaml"
            if not cfg_file.is_file():
                continue
            result = json.loads(metrics_file.read_text())
            val = result.get("val", result)
            metrics = {k: float(val[k]) for k in (*METRICS, "fwIoU") if isinstance(val.get(k), int | float)}
            runs.append(Run(run_dir, OmegaConf.load(cfg_file), metrics, int(result.get("step", -1))))
    return runs


def unfinished_jobs(dirs: Sequence[Path]) -> list[tuple[Path, Path | None]]:
    """Job directories below ``dirs`` that kept a Hydra config but wrote no metrics.json (still running, failed, or
    stopped and not resumed), each with its submitit log when its sweep ran through a submitit launcher (on a
    cluster: ``<sweep>/.submitit/<job id>/<job id>_0_log.err``), else None."""
    found = []
    for d in dirs:
        for cfg_file in sorted(Path(d).rglob(".hydra/config.yaml")):
            run_dir = cfg_file.parents[1]
            if not (run_dir / "metrics.json").is_file():
                found.append((run_dir, _submitit_log(run_dir)))
    return found


def _submitit_log(run_dir: Path) -> Path | None:
    """The stderr log submitit kept for the job of ``run_dir`` (named by its SLURM job id), if there is one."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    try:
        job_id = OmegaConf.select(
            OmegaConf.load(hydra_file), "hydra.job.id", default=None, throw_on_resolution_failure=False
        )
    except (OSError, ValueError):
        return None
    log = run_dir.parent / ".submitit" / str(job_id) / f"{job_id}_0_log.err"
    return log if job_id is not None and log.is_file() else None


def _without_weights(encoder: DictConfig) -> dict[str, Any]:
    """The run's encoder config with ``pretrained`` cleared: counting parameters or timing needs no weights, and a
    sweep collected away from where it ran (copied from a cluster) names checkpoint paths that do not exist here."""
    plain = OmegaConf.to_container(encoder, resolve=True)
    assert isinstance(plain, dict)
    if "pretrained" in plain:
        plain["pretrained"] = None
    return plain


def _offsets(run: Run) -> tuple[int, ...]:
    return tuple(int(o) for o in run.cfg.model.offsets)


def _p(run: Run) -> float:
    """STM ratio p of an MRCFA run (null in the config: the official default of its encoder)."""
    from vss.models.aggregators.mrcfa import official_token_ratio

    p = OmegaConf.to_container(run.cfg.model, resolve=True)["token_ratio"]
    return float(official_token_ratio(run.cfg.encoder.name) if p is None else p)


def key_table1(run: Run) -> tuple[tuple, list[str]] | None:
    if run.method == "SegFormer":
        return (0,), ["SegFormer", "-", "-", "-", "-"]
    if run.method != "MRCFA" or run.model_value("fusion") != "affinity":
        return None
    offsets = _offsets(run)
    cells = ["MRCFA", str(len(offsets) + 1), *[str(o) for o in offsets], *["-"] * (3 - len(offsets))]
    return (1, len(offsets), tuple(-o for o in offsets)), cells


def key_table2(run: Run) -> tuple[tuple, list[str]] | None:
    if run.method != "MRCFA" or run.model_value("fusion") != "affinity":
        return None
    p = _p(run)
    return (-p,), [f"{100 * p:g}%"]


def key_table3(run: Run) -> tuple[tuple, list[str]] | None:
    if run.method != "MRCFA" or run.model_value("fusion") != "affinity":
        return None
    return (int(run.model_value("num_scales")),), [str(run.model_value("num_scales"))]


def key_table4(run: Run) -> tuple[tuple, list[str]] | None:
    if run.method == "SegFormer":
        return (0,), ["SegFormer", "-", "-"]
    if run.method != "MRCFA":
        return None
    if run.model_value("fusion") == "feature_pyramid":
        return (1,), ["Feature Pyramid", "-", "-"]
    sar, maa = bool(run.model_value("sar")), bool(run.model_value("maa"))
    mark = {True: "✓", False: "✗"}
    return (2, sar and maa, sar, maa), ["Affinity Decoder", mark[sar], mark[maa]]


# MSAF Table 3: (motion, motion_transformer, state, semantics, dcn) -> row name, paper mIoU (Cityscapes, R-50)
MSAF_ROWS: dict[tuple, tuple[str, str]] = {
    (False, None, False, False, None): ("Baseline", "74.5"),
    (True, "vanilla", False, False, None): ("Baseline + TR", "77.5"),
    (True, "decoupled", False, False, True): ("Motion only", "79.1"),
    (False, None, True, False, None): ("State only", "76.5"),
    (False, None, True, True, None): ("w/o Motion", "77.3"),
    (True, "decoupled", False, True, True): ("w/o State", "79.7"),
    (True, "decoupled", True, False, True): ("w/o Semantics", "79.8"),
    (True, "decoupled", True, True, False): ("w/o DCN", "79.8"),
    (True, "decoupled", True, True, True): ("MSAF", "80.4"),
}


def key_msaf_table3(run: Run) -> tuple[tuple, list[str]] | None:
    """A Table 3 row from the MSAF toggles; the clip and the PST pyramid are cells, so settings stay apart."""
    if run.method != "MSAF":
        return None
    motion, state, semantics = (bool(run.model_value(k)) for k in ("motion", "state", "semantics"))
    transformer = str(run.model_value("motion_transformer")) if motion else None
    dcn = run.model_value("dcn") if motion and transformer == "decoupled" else None
    toggles = (motion, transformer, state, semantics, dcn)
    name, paper = MSAF_ROWS.get(toggles, (f"other {toggles}", "-"))
    order = list(MSAF_ROWS).index(toggles) if toggles in MSAF_ROWS else len(MSAF_ROWS)
    offsets = _offsets(run) if motion else ()
    pst = tuple(int(r) for r in run.model_value("pst_downsample")) if transformer == "decoupled" else ()
    cells = [name, paper, str(list(offsets)) if offsets else "-", str(list(pst)) if pst else "-"]
    return (order, tuple(-o for o in offsets), pst), cells


KEYS: dict[str, Callable[[Run], tuple[tuple, list[str]] | None]] = {
    "table1": key_table1,
    "table2": key_table2,
    "table3": key_table3,
    "table4": key_table4,
    "msaf_table3": key_msaf_table3,
}
HEADERS = {
    "table1": ["Methods", "T", "t1", "t2", "t3"],
    "table2": ["p"],
    "table3": ["L"],
    "table4": ["Methods", "SAR", "MAA"],
    "msaf_table3": ["row", "paper mIoU (Cityscapes)", "references", "PST DS"],
}


SWEPT: dict[str, tuple[str, ...]] = {
    "table1": ("model.offsets",),
    "table2": ("stm.p", "model.token_ratio"),
    "table3": ("model.num_scales",),
    "table4": ("model.fusion", "model.sar", "model.maa"),
    "msaf_table3": (
        "model.motion",
        "model.motion_transformer",
        "model.state",
        "model.semantics",
        "model.dcn",
        "model.offsets",
        "model.pst_downsample",
    ),
}
"""The config keys each table varies between its rows (besides the method of a SegFormer row)."""
WHAT = {
    "table1": "SegFormer runs and MRCFA runs with model.fusion=affinity",
    "table2": "MRCFA runs with model.fusion=affinity",
    "table3": "MRCFA runs with model.fusion=affinity",
    "table4": "SegFormer and MRCFA runs",
    "msaf_table3": "MSAF runs",
}
"""The runs each table collects (for the message when a sweep has none)."""
IGNORED = (
    "seed",
    "paths",
    "hydra",
    "tags",
    "task_name",
    "ckpt_path",
    "logger",
    "callbacks",
    "optimized_metric",
    "test",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.verify",
    "data.check_val_headers",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
)
"""Config keys (and prefixes) that do not change a run's numbers: never compared. The seed is what repeats vary."""


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The stored config as ``dotted.key -> value`` (lists are values), interpolations unresolved: a key that
    follows another (``model.token_ratio: ${stm.p}``) differs only where that one does."""

    def walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                yield from walk(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], node

    return dict(walk(OmegaConf.to_container(cfg, resolve=False), ""))


def _covered(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


MISSING = object()


def _show(value: Any) -> str:
    return "(not set)" if value is MISSING else json.dumps(value, default=str)


def config_differences(table: str, runs: Sequence[Run], allow: Sequence[str] = ()) -> list[str]:
    """Each config key on which ``runs`` differ beyond the table's varied keys (:data:`SWEPT`), the seed, the
    bookkeeping keys (:data:`IGNORED`) and ``allow``, as ``key: value in DIR vs value in DIR``.

    A run is compared key by key with the first run of its method; the first run of another method (a SegFormer
    row beside MRCFA rows) with the very first run, outside ``model.*`` and on the keys both have (MRCFA's own
    ``stm`` node is not a difference).
    """
    skip = (*IGNORED, *SWEPT[table], *allow)
    flats = [flat_config(r.cfg) for r in runs]
    first_of: dict[str, int] = {}
    for i, run in enumerate(runs):
        first_of.setdefault(run.method, i)
    found: dict[str, str] = {}
    for i, run in enumerate(runs):
        ref = first_of[run.method]
        if i != ref:
            keys = set(flats[ref]) | set(flats[i])
        elif i != 0:
            ref, keys = 0, {k for k in set(flats[0]) & set(flats[i]) if not k.startswith("model.")}
        else:
            continue
        for key in sorted(keys):
            a, b = flats[ref].get(key, MISSING), flats[i].get(key, MISSING)
            if a != b and key not in found and not _covered(key, skip):
                found[key] = f"{key}: {_show(a)} in {runs[ref].path} vs {_show(b)} in {run.path}"
    return list(found.values())


def check_comparable(table: str, runs: Sequence[Run], allow: Sequence[str] = ()) -> None:
    """Refuse (one line, exit 1) to put ``runs`` into one table when they differ in more than what it varies."""
    differences = config_differences(table, runs, allow)
    if differences:
        shown = "; ".join(differences[:3]) + (
            f"; and {len(differences) - 3} more key(s)" if len(differences) > 3 else ""
        )
        raise SystemExit(
            f"collect.py {table}: refusing to mix runs that differ in more than the table's "
            f"{', '.join(SWEPT[table])} and the seed: {shown} (collect them separately, or --allow KEY)"
        )


def build_rows(table: str, runs: Sequence[Run]) -> list[Row]:
    """Group runs by the table's key, sorted as the paper orders its rows."""
    rows: dict[tuple, Row] = {}
    for run in runs:
        keyed = KEYS[table](run)
        if keyed is None:
            continue
        key, cells = keyed
        rows.setdefault(key, Row(key, cells)).runs.append(run)
    return [rows[k] for k in sorted(rows)]


def params_millions(run: Run) -> float:
    """Trainable parameters of the run's model (built on the meta device)."""
    import torch
    from hydra.utils import instantiate

    from vss.bench import count_parameters
    from vss.models.segmenter import Segmenter

    with torch.device("meta"):
        encoder = instantiate(_without_weights(run.cfg.encoder))
        model = Segmenter(encoder, instantiate(run.cfg.model), int(run.cfg.data.num_classes))
    return count_parameters(model) / 1e6


def bench_ms(run: Run, size: tuple[int, int] | None) -> float:
    """``vss.bench`` streaming time (ms) per target frame of the run's model, random weights, batch 1."""
    from vss.bench import bench
    from vss.config import CONF_DIR

    if size is None:
        size = tuple(run.cfg.data.crop_size) if run.synthetic else (480, 864)
    cfg = OmegaConf.load(CONF_DIR / "bench.yaml")  # the bench's own defaults (frames, warm-up, ...)
    del cfg["defaults"]
    run_parts = {
        "encoder": _without_weights(run.cfg.encoder),
        "model": OmegaConf.to_container(run.cfg.model, resolve=True),
        "num_classes": int(run.cfg.data.num_classes),
        "height": int(size[0]),
        "width": int(size[1]),
        "device": "auto",
    }
    return float(bench(OmegaConf.merge(cfg, run_parts))["stream_ms_per_frame"])


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}"


def render(table: str, rows: Sequence[Row], dirs: Sequence[Path], size_note: str) -> str:
    """Markdown table of ``rows`` with the provenance of the numbers."""
    head = [*HEADERS[table], "mIoU ↑", "mVC8 ↑", "mVC16 ↑", "Params (M)", "ms/frame ↓", "FPS ↑", "runs", "steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        fps = "-" if not row.speed_ms else f"{1e3 / row.speed_ms:.1f}"
        ms = "-" if not row.speed_ms else f"{row.speed_ms:.1f}"
        params = "-" if row.params_m is None else f"{row.params_m:.2f}"
        steps = sorted({r.step for r in row.runs})
        cells = [*row.cells, *(_pct(row.mean(m)) for m in METRICS), params, ms, fps, str(len(row.runs))]
        lines.append("| " + " | ".join([*cells, "/".join(map(str, steps))]) + " |")
    where = ", ".join(f"`{d}`" for d in dirs)
    lines += [
        "",
        (
            f"Collected by `python experiments/collect.py {table}` on {time.strftime('%Y-%m-%d')} from {where}. "
            f"Metrics are the final validation of each run (in %, mean over runs with the same setting). {size_note}"
        ).rstrip(),
    ]
    return "\n".join(lines)


def write_section(page: Path, section: str, body: str) -> None:
    """Replace the block between ``<!-- {section}:start -->`` and ``<!-- {section}:end -->`` of ``page``."""
    text = page.read_text()
    for name in (section, "ours"):
        pattern = re.compile(rf"(<!-- {name}:start -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)  # may be empty
        if pattern.search(text):
            page.write_text(pattern.sub(lambda m: m[1] + body + "\n" + m[2], text, count=1))
            return
    raise SystemExit(f"{page}: no '<!-- {section}:start -->' ... '<!-- {section}:end -->' block to fill")


def plot_table2(rows: Sequence[Row], path: Path, title: str) -> None:
    """mIoU and speed (FPS) against the token ratio p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = [-row.key[0] for row in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot(ps, [100 * row.mean("mIoU") for row in rows], "o-", color="tab:red", label="mIoU")
    ax.set_xlabel("token ratio p (stm.p)")
    ax.set_ylabel("val mIoU (%)", color="tab:red")
    if all(row.speed_ms for row in rows):
        ax2 = ax.twinx()
        ax2.plot(ps, [1e3 / row.speed_ms for row in rows], "s--", color="tab:blue", label="FPS")  # type: ignore[operator]
        ax2.set_ylabel("frames / s (streaming)", color="tab:blue")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


@dataclass
class Section:
    """The rows of one dataset (the synthetic set, or other data) and their markdown."""

    marker: str  # the page block they fill: ours-synthetic | ours-vspw
    title: str
    rows: list[Row]
    text: str


@dataclass
class Collected:
    """What ``collect_table`` made: the sections and the files it wrote."""

    sections: list[Section]
    written: list[Path] = field(default_factory=list)

    @property
    def rows(self) -> list[Row]:
        return [row for s in self.sections for row in s.rows]

    def markdown(self) -> str:
        return "\n\n".join(f"## {s.title}\n\n{s.text}" for s in self.sections) + "\n"


def say(message: str) -> None:
    """A ``[collect]`` status line on stderr (stdout carries the table)."""
    print(f"[collect] {message}", file=sys.stderr, flush=True)


def collect_sections(
    table: str,
    dirs: Sequence[Path],
    bench: bool = True,
    bench_size: tuple[int, int] | None = None,
    allow: Sequence[str] = (),
) -> list[Section]:
    """The runs of ``dirs`` as ``table``'s rows, one section per dataset; exits (one line) when the runs may not
    be mixed or none of them is a row of the table."""
    if table not in TABLES:
        raise SystemExit(f"unknown table {table!r}: expected one of {', '.join(TABLES)}")
    runs = find_runs(dirs)
    for run_dir, log in unfinished_jobs(dirs):
        say(f"not collected: {run_dir} (no metrics.json: unfinished or failed)" + (f"; log: {log}" if log else ""))
    where = ", ".join(map(str, dirs))
    if not runs:
        raise SystemExit(f"collect.py {table}: no finished runs (metrics.json + .hydra/config.yaml) below {where}")
    used = [r for r in runs if KEYS[table](r) is not None]
    if not used:
        found = ", ".join(f"{m} x{n}" for m, n in sorted(Counter(r.method for r in runs).items()))
        raise SystemExit(
            f"collect.py {table}: none of the {len(runs)} finished run(s) below {where} is a {table} row "
            f"({table} collects {WHAT[table]}; found: {found})"
        )
    for run in runs:
        if KEYS[table](run) is None:
            say(f"left out of {table}: {run.path} ({run.method}: {table} collects {WHAT[table]})")
    sections = []
    for synthetic in (True, False):
        part = [r for r in used if r.synthetic == synthetic]
        if not part:
            continue
        check_comparable(table, part, allow)
        rows = build_rows(table, part)
        for row in rows:
            row.params_m = params_millions(row.runs[0])
            if bench:
                row.speed_ms = bench_ms(row.runs[0], bench_size)
        size = bench_size or (tuple(rows[0].runs[0].cfg.data.crop_size) if synthetic else (480, 864))
        note = f"Speed: `vss.bench` streaming path at {size[0]}x{size[1]}, batch 1, on this machine." if bench else ""
        marker, title = ("ours-synthetic", "Ours: synthetic set") if synthetic else ("ours-vspw", "Ours: other data")
        sections.append(Section(marker, title, rows, render(table, rows, dirs, note)))
    return sections


def collect_table(
    table: str,
    dirs: Sequence[Path],
    page: Path | None = None,
    bench: bool = True,
    bench_size: tuple[int, int] | None = None,
    plot: Path | None = None,
    out: Path | None = None,
    allow: Sequence[str] = (),
) -> Collected:
    """Collect the runs of ``dirs`` into ``table``: the markdown into ``out`` (if given) and, only when ``page``
    is given, into that page's blocks; ``table2`` also plots (``plot``, else next to ``out`` / ``page``)."""
    collected = Collected(collect_sections(table, dirs, bench, bench_size, allow))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(collected.markdown())
        collected.written.append(out)
    for section in collected.sections:
        if page is not None:
            write_section(page, section.marker, section.text)
            if page not in collected.written:
                collected.written.append(page)
        base = page or out
        if table == "table2" and (plot is not None or base is not None):
            synthetic = section.marker == "ours-synthetic"
            target = plot or base.with_name(f"{base.stem}{'_synthetic' if synthetic else ''}.png")  # type: ignore[union-attr]
            plot_table2(section.rows, target, f"MRCFA, {'synthetic' if synthetic else 'VSPW'}: token ratio p")
            collected.written.append(target)
    return collected


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", choices=TABLES)
    parser.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories (searched recursively)")
    parser.add_argument(
        "--page", type=Path, help="fill this page's ours-* blocks (e.g. experiments/mrcfa_table2.md); default: none"
    )
    parser.add_argument("--out", type=Path, help="where to write the table (default: FIRST_DIR/collect_TABLE.md)")
    parser.add_argument(
        "--allow", action="append", default=[], metavar="KEY", help="accept runs that differ in KEY (repeatable)"
    )
    parser.add_argument("--no-bench", action="store_true", help="skip the speed measurement")
    parser.add_argument("--bench-size", help="HxW of the speed measurement (default: crop size / 480x864)")
    parser.add_argument("--plot", type=Path, help="table2: where to write the plot")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.bench_size.lower().split("x")) if args.bench_size else None
    first = args.dirs[0] if args.dirs[0].is_dir() else args.dirs[0].parent
    out = args.out or first / f"collect_{args.table}.md"
    collected = collect_table(
        args.table,
        args.dirs,
        args.page,
        not args.no_bench,
        size,
        args.plot,
        out,
        args.allow,  # type: ignore[arg-type]
    )
    print(collected.markdown(), end="", flush=True)
    for row in collected.rows:
        metrics = " ".join(f"{m} {_pct(row.mean(m))}" for m in METRICS)
        say(f"{args.table} {' '.join(row.cells)}: {metrics} ({len(row.runs)} run(s))")
    say(f"wrote {', '.join(map(str, collected.written))}" + ("" if args.page else " (no page: --page PAGE fills one)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
