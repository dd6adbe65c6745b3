"""Durability of a finished save image (issue 15, item 4): the complete magic only after the data and
the directory entry are on disk.

The order is shown by intercepting the system calls (``os.fsync``, ``os.pwrite``, ``os.write``) while
the direct/replay path finishes an image (:meth:`virtsave.qemu.migration.Outgoing.finish`, which calls
:func:`virtsave.image.saveimage.finalize`): each call is recorded with what its fd is (the image, its
directory, something else), and the test checks the sequence — not a comment.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from virtsave.image import saveimage
from virtsave.qemu import migration

XML = "<domain type='qemu'><name>durable</name></domain>"


class SyscallLog:
    """Records fsync/pwrite/write calls on the image and on its directory, in order."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.events: list[tuple[str, str] | tuple[str, str, bytes]] = []

    def what(self, fd: int) -> str:
        st = os.fstat(fd)
        img = os.stat(self.image)
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (img.st_dev, img.st_ino):
            return "image"
        d = os.stat(self.image.parent)
        if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == (d.st_dev, d.st_ino):
            return "directory"
        return "other"

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_fsync, real_pwrite, real_write = os.fsync, os.pwrite, os.write

        def fsync(fd: Any) -> None:
            fd = fd if isinstance(fd, int) else fd.fileno()
            self.events.append(("fsync", self.what(fd)))
            real_fsync(fd)

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            self.events.append(("pwrite", self.what(fd), bytes(data[:16]) if offset == 0 else b""))
            return real_pwrite(fd, data, offset)

        def write(fd: int, data: bytes) -> int:
            self.events.append(("write", self.what(fd)))
            return real_write(fd, data)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "write", write)

    def index(self, pred: Callable[[tuple[Any, ...]], bool], start: int = 0) -> int:
        for i in range(start, len(self.events)):
            if pred(self.events[i]):
                return i
        raise AssertionError(f"no such call after #{start} in {self.events}")


def _magic_write(e: tuple[Any, ...]) -> bool:
    return e[0] == "pwrite" and e[1] == "image" and e[2] == saveimage.MAGIC


def assert_durable_order(log: SyscallLog) -> None:
    """data written → fsync(image) → fsync(directory) → magic written → fsync(image), nothing after."""
    last_data = max(i for i, e in enumerate(log.events) if e[0] in ("write", "pwrite") and e[1] == "image"
                    and not _magic_write(e))
    sync_data = log.index(lambda e: e == ("fsync", "image"), last_data)
    sync_dir = log.index(lambda e: e == ("fsync", "directory"), sync_data)
    magic = log.index(_magic_write)
    assert sync_dir < magic, f"the magic was written before the directory entry was synced: {log.events}"
    sync_magic = log.index(lambda e: e == ("fsync", "image"), magic)
    assert [i for i, e in enumerate(log.events) if _magic_write(e)] == [magic], log.events
    assert last_data < sync_data < sync_dir < magic < sync_magic, log.events
    assert not any(e[1] == "image" and e[0] in ("write", "pwrite") for e in log.events[magic + 1:]), log.events


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_outgoing_finish_syncs_data_and_directory_before_the_magic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   transport: str) -> None:
    """The direct/replay path: the stream QEMU wrote, then Outgoing.finish (tcp: the header put back first)."""
    path = tmp_path / "g.save"
    out = migration.Outgoing.create(str(path), XML, transport=transport)
    log = SyscallLog(path)
    log.install(monkeypatch)
    try:
        os.write(out.fd, b"QEVM\0\0\0\3" + bytes(4096))  # stands in for QEMU's stream
        size = out.finish()
    finally:
        out.close()
    assert_durable_order(log)
    assert size == os.path.getsize(path)
    assert saveimage.read_header_path(path, allow_partial=False).partial is False


def test_finalize_without_a_path_syncs_the_fds_own_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sub" / "img"
    path.parent.mkdir()
    with open(path, "w+b") as f:
        saveimage.write_header(f, "<domain/>")
        log = SyscallLog(path)
        log.install(monkeypatch)
        os.write(f.fileno(), b"QEVM")
        saveimage.finalize(f.fileno())
    assert_durable_order(log)


def test_the_order_check_catches_a_magic_before_the_directory_sync(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above is not vacuous: the old finalize (no directory sync) fails it."""
    path = tmp_path / "img"
    with open(path, "w+b") as f:
        saveimage.write_header(f, "<domain/>")
        log = SyscallLog(path)
        log.install(monkeypatch)
        os.write(f.fileno(), b"QEVM")
        os.fsync(f.fileno())
        os.pwrite(f.fileno(), saveimage.MAGIC, 0)
        os.fsync(f.fileno())
    with pytest.raises(AssertionError):
        assert_durable_order(log)


def test_finalize_refuses_an_image_that_is_not_partial(tmp_path: Path) -> None:
    path = tmp_path / "img"
    with open(path, "w+b") as f:
        saveimage.write_header(f, "<domain/>", partial=False)
        with pytest.raises(saveimage.ImageError, match="LibvirtQemudPart"):
            saveimage.finalize(f.fileno(), path)
