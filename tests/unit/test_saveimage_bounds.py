"""The save-image header codec and the QEMU stream reader's bounds checks, field by field: the exact
bytes the codec writes, every refusal of the header reader (message and offset), and the stream
reader at its edges — chunk boundaries, truncation inside each kind of record, corrupt lengths, flags,
footers and section ids (scripts/mutation measures how well these pin the code)."""

from __future__ import annotations

import io
import json
import os
import re
import struct
from typing import Any

import pytest

from tests.unit.test_saveimage import DEVICES, XML, be32, be64, build_stream, device_payload, s8
from virtsave.core.errors import ImageError
from virtsave.image import saveimage as si

PAGE = 4096


# --------------------------------------------------------------------------- the header codec


def test_encode_header_bytes():
    blob = si.encode_header("<domain/>", "<c/>", was_running=False, image_format="zstd", partial=False)
    assert len(blob) == 1024 and blob[:16] == b"LibvirtQemudSave"
    assert struct.unpack("<5I", blob[16:36]) == (2, 1024 - 92, 0, 5, 10)   # version, data_len, …, cookie at 10
    assert blob[36:92] == bytes(56)
    assert blob[92:92 + 15] == b"<domain/>\0<c/>\0" and blob[107:] == bytes(1024 - 107)
    part = si.encode_header("<domain/>")
    assert part[:16] == b"LibvirtQemudPart" and struct.unpack("<5I", part[16:36]) == (2, 1024 - 92, 1, 0, 0)
    assert si.encode_header("<domain/>", "") == part                          # no cookie: offset 0
    big = si.encode_header("<domain>" + "x" * 1000 + "</domain>", align=512)
    assert len(big) == 1536 and struct.unpack("<I", big[20:24]) == (1536 - 92,)
    exact = si.encode_header("<domain/>", align=1)
    assert len(exact) == 92 + 10 and exact[-1] == 0 and struct.unpack("<I", exact[20:24]) == (10,)


@pytest.mark.parametrize("fmt", sorted(si.FORMAT_IDS))
def test_header_round_trip(fmt):
    blob = si.encode_header(XML, "<cookie/>", was_running=True, image_format=fmt, partial=False)
    h = si.read_header(io.BytesIO(blob + b"QEVM"), allow_partial=False)
    assert (h.magic, h.version, h.data_len, h.was_running, h.compressed, h.cookie_offset) == (
        "LibvirtQemudSave", 2, 1024 - 92, True, si.FORMAT_IDS[fmt], len(XML) + 1)
    assert (h.xml, h.cookie, h.format, h.partial, h.stream_offset) == (XML, "<cookie/>", fmt, False, 1024)
    d = h.to_dict()
    assert d == {"magic": "LibvirtQemudSave", "version": 2, "data_len": 932, "was_running": True,
                 "compressed": si.FORMAT_IDS[fmt], "cookie_offset": len(XML) + 1, "format": fmt, "partial": False,
                 "stream_offset": 1024}


def test_header_properties():
    h = si.Header("LibvirtQemudPart", 2, 100, False, 42, 0, "<domain/>", None)
    assert h.partial and h.format == "unknown(42)" and h.stream_offset == 192


def _hdr(**fields: Any) -> bytes:
    f = {"magic": b"LibvirtQemudSave", "version": 2, "data_len": 932, "was_running": 1, "compressed": 0,
         "cookie_offset": 0, **fields}
    head = struct.pack("<16s5I14I", f["magic"], f["version"], f["data_len"], f["was_running"], f["compressed"],
                       f["cookie_offset"], *([0] * 14))
    return head


def _read(data: bytes, **kw: Any) -> si.Header:
    return si.read_header(io.BytesIO(data), **kw)


BODY = (XML.encode() + b"\0").ljust(932, b"\0")


@pytest.mark.parametrize(("fields", "message", "offset"), [
    ({"magic": b"LibvirtQemudSavX"}, "not a libvirt save image: magic b'LibvirtQemudSavX'", 0),
    ({"version": 1}, "unsupported save-image version 1 (expected 2)", 16),
    ({"version": 3}, "unsupported save-image version 3 (expected 2)", 16),
    ({"data_len": 0}, "implausible data_len 0", 20),
    ({"data_len": si.MAX_XML + 1}, f"implausible data_len {si.MAX_XML + 1}", 20),
    ({"was_running": 2}, "corrupt header: was_running = 2", 24),
    ({"compressed": 7}, "unknown image format id 7", 28),
    ({"cookie_offset": 932}, "cookie offset 932 beyond data_len 932", 32),
    ({"cookie_offset": 5000}, "cookie offset 5000 beyond data_len 932", 32),
])
def test_header_field_refusals(fields, message, offset):
    with pytest.raises(ImageError) as ei:
        _read(_hdr(**fields) + BODY)
    assert str(ei.value) == f"{message} (at offset {offset})" and ei.value.offset == offset


def test_header_field_limits_accepted():
    assert _read(_hdr(was_running=0) + BODY).was_running is False
    assert _read(_hdr(compressed=6) + BODY).format == "sparse"
    assert _read(_hdr(data_len=si.MAX_XML) + BODY.ljust(si.MAX_XML, b"\0")).data_len == si.MAX_XML
    h = _read(_hdr(cookie_offset=931) + BODY[:931] + b"\0")
    assert h.cookie == "" and h.cookie_offset == 931


def test_partial_images():
    data = _hdr(magic=b"LibvirtQemudPart") + BODY
    assert _read(data).partial and _read(data, allow_partial=True).partial
    with pytest.raises(ImageError) as ei:
        _read(data, allow_partial=False)
    assert str(ei.value) == "image is partial (LibvirtQemudPart): the save never completed (at offset 0)"


@pytest.mark.parametrize(("data", "message", "offset"), [
    (b"", "truncated: header needs 92 bytes, file has 0", 0),
    (b"L" * 91, "truncated: header needs 92 bytes, file has 91", 91),
    (_hdr() + BODY[:100], "truncated: XML area needs 932 bytes, file has 100", 192),
    (_hdr(), "truncated: XML area needs 932 bytes, file has 0", 92),
])
def test_truncated_headers(data, message, offset):
    with pytest.raises(ImageError) as ei:
        _read(data)
    assert str(ei.value) == f"{message} (at offset {offset})"


@pytest.mark.parametrize(("body", "cookie_offset", "message", "offset"), [
    (b"<domain/>".ljust(932, b"x"), 0, "domain XML is not NUL-terminated", 92),
    (b"\0<domain/>".ljust(932, b"\0"), 0, "domain XML is not NUL-terminated", 92),
    (b"<domain>\xff</domain>\0".ljust(932, b"\0"), 0, "domain XML is not valid UTF-8", 100),
    (b"<?xml version='1.0'?><domain/>\0".ljust(932, b"\0"), 0, "data does not start with a <domain> element", 92),
    (b"<dom/>\0".ljust(932, b"\0"), 0, "data does not start with a <domain> element", 92),
    (b"<domain/>\0<c>".ljust(932, b"y"), 10, "cookie is not NUL-terminated", 102),
    (b"<domain/>\0<c>\xfe</c>\0".ljust(932, b"\0"), 10, "cookie is not valid UTF-8", 105),
])
def test_xml_area_refusals(body, cookie_offset, message, offset):
    with pytest.raises(ImageError) as ei:
        _read(_hdr(cookie_offset=cookie_offset) + body)
    assert str(ei.value) == f"{message} (at offset {offset})"


