"""Unit tests of the QEMU stream reader (virtsave.image.saveimage.inspect_image / iter_sections).

The images are synthetic: a libvirt header from the codec plus a QEMU stream built byte by byte
here following QEMU's format (QEVM v3, configuration, ram START/PART/END with MEM_SIZE / PAGE /
ZERO / CONTINUE / EOS records, FULL device sections with footers, EOF, JSON vmstate description).
Real libvirt/QEMU images are checked in tests/integration/test_image.py.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import struct
import subprocess

import pytest

from virtsave.core.errors import ImageError
from virtsave.image import saveimage

XML = "<domain type='qemu'><name>synth</name><uuid>6c2e4d0e-1a7b-4e7e-9a55-3f0c2a9c1d11</uuid></domain>"
COOKIE = "<qemu-migration><name>synth</name></qemu-migration>"
PAGE = 4096


def be32(n: int) -> bytes:
    return struct.pack(">I", n)


def be64(n: int) -> bytes:
    return struct.pack(">Q", n)


def s8(s: str) -> bytes:
    return bytes([len(s)]) + s.encode()


DEVICES = [
    {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
     "fields": [{"name": "ticks", "type": "int64", "size": 8}, {"name": "unused", "type": "unused_buffer",
                                                                 "size": 8}]},
    {"name": "cpu", "instance_id": 0, "vmsd_name": "cpu", "version": 12,
     "fields": [{"name": "regs", "array_len": 16, "type": "uint64", "size": 8},
                {"name": "seg", "array_len": 2, "type": "struct", "size": 6,
                 "struct": {"vmsd_name": "seg", "version": 1,
                            "fields": [{"name": "sel", "type": "uint32", "size": 4},
                                       {"name": "flags", "type": "uint16", "size": 2}]}}],
     "subsections": [{"vmsd_name": "cpu/xsave", "version": 1,
                      "fields": [{"name": "xmm", "type": "buffer", "size": 32}]}]},
    {"name": "serial", "instance_id": 0, "vmsd_name": "serial", "version": 3,
     "fields": [{"name": "divider", "type": "uint16", "size": 2}, {"name": "lcr", "type": "uint8", "size": 1}]},
]


def device_payload(dev: dict) -> bytes:
    """Bytes matching a description (0x7e bytes inside, to tempt a naive footer scan)."""
    out = b""

    def fields(desc: dict) -> bytes:
        b = b""
        for f in desc["fields"]:
            n = f.get("array_len", 1)
            if f["type"] == "struct":
                b += b"".join(fields(f["struct"]) for _ in range(n))
            else:
                b += bytes([0x7E]) * (f["size"] * n)
        for sub in desc.get("subsections", []):
            b += bytes([0x05]) + s8(sub["vmsd_name"]) + be32(sub["version"]) + fields(sub)
        return b
    out = fields(dev)
    return out


def build_stream(*, mapped_ram_base: int | None = None, vmdesc: bool = True, capabilities=(),
                 footers: bool = True) -> tuple[bytes, dict]:
    """A QEMU stream; with *mapped_ram_base* (file offset of the stream) a mapped-ram layout."""
    blocks = [("pc.ram", 64 * PAGE), ("pc.bios", 4 * PAGE)]
    caps = list(capabilities) + (["mapped-ram"] if mapped_ram_base is not None else [])
    s = bytearray(b"QEVM" + be32(3))
    s += bytes([0x07]) + be32(14) + b"pc-i440fx-10.0"
    if caps:
        s += bytes([0x05]) + s8("configuration/capabilities") + be32(1) + be32(len(caps))
        s += b"".join(s8(c) for c in caps)
    # ram START
    s += bytes([0x01]) + be32(2) + s8("ram") + be32(0) + be32(4)
    s += be64(sum(n for _, n in blocks) | 0x04)
    page_areas = {}
    for name, length in blocks:
        s += s8(name) + be64(length)
        if mapped_ram_base is not None:
            here = mapped_ram_base + len(s) + 28
            bitmap_size = ((length // PAGE + 63) // 64) * 8
            pages_off = (here + bitmap_size + 0xFFFFF) // 0x100000 * 0x100000
            s += be32(1) + be64(PAGE) + be64(here) + be64(pages_off)
            page_areas[name] = (here, pages_off, length)
            # the stream goes on after the page area; the bitmap and pages land in between
            s += bytes(pages_off + length - (mapped_ram_base + len(s)))
    s += be64(0x10)
    s += bytes([0x7E]) + be32(2)
    expect = {"pages": 0, "zero_pages": 0}
    if mapped_ram_base is None:
        # ram PART: 3 pages of pc.ram (second and third CONTINUE), 2 zero pages, EOS
        s += bytes([0x02]) + be32(2)
        s += be64(0 | 0x08) + s8("pc.ram") + bytes([0xAB]) * PAGE
        s += be64(PAGE | 0x08 | 0x20) + bytes([0x7E]) * PAGE
        s += be64(2 * PAGE | 0x02 | 0x20) + b"\0"
        s += be64(0 | 0x02) + s8("pc.bios") + b"\0"
        s += be64(PAGE | 0x08 | 0x20) + bytes([0xCD]) * PAGE
        s += be64(0x10) + bytes([0x7E]) + be32(2)
        # ram END: one more page continuing the last block of the previous section
        s += bytes([0x03]) + be32(2) + be64(2 * PAGE | 0x08 | 0x20) + bytes(PAGE) + be64(0x10)
        s += bytes([0x7E]) + be32(2)
        expect = {"pages": 4, "zero_pages": 2}
    else:
        s += bytes([0x02]) + be32(2) + be64(0x200) + be64(0x10) + bytes([0x7E]) + be32(2)
        s += bytes([0x03]) + be32(2) + be64(0x10) + bytes([0x7E]) + be32(2)
    for sid, dev in enumerate(DEVICES, start=3):
        s += bytes([0x04]) + be32(sid) + s8(dev["name"]) + be32(dev["instance_id"]) + be32(dev["version"])
        s += device_payload(dev) + bytes([0x7E]) + be32(sid)
    if not footers:     # old machine types: drop every "0x7e be32 id" we wrote at section ends
        for sid in range(2, 3 + len(DEVICES)):
            s = bytearray(bytes(s).replace(bytes([0x10, 0x7E]) + be32(sid), bytes([0x10])) if sid == 2
                          else bytes(s).replace(bytes([0x7E]) + be32(sid) + bytes([0x04]), bytes([0x04])))
        s = s[:-5] if s[-5:] == bytes([0x7E]) + be32(2 + len(DEVICES)) else s
    s += b"\0"
    if vmdesc:
        desc = json.dumps({"page_size": PAGE, "devices": DEVICES}).encode()
        s += bytes([0x06]) + be32(len(desc)) + desc
    return bytes(s), {"page_areas": page_areas, **expect}


def make_image(path, *, fmt: str = "raw", partial: bool = False, **kw) -> dict:
    head = saveimage.encode_header(XML, COOKIE, image_format=fmt, partial=partial)
    base = len(head) if fmt == "sparse" else None
    stream, facts = build_stream(mapped_ram_base=base, **kw)
    if fmt in saveimage.DECOMPRESSORS:
        tool = saveimage.DECOMPRESSORS[fmt][0]
        stream = subprocess.run([tool, "-c"], input=stream, capture_output=True, check=True).stdout
    data = bytearray(head + stream)
    if fmt == "sparse":
        # fill the bitmaps: pc.ram pages 0,1,5 present; pc.bios page 3
        for name, pages in (("pc.ram", (0, 1, 5)), ("pc.bios", (3,))):
            bitmap_off, pages_off, _ = facts["page_areas"][name]
            for p in pages:
                data[bitmap_off + p // 8] |= 1 << (p % 8)
                data[pages_off + p * PAGE:pages_off + (p + 1) * PAGE] = bytes([0x11]) * PAGE
    path.write_bytes(bytes(data))
    return facts


def test_raw_image_sections_ram_and_vmdesc(tmp_path):
    p = tmp_path / "raw.img"
    make_image(p)
    r = saveimage.inspect_image(p)
    hdr = saveimage.read_header_path(p)
    assert r["header"] == hdr.to_dict()
    assert r["xml"] == XML and r["cookie"] == COOKIE
    assert r["domain"] == {"name": "synth", "uuid": "6c2e4d0e-1a7b-4e7e-9a55-3f0c2a9c1d11"}
    s = r["stream"]
    assert s["offset"] == hdr.stream_offset and s["version"] == 3
    assert s["configuration"]["machine"] == "pc-i440fx-10.0"
    assert [(x["name"], x["version_id"], x["count"]) for x in s["sections"]] == [
        ("ram", 4, {"start": 1, "part": 1, "end": 1, "full": 0}),
        ("timer", 2, {"start": 0, "part": 0, "end": 0, "full": 1}),
        ("cpu", 12, {"start": 0, "part": 0, "end": 0, "full": 1}),
        ("serial", 3, {"start": 0, "part": 0, "end": 0, "full": 1})]
    cpu = s["sections"][2]
    # header 1+4+1+3+4+4, fields 16*8 + 2*(4+2), subsection 1+1+9+4+32, footer 5
    assert cpu["bytes"] == 17 + 128 + 12 + 47 + 5
    ram = s["ram"]
    assert (ram["pages"], ram["zero_pages"], ram["bytes"]) == (4, 2, 4 * PAGE)
    assert [(b["name"], b["length"], b["pages"], b["zero_pages"]) for b in ram["blocks"]] == [
        ("pc.ram", 64 * PAGE, 2, 1), ("pc.bios", 4 * PAGE, 2, 1)]  # END continues pc.bios
    assert s["vmdesc"]["present"] and s["vmdesc"]["matches_sections"] and s["layout"] == "vmdesc"
    assert s["length"] == p.stat().st_size - hdr.stream_offset
    assert sum(x["bytes"] for x in s["sections"]) < s["length"]


def test_iter_sections_streams_each_occurrence(tmp_path):
    p = tmp_path / "raw.img"
    make_image(p)
    secs = list(saveimage.iter_sections(p))
    assert [(x.kind, x.name) for x in secs] == [("start", "ram"), ("part", "ram"), ("end", "ram"),
                                                ("full", "timer"), ("full", "cpu"), ("full", "serial")]
    # sections tile the stream from the first section to EOF
    for x, y in itertools.pairwise(secs):
        assert x.offset + x.length == y.offset


@pytest.mark.parametrize("fmt", ["gzip", "bzip2", "xz", "lzop", "zstd"])
def test_compressed_images_match_raw(tmp_path, fmt):
    if shutil.which(saveimage.DECOMPRESSORS[fmt][0]) is None:
        pytest.skip(f"{fmt} not installed")
    make_image(tmp_path / "raw.img")
    make_image(tmp_path / "c.img", fmt=fmt)
    raw = saveimage.inspect_image(tmp_path / "raw.img")["stream"]
    comp = saveimage.inspect_image(tmp_path / "c.img")["stream"]
    assert comp["compression"] == fmt
    for k in ("sections", "ram", "configuration", "length", "layout"):
        assert comp[k] == raw[k], k


def test_sparse_mapped_ram_layout(tmp_path):
    p = tmp_path / "sparse.img"
    facts = make_image(p, fmt="sparse")
    s = saveimage.inspect_image(p)["stream"]
    assert s["configuration"]["capabilities"] == ["mapped-ram"]
    ram = s["ram"]
    assert ram["mapped_ram"] is True
    blocks = {b["name"]: b for b in ram["blocks"]}
    bmp, pages_off, _ = facts["page_areas"]["pc.ram"]
    assert blocks["pc.ram"]["bitmap_offset"] == bmp and blocks["pc.ram"]["pages_offset"] == pages_off
    assert pages_off % 0x100000 == 0
    assert (blocks["pc.ram"]["pages_present"], blocks["pc.ram"]["zero_pages"]) == (3, 61)
    assert (blocks["pc.bios"]["pages_present"], blocks["pc.bios"]["zero_pages"]) == (1, 3)
    assert ram["bytes"] == 4 * PAGE
    assert [x["name"] for x in s["sections"]] == ["ram", "timer", "cpu", "serial"]


def test_without_vmdesc_sections_found_by_footer_scan(tmp_path):
    make_image(tmp_path / "a.img")
    make_image(tmp_path / "b.img", vmdesc=False)
    a = saveimage.inspect_image(tmp_path / "a.img")["stream"]
    b = saveimage.inspect_image(tmp_path / "b.img")["stream"]
    assert b["layout"] == "footer-scan" and not b["vmdesc"]["present"]
    assert b["sections"] == a["sections"]


def test_streams_without_section_footers(tmp_path):
    make_image(tmp_path / "a.img")
    make_image(tmp_path / "b.img", footers=False)
    a = saveimage.inspect_image(tmp_path / "a.img")["stream"]
    b = saveimage.inspect_image(tmp_path / "b.img")["stream"]
    assert a["section_footers"] and not b["section_footers"]
    assert [(x["name"], x["count"]) for x in b["sections"]] == [(x["name"], x["count"]) for x in a["sections"]]
    assert [x["bytes"] for x in b["sections"]] == [x["bytes"] - 5 * sum(x["count"].values()) for x in a["sections"]]


def _truncate(src, dst, n):
    dst.write_bytes(src.read_bytes()[:n])


@pytest.mark.parametrize("cut, needle", [
    (50, "truncated: header needs 92"),
    (300, "truncated: XML area"),
    ("stream+2", "stream magic"),
    ("stream+200", "truncated"),
    ("end-3000", "truncated"),
])
def test_truncated_images_name_the_offset(tmp_path, cut, needle):
    src = tmp_path / "raw.img"
    make_image(src)
    off = saveimage.read_header_path(src).stream_offset
    size = src.stat().st_size
    n = cut if isinstance(cut, int) else (off + int(cut[7:]) if cut.startswith("stream") else size - int(cut[4:]))
    dst = tmp_path / "cut.img"
    _truncate(src, dst, n)
    with pytest.raises(ImageError, match=needle) as ei:
        saveimage.inspect_image(dst)
    assert "at offset" in str(ei.value) and ei.value.offset is not None and ei.value.offset <= n


def test_truncated_compressed_image(tmp_path):
    src = tmp_path / "z.img"
    make_image(src, fmt="zstd")
    dst = tmp_path / "cut.img"
    _truncate(src, dst, src.stat().st_size - 40)
    with pytest.raises(ImageError, match=r"zstd data is truncated or corrupt .*decompressed zstd stream") as ei:
        saveimage.inspect_image(dst)
    assert ei.value.offset == dst.stat().st_size


def test_foreign_partial_and_corrupt(tmp_path):
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(os.urandom(5000))
    with pytest.raises(ImageError, match=r"not a libvirt save image.*at offset 0"):
        saveimage.inspect_image(rnd)
    part = tmp_path / "part.img"
    make_image(part, partial=True)
    with pytest.raises(ImageError, match=r"partial \(LibvirtQemudPart\).*at offset 0"):
        saveimage.inspect_image(part)
    assert saveimage.inspect_image(part, allow_partial=True)["header"]["partial"] is True
    cut_part = tmp_path / "cut-part.img"
    _truncate(part, cut_part, part.stat().st_size - 3000)       # a save that stopped half-way
    st = saveimage.inspect_image(cut_part, allow_partial=True)["stream"]
    assert st["complete"] is False and "truncated" in st["stopped"] and "at offset" in st["stopped"]
    assert st["sections"][0]["name"] == "ram"
    # a flipped section type byte (ram PART) and a bad QEVM magic
    good = tmp_path / "good.img"
    make_image(good)
    data = bytearray(good.read_bytes())
    off = saveimage.read_header_path(good).stream_offset
    sec = next(x for x in saveimage.iter_sections(good) if x.kind == "part")
    bad = bytearray(data)
    bad[off + sec.offset] = 0x55
    (tmp_path / "bad1.img").write_bytes(bytes(bad))
    with pytest.raises(ImageError, match=f"unknown section type 0x55 \\(at offset {off + sec.offset}\\)"):
        saveimage.inspect_image(tmp_path / "bad1.img")
    bad = bytearray(data)
    at = bytes(data).index(b"<name>") + 1
    bad[at] = ord("<")                                   # "<<ame>": no longer well-formed
    (tmp_path / "badxml.img").write_bytes(bytes(bad))
    with pytest.raises(ImageError, match=r"domain XML is not well-formed.*at offset (\d+)") as ei:
        saveimage.inspect_image(tmp_path / "badxml.img")
    assert abs(ei.value.offset - at) <= 2
    bad = bytearray(data)
    bad[off:off + 4] = b"XXXX"
    (tmp_path / "bad2.img").write_bytes(bytes(bad))
    with pytest.raises(ImageError, match=f"no QEVM magic \\(at offset {off}\\)"):
        saveimage.inspect_image(tmp_path / "bad2.img")


def test_cli_inspect_and_errors(tmp_path, cli):
    p = tmp_path / "raw.img"
    make_image(p)
    r = cli("inspect", str(p), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stream"]["ram"]["pages"] == 4
    r = cli("inspect", str(p))
    assert r.returncode == 0 and "timer" in r.stdout and "pc.ram" in r.stdout
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(os.urandom(5000))
    r = cli("inspect", str(rnd))
    assert r.returncode == 2 and "at offset 0" in r.stderr and "Traceback" not in r.stderr
    _truncate(p, tmp_path / "cut.img", p.stat().st_size // 2)
    r = cli("inspect", str(tmp_path / "cut.img"))
    assert r.returncode == 2 and "truncated" in r.stderr and "at offset" in r.stderr
