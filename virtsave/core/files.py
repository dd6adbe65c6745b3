"""Private file creation: images and traces hold guest memory and secrets.

Files are created 0600 with ``O_EXCL`` semantics via a temporary name and renamed
into place, so a reader never sees half a file and the umask cannot widen the mode.
A target that exists and is not a regular file (``/dev/null``, ``/dev/stdout``, a FIFO) is written in
place and keeps its mode: it is never replaced by a file nor chmod-ed.

Example::

    >>> import tempfile, os, stat
    >>> d = tempfile.mkdtemp()
    >>> with private_writer(os.path.join(d, "t.json")) as f:
    ...     _ = f.write(b"{}")
    >>> oct(stat.S_IMODE(os.stat(os.path.join(d, "t.json")).st_mode))
    '0o600'
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import BinaryIO

PRIVATE_MODE = 0o600


def open_private(path: str | os.PathLike[str], flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """Open *path* for writing with mode 0600 whatever the umask; return the fd.

    Only a regular file gets its mode set: a device or FIFO opened here keeps its own.
    """
    fd = os.open(path, flags | os.O_CLOEXEC, PRIVATE_MODE)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, PRIVATE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def is_special(path: str | os.PathLike[str]) -> bool:
    """*path* exists and is neither a regular file nor a directory (a device, a FIFO, a socket).

    >>> is_special("/dev/null"), is_special("/etc/hostname"), is_special("/no/such/file")
    (True, False, False)
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


@contextlib.contextmanager
def private_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write *path* atomically with mode 0600; on error nothing is left behind.

    A special file (:func:`is_special`) is written in place instead: renaming over ``/dev/null`` would
    replace the device with a regular file for the whole machine.
    """
    path = os.fspath(path)
    if is_special(path):
        with open(path, "wb") as dev:
            yield dev
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