def test_xml_area_accepted_forms():
    h = _read(_hdr() + b" \n\t<domain/>\0".ljust(932, b"\0"))
    assert h.xml == " \n\t<domain/>" and h.cookie is None
    h = _read(_hdr(cookie_offset=10) + b"<domain/>\0<c/>\0junk-after".ljust(932, b"\0"))
    assert h.cookie == "<c/>"


def test_write_header_and_finalize(tmp_path):
    p = tmp_path / "img"
    with open(p, "w+b") as f:
        f.write(b"X" * 2000)
        f.seek(1500)
        h = si.write_header(f, "<domain/>", "<c/>", was_running=False, image_format="sparse")
        assert f.tell() == 1024
    assert (h.partial, h.was_running, h.format, h.cookie) == (True, False, "sparse", "<c/>")
    data = p.read_bytes()
    assert data[:1024] == si.encode_header("<domain/>", "<c/>", was_running=False, image_format="sparse")
    assert data[1024:] == b"X" * 976
    fd = os.open(p, os.O_RDWR)
    try:
        si.finalize(fd)
        assert os.pread(fd, 16, 0) == b"LibvirtQemudSave"
        with pytest.raises(ImageError, match=r"refusing to finalize: image does not start with LibvirtQemudPart "
                                             r"\(at offset 0\)"):
            si.finalize(fd)
    finally:
        os.close(fd)
    assert si.read_header_path(p, allow_partial=False).partial is False


def test_read_header_path_errors(tmp_path):
    with pytest.raises(ImageError) as ei:
        si.read_header_path(tmp_path / "none")
    assert str(ei.value) == f"cannot read image {tmp_path / 'none'}: No such file or directory"
    with pytest.raises(ImageError, match="Is a directory"):
        si.read_header_path(tmp_path)


# --------------------------------------------------------------------------- the stream reader


class Trickle(io.RawIOBase):
    """A non-seekable source handing out at most *n* bytes per read (chunk boundaries everywhere)."""

    def __init__(self, data: bytes, n: int = 3) -> None:
        self.data, self.pos, self.n = data, 0, n

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        k = self.n if size < 0 else min(self.n, size)
        out = self.data[self.pos:self.pos + k]
        self.pos += len(out)
        return out


def test_stream_reads_across_chunks():
    s = si._Stream(Trickle(b"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f" + s8("héllo"[:1] + "ab")))
    assert s.u8("a") == 1 and s.offset == 1
    assert s.be16("b") == 0x0203 and s.be32("c") == 0x04050607 and s.be64("d") == 0x08090A0B0C0D0E0F
    assert s.offset == 15 and s.peek(2) == b"\x03h" and s.offset == 15
    assert s.string("name") == "hab" and s.offset == 19
    assert not s.available(1) and s.peek(1) == b"" and s.eof


def test_stream_truncation_messages():
    s = si._Stream(io.BytesIO(b"ab"), where=" in the decompressed zstd stream")
    with pytest.raises(ImageError) as ei:
        s.read(3, "the thing")
    assert str(ei.value) == ("truncated: stream ends inside the thing (needs 3 bytes, 2 left) in the decompressed "
                             "zstd stream (at offset 0)")
    f = si._Stream(io.BytesIO(b"ab"), file_base=1000)
    f.u8("x")
    with pytest.raises(ImageError) as ei:
        f.be32("y")
    assert str(ei.value) == "truncated: stream ends inside y (needs 4 bytes, 1 left) (at offset 1001)"
    assert f.error("m", 5).offset == 1005 and s.error("m", 5).offset == 5


def test_stream_string_must_be_ascii():
    s = si._Stream(io.BytesIO(b"\x00\x00" + bytes([3]) + b"a\xffb"), start=10)
    s.skip(2, "pad")
    with pytest.raises(ImageError) as ei:
        s.string("section name")
    assert str(ei.value) == "corrupt stream: section name b'a\\xffb' is not ASCII (at offset 12)"


def test_stream_skip_in_buffer_seek_and_pipe():
    data = bytes(range(256)) * 64                     # 16 KiB
    f = io.BytesIO(data)
    s = si._Stream(f, size=len(data), seekable=True, file_base=0)
    s.u8("a")
    s.skip(10, "x")                                   # inside the buffer
    assert s.offset == 11 and s.u8("b") == 11
    s2 = si._Stream(io.BytesIO(data), size=len(data), seekable=True)
    s2.peek(4)
    s2.skip(5000, "far")                              # beyond the buffer: seeks
    assert s2.offset == 5000 and s2.u8("c") == data[5000]
    p = si._Stream(Trickle(data, 700))
    p.peek(1)
    p.skip(5000, "pipe")                              # beyond the buffer, no seek: reads and drops
    assert p.offset == 5000 and p.u8("d") == data[5000]
    p.skip(len(data) - 5001, "rest")
    assert p.offset == len(data) and not p.available()


def test_stream_skip_past_the_end():
    data = bytes(100)
    s = si._Stream(io.BytesIO(data), size=100, seekable=True, file_base=50)
    s.peek(1)
    with pytest.raises(ImageError) as ei:
        s.skip(101, "RAM page")
    assert str(ei.value) == "truncated: stream ends inside RAM page (needs 101 bytes) (at offset 50)"
    assert s.eof and s.offset == 100
    s = si._Stream(io.BytesIO(data), size=100, seekable=True)
    s.skip(100, "all")                                # exactly to the end is fine
    assert s.offset == 100
    p = si._Stream(Trickle(data, 30))
    p.read(10, "x")
    with pytest.raises(ImageError) as ei:
        p.skip(91, "tail")
    assert str(ei.value) == "truncated: stream ends inside tail (needs 91 bytes) (at offset 10)" and p.eof


def test_stream_seek():
    data = bytes(range(200))
    s = si._Stream(io.BytesIO(data), size=200, seekable=True, file_base=0)
    s.read(5, "x")
    s.seek(150, "page area")
    assert s.offset == 150 and s.u8("y") == 150 and not s.eof
    s.seek(200, "end")
    assert not s.available()
    s.seek(20, "back")
    assert s.u8("z") == 20
    with pytest.raises(ImageError) as ei:
        s.seek(201, "RAM block pc.ram page area")
    assert str(ei.value) == ("truncated: RAM block pc.ram page area points to stream offset 201 beyond the end (200) "
                             "(at offset 21)")
    p = si._Stream(io.BytesIO(data), where=" in the decompressed gzip stream")
    with pytest.raises(ImageError) as ei:
        p.seek(5, "mapped-ram")
    assert str(ei.value) == ("mapped-ram needs random access, impossible in a compressed stream in the decompressed "
                             "gzip stream (at offset 0)")


def test_stream_read_rest_buffered_and_set_pos():
    s = si._Stream(Trickle(b"0123456789", 4))
    s.read(2, "x")
    assert s.read_rest(100, "tail") == b"23456789"
    buf, pos = s.buffered()
    assert (buf, pos, s.offset) == (b"23456789", 0, 2)
    s.set_pos(5)
    assert s.offset == 5 and s.u8("y") == ord("5")
    big = si._Stream(Trickle(bytes(3 * 1024 * 1024), 1024 * 1024))
    with pytest.raises(ImageError) as ei:
        big.read_rest(2 * 1024 * 1024, "device state")
    assert str(ei.value) == "device state: more than 2 MiB of stream left to buffer (at offset 0)"


