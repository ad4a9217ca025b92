"""One process per directory: ``vss.pipeline`` locks its pipeline directory, ``vss.train`` its run directory.

The lock is ``DIR/vss.lock``: a POSIX record lock (``fcntl.lockf``) on the file, which names the holder (PID,
host, command). The kernel releases the lock when its process ends, however it ends, and a forked child (a data
loader worker) does not inherit it; POSIX locks also hold across NFS. A second process is refused in one line
naming the holder's PID; the file a killed holder leaves behind is taken over with a note. On a file system
without record locks the PID alone decides: a running PID on this host holds the directory. The holder removes
the file when it ends normally.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from vss.errors import ConfigError

LOCK_FILE = "vss.lock"
_HELD: dict[Path, DirectoryLock] = {}
"""The locks this process holds (POSIX locks do not conflict within one process: this keeps them exclusive)."""


class DirectoryInUse(ConfigError):
    """Another running process holds the directory's lock."""


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(fd: int) -> dict[str, Any]:
    """The holder record of an open lock file (empty when there is none or it is unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        data = json.loads(os.read(fd, 4096).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else {}


def _lock_file(fd: int) -> bool | None:
    """Lock the open file without waiting: True when taken, False when another process holds it, None when the
    file system has no record locks."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return True


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _command() -> str:
    """What this process is, for the refusal line: ``python -m vss.train``, ``python -m vss.pipeline``, ..."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    script = sys.argv[0] if sys.argv else ""
    return f"python {Path(script).name}" if script and script != "-c" else "python -c"


class DirectoryLock:
    """The lock of one directory (``DIR/vss.lock``) for this process; :meth:`acquire` and :meth:`release`."""

    def __init__(self, directory: str | Path, what: str = "directory") -> None:
        self.directory = Path(directory).resolve()
        self.what = what
        self.path = self.directory / LOCK_FILE
        self.fd: int | None = None

    def _refuse(self, holder: dict[str, Any]) -> DirectoryInUse:
        pid = holder.get("pid", "?")
        host = holder.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        since = f", since {holder['since']}" if holder.get("since") else ""
        command = f" ({holder['command']}{since})" if holder.get("command") else ""
        return DirectoryInUse(
            f"{self.what} {self.directory} is in use by PID {pid}{where}{command}: one process at a time trains "
            f"in a directory; wait for it to end or stop it (kill {pid}), then run this again"
        )

    def acquire(self) -> str | None:
        """Take the lock, or raise :class:`DirectoryInUse` naming the holder; returns a note when it took over the
        lock file of a process that is no longer running (else None)."""
        if self.fd is not None:
            return None
        if self.directory in _HELD:
            raise self._refuse({"pid": os.getpid(), "command": _command()})
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                taken = _lock_file(fd)
                holder = _read(fd)
                here = holder.get("host") in (None, socket.gethostname())
                if taken is False or (taken is None and holder and here and _alive(holder["pid"])):
                    raise self._refuse(holder)
            except BaseException:
                os.close(fd)
                raise
            if taken and os.fstat(fd).st_ino != _inode(self.path):
                os.close(fd)  # the holder ended and removed this file meanwhile: lock the path's new file
                continue
            break
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command()}
        record["since"] = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        self.fd = fd
        _HELD[self.directory] = self
        if not holder:
            return None
        where = "" if here else f" on {holder['host']}"
        return f"took over the lock of {self.what} {self.directory} from PID {holder['pid']}{where}, which has ended"

    def release(self) -> None:
        """Remove the lock file (while still holding it) and let go."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        _HELD.pop(self.directory, None)
        try:
            if os.fstat(fd).st_ino == _inode(self.path):
                self.path.unlink()
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> DirectoryLock:
        note = self.acquire()
        if note:
            print(f"note: {note}", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_RUN_LOCK: list[DirectoryLock] = []


def hold_run_directory(directory: str | Path) -> str | None:
    """``vss.train``'s lock of its run directory, held until :func:`release_run_directory` (the end of ``train``)
    or the process ends (a process trains one run at a time: a new run directory lets go of the previous one).
    Returns a take-over note or None."""
    lock = DirectoryLock(directory, "run directory")
    if _RUN_LOCK and _RUN_LOCK[0].directory == lock.directory and _RUN_LOCK[0].fd is not None:
        return None
    while _RUN_LOCK:
        _RUN_LOCK.pop().release()
    note = lock.acquire()
    _RUN_LOCK.append(lock)
    return note


@atexit.register
def release_run_directory() -> None:
    """Let go of the run directory :func:`hold_run_directory` took (if any)."""
    while _RUN_LOCK:
        _RUN_LOCK.pop().release()
