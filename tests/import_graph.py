"""The import graph of ``src/vss`` by layer: ``python tests/import_graph.py`` prints the modules per layer, the
imports that run upward and the import cycles (tests/test_layers.py fails on a cycle or on a new upward import).

Every ``import`` counts, at module level or inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: Layers, bottom first; a module belongs to the first layer with a matching prefix (``x`` matches ``x`` and ``x.*``).
LAYERS: dict[str, tuple[str, ...]] = {
    "leaf": (
        "vss.errors",
        "vss.offsets",
        "vss.checkpoint",
        "vss.folder",
        "vss.runtime",
        "vss.config",
        "vss.cluster",
        "vss.locks",
        "vss.conf",
    ),
    "blocks": ("vss.models", "vss.data", "vss.metrics", "vss.optim"),
    "machinery": (
        "vss.lit",
        "vss.callbacks",
        "vss.stages",
        "vss.loggers",
        "vss.sweep",
        "vss.validation",
        "vss.cli",
        "vss.passes",
        "vss.exported",
        "vss.live",
        "vss.sources",
        "vss.outputs",
    ),
    "entry points": (
        "vss.train",
        "vss.eval",
        "vss.predict",
        "vss.bench",
        "vss.convert",
        "vss.pipeline",
        "vss.export",
    ),
}
PACKAGE = "vss"
"""``vss/__init__.py``: imports nothing, belongs to no layer."""
MODELS_MAY_IMPORT = ("leaf", "vss.models")
"""A model file imports its building blocks only: the leaf modules and ``vss.models`` itself."""


def modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``src/vss``."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """The ``vss`` modules that ``name`` imports (``from vss.x import y`` counts ``vss.x.y`` when that is a module)."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                child = f"{module}.{alias.name}"
                found.add(child if child in known else module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the ``vss`` modules it imports."""
    mods = modules(src)
    return {name: imports(name, path, mods) for name, path in mods.items()}


def layer_of(name: str) -> int | None:
    """Index of the module's layer in :data:`LAYERS` (None for the bare package)."""
    for i, prefixes in enumerate(LAYERS.values()):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    if name == PACKAGE:
        return None
    raise KeyError(f"{name} is in no layer of tests/import_graph.py LAYERS: add it to the layer it belongs to")


def upward(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a lower layer into a higher one, and ``vss.models`` imports of anything but its blocks."""
    leaf = LAYERS["leaf"]
    out = []
    for src, deps in sorted(g.items()):
        for dst in sorted(deps):
            a, b = layer_of(src), layer_of(dst)
            up = a is not None and b is not None and b > a
            if src.startswith("vss.models"):
                allowed = dst.startswith("vss.models") or any(dst == p or dst.startswith(p + ".") for p in leaf)
                up = up or not allowed
            if up:
                out.append((src, dst))
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def report(g: dict[str, set[str]]) -> str:
    """Modules per layer, upward imports, cycles: the text ``python tests/import_graph.py`` prints."""
    lines = []
    for i, name in reversed(list(enumerate(LAYERS))):
        mods = sorted(m for m in g if layer_of(m) == i)
        lines.append(f"{name} ({len(mods)}): " + ", ".join(m.removeprefix("vss.") for m in mods))
    ups = upward(g)
    lines.append(f"upward imports ({len(ups)}): " + (", ".join(f"{a} -> {b}" for a, b in ups) or "none"))
    cyc = cycles(g)
    lines.append(f"cycles ({len(cyc)}): " + ("; ".join(" <-> ".join(c) for c in cyc) or "none"))
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(report(graph()))