# --------------------------------------------------------------------------- vmstate descriptions


def _desc_tail(desc: dict[str, Any]) -> bytes:
    j = json.dumps(desc).encode()
    return b"\0" + bytes([6]) + be32(len(j)) + j


def test_find_vmdesc():
    tail = _desc_tail({"devices": []})
    assert si._find_vmdesc(b"xyz" + tail) == (4, len(tail) - 6)
    assert si._find_vmdesc(b"xyz" + tail + bytes(100)) == (4, len(tail) - 6)   # zero padding after it
    assert si._find_vmdesc(b"xyz" + tail[1:]) is None                           # no EOF byte before it
    assert si._find_vmdesc(b"xyz" + tail[:-1]) is None                          # length does not reach the end
    assert si._find_vmdesc(tail.replace(b"{", b"[", 1)) is None                 # not a JSON object
    assert si._find_vmdesc(b"\x06" + tail) == (2, len(tail) - 6)               # the last 0x06 that fits
    assert si._find_vmdesc(tail[1:]) is None and si._find_vmdesc(b"") is None
    assert si._find_vmdesc(b"\x00\x06" + be32(0)) is None                       # nothing after the length


def test_vmdesc_read_from_the_file_end(tmp_path):
    desc = {"page_size": 4096, "devices": [{"name": "d"}]}
    p = tmp_path / "f"
    p.write_bytes(b"H" * 100 + b"QEVM" + _desc_tail(desc) + bytes(7))
    with open(p, "rb") as f:
        got, at = si._read_vmdesc_from_end(f, p.stat().st_size, 100)
        assert got == desc and at == 105
        assert si._read_vmdesc_from_end(f, p.stat().st_size, p.stat().st_size) == (None, 0)
    for bad in (_desc_tail({"x": 1}), b"\0\x06" + be32(3) + b"{x}", _desc_tail({"devices": "no"})):
        p.write_bytes(b"QEVM" + bad)
        with open(p, "rb") as f:
            assert si._read_vmdesc_from_end(f, p.stat().st_size, 0) == (None, 0), bad


def test_vmsd_skip_walks_fields_structs_and_subsections():
    cpu = DEVICES[1]
    data = device_payload(cpu) + b"END"
    s = si._Stream(io.BytesIO(data))
    si._vmsd_skip(s, cpu, "cpu")
    assert s.read(3, "end") == b"END"
    # a subsection that is not there, or another one
    body = bytes(16 * 8 + 2 * 6)
    s = si._Stream(io.BytesIO(body + b"\x07"))
    with pytest.raises(ImageError) as ei:
        si._vmsd_skip(s, cpu, "cpu")
    assert str(ei.value) == f"corrupt stream: subsection cpu/xsave of cpu expected (at offset {len(body)})"
    s = si._Stream(io.BytesIO(body + b"\x05" + s8("cpu/other") + be32(1) + bytes(32)))
    with pytest.raises(ImageError) as ei:
        si._vmsd_skip(s, cpu, "cpu")
    assert str(ei.value) == ("corrupt stream: subsection 'cpu/other' found where the description has 'cpu/xsave' "
                             f"(at offset {len(body)})")
    s = si._Stream(io.BytesIO(bytes(9)))
    si._vmsd_skip(s, {"fields": [{"name": "a", "size": 4, "array_len": 2}, {"name": "b"}]}, "d")
    assert s.offset == 8
    si._vmsd_skip(s, {}, "empty")
    assert s.offset == 8


@pytest.mark.parametrize(("data", "i", "ok"), [
    (b"\x00", 0, True), (b"\x00\x00\x00", 0, True), (b"\x00\x06", 0, True), (b"\x00\x07", 0, False),
    (b"\x02" + be32(3), 0, True), (b"\x03" + be32(3), 0, True), (b"\x02" + be32(9), 0, False),
    (b"\x01" + be32(4) + s8("timer") + be32(0), 0, True), (b"\x04" + be32(4) + s8("t") + be32(0xFFFF), 0, True),
    (b"\x04" + be32(4) + s8("t") + be32(0x10000), 0, False), (b"\x04" + be32(4) + bytes([0]) + be32(0), 0, False),
    (b"\x04" + be32(4) + s8("a b") + be32(0), 0, False), (b"\x04" + be32(4) + bytes([5]) + b"ab", 0, False),
    (b"\x04" + be32(4) + s8("\x7f") + be32(0), 0, False), (b"\x04" + be32(4) + s8("!~") + be32(0), 0, True),
    (b"\x04" + be32(4), 0, False), (b"\x08", 0, True), (b"\x09", 0, False), (b"xx", 2, False), (b"x\x08", 1, True),
])
def test_plausible_header(data, i, ok):
    assert si._plausible_header(data, i, {3}) is ok


# --------------------------------------------------------------------------- walking streams


def walk(data: bytes, **kw: Any) -> si._Walker:
    w = si._Walker(si._Stream(io.BytesIO(data), size=len(data), seekable=True, file_base=0), **kw)
    w.sections = list(w.walk())  # type: ignore[attr-defined]
    return w


def walk_error(data: bytes, **kw: Any) -> str:
    with pytest.raises(ImageError) as ei:
        walk(data, **kw)
    return str(ei.value)


HEAD = b"QEVM" + be32(3)


def config(*subs: bytes, machine: bytes = b"pc") -> bytes:
    return bytes([7]) + be32(len(machine)) + machine + b"".join(subs)


def sub(name: str, body: bytes, version: int = 1) -> bytes:
    return bytes([5]) + s8(name) + be32(version) + body


def ram_start(*blocks: tuple[str, int], sid: int = 2, extra: bytes = b"") -> bytes:
    total = sum(n for _, n in blocks)
    out = bytes([1]) + be32(sid) + s8("ram") + be32(0) + be32(4) + be64(total | 0x04)
    for name, n in blocks:
        out += s8(name) + be64(n) + extra
    return out + be64(0x10) + bytes([0x7E]) + be32(sid)


def test_walker_reads_a_whole_stream():
    stream, _ = build_stream()
    w = walk(stream)
    assert w.eof and w.layout == "vmdesc" and w.vmdesc_info["present"] and w.footers is True
    assert w.config == {"offset": 8, "machine": "pc-i440fx-10.0", "capabilities": [], "target_page_bits": None,
                        "uuid": None}
    assert [(x.kind, x.section_id, x.name, x.instance_id, x.version_id) for x in w.sections] == [
        ("start", 2, "ram", 0, 4), ("part", 2, "ram", 0, 4), ("end", 2, "ram", 0, 4), ("full", 3, "timer", 0, 2),
        ("full", 4, "cpu", 0, 12), ("full", 5, "serial", 0, 3)]
    assert w.trailing == 0 and w.commands == []


def test_stream_magic_and_version():
    assert walk_error(b"QEVX" + be32(3)) == "not a QEMU migration stream: no QEVM magic (at offset 0)"
    assert walk_error(b"QEVM" + be32(2)) == "unsupported QEMU stream version 2 (at offset 4)"
    assert walk_error(b"QEV") == "truncated: stream ends inside stream magic (needs 4 bytes, 3 left) (at offset 0)"
    assert walk_error(HEAD) == "truncated: stream ends inside section type (needs 1 bytes, 0 left) (at offset 8)"


