"""A minimal client of libvirt's admin RPC protocol: read and set the daemon's log filters and outputs.

libvirt-python has no admin binding, and loading ``libvirt-admin.so`` next to it in-process was tried
and went wrong, so :mod:`virtsave.libvirtd.logcapture` used to run ``virt-admin`` — one process per
call, 15–60 ms each on a busy 2-core host, four of them around every traced operation. This module
speaks the same protocol ``virt-admin`` speaks, over the daemon's admin socket, in a few hundred
microseconds: the wire format is libvirt's generic RPC (``src/rpc/virnetprotocol.x``: a 4-byte length,
a 24-byte header, XDR payload) carrying the admin program (``src/admin/admin_protocol.x``). Only the
five procedures the log capture needs are spoken; answers are exactly what ``virt-admin`` prints
(it prints the daemon's string as it is; a NULL filter string as empty).

The admin socket is root-only (0700 directory, unix permissions are its authentication, as for
``virt-admin``). A keepalive ping the daemon may send is answered.

Example::

    >>> socket_for("libvirtd:///system")
    '/run/libvirt/libvirt-admin-sock'
    >>> socket_for("virtqemud:///system?socket=/tmp/x/admin-sock")
    '/tmp/x/admin-sock'
    >>> _xdr_string("3:remote")
    b'\\x00\\x00\\x00\\x083:remote'

    with AdminClient(socket_for("libvirtd:///system")) as adm:   # needs a daemon, as root
        print(adm.get_filters(), adm.get_outputs())
"""

from __future__ import annotations

import os
import socket
import struct
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

from virtsave.core.errors import ConnectionFailed, LogError

__all__ = ["AdminClient", "RpcError", "socket_for"]

ADMIN_PROGRAM = 0x06900690
ADMIN_VERSION = 1
KEEPALIVE_PROGRAM = 0x6B656570
KEEPALIVE_PING, KEEPALIVE_PONG = 1, 2
PROC_OPEN, PROC_CLOSE = 1, 2
PROC_GET_OUTPUTS, PROC_GET_FILTERS, PROC_SET_OUTPUTS, PROC_SET_FILTERS = 14, 15, 16, 17
CALL, REPLY, MESSAGE = 0, 1, 2
STATUS_OK, STATUS_ERROR = 0, 1
_HEADER = struct.Struct(">IIIiiIi")  # length, program, version, procedure, type, serial, status
MAX_MESSAGE = 64 * 1024 * 1024


class RpcError(ConnectionFailed):
    """The daemon answered a call with an error (its message, as ``virt-admin`` would print it)."""


def socket_for(admin_uri: str) -> str | None:
    """The admin socket behind *admin_uri* (``libvirtd:///system``, ``virtqemud:///session``,
    ``…?socket=PATH``), or None for a URI this client does not speak (remote transports)."""
    parts = urlsplit(admin_uri)
    query = parse_qs(parts.query)
    if "socket" in query:
        return query["socket"][0]
    if parts.hostname or "+" in parts.scheme or not parts.scheme:
        return None
    daemon = "libvirt" if parts.scheme == "libvirtd" else parts.scheme
    if parts.path == "/system":
        return f"/run/libvirt/{daemon}-admin-sock"
    if parts.path == "/session":
        runtime = os.environ.get("XDG_RUNTIME_DIR") or os.path.expanduser("~/.cache")
        return f"{runtime}/libvirt/{daemon}-admin-sock"
    return None


# -- XDR ------------------------------------------------------------------------------------------
def _xdr_string(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">I", len(data)) + data + b"\0" * (-len(data) % 4)


def _xdr_optional_string(value: str | None) -> bytes:
    return struct.pack(">I", 0) if value is None else struct.pack(">I", 1) + _xdr_string(value)


