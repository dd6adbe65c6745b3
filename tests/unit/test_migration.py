"""The save/restore steps both QEMU-side backends share (virtsave.qemu.migration), no QEMU.

What QEMU itself does (write the stream, load it) is covered by tests/integration
(test_replay.py, test_reliability.py); here: which URI and fd QEMU would get over each
transport, what makes an image complete, and what a failed save leaves behind.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from virtsave.core.errors import ImageError, OperationFailed, QMPError, UnsupportedError
from virtsave.image import saveimage
from virtsave.qemu import migration

XML = "<domain type='qemu'><name>g</name></domain>"


class _Session:
    """Stands in for a QMP session in the failure-path checks: records what would be sent."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[str] = []
        self.fail = fail

    def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        self.sent.append(cmd)
        if self.fail:
            raise QMPError(f"{cmd}: QMP connection lost")
        return {}


def _out(tmp_path: Path, **kw: Any) -> migration.Outgoing:
    return migration.Outgoing.create(str(tmp_path / "g.save"), XML, **kw)


def test_outgoing_image_is_private_partial_and_positioned(tmp_path: Path) -> None:
    out = _out(tmp_path)
    try:
        assert stat.S_IMODE(os.stat(out.path).st_mode) == 0o600
        assert saveimage.read_header_path(out.path).partial
        assert out.qemu_fd == out.fd and os.lseek(out.fd, 0, os.SEEK_CUR) == out.header.stream_offset
    finally:
        out.close()


def test_sparse_over_unix_gets_a_write_only_fd(tmp_path: Path) -> None:
    out = _out(tmp_path, image_format="sparse")
    try:
        assert out.qemu_fd != out.fd
        assert os.readlink(f"/proc/self/fd/{out.qemu_fd}") == out.path
        flags = int(Path(f"/proc/self/fdinfo/{out.qemu_fd}").read_text().split("flags:")[1].split()[0], 8)
        assert flags & os.O_ACCMODE == os.O_WRONLY
    finally:
        out.close()


@pytest.mark.parametrize(("transport", "use_exec", "wanted", "expect", "why"), [
    ("unix", False, "fd:migrate", "fd:migrate", None),
    ("unix", False, "file:/dev/fdset/1,offset=0x5c", "file:/dev/fdset/1,offset={off:#x}", "stream offset"),
    ("unix", False, "file:/dev/fdset/3", "file:/dev/fdset/3,offset={off:#x}", "stream offset"),
    ("tcp", False, "fd:migrate", "file:{path},offset={off:#x}", "opens the image by path"),
    ("tcp", True, "fd:migrate", "exec:dd of={path} ", "dd helper"),
])
def test_save_uri_for_each_transport(tmp_path: Path, transport: str, use_exec: bool, wanted: str, expect: str,
                                     why: str | None) -> None:
    out = _out(tmp_path, transport=transport, use_exec=use_exec)
    try:
        uri, reason = out.uri(wanted)
        assert uri.startswith(expect.format(off=out.header.stream_offset, path=out.path))
        assert (reason is None) if why is None else (why in str(reason))
    finally:
        out.close()


def test_untranslatable_uri_is_refused(tmp_path: Path) -> None:
    out = _out(tmp_path)
    try:
        with pytest.raises(UnsupportedError, match="tcp:127"):
            out.uri("tcp:127.0.0.1:4444")
    finally:
        out.close()


def test_finish_makes_the_image_complete_and_puts_the_header_back(tmp_path: Path) -> None:
    """Over TCP QEMU opens the file itself and may truncate it: finish() restores the header."""
    out = _out(tmp_path, transport="tcp")
    try:
        os.truncate(out.path, 0)  # what QEMU's file: URI may do
        os.pwrite(out.fd, b"QEVM\0\0\0\3", out.header.stream_offset)
        size = out.finish()
    finally:
        out.close()
    hdr = saveimage.read_header_path(out.path)
    assert not hdr.partial and hdr.xml == XML and size == hdr.stream_offset + 8


def test_exec_helper_status_is_checked(tmp_path: Path) -> None:
    img = str(tmp_path / "g.save")
    migration.exec_save_uri(img, 100)  # removes any stale status
    Path(migration.exec_done_marker(img)).write_text("1\n")
    with pytest.raises(OperationFailed, match=r"dd helper .* failed"):
        migration.wait_exec_helper(img)
    assert not Path(migration.exec_done_marker(img)).exists()