def test_configuration_section():
    uuid = bytes(range(16))
    caps = sub("configuration/capabilities", be32(2) + s8("x-ignore-shared") + s8("mapped-ram"))
    w = walk(HEAD + config(sub("configuration/target-page-bits", be32(14)), caps,
                           sub("configuration/uuid", uuid)) + b"\0")
    assert w.config["target_page_bits"] == 14 and w.page_size == 1 << 14
    assert w.config["capabilities"] == ["x-ignore-shared", "mapped-ram"] and w.ram["mapped_ram"] is True
    assert w.config["uuid"] == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert walk_error(HEAD + config(machine=b"m" * 257)) == "corrupt stream: machine-type name length 257 (at offset 9)"
    assert walk(HEAD + config(machine=b"m" * 256) + b"\0").config["machine"] == "m" * 256
    too_many = HEAD + config(sub("configuration/capabilities", be32(257)))
    assert walk_error(too_many) == f"corrupt stream: 257 capabilities (at offset {len(too_many)})"
    unknown = HEAD + config(sub("configuration/other", b""))
    assert walk_error(unknown) == f"unknown configuration subsection 'configuration/other' (at offset {len(unknown)})"
    desc = {"devices": [], "configuration": {"subsections": [{"vmsd_name": "configuration/other",
                                                            "fields": [{"name": "f", "size": 3}]}]}}
    w = walk(HEAD + config(sub("configuration/other", b"abc")) + b"\0", vmdesc=desc)
    assert w.config["machine"] == "pc"
    missing = HEAD + config(sub("configuration/else", b""))
    assert walk_error(missing, vmdesc=desc) == (f"unknown configuration subsection 'configuration/else' "
                                                f"(at offset {len(missing)})")


def test_commands_are_listed():
    w = walk(HEAD + bytes([8]) + struct.pack(">HH", 2, 4) + b"ping" + bytes([8]) + struct.pack(">HH", 99, 0) + b"\0")
    assert w.commands == [{"offset": 8, "command": 2, "name": "PING", "length": 4},
                          {"offset": 17, "command": 99, "name": "unknown(99)", "length": 0}]


def test_sections_must_be_known():
    assert walk_error(HEAD + b"\x55") == "corrupt stream: unknown section type 0x55 (at offset 8)"
    assert walk_error(HEAD + b"\x02" + be32(7)) == "corrupt stream: part of unknown section id 7 (at offset 8)"
    assert walk_error(HEAD + b"\x03" + be32(7)) == "corrupt stream: end of unknown section id 7 (at offset 8)"


def test_ram_blocks_and_pages():
    blocks = ram_start(("pc.ram", 4 * PAGE), ("pc.bios", PAGE))
    part = (bytes([2]) + be32(2) + be64(0x08) + s8("pc.ram") + bytes(PAGE) + be64(PAGE | 0x28) + bytes(PAGE)
            + be64(2 * PAGE | 0x22) + b"\0" + be64(0x02) + s8("pc.bios") + b"\0" + be64(0x210)
            + bytes([0x7E]) + be32(2))
    w = walk(HEAD + blocks + part + b"\0")
    b = w.ram["blocks"]
    assert w.ram["total_bytes"] == 5 * PAGE and w.ram["multifd_flushes"] == 1
    assert (b["pc.ram"]["length"], b["pc.ram"]["pages"], b["pc.ram"]["zero_pages"], b["pc.ram"]["bytes"]) == (
        4 * PAGE, 2, 1, 2 * PAGE)
    assert (b["pc.bios"]["length"], b["pc.bios"]["pages"], b["pc.bios"]["zero_pages"]) == (PAGE, 0, 1)


@pytest.mark.parametrize(("records", "message"), [
    (be64(0x08 | 0x20), "corrupt stream: RAM page continues no block"),
    (be64(0x40), "unsupported RAM encoding (flags 0x40)"),
    (be64(0x80), "unsupported RAM encoding (flags 0x80)"),
    (be64(0x100), "unsupported RAM encoding (flags 0x100)"),
    (be64(0x01), "corrupt stream: unknown RAM flags 0x1"),
    (be64(0x400), "corrupt stream: unknown RAM flags 0x400"),
    (be64(0x20), "corrupt stream: unknown RAM flags 0x20"),
])
def test_ram_record_refusals(records, message):
    data = HEAD + bytes([1]) + be32(2) + s8("ram") + be32(0) + be32(4) + records
    assert walk_error(data) == f"{message} (at offset 25)"


@pytest.mark.parametrize(("length", "total"), [(0, PAGE), (2 * PAGE, PAGE)])
def test_ram_block_lengths(length, total):
    data = HEAD + bytes([1]) + be32(2) + s8("ram") + be32(0) + be32(4) + be64(total | 0x04) + s8("b") + be64(length)
    assert walk_error(data) == f"corrupt stream: RAM block b length {length} (at offset 25)"


def test_ram_block_addresses_with_ignore_shared():
    caps = config(sub("configuration/capabilities", be32(1) + s8("x-ignore-shared")))
    data = HEAD + caps + ram_start(("b", PAGE), extra=be64(0xFEED)) + b"\0"
    assert walk(data).ram["blocks"]["b"]["mr_addr"] == 0xFEED


def test_ram_page_truncated():
    data = HEAD + bytes([1]) + be32(2) + s8("ram") + be32(0) + be32(4) + be64(0x08) + s8("b") + bytes(100)
    assert walk_error(data) == "truncated: stream ends inside RAM page of b (needs 4096 bytes) (at offset 35)"


def test_mapped_ram_block_checks():
    caps = config(sub("configuration/capabilities", be32(1) + s8("mapped-ram")))
    start = HEAD + caps + bytes([1]) + be32(2) + s8("ram") + be32(0) + be32(4) + be64(PAGE | 0x04) + s8("b")
    start += be64(PAGE)
    at = len(start)
    assert walk_error(start + be32(2)) == f"unsupported mapped-ram header version 2 (at offset {at})"
    ignored = start + be32(1) + be64(PAGE) + be64(0) + be64(0) + be64(0x10) + bytes([0x7E]) + be32(2) + b"\0"
    assert walk(ignored).ram["blocks"]["b"]["ignored"] is True
    piped = start + be32(1) + be64(PAGE) + be64(1) + be64(2)
    w = si._Walker(si._Stream(io.BytesIO(piped)))
    with pytest.raises(ImageError, match="mapped-ram RAM block in a stream that is not a plain file"):
        list(w.walk())


def test_mapped_ram_bitmap_and_pages(tmp_path):
    caps = config(sub("configuration/capabilities", be32(1) + s8("mapped-ram")))
    start = HEAD + caps + bytes([1]) + be32(2) + s8("ram") + be32(0) + be32(4) + be64(12 * PAGE | 0x04) + s8("b")
    start += be64(12 * PAGE)
    bitmap_at = len(start) + 28
    pages_at = bitmap_at + 8192
    data = bytearray(start + be32(1) + be64(PAGE) + be64(bitmap_at) + be64(pages_at))
    data += bytes(pages_at - len(data))
    data[bitmap_at:bitmap_at + 2] = bytes([0b1010_0101, 0b1111_0001])       # bits past page 12 must not count
    data += bytes(12 * PAGE) + be64(0x10) + bytes([0x7E]) + be32(2) + b"\0"
    p = tmp_path / "s"
    p.write_bytes(bytes(data))
    with open(p, "rb") as f:
        w = si._Walker(si._Stream(f, size=len(data), seekable=True, file_base=0), file_fd=f.fileno())
        list(w.walk())
    b = w.ram["blocks"]["b"]
    assert (b["pages_present"], b["pages"], b["zero_pages"], b["bytes"]) == (5, 5, 7, 5 * PAGE)
    assert (b["bitmap_offset"], b["pages_offset"], b["page_size"]) == (bitmap_at, pages_at, PAGE)
    cut = tmp_path / "cut"
    cut.write_bytes(bytes(data[:bitmap_at + 1]))
    with open(cut, "rb") as f:
        w = si._Walker(si._Stream(f, size=bitmap_at + 1, seekable=True, file_base=0), file_fd=f.fileno())
        with pytest.raises(ImageError) as ei:
            list(w.walk())
    assert str(ei.value) == f"truncated: mapped-ram bitmap of b is cut (at offset {bitmap_at})"


