"""The parts of qemu.qmp that ``virtsave.qemu.qmp`` relies on and qemu.qmp does not promise.

``virtsave.qemu.qmp`` records every QMP message by overriding ``QMPClient._cb_outbound`` and
``QMPClient._cb_inbound`` (private hooks) and sends commands through ``QMPClient._raw`` (private:
it hands error replies back as replies). ``pyproject.toml`` pins qemu.qmp to the releases whose
source was read for this (0.0.3 … 0.0.6, the same hooks in each). When a new qemu.qmp changes them,
these tests fail by name, before a trace silently loses messages.

The behaviour tests talk to a fake QMP server in this process over a Unix socket: they check the
library's contract (every message passes the hooks, fds go out by SCM_RIGHTS ahead of their
command), not QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import socket
import threading
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import pytest
from packaging.requirements import Requirement
from qemu.qmp import ConnectError, ExecInterruptedError, QMPClient, QMPError, Runstate
from qemu.qmp.message import Message

from virtsave.qemu import qmp
from virtsave.trace import model as tr

REPO = Path(__file__).resolve().parents[2]


def _params(func: Any) -> list[str]:
    return list(inspect.signature(func).parameters)


# --- the pin -------------------------------------------------------------------------------------


def _pinned() -> Requirement:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    found = [Requirement(d) for d in deps if Requirement(d).name == "qemu.qmp"]
    assert len(found) == 1, deps
    return found[0]


def test_qemu_qmp_is_pinned_to_checked_releases():
    spec = _pinned().specifier
    assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), (
        f"qemu.qmp{spec} has no upper bound: a new release could change the private hooks unseen")


def test_installed_qemu_qmp_is_inside_the_pin():
    installed = metadata.version("qemu.qmp")
    req = _pinned()
    assert req.specifier.contains(installed, prereleases=True), (
        f"qemu.qmp {installed} is installed, pyproject.toml pins {req}: read its QMPClient hooks, "
        "run these tests against it, then move the pin")


# --- the private hooks' shape --------------------------------------------------------------------


def test_message_hooks_take_and_return_one_message():
    for hook in (QMPClient._cb_outbound, QMPClient._cb_inbound):
        assert _params(hook) == ["self", "msg"], f"{hook.__qualname__} changed: {inspect.signature(hook)}"
        assert not inspect.iscoroutinefunction(hook), f"{hook.__qualname__} became a coroutine"
    for name in ("_cb_outbound", "_cb_inbound"):
        assert name in vars(qmp._RecordingClient), f"virtsave no longer overrides {name}: update this test"


def test_raw_execute_and_helpers_keep_their_shape():
    assert _params(QMPClient._raw)[:2] == ["self", "msg"], inspect.signature(QMPClient._raw)
    assert _params(QMPClient.make_execute_msg)[:2] == ["cmd", "arguments"], \
        inspect.signature(QMPClient.make_execute_msg)
    assert _params(QMPClient.send_fd_scm) == ["self", "fd"], inspect.signature(QMPClient.send_fd_scm)
    assert _params(QMPClient.connect)[:2] == ["self", "address"], inspect.signature(QMPClient.connect)
    assert _params(QMPClient.disconnect) == ["self"], inspect.signature(QMPClient.disconnect)
    assert _params(QMPClient.__init__)[:2] == ["self", "name"], inspect.signature(QMPClient.__init__)
    assert isinstance(inspect.getattr_static(QMPClient, "runstate"), property)
    assert Runstate.RUNNING in Runstate
    for exc in (ConnectError, ExecInterruptedError):
        assert issubclass(exc, QMPError)
    msg = QMPClient.make_execute_msg("getfd", {"fdname": "x"})
    assert isinstance(msg, Message) and dict(msg) == {"execute": "getfd", "arguments": {"fdname": "x"}}


# --- the hooks' behaviour, against a fake QMP server ---------------------------------------------


class FakeQMPServer:
    """A QMP server thread: greets (offering oob), answers commands, emits STOP after ``stop``,
    answers ``boom`` with an error, hangs up after ``quit``. Records what it received."""

    GREETING: ClassVar[dict[str, Any]] = {
        "QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 99}, "package": "fake"},
                "capabilities": ["oob"]}}

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.received: list[tuple[dict[str, Any], int]] = []   # (command, fds that came before it)
        self.decoder = json.JSONDecoder()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            self._send(conn, self.GREETING)
            buf, fds = "", 0
            while True:
                data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
                if not data:
                    return
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        for fd in memoryview(payload).cast("i"):
                            os.close(fd)
                            fds += 1
                buf += data.decode()
                while buf.strip():
                    # QMP is a JSON stream, not lines (qemu.qmp sends no newline; an fd comes with a " ").
                    try:
                        cmd, end = self.decoder.raw_decode(buf.lstrip())
                    except json.JSONDecodeError:
                        break   # the rest of this command is still on its way
                    buf = buf.lstrip()[end:]
                    self.received.append((cmd, fds))
                    fds = 0
                    if not self._answer(conn, cmd):
                        return

    def _answer(self, conn: socket.socket, cmd: dict[str, Any]) -> bool:
        name, cid = cmd.get("execute"), cmd.get("id")
        if name == "boom":
            self._send(conn, {"error": {"class": "CommandNotFound", "desc": "The command boom has not been found"},
                              "id": cid})
            return True
        self._send(conn, {"return": {}, "id": cid})
        if name == "stop":
            self._send(conn, {"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"})
        return name != "quit"

    @staticmethod
    def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
        conn.sendall(json.dumps(obj).encode() + b"\r\n")

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FakeQMPServer]:
    srv = FakeQMPServer(tmp_path / "qmp.sock")
    try:
        yield srv
    finally:
        srv.close()


def _kinds(phase: tr.Phase) -> list[str]:
    out = []
    for m in phase["messages"]:
        key = {"command": "execute", "reply": "id", "event": "event"}[m["kind"]]
        out.append(f"{m['kind']}:{m[key] if m['kind'] != 'reply' else ('error' if 'error' in m else 'return')}")
    return out


def test_every_message_passes_the_hooks_in_wire_order(server: FakeQMPServer, tmp_path: Path):
    trace = tr.new_trace("direct", domain={"name": "fake"})
    phase = tr.add_phase(trace, "save", "save")
    with open(tmp_path / "image", "wb") as f, qmp.QMPSession(f"unix:{server.path}", connect_timeout=10) as s:
        assert s.greeting == FakeQMPServer.GREETING, "the greeting no longer passes _cb_inbound"
        s.record_into(phase)
        s.execute("stop")
        assert s.wait_event("STOP", timeout=10) is not None, "events no longer pass _cb_inbound"
        s.execute("getfd", {"fdname": "migrate"}, fds=[f.fileno()])
        rep = s.execute_raw("boom")
        assert rep["error"]["class"] == "CommandNotFound", "_raw no longer hands error replies back"
        with pytest.raises(qmp.QMPError, match="CommandNotFound"):
            s.execute("boom")
        s.quit()
        s.record_into(None)
    assert _kinds(phase) == ["command:stop", "reply:return", "event:STOP", "command:getfd", "reply:return",
                             "command:boom", "reply:error", "command:boom", "reply:error", "command:quit",
                             "reply:return"]
    cmds = list(tr.iter_commands(phase))
    assert [c.get("fds", 0) for c in cmds] == [0, 1, 0, 0, 0], "the fd count is no longer tied to its command"
    ids = [c["id"] for c in cmds]
    assert all(re.fullmatch(r"__qmp#\d+", str(i)) for i in ids) and len(set(ids)) == len(ids), ids
    replies = [m for m in phase["messages"] if m["kind"] == "reply"]
    assert [r["id"] for r in replies] == ids, "replies are no longer matched to their commands by id"
    # What QEMU saw: the negotiation (qemu.qmp asks for the oob it is offered), then our commands,
    # the fd ahead of the getfd that names it.
    got = [(c.get("execute"), n) for c, n in server.received]
    assert got == [("qmp_capabilities", 0), ("stop", 0), ("getfd", 1), ("boom", 0), ("boom", 0), ("quit", 0)]
    assert server.received[0][0].get("arguments") == {"enable": ["oob"]}


def test_hooks_see_each_message_once_as_a_message(server: FakeQMPServer):
    seen: list[tuple[str, Any]] = []

    class Counting(QMPClient):
        def _cb_outbound(self, msg: Message) -> Message:
            msg = super()._cb_outbound(msg)
            seen.append(("out", msg))
            return msg

        def _cb_inbound(self, msg: Message) -> Message:
            msg = super()._cb_inbound(msg)
            seen.append(("in", msg))
            return msg

    async def go() -> None:
        client = Counting("contract")
        await client.connect(str(server.path))
        assert client.runstate == Runstate.RUNNING
        await client.execute("stop")
        await client.execute("quit")
        with contextlib.suppress(EOFError, QMPError):
            await client.disconnect()

    asyncio.run(go())
    assert all(isinstance(m, Message) for _, m in seen)
    summary = [(d, m.get("execute") or m.get("event") or ("QMP" in m and "greeting") or "reply") for d, m in seen]
    assert summary == [("in", "greeting"), ("out", "qmp_capabilities"), ("in", "reply"), ("out", "stop"),
                       ("in", "reply"), ("in", "STOP"), ("out", "quit"), ("in", "reply")], summary
