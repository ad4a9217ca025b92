"""experiments/collect.py: runs become the rows of the experiment pages."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from omegaconf import DictConfig, OmegaConf


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
    rows = collect.collect_table("table2", [sweep], page, bench=False, plot=tmp_path / "table2.png")
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
    _fake_run(runs / "a", compose_cfg(*base, "+msaf_table3=baseline"), 0.60, 0.92)
    _fake_run(runs / "b", compose_cfg(*base, "+msaf_table3=baseline", "seed=7"), 0.70, 0.94)  # same row: averaged
    _fake_run(runs / "c", compose_cfg(*base), 0.80)
    _fake_run(runs / "d", compose_cfg(*base, "model.offsets=[-2,-1]", "model.pst_downsample=[1,1,1]"), 0.75)
    _fake_run(runs / "e", compose_cfg(*base, "+msaf_table3=wo_dcn"), 0.78)
    page = tmp_path / "msaf_table3.md"
    page.write_text("<!-- ours-synthetic:start -->\nold\n<!-- ours-synthetic:end -->\n")
    rows = collect.collect_table("msaf_table3", [runs], page, bench=False)
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
