"""libvirt's QEMU save-image format: the 92-byte header, domain XML and cookie, and a reader of the
QEMU migration stream that follows (:func:`inspect_image`, :func:`iter_sections`; see the comment block
before ``QEVM_MAGIC`` for the format and how device sections are delimited).

Inspecting (the whole stream is walked in constant memory, compressed images through
``zstd -dc``/``gzip -dc``/…)::

    info = inspect_image("/var/lib/libvirt/qemu/save/vm1.save")
    info["header"]["format"], info["stream"]["ram"]["pages"], [s["name"] for s in info["stream"]["sections"]]

Layout (``src/qemu/qemu_saveimage.h``), host-endian (little on x86_64)::

    char     magic[16]     "LibvirtQemudSave" (complete) / "LibvirtQemudPart" (being written)
    uint32   version       2
    uint32   data_len      bytes after the header up to the QEMU stream
    uint32   was_running   1 = resume after restore
    uint32   compressed    see FORMATS
    uint32   cookieOffset  offset of the cookie XML inside the data
    uint32   unused[14]
    <domain XML>\\0 <cookie XML>\\0 zero padding  (data_len bytes)
    QEMU migration stream ("QEVM" ...) at 92 + data_len

Example::

    >>> import io
    >>> buf = io.BytesIO()
    >>> hdr = write_header(buf, "<domain/>", cookie="<qemu-migration/>", was_running=True)
    >>> hdr.partial, hdr.stream_offset
    (True, 1024)
    >>> read_header(io.BytesIO(buf.getvalue())).xml
    '<domain/>'
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any, BinaryIO, cast

from virtsave.core import jsonload
from virtsave.core.errors import ImageError
from virtsave.trace import model as tr

MAGIC = b"LibvirtQemudSave"
MAGIC_PARTIAL = b"LibvirtQemudPart"
VERSION = 2
HEADER_SIZE = 92
_HEADER = struct.Struct("<16s5I14I")
assert _HEADER.size == HEADER_SIZE

#: libvirt's ``virQEMUSaveFormat`` numbering (zstd from 10.4, sparse from 11.2).
FORMATS = {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd", 6: "sparse"}
FORMAT_IDS = {v: k for k, v in FORMATS.items()}
#: libvirt pads the XML area so the stream starts at a multiple of this (QEMU_SAVE_PAD).
XML_PAD = 1024
MAX_XML = 16 * 1024 * 1024


@dataclass
class Header:
    """A decoded save-image header plus its XML and cookie."""

    magic: str
    version: int
    data_len: int
    was_running: bool
    compressed: int
    cookie_offset: int
    xml: str
    cookie: str | None

    @property
    def partial(self) -> bool:
        """True while libvirt (or virtsave) has not finished the image."""
        return self.magic == MAGIC_PARTIAL.decode()

    @property
    def format(self) -> str:
        """Format name (``raw``, ``zstd``, ``sparse`` …) or ``unknown(N)``."""
        return FORMATS.get(self.compressed, f"unknown({self.compressed})")

    @property
    def stream_offset(self) -> int:
        """Where the QEMU migration stream starts."""
        return HEADER_SIZE + self.data_len

    def to_dict(self) -> tr.ImageHeader:
        """JSON-friendly fields (as recorded in traces' ``image.header``)."""
        d = asdict(self)
        d.pop("xml")
        d.pop("cookie")
        d.update(format=self.format, partial=self.partial, stream_offset=self.stream_offset)
        return cast(tr.ImageHeader, d)


def read_header(f: BinaryIO, *, allow_partial: bool = True) -> Header:
    """Decode the header, XML and cookie from the start of *f*.

    Raises :class:`ImageError` naming the offset for a truncated, foreign or corrupt image.
    """
    raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise ImageError(f"truncated: header needs {HEADER_SIZE} bytes, file has {len(raw)}", offset=len(raw))
    magic, version, data_len, was_running, compressed, cookie_offset, *_ = _HEADER.unpack(raw)
    _check_fields(magic, version, data_len, was_running, compressed, cookie_offset, allow_partial)
    data = f.read(data_len)
    if len(data) < data_len:
        raise ImageError(f"truncated: XML area needs {data_len} bytes, file has {len(data)}",
                         offset=HEADER_SIZE + len(data))
    xml, cookie = _decode_data(data, cookie_offset)
    return Header(magic.decode(), version, data_len, bool(was_running), compressed, cookie_offset, xml, cookie)


def _check_fields(magic: bytes, version: int, data_len: int, was_running: int, compressed: int,
                  cookie_offset: int, allow_partial: bool) -> None:
    """The fixed 92 bytes: each field within what libvirt writes, else the field's offset."""
    if magic not in (MAGIC, MAGIC_PARTIAL):
        raise ImageError(f"not a libvirt save image: magic {magic[:16]!r}", offset=0)
    if magic == MAGIC_PARTIAL and not allow_partial:
        raise ImageError("image is partial (LibvirtQemudPart): the save never completed", offset=0)
    if version != VERSION:
        raise ImageError(f"unsupported save-image version {version} (expected {VERSION})", offset=16)
    if data_len == 0 or data_len > MAX_XML:
        raise ImageError(f"implausible data_len {data_len}", offset=20)
    if was_running not in (0, 1):
        raise ImageError(f"corrupt header: was_running = {was_running}", offset=24)
    if compressed not in FORMATS:
        raise ImageError(f"unknown image format id {compressed}", offset=28)
    if cookie_offset and cookie_offset >= data_len:
        raise ImageError(f"cookie offset {cookie_offset} beyond data_len {data_len}", offset=32)


def _decode_data(data: bytes, cookie_offset: int) -> tuple[str, str | None]:
    """The NUL-terminated domain XML and cookie of the data area (offsets are the file's)."""
    xml_end = data.find(b"\0")
    if xml_end <= 0:
        raise ImageError("domain XML is not NUL-terminated", offset=HEADER_SIZE)
    try:
        xml = data[:xml_end].decode()
    except UnicodeDecodeError as exc:
        raise ImageError("domain XML is not valid UTF-8", offset=HEADER_SIZE + exc.start) from None
    if not xml.lstrip().startswith("<domain"):
        raise ImageError("data does not start with a <domain> element", offset=HEADER_SIZE)
    cookie = None
    if cookie_offset:
        c_end = data.find(b"\0", cookie_offset)
        if c_end < 0:
            raise ImageError("cookie is not NUL-terminated", offset=HEADER_SIZE + cookie_offset)
        try:
            cookie = data[cookie_offset:c_end].decode()
        except UnicodeDecodeError as exc:
            raise ImageError("cookie is not valid UTF-8",
                             offset=HEADER_SIZE + cookie_offset + exc.start) from None
    return xml, cookie


def read_header_path(path: str | os.PathLike[str], **kw: Any) -> Header:
    """:func:`read_header` on a file path, with a one-line error for unreadable files."""
    try:
        with open(path, "rb") as f:
            return read_header(f, **kw)
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc.strerror}") from None


