"""Per-parameter learning-rate and weight-decay rules (``optim.paramwise``) with mmcv 1.3's matching.

A rule set maps name fragments to multipliers, ``{key: {lr_mult, decay_mult, norm_decay_mult}}``, as the
``paramwise_cfg.custom_keys`` of mmcv's ``DefaultOptimizerConstructor`` (mmcv 1.3.0,
``mmcv/runner/optimizer/default_constructor.py``, the builder of the official SegFormer/MRCFA code): the keys
are tried longest first, then in alphabetical order, and the first key that is a substring of the parameter's
name decides: lr = base lr x ``lr_mult``, weight decay = base weight decay x ``decay_mult`` (each default 1).
A parameter that no key matches keeps the base lr and weight decay. Names are the Segmenter's parameter names
(``encoder.*``, ``aggregator.*``); conf/optim/paramwise/*.yaml state each preset's rule and its source.

One addition to mmcv, for rules that have no official code to follow: ``norm_decay_mult`` in a key is the decay
multiplier of the normalisation-layer parameters the key matches (BatchNorm, GroupNorm, LayerNorm, InstanceNorm:
mmcv's ``is_norm``); without it they take the key's ``decay_mult`` as in mmcv.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vss.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

RULE_FIELDS = ("lr_mult", "decay_mult", "norm_decay_mult")
Rules = Mapping[str, Mapping[str, float]]


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_paramwise(rules: Any, where: str = "optim.paramwise") -> dict[str, dict[str, float]]:
    """The rules as plain dicts of floats, or a :class:`ConfigError` naming the bad key (``where`` is its prefix)."""
    if rules is None:
        return {}
    if not isinstance(rules, Mapping):
        raise ConfigError(f"{where}={rules!r} is invalid: expected a mapping {{name fragment: {{lr_mult: x, ...}}}}")
    out: dict[str, dict[str, float]] = {}
    for key, rule in rules.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: key {key!r} is invalid: expected a non-empty parameter-name fragment")
        if not isinstance(rule, Mapping):
            raise ConfigError(
                f"{where}.{key}={rule!r} is invalid: expected a mapping with some of {list(RULE_FIELDS)} "
                "(mmcv's global options such as norm_decay_mult are not supported: put them in a key)"
            )
        for field, value in rule.items():
            if field not in RULE_FIELDS:
                raise ConfigError(f"{where}.{key}.{field} is not a rule field: expected one of {list(RULE_FIELDS)}")
            if not _number(value) or value < 0:
                raise ConfigError(f"{where}.{key}.{field}={value!r} is invalid: expected a non-negative finite number")
        out[key] = {field: float(value) for field, value in rule.items()}
    return out


def key_order(rules: Rules) -> list[str]:
    """The keys in the order mmcv tries them: longest first, then alphabetical."""
    return sorted(sorted(rules), key=len, reverse=True)


def multipliers(name: str, rules: Rules, is_norm: bool = False, order: list[str] | None = None) -> tuple[float, float]:
    """(lr multiplier, weight-decay multiplier) of the parameter ``name``: the first key in mmcv order that is a
    substring of it, else (1, 1). ``is_norm``: the parameter belongs to a normalisation layer."""
    for key in key_order(rules) if order is None else order:
        if key in name:
            rule = rules[key]
            decay = rule.get("decay_mult", 1.0)
            if is_norm:
                decay = rule.get("norm_decay_mult", decay)
            return float(rule.get("lr_mult", 1.0)), float(decay)
    return 1.0, 1.0


def norm_layers() -> tuple[type, ...]:
    """The normalisation layers mmcv's constructor calls ``is_norm``."""
    from torch import nn

    return (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def parameter_multipliers(module: nn.Module, rules: Rules) -> dict[str, tuple[Any, float, float]]:
    """Every trainable parameter of ``module`` by its name (a shared one by its first) -> (the parameter, its lr
    multiplier, its weight-decay multiplier)."""
    norms, order = norm_layers(), key_order(rules)
    out: dict[str, tuple[Any, float, float]] = {}
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                out[name] = (p, *multipliers(name, rules, isinstance(mod, norms), order))
    return out


def param_groups(module: nn.Module, rules: Rules, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups of ``module``'s trainable parameters, one per (lr, weight-decay) multiplier pair,
    each with its ``lr``, ``weight_decay`` and a ``name`` (the lr monitor's label), frozen parameters left out."""
    groups: dict[tuple[float, float], list[Any]] = {}
    for p, lr_mult, decay_mult in parameter_multipliers(module, rules).values():
        groups.setdefault((lr_mult, decay_mult), []).append(p)
    return [
        {
            "params": ps,
            "lr": lr * lr_mult,
            "weight_decay": weight_decay * decay_mult,
            "lr_mult": lr_mult,
            "decay_mult": decay_mult,
            "name": f"lr_x{lr_mult:g}_decay_x{decay_mult:g}",
        }
        for (lr_mult, decay_mult), ps in sorted(groups.items())
    ]


def describe_groups(groups: list[dict[str, Any]]) -> str:
    """One line: per group, its multipliers (lr, weight decay) and its number of parameter tensors and values."""
    parts = [
        f"lr x{g['lr_mult']:g} decay x{g['decay_mult']:g}: {len(g['params'])} tensors "
        f"({sum(p.numel() for p in g['params']) / 1e6:.2f} M)"
        for g in groups
    ]
    return "[vss] optimizer groups (optim.paramwise): " + "; ".join(parts)
