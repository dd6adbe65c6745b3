"""What every save/restore backend shares: its options, its result, its interface.

virtsave saves and restores along two paths — libvirt's own (:mod:`virtsave.libvirtd.backend`)
and QEMU driven directly over QMP (:mod:`virtsave.qemu.backend`). Both take one
:class:`SaveOptions`, return one :class:`OpResult` and implement :class:`Backend`
(and, where libvirt manages the image, :class:`ManagedSaveBackend`), so the harness
measures and compares them alike.

Example::

    >>> opts = SaveOptions(image_format="sparse", parallel_channels=2)
    >>> opts.channels, opts.only("image_format", "parallel_channels", what="save")
    (2, {'image_format': 'sparse', 'parallel_channels': 2})
    >>> r = OpResult("vm1", "save", True, 1.25, "/var/tmp/vm1.save", 2048, state="shut off", stats={})
    >>> r.to_dict()["detail"]
    {'state_after': 'shut off', 'job': {}}
    >>> domain_name("<domain><name> vm1 </name></domain>")
    'vm1'
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol, runtime_checkable

from virtsave.core.errors import UnsupportedError

__all__ = ["Backend", "ManagedSaveBackend", "OpResult", "Progress", "SaveOptions", "State", "domain_name"]

#: The state a guest is to be in after a restore (or, for a save, the one its image records).
State = Literal["running", "paused"]
#: A progress callback: gets libvirt-job-like dicts (``domain``, ``operation``, ``data_processed``…).
Progress = Callable[[dict[str, Any]], None]
STATES = ("running", "paused")


@dataclass(frozen=True)
class SaveOptions:
    """How to save or restore; the same names and meanings on every backend.

    * *bypass_cache*: O_DIRECT, keep the image out of the page cache (libvirt's ``--bypass-cache``).
    * *state*: ``"running"`` / ``"paused"`` after restore, whatever the image says; for a save,
      the state the image records. None: as the guest was when saved.
    * *image_format*: ``raw``, ``gzip`` … ``sparse``; None: the backend's default (libvirt:
      ``save_image_format`` of qemu.conf; direct: ``raw``).
    * *parallel_channels*: QEMU multifd channels (sparse images only). None, or 1: one
      migration stream, no multifd — the same on every backend.
    * *xml*: a replacement domain XML stored in the image (libvirt's ``--xml``/dxml).
    """

    bypass_cache: bool = False
    state: State | None = None
    image_format: str | None = None
    parallel_channels: int | None = None
    xml: str | None = None

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in STATES:
            raise UnsupportedError(f"state must be running or paused, not {self.state!r}")
        if self.parallel_channels is not None and self.parallel_channels < 1:
            raise UnsupportedError(f"--parallel-channels must be ≥ 1, not {self.parallel_channels}")

    @property
    def channels(self) -> int:
        """How many migration channels: 1 unless more were asked for."""
        return self.parallel_channels or 1

    def only(self, *names: str, what: str) -> dict[str, Any]:
        """The options *names* as keywords; any other option that was set raises UnsupportedError.

        >>> SaveOptions(xml="<domain/>").only("bypass_cache", what="start")
        Traceback (most recent call last):
        ...
        virtsave.core.errors.UnsupportedError: start does not take xml
        """
        extra = [f.name for f in fields(self) if f.name not in names and getattr(self, f.name) != f.default]
        if extra:
            raise UnsupportedError(f"{what} does not take {', '.join(extra)}")
        return {n: getattr(self, n) for n in names}


@dataclass
class OpResult:
    """Outcome of one save, restore, managed save or start, on either backend.

    *domain*: the domain's name (the one in the image's XML on the direct path). *state*: the
    guest's state afterwards (``running``, ``paused``, ``shut off`` …; None if unknown).
    *stats*: the final statistics (libvirt's job stats; QEMU's ``query-migrate`` summary).
    *migration*: QEMU's last migration status (direct path; libvirt does not report it).
    *detail*: what only one backend knows (libvirt flags, ``from_managed_save`` …).
    """

    domain: str | None
    operation: str
    ok: bool
    seconds: float
    image: str | None = None
    image_size: int | None = None
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    state: str | None = None
    stats: dict[str, Any] | None = None
    migration: str | None = None
    backend: Literal["libvirt", "direct"] = "libvirt"

    def to_dict(self) -> dict[str, Any]:
        """The JSON the CLI prints: each backend's layout, as it always was."""
        if self.backend == "direct":
            return {"operation": self.operation, "image": self.image, "ok": self.ok, "seconds": self.seconds,
                    "image_size": self.image_size,
                    # a save reports how the migration ended, a restore how the guest is
                    "status": self.migration if self.operation == "save" else self.state,
                    "stats": self.stats or {}}
        detail = dict(self.detail)
        if self.state is not None:
            detail["state_after"] = self.state
        if self.stats is not None:
            detail["job"] = self.stats
        return {"domain": self.domain, "operation": self.operation, "ok": self.ok, "seconds": self.seconds,
                "image": self.image, "image_size": self.image_size, "error": self.error, "detail": detail}


@runtime_checkable
class Backend(Protocol):
    """A save/restore path. *target* names what to save: a domain (libvirt), a QMP address (direct)."""

    name: str

    def save(self, target: str, image: str | os.PathLike[str], options: SaveOptions = SaveOptions(), *,
             progress: Progress | None = None) -> OpResult:
        """Save *target* into *image* (libvirt's format); the guest stops."""
        ...

    def restore(self, image: str | os.PathLike[str], options: SaveOptions = SaveOptions(), *,
                progress: Progress | None = None) -> OpResult:
        """Bring the guest saved in *image* back."""
        ...


@runtime_checkable
class ManagedSaveBackend(Backend, Protocol):
    """A path that keeps the image itself (libvirt's managed save): save by name, start from it."""

    def managed_save(self, target: str, options: SaveOptions = SaveOptions(), *,
                     progress: Progress | None = None) -> OpResult:
        """Save *target* to its managed-save image; the guest stops."""
        ...

    def start(self, target: str, options: SaveOptions = SaveOptions(), *,
              progress: Progress | None = None) -> OpResult:
        """Start *target*, from its managed-save image when it has one."""
        ...


_NAME = re.compile(r"<name>\s*([^<]+?)\s*</name>")


def domain_name(xml: str | None) -> str | None:
    """The first ``<name>`` of a domain XML (the domain's name), or None."""
    m = _NAME.search(xml or "")
    return m.group(1) if m else None