def encode_header(xml: str, cookie: str | None = None, *, was_running: bool = True,
                  image_format: str = "raw", partial: bool = True, align: int = XML_PAD) -> bytes:
    """Header + XML + cookie + padding, ready to write at offset 0."""
    xml_b = xml.encode() + b"\0"
    cookie_b = cookie.encode() + b"\0" if cookie else b""
    data_len = len(xml_b) + len(cookie_b)
    # Pad so the stream starts aligned (libvirt leaves room to grow the XML in place).
    total = HEADER_SIZE + data_len
    total = (total + align - 1) // align * align
    data_len = total - HEADER_SIZE
    cookie_offset = len(xml_b) if cookie_b else 0
    head = _HEADER.pack(MAGIC_PARTIAL if partial else MAGIC, VERSION, data_len, int(was_running),
                        FORMAT_IDS[image_format], cookie_offset, *([0] * 14))
    body = (xml_b + cookie_b).ljust(data_len, b"\0")
    return head + body


def write_header(f: BinaryIO, xml: str, cookie: str | None = None, *, was_running: bool = True,
                 image_format: str = "raw", partial: bool = True) -> Header:
    """Write the header (partial by default) at the start of *f*; return it decoded."""
    blob = encode_header(xml, cookie, was_running=was_running, image_format=image_format, partial=partial)
    f.seek(0)
    f.write(blob)
    f.flush()
    import io

    return read_header(io.BytesIO(blob))


def sync_directory(path: str | os.PathLike[str]) -> None:
    """``fsync`` the directory holding *path*, so that its entry (the file's name) is on disk too."""
    dfd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def finalize(fd: int, path: str | os.PathLike[str] | None = None) -> None:
    """Flip the magic of a finished image at *path* (open as *fd*; default: the path the kernel
    names for *fd*) from ``LibvirtQemudPart`` to ``LibvirtQemudSave``, durably.

    Call only after the stream is complete. libvirt's promise is that a complete magic means a
    complete image, also after a power loss, so the order is: the data on disk (``fsync`` of the
    file), the file's name on disk (``fsync`` of its directory), only then the magic, itself synced.
    A crash before the last step leaves a ``LibvirtQemudPart`` image, never a complete-looking
    one without its data or name.
    """
    os.fsync(fd)
    sync_directory(path if path is not None else os.readlink(f"/proc/self/fd/{fd}"))
    if os.pread(fd, 16, 0) != MAGIC_PARTIAL:
        raise ImageError("refusing to finalize: image does not start with LibvirtQemudPart", offset=0)
    os.pwrite(fd, MAGIC, 0)
    os.fsync(fd)


# ---------------------------------------------------------------------------------------------
# The QEMU migration stream after the libvirt header (read-only inspection).
#
# Facts (QEMU migration/savevm.c, migration/ram.c, scripts/analyze-migration.py), big-endian:
#   "QEVM" be32 version (3)
#   0x07 CONFIGURATION: be32 len, machine name, then subsections (0x05 u8 len name be32 version
#        fields): "configuration/target-page-bits" (be32), "configuration/capabilities"
#        (be32 count, count × (u8 len + name)), "configuration/uuid" (16 bytes). No footer.
#   0x01 START / 0x04 FULL: be32 section_id, u8 len idstr, be32 instance_id, be32 version_id, data
#   0x02 PART  / 0x03 END : be32 section_id, data
#   every section is followed by the footer 0x7e be32 section_id (machine types ≥ 2.4)
#   0x08 COMMAND: be16 command, be16 length, data
#   0x00 EOF, then 0x06 VMDESCRIPTION: be32 length, JSON describing every device section written
#
# Only "ram" data is self-describing (be64 address|flags records). Device sections carry no length;
# we delimit them with the JSON vmstate description QEMU appends after EOF (field sizes as written,
# structs and subsections recursed like analyze-migration.py does) and check each result against the
# section footer. The description is read first from the file's end when the file is seekable; for a
# compressed stream the (small) remainder after the last RAM section is buffered to reach it. Without
# a description (suppressed, or the stream is cut) sections are delimited by scanning for the footer
# followed by a valid next section header; the result says which ``layout`` was used.
# RAM page payloads are skipped (seek, or read-and-discard in 1 MiB chunks), never kept: constant
# memory however large the image. Mapped-ram ("sparse", libvirt format 6) images: each RAM block's
# header carries absolute file offsets of its dirty bitmap and page area; the stream continues after
# the page area, and the bitmap (written at completion) tells which pages are present.
# ---------------------------------------------------------------------------------------------

