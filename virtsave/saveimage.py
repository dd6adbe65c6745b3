"""libvirt's QEMU save-image format: the 92-byte header, domain XML and cookie.

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
import struct
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

from .errors import ImageError

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (as recorded in traces' ``image.header``)."""
        d = asdict(self)
        d.pop("xml")
        d.pop("cookie")
        d.update(format=self.format, partial=self.partial, stream_offset=self.stream_offset)
        return d


def read_header(f: BinaryIO, *, allow_partial: bool = True) -> Header:
    """Decode the header, XML and cookie from the start of *f*.

    Raises :class:`ImageError` naming the offset for a truncated, foreign or corrupt image.
    """
    raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise ImageError(f"truncated: header needs {HEADER_SIZE} bytes, file has {len(raw)}", offset=len(raw))
    magic, version, data_len, was_running, compressed, cookie_offset, *_ = _HEADER.unpack(raw)
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
    data = f.read(data_len)
    if len(data) < data_len:
        raise ImageError(f"truncated: XML area needs {data_len} bytes, file has {len(data)}",
                         offset=HEADER_SIZE + len(data))
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
    return Header(magic.decode(), version, data_len, bool(was_running), compressed, cookie_offset, xml, cookie)


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


def finalize(fd: int) -> None:
    """Flip the magic of a finished image from ``LibvirtQemudPart`` to ``LibvirtQemudSave``.

    Call only after the stream is complete and synced: libvirt's promise is that a
    complete magic means a complete image.
    """
    os.fsync(fd)
    if os.pread(fd, 16, 0) != MAGIC_PARTIAL:
        raise ImageError("refusing to finalize: image does not start with LibvirtQemudPart", offset=0)
    os.pwrite(fd, MAGIC, 0)
    os.fsync(fd)
