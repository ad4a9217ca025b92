"""experiments/collect.py: runs become the rows of the experiment pages."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[1]


def _fake_run(run_dir: Path, cfg: DictConfig, miou: float, mvc8: float = 0.9) -> None:
    """A finished run as vss.train leaves it: .hydra/config.yaml and metrics.json."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run_dir / "metrics.json").write_text(json.dumps({"step": 600, "val": {"mIoU": miou, "mVC8": mvc8, "mVC16": 0.8}}))


def test_collect_fills_the_table2_page(collect: ModuleType, compose_cfg: Callable, tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    for job, (p, miou) in enumerate(((0.3, 0.5), (1.0, 0.7))):
        _fake_run(sweep / str(job), compose_cfg("experiment=mrcfa_synthetic", f"stm.p={p}", "paths.output_dir=x"), miou)
    # stm.p left at null: the official default of the run's encoder (0.8 for mit_b0)
    _fake_run(sweep / "2", compose_cfg("experiment=mrcfa_synthetic", "paths.output_dir=x"), 0.6)
    page = tmp_path / "table2.md"
    page.write_text("# Table 2\n\n<!-- ours:start -->\nold\n<!-- ours:end -->\n")
    rows = collect.collect_table("table2", [sweep], page, bench=False, plot=tmp_path / "table2.png").rows
    text = page.read_text()
    assert len(rows) == 3 and "old" not in text
    assert "| 30% |" in text and "| 100% |" in text and "50.0" in text and "70.0" in text
    assert "| 80% |" in text and "60.0" in text
    assert (tmp_path / "table2.png").is_file()


def test_collect_names_msaf_table3_rows_and_keeps_settings_apart(
    collect: ModuleType, compose_cfg: Callable, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    base = ("experiment=msaf_synthetic", "paths.output_dir=x")
    _fake_run(runs / "a", compose_cfg(*base, "+experiment/msaf_table3=baseline"), 0.60, 0.92)
    _fake_run(
        runs / "b", compose_cfg(*base, "+experiment/msaf_table3=baseline", "seed=7"), 0.70, 0.94
    )  # same row: averaged
    _fake_run(runs / "c", compose_cfg(*base), 0.80)
    _fake_run(runs / "d", compose_cfg(*base, "model.offsets=[-2,-1]", "model.pst_downsample=[1,1,1]"), 0.75)
    _fake_run(runs / "e", compose_cfg(*base, "+experiment/msaf_table3=wo_dcn"), 0.78)
    page = tmp_path / "msaf_table3.md"
    page.write_text("<!-- ours-synthetic:start -->\nold\n<!-- ours-synthetic:end -->\n")
    rows = collect.collect_table("msaf_table3", [runs], page, bench=False).rows
    assert [r.cells for r in rows] == [
        ["Baseline", "74.5", "-", "-"],
        ["w/o DCN", "79.8", "[-6, -3]", "[4, 2, 1]"],
        ["MSAF", "80.4", "[-2, -1]", "[1, 1, 1]"],
        ["MSAF", "80.4", "[-6, -3]", "[4, 2, 1]"],
    ]
    text = page.read_text()
    assert "| Baseline | 74.5 | - | - | 65.0 | 93.0 |" in text and "| 2 |" in text


def test_collect_times_a_row_with_the_bench(collect: ModuleType, compose_cfg: Callable, tmp_path: Path) -> None:
    """The speed column: vss.bench's streaming time of the row's own model (defaults from conf/bench.yaml)."""
    _fake_run(tmp_path / "r", compose_cfg("model=segformer", "model.embed_dim=16", "paths.output_dir=x"), 0.5)
    (run,) = collect.find_runs([tmp_path])
    ms = collect.bench_ms(run, (32, 32))
    assert 0 < ms < 60_000


# -- results pages are outputs of explicit commands only -------------------------------------------------------
def _segformer_run(compose_cfg: Callable, run_dir: Path, miou: float, *overrides: str) -> None:
    _fake_run(
        run_dir, compose_cfg("experiment=mrcfa_synthetic", "model=segformer", "paths.output_dir=x", *overrides), miou
    )


def _one_line_exit(info: pytest.ExceptionInfo) -> str:
    message = str(info.value.code)
    assert isinstance(info.value.code, str) and "\n" not in message, message  # SystemExit(str): exit 1, one line
    return message


def test_runs_that_differ_in_more_than_the_swept_key_are_refused(
    collect: ModuleType, compose_cfg: Callable, tmp_path: Path
) -> None:
    """An lr sweep is no table1: its two SegFormer runs are not averaged into the SegFormer row."""
    sweep = tmp_path / "lr_sweep"
    _segformer_run(compose_cfg, sweep / "0", 0.5, "optim.optimizer.lr=0.001")
    _segformer_run(compose_cfg, sweep / "1", 0.6, "optim.optimizer.lr=0.0003", "seed=7")
    page = tmp_path / "page.md"
    page.write_text("<!-- ours-synthetic:start -->\nold\n<!-- ours-synthetic:end -->\n")
    with pytest.raises(SystemExit) as info:
        collect.main(["table1", str(sweep), "--no-bench", "--page", str(page)])
    message = _one_line_exit(info)
    assert message.startswith("collect.py table1: refusing to mix runs that differ in more than the table's "), message
    assert f"optim.optimizer.lr: 0.001 in {sweep / '0'} vs 0.0003 in {sweep / '1'}" in message
    assert "seed" not in message.split(": ", 2)[-1].split(" (collect")[0]  # the seed may differ
    assert "old" in page.read_text() and not (sweep / "collect_table1.md").exists()  # nothing written
    # --allow accepts the named difference: then the two runs are one row
    rows = collect.collect_table("table1", [sweep], bench=False, allow=["optim.optimizer.lr"]).rows
    assert [len(r.runs) for r in rows] == [2]


def test_rows_of_other_methods_are_compared_outside_the_model(
    collect: ModuleType, compose_cfg: Callable, tmp_path: Path
) -> None:
    """table1: a SegFormer row beside MRCFA rows (their model and MRCFA's stm differ by design); their data may not."""
    runs = tmp_path / "runs"
    _segformer_run(compose_cfg, runs / "a", 0.5)
    for job, offsets in enumerate(("[-3]", "[-9,-6,-3]")):
        cfg = compose_cfg("experiment=mrcfa_table1_synthetic", f"model.offsets={offsets}", "paths.output_dir=x")
        _fake_run(runs / f"b{job}", cfg, 0.7)
    rows = collect.collect_table("table1", [runs], bench=False).rows
    assert [r.cells[:3] for r in rows] == [["SegFormer", "-", "-"], ["MRCFA", "2", "-3"], ["MRCFA", "4", "-9"]]
    _segformer_run(compose_cfg, runs / "c", 0.5, "data.crop_size=[96,96]")
    with pytest.raises(SystemExit) as info:
        collect.collect_table("table1", [runs], bench=False)
    assert f"data.crop_size: [128, 128] in {runs / 'a'} vs [96, 96] in {runs / 'c'}" in _one_line_exit(info)
    cfg = compose_cfg("experiment=mrcfa_table1_synthetic", "model.num_scales=2", "paths.output_dir=x")
    (runs / "c" / "metrics.json").unlink()  # unfinished: not collected
    _fake_run(runs / "d", cfg, 0.7)
    with pytest.raises(SystemExit) as info:
        collect.collect_table("table1", [runs], bench=False)
    assert f"model.num_scales: 3 in {runs / 'b0'} vs 2 in {runs / 'd'}" in _one_line_exit(info)


def test_a_sweep_without_rows_of_the_table_says_so(
    collect: ModuleType, compose_cfg: Callable, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweep = tmp_path / "sweep"
    _segformer_run(compose_cfg, sweep / "0", 0.5)
    _segformer_run(compose_cfg, sweep / "1", 0.6, "seed=7")
    with pytest.raises(SystemExit) as info:
        collect.main(["table2", str(sweep), "--no-bench"])
    assert _one_line_exit(info) == (
        f"collect.py table2: none of the 2 finished run(s) below {sweep} is a table2 row "
        "(table2 collects MRCFA runs with model.fusion=affinity; found: SegFormer x2)"
    )
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as info:
        collect.main(["table2", str(tmp_path / "empty"), "--no-bench"])
    assert "no finished runs" in _one_line_exit(info)


@pytest.fixture
def tracked_files_unchanged() -> Iterator[None]:
    """Fails the test if it changed a file of experiments/ or the repository's git status; puts them back."""
    pages = {
        p: p.read_bytes() for p in (REPO / "experiments").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    digest = {p: hashlib.sha256(b).hexdigest() for p, b in pages.items()}
    git = ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all"]
    has_git = shutil.which("git") is not None and (REPO / ".git").exists()
    status = subprocess.run(git, capture_output=True, text=True, check=True).stdout if has_git else ""
    yield
    changed = [p for p, b in pages.items() if not p.is_file() or p.read_bytes() != b]
    for p in changed:
        p.write_bytes(pages[p])
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in pages}
    assert not changed and after == digest, f"tracked pages changed: {changed}"
    if has_git:
        assert subprocess.run(git, capture_output=True, text=True, check=True).stdout == status


@pytest.mark.usefixtures("tracked_files_unchanged")
def test_without_page_the_table_goes_to_stdout_and_the_sweep_directory(
    collect: ModuleType, compose_cfg: Callable, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweep = tmp_path / "sweep"
    for job, p in enumerate((0.5, 1.0)):
        _fake_run(sweep / str(job), compose_cfg("experiment=mrcfa_synthetic", f"stm.p={p}", "paths.output_dir=x"), 0.6)
    assert collect.main(["table2", str(sweep), "--no-bench"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("## Ours: synthetic set\n\n| p | mIoU") and "| 50% | 60.0 |" in out.out
    assert (sweep / "collect_table2.md").read_text() == out.out
    assert (sweep / "collect_table2_synthetic.png").is_file()
    assert "(no page: --page PAGE fills one)" in out.err


@pytest.mark.usefixtures("tracked_files_unchanged")
def test_page_fills_the_named_page(
    collect: ModuleType, compose_cfg: Callable, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweep = tmp_path / "sweep"
    _segformer_run(compose_cfg, sweep / "0", 0.5)
    _segformer_run(compose_cfg, sweep / "1", 0.7, "seed=7")
    page = tmp_path / "mrcfa_table1.md"
    page.write_text("# T1\n\n<!-- ours-synthetic:start -->\nold\n<!-- ours-synthetic:end -->\n\nafter\n")
    assert collect.main(["table1", str(sweep), "--no-bench", "--page", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# T1\n\n<!-- ours-synthetic:start -->\n| Methods |") and text.endswith("\nafter\n")
    assert "| SegFormer | - | - | - | - | 60.0 |" in text and "old" not in text
    assert str(page) in capsys.readouterr().err
