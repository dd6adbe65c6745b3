"""libvirt's own save path behind the common :class:`~virtsave.core.operation.Backend` interface.

A thin adapter over :mod:`virtsave.libvirtd.reference`: the same calls, taking one
:class:`~virtsave.core.operation.SaveOptions`. An option an operation does not take
(e.g. ``image_format`` for a restore: the image says it) is refused with one line, not dropped.

Example (needs a running libvirtd)::

    from virtsave.core.operation import SaveOptions
    from virtsave.libvirtd.backend import LibvirtBackend
    b = LibvirtBackend.connect()                  # $LIBVIRT_DEFAULT_URI or qemu:///system
    r = b.managed_save("vm1", SaveOptions(bypass_cache=True))
    r = b.start("vm1")                            # r.detail["from_managed_save"] is True
"""

from __future__ import annotations

import os

import libvirt

from virtsave.core.operation import OpResult, Progress, SaveOptions
from virtsave.libvirtd import reference

__all__ = ["LibvirtBackend"]


class LibvirtBackend:
    """Save, restore, managed save and start done by libvirtd."""

    name = "libvirt"

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn = conn

    @classmethod
    def connect(cls, uri: str | None = None) -> LibvirtBackend:
        """A backend on a new read-write connection to *uri*."""
        return cls(reference.connect(uri))

    def save(self, target: str, image: str | os.PathLike[str], options: SaveOptions = SaveOptions(), *,
             progress: Progress | None = None) -> OpResult:
        """``virDomainSaveFlags``/``SaveParams``: save domain *target* into *image*."""
        return reference.save(self.conn, target, image, progress=progress, **options.only(
            "bypass_cache", "state", "xml", "image_format", "parallel_channels", what="libvirt save"))

    def restore(self, image: str | os.PathLike[str], options: SaveOptions = SaveOptions(), *,
                progress: Progress | None = None) -> OpResult:
        """``virDomainRestoreFlags``/``RestoreParams``: start the domain saved in *image*."""
        return reference.restore(self.conn, image, progress=progress, **options.only(
            "bypass_cache", "state", "xml", "parallel_channels", what="libvirt restore"))

    def managed_save(self, target: str, options: SaveOptions = SaveOptions(), *,
                     progress: Progress | None = None) -> OpResult:
        """``virDomainManagedSave``: save *target* to the image libvirt keeps for it."""
        return reference.managed_save(self.conn, target, progress=progress,
                                      **options.only("bypass_cache", "state", what="libvirt managed save"))

    def start(self, target: str, options: SaveOptions = SaveOptions(), *,
              progress: Progress | None = None) -> OpResult:
        """``virDomainCreateWithFlags``: start *target*, from its managed-save image when it has one."""
        return reference.start(self.conn, target, progress=progress,
                               **options.only("bypass_cache", "state", what="libvirt start"))

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def __enter__(self) -> LibvirtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