def test_device_sections_by_footer_scan_and_footer_checks():
    timer = DEVICES[0]
    sec = bytes([4]) + be32(3) + s8("timer") + be32(0) + be32(2) + device_payload(timer)
    good = HEAD + ram_start(("b", PAGE)) + sec + bytes([0x7E]) + be32(3) + b"\0"
    w = walk(good)
    assert w.layout == "footer-scan" and [x.name for x in w.sections] == ["ram", "timer"]
    assert w.sections[1].length == len(sec) + 5
    bad = HEAD + ram_start(("b", PAGE)) + sec + bytes([0x7E]) + be32(9) + b"\0"
    assert walk_error(bad) == ("cannot delimit section 'timer' (id 3): no vmstate description and no section "
                               f"footer found (at offset {len(HEAD + ram_start(('b', PAGE))) + 19})")
    desc = {"devices": [{"name": "timer", "instance_id": 0, **timer}]}
    wrong = HEAD + ram_start(("b", PAGE)) + sec + bytes([0x7F]) + be32(3) + b"\0"
    at = len(HEAD + ram_start(("b", PAGE)) + sec)
    assert walk_error(wrong, vmdesc=desc) == ("corrupt stream: section 'timer' (id 3) does not end with its footer "
                                              f"(found byte 0x7f, id 3) (at offset {at})")
    other = HEAD + ram_start(("b", PAGE)) + sec + bytes([0x7E]) + be32(4) + b"\0"
    assert walk_error(other, vmdesc=desc) == ("corrupt stream: section 'timer' (id 3) does not end with its footer "
                                              f"(found byte 0x7e, id 4) (at offset {at})")
    w = walk(good, vmdesc=desc)
    assert w.layout == "vmdesc" and w.sections[1].length == len(sec) + 5


def test_after_the_end_of_stream():
    desc = json.dumps({"devices": []}).encode()
    w = walk(HEAD + b"\0" + bytes([6]) + be32(len(desc)) + desc + bytes(10))
    assert w.vmdesc_info == {"present": True, "offset": 9, "length": len(desc)} and w.trailing == 10
    assert w.layout == "vmdesc"
    assert walk(HEAD + b"\0").vmdesc_info == {"present": False}
    assert walk_error(HEAD + b"\0" + bytes(5) + b"x") == \
        "corrupt stream: unexpected data after the end of the stream (at offset 9)"
    bad = HEAD + b"\0" + bytes([6]) + be32(3) + b"{x}"
    assert walk_error(bad).startswith("corrupt vmstate description: Expecting property name") and \
        walk_error(bad).endswith("(at offset 14)")
    nodev = json.dumps({"x": 1}).encode()
    assert walk_error(HEAD + b"\0" + bytes([6]) + be32(len(nodev)) + nodev) == \
        "corrupt vmstate description: no device list (at offset 14)"
    kept = walk(HEAD + b"\0" + bytes([6]) + be32(len(desc)) + desc, vmdesc={"devices": [], "page_size": 8192})
    assert kept.vmdesc == {"devices": [], "page_size": 8192} and kept.page_size == 8192


def test_section_footers_absent_on_old_machine_types():
    stream, _ = build_stream(footers=False, vmdesc=True)
    w = walk(stream)
    assert w.footers is False and [x.name for x in w.sections] == ["ram", "ram", "ram", "timer", "cpu", "serial"]


def test_tail_loaded_from_a_pipe():
    stream, _ = build_stream()
    w = si._Walker(si._Stream(Trickle(stream, 1000)))
    assert [x.name for x in w.walk()] == ["ram", "ram", "ram", "timer", "cpu", "serial"]
    assert w.layout == "vmdesc" and w.vmdesc_info["present"]
    nodesc, _ = build_stream(vmdesc=False)
    w = si._Walker(si._Stream(Trickle(nodesc, 1000)))
    assert [x.name for x in w.walk()][-1] == "serial" and w.layout == "footer-scan"


# --------------------------------------------------------------------------- a stream cut everywhere

_READ = re.compile(r"truncated: stream ends inside (.+) \(needs (\d+) bytes, (\d+) left\) \(at offset (\d+)\)$")
_SKIP = re.compile(r"truncated: stream ends inside (.+) \(needs (\d+) bytes\) \(at offset (\d+)\)$")
_UNDELIMITED = re.compile(r"cannot delimit section '(timer|cpu|serial)' \(id \d\): no vmstate description and no "
                          r"section footer found \(at offset (\d+)\)$")
#: What each field read is called in a truncation message (without the device description, the reader
#: stops before the device fields).
WHATS = {"stream magic", "stream version", "section type", "section id", "section name", "instance id", "version id",
         "configuration name length", "configuration machine type", "RAM record", "RAM block name",
         "RAM block pc.ram length", "RAM block pc.bios length", "RAM page block name", "RAM page of pc.ram",
         "RAM page of pc.bios", "zero page fill byte", "footer of section ram", "vmstate description",
         "vmstate description length"}
DEVICE_WHATS = {"timer field ticks", "timer field unused", "cpu field regs", "cpu.seg field sel", "cpu.seg field flags",
                "cpu subsection", "cpu subsection name", "cpu/xsave version", "cpu/xsave field xmm",
                "serial field divider", "serial field lcr", "footer of section timer", "footer of section cpu",
                "footer of section serial"}


@pytest.mark.parametrize("source", ["file", "pipe"])
@pytest.mark.parametrize("described", [False, True], ids=["no-vmdesc", "vmdesc"])
def test_every_cut_names_the_field_and_its_offset(source, described):
    """The stream cut after every byte (bar the middle of page data): each cut is one error naming the
    field it fell in, at that field's offset, with exactly the bytes that were left — or, cut right
    after the EOF marker, a complete stream."""
    stream, _ = build_stream()
    eof = stream.rfind(b"\x06") - 1
    desc = json.loads(stream[eof + 6:]) if described else None
    whats = set()
    for cut in (i for i in range(len(stream)) if len(set(stream[max(0, i - 20):i + 20])) > 1):
        data = stream[:cut]
        s = (si._Stream(io.BytesIO(data), size=cut, seekable=True, file_base=0) if source == "file"
             else si._Stream(Trickle(data, 4096)))
        w = si._Walker(s, vmdesc=desc)
        try:
            list(w.walk())
        except ImageError as exc:
            m = str(exc)
        else:
            assert cut == eof + 1 and w.eof, cut
            continue
        if r := _READ.match(m):
            what, needs, left, at = r.group(1), int(r.group(2)), int(r.group(3)), int(r.group(4))
            assert (left, left < needs) == (cut - at, True), (cut, m)
        elif r := _SKIP.match(m):
            what, needs, at = r.group(1), int(r.group(2)), int(r.group(3))
            assert at <= cut < at + needs, (cut, m)
        else:
            r = _UNDELIMITED.match(m)
            assert r and not described and int(r.group(2)) <= cut, (cut, m)
            continue
        whats.add(what)
    assert whats == (WHATS | DEVICE_WHATS if described else WHATS)


