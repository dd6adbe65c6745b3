"""The one exception root of virtsave.

Every error a user can cause (bad input, missing domain, daemon down) is a
:class:`VirtsaveError`; the CLI turns it into one line on stderr and exit code 2.
Anything else escaping is a bug.

Example::

    >>> try:
    ...     raise ImageError("not a libvirt save image", offset=0)
    ... except VirtsaveError as exc:
    ...     print(exc)
    not a libvirt save image (at offset 0)
"""

from __future__ import annotations

from typing import Any


class VirtsaveError(Exception):
    """Root of every error virtsave raises on purpose."""

    exit_code: int = 2


class ConnectionFailed(VirtsaveError):
    """The libvirt daemon or a QMP socket cannot be reached."""


class DomainNotFound(VirtsaveError):
    """No domain with that name or UUID."""


class DomainStateError(VirtsaveError):
    """The domain is not in a state the operation needs (e.g. not running)."""


class UnsupportedError(VirtsaveError):
    """The daemon or QEMU is too old for a requested feature."""


class OperationFailed(VirtsaveError):
    """libvirt or QEMU reported a failure of save/restore/migrate."""


class ImageError(VirtsaveError):
    """A save image is missing, truncated, corrupt, foreign or partial."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        super().__init__(message if offset is None else f"{message} (at offset {offset})")


class TraceError(VirtsaveError):
    """A trace file is malformed, of an unknown version or fails the schema."""


class UnsafeTraceError(TraceError):
    """A trace asks for something that could harm the host; needs --allow-unsafe."""


class LogError(VirtsaveError):
    """A libvirtd debug log cannot be read or does not hold what was asked."""


class AmbiguousMonitor(LogError):
    """The log holds several monitors and cannot tell which is the domain's."""

    def __init__(self, message: str, monitors: list[dict[str, Any]] | None = None) -> None:
        self.monitors = monitors or []
        super().__init__(message)


class QMPError(VirtsaveError):
    """A QMP command failed or the QMP conversation broke."""


class LaunchError(VirtsaveError):
    """QEMU could not be launched (missing binary or guest file, early exit)."""
