"""The errors vss reports as one line (no stack trace), and how it reports them; imports nothing of vss."""

from __future__ import annotations

import errno
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


FILE_ERRNOS = {
    errno.EROFS: "a read-only file system: write elsewhere",
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
    errno.EACCES: "permission denied: write elsewhere or fix the permissions",
    errno.EPERM: "operation not permitted: write elsewhere or fix the permissions",
    errno.ENOTDIR: "a file stands where a directory is needed: pass a directory",
    errno.EISDIR: "a directory stands where a file is needed",
    errno.EEXIST: "a file stands where a directory is needed: pass a directory",
}
"""File-system errors reported as one line (an output path the machine refuses), with what to do."""


def os_error_message(e: OSError) -> str:
    """One line for a file-system error: the path, the system's words and what to do."""
    path = e.filename if e.filename is not None else "a file"
    hint = FILE_ERRNOS.get(e.errno or 0, "")
    return f"cannot write {str(path)!r}: {e.strerror or e}" + (f" ({hint})" if hint else "")


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
    """Turn config and dataset errors, and the file-system errors of :data:`FILE_ERRNOS` (a read-only or full disk,
    a file where a folder belongs), into one clear line on stderr and exit code 2 (no stack trace)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if isinstance(e, ConfigError | DatasetError):
                print_error(worker_error_message(str(e)))
                raise SystemExit(2) from None
            if isinstance(e, OSError) and e.errno in FILE_ERRNOS:
                print_error(os_error_message(e))
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
