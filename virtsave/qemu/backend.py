"""The direct QMP path behind the common :class:`~virtsave.core.operation.Backend` interface.

A :class:`DirectBackend` is bound to one guest's QEMU command line (libvirt's, from its
domain log): :meth:`~DirectBackend.launch` boots it, :meth:`~DirectBackend.save` saves a
QEMU by its QMP address (the one it launched, or any other), :meth:`~DirectBackend.restore`
launches a fresh QEMU from the command line and loads the image into it. The QEMU it
launched last is :attr:`~DirectBackend.qemu`; :meth:`~DirectBackend.close` ends it. There
is no managed save here: that is libvirt keeping the image for a domain.

Example::

    from virtsave.core.operation import SaveOptions
    from virtsave.qemu.backend import DirectBackend
    with DirectBackend(argv, serial_log="/var/tmp/g.log") as b:
        b.launch()
        r = b.save(b.target, "/var/tmp/g.save", SaveOptions(image_format="sparse", parallel_channels=2))
        r2 = b.restore("/var/tmp/g.save")      # b.qemu is the restored QEMU, running
"""

from __future__ import annotations

import os

from virtsave.core.errors import OperationFailed
from virtsave.core.operation import OpResult, Progress, SaveOptions
from virtsave.qemu import direct
from virtsave.qemu import launch as qemu_launch

__all__ = ["DirectBackend"]


class DirectBackend:
    """Save and restore with virtsave's own QEMU, no libvirt involved."""

    name = "direct"

    def __init__(self, argv: list[str], *, transport: str = "unix",
                 serial_log: str | os.PathLike[str] | None = None, quit: bool = True) -> None:
        self.argv = list(argv)
        self.transport = transport
        self.serial_log = serial_log
        self.quit = quit
        self.qemu: qemu_launch.QemuProcess | None = None

    @property
    def target(self) -> str:
        """The QMP address of the QEMU this backend launched last."""
        if self.qemu is None:
            raise OperationFailed("the direct backend has no QEMU running (launch() or restore() first)")
        return self.qemu.qmp_address

    def launch(self, *, paused: bool = False) -> qemu_launch.QemuProcess:
        """Boot a QEMU from the command line (the guest runs unless *paused*)."""
        self.close()
        plan = qemu_launch.plan_launch(self.argv, transport=self.transport, paused=paused,
                                       serial_log=self.serial_log)
        self.qemu = qemu_launch.start(plan)
        return self.qemu

    def save(self, target: str, image: str | os.PathLike[str], options: SaveOptions = SaveOptions(), *,
             progress: Progress | None = None) -> OpResult:
        """Save the QEMU at QMP address *target* into *image*; it quits afterwards (unless ``quit=False``).

        Returns as soon as the image is complete; :meth:`close` collects a QEMU of ours that quit.
        """
        return direct.save(target, image, options, quit=self.quit, progress=progress)

    def restore(self, image: str | os.PathLike[str], options: SaveOptions = SaveOptions(), *,
                progress: Progress | None = None) -> OpResult:
        """Launch a QEMU from the command line and load *image*; it stays up as :attr:`qemu`."""
        self.close()
        self.qemu, res = direct.restore(image, self.argv, options, transport=self.transport,
                                        serial_log=self.serial_log, progress=progress)
        return res

    def close(self) -> None:
        """End the QEMU this backend launched last (if any), run dir included."""
        if self.qemu is not None:
            self.qemu.abort()
            self.qemu = None

    def __enter__(self) -> DirectBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
