"""Unit tests of the shared core: trace model, schema, private files, save-image header."""

from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from virtsave.core.errors import ImageError, TraceError
from virtsave.image import saveimage
from virtsave.trace import model as trace


def _sample() -> trace.Trace:
    tr = trace.new_trace("libvirt", host={"libvirt": "11.3.0", "qemu": "10.0.2"}, domain={"name": "g"})
    ph = trace.add_phase(tr, "save", "managed-save")
    ph["messages"] += [trace.command("getfd", {"fdname": "migrate"}, id="libvirt-1", fds=1, t=0.0),
                       trace.reply("libvirt-1", t=0.001),
                       trace.event("STOP", timestamp={"seconds": 1, "microseconds": 2}, t=0.002)]
    ph["ok"] = True
    return tr


def test_trace_roundtrip_and_validate(tmp_path: Path) -> None:
    tr = _sample()
    assert trace.validate(tr) == []
    path = tmp_path / "t.json"
    old = os.umask(0)
    try:
        trace.dump(tr, path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert trace.load(path) == tr


@pytest.mark.parametrize("mutate, needle", [
    (lambda t: t.update(version=99), "newer"),
    (lambda t: t["phases"][0]["messages"].append({"kind": "command", "t": 0}), "messages/3"),
    (lambda t: t["phases"][0].update(name="bogus"), "phases/0/name"),
    (lambda t: t.pop("phases"), "phases"),
    (lambda t: t.update(comment="hand-edited"), r"\(top\): Additional properties .*'comment'"),
    (lambda t: t["phases"][0]["messages"][0].update(note=1), "phases/0/messages/0: Additional properties"),
    (lambda t: t["phases"][0]["messages"][0].pop("execute"), "phases/0/messages/0: 'execute' is a required"),
    (lambda t: t["domain"].update(_t=1.5), "domain: Additional properties"),
])
def test_trace_rejects_bad(mutate: Callable[[Any], object], needle: str) -> None:
    tr = _sample()
    mutate(tr)
    with pytest.raises(TraceError, match=needle):
        trace.loads(json.dumps(tr))


def test_trace_rejects_non_json() -> None:
    with pytest.raises(TraceError, match="not valid JSON"):
        trace.loads("{nope")
    with pytest.raises(TraceError, match="not a virtsave trace"):
        trace.loads("[]")


def test_header_roundtrip() -> None:
    buf = io.BytesIO()
    hdr = saveimage.write_header(buf, "<domain type='qemu'/>", "<qemu-migration/>", was_running=False,
                                 image_format="zstd")
    assert hdr.partial and hdr.format == "zstd" and not hdr.was_running
    assert hdr.stream_offset % saveimage.XML_PAD == 0
    back = saveimage.read_header(io.BytesIO(buf.getvalue()))
    assert back.cookie == "<qemu-migration/>"
    with pytest.raises(ImageError, match="partial"):
        saveimage.read_header(io.BytesIO(buf.getvalue()), allow_partial=False)


@pytest.mark.parametrize("data, where", [
    (b"LibvirtQemud", "offset 12"),
    (b"x" * 200, "offset 0"),
])
def test_header_rejects(data: bytes, where: str) -> None:
    with pytest.raises(ImageError, match=where):
        saveimage.read_header(io.BytesIO(data))


def test_finalize_flips_magic(tmp_path: Path) -> None:
    p = tmp_path / "img"
    with open(p, "w+b") as f:
        saveimage.write_header(f, "<domain/>")
        saveimage.finalize(f.fileno(), p)
    assert saveimage.read_header_path(p).partial is False


def test_private_writer_never_replaces_or_chmods_a_device() -> None:
    """``-o /dev/null`` once renamed a 0600 regular file over /dev/null for the whole machine."""
    from virtsave.core.files import open_private, private_writer

    before = os.stat("/dev/null")
    with private_writer("/dev/null") as f:
        f.write(b"secret")
    os.close(open_private("/dev/null"))
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode) == 0o666
    assert not [p for p in os.listdir("/dev") if p.startswith("null.tmp")]


def test_private_writer_writes_a_fifo_in_place(tmp_path) -> None:
    import threading

    from virtsave.core.files import private_writer

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo, 0o644)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    with private_writer(fifo) as f:
        f.write(b"{}")
    reader.join(10)
    assert got == [b"{}"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert stat.S_IMODE(os.stat(fifo).st_mode) == 0o644
