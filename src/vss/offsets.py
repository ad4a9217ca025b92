"""Clip arithmetic: reference offsets relative to a target, and references clamped into a video."""

from __future__ import annotations

from collections.abc import Sequence

from vss.errors import ConfigError


def check_offsets(offsets: Sequence[int], key: str = "model.offsets") -> tuple[int, ...]:
    """Reference offsets relative to the target: integers of any sign, none 0, none repeated."""
    try:
        values = tuple(offsets)
    except TypeError:
        raise ConfigError(
            f"{key}={offsets!r} is invalid: expected a list of non-zero integers, e.g. [-9,-6,-3]"
        ) from None
    if not all(isinstance(o, int) and not isinstance(o, bool) for o in values):
        raise ConfigError(f"{key}={list(values)!r} is invalid: expected a list of non-zero integers, e.g. [-9,-6,-3]")
    if 0 in values:
        raise ConfigError(f"{key}={list(values)} is invalid: 0 is the target itself, not a reference")
    if len(set(values)) != len(values):
        raise ConfigError(f"{key}={list(values)} is invalid: an offset is repeated")
    return values


def clamp_references(offsets: Sequence[int], t: int, length: int | None) -> list[int]:
    """References of target ``t`` at ``offsets``, clamped into the video: before frame 0 -> 0, past the end -> last.

    ``length`` is None while a stream has not ended (then only the start clamps; the frames up to
    ``t + lookahead`` exist).
    """
    last = None if length is None else length - 1
    return [max(0, t + o) if last is None else min(last, max(0, t + o)) for o in offsets]