@pytest.mark.parametrize("resume", [True, False])
def test_failed_save_removes_the_image_and_resumes(tmp_path: Path, resume: bool) -> None:
    s = _Session()
    with pytest.raises(OperationFailed), \
            migration.saving(tmp_path / "g.save", XML, session=s, resume=resume):  # type: ignore[arg-type]
        raise OperationFailed("migration to g.save failed: No space left on device")
    assert not (tmp_path / "g.save").exists()
    assert s.sent == (["cont"] if resume else [])


def test_failed_save_with_qemu_gone_still_cleans_up(tmp_path: Path) -> None:
    s = _Session(fail=True)
    with pytest.raises(KeyboardInterrupt), \
            migration.saving(tmp_path / "g.save", XML, session=s, resume=True):  # type: ignore[arg-type]
        raise KeyboardInterrupt
    assert not (tmp_path / "g.save").exists() and s.sent == ["cont"]


def test_completed_save_is_left_alone(tmp_path: Path) -> None:
    s = _Session()
    with migration.saving(tmp_path / "g.save", XML, session=s, resume=True) as out:  # type: ignore[arg-type]
        out.finish()
    assert s.sent == [] and not saveimage.read_header_path(tmp_path / "g.save").partial


def _image(tmp_path: Path, fmt: str = "raw") -> Path:
    p = tmp_path / f"{fmt}.save"
    p.write_bytes(saveimage.encode_header(XML, image_format=fmt, partial=False) + b"QEVM\0\0\0\3")
    return p


@pytest.mark.parametrize(("fmt", "transport", "wanted", "fdset", "uri"), [
    ("raw", "unix", None, None, "fd:{fd}"),
    ("sparse", "unix", None, 0, "file:/dev/fdset/0,offset={off:#x}"),
    ("raw", "unix", "file:/dev/fdset/2,offset=0x1000", 2, "file:/dev/fdset/2,offset={off:#x}"),
    ("raw", "unix", "fd:27", None, "fd:{fd}"),
    ("sparse", "tcp", None, None, "file:{path},offset={off:#x}"),
])
def test_restore_hands_qemu_the_image(tmp_path: Path, fmt: str, transport: str, wanted: str | None,
                                      fdset: int | None, uri: str) -> None:
    img = _image(tmp_path, fmt)
    inc = migration.Incoming.open(str(img), transport=transport, wanted_uri=wanted)
    try:
        assert inc.fdset == fdset and inc.helper is None
        assert os.lseek(inc.fd, 0, os.SEEK_CUR) == inc.header.stream_offset
        assert inc.uri(wanted)[0] == uri.format(fd=inc.fd, off=inc.header.stream_offset, path=img)
    finally:
        inc.close()


def test_bypass_cache_restore_puts_an_o_direct_fd_into_the_sparse_images_fdset(tmp_path: Path) -> None:
    inc = migration.Incoming.open(str(_image(tmp_path, "sparse")))
    try:
        try:
            inc.add_direct()
        except UnsupportedError as exc:
            if "O_DIRECT" in str(exc):
                pytest.skip(f"the test's temporary directory has no O_DIRECT ({tmp_path}: tmpfs?)")
            raise
        assert inc.direct_fd is not None and os.O_DIRECT & fcntl.fcntl(inc.direct_fd, fcntl.F_GETFL)
        plan = inc.plan_launch(["qemu-system-x86_64", "-m", "128"])
        assert "virtsave-incoming-direct" in " ".join(plan.argv) and inc.direct_fd in plan.pass_fds
    finally:
        inc.close()
    raw = migration.Incoming.open(str(_image(tmp_path, "raw")))
    try:
        with pytest.raises(UnsupportedError, match="sparse image"):
            raw.add_direct()
    finally:
        raw.close()


def test_compressed_image_goes_through_its_decompressor(tmp_path: Path) -> None:
    import gzip

    img = tmp_path / "gz.save"
    img.write_bytes(saveimage.encode_header(XML, image_format="gzip", partial=False) + gzip.compress(b"QEVM-stream"))
    inc = migration.Incoming.open(str(img), transport="tcp")
    try:
        assert inc.helper is not None and inc.qemu_fd != inc.fd
        assert inc.uri("fd:33") == (f"fd:{inc.qemu_fd}", "the decompressor's pipe, inherited by QEMU at exec")
        assert os.read(inc.qemu_fd, 100) == b"QEVM-stream"
        inc.check_helper()
    finally:
        inc.close()


def test_partial_image_is_not_loaded(tmp_path: Path) -> None:
    img = tmp_path / "p.save"
    img.write_bytes(saveimage.encode_header(XML) + b"QEVM")
    with pytest.raises(ImageError, match=r"(?i)partial|incomplete"):
        migration.Incoming.open(str(img))