QEVM_MAGIC = b"QEVM"
QEVM_VERSION = 3
SEC_EOF, SEC_START, SEC_PART, SEC_END, SEC_FULL = 0x00, 0x01, 0x02, 0x03, 0x04
SEC_SUBSECTION, SEC_VMDESC, SEC_CONFIG, SEC_COMMAND, SEC_FOOTER = 0x05, 0x06, 0x07, 0x08, 0x7E
SECTION_KINDS = {SEC_START: "start", SEC_PART: "part", SEC_END: "end", SEC_FULL: "full"}

RAM_ZERO, RAM_MEM_SIZE, RAM_PAGE, RAM_EOS, RAM_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
RAM_XBZRLE, RAM_HOOK, RAM_COMPRESS_PAGE, RAM_MULTIFD_FLUSH = 0x40, 0x80, 0x100, 0x200

#: QEMU_VM_COMMAND numbers (migration/savevm.c ``enum qemu_vm_cmd``).
COMMANDS = {1: "OPEN_RETURN_PATH", 2: "PING", 3: "POSTCOPY_ADVISE", 4: "POSTCOPY_LISTEN", 5: "POSTCOPY_RUN",
            6: "POSTCOPY_RAM_DISCARD", 7: "POSTCOPY_RESUME", 8: "RECV_BITMAP", 9: "PACKAGED", 10: "ENABLE_COLO",
            11: "SWITCHOVER_START"}

#: Decompressors for libvirt's compressed formats (each reads stdin, writes stdout).
DECOMPRESSORS = {"gzip": ["gzip", "-dc"], "bzip2": ["bzip2", "-dc"], "xz": ["xz", "-dc"],
                 "lzop": ["lzop", "-dc"], "zstd": ["zstd", "-dc"]}
_CHUNK = 1024 * 1024
#: How much stream after the RAM data we buffer to find the vmstate description (device state).
TAIL_LIMIT = 256 * 1024 * 1024
#: Default target page size (x86 and most targets) until the stream says otherwise.
DEFAULT_PAGE_SIZE = 4096


@dataclass
class Section:
    """One section occurrence in the stream (``kind``: start/part/end/full)."""

    kind: str
    section_id: int
    name: str
    instance_id: int
    version_id: int
    offset: int          # stream offset of the section type byte
    length: int          # bytes from the type byte through the footer