class _Reader:
    """Sequential XDR decoding of one payload."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise LogError("admin RPC answer is truncated")
        (v,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4
        return int(v)

    def string(self) -> str:
        n = self.u32()
        if self.pos + n > len(self.data):
            raise LogError("admin RPC answer is truncated")
        raw = self.data[self.pos:self.pos + n]
        self.pos += n + (-n % 4)
        return raw.decode(errors="replace")

    def optional_string(self) -> str | None:
        return self.string() if self.u32() else None


# -- the client -----------------------------------------------------------------------------------
class AdminClient:
    """One admin connection (open on ``__enter__``/:meth:`open`, closed by :meth:`close`)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._serial = 0

    def open(self) -> AdminClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise ConnectionFailed(f"cannot reach the daemon's admin socket {self.path}: "
                                   f"{exc.strerror or exc}") from None
        self._sock = sock
        try:
            self.call(PROC_OPEN, struct.pack(">I", 0))
        except BaseException:
            self._drop()
            raise
        return self

    def close(self) -> None:
        """Close the connection. No ``CONNECT_CLOSE`` call: the daemon frees a client whose socket
        closed (as for a killed ``virt-admin``), and a round trip less is a few ms on a busy host."""
        self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> AdminClient:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the procedures ----------------------------------------------------------------------------
    def get_filters(self) -> str:
        """The filters as ``virt-admin daemon-log-filters`` prints them (none: empty)."""
        r = _Reader(self.call(PROC_GET_FILTERS, struct.pack(">I", 0)))
        return r.optional_string() or ""

    def get_outputs(self) -> str:
        """The outputs as ``virt-admin daemon-log-outputs`` prints them."""
        return _Reader(self.call(PROC_GET_OUTPUTS, struct.pack(">I", 0))).string()

    def set_filters(self, value: str) -> None:
        """What ``virt-admin daemon-log-filters --filters VALUE`` sends (empty: none)."""
        self.call(PROC_SET_FILTERS, _xdr_optional_string(value) + struct.pack(">I", 0))

    def set_outputs(self, value: str) -> None:
        """What ``virt-admin daemon-log-outputs --outputs VALUE`` sends (empty: the default)."""
        self.call(PROC_SET_OUTPUTS, _xdr_optional_string(value) + struct.pack(">I", 0))

    # -- the wire ----------------------------------------------------------------------------------
    def call(self, procedure: int, payload: bytes = b"") -> bytes:
        """Send one call of the admin program, return its reply payload; an error reply raises."""
        if self._sock is None:
            raise ConnectionFailed("admin connection is not open")
        self._serial += 1
        serial = self._serial
        body = _HEADER.pack(_HEADER.size + len(payload), ADMIN_PROGRAM, ADMIN_VERSION, procedure, CALL,
                            serial, STATUS_OK) + payload
        try:
            self._sock.sendall(body)
            while True:
                program, proc, mtype, got_serial, status, data = self._receive()
                if program == KEEPALIVE_PROGRAM:
                    if proc == KEEPALIVE_PING:
                        self._sock.sendall(_HEADER.pack(_HEADER.size, KEEPALIVE_PROGRAM, 1, KEEPALIVE_PONG,
                                                        MESSAGE, 0, STATUS_OK))
                    continue
                if program == ADMIN_PROGRAM and mtype == REPLY and got_serial == serial:
                    break
        except OSError as exc:
            self._drop()
            raise ConnectionFailed(f"admin socket {self.path}: {exc.strerror or exc}") from None
        if status == STATUS_ERROR:
            raise RpcError(_error_message(data))
        if status != STATUS_OK:
            raise LogError(f"admin RPC procedure {procedure}: unexpected status {status}")
        return data

    def _receive(self) -> tuple[int, int, int, int, int, bytes]:
        assert self._sock is not None
        head = self._exactly(_HEADER.size)
        length, program, _version, proc, mtype, serial, status = _HEADER.unpack(head)
        if not _HEADER.size <= length <= MAX_MESSAGE:
            raise LogError(f"admin RPC message of implausible length {length}")
        return program, proc, mtype, serial, status, self._exactly(length - _HEADER.size)

    def _exactly(self, n: int) -> bytes:
        assert self._sock is not None
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionFailed(f"the daemon closed its admin socket {self.path}")
            buf += chunk
        return bytes(buf)


def _error_message(data: bytes) -> str:
    """The message of a ``virNetMessageError`` payload (code, domain, optional message, …)."""
    r = _Reader(data)
    try:
        r.u32()
        r.u32()
        return r.optional_string() or "unknown error"
    except LogError:
        return "unknown error (undecodable error reply)"
