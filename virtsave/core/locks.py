"""One virtsave process at a time per object (a domain being traced): an ``flock`` that names its holder.

The lock is a file under ``STATE_DIR/locks/`` held with ``fcntl.flock(LOCK_EX | LOCK_NB)`` for as long
as the work lasts, so a second process is refused **at once** (no waiting) with one line naming the
first — its pid, its process start time and since when it holds the lock. The kernel drops the lock
when its holder exits, also on SIGKILL: a dead holder never blocks anyone and no stale state is left
to repair (the file itself stays, empty of meaning until the next holder writes its pid into it).

Example::

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with exclusive("domain-1234", "trace of vm1", state_dir=d) as held:
    ...     held.pid == os.getpid()
    True
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from virtsave.core import paths
from virtsave.core.errors import VirtsaveError

__all__ = ["Busy", "Holder", "exclusive", "holder"]

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class Busy(VirtsaveError):
    """Another virtsave process holds the lock (its :class:`Holder` is ``.holder``)."""

    def __init__(self, message: str, holder: Holder | None = None) -> None:
        self.holder = holder
        super().__init__(message)


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: pid, process start time (clock ticks since boot), what and since when (UTC)."""

    pid: int
    start: int | None
    what: str
    since: str


def _lock_path(name: str, state_dir: str | os.PathLike[str] | None) -> Path:
    base = Path(state_dir) if state_dir is not None else Path(paths.STATE_DIR)
    d = base / "locks"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d / f"{_SAFE.sub('_', name)}.lock"


def _starttime(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rfind(b")") + 2:].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _read_holder(fd: int) -> Holder | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"null")
        return Holder(int(data["pid"]), data.get("start"), str(data.get("what", "")), str(data.get("since", "")))
    except (ValueError, TypeError, KeyError, OSError):
        return None


def holder(name: str, *, state_dir: str | os.PathLike[str] | None = None) -> Holder | None:
    """The process holding lock *name* now, or None when it is free."""
    path = _lock_path(name, state_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(name: str, what: str, *, state_dir: str | os.PathLike[str] | None = None,
              busy: str | None = None) -> Iterator[Holder]:
    """Hold lock *name* for the block, or raise :class:`Busy` at once naming the holder.

    *what* says what this process does (shown to the one refused); *busy* is the refusal's start
    (default ``"busy"``): the message goes on with the holder's pid, what it does and since when.
    """
    path = _lock_path(name, state_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_holder(fd)
            for _ in range(20):  # the holder may have the lock but not yet its name in the file
                if other is not None:
                    break
                time.sleep(0.01)
                other = _read_holder(fd)
            who = (f"virtsave pid {other.pid} ({other.what}, since {other.since})" if other
                   else "another virtsave process")
            raise Busy(f"{busy or 'busy'}: {who} is at it; try again when it is done", other) from None
        me = Holder(os.getpid(), _starttime(os.getpid()), what,
                    _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me.__dict__).encode(), 0)
        try:
            yield me
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing drops the lock
