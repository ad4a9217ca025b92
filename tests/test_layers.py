"""The import graph keeps its layers: no cycle, no import that runs upward, model files import their blocks only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import import_graph

ALLOWED_UPWARD: set[tuple[str, str]] = set()
"""Imports allowed to run upward (none)."""


def test_no_import_cycle():
    assert import_graph.cycles(import_graph.graph()) == []


def test_no_upward_import_and_models_import_their_blocks_only():
    assert set(import_graph.upward(import_graph.graph())) <= ALLOWED_UPWARD


def test_every_module_has_a_layer():
    for name in import_graph.graph():
        import_graph.layer_of(name)  # KeyError names a module added without a layer


def test_the_checks_fail_on_a_cycle_and_on_an_upward_import(tmp_path: Path):
    """The oracle: a scratch tree with a model importing an entry point and two modules importing each other."""
    pkg = tmp_path / "vss"
    (pkg / "models").mkdir(parents=True)
    for name, text in {
        "__init__.py": "",
        "errors.py": "",
        "train.py": "from vss.models import net\n",
        "models/__init__.py": "",
        "models/net.py": "from vss.errors import x\n\ndef f():\n    from vss import train\n",
        "lit.py": "import vss.callbacks\n",
        "callbacks.py": "from vss.lit import y\n",
    }.items():
        (pkg / name).write_text(text)
    g = import_graph.graph(tmp_path)
    assert import_graph.upward(g) == [("vss.models.net", "vss.train")]
    assert sorted(import_graph.cycles(g)) == [["vss.callbacks", "vss.lit"], ["vss.models.net", "vss.train"]]


def test_the_report_prints_layers_upward_imports_and_cycles():
    out = subprocess.run(
        [sys.executable, str(Path(import_graph.__file__))], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[0].startswith("entry points (")
    assert "upward imports (" in out and "cycles (0): none" in out