@pytest.mark.parametrize(("data", "i", "ok"), [
    (b"xx\x00\x06{}", 2, True), (b"\x00XX", 0, False), (b"\x00\x00\x00", 0, True),
    (b"yy\x02" + be32(0x01000003) + b"\x09", 2, True),
    (b"yy\x04" + be32(4) + s8("t") + bytes([1, 0, 0, 0]), 2, False),
    (b"yy\x04" + be32(4) + s8("t") + bytes([0, 0, 0xFF, 0xFF]) + b"\x01", 2, True),
])
def test_plausible_header_reads_exact_fields(data, i, ok):
    assert si._plausible_header(data, i, {0x01000003}) is ok


def test_stream_field_names_in_short_reads():
    for call, n, what in (("be16", 2, "cmd"), ("be32", 4, "id"), ("be64", 8, "addr"), ("u8", 1, "type")):
        s = si._Stream(io.BytesIO(bytes(n - 1)))
        with pytest.raises(ImageError) as ei:
            getattr(s, call)(what)
        assert str(ei.value) == f"truncated: stream ends inside {what} (needs {n} bytes, {n - 1} left) (at offset 0)"
    assert si._Stream(io.BytesIO(b"\x01\x02")).be16("x") == 0x0102


def test_commands_cut_short():
    assert walk_error(HEAD + b"\x08\x00") == \
        "truncated: stream ends inside command (needs 2 bytes, 1 left) (at offset 9)"
    assert walk_error(HEAD + b"\x08\x00\x02\x00") == \
        "truncated: stream ends inside command length (needs 2 bytes, 1 left) (at offset 11)"
    assert walk_error(HEAD + b"\x08\x00\x02\x00\x05ab") == \
        "truncated: stream ends inside command data (needs 5 bytes) (at offset 13)"


def test_header_writer_defaults(tmp_path):
    with open(tmp_path / "a", "w+b") as f:
        h = si.write_header(f, "<domain/>")
    assert (h.partial, h.format, h.was_running, h.cookie) == (True, "raw", True, None)
    with open(tmp_path / "b", "w+b") as f:
        assert si.write_header(f, "<domain/>", partial=False).partial is False


def _pipe_walker(data: bytes) -> si._Walker:
    return si._Walker(si._Stream(Trickle(data, 4096)))


def test_tail_buffer_limit_and_bad_description_in_a_pipe(monkeypatch):
    timer = DEVICES[0]
    sec = bytes([4]) + be32(3) + s8("timer") + be32(0) + be32(2) + device_payload(timer) + bytes([0x7E]) + be32(3)
    body = HEAD + ram_start(("b", PAGE)) + sec + b"\0"
    monkeypatch.setattr(si, "TAIL_LIMIT", 8)
    with pytest.raises(ImageError) as ei:
        list(si._Walker(si._Stream(Trickle(body + bytes(100), 64))).walk())
    at = len(body) - len(sec) - 1 + 19     # where the timer's data starts
    assert str(ei.value) == f"device state: more than 0 MiB of stream left to buffer (at offset {at})"
    monkeypatch.undo()
    bad = body + bytes([6]) + be32(4) + b"{xx}"
    with pytest.raises(ImageError) as ei:
        list(_pipe_walker(bad).walk())
    assert str(ei.value).startswith("corrupt vmstate description: Expecting property name")
    assert str(ei.value).endswith(f"(at offset {len(body) + 5})")


MR_CAPS = config(sub("configuration/capabilities", be32(1) + s8("mapped-ram")))


def _mapped_ram(tmp_path, pages: int, bitmap: bytes, *, cut: int | None = None, pages_offset: int | None = None,
                bitmap_zero: bool = False) -> si._Walker:
    start = HEAD + MR_CAPS + bytes([1]) + be32(2) + s8("ram") + be32(0) + be32(4) + be64(pages * PAGE | 0x04)
    start += s8("b") + be64(pages * PAGE)
    bitmap_at = 0 if bitmap_zero else len(start) + 28
    pages_at = (len(start) + 28 + len(bitmap) + 64) if pages_offset is None else pages_offset
    data = bytearray(start + be32(1) + be64(PAGE) + be64(bitmap_at) + be64(pages_at))
    data += bitmap
    if pages_offset is None:    # the page area and the rest of the stream (else: a page area beyond the file)
        data += bytes(pages_at - len(data)) + bytes(pages * PAGE) + be64(0x10) + bytes([0x7E]) + be32(2) + b"\0"
    data = data[:cut] if cut is not None else data
    p = tmp_path / "mr"
    p.write_bytes(bytes(data))
    f = open(p, "rb")  # noqa: SIM115 - closed below
    try:
        w = si._Walker(si._Stream(f, size=len(data), seekable=True, file_base=0), file_fd=f.fileno())
        list(w.walk())
        return w
    finally:
        f.close()


@pytest.mark.parametrize(("pages", "bitmap", "present"), [
    (8, bytes([0xFF, 0xFF]), 8),                 # the byte after the bitmap is not counted
    (64, bytes([0xFF] * 9), 64),                 # in chunks of 3 bytes: 3, 3, 2 — never past the bitmap
    (12, bytes([0xFF, 0b0000_1111]), 12),
    (12, bytes([0xFF, 0b1111_0000]), 8),        # bits past the last page are masked off
    (3, bytes([0b1000_0101]), 2),
])
@pytest.mark.parametrize("chunk", [1 << 20, 3, 1])
def test_mapped_ram_bitmaps_counted_per_chunk(tmp_path, monkeypatch, pages, bitmap, present, chunk):
    monkeypatch.setattr(si, "_CHUNK", chunk)
    b = _mapped_ram(tmp_path, pages, bitmap).ram["blocks"]["b"]
    assert (b["pages_present"], b["zero_pages"], b["bytes"]) == (present, pages - present, present * PAGE)


def test_mapped_ram_block_edges(tmp_path, monkeypatch):
    start_len = len(HEAD + MR_CAPS) + 1 + 4 + 4 + 4 + 4 + 8 + 2 + 8
    w = _mapped_ram(tmp_path, 8, bytes([1]), bitmap_zero=True)     # bitmap 0 but pages: not an ignored block
    assert "ignored" not in w.ram["blocks"]["b"]
    for cut, what, n in ((start_len + 2, "mapped-ram header version", 4), (start_len + 5, "mapped-ram page size", 8),
                         (start_len + 13, "mapped-ram bitmap offset", 8),
                         (start_len + 21, "mapped-ram pages offset", 8)):
        with pytest.raises(ImageError) as ei:
            _mapped_ram(tmp_path, 8, bytes([1]), cut=cut)
        assert f"stream ends inside {what} (needs {n} bytes" in str(ei.value), (cut, str(ei.value))
    monkeypatch.setattr(si, "_CHUNK", 1)
    with pytest.raises(ImageError) as ei:
        _mapped_ram(tmp_path, 16, bytes([0xFF, 0xFF]), cut=start_len + 28 + 1)
    assert str(ei.value) == f"truncated: mapped-ram bitmap of b is cut (at offset {start_len + 28 + 1})"
    monkeypatch.undo()
    with pytest.raises(ImageError) as ei:
        _mapped_ram(tmp_path, 8, bytes([1]), pages_offset=1 << 30)
    assert str(ei.value).startswith("truncated: RAM block b page area points to stream offset ")
    f = io.BytesIO(HEAD + MR_CAPS + bytes([1]) + be32(2) + s8("ram") + be32(0) + be32(4) + be64(PAGE | 0x04)
                   + s8("b") + be64(PAGE) + be32(1) + be64(PAGE) + be64(1) + be64(2))
    w = si._Walker(si._Stream(f, file_base=0))                       # a plain file, but no descriptor to read from
    with pytest.raises(ImageError) as ei:
        list(w.walk())
    assert str(ei.value).startswith("mapped-ram RAM block in a stream that is not a plain file (at offset ")


