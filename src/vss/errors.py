"""The errors vss reports as one line (no stack trace), and how it reports them; imports nothing of vss."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import Any

IGNORE_INDEX = 255
"""The label id of unlabelled pixels (mmseg's ``ignore_index``): no loss, no metric."""


class DatasetError(ValueError):
    """A dataset on disk does not match what the reader expects; the message names the file."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the value and what is allowed."""


def _end_progress_bars() -> None:
    """Close live tqdm bars, so that what is printed next starts on a new line, not after a bar's ``\\r``."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


def print_error(message: str) -> None:
    """``error: message`` on stderr, on a line of its own (after any progress bar)."""
    _end_progress_bars()
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn config and dataset errors into one clear line on stderr and exit code 2 (no stack trace)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if isinstance(e, ConfigError | DatasetError):
                print_error(worker_error_message(str(e)))
                raise SystemExit(2) from None
            raise

    return wrapper


def worker_error_message(text: str) -> str:
    """The error's own message when it was raised in a DataLoader worker (torch re-raises it with the worker's
    traceback in the text: ``Caught DatasetError in DataLoader worker process 0. Original Traceback ...``)."""
    if not re.match(r"Caught \w+ in DataLoader worker process \d+\.", text):
        return text
    name = text.split(" ", 2)[1]
    return text.rsplit(f"{name}: ", 1)[-1].strip()
