"""The admin RPC client against a small in-process daemon stand-in speaking libvirt's wire format.

The real daemon is the judge in tests/integration/test_logsettings.py (``virt-admin`` must show the
settings byte for byte after every trace, and the capture now goes through this client); here the
framing, the XDR encoding, error replies and keepalive pings are checked without a daemon.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtsave.core.errors import ConnectionFailed
from virtsave.libvirtd import adminrpc
from virtsave.libvirtd.logcapture import AdminRunner

HEADER = struct.Struct(">IIIiiIi")


def xdr_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">I", len(b)) + b + b"\0" * (-len(b) % 4)


def read_string(data: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from(">I", data, pos)
    return data[pos + 4:pos + 4 + n].decode(), pos + 4 + n + (-n % 4)


class FakeDaemon(threading.Thread):
    """Answers admin calls from its own filters/outputs; records every call; can ping first."""

    def __init__(self, path: Path, filters: str | None = "", outputs: str = "3:stderr", ping: bool = False) -> None:
        super().__init__(daemon=True)
        self.filters, self.outputs, self.ping = filters, outputs, ping
        self.calls: list[tuple[int, int, int, bytes]] = []  # (proc, type, serial, payload)
        self.pongs = 0
        self.connections = 0
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(4)

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        while head := f.read(HEADER.size):
            length, prog, _vers, proc, mtype, serial, _status = HEADER.unpack(head)
            payload = f.read(length - HEADER.size)
            if prog == adminrpc.KEEPALIVE_PROGRAM:
                self.pongs += proc == adminrpc.KEEPALIVE_PONG
                continue
            self.calls.append((proc, mtype, serial, payload))
            if self.ping and proc == adminrpc.PROC_GET_FILTERS:
                conn.sendall(HEADER.pack(HEADER.size, adminrpc.KEEPALIVE_PROGRAM, 1, adminrpc.KEEPALIVE_PING,
                                         adminrpc.MESSAGE, 0, 0))
            status, body = self.answer(proc, payload)
            conn.sendall(HEADER.pack(HEADER.size + len(body), prog, 1, proc, adminrpc.REPLY, serial, status) + body)

    def answer(self, proc: int, payload: bytes) -> tuple[int, bytes]:
        if proc == adminrpc.PROC_GET_FILTERS:
            opt = struct.pack(">I", 0) if self.filters is None else struct.pack(">I", 1) + xdr_string(self.filters)
            return 0, opt + struct.pack(">I", 1)
        if proc == adminrpc.PROC_GET_OUTPUTS:
            return 0, xdr_string(self.outputs) + struct.pack(">I", 1)
        if proc in (adminrpc.PROC_SET_FILTERS, adminrpc.PROC_SET_OUTPUTS):
            (present,) = struct.unpack_from(">I", payload, 0)
            value, _ = read_string(payload, 4) if present else ("", 4)
            if value.startswith("bad"):  # an error reply: code, domain, message, level, …
                return 1, struct.pack(">iiI", 1, 49, 1) + xdr_string(f"invalid {value!r}") + b"\0" * 40
            if proc == adminrpc.PROC_SET_FILTERS:
                self.filters = value
            else:
                self.outputs = value
        return 0, b""

    def stop(self) -> None:
        self.srv.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    d = FakeDaemon(tmp_path / "admin-sock")
    d.start()
    yield d
    d.stop()


def test_socket_paths_of_admin_uris(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert adminrpc.socket_for("libvirtd:///system") == "/run/libvirt/libvirt-admin-sock"
    assert adminrpc.socket_for("virtqemud:///system") == "/run/libvirt/virtqemud-admin-sock"
    assert adminrpc.socket_for("libvirtd:///session") == "/run/user/1000/libvirt/libvirt-admin-sock"
    assert adminrpc.socket_for("libvirtd:///system?socket=/x/s") == "/x/s"
    assert adminrpc.socket_for("libvirtd+ssh://host/system") is None
    assert adminrpc.socket_for("libvirtd:///elsewhere") is None


def test_reads_and_sets_settings_in_order_on_one_connection(daemon: FakeDaemon) -> None:
    with adminrpc.AdminClient(str(daemon.srv.getsockname())) as adm:
        assert adm.get_filters() == ""
        adm.set_outputs("1:file:/x/capture.log 3:stderr")
        adm.set_filters("1:monitor 3:remote")
        assert (adm.get_filters(), adm.get_outputs()) == ("1:monitor 3:remote", "1:file:/x/capture.log 3:stderr")
    procs = [c[0] for c in daemon.calls]
    assert procs == [adminrpc.PROC_OPEN, adminrpc.PROC_GET_FILTERS, adminrpc.PROC_SET_OUTPUTS,
                     adminrpc.PROC_SET_FILTERS, adminrpc.PROC_GET_FILTERS, adminrpc.PROC_GET_OUTPUTS]
    assert [c[2] for c in daemon.calls] == list(range(1, 7))  # serials count up
    assert all(c[1] == adminrpc.CALL for c in daemon.calls)
    # set_filters sends a present (non-NULL) string, then flags 0
    set_filters = daemon.calls[3][3]
    assert set_filters == struct.pack(">I", 1) + xdr_string("1:monitor 3:remote") + struct.pack(">I", 0)


def test_empty_value_is_sent_as_an_empty_string_and_null_filters_read_as_empty(daemon: FakeDaemon) -> None:
    daemon.filters = None
    with adminrpc.AdminClient(str(daemon.srv.getsockname())) as adm:
        assert adm.get_filters() == ""
        adm.set_filters("")
    assert daemon.calls[2][3] == struct.pack(">III", 1, 0, 0)
    assert daemon.filters == ""


def test_error_reply_raises_with_the_daemons_message(daemon: FakeDaemon) -> None:
    with adminrpc.AdminClient(str(daemon.srv.getsockname())) as adm:
        with pytest.raises(adminrpc.RpcError, match="invalid 'bad:filter'"):
            adm.set_filters("bad:filter")
        assert adm.get_outputs() == "3:stderr"  # the connection stays usable


def test_keepalive_ping_is_answered(tmp_path: Path) -> None:
    d = FakeDaemon(tmp_path / "s", ping=True)
    d.start()
    try:
        with adminrpc.AdminClient(str(tmp_path / "s")) as adm:
            assert adm.get_filters() == ""
            assert adm.get_outputs() == "3:stderr"
        assert d.pongs == 1
    finally:
        d.stop()


def test_unreachable_socket_is_a_connection_failure(tmp_path: Path) -> None:
    with pytest.raises(ConnectionFailed, match="admin socket"):
        adminrpc.AdminClient(str(tmp_path / "none")).open()


def test_admin_runner_speaks_rpc_unless_told_to_run_virt_admin(daemon: FakeDaemon,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    runner = AdminRunner(f"libvirtd:///system?socket={daemon.srv.getsockname()}")
    monkeypatch.delenv("VIRTSAVE_ADMIN_CLIENT")
    assert runner.socket == daemon.srv.getsockname()
    assert runner.set_settings("1:monitor", "1:file:/c", outputs_first=True) == ("1:monitor", "1:file:/c")
    assert [c[0] for c in daemon.calls][1:3] == [adminrpc.PROC_SET_OUTPUTS, adminrpc.PROC_SET_FILTERS]
    monkeypatch.setenv("VIRTSAVE_ADMIN_CLIENT", "virt-admin")  # the unit tests' stub: fails loudly
    assert runner.socket is None
    with pytest.raises(ConnectionFailed, match="virt-admin"):
        runner.get_settings()


def test_a_held_runner_makes_its_calls_on_one_connection(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIRTSAVE_ADMIN_CLIENT")
    runner = AdminRunner(f"libvirtd:///system?socket={daemon.srv.getsockname()}")
    with runner.held():
        runner.get_settings()
        runner.set_settings("1:monitor", None, outputs_first=False)
        runner.get_settings()
    runner.get_settings()  # outside: a connection of its own
    assert daemon.connections == 2
    assert [c[0] for c in daemon.calls].count(adminrpc.PROC_OPEN) == 2