def test_xml_of_one_character():
    with pytest.raises(ImageError, match=r"^data does not start with a <domain> element \(at offset 92\)$"):
        _read(_hdr() + b"x\0".ljust(932, b"\0"))


def test_read_rest_limit_is_inclusive_and_keeps_the_offset():
    assert si._Stream(Trickle(b"x" * 10, 4)).read_rest(10, "t") == b"x" * 10
    s = si._Stream(Trickle(b"0123456789", 4))
    s.read(2, "a")
    s.read(4, "b")
    assert s.read_rest(100, "c") == b"6789" and s.offset == 6 and s.u8("d") == ord("6")


def _ram_part(records: bytes, sid: int = 2) -> bytes:
    return bytes([2]) + be32(sid) + records + be64(0x10) + bytes([0x7E]) + be32(sid)


@pytest.mark.parametrize("source", ["file", "pipe"])
def test_page_counts_fast_and_slow_paths(source):
    """Runs of pages continuing a block (the buffered fast path) and pages naming their block (the
    general path) are all counted."""
    # zero pages first (so the buffered fast path sees them), then pages whose data starts like a record
    cont = (be64(0x22) + b"\0") * 3 + (be64(PAGE | 0x28) + bytes([0x22]) + bytes([1]) * (PAGE - 1)) * 3
    named = (be64(0x08) + s8("b") + bytes([2]) * PAGE) * 2 + be64(0x02) + s8("b") + b"\0" + be64(0x02) + s8("b") + b"\0"
    data = HEAD + ram_start(("b", 8 * PAGE)) + _ram_part(named + cont) + b"\0"
    s = (si._Stream(io.BytesIO(data), size=len(data), seekable=True, file_base=0) if source == "file"
         else si._Stream(Trickle(data, 1 << 20)))
    w = si._Walker(s)
    list(w.walk())
    b = w.ram["blocks"]["b"]
    assert (b["pages"], b["zero_pages"], b["bytes"]) == (5, 5, 5 * PAGE)


def _device_section(kind: int, sid: int, name: str, payload: bytes, head: bool = True) -> bytes:
    out = bytes([kind]) + be32(sid)
    if head:
        out += s8(name) + be32(0) + be32(1)
    return out + payload + bytes([0x7E]) + be32(sid)


@pytest.mark.parametrize("source", ["file", "pipe"])
def test_footer_scan_finds_the_next_footer_of_each_occurrence(source):
    """Without a description: a device sent in parts (START … END, same id), a payload holding a fake
    footer (not followed by a section header), and an empty payload — each occurrence ends at its own
    footer, the next one after the cursor."""
    fake = bytes([0x7E]) + be32(3) + b"\xff\xff"
    data = (HEAD + ram_start(("b", PAGE)) + _device_section(1, 3, "dev", b"A" * 7 + fake)
            + _device_section(4, 4, "empty", b"") + _device_section(3, 3, "dev", b"B" * 9, head=False) + b"\0")
    s = (si._Stream(io.BytesIO(data), size=len(data), seekable=True, file_base=0) if source == "file"
         else si._Stream(Trickle(data, 1 << 20)))
    w = si._Walker(s)
    secs = [(x.kind, x.name, x.length) for x in w.walk()]
    assert secs == [("start", "ram", len(ram_start(("b", PAGE)))), ("start", "dev", 1 + 4 + 4 + 4 + 4 + 14 + 5),
                    ("full", "empty", 1 + 4 + 6 + 4 + 4 + 5), ("end", "dev", 1 + 4 + 9 + 5)]
    assert w.layout == "footer-scan" and w.eof


def test_description_without_the_device_falls_back_to_the_footer_scan(monkeypatch):
    data = HEAD + ram_start(("b", PAGE)) + _device_section(4, 3, "dev", b"Z" * 11) + b"\0"
    desc = {"devices": [{"name": "other", "instance_id": 0, "fields": []}]}
    w = walk(data, vmdesc=desc)
    assert [(x.name, x.length) for x in w.sections][1] == ("dev", 1 + 4 + 4 + 4 + 4 + 11 + 5)
    assert w.layout == "vmdesc"                          # found by footer, but the image has a description
    monkeypatch.setattr(si, "TAIL_LIMIT", 8)
    w = si._Walker(si._Stream(Trickle(data + bytes(64), 16)), vmdesc=desc)
    with pytest.raises(ImageError) as ei:
        list(w.walk())
    assert str(ei.value).startswith("section dev: more than 0 MiB of stream left to buffer (at offset ")


def test_footer_scan_skips_a_fake_footer_right_at_the_cursor():
    fake = bytes([0x7E]) + be32(3) + b"\xff\xff"
    data = HEAD + ram_start(("b", PAGE)) + _device_section(4, 3, "dev", fake + b"A" * 7) + b"\0"
    assert [x.length for x in walk(data).sections][1] == 1 + 4 + 4 + 4 + 4 + 14 + 5


def test_a_bad_flag_inside_a_run_of_continued_pages():
    run = (be64(PAGE | 0x28) + bytes([1]) * PAGE) + (be64(2 * PAGE | 0x29) + bytes([1]) * PAGE)
    data = HEAD + ram_start(("b", 8 * PAGE)) + _ram_part(be64(0x08) + s8("b") + bytes(PAGE) + run) + b"\0"
    at = len(HEAD + ram_start(("b", 8 * PAGE))) + 5 + 8 + 2 + PAGE + 8 + PAGE
    assert walk_error(data) == f"corrupt stream: unknown RAM flags 0x1 (at offset {at})"


CONFIG_WHATS = {"stream magic", "stream version", "section type", "configuration name length",
                "configuration machine type", "configuration subsection name",
                "configuration/target-page-bits version", "configuration/target-page-bits",
                "configuration/capabilities version", "capability count", "capability name",
                "configuration/uuid version", "configuration/uuid"}


def test_every_cut_of_a_configuration_names_its_field():
    data = HEAD + config(sub("configuration/target-page-bits", be32(12)),
                         sub("configuration/capabilities", be32(2) + s8("events") + s8("multifd")),
                         sub("configuration/uuid", bytes(range(16)))) + b"\0"
    whats = set()
    for cut in range(len(data)):
        m = walk_error(data[:cut])
        r = _READ.match(m)
        assert r and int(r.group(3)) == cut - int(r.group(4)), (cut, m)
        whats.add(r.group(1))
    assert whats == CONFIG_WHATS
    assert walk(data).config["capabilities"] == ["events", "multifd"]