class _Stream:
    """Sequential reader with stream offsets over a file or a decompressor pipe.

    Keeps at most one chunk buffered; ``skip`` seeks when the source allows it.
    """

    def __init__(self, src: IO[bytes], *, start: int = 0, size: int | None = None, seekable: bool = False,
                 file_base: int | None = None, where: str = "") -> None:
        self._src = src
        self._buf = b""
        self._pos = 0
        self._consumed = start          # stream offset of _buf[0]
        self._size = size               # stream length when known (regular files)
        self.seekable = seekable
        self.file_base = file_base      # file offset of stream offset 0 (uncompressed files)
        self.where = where              # e.g. " in the decompressed zstd stream"
        self.eof = False

    @property
    def offset(self) -> int:
        return self._consumed + self._pos

    def error(self, message: str, offset: int | None = None) -> ImageError:
        off = self.offset if offset is None else offset
        if self.file_base is not None:
            return ImageError(f"{message}", offset=self.file_base + off)
        return ImageError(f"{message}{self.where}", offset=off)

    def _more(self, need: int) -> bool:
        """Make at least *need* bytes available after the cursor; False at end of data."""
        while len(self._buf) - self._pos < need:
            if self.eof:
                return False
            chunk = self._src.read(max(_CHUNK, need))
            if not chunk:
                self.eof = True
                return False
            self._consumed += self._pos
            self._buf = self._buf[self._pos:] + chunk
            self._pos = 0
        return True

    def available(self, n: int = 1) -> bool:
        return self._more(n)

    def peek(self, n: int = 1) -> bytes:
        self._more(n)
        return self._buf[self._pos:self._pos + n]

    def read(self, n: int, what: str) -> bytes:
        if not self._more(n):
            have = len(self._buf) - self._pos
            raise self.error(f"truncated: stream ends inside {what} (needs {n} bytes, {have} left)")
        b = self._buf[self._pos:self._pos + n]
        self._pos += n
        return b

    def u8(self, what: str) -> int:
        return self.read(1, what)[0]

    def be16(self, what: str) -> int:
        return int.from_bytes(self.read(2, what), "big")

    def be32(self, what: str) -> int:
        return int.from_bytes(self.read(4, what), "big")

    def be64(self, what: str) -> int:
        return int.from_bytes(self.read(8, what), "big")

    def string(self, what: str) -> str:
        at = self.offset
        raw = self.read(self.u8(what), what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(f"corrupt stream: {what} {raw[:40]!r} is not ASCII", at) from None

    def skip(self, n: int, what: str) -> None:
        avail = len(self._buf) - self._pos
        if n <= avail:
            self._pos += n
            return
        start = self.offset
        rest = n - avail
        self._consumed += len(self._buf)
        self._buf, self._pos = b"", 0
        if self.seekable:
            if self._size is not None and self._consumed + rest > self._size:
                self._consumed = self._size
                self.eof = True
                raise self.error(f"truncated: stream ends inside {what} (needs {n} bytes)", start)
            self._src.seek(rest, os.SEEK_CUR)
            self._consumed += rest
            return
        while rest:
            chunk = self._src.read(min(rest, _CHUNK))
            if not chunk:
                self.eof = True
                raise self.error(f"truncated: stream ends inside {what} (needs {n} bytes)", start)
            rest -= len(chunk)
            self._consumed += len(chunk)

    def seek(self, offset: int, what: str) -> None:
        """Jump to a stream offset (mapped-ram images only: regular files)."""
        if not self.seekable:
            raise self.error(f"{what} needs random access, impossible in a compressed stream")
        if self._size is not None and offset > self._size:
            raise self.error(f"truncated: {what} points to stream offset {offset} beyond the end "
                             f"({self._size})")
        # The source's position is at _consumed + len(_buf); move it to *offset*.
        self._src.seek(offset - (self._consumed + len(self._buf)), os.SEEK_CUR)
        self._consumed, self._buf, self._pos = offset, b"", 0
        self.eof = False

    def read_rest(self, limit: int, what: str) -> bytes:
        """Everything up to the end of data (at most *limit* bytes)."""
        parts = [self._buf[self._pos:]]
        total = len(parts[0])
        while not self.eof:
            chunk = self._src.read(_CHUNK)
            if not chunk:
                self.eof = True
                break
            parts.append(chunk)
            total += len(chunk)
            if total > limit:
                raise self.error(f"{what}: more than {limit >> 20} MiB of stream left to buffer")
        data = b"".join(parts)
        self._consumed += self._pos
        self._buf, self._pos = data, 0
        return data

    def buffered(self) -> tuple[bytes, int]:
        """The buffered bytes and the cursor inside them (after :meth:`read_rest`)."""
        return self._buf, self._pos

    def set_pos(self, offset: int) -> None:
        """Move the cursor inside the buffer (after :meth:`read_rest`)."""
        self._pos = offset - self._consumed


def _find_vmdesc(data: bytes) -> tuple[int, int] | None:
    """Locate ``0x06 be32 len JSON`` ending the data; return (index of 0x06, json length)."""
    end = len(data.rstrip(b"\0"))   # tolerate zero padding after the stream
    # JSON text never holds a raw 0x06 byte, so the last one is the marker.
    p = data.rfind(bytes([SEC_VMDESC]), 0, end)
    while p >= 1:
        if p + 5 <= end:
            n = int.from_bytes(data[p + 1:p + 5], "big")
            if p + 5 + n == end and data[p + 5:p + 6] == b"{" and data[p - 1] == SEC_EOF:
                return p, n
        p = data.rfind(bytes([SEC_VMDESC]), 0, p)
    return None


def _vmsd_skip(s: _Stream, desc: dict[str, Any], what: str) -> None:
    """Skip one vmstate (fields, then subsections) as laid out by the description."""
    for field in desc.get("fields", []):
        count = int(field.get("array_len", 1))
        if field.get("type") == "struct" and isinstance(field.get("struct"), dict):
            for _ in range(count):
                _vmsd_skip(s, field["struct"], f"{what}.{field.get('name')}")
        else:
            s.skip(int(field.get("size", 0)) * count, f"{what} field {field.get('name')}")
    for sub in desc.get("subsections", []):
        at = s.offset
        if s.u8(f"{what} subsection") != SEC_SUBSECTION:
            raise s.error(f"corrupt stream: subsection {sub.get('vmsd_name')} of {what} expected", at)
        name = s.string(f"{what} subsection name")
        if name != sub.get("vmsd_name"):
            raise s.error(f"corrupt stream: subsection {name!r} found where the description has "
                          f"{sub.get('vmsd_name')!r}", at)
        s.be32(f"{name} version")
        _vmsd_skip(s, sub, name)


def _plausible_header(data: bytes, i: int, known_ids: set[int]) -> bool:
    """Does a section header (or EOF) start at data[i]? Used by the footer scan."""
    if i >= len(data):
        return False
    t = data[i]
    if t == SEC_EOF:
        return not data[i + 1:].strip(b"\0") or data[i + 1:i + 2] == bytes([SEC_VMDESC])
    if t in (SEC_PART, SEC_END):
        return int.from_bytes(data[i + 1:i + 5], "big") in known_ids
    if t in (SEC_START, SEC_FULL):
        n = data[i + 5] if i + 5 < len(data) else 0
        name = data[i + 6:i + 6 + n]
        return (n > 0 and len(name) == n and all(32 < c < 127 for c in name)
                and int.from_bytes(data[i + 6 + n:i + 10 + n], "big") < 1 << 16)
    return t == SEC_COMMAND


class _Walker:
    """Walks a QEMU stream, yielding sections and accumulating configuration/RAM facts."""

    def __init__(self, s: _Stream, *, file_fd: int | None = None, vmdesc: dict[str, Any] | None = None) -> None:
        self.s = s
        self.fd = file_fd
        self.vmdesc = vmdesc
        self.vmdesc_info: dict[str, Any] = {"present": False}
        self.layout = "vmdesc" if vmdesc else None
        self.config: dict[str, Any] | None = None
        self.page_size = int(vmdesc.get("page_size", DEFAULT_PAGE_SIZE)) if vmdesc else DEFAULT_PAGE_SIZE
        self.ram: dict[str, Any] = {"total_bytes": None, "blocks": {}, "mapped_ram": False,
                                    "multifd_flushes": 0}
        self.commands: list[dict[str, Any]] = []
        self.ids: dict[int, tuple[str, int, int]] = {}
        self.eof = False
        self.trailing = 0
        self._tail_loaded = False
        self._last_block: dict[str, Any] | None = None
        self.footers: bool | None = None

    # -- configuration -------------------------------------------------------------------
    def _configuration(self) -> None:
        s = self.s
        at = s.offset - 1
        n = s.be32("configuration name length")
        if n > 256:
            raise s.error(f"corrupt stream: machine-type name length {n}", at + 1)
        raw = s.read(n, "configuration machine type")
        cfg: dict[str, Any] = {"offset": at, "machine": raw.decode("ascii", "replace"), "capabilities": [],
                               "target_page_bits": None, "uuid": None}
        while s.peek(1) == bytes([SEC_SUBSECTION]):
            s.u8("subsection")
            name = s.string("configuration subsection name")
            s.be32(f"{name} version")
            if name == "configuration/target-page-bits":
                cfg["target_page_bits"] = s.be32(name)
                self.page_size = 1 << cfg["target_page_bits"]
            elif name == "configuration/capabilities":
                count = s.be32("capability count")
                if count > 256:
                    raise s.error(f"corrupt stream: {count} capabilities")
                cfg["capabilities"] = [s.string("capability name") for _ in range(count)]
            elif name == "configuration/uuid":
                u = s.read(16, name).hex()
                cfg["uuid"] = f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
            elif self.vmdesc and self.vmdesc.get("configuration"):
                sub = next((x for x in self.vmdesc["configuration"].get("subsections", [])
                            if x.get("vmsd_name") == name), None)
                if sub is None:
                    raise s.error(f"unknown configuration subsection {name!r}")
                _vmsd_skip(s, sub, name)
            else:
                raise s.error(f"unknown configuration subsection {name!r}")
        self.config = cfg
        self.ram["mapped_ram"] = "mapped-ram" in cfg["capabilities"]

    # -- RAM -------------------------------------------------------------------------------
    def _block(self, name: str) -> dict[str, Any]:
        blocks: dict[str, dict[str, Any]] = self.ram["blocks"]
        if name not in blocks:
            blocks[name] = {"name": name, "length": None, "pages": 0, "zero_pages": 0, "bytes": 0}
        return blocks[name]

    def _mapped_ram_block(self, blk: dict[str, Any]) -> None:
        s = self.s
        version = s.be32("mapped-ram header version")
        if version != 1:
            raise s.error(f"unsupported mapped-ram header version {version}", s.offset - 4)
        page_size = s.be64("mapped-ram page size")
        if not 512 <= page_size <= 1 << 30 or page_size & (page_size - 1):
            raise s.error(f"implausible mapped-ram page size {page_size}", s.offset - 8)
        bitmap_offset = s.be64("mapped-ram bitmap offset")
        pages_offset = s.be64("mapped-ram pages offset")
        blk.update(bitmap_offset=bitmap_offset, pages_offset=pages_offset, page_size=page_size)
        if bitmap_offset == 0 and pages_offset == 0:
            blk["ignored"] = True       # shared block skipped (x-ignore-shared)
            return
        if s.file_base is None or self.fd is None:
            raise s.error("mapped-ram RAM block in a stream that is not a plain file")
        num_pages = blk["length"] // page_size
        nbytes = (num_pages + 7) // 8
        present = 0
        done = 0
        while done < nbytes:
            want = min(_CHUNK, nbytes - done)
            chunk = os.pread(self.fd, want, bitmap_offset + done)
            if len(chunk) < want:
                raise ImageError(f"truncated: mapped-ram bitmap of {blk['name']} is cut", bitmap_offset + done)
            if done + want == nbytes and num_pages % 8:
                chunk = chunk[:-1] + bytes([chunk[-1] & ((1 << (num_pages % 8)) - 1)])
            present += int.from_bytes(chunk, "little").bit_count()
            done += want
        blk["pages_present"] = present
        blk["pages"] = present
        blk["zero_pages"] = num_pages - present
        blk["bytes"] = present * page_size
        s.seek(pages_offset + blk["length"] - s.file_base, f"RAM block {blk['name']} page area")

    def _ram(self) -> None:
        s = self.s
        ignore_shared = bool(self.config and "x-ignore-shared" in self.config["capabilities"])
        mask = self.page_size - 1
        # QEMU's "last sent block" outlives a section: CONTINUE may refer to the previous one.
        block = self._last_block
        while True:
            if block is not None:
                self._skip_continued_pages(block)
            at = s.offset
            word = s.be64("RAM record")
            flags, addr = word & mask, word & ~mask
            if flags & RAM_MEM_SIZE:
                self._ram_blocks(addr, at, ignore_shared)
                flags &= ~RAM_MEM_SIZE
            if flags & (RAM_ZERO | RAM_PAGE):
                block = self._ram_page(flags, block, at)
                flags &= ~(RAM_ZERO | RAM_PAGE | RAM_CONTINUE)
            elif flags & (RAM_XBZRLE | RAM_HOOK | RAM_COMPRESS_PAGE):
                raise s.error(f"unsupported RAM encoding (flags {flags:#x})", at)
            if flags & RAM_MULTIFD_FLUSH:
                self.ram["multifd_flushes"] += 1
                flags &= ~RAM_MULTIFD_FLUSH
            if flags & RAM_EOS:
                return
            if flags:
                raise s.error(f"corrupt stream: unknown RAM flags {flags:#x}", at)

    def _skip_continued_pages(self, block: dict[str, Any]) -> None:
        """Fast path for the common records, pages continuing *block*: counted straight from the buffer
        (same checks, no per-field calls) while whole records are buffered; the rest is left to
        :meth:`_ram`'s general path."""
        s = self.s
        buf, pos = s._buf, s._pos
        page, mask, end = self.page_size, self.page_size - 1, len(s._buf)
        while end - pos >= 8 + page:
            flags = int.from_bytes(buf[pos:pos + 8], "big") & mask
            if flags == RAM_PAGE | RAM_CONTINUE:
                pos += 8 + page
                block["pages"] += 1
                block["bytes"] += page
            elif flags == RAM_ZERO | RAM_CONTINUE:
                pos += 9
                block["zero_pages"] += 1
            else:
                break
        s._pos = pos

    def _ram_blocks(self, total: int, at: int, ignore_shared: bool) -> None:
        """The MEM_SIZE record's list of RAM blocks (name, length …) adding up to *total* bytes."""
        s = self.s
        self.ram["total_bytes"] = total
        remaining = total
        while remaining > 0:
            blk = self._block(s.string("RAM block name"))
            blk["length"] = s.be64(f"RAM block {blk['name']} length")
            if blk["length"] == 0 or blk["length"] > remaining:
                raise s.error(f"corrupt stream: RAM block {blk['name']} length {blk['length']}", at)
            if ignore_shared:
                blk["mr_addr"] = s.be64("RAM block address")
            if self.ram["mapped_ram"]:
                self._mapped_ram_block(blk)
            remaining -= blk["length"]

    def _ram_page(self, flags: int, block: dict[str, Any] | None, at: int) -> dict[str, Any]:
        """One page record (data or zero) in *block* or the block it names; returns the block."""
        s = self.s
        if flags & RAM_CONTINUE:
            if block is None:
                raise s.error("corrupt stream: RAM page continues no block", at)
        else:
            block = self._block(s.string("RAM page block name"))
        if flags & RAM_ZERO:
            s.u8("zero page fill byte")
            block["zero_pages"] += 1
        else:
            s.skip(self.page_size, f"RAM page of {block['name']}")
            block["pages"] += 1
            block["bytes"] += self.page_size
        self._last_block = block
        return block

    # -- device sections -----------------------------------------------------------------
    def _load_tail(self) -> None:
        """Buffer the rest of the stream to find the vmstate description (streams only)."""
        self._tail_loaded = True
        if self.vmdesc is not None:
            return
        data = self.s.read_rest(TAIL_LIMIT, "device state")
        base = self.s.offset
        found = _find_vmdesc(data[self.s.buffered()[1]:])
        if found:
            p, n = found
            start = self.s.buffered()[1] + p + 5
            self._set_vmdesc(data[start:start + n], base + p + 5)
        if self.vmdesc is None:
            self.layout = "footer-scan"

    def _set_vmdesc(self, raw: bytes, offset: int) -> None:
        try:
            self.vmdesc = jsonload.loads(raw)
        except ValueError as exc:
            raise self.s.error(f"corrupt vmstate description: {exc}", offset) from None
        if not isinstance(self.vmdesc, dict) or not isinstance(self.vmdesc.get("devices"), list):
            raise self.s.error("corrupt vmstate description: no device list", offset)
        self.layout = "vmdesc"

    def _device(self, name: str, instance_id: int, section_id: int) -> None:
        s = self.s
        if not self._tail_loaded and self.vmdesc is None:
            self._load_tail()
        desc = None
        if self.vmdesc is not None:
            desc = next((d for d in self.vmdesc["devices"]
                         if d.get("name") == name and d.get("instance_id") == instance_id), None)
        if desc is not None:
            _vmsd_skip(s, desc, name)
            return
        # Footer scan: the first "0x7e be32 id" followed by a plausible header.
        if not self._tail_loaded:
            self._tail_loaded = True
            s.read_rest(TAIL_LIMIT, f"section {name}")
        data, pos = s.buffered()
        pat = bytes([SEC_FOOTER]) + section_id.to_bytes(4, "big")
        i = data.find(pat, pos)
        while i >= 0 and not _plausible_header(data, i + 5, set(self.ids)):
            i = data.find(pat, i + 1)
        if i < 0:
            raise s.error(f"cannot delimit section {name!r} (id {section_id}): no vmstate description "
                          "and no section footer found")
        self.layout = self.layout or "footer-scan"
        s.set_pos(s.offset + (i - pos))

    def _footer(self, section_id: int, name: str) -> None:
        s = self.s
        at = s.offset
        if self.footers is None:
            # Machine types before 2.4 send no footers; the first (self-delimited RAM) section tells.
            self.footers = s.peek(1) == bytes([SEC_FOOTER])
        if not self.footers:
            return
        t = s.u8(f"footer of section {name}")
        sid = s.be32(f"footer of section {name}")
        if t != SEC_FOOTER or sid != section_id:
            raise s.error(f"corrupt stream: section {name!r} (id {section_id}) does not end with its footer "
                          f"(found byte {t:#04x}, id {sid})", at)

    # -- main loop ---------------------------------------------------------------------------
    def walk(self) -> Iterator[Section]:
        s = self.s
        if s.read(4, "stream magic") != QEVM_MAGIC:
            raise s.error("not a QEMU migration stream: no QEVM magic", 0)
        version = s.be32("stream version")
        if version != QEVM_VERSION:
            raise s.error(f"unsupported QEMU stream version {version}", 4)
        while True:
            at = s.offset
            t = s.u8("section type")
            if t == SEC_EOF:
                self.eof = True
                self._after_eof()
                return
            if t == SEC_CONFIG:
                self._configuration()
                continue
            if t == SEC_COMMAND:
                cmd, n = s.be16("command"), s.be16("command length")
                s.skip(n, "command data")
                self.commands.append({"offset": at, "command": cmd, "name": COMMANDS.get(cmd, f"unknown({cmd})"),
                                      "length": n})
                continue
            if t not in SECTION_KINDS:
                raise s.error(f"corrupt stream: unknown section type {t:#04x}", at)
            sid = s.be32("section id")
            if t in (SEC_START, SEC_FULL):
                name = s.string("section name")
                inst, ver = s.be32("instance id"), s.be32("version id")
                self.ids[sid] = (name, inst, ver)
            elif sid in self.ids:
                name, inst, ver = self.ids[sid]
            else:
                raise s.error(f"corrupt stream: {SECTION_KINDS[t]} of unknown section id {sid}", at)
            if name == "ram":
                self._ram()
            else:
                self._device(name, inst, sid)
            self._footer(sid, name)
            yield Section(SECTION_KINDS[t], sid, name, inst, ver, at, s.offset - at)

    def _after_eof(self) -> None:
        s = self.s
        if not s.available(1):
            return
        at = s.offset
        if s.peek(1) == bytes([SEC_VMDESC]):
            s.u8("vmstate description")
            n = s.be32("vmstate description length")
            raw = s.read(n, "vmstate description")
            self.vmdesc_info = {"present": True, "offset": at, "length": n}
            if self.vmdesc is None:
                self._set_vmdesc(raw, at + 5)
        rest = 0
        while s.available(1):
            chunk = s.peek(_CHUNK)
            if chunk.strip(b"\0"):
                raise s.error("corrupt stream: unexpected data after the end of the stream")
            rest += len(chunk)
            s.skip(len(chunk), "padding")
        self.trailing = rest


class _Source:
    """Opens the stream part of an image: the file itself, or a decompressor's stdout."""

    def __init__(self, path: str | os.PathLike[str], header: Header) -> None:
        self.path = os.fspath(path)
        self.header = header
        self.proc: subprocess.Popen[bytes] | None = None
        self._errf: Any = None
        self.f = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self.size = os.fstat(self.f.fileno()).st_size
        fmt = header.format
        if fmt in ("raw", "sparse"):
            self.f.seek(header.stream_offset)
            self.stream = _Stream(self.f, size=self.size - header.stream_offset, seekable=True,
                                  file_base=header.stream_offset)
            return
        argv = DECOMPRESSORS.get(fmt)
        if argv is None:
            raise ImageError(f"cannot read image format {fmt}", offset=28)
        if shutil.which(argv[0]) is None:
            raise ImageError(f"image is {fmt}-compressed but {argv[0]} is not installed")
        self.f.seek(header.stream_offset)
        self._errf = tempfile.TemporaryFile()  # noqa: SIM115 - stderr must not block the pipe
        self.proc = subprocess.Popen(argv, stdin=self.f, stdout=subprocess.PIPE, stderr=self._errf)
        assert self.proc.stdout is not None
        self.stream = _Stream(self.proc.stdout, where=f" in the decompressed {fmt} stream")

    def check_decompressor(self) -> None:
        """After the whole stream was read: the decompressor must have succeeded."""
        if self.proc is None:
            return
        assert self.proc.stdout is not None
        while self.proc.stdout.read(_CHUNK):
            pass
        rc = self.proc.wait()
        if rc != 0:
            self._errf.seek(0)
            msg = self._errf.read(500).decode(errors="replace").strip().splitlines()
            raise ImageError(f"{self.header.format} stream is corrupt or truncated: "
                             f"{msg[-1] if msg else f'exit {rc}'}", offset=self.header.stream_offset)

    def explain(self, exc: ImageError) -> ImageError:
        """A stream error in a compressed image: say so when the decompressor failed (cut or corrupt file)."""
        if self.proc is None:
            return exc
        try:
            rc = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return exc              # still running: the data decompressed fine, the stream itself is bad
        if rc == 0:
            return exc
        self._errf.seek(0)
        msg = self._errf.read(500).decode(errors="replace").strip().splitlines()
        detail = msg[-1] if msg else f"exit {rc}"
        return ImageError(f"{self.header.format} data is truncated or corrupt ({detail}); "
                          f"the decompressed stream stops early: {exc}", offset=self.size)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()
            self._errf.close()
        self.f.close()


def _read_vmdesc_from_end(f: BinaryIO, size: int, stream_offset: int) -> tuple[dict[str, Any] | None, int]:
    """For plain files: the vmstate description from the file's end (analyze-migration.py's way)."""
    window = min(size - stream_offset, 16 * 1024 * 1024)
    if window <= 0:
        return None, 0
    data = os.pread(f.fileno(), window, size - window)
    found = _find_vmdesc(data)
    if not found:
        return None, 0
    p, n = found
    try:
        desc = jsonload.loads(data[p + 5:p + 5 + n])
    except ValueError:
        return None, 0
    if not isinstance(desc, dict) or not isinstance(desc.get("devices"), list):
        return None, 0
    return desc, size - window + p


def _open_walker(path: str | os.PathLike[str], allow_partial: bool) -> tuple[Header, _Source, _Walker]:
    header = read_header_path(path, allow_partial=allow_partial)
    src = _Source(path, header)
    try:
        vmdesc = None
        if src.proc is None:
            vmdesc, _ = _read_vmdesc_from_end(src.f, src.size, header.stream_offset)
        walker = _Walker(src.stream, file_fd=src.f.fileno() if src.proc is None else None, vmdesc=vmdesc)
    except BaseException:
        src.close()
        raise
    return header, src, walker


def iter_sections(path: str | os.PathLike[str], *, allow_partial: bool = False) -> Iterator[Section]:
    """Yield every section of the image's QEMU stream, in stream order (streaming, constant memory).

    Offsets are stream offsets (0 = the ``QEVM`` magic at ``header.stream_offset``).
    """
    _header, src, walker = _open_walker(path, allow_partial)
    try:
        try:
            yield from walker.walk()
        except ImageError as exc:
            raise src.explain(exc) from None
        src.check_decompressor()
    finally:
        src.close()


def _parse_xml(text: str, base: int, what: str) -> Any:
    """Parse XML stored at file offset *base*; a syntax error names the byte offset."""
    from lxml import etree

    try:
        # Untrusted input: no entity expansion, no network (SECURITY.md).
        return etree.fromstring(text.encode(), etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as exc:
        line, col = exc.position if exc.position else (1, 1)
        lines = text.encode().split(b"\n")
        off = sum(len(x) + 1 for x in lines[:max(line - 1, 0)]) + max(col - 1, 0)
        raise ImageError(f"corrupt image: {what} is not well-formed XML ({exc.msg})", offset=base + off) from None


def _domain_ids(header: Header) -> dict[str, str | None]:
    root = _parse_xml(header.xml, HEADER_SIZE, "domain XML")
    if header.cookie:
        _parse_xml(header.cookie, HEADER_SIZE + header.cookie_offset, "cookie")
    return {"name": root.findtext("name"), "uuid": root.findtext("uuid")}


def inspect_image(path: str | os.PathLike[str], *, allow_partial: bool = False) -> dict[str, Any]:
    """Everything virtsave can tell about a save image, as a JSON-friendly dict.

    Reads the libvirt header, XML and cookie, then walks the whole QEMU stream (through the
    decompressor for compressed images). Raises :class:`ImageError` naming the offset for
    truncated, corrupt, foreign or (unless *allow_partial*) partial images. With *allow_partial*,
    a partial image's stream is read as far as it goes: ``stream.complete`` is False and
    ``stream.stopped`` says where and why.
    """
    header, src, walker = _open_walker(path, allow_partial)
    try:
        domain = _domain_ids(header)
    except BaseException:
        src.close()
        raise
    sections: dict[int, dict[str, Any]] = {}
    stopped: str | None
    try:
        try:
            for sec in walker.walk():
                agg = sections.get(sec.section_id)
                if agg is None:
                    agg = sections[sec.section_id] = {
                        "id": sec.section_id, "name": sec.name, "instance_id": sec.instance_id,
                        "version_id": sec.version_id, "offset": sec.offset, "bytes": 0,
                        "count": {"start": 0, "part": 0, "end": 0, "full": 0}}
                agg["bytes"] += sec.length
                agg["count"][sec.kind] += 1
        except ImageError as exc:
            exc = src.explain(exc)
            if not header.partial:
                raise exc from None
            # A partial image (save in progress or failed): report how far the stream goes.
            stopped = str(exc)
        else:
            stopped = None
            src.check_decompressor()
        stream_len = walker.s.offset
    finally:
        src.close()
    if not walker.eof and stopped is None:
        stopped = str(ImageError("truncated: no end-of-stream marker", offset=header.stream_offset + stream_len))
        if not header.partial:
            raise ImageError("truncated: no end-of-stream marker", offset=header.stream_offset + stream_len)
    blocks = list(walker.ram["blocks"].values())
    ram = {
        "page_size": walker.page_size,
        "mapped_ram": walker.ram["mapped_ram"],
        "total_bytes": walker.ram["total_bytes"],
        "pages": sum(b["pages"] for b in blocks),
        "zero_pages": sum(b["zero_pages"] for b in blocks),
        "bytes": sum(b["bytes"] for b in blocks),
        "multifd_flushes": walker.ram["multifd_flushes"],
        "blocks": blocks,
    }
    device_keys = [(d.get("name"), d.get("instance_id")) for d in (walker.vmdesc or {}).get("devices", [])]
    full_keys = [(s["name"], s["instance_id"]) for s in sections.values() if s["count"]["full"]]
    vmdesc = dict(walker.vmdesc_info)
    if walker.vmdesc is not None:
        vmdesc.update(devices=len(device_keys), page_size=walker.vmdesc.get("page_size"),
                      matches_sections=device_keys == full_keys)
    return {
        "path": os.fspath(path),
        "size": src.size,
        "header": header.to_dict(),
        "domain": domain,
        "xml": header.xml,
        "cookie": header.cookie,
        "stream": {
            "offset": header.stream_offset,
            "compression": header.format if header.format not in ("raw", "sparse") else None,
            "magic": QEVM_MAGIC.decode(),
            "version": QEVM_VERSION,
            "length": stream_len,
            "layout": walker.layout or ("vmdesc" if walker.vmdesc is not None else None),
            "section_footers": bool(walker.footers),
            "configuration": walker.config,
            "sections": list(sections.values()),
            "commands": walker.commands,
            "ram": ram,
            "vmdesc": vmdesc,
            "trailing_zero_bytes": walker.trailing,
            "complete": stopped is None,
            "stopped": stopped,
        },
    }
