"""Compressed save images on the QEMU side (virtsave.qemu.migration): the compressor pipe, no QEMU.

Here the test writes into the pipe what QEMU would; the real compressors (the same tools libvirt
runs) turn it into the image, and libvirt's decompressor must give the bytes back. That ``virsh
restore`` accepts such images and the guest's memory survives is tests/integration/test_direct_formats.py.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from virtsave.core.errors import OperationFailed, UnsupportedError
from virtsave.image import saveimage
from virtsave.qemu import migration

XML = "<domain type='qemu'><name>g</name></domain>"
#: What "QEMU" writes: a stream head, a compressible stretch and an incompressible one.
STREAM = b"QEVM\x00\x00\x00\x03" + b"\x07" * 200_000 + os.urandom(300_000)
FORMATS = list(migration.COMPRESSORS)


def _have(fmt: str) -> bool:
    return any(shutil.which(a[0]) for a in migration.COMPRESSORS[fmt])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("direct", [False, True], ids=["cached", "o_direct"])
def test_compressed_image_holds_the_stream_libvirts_decompressor_reads_back(tmp_path: Path, fmt: str,
                                                                           direct: bool) -> None:
    if not _have(fmt):
        pytest.skip(f"no {fmt} compressor installed (scripts/setup installs them)")
    path = tmp_path / "g.save"
    try:
        out = migration.Outgoing.create(str(path), XML, image_format=fmt, bypass_cache=direct)
    except UnsupportedError as exc:
        if direct and "O_DIRECT" in str(exc):
            pytest.skip(f"the test's temporary directory has no O_DIRECT ({tmp_path}: tmpfs?)")
        raise
    try:
        assert out.compressor is not None and out.qemu_fd not in (out.fd, -1)
        assert (out.writer is not None) == direct
        view = os.fdopen(os.dup(out.qemu_fd), "wb")  # what QEMU gets by getfd
        view.write(STREAM)
        view.close()
        size = out.finish()
    finally:
        out.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and size == path.stat().st_size
    hdr = saveimage.read_header_path(path, allow_partial=False)
    assert hdr.format == fmt
    with open(path, "rb") as f:
        f.seek(hdr.stream_offset)
        back = subprocess.run(saveimage.DECOMPRESSORS[fmt], stdin=f, capture_output=True, check=True).stdout
    assert back == STREAM


def test_multi_threaded_compressors_come_first() -> None:
    zstd = migration.COMPRESSORS["zstd"][0]
    assert zstd[:2] == ("zstd", "-c") and migration.ZSTD_THREADS in zstd
    assert "-T0" in migration.COMPRESSORS["xz"][0]
    assert migration.COMPRESSORS["gzip"][0][0] == "pigz" and migration.COMPRESSORS["gzip"][-1][0] == "gzip"
    assert migration.COMPRESSORS["bzip2"][-1][0] == "bzip2"


def test_zstd_threads_leave_qemu_and_the_writer_a_cpu_each(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [migration.zstd_threads(n) for n in (1, 2, 3, 4, 16)] == [
        "--single-thread", "--single-thread", "--single-thread", "-T2", "-T14"]
    monkeypatch.setattr(migration.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    argv = migration.compressor_argv("zstd")
    assert argv[3] == "-T3" and migration.ZSTD_THREADS not in argv
    # zstd accepts what is chosen: a round trip through the real tool with each form.
    data = os.urandom(1 << 20) + bytes(1 << 20)
    for opt in ("--single-thread", "-T3"):
        packed = subprocess.run(["zstd", "-c", "-q", opt], input=data, capture_output=True, check=True).stdout
        assert subprocess.run(saveimage.DECOMPRESSORS["zstd"], input=packed, capture_output=True,
                              check=True).stdout == data


def test_missing_compressor_is_refused_before_any_file_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(migration.COMPRESSORS, "lzop", (("vs-no-such-lzop", "-c"),))
    with pytest.raises(UnsupportedError, match="no compressor for lzop"):
        migration.Outgoing.create(str(tmp_path / "g.save"), XML, image_format="lzop")
    assert list(tmp_path.iterdir()) == []


def test_compressed_over_tcp_is_refused_before_any_file_exists(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="unix: QMP socket"):
        migration.Outgoing.create(str(tmp_path / "g.save"), XML, image_format="zstd", transport="tcp")
    assert list(tmp_path.iterdir()) == []


def test_failing_compressor_fails_the_save_and_the_image_stays_partial(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "badzip"
    script.write_text("#!/bin/sh\ncat >/dev/null\necho 'badzip: disk on fire' >&2\nexit 3\n")
    script.chmod(0o755)
    monkeypatch.setitem(migration.COMPRESSORS, "gzip", ((str(script), "-c"),))
    out = migration.Outgoing.create(str(tmp_path / "g.save"), XML, image_format="gzip")
    try:
        os.write(out.qemu_fd, b"QEVM")
        with pytest.raises(OperationFailed, match=r"badzip failed .*exit 3.*disk on fire"):
            out.finish()
    finally:
        out.close()
    assert saveimage.read_header_path(tmp_path / "g.save").partial


def test_closing_a_failed_save_ends_the_compressor_and_the_writer(tmp_path: Path) -> None:
    if not _have("zstd"):
        pytest.skip("zstd not installed")
    try:
        out = migration.Outgoing.create(str(tmp_path / "g.save"), XML, image_format="zstd", bypass_cache=True)
    except UnsupportedError as exc:
        pytest.skip(f"the test's temporary directory has no O_DIRECT: {exc}")
    procs = [out.compressor, out.writer]
    assert all(p is not None and p.poll() is None for p in procs)
    out.discard()
    out.close()
    assert all(p is not None and p.poll() is not None for p in procs) and not (tmp_path / "g.save").exists()