def test_configuration_edges():
    caps = sub("configuration/capabilities", be32(256) + s8("c") * 256)
    assert len(walk(HEAD + config(caps) + b"\0").config["capabilities"]) == 256
    assert walk(HEAD + config(machine=b"pc\xff") + b"\0").config["machine"] == "pc\ufffd"
    odd = HEAD + config(sub("configuration/other", b""))
    for configuration in ({}, {"other": 1}):            # no subsections described
        assert walk_error(odd, vmdesc={"devices": [], "configuration": configuration}) == \
            f"unknown configuration subsection 'configuration/other' (at offset {len(odd)})"
    desc = {"devices": [], "configuration": {"subsections": [{"vmsd_name": "configuration/other",
                                                            "fields": [{"name": "f", "size": 3}]}]}}
    cut = HEAD + config(sub("configuration/other", b"ab"))
    assert walk_error(cut, vmdesc=desc) == ("truncated: stream ends inside configuration/other field f (needs 3 "
                                            f"bytes) (at offset {len(cut) - 2})")


def test_vmsd_struct_fields():
    struct = {"fields": [{"name": "a", "size": 3}]}
    s = si._Stream(io.BytesIO(bytes(10)))
    si._vmsd_skip(s, {"fields": [{"name": "s", "type": "struct", "array_len": 2, "struct": struct}]}, "d")
    assert s.offset == 6                                  # per element, from the struct, not the field's size
    s = si._Stream(io.BytesIO(bytes(10)))
    si._vmsd_skip(s, {"fields": [{"name": "b", "type": "buffer", "size": 5, "struct": struct}]}, "d")
    assert s.offset == 5                                  # not a struct: its own size
    s = si._Stream(io.BytesIO(bytes(10)))
    si._vmsd_skip(s, {"fields": [{"name": "n", "type": "struct", "size": 4, "struct": "not a description"}]}, "d")
    assert s.offset == 4


def test_after_the_end_single_bytes_and_long_padding(monkeypatch):
    assert walk(HEAD + b"\0" + b"\0").trailing == 1
    assert walk_error(HEAD + b"\0" + b"X") == \
        "corrupt stream: unexpected data after the end of the stream (at offset 9)"
    monkeypatch.setattr(si, "_CHUNK", 4)
    assert walk(HEAD + b"\0" + bytes(10)).trailing == 10


def test_available_defaults_to_one_byte():
    s = si._Stream(io.BytesIO(b"ab"))
    s.u8("a")
    assert s.available() and s.available(1) and not s.available(2)


@pytest.mark.parametrize(("text", "offset"), [
    ("<domain type='x'>\n<a>\n</b></domain>", 92 + 18 + 4 + 4),       # line 3, column 5
    ("<domain>\n", 92 + 9),                                  # line 2, column 1
])
def test_xml_errors_name_the_exact_offset(text, offset):
    with pytest.raises(ImageError) as ei:
        si._parse_xml(text, 92, "domain XML")
    assert ei.value.offset == offset and str(ei.value).startswith("corrupt image: domain XML is not well-formed XML (")


def test_find_vmdesc_edges():
    j = b'{"":1}'                                             # six bytes: its length holds a 0x06 too
    tail = b"\0\x06" + be32(len(j)) + j
    assert si._find_vmdesc(tail) == (1, 6)                   # right after an EOF at index 0
    assert si._find_vmdesc(b"\x06" + tail) == (2, 6)         # an earlier 0x06 is not taken first


def test_seekable_skips_past_the_buffer():
    class Small(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            return super().read(min(7, size if size is not None and size >= 0 else 7))

    data = bytes(range(200))
    s = si._Stream(Small(data), size=200, seekable=True)
    s.peek(3)
    s.skip(50, "x")
    assert s.offset == 50 and s.u8("y") == 50
    s.skip(100, "z")
    assert s.offset == 151 and s.u8("w") == 151
    assert s.peek() == bytes([152])                          # peek defaults to one byte


def test_non_ascii_names_show_forty_bytes():
    name = b"\xff" * 50
    with pytest.raises(ImageError) as ei:
        si._Stream(io.BytesIO(bytes([50]) + name)).string("section name")
    assert str(ei.value) == f"corrupt stream: section name {name[:40]!r} is not ASCII (at offset 0)"


def test_blocks_first_seen_in_pages_multifd_flushes_and_odd_lengths():
    data = (HEAD + ram_start(("a", PAGE - 1), ("b", 1))      # the total is page-aligned, the blocks need not be
            + _ram_part(be64(0x02) + s8("c") + b"\0" + be64(0x200) + be64(0x200)) + b"\0")
    w = walk(data)
    assert w.ram["blocks"]["c"] == {"name": "c", "length": None, "pages": 0, "zero_pages": 1, "bytes": 0}
    assert (w.ram["blocks"]["a"]["length"], w.ram["blocks"]["b"]["length"], w.ram["multifd_flushes"]) == (
        PAGE - 1, 1, 2)


def test_header_reads_only_its_data_area(tmp_path):
    """A cookie not terminated inside data_len is refused even when the stream after it holds a NUL."""
    with pytest.raises(ImageError, match=r"^cookie is not NUL-terminated \(at offset 102\)$"):
        _read(_hdr(cookie_offset=10) + b"<domain/>\0<c>".ljust(932, b"y") + b"\0QEVM")
    p = tmp_path / "plain"
    p.write_bytes(b"QEVM" + bytes(100))
    with open(p, "rb") as f:
        assert si._read_vmdesc_from_end(f, 104, 0) == (None, 0)        # no description at all


def test_first_device_with_an_empty_payload_found_by_its_footer():
    data = HEAD + ram_start(("b", PAGE)) + _device_section(4, 3, "empty", b"") + b"\0"
    w = si._Walker(si._Stream(Trickle(data, 1 << 20)))
    assert [x.name for x in w.walk()] == ["ram", "empty"] and w.layout == "footer-scan"


def test_a_continued_page_first_in_the_stream():
    data = HEAD + bytes([1]) + be32(2) + s8("ram") + be32(0) + be32(4) + be64(PAGE | 0x28) + bytes(PAGE) + b"\0"
    assert walk_error(data) == "corrupt stream: RAM page continues no block (at offset 25)"


def test_ram_block_address_cut_short():
    caps = config(sub("configuration/capabilities", be32(1) + s8("x-ignore-shared")))
    data = HEAD + caps + bytes([1]) + be32(2) + s8("ram") + be32(0) + be32(4) + be64(PAGE | 0x04) + s8("b") + be64(PAGE)
    assert walk_error(data + b"\1") == ("truncated: stream ends inside RAM block address (needs 8 bytes, 1 left) "
                                        f"(at offset {len(data)})")


def test_reader_state_before_reading():
    s = si._Stream(io.BytesIO(b""))
    assert (s.eof, s.offset, s.seekable, s.file_base, s.where) == (False, 0, False, None, "")
    w = si._Walker(s)
    assert (w.eof, w.trailing, w.layout, w.config, w.footers, w._tail_loaded, w.vmdesc_info) == (
        False, 0, None, None, None, False, {"present": False})
    assert w.ram == {"total_bytes": None, "blocks": {}, "mapped_ram": False, "multifd_flushes": 0}
    assert si._Walker(s, vmdesc={"devices": []}).layout == "vmdesc"
