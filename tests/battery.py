"""The model battery's composition, shared by test_contract.py, test_eval.py and test_bench.py: every
``conf/model/*.yaml`` composed as a user would type it, at test size.

A model is ``model=NAME encoder=ENCODER``, the :data:`TINY_WIDTHS` it has (each set where the model config has
the key), then what the method declares in its own test file. A method that needs more (small block sizes, a
shallower stack, another encoder) declares it there, in a module-level literal keyed by its model config name::

    # tests/test_mymethod.py
    BATTERY = {"mymethod": {"encoder": "resnet18", "overrides": ["model.depth=1", "model.block_size=[4,4]"]}}

``encoder`` is the encoder the default run tests the model on (default: the first of :data:`ENCODERS`); the
other families run under ``-m slow``. ``overrides`` come after the tiny widths. The battery reads ``BATTERY``
from every ``tests/test_*.py`` without importing the file; a model config without one gets the defaults. Adding
a method is one aggregator file, one ``conf/model/*.yaml`` and one test file: no shared test file changes.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from conftest import compose_train
from vss.config import CONF_DIR
from vss.errors import ConfigError
from vss.models.segmenter import Segmenter

TESTS = Path(__file__).resolve().parent
NUM_CLASSES = 5
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
TINY_WIDTHS = {  # set where the model config has the key
    "embed_dim": 16,
    "num_heads": 2,
    "mlp_ratio": 2.0,
    "channels": 16,  # a head's width (PSPHead: pspnet, stf)
    "mlp_dim": 16,  # a feed-forward hidden width (STF/MAR)
}
DECLARATION_KEYS = {"encoder", "overrides"}


def _smallest_of_each_family() -> list[str]:
    """``conf/encoder/*.yaml`` grouped by name without the trailing number (and variant letter: resnet50c is a
    resnet): the smallest number of each group."""
    families: dict[str, tuple[int, str]] = {}
    for p in (CONF_DIR / "encoder").glob("*.yaml"):
        m = re.fullmatch(r"(.*?)(\d+)[a-z]?", p.stem)
        family, number = (m[1], int(m[2])) if m else (p.stem, 0)
        families[family] = min(families.get(family, (number, p.stem)), (number, p.stem))
    return sorted(name for _, name in families.values())


ENCODERS = _smallest_of_each_family()


def _assigns_battery(node: ast.stmt) -> bool:
    """``BATTERY = {...}`` or ``BATTERY: T = {...}`` at module level."""
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == "BATTERY" for t in node.targets)
    return isinstance(node, ast.AnnAssign) and node.value is not None and getattr(node.target, "id", "") == "BATTERY"


@functools.cache
def declarations() -> dict[str, dict[str, Any]]:
    """Model config name -> its declaration, from the module-level ``BATTERY`` literal of every
    ``tests/test_*.py`` (parsed, not imported)."""
    found: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.parse(path.read_text(), str(path)).body:
            if not _assigns_battery(node):
                continue
            value = ast.literal_eval(node.value)  # type: ignore[attr-defined]
            for name, decl in value.items():
                if name in found:
                    raise ValueError(f"BATTERY[{name!r}] is declared in {where[name]} and {path.name}: keep one")
                if name not in MODELS:
                    raise ValueError(f"{path.name}: BATTERY[{name!r}] names no conf/model/*.yaml ({MODELS})")
                if not set(decl) <= DECLARATION_KEYS:
                    raise ValueError(f"{path.name}: BATTERY[{name!r}] keys {sorted(decl)}, expected {DECLARATION_KEYS}")
                found[name], where[name] = decl, path.name
    return found


def encoder_of(model: str) -> str:
    """The encoder the default run tests ``model`` on: its declared one, else the first of :data:`ENCODERS`."""
    return declarations().get(model, {}).get("encoder", ENCODERS[0])


@functools.cache
def model_keys(model: str) -> frozenset[str]:
    return frozenset(compose_train([f"model={model}"]).model)


def overrides(model: str, encoder: str | None = None) -> list[str]:
    """``model=MODEL encoder=ENCODER`` (default: :func:`encoder_of`), the tiny widths the model has and its
    declared overrides: the same list for any primary config with the model and encoder groups (train, bench)."""
    tiny = [f"model.{k}={v}" for k, v in TINY_WIDTHS.items() if k in model_keys(model)]
    declared = declarations().get(model, {}).get("overrides", [])
    return [f"model={model}", f"encoder={encoder or encoder_of(model)}", *tiny, *declared]


def compose(model: str, encoder: str | None = None, *extra: str) -> DictConfig:
    """``conf/train.yaml`` with :func:`overrides`, then ``extra``."""
    return compose_train([*overrides(model, encoder), *extra])


def build(
    model: str, encoder: str | None = None, *extra: str, freeze: tuple[str, ...] = (), seed: int = 0
) -> Segmenter:
    """The :class:`Segmenter` of :func:`compose` for :data:`NUM_CLASSES` classes (weights seeded by ``seed``)."""
    cfg = compose(model, encoder, *extra)
    torch.manual_seed(seed)
    return Segmenter(instantiate(cfg.encoder), instantiate(cfg.model), NUM_CLASSES, freeze=freeze)


@functools.cache
def supported(model: str, encoder: str) -> bool:
    """The model builds on the encoder (on the meta device); False when its constructor raises ConfigError."""
    try:
        with torch.device("meta"):
            build(model, encoder)
    except ConfigError:
        return False
    return True


def combos() -> list[Any]:
    """``(model, encoder)`` for every model and every encoder family, as pytest params: the model's own encoder
    (:func:`encoder_of`) in the default run, the other families marked ``slow``."""
    return [
        pytest.param((m, e), id=f"{m}-{e}", marks=() if e == encoder_of(m) else pytest.mark.slow)
        for m in MODELS
        for e in dict.fromkeys([encoder_of(m), *ENCODERS])
    ]
