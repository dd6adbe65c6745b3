"""Private file creation: images and traces hold guest memory and secrets.

Files are created 0600 with ``O_EXCL`` semantics via a temporary name and renamed
into place, so a reader never sees half a file and the umask cannot widen the mode.

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
from collections.abc import Iterator
from typing import BinaryIO

PRIVATE_MODE = 0o600


def open_private(path: str | os.PathLike[str], flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """Open *path* for writing with mode 0600 whatever the umask; return the fd."""
    fd = os.open(path, flags | os.O_CLOEXEC, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def private_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write *path* atomically with mode 0600; on error nothing is left behind."""
    path = os.fspath(path)
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
