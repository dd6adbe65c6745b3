"""A direct, recorded QMP session on ``qemu.qmp``.

:class:`QMPSession` wraps :class:`qemu.qmp.QMPClient` (the official client) in a
synchronous API: the asyncio loop runs in a private thread, so events are read and
recorded the moment QEMU sends them, even while the caller sleeps or blocks. Every
command (with the number of fds passed along by SCM_RIGHTS), reply and event is
appended to the phase given to :meth:`QMPSession.record_into` in the trace format of
:mod:`virtsave.trace.model` (source ``direct``); ids are qemu.qmp's own (``__qmp#00001``).

Addresses: ``unix:PATH`` (or a bare path) and ``tcp:HOST:PORT``. Only Unix sockets
can pass fds.

Example::

    from virtsave.qemu import qmp
    from virtsave.trace import model as trace
    tr = trace.new_trace("direct", domain={"name": "g"})
    ph = trace.add_phase(tr, "save", "save")
    with qmp.QMPSession("unix:/run/virtsave/x/qmp.sock") as s:
        s.record_into(ph)
        s.execute("stop")
        s.execute("getfd", {"fdname": "migrate"}, fds=[fd])
        s.execute("migrate", {"uri": "fd:migrate"})
        s.wait_migration()
        s.quit()
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, QMPClient, Runstate
from qemu.qmp import QMPError as _LibQMPError
from qemu.qmp.message import Message

from virtsave.core.errors import ConnectionFailed, QMPError
from virtsave.trace import model as _trace

T = TypeVar("T")
# qemu.qmp logs connection retries at ERROR level; virtsave reports errors itself.
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())

#: Migration states after which nothing more happens.
FINAL_STATUSES = ("completed", "failed", "cancelled")


def parse_address(address: str) -> str | tuple[str, int]:
    """``unix:PATH`` / bare path → path; ``tcp:HOST:PORT`` → (host, port)."""
    if address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        if not host or not port.isdigit():
            raise ConnectionFailed(f"bad QMP address {address!r} (want tcp:HOST:PORT)")
        return host.strip("[]"), int(port)
    if address.startswith("unix:"):
        address = address[5:]
    if not address:
        raise ConnectionFailed("empty QMP address")
    return address


class _RecordingClient(QMPClient):
    """QMPClient whose outbound/inbound hooks feed the owning session's recorder."""

    def __init__(self, session: QMPSession) -> None:
        super().__init__("virtsave")
        self._session = session

    def _cb_outbound(self, msg: Message) -> Message:
        msg = super()._cb_outbound(msg)
        self._session._record_out(msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        msg = super()._cb_inbound(msg)
        self._session._record_in(msg)
        return msg


class QMPSession:
    """One recorded QMP connection (synchronous facade over qemu.qmp)."""

    def __init__(self, address: str, *, connect_timeout: float = 30.0,
                 alive: Callable[[], bool] | None = None) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self._alive = alive
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="virtsave-qmp", daemon=True)
        self._client: _RecordingClient | None = None
        self._lock = threading.Condition()
        self._phase: _trace.Phase | None = None
        self._t0: float | None = None
        self._pending_fds = 0
        #: Every event seen since connect: (monotonic time, message dict).
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.greeting: dict[str, Any] | None = None
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> QMPSession:
        if self._client is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def connect(self) -> QMPSession:
        """Connect (retrying until the socket exists or *connect_timeout*) and negotiate."""
        if not self._thread.is_alive():
            self._thread.start()
        addr = parse_address(self.address)
        deadline = time.monotonic() + self.connect_timeout
        last: BaseException | None = None
        while True:
            if isinstance(addr, str) and not os.path.exists(addr):
                last = FileNotFoundError(f"no socket at {addr}")
                if self._alive is not None and not self._alive():
                    raise ConnectionFailed(f"QEMU exited before creating its QMP socket {addr}")
                if time.monotonic() >= deadline:
                    raise ConnectionFailed(f"cannot connect to QMP at {self.address}: {last}")
                time.sleep(0.02)
                continue
            client = _RecordingClient(self)
            try:
                self._run(client.connect(addr), timeout=max(1.0, deadline - time.monotonic()))
                self._client = client
                return self
            except (ConnectError, OSError, TimeoutError) as exc:
                last = exc
            if self._alive is not None and not self._alive():
                raise ConnectionFailed(f"QEMU exited before its QMP socket {self.address} answered")
            if time.monotonic() >= deadline:
                cause = getattr(last, "exc", last)
                raise ConnectionFailed(f"cannot connect to QMP at {self.address}: {cause}") from None
            time.sleep(0.05)

    def close(self) -> None:
        """Disconnect (an EOF after ``quit`` is expected and ignored) and stop the loop thread."""
        if self.closed:
            return
        self.closed = True
        if self._client is not None:
            with contextlib.suppress(EOFError, OSError, _LibQMPError, TimeoutError, asyncio.CancelledError):
                self._run(self._client.disconnect(), timeout=10)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()

    @property
    def connected(self) -> bool:
        """True while the QMP connection is up (False after QEMU hung up or :meth:`close`)."""
        return not self.closed and self._client is not None and self._client.runstate == Runstate.RUNNING

    # -- recording ---------------------------------------------------------------------------
    def record_into(self, phase: _trace.Phase | None) -> None:
        """Append every following message to *phase* (None: stop recording)."""
        with self._lock:
            self._phase = phase
            self._t0 = None

    @contextlib.contextmanager
    def unrecorded(self) -> Iterator[None]:
        """Messages inside the block are not recorded; the phase (and its clock) resume after it."""
        with self._lock:
            phase, self._phase = self._phase, None
        try:
            yield
        finally:
            with self._lock:
                self._phase = phase

    def _t(self) -> float:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        return now - self._t0

    def _record_out(self, msg: Message) -> None:
        with self._lock:
            fds, self._pending_fds = self._pending_fds, 0
            if self._phase is None:
                return
            out: dict[str, Any] = dict(msg)  # QMP messages are JSON objects: untyped values
            name = out.get("execute") or out.get("exec-oob")
            args = copy.deepcopy(out["arguments"]) if "arguments" in out else None
            self._phase["messages"].append(_trace.command(str(name), args, id=out.get("id"), fds=fds,
                                                          t=self._t()))

    def _record_in(self, msg: Message) -> None:
        data: dict[str, Any] = dict(msg)
        with self._lock:
            if "QMP" in data:
                self.greeting = data
                return
            if "event" in data:
                self.events.append((time.monotonic(), data))
                self._lock.notify_all()
            if self._phase is None:
                return
            t = self._t()
            if "event" in data:
                self._phase["messages"].append(_trace.event(data["event"], copy.deepcopy(data.get("data")),
                                                            data.get("timestamp"), t=t))
            elif "error" in data:
                self._phase["messages"].append(_trace.reply(data.get("id"), error=data["error"], t=t))
            else:
                self._phase["messages"].append(_trace.reply(data.get("id"), ret=copy.deepcopy(data.get("return")),
                                                            t=t))

    # -- commands ----------------------------------------------------------------------------
    def _client_or_fail(self) -> _RecordingClient:
        if self._client is None or self.closed:
            raise QMPError(f"QMP session {self.address} is not connected")
        return self._client

    def execute_raw(self, cmd: str, args: dict[str, Any] | None = None, fds: Iterable[int] | None = None,
                    timeout: float | None = 300) -> dict[str, Any]:
        """Send *cmd* (fds first, by SCM_RIGHTS) and return the whole reply (``return`` or ``error``)."""
        client = self._client_or_fail()
        fd_list = list(fds or ())

        async def go() -> dict[str, Any]:
            # In the loop thread: the fds go out right before the command's bytes, so
            # QEMU attaches them to this command (getfd / add-fd).
            for fd in fd_list:
                client.send_fd_scm(fd)
            with self._lock:
                self._pending_fds = len(fd_list)
            msg = client.make_execute_msg(cmd, args)
            return dict(await client._raw(msg))  # _raw: keeps error replies as replies

        try:
            return self._run(go(), timeout)
        except ExecInterruptedError as exc:
            raise QMPError(f"{cmd}: QMP connection lost ({exc})") from None
        except (_LibQMPError, OSError, EOFError) as exc:
            raise QMPError(f"{cmd}: {exc}") from None
        except TimeoutError:
            raise QMPError(f"{cmd}: no reply within {timeout} s") from None

    def execute(self, cmd: str, args: dict[str, Any] | None = None, fds: Iterable[int] | None = None,
                timeout: float | None = 300) -> Any:
        """Send *cmd* and return its ``return`` value; an error reply raises :class:`QMPError`."""
        rep = self.execute_raw(cmd, args, fds, timeout)
        if "error" in rep:
            err = rep["error"]
            raise QMPError(f"{cmd}: {err.get('class', 'Error')}: {err.get('desc', err)}")
        return rep.get("return")

    def quit(self) -> None:
        """Send ``quit``; QEMU answers, then hangs up (expected)."""
        with contextlib.suppress(QMPError):
            self.execute_raw("quit", timeout=30)

    # -- events ------------------------------------------------------------------------------
    def event_mark(self) -> int:
        """An index into :attr:`events`; pass it as *since* to wait for later events only."""
        with self._lock:
            return len(self.events)

    def wait_event(self, name: str, predicate: Callable[[dict[str, Any]], bool] | None = None,
                   timeout: float | None = 60.0, since: int = 0) -> dict[str, Any] | None:
        """Wait for event *name* (index ≥ *since*) satisfying *predicate*; None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        i = since
        with self._lock:
            while True:
                while i < len(self.events):
                    ev = self.events[i][1]
                    i += 1
                    if ev.get("event") == name and (predicate is None or predicate(ev)):
                        return ev
                if not self.connected:
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                # Wake up now and then to notice a QEMU that died without a word.
                self._lock.wait(min(left, 0.5) if left is not None else 0.5)

    def wait_migration(self, statuses: Iterable[str] = FINAL_STATUSES, *, since: int = 0,
                       timeout: float | None = None, poll: float | None = None,
                       progress: Callable[[dict[str, Any]], None] | None = None) -> str:
        """Wait, like libvirt, for a ``MIGRATION`` event whose status is in *statuses*.

        Needs ``migrate-set-capabilities events:true``. With *poll* (seconds) or *progress*
        also polls ``query-migrate`` (recorded) and hands each answer to *progress*; polling
        alone also catches the end when events are off. Returns the status.
        """
        wanted = tuple(statuses)
        if progress is not None and poll is None:
            poll = 0.25
        deadline = None if timeout is None else time.monotonic() + timeout
        mark = since
        while True:
            step = poll if poll is not None else 1.0
            if deadline is not None:
                step = min(step, max(0.0, deadline - time.monotonic()))
            ev = self.wait_event("MIGRATION", lambda e: (e.get("data") or {}).get("status") in wanted,
                                 timeout=step, since=mark)
            if ev is not None:
                if progress is not None:  # a last report, so even a quick migration shows its total
                    with contextlib.suppress(QMPError):
                        progress(self.execute("query-migrate") or {})
                return str(ev["data"]["status"])
            if poll is not None:
                info = self.execute("query-migrate")
                if progress is not None:
                    progress(info or {})
                status = (info or {}).get("status")
                if status in wanted:
                    return str(status)
            if not self.connected:
                raise QMPError("QMP connection lost while waiting for the migration (did QEMU exit?)")
            if deadline is not None and time.monotonic() >= deadline:
                raise QMPError(f"migration did not reach {'/'.join(wanted)} within {timeout} s")
