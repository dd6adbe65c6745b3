"""Streaming parser for libvirtd debug logs: QMP conversations per monitor, attributed to domains.

libvirtd logs every monitor probe (filter ``1:monitor``)::

    2026-11-25 18:58:12.820+0000: 3968: info : qemuMonitorSend:861 : QEMU_MONITOR_SEND_MSG: mon=0x7f.. msg={json}\\r
     fd=-1
    ...: QEMU_MONITOR_IO_WRITE: mon=0x7f.. buf={json}\\r
     len=48 ret=48 errno=0
    ...: QEMU_MONITOR_IO_SEND_FD: mon=0x7f.. fd=32 ret=73 errno=0
    ...: QEMU_MONITOR_RECV_REPLY: mon=0x7f.. reply={json}
    ...: QEMU_MONITOR_RECV_EVENT: mon=0x7f.. event={json}
    ...: QEMU_MONITOR_NEW: mon=0x7f.. fd=34      /  QEMU_MONITOR_CLOSE: mon=0x7f..

Attribution (monitor → vm → domain name) uses the debug lines ``mon:0x… vm:0x…`` (qemuMonitor* API
entry points, present even with the monitor-only filter) and any line carrying ``vm=0x… name=NAME``
(``Starting job: API=… (vm=0x… name=NAME``, ``qemuProcessStart``/``Init``/``Launch``), which need the
richer filters ``1:job 1:qemu.qemu_process``. Source line numbers are never used.

Monitor *instances*: libvirt reuses a freed monitor's pointer for the next monitor. A pointer seen
again after ``QEMU_MONITOR_CLOSE`` (or a second ``QEMU_MONITOR_NEW``) starts a new instance. The
first instance of a pointer is keyed by the pointer itself (``0x7f06e4005180``), later ones get a
``#N`` suffix (``0x7f06e4005180#2``).

Phases (see :func:`build_phases` and :func:`_spans`):

* save phase — anchored on a ``migrate`` command. With job lines in the log it runs from the first to
  the last command the same libvirt job (e.g. ``remoteDispatchDomainManagedSave``) sent, including
  commands other jobs slipped in between (a ``query-migrate`` of ``virsh domjobinfo``). Without them:
  from the first of the contiguous ``query-migrate``/``stop``/``migrate-set-*``/``getfd``/``add-fd``/
  ``query-fdsets`` before ``migrate`` to the last of the tail after it (``query-*``, capability and
  parameter reset, ``cont`` after a failure …). It then extends over the replies and events up to the
  next command, or to the monitor's close.
* restore phase — a monitor instance whose conversation holds ``migrate-incoming``: from its first
  message (``qmp_capabilities``) to the end of the restore (same job, or the ``qom-list``/``query-block``/
  ``cont`` tail). When a later save happens on the same instance, the restore phase runs up to that
  save's start, so no message between two phases of the domain is dropped.
* ``operation``: ``managed-save``/``save``/``restore``/``start`` from the job API
  (:data:`OPERATIONS`), else the phase name; ``ok``/``error`` from the job's return value and error
  line when logged, MIGRATION events, ``query-migrate`` status/``error-desc`` and error replies.

Messages of the selected monitors inside the window (``since``/``until``, default: from the first phase
start to the last phase end) that fall in no phase are counted in ``trace["log"]["unphased"]``; the
fixture tests assert it is 0.

Host versions: libvirt's banner (``libvirt version: …``, ``hostname: …``, logged when an output opens
and by each QEMU child before exec) and the QMP greeting libvirt logs as ``Line [{"QMP": …}]``.

Memory and speed: :func:`iter_records` is a generator over the file's lines; :func:`scan` (the same
logic inlined, checked against the record-based reference in the tests) keeps one small summary per
monitor instance; :func:`trace_from_log` makes two passes and keeps only the selected monitors'
messages. :func:`parse_bytes_per_second` and :func:`generate_log` serve the benchmark.

Example::

    >>> tr = trace_from_log("tests/fixtures/libvirt-9.0-attributed/managedsave-running.log")
    >>> [m["execute"] for m in tr["phases"][0]["messages"] if m["kind"] == "command"][:2]
    ['query-migrate', 'stop']
"""

from __future__ import annotations

import calendar
import datetime as _dt
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from virtsave.core import jsonload
from virtsave.core.errors import AmbiguousMonitor, LogError
from virtsave.trace import model as _trace

# Job API (remote dispatcher name) → virtsave operation name.
OPERATIONS = {
    "remoteDispatchDomainManagedSave": "managed-save",
    "remoteDispatchDomainSave": "save",
    "remoteDispatchDomainSaveFlags": "save",
    "remoteDispatchDomainSaveParams": "save",
    "remoteDispatchDomainRestore": "restore",
    "remoteDispatchDomainRestoreFlags": "restore",
    "remoteDispatchDomainRestoreParams": "restore",
    "remoteDispatchDomainCreate": "start",
    "remoteDispatchDomainCreateWithFlags": "start",
    "remoteDispatchDomainCreateWithFiles": "start",
}

# Commands libvirt sends before ``migrate`` in a save (qemuMigrationSrcToFile and its callers).
SAVE_PREP = frozenset({
    "query-migrate", "stop", "migrate-set-capabilities", "migrate-set-parameters", "getfd", "add-fd",
    "query-fdsets", "query-migrate-capabilities", "query-migrate-parameters", "closefd", "remove-fd",
})
# Commands after ``migrate`` that still belong to the save (stats, reset, failure handling).
SAVE_TAIL = frozenset({
    "query-migrate", "query-fdsets", "migrate-set-capabilities", "migrate-set-parameters", "cont",
    "migrate_cancel", "remove-fd", "closefd", "query-migrate-parameters", "query-status",
})
# Commands after ``migrate-incoming`` that still belong to the restore.
RESTORE_TAIL = frozenset({
    "qom-list", "qom-get", "query-block", "cont", "query-migrate", "query-fdsets", "remove-fd", "closefd",
    "migrate-set-capabilities", "migrate-set-parameters", "query-status", "query-named-block-nodes",
})
NOTABLE = frozenset({
    "migrate", "migrate-incoming", "stop", "cont", "getfd", "add-fd", "quit", "qmp_capabilities",
    "migrate_cancel", "human-monitor-command", "system_reset", "system_powerdown",
})

_NOTABLE_B = frozenset(n.encode() for n in NOTABLE)
_RE_EXEC = re.compile(rb'"exec(?:ute|-oob)"\s*:\s*"([^"]+)"')
_RE_URI = re.compile(rb'"uri"\s*:\s*"([^"]*)"')
_RE_STATUS = re.compile(rb'"status"\s*:\s*"([^"]*)"')
_RE_EVNAME = re.compile(rb'"event"\s*:\s*"([^"]+)"')
_RE_VMNAME = re.compile(rb"vm=(0x[0-9a-fA-F]+),? name=([^ ,)\r\n]+)")
_RE_MONVM = re.compile(rb"mon:(0x[0-9a-fA-F]+) vm:(0x[0-9a-fA-F]+|\(nil\))")
_RE_JOB = re.compile(rb"Starting job: API=(\w+)")
# Numbers in log lines: at most 18 digits (a longer run is garbage, not a number Python may refuse to convert).
_RE_JOBEND = re.compile(rb"Thread (\d{1,18}) \([^)]*\) finished job (\w+) with ret=(-?\d{1,18})(?!\d)")
_RE_PATH = re.compile(rb"(?:migratePath|incoming\.path)=(/\S+)")
_RE_LIBVIRT_VERSION = re.compile(rb"libvirt version: ([0-9][0-9.]*)")
_RE_QEMU_VERSION = re.compile(rb"qemu version: ([0-9][0-9.]*[0-9])")
_RE_HOSTNAME = re.compile(rb"hostname: (\S+)")
_RE_ERRNO = re.compile(rb"errno=(-?\d{1,18})(?!\d)")
_RE_FD = re.compile(rb"fd=(-?\d{1,18})(?!\d)")


class _Clock:
    """Log timestamp → epoch float, caching the per-second part (the expensive one)."""

    def __init__(self) -> None:
        self.cache: dict[bytes, int] = {}
        self.ms: dict[bytes, float | None] = {}     # whole "YYYY-MM-DD HH:MM:SS.mmm+ZZZZ" → epoch

    def __call__(self, line: bytes) -> float | None:
        stamp = line[:28]
        t = self.ms.get(stamp, -1.0)
        if t != -1.0:
            return t
        if len(self.ms) > 20_000:
            self.ms.clear()
        t = self.ms[stamp] = self._slow(line)
        return t

    def _slow(self, line: bytes) -> float | None:
        key = line[:19] + line[23:28]
        base = self.cache.get(key)
        if base is None:
            try:
                y, mo, d = int(line[0:4]), int(line[5:7]), int(line[8:10])
                h, mi, s = int(line[11:13]), int(line[14:16]), int(line[17:19])
                off = line[23:28]
                sign = -1 if off[:1] == b"-" else 1
                offs = sign * (int(off[1:3]) * 3600 + int(off[3:5]) * 60) if len(off) == 5 else 0
                base = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) - offs
            except ValueError:
                return None
            if len(self.cache) > 10_000:
                self.cache.clear()
            self.cache[key] = base
        try:
            return base + int(line[20:23]) / 1000.0
        except ValueError:
            return None


@dataclass(slots=True)
class Record:
    """One parsed log fact. ``kind`` is one of:

    ``send`` (mon, payload=raw JSON bytes, fd), ``write`` (mon, errno), ``sendfd`` (mon, fd),
    ``reply``/``event`` (mon, payload), ``new``/``close`` (mon), ``monvm`` (mon, vm),
    ``vmname`` (vm, name, path), ``job`` (api, vm, name), ``jobend`` (api, ret; tid = the job's thread),
    ``error`` (text), ``version`` (libvirt, qemu, hostname) and ``malformed`` (text).
    """

    kind: str
    t: float
    tid: int
    mon: str | None = None
    payload: bytes = b""
    fd: int | None = None
    vm: str | None = None
    name: str | None = None
    api: str | None = None
    ret: int | None = None
    text: str | None = None
    lineno: int = 0


@dataclass
class LogStats:
    """Counters of one pass over a log."""

    lines: int = 0
    bytes: int = 0
    log_lines: int = 0
    skipped: int = 0        # garbage: neither a log line nor a known continuation line
    malformed: int = 0      # monitor probes whose JSON or fields cannot be parsed
    monitor_lines: int = 0


def _open(path: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
    try:
        return open(path, "rb", buffering=1 << 20)
    except OSError as exc:
        raise LogError(f"cannot read log {os.fspath(path)}: {exc.strerror or exc}") from None


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def iter_records(path: str | os.PathLike[str], stats: LogStats | None = None, *,
                 writes: bool = True) -> Iterator[Record]:
    """Yield the :class:`Record` s of the libvirtd log at *path*, streaming (constant memory).

    Lines that are neither log lines (``YYYY-MM-DD HH:MM:SS.mmm+ZZZZ: tid: level : …``) nor the
    continuation lines of ``SEND_MSG``/``IO_WRITE`` are skipped and counted in ``stats.skipped``;
    monitor lines that cannot be parsed yield a ``malformed`` record and count in ``stats.malformed``.
    Non-UTF-8 bytes are replaced. ``writes=False`` skips ``IO_WRITE`` records (faster summary pass).
    Raises :class:`LogError` when the file cannot be read.
    """
    st = stats if stats is not None else LogStats()
    clock = _Clock()
    pending: Record | None = None   # SEND_MSG / IO_WRITE waiting for its continuation line
    with _open(path) as f:
        try:
            lineno = 0
            for lineno, line in enumerate(f, 1):
                if line[:1] == b" ":
                    if pending is _SKIP_WRITE:
                        pending = None
                    elif pending is not None:
                        if pending.kind == "send":
                            m = _RE_FD.search(line)
                            pending.fd = int(m.group(1)) if m else None
                        else:
                            m = _RE_ERRNO.search(line)
                            pending.ret = int(m.group(1)) if m else None
                        yield pending
                        pending = None
                    else:
                        st.skipped += 1
                    continue
                if pending is not None:   # continuation missing (truncated or interleaved): emit as is
                    if pending is not _SKIP_WRITE:
                        yield pending
                    pending = None
                # Fast prefilter: everything below needs one of these substrings. Monitor probes are
                # checked first; a broken header there makes the probe malformed (not skipped).
                is_mon = b"QEMU_MONITOR_" in line
                if not is_mon and (line[4:5] != b"-" or line[19:20] != b"." or line[10:11] != b" "):
                    if line.strip():
                        st.skipped += 1
                    continue
                st.log_lines += 1
                if is_mon:
                    st.monitor_lines += 1
                    if not writes and b"MONITOR_IO_WRITE:" in line:
                        pending = _SKIP_WRITE
                        continue
                    rec = _parse_monitor(line, clock, lineno, writes)
                    if rec is None:
                        st.malformed += 1
                        t = clock(line)
                        yield Record("malformed", t or 0.0, 0, text=_dec(line[:200]).rstrip(), lineno=lineno)
                    elif rec.kind in ("send", "write", "skip"):
                        pending = rec
                    else:
                        yield rec
                elif b" : Line [" in line:      # libvirt's echo of every QMP line: only the greeting matters
                    if b'"QMP"' in line:
                        v = _greeting_version(line)
                        if v:
                            yield Record("greeting", 0.0, 0, text=v, lineno=lineno)
                elif b"mon:0x" in line:
                    m = _RE_MONVM.search(line)
                    if m and m.group(2) != b"(nil)":
                        t = clock(line)
                        if t is not None:
                            yield Record("monvm", t, _tid(line), mon=m.group(1).decode(), vm=m.group(2).decode(),
                                         lineno=lineno)
                elif b"name=" in line:
                    m = _RE_VMNAME.search(line)
                    if m:
                        t = clock(line)
                        if t is None:
                            continue
                        vm, name = m.group(1).decode(), _dec(m.group(2))
                        tid = _tid(line)
                        j = _RE_JOB.search(line)
                        if j:
                            yield Record("job", t, tid, vm=vm, name=name, api=j.group(1).decode(),
                                         text="nested" if b"job=async nested" in line else None, lineno=lineno)
                        else:
                            p = _RE_PATH.search(line)
                            yield Record("vmname", t, tid, vm=vm, name=name,
                                         text=_dec(p.group(1)) if p else None, lineno=lineno)
                elif b"finished job" in line:
                    m = _RE_JOBEND.search(line)
                    t = clock(line)
                    if m and t is not None:
                        yield Record("jobend", t, int(m.group(1)), api=m.group(2).decode(), ret=int(m.group(3)),
                                     lineno=lineno)
                elif b" error : " in line:
                    t = clock(line)
                    if t is not None:
                        parts = line.split(b" : ", 2)
                        yield Record("error", t, _tid(line), text=_dec(parts[-1]).strip(), lineno=lineno)
                elif b"libvirt version:" in line or b"hostname:" in line:
                    t = clock(line)
                    lv, qv, hn = (_RE_LIBVIRT_VERSION.search(line), _RE_QEMU_VERSION.search(line),
                                  _RE_HOSTNAME.search(line))
                    yield Record("version", t or 0.0, 0, vm=lv.group(1).decode() if lv else None,
                                 name=qv.group(1).decode() if qv else None,
                                 text=_dec(hn.group(1)) if hn else None, lineno=lineno)
                elif b'"QMP"' in line:
                    v = _greeting_version(line)
                    if v:
                        yield Record("greeting", 0.0, 0, text=v, lineno=lineno)
            st.lines = lineno
            st.bytes = f.tell()
        except OSError as exc:
            raise LogError(f"cannot read log {os.fspath(path)}: {exc.strerror or exc}") from None
    if pending is not None and pending is not _SKIP_WRITE:
        yield pending


def _tid(line: bytes) -> int:
    # "YYYY-MM-DD HH:MM:SS.mmm+0000: <tid>: …" — tid starts at column 30.
    end = line.find(b":", 30)
    if not 30 < end <= 48:  # at most 18 digits
        return 0
    try:
        return int(line[30:end])
    except ValueError:
        return 0


_KINDS = {b"SEND_MSG": "send", b"IO_WRITE": "write", b"IO_SEND_FD": "sendfd", b"RECV_REPLY": "reply",
          b"RECV_EVENT": "event", b"NEW": "new", b"CLOSE": "close"}
_PAYLOAD_KEY = {"send": b" msg=", "write": b" buf=", "reply": b" reply=", "event": b" event="}


_RE_MON = re.compile(rb"QEMU_MONITOR_([A-Z_]+): mon=(0x[0-9a-fA-F]+)")


def _parse_monitor(line: bytes, clock: _Clock, lineno: int, writes: bool = True) -> Record | None:
    m = _RE_MON.search(line)
    if m is None:
        return None
    kind = _KINDS.get(m.group(1))
    if kind is None:
        return None
    if kind == "write" and not writes:
        return _SKIP_WRITE
    t = clock(line)
    if t is None:
        return None
    rec = Record(kind, t, _tid(line) if kind == "send" else 0, mon=m.group(2).decode(), lineno=lineno)
    key = _PAYLOAD_KEY.get(kind)
    e = m.end()
    if key is not None:
        if not line.startswith(key, e):
            p = line.find(key, e)
            if p < 0:
                return None
            e = p
        rec.payload = line[e + len(key):].rstrip(b"\r\n")
        if not (rec.payload.startswith(b"{") and rec.payload.endswith(b"}")):   # truncated or not JSON
            return None
    elif kind == "sendfd":
        f = _RE_FD.search(line, e)
        rec.fd = int(f.group(1)) if f else None
    return rec


_SKIP_WRITE = Record("skip", 0.0, 0)


# --------------------------------------------------------------------------------------------------
# Monitor instances and one pass over the log


@dataclass
class Monitor:
    """Summary of one monitor instance (what :func:`list_monitors` returns, as dicts)."""

    key: str
    pointer: str
    vm: str | None = None
    domain: str | None = None
    opened: float | None = None
    closed: float | None = None
    first: float | None = None
    last: float | None = None
    commands: int = 0
    replies: int = 0
    events: int = 0
    errors: int = 0
    notable: list[str] = field(default_factory=list)
    migrate_uris: list[str] = field(default_factory=list)
    migration_status: str | None = None
    qemu_version: str | None = None      # from the QMP greeting libvirt logs ("Line [{"QMP": …")
    operations: list[str] = field(default_factory=list)   # libvirt job APIs that sent commands

    @property
    def role(self) -> str:
        if "migrate-incoming" in self.notable:
            return "restore"
        if "migrate" in self.notable:
            return "save"
        return "other"

    def to_dict(self) -> dict[str, Any]:
        def iso(t: float | None) -> str | None:
            if t is None:
                return None
            return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

        return {
            "key": self.key, "monitor": self.key, "pointer": self.pointer, "vm": self.vm, "domain": self.domain,
            "role": self.role,
            "first": self.first, "last": self.last, "first_iso": iso(self.first), "last_iso": iso(self.last),
            "opened": self.opened is not None, "closed": self.closed is not None,
            "commands": self.commands, "replies": self.replies, "events": self.events, "errors": self.errors,
            "notable": self.notable[:50], "migrate_uris": self.migrate_uris,
            "migration_status": self.migration_status, "operations": self.operations,
            "qemu_version": self.qemu_version,
        }

    def describe(self) -> str:
        """One short human line (used in :class:`AmbiguousMonitor` messages)."""
        d = self.to_dict()
        what = ",".join(dict.fromkeys(n for n in self.notable if n in ("migrate", "migrate-incoming", "stop", "cont")))
        span = f"{(d['first_iso'] or '?')[11:23]}-{(d['last_iso'] or '?')[11:23]}"
        dom = f" domain={self.domain}" if self.domain else (f" vm={self.vm}" if self.vm else "")
        return f"{self.key} ({self.role}{dom}, {self.commands} commands{': ' + what if what else ''}, {span})"


@dataclass
class _Job:
    tid: int
    api: str
    vm: str | None
    name: str | None
    start: float
    end: float | None = None
    ret: int | None = None
    error: str | None = None
    index: int = 0


@dataclass
class Scan:
    """Result of one pass: monitor instances, jobs, host facts, counters, collected messages."""

    monitors: dict[str, Monitor] = field(default_factory=dict)
    jobs: dict[int, _Job] = field(default_factory=dict)    # only jobs that sent a collected command
    job_count: int = 0
    vm_names: dict[str, str] = field(default_factory=dict)
    vm_images: dict[str, str] = field(default_factory=dict)
    libvirt_version: str | None = None
    qemu_version: str | None = None
    hostname: str | None = None
    stats: LogStats = field(default_factory=LogStats)
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _to_epoch(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, _dt.datetime):
        return (v if v.tzinfo else v.replace(tzinfo=_dt.UTC)).timestamp()
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
        try:
            d = _dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise LogError(f"cannot understand time {v!r} (want epoch seconds or ISO 8601)") from None
        return _to_epoch(d)
    raise LogError(f"cannot understand time {v!r}")


def _scan_records(path: str | os.PathLike[str], *, collect: Iterable[str] = (), since: Any = None,
                  until: Any = None) -> Scan:
    """Reference implementation of :func:`scan` on top of :func:`iter_records` (clear, slower).

    The tests check that :func:`scan` (the fast, inlined loop) gives exactly the same result.
    """
    lo, hi = _to_epoch(since), _to_epoch(until)
    want = set(collect)
    sc = Scan()
    cur: dict[str, Monitor] = {}           # pointer → live instance
    generation: dict[str, int] = {}
    tid_job: dict[int, _Job] = {}
    vm_live: dict[str, list[Monitor]] = {}
    outstanding: dict[str, dict[Any, dict[str, Any]]] = {}   # key → id → command message
    unwritten: dict[str, dict[str, Any]] = {}                 # key → command sent but not yet written
    last_written: dict[str, dict[str, Any]] = {}

    def instance(ptr: str, t: float, new: bool = False) -> Monitor:
        m = cur.get(ptr)
        if m is None or new or m.closed is not None:
            if m is not None:
                _flush(m.key)
            n = generation.get(ptr, 0) + 1
            generation[ptr] = n
            m = Monitor(key=ptr if n == 1 else f"{ptr}#{n}", pointer=ptr)
            cur[ptr] = m
            sc.monitors[m.key] = m
        return m

    def _flush(key: str) -> None:
        cmd = unwritten.pop(key, None)
        if cmd is not None:
            sc.messages.setdefault(key, []).append(cmd)
            last_written[key] = cmd

    def touch(m: Monitor, t: float) -> None:
        if m.first is None:
            m.first = t
        m.last = t

    def attribute(m: Monitor, vm: str | None, name: str | None) -> None:
        if vm and m.vm is None:
            m.vm = vm
            vm_live.setdefault(vm, []).append(m)
        if m.domain is None:
            m.domain = name or (sc.vm_names.get(m.vm) if m.vm else None)

    windowless = lo is None and hi is None
    last_new: Monitor | None = None
    for r in iter_records(path, sc.stats, writes=bool(want)):
        k = r.kind
        in_window = windowless or ((lo is None or r.t >= lo) and (hi is None or r.t <= hi))
        if k in ("send", "reply", "event", "write", "sendfd"):
            if not in_window:
                continue
            m = instance(r.mon, r.t)  # type: ignore[arg-type]
            key = m.key
            keep = key in want
            if k == "send":
                touch(m, r.t)
                m.commands += 1
                job = tid_job.get(r.tid)
                if job is not None:
                    attribute(m, job.vm, job.name)
                    if job.api not in m.operations:
                        m.operations.append(job.api)
                ex = _RE_EXEC.search(r.payload)
                execute = ex.group(1).decode() if ex else "?"
                if execute in NOTABLE:
                    if len(m.notable) < 200:
                        m.notable.append(execute)
                    if execute in ("migrate", "migrate-incoming"):
                        u = _RE_URI.search(r.payload)
                        if u:
                            m.migrate_uris.append(_dec(u.group(1)))
                if keep:
                    _flush(key)
                    obj = _loads(r.payload)
                    if not _well_formed("command", obj):
                        sc.stats.malformed += 1
                        continue
                    execute_ = obj.get("execute") or obj.get("exec-oob")
                    cmd: dict[str, Any] = {"kind": "command", "execute": execute_}
                    if "arguments" in obj:
                        cmd["arguments"] = obj["arguments"]
                    cmd["id"] = obj.get("id")
                    cmd["fds"] = 1 if (r.fd is not None and r.fd >= 0) else 0
                    cmd["_fdsent"] = 0
                    cmd["_t"] = r.t
                    cmd["_tid"] = r.tid
                    cmd["_job"] = job.index if job is not None else None
                    if job is not None:
                        sc.jobs[job.index] = job
                    unwritten[key] = cmd
                    outstanding.setdefault(key, {})[_id_key(cmd["id"])] = cmd
            elif k == "write":
                if keep:
                    _flush(key)
                    if r.ret not in (None, 0) and key in last_written:
                        last_written[key]["_errno"] = r.ret
            elif k == "sendfd":
                if keep:
                    _flush(key)
                    c = last_written.get(key)
                    if c is not None:
                        c["_fdsent"] += 1
            elif k == "reply":
                touch(m, r.t)
                m.replies += 1
                if b'"error"' in r.payload:
                    m.errors += 1
                if keep:
                    _flush(key)
                    obj = _loads(r.payload)
                    if not _well_formed("reply", obj):
                        sc.stats.malformed += 1
                        continue
                    rid = obj.get("id")
                    out = outstanding.get(key, {})
                    cmd0 = out.pop(_id_key(rid), None)
                    if cmd0 is None and rid is None and len(out) == 1:   # error replies may lack the id
                        _, cmd0 = out.popitem()
                        rid = cmd0["id"]
                    msg: dict[str, Any] = {"kind": "reply", "id": rid}
                    if "error" in obj:
                        msg["error"] = obj["error"]
                    else:
                        msg["return"] = obj.get("return", {})
                    msg["_t"] = r.t
                    msg["_cmd"] = cmd0["execute"] if cmd0 else None
                    sc.messages.setdefault(key, []).append(msg)
            else:  # event
                touch(m, r.t)
                m.events += 1
                if b'"MIGRATION"' in r.payload:
                    s = _RE_STATUS.search(r.payload)
                    if s:
                        m.migration_status = s.group(1).decode()
                if keep:
                    _flush(key)
                    obj = _loads(r.payload)
                    if not _well_formed("event", obj):
                        sc.stats.malformed += 1
                        continue
                    sc.messages.setdefault(key, []).append(
                        {"kind": "event", "event": obj["event"], "data": obj.get("data"),
                         "timestamp": obj.get("timestamp"), "_t": r.t})
        elif k == "new":
            m = instance(r.mon, r.t, new=r.mon in cur)  # type: ignore[arg-type]
            m.opened = r.t
            last_new = m
        elif k == "greeting":
            sc.qemu_version = sc.qemu_version or r.text
            if last_new is not None and last_new.qemu_version is None:
                last_new.qemu_version = r.text
        elif k == "close":
            m = cur.get(r.mon)  # type: ignore[arg-type]
            if m is not None and m.closed is None:
                _flush(m.key)
                m.closed = r.t
                if m.vm and m in vm_live.get(m.vm, ()):
                    vm_live[m.vm].remove(m)
        elif k == "monvm":
            m = cur.get(r.mon)  # type: ignore[arg-type]
            if m is None or m.closed is not None:
                m = instance(r.mon, r.t)  # type: ignore[arg-type]
            attribute(m, r.vm, None)
        elif k == "vmname":
            sc.vm_names[r.vm] = r.name  # type: ignore[index]
            if r.text:
                sc.vm_images[r.vm] = r.text  # type: ignore[index]
            for m in vm_live.get(r.vm, ()):  # type: ignore[arg-type]
                if m.domain is None:
                    m.domain = r.name
        elif k == "job":
            sc.vm_names[r.vm] = r.name  # type: ignore[index]
            for m in vm_live.get(r.vm, ()):  # type: ignore[arg-type]
                if m.domain is None:
                    m.domain = r.name
            j = tid_job.get(r.tid)
            if j is None or j.api != r.api or j.end is not None or r.text != "nested":
                j = _Job(r.tid, r.api, r.vm, r.name, r.t, index=sc.job_count)  # type: ignore[arg-type]
                sc.job_count += 1
                tid_job[r.tid] = j
        elif k == "jobend":
            j = tid_job.get(r.tid)
            if j is not None and j.api == r.api:
                j.end, j.ret = r.t, r.ret
                del tid_job[r.tid]
        elif k == "error":
            j = tid_job.get(r.tid)
            if j is not None:
                j.error = r.text
        elif k == "version":
            sc.libvirt_version = r.vm or sc.libvirt_version
            sc.qemu_version = r.name or sc.qemu_version
            sc.hostname = r.text or sc.hostname
    for key in list(unwritten):
        _flush(key)
    return sc


def scan(path: str | os.PathLike[str], *, collect: Iterable[str] = (), since: Any = None,
         until: Any = None, summary: bool = True) -> Scan:
    """One streaming pass: summarize every monitor instance; keep full messages for keys in *collect*.

    Collected messages are dicts in wire order with the public trace fields plus private ones
    (``_t`` absolute time, ``_tid``, ``_job`` key into ``Scan.jobs``); :func:`build_phases` strips them.
    Same result as :func:`_scan_records`, with the line parsing inlined (no per-line objects) for
    throughput; lines are read one at a time (constant memory). ``summary=False`` (with *collect*):
    monitors whose pointer is not collected are skipped, so ``Scan.monitors`` holds only the collected
    pointers' instances (instance keys are per pointer, so they are the same as in a full pass).
    """
    lo, hi = _to_epoch(since), _to_epoch(until)
    windowless = lo is None and hi is None
    want = set(collect)
    only_ptrs = {k.split("#")[0].encode() for k in want} if want and not summary else None
    sc = Scan()
    st = sc.stats
    clock = _Clock()
    ms_cache = clock.ms
    cur: dict[bytes, Monitor] = {}            # pointer → live instance
    generation: dict[str, int] = {}
    tid_job: dict[int, _Job] = {}
    vm_live: dict[str, list[Monitor]] = {}
    outstanding: dict[str, dict[Any, dict[str, Any]]] = {}
    unwritten: dict[str, dict[str, Any]] = {}
    last_written: dict[str, dict[str, Any]] = {}
    SKIP = ("skip", None)
    pend: tuple[str, Any] | None = None      # what the next " …" continuation line belongs to

    def instance(ptr: bytes, new: bool = False) -> Monitor:
        m = cur.get(ptr)
        if m is None or new or m.closed is not None:
            if m is not None:
                flush(m.key)
            sp = ptr.decode()
            n = generation.get(sp, 0) + 1
            generation[sp] = n
            m = Monitor(key=sp if n == 1 else f"{sp}#{n}", pointer=sp)
            cur[ptr] = m
            sc.monitors[m.key] = m
        return m

    def flush(key: str) -> None:
        cmd = unwritten.pop(key, None)
        if cmd is not None:
            sc.messages.setdefault(key, []).append(cmd)
            last_written[key] = cmd

    def attribute(m: Monitor, vm: str | None, name: str | None) -> None:
        if vm and m.vm is None:
            m.vm = vm
            vm_live.setdefault(vm, []).append(m)
        if m.domain is None:
            m.domain = name or (sc.vm_names.get(m.vm) if m.vm else None)

    def name_vm(vm: str, name: str) -> None:
        sc.vm_names[vm] = name
        for m in vm_live.get(vm, ()):
            if m.domain is None:
                m.domain = name

    # Rare lines (attribution, job ends, errors, version banner): plain helper functions.
    def name_line(line: bytes) -> None:
        vn = _RE_VMNAME.search(line)
        t = clock(line) if vn else None
        if vn is None or t is None:
            return
        vm, name = vn.group(1).decode(), _dec(vn.group(2))
        name_vm(vm, name)
        jm = _RE_JOB.search(line)
        if jm:
            tid = _tid(line)
            api = jm.group(1).decode()
            j = tid_job.get(tid)
            # A top-level "Starting job" is a new job; "job=async nested" continues the thread's async job.
            if j is None or j.api != api or j.end is not None or b"job=async nested" not in line:
                j = _Job(tid, api, vm, name, t, index=sc.job_count)
                sc.job_count += 1
                tid_job[tid] = j
        else:
            pm = _RE_PATH.search(line)
            if pm:
                sc.vm_images[vm] = _dec(pm.group(1))

    def jobend_line(line: bytes) -> None:
        je = _RE_JOBEND.search(line)
        if je and clock(line) is not None:
            j = tid_job.get(int(je.group(1)))
            if j is not None and j.api == je.group(2).decode():
                j.end, j.ret = clock(line), int(je.group(3))
                del tid_job[j.tid]

    def error_line(line: bytes) -> None:
        if clock(line) is not None:
            j = tid_job.get(_tid(line))
            if j is not None:
                j.error = _dec(line.split(b" : ", 2)[-1]).strip()

    def version_line(line: bytes) -> None:
        lv, qv, hn = (_RE_LIBVIRT_VERSION.search(line), _RE_QEMU_VERSION.search(line), _RE_HOSTNAME.search(line))
        sc.libvirt_version = lv.group(1).decode() if lv else sc.libvirt_version
        sc.qemu_version = qv.group(1).decode() if qv else sc.qemu_version
        sc.hostname = _dec(hn.group(1)) if hn else sc.hostname

    lineno = n_log = n_mon = 0
    last_new: Monitor | None = None        # the QMP greeting (QEMU version) belongs to the newest monitor
    with _open(path) as f:
        try:
            for lineno, line in enumerate(f, 1):  # noqa: B007 - lineno is the line count after the loop
                if line[:1] == b" ":
                    if pend is None:
                        st.skipped += 1
                    elif pend is not SKIP:
                        what, obj = pend
                        if what == "send":
                            fm = _RE_FD.search(line)
                            if fm and int(fm.group(1)) >= 0:
                                obj["fds"] = 1
                        else:
                            em = _RE_ERRNO.search(line)
                            if em and int(em.group(1)) and obj is not None:
                                obj["_errno"] = int(em.group(1))
                    pend = None
                    continue
                pend = None
                # Monitor probes first (most of the work); a broken header there makes the probe malformed.
                if b"QEMU_MONITOR_" in line:
                    n_log += 1
                    n_mon += 1
                    if not want and b"MONITOR_IO_WRITE:" in line:
                        pend = SKIP
                        continue
                    mm = _RE_MON.search(line)
                    kind = _KINDS.get(mm.group(1)) if mm else None
                    t = ms_cache.get(line[:28])
                    if t is None:
                        t = clock(line)
                    if kind is None or t is None:
                        st.malformed += 1
                        continue
                    # The JSON payload is line[p0:p1]; searched in place, copied only when collected.
                    p0 = p1 = 0
                    key_ = _PAYLOAD_KEY.get(kind)
                    if key_ is not None:
                        e = mm.end()  # type: ignore[union-attr]
                        if not line.startswith(key_, e):
                            e = line.find(key_, e)
                            if e < 0:
                                st.malformed += 1
                                continue
                        p0 = e + len(key_)
                        p1 = len(line)
                        while p1 > p0 and line[p1 - 1] in (10, 13):
                            p1 -= 1
                        if not (p1 > p0 and line[p0] == 123 and line[p1 - 1] == 125):   # "{" … "}"
                            st.malformed += 1
                            continue
                    if not windowless and not ((lo is None or t >= lo) and (hi is None or t <= hi)) \
                            and kind in ("send", "reply", "event", "write", "sendfd"):
                        if kind in ("send", "write"):
                            pend = SKIP
                        continue
                    ptr = mm.group(2)  # type: ignore[union-attr]
                    if only_ptrs is not None and ptr not in only_ptrs:
                        if kind in ("send", "write"):
                            pend = SKIP
                        elif kind == "new":
                            last_new = None
                        continue
                    if kind == "send":
                        m = cur.get(ptr)  # type: ignore[assignment]
                        if m is None or m.closed is not None:
                            m = instance(ptr)
                        if m.first is None:
                            m.first = t
                        m.last = t
                        m.commands += 1
                        tid = _tid(line) if tid_job else 0
                        job = tid_job.get(tid) if tid_job else None
                        if job is not None:
                            attribute(m, job.vm, job.name)
                            if job.api not in m.operations:
                                m.operations.append(job.api)
                        ex = _RE_EXEC.search(line, p0, p1)
                        if ex and ex.group(1) in _NOTABLE_B:
                            execute = ex.group(1).decode()
                            if len(m.notable) < 200:
                                m.notable.append(execute)
                            if execute in ("migrate", "migrate-incoming"):
                                u = _RE_URI.search(line, p0, p1)
                                if u:
                                    m.migrate_uris.append(_dec(u.group(1)))
                        key = m.key
                        if key in want:
                            flush(key)
                            obj = _loads(line[p0:p1])
                            if not _well_formed("command", obj):
                                st.malformed += 1
                                pend = SKIP
                                continue
                            execute_ = obj.get("execute") or obj.get("exec-oob")
                            cmd: dict[str, Any] = {"kind": "command", "execute": execute_}
                            if "arguments" in obj:
                                cmd["arguments"] = obj["arguments"]
                            cmd["id"] = obj.get("id")
                            cmd["fds"] = 0
                            cmd["_fdsent"] = 0
                            cmd["_t"] = t
                            cmd["_tid"] = tid if tid_job else _tid(line)
                            cmd["_job"] = job.index if job is not None else None
                            if job is not None:
                                sc.jobs[job.index] = job
                            unwritten[key] = cmd
                            outstanding.setdefault(key, {})[_id_key(cmd["id"])] = cmd
                            pend = ("send", cmd)
                        else:
                            pend = SKIP
                    elif kind == "reply":
                        m = cur.get(ptr)  # type: ignore[assignment]
                        if m is None or m.closed is not None:
                            m = instance(ptr)
                        if m.first is None:
                            m.first = t
                        m.last = t
                        m.replies += 1
                        if line.find(b'"error"', p0, p1) >= 0:
                            m.errors += 1
                        key = m.key
                        if key in want:
                            flush(key)
                            obj = _loads(line[p0:p1])
                            if not _well_formed("reply", obj):
                                st.malformed += 1
                                continue
                            rid = obj.get("id")
                            out = outstanding.get(key, {})
                            cmd0 = out.pop(_id_key(rid), None)
                            if cmd0 is None and rid is None and len(out) == 1:
                                _, cmd0 = out.popitem()
                                rid = cmd0["id"]
                            msg: dict[str, Any] = {"kind": "reply", "id": rid}
                            if "error" in obj:
                                msg["error"] = obj["error"]
                            else:
                                msg["return"] = obj.get("return", {})
                            msg["_t"] = t
                            msg["_cmd"] = cmd0["execute"] if cmd0 else None
                            sc.messages.setdefault(key, []).append(msg)
                    elif kind == "event":
                        m = cur.get(ptr)  # type: ignore[assignment]
                        if m is None or m.closed is not None:
                            m = instance(ptr)
                        if m.first is None:
                            m.first = t
                        m.last = t
                        m.events += 1
                        if line.find(b'"MIGRATION"', p0, p1) >= 0:
                            sm = _RE_STATUS.search(line, p0, p1)
                            if sm:
                                m.migration_status = sm.group(1).decode()
                        key = m.key
                        if key in want:
                            flush(key)
                            obj = _loads(line[p0:p1])
                            if not _well_formed("event", obj):
                                st.malformed += 1
                                continue
                            sc.messages.setdefault(key, []).append(
                                {"kind": "event", "event": obj["event"], "data": obj.get("data"),
                                 "timestamp": obj.get("timestamp"), "_t": t})
                    elif kind == "write":
                        m = instance(ptr)
                        key = m.key
                        if key in want:
                            flush(key)
                            pend = ("write", last_written.get(key))
                        else:
                            pend = SKIP
                    elif kind == "sendfd":
                        m = instance(ptr)
                        key = m.key
                        if key in want:
                            flush(key)
                            c = last_written.get(key)
                            if c is not None:
                                c["_fdsent"] += 1
                    elif kind == "new":
                        m = instance(ptr, new=ptr in cur)
                        m.opened = t
                        last_new = m
                    else:  # close
                        m0 = cur.get(ptr)
                        if m0 is not None and m0.closed is None:
                            flush(m0.key)
                            m0.closed = t
                            if m0.vm and m0 in vm_live.get(m0.vm, ()):
                                vm_live[m0.vm].remove(m0)
                elif line[4:5] != b"-" or line[19:20] != b"." or line[10:11] != b" ":
                    if line.strip():
                        st.skipped += 1
                    continue
                elif b" : Line [" in line:      # libvirt's echo of every QMP line: only the greeting matters
                    n_log += 1
                    if b'"QMP"' in line:
                        v = _greeting_version(line)
                        if v:
                            sc.qemu_version = sc.qemu_version or v
                            if last_new is not None and last_new.qemu_version is None:
                                last_new.qemu_version = v
                elif b"mon:0x" in line:
                    n_log += 1
                    mv = _RE_MONVM.search(line)
                    if mv and mv.group(2) != b"(nil)" and clock(line) is not None:
                        ptr = mv.group(1)
                        m1 = cur.get(ptr)
                        if m1 is None or m1.closed is not None:
                            m1 = instance(ptr)
                        attribute(m1, mv.group(2).decode(), None)
                else:
                    n_log += 1
                    if b"name=" in line:
                        name_line(line)
                    elif b"finished job" in line:
                        jobend_line(line)
                    elif b" error : " in line:
                        error_line(line)
                    elif b"libvirt version:" in line or b"hostname:" in line:
                        version_line(line)
                    elif b'"QMP"' in line:
                        v = _greeting_version(line)
                        if v:
                            sc.qemu_version = sc.qemu_version or v
                            if last_new is not None and last_new.qemu_version is None:
                                last_new.qemu_version = v
            st.lines = lineno
            st.log_lines, st.monitor_lines = n_log, n_mon
            st.bytes = f.tell()
        except OSError as exc:
            raise LogError(f"cannot read log {os.fspath(path)}: {exc.strerror or exc}") from None
    for key in list(unwritten):
        flush(key)
    return sc


def _greeting_version(line: bytes) -> str | None:
    """QEMU version ("10.0.2") from a logged QMP greeting line (``Line [{"QMP": {"version": …}}]``)."""
    i = line.find(b'{"QMP"')
    j = line.rfind(b"}")
    obj = _loads(line[i:j + 1]) if 0 <= i < j else None
    try:
        q = obj["QMP"]["version"]["qemu"]  # type: ignore[index]
        return f"{int(q['major'])}.{int(q['minor'])}.{int(q['micro'])}"
    except (TypeError, KeyError, ValueError):
        return None


def _int_like(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _well_formed(kind: str, obj: Any) -> bool:
    """*obj* has the shape the trace model gives a QMP *kind* (``command``/``reply``/``event``): a
    monitor line whose payload has not is malformed (counted, skipped), so an import is always a
    valid trace.

    >>> _well_formed("command", {"execute": "stop"}), _well_formed("command", {"execute": "stop", "arguments": []})
    (True, False)
    >>> _well_formed("event", {"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}})
    True
    """
    if not isinstance(obj, dict):
        return False
    if kind == "command":
        execute = obj.get("execute") or obj.get("exec-oob")
        return isinstance(execute, str) and execute != "" and isinstance(obj.get("arguments", {}), dict)
    if kind == "reply":
        err = obj.get("error", {})
        return "error" not in obj or (isinstance(err, dict) and isinstance(err.get("class", ""), str)
                                      and isinstance(err.get("desc", ""), str))
    ev, ts = obj.get("event"), obj.get("timestamp")
    return isinstance(ev, str) and ev != "" and (
        ts is None or (isinstance(ts, dict) and all(_int_like(ts.get(k, 0)) for k in ("seconds", "microseconds"))))


def _id_key(value: Any) -> Any:
    """A QMP ``id`` as a dict key: QMP allows any JSON value (libvirt sends strings), so a list or
    object id (a corrupt or crafted log) is keyed by its JSON text.

    >>> _id_key("libvirt-7"), _id_key(["x", 1])
    ('libvirt-7', '["x", 1]')
    """
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return value


def _loads(b: bytes) -> Any:
    try:
        return jsonload.loads(b.decode("utf-8", "replace"))
    except ValueError:  # malformed, nested too deeply, an integer past Python's digit limit
        return None


# --------------------------------------------------------------------------------------------------
# Phases


def _spans(msgs: list[dict[str, Any]]) -> list[tuple[str, int, int, int]]:
    """(name, start, end inclusive, anchor index) for every operation in one instance's conversation.

    With job tags (the log has ``Starting job`` lines) the operation is the span from the first to the
    last command its libvirt job sent, including commands other jobs slipped in between (a
    ``query-migrate`` from ``virsh domjobinfo``) and up to the next command after it. Without tags
    the command names decide (:data:`SAVE_PREP`, :data:`SAVE_TAIL`, :data:`RESTORE_TAIL`; ``query-*``
    probes are taken as part of the tail).
    """
    out: list[tuple[str, int, int, int]] = []
    cmd_idx = [i for i, m in enumerate(msgs) if m["kind"] == "command"]
    anchors = [n for n, i in enumerate(cmd_idx) if msgs[i]["execute"] in ("migrate", "migrate-incoming")]
    for q, n in enumerate(anchors):
        i = cmd_idx[n]
        anchor = msgs[i]
        ex = anchor["execute"]
        job = anchor.get("_job")
        lo_n = anchors[q - 1] + 1 if q else 0                      # commands after the previous anchor
        hi_n = anchors[q + 1] - 1 if q + 1 < len(anchors) else len(cmd_idx) - 1
        if ex == "migrate":
            s = n
            if job is not None:
                for k in range(n - 1, lo_n - 1, -1):
                    if msgs[cmd_idx[k]].get("_job") == job:
                        s = k
                    elif msgs[cmd_idx[k]].get("_job") is not None and not \
                            msgs[cmd_idx[k]]["execute"].startswith("query-"):
                        break
            else:
                while s > lo_n and msgs[cmd_idx[s - 1]]["execute"] in SAVE_PREP:
                    s -= 1
            start = cmd_idx[s]
            tail = SAVE_TAIL
        else:
            start = 0
            tail = RESTORE_TAIL
        e = n
        if job is not None:
            for k in range(n + 1, hi_n + 1):
                c = msgs[cmd_idx[k]]
                if c.get("_job") == job or (c.get("_job") is None and c["execute"] in tail and e == k - 1):
                    e = k
        else:
            while e < hi_n and (msgs[cmd_idx[e + 1]]["execute"] in tail
                                or msgs[cmd_idx[e + 1]]["execute"].startswith("query-")):
                e += 1
        end = cmd_idx[e + 1] - 1 if e + 1 < len(cmd_idx) else len(msgs) - 1
        name = "save" if ex == "migrate" else "restore"
        if out and start <= out[-1][2]:   # the previous tail ran into this operation: cut it there
            prev = out[-1]
            out[-1] = (prev[0], prev[1], start - 1, prev[3])
        out.append((name, start, end, i))
    # Close gaps between phases of the same instance (restore … later save): nothing in between is dropped.
    for n in range(len(out) - 1):
        name, s, _e, a = out[n]
        out[n] = (name, s, out[n + 1][1] - 1, a)
    return out


def _status(msgs: list[dict[str, Any]], anchor: int) -> tuple[bool | None, str | None]:
    """ok/error of an operation from its messages (MIGRATION events, query-migrate, error replies)."""
    ok: bool | None = None
    error: str | None = None
    anchor_id = msgs[anchor].get("id")
    for m in msgs[anchor:]:
        if m["kind"] == "reply" and "error" in m:
            if m["id"] == anchor_id or m.get("_cmd") in ("migrate", "migrate-incoming", "getfd", "add-fd"):
                ok = False
                error = error or _errtext(m["error"])
        elif m["kind"] == "event" and m["event"] == "MIGRATION":
            data = m.get("data")
            st = data.get("status") if isinstance(data, dict) else None
            if st == "completed" and ok is None:
                ok = True
            elif st in ("failed", "cancelled"):
                ok = False
                error = error or f"migration {st}"
        elif m["kind"] == "reply" and m.get("_cmd") == "query-migrate" and isinstance(m.get("return"), dict):
            r = m["return"]
            if r.get("status") in ("failed", "cancelled"):
                ok = False
                if r.get("error-desc"):
                    error = str(r["error-desc"])
            elif r.get("status") == "completed" and ok is None:
                ok = True
    return ok, error


def _errtext(e: Any) -> str:
    if isinstance(e, dict):
        return f"{e.get('class', 'Error')}: {e.get('desc', '')}".strip()
    return str(e)


def build_phases(sc: Scan, keys: list[str], lo: float | None = None, hi: float | None = None
                 ) -> tuple[list[dict[str, Any]], int, list[str]]:
    """Turn the collected conversations of *keys* into trace phases, in time order.

    Returns (phases, unphased, unphased_executes): messages of those monitors inside the window that
    belong to no phase. The window is [lo, hi]; ``None`` ends default to the first phase start and
    the last phase end.
    """
    built: list[tuple[float, dict[str, Any]]] = []
    leftovers: list[tuple[float, dict[str, Any]]] = []
    for key in keys:
        msgs = sc.messages.get(key, [])
        spans = _spans(msgs)
        covered = [False] * len(msgs)
        for name, s, e, a in spans:
            part = msgs[s:e + 1]
            for i in range(s, e + 1):
                covered[i] = True
            anchor = msgs[a]
            job = sc.jobs.get(anchor["_job"]) if anchor.get("_job") is not None else None
            operation = OPERATIONS.get(job.api, name) if job else name
            ok, error = _status(msgs[s:e + 1], a - s)
            if job is not None and job.ret is not None:
                if job.ret != 0:   # libvirt's own last error of the job is what the user was told
                    ok = False
                    error = job.error or error or f"{job.api} failed"
                elif ok is None:
                    ok = True
            mon = sc.monitors[key]
            image = None
            if name == "restore" and mon.vm and mon.vm in sc.vm_images:
                image = {"path": sc.vm_images[mon.vm], "size": None, "header": None}
            phase: dict[str, Any] = {
                "name": name, "operation": operation, "ok": ok, "error": error if ok is False else None,
                "image": image, "monitor": key,
                "attribution": {"job": job.api if job else None, "domain": mon.domain, "vm": mon.vm},
                "messages": _public(part),
                "_end": part[-1]["_t"],
            }
            built.append((part[0]["_t"], phase))
        for i, m in enumerate(msgs):
            if not covered[i]:
                leftovers.append((m["_t"], m))
    built.sort(key=lambda x: x[0])
    if built:
        w_lo = lo if lo is not None else built[0][0]
        w_hi = hi if hi is not None else max(p["_end"] for _, p in built)
    else:
        w_lo, w_hi = lo, hi
    unphased = [m for t, m in leftovers
                if (w_lo is None or t >= w_lo) and (w_hi is None or t <= w_hi)]
    phases = []
    for _, p in built:
        p.pop("_end", None)
        phases.append(p)
    return phases, len(unphased), [m.get("execute") or m.get("event") or "reply" for m in unphased][:50]


def _public(part: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Strip private fields, compute ``t`` relative to the first message and the ``fds`` count."""
    t0 = min(m["_t"] for m in part)  # the file order of threads' lines is not always time order
    out = []
    for m in part:
        if m["kind"] == "command":
            fds = max(m["fds"], m["_fdsent"])
            msg = _trace.command(m["execute"], m.get("arguments"), id=m["id"], fds=fds, t=m["_t"] - t0)
            if m.get("_errno"):
                msg["write_errno"] = m["_errno"]
        elif m["kind"] == "reply":
            msg = {"kind": "reply", "id": m["id"]}
            if "error" in m:
                msg["error"] = m["error"]
            else:
                msg["return"] = m["return"]
            msg["t"] = round(m["_t"] - t0, 6)
        else:
            msg = _trace.event(m["event"], m["data"], m["timestamp"], t=m["_t"] - t0)
        out.append(msg)
    return out


# --------------------------------------------------------------------------------------------------
# Public API


def list_monitors(path: str | os.PathLike[str], since: Any = None, until: Any = None) -> list[dict[str, Any]]:
    """Every monitor instance in the log (time order) as a dict.

    Keys: ``key`` and ``monitor`` (the same: instance key, ``0x…`` or ``0x…#N`` after pointer reuse;
    what ``monitor=`` accepts), ``pointer``, ``vm``,
    ``domain`` (None when the log cannot name it), ``role`` (``save``/``restore``/``other``),
    ``first``/``last`` (epoch floats) and ``first_iso``/``last_iso``, ``opened``/``closed`` (NEW/CLOSE
    seen), ``commands``/``replies``/``events``/``errors`` counts, ``notable`` (notable commands in order:
    migrate, migrate-incoming, stop, cont, getfd, add-fd, …), ``migrate_uris``, ``migration_status``
    (last MIGRATION event status), ``operations`` (libvirt job APIs that sent commands, if logged).
    Raises :class:`LogError` if the file cannot be read.
    """
    sc = scan(path, since=since, until=until)
    mons = sorted(sc.monitors.values(), key=lambda m: (m.first if m.first is not None else float("inf")))
    return [m.to_dict() for m in mons]


def _select(sc: Scan, domain: str | None, monitor: str | Iterable[str] | None) -> tuple[list[str], str | None, str]:
    """Pick the monitor instances of the trace; returns (keys, domain name, how it was decided)."""
    cands = [m for m in sc.monitors.values() if m.commands > 0]
    cands.sort(key=lambda m: m.first or 0.0)
    if monitor:
        wanted = [w.strip() for w in ([monitor] if isinstance(monitor, str) else list(monitor))
                  for w in w.split(",") if w.strip()]
        keys: list[str] = []
        for w in wanted:
            hit = [m.key for m in cands if (m.key == w if "#" in w else m.pointer == w)]
            if not hit:
                raise LogError(f"monitor {w} not found in log; monitors: "
                               + ", ".join(m.key for m in cands) if cands else f"monitor {w}: log has no monitors")
            keys += [k for k in hit if k not in keys]
        names = {sc.monitors[k].domain for k in keys} - {None}
        if domain and names and domain not in names:
            raise LogError(f"monitor(s) {', '.join(keys)} belong to {', '.join(sorted(names))}, not {domain}")
        return keys, domain or (names.pop() if len(names) == 1 else None), "monitor"
    if not cands:
        raise LogError("log holds no QEMU monitor commands (was it written with the 1:monitor filter?)")
    # Monitors that saved or restored are the candidates; the others (stats polls of other domains …)
    # cannot be the traced domain's operation and only make noise.
    pool = [m for m in cands if m.role != "other"] or cands
    named = {m.domain for m in cands if m.domain}
    if domain and domain in named:
        return [m.key for m in cands if m.domain == domain], domain, "log"
    if domain and named:
        unnamed_keys = [m.key for m in pool if not m.domain]
        extra = f"; unattributed monitors: {', '.join(unnamed_keys)} (pick with --monitor)" if unnamed_keys else ""
        raise LogError(f"domain {domain} not found in log; domains seen: {', '.join(sorted(named))}{extra}")
    pool_named = {m.domain for m in pool if m.domain}
    if not domain and len(pool_named) == 1 and all(m.domain for m in pool):
        name = pool_named.pop()
        return [m.key for m in cands if m.domain == name], name, "log"
    if not pool_named:
        # The log names no domain: accept one unambiguous group, i.e. all saving/restoring instances share
        # one vm pointer (libvirt's virDomainObj outlives the QEMU processes of a persistent domain).
        groups = {m.vm or m.key for m in pool}
        if len(groups) == 1:
            how = "assumed: the log does not name domains and holds one domain object's save/restore monitors"
            return [m.key for m in pool], domain, how
    what = f"domain {domain}" if domain else "the domain"
    if not domain and pool_named:
        what = f"the domain (several in the log: {', '.join(sorted(pool_named))}; name one)"
    raise AmbiguousMonitor(
        f"log holds {len(pool)} monitors and cannot tell which is {what}'s; pick with --monitor: "
        + "; ".join(m.describe() for m in pool), [m.to_dict() for m in pool])


def trace_from_log(path: str | os.PathLike[str], domain: str | None = None,
                   monitor: str | Iterable[str] | None = None, since: Any = None,
                   until: Any = None) -> _trace.Trace:
    """Build a trace (``source: "libvirt"``) from a libvirtd debug log.

    * *domain*: the domain name to trace. With attribution lines in the log (filters ``1:job
      1:qemu.qemu_process``) its monitors are found by name; if the log names other domains only,
      :class:`LogError`. With a monitor-only log the domain cannot be named: the candidates are the
      instances that saved or restored (``migrate``/``migrate-incoming``); if they all share one
      ``vm:`` pointer they are taken (``trace["log"]["attribution"]`` says it was assumed), otherwise
      :class:`AmbiguousMonitor` (``.monitors`` = the candidates as :func:`list_monitors` dicts; the
      message lists each with role, vm, command count, notable commands and time span).
    * neither: the one domain the log names (or the one unnamed vm group), else :class:`AmbiguousMonitor`.
    * *monitor*: instance key(s) or pointer(s) (``"0x7f…"``, ``"0x7f…#2"``, comma-separated or a list);
      a bare pointer selects every instance of that pointer. Overrides attribution.
    * *since*/*until*: epoch seconds, ``datetime`` (naive = UTC) or ISO strings; only messages inside
      are used.

    Phases: see the module docstring. ``host`` holds ``libvirt``/``qemu``/``hostname`` when the log has
    libvirtd's version banner (else None; :mod:`virtsave.libvirtd.domainlog` gives them from the domain log).
    ``trace["log"]`` = {path, lines, skipped, malformed, monitors, attribution, unphased,
    unphased_messages}. Raises :class:`LogError` (unreadable file, nothing found) or
    :class:`AmbiguousMonitor`.
    """
    lo, hi = _to_epoch(since), _to_epoch(until)
    first = scan(path, since=lo, until=hi)
    keys, name, how = _select(first, domain, monitor)
    sc = scan(path, collect=keys, since=lo, until=hi, summary=False)
    phases, unphased, unphased_what = build_phases(sc, keys, lo, hi)
    if not phases:
        raise LogError(f"no save or restore (migrate / migrate-incoming) found on monitor(s) {', '.join(keys)}")
    qemu = next((sc.monitors[k].qemu_version for k in keys if sc.monitors[k].qemu_version), sc.qemu_version)
    host = {"libvirt": sc.libvirt_version, "qemu": qemu, "hostname": sc.hostname}
    tr = _trace.new_trace("libvirt", host=host, domain={"name": name})
    tr["phases"] = phases
    tr["log"] = {
        "path": os.path.abspath(os.fspath(path)), "lines": sc.stats.lines, "skipped": sc.stats.skipped,
        "malformed": sc.stats.malformed, "monitors": keys, "attribution": how,
        "unphased": unphased, "unphased_messages": unphased_what,
    }
    return tr


# --------------------------------------------------------------------------------------------------
# Benchmark helpers


def parse_bytes_per_second(path: str | os.PathLike[str], *, full: bool = False, cpu: bool = False) -> float:
    """Throughput in bytes/s of one streaming summary pass over *path* (what :func:`list_monitors` does).

    ``full=True`` times a whole :func:`trace_from_log` instead (two passes; the monitor is the first
    save/restore instance, picked before the clock starts). ``cpu=True`` divides by this process's CPU
    time instead of wall time (steadier on a busy machine; the file is expected in the page cache).
    """
    size = os.path.getsize(path)
    pick = None
    if full:
        mons = [m for m in list_monitors(path) if m["role"] != "other"]
        pick = mons[0]["key"] if mons else None
    now = time.process_time if cpu else time.perf_counter
    t0 = now()
    if full:
        trace_from_log(path, monitor=pick)
    else:
        scan(path)
    return size / max(now() - t0, 1e-9)


_RE_TS = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3})", re.M)
_RE_PTR = re.compile(rb"0x7f[0-9a-f]{6,10}")
_RE_MONPTR = re.compile(rb"mon[=:](0x7f[0-9a-f]{6,10})")


def generate_log(path: str | os.PathLike[str], size_mb: float, sources: Iterable[str | os.PathLike[str]] = ()) -> int:
    """Write a realistic synthetic libvirtd log of about *size_mb* MB by repeating real logs.

    Each repetition of a source (default: the recorded fixtures of both stacks) gets its timestamps
    shifted forward so time keeps increasing, and every ``0x7f…`` pointer remapped to a fresh value
    (every fourth repetition reuses the previous repetition's pointers, exercising pointer reuse).
    Returns the number of bytes written.
    """
    srcs = [os.fspath(s) for s in sources]
    if not srcs:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        base = os.path.join(repo, "tests", "fixtures")
        for sub in ("libvirt-9.0", "libvirt-9.0-attributed", "libvirt-11.3-attributed"):
            d = os.path.join(base, sub)
            if os.path.isdir(d):
                srcs += sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".log"))
    if not srcs:
        raise LogError("generate_log: no source logs")
    chunks = []
    for s in srcs:
        with _open(s) as f:
            chunks.append(f.read())
    target = int(size_mb * 1e6)
    clock = _Clock()
    written = 0
    offset = 0.0
    rep = 0
    last_mon: bytes | None = None
    with open(path, "wb") as out:
        while written < target:
            for chunk in chunks:
                stamps = _RE_TS.findall(chunk)
                if not stamps:
                    continue
                t_first = clock(stamps[0][0] + b"." + stamps[0][1] + b"+0000") or 0.0
                t_last = clock(stamps[-1][0] + b"." + stamps[-1][1] + b"+0000") or 0.0
                shift = offset - t_first if rep else 0.0
                # k-th distinct pointer of the chunk → base of its group + k; every fourth repetition
                # shares the previous one's group, so its pointers are reused after the earlier CLOSE.
                group = rep - 1 if rep % 4 == 3 else rep
                mapping: dict[bytes, bytes] = {}
                first_mon = _RE_MONPTR.search(chunk)
                if rep % 4 == 3 and first_mon and last_mon:
                    mapping[first_mon.group(1)] = last_mon

                def ptr(m: re.Match[bytes], group: int = group, mapping: dict[bytes, bytes] = mapping) -> bytes:
                    p = m.group(0)
                    q = mapping.get(p)
                    if q is None:
                        q = b"0x7f%010x" % ((0x0600000000 + group * 0x100000 + len(mapping) * 0x40) & 0xFFFFFFFFFF)
                        mapping[p] = q
                    return q

                def ts(m: re.Match[bytes], shift: float = shift) -> bytes:
                    t = (clock(m.group(1) + b"." + m.group(2) + b"+0000") or 0.0) + shift
                    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:23].encode()

                data = _RE_PTR.sub(ptr, chunk)
                mons = _RE_MONPTR.findall(data)
                last_mon = mons[-1] if mons else None
                data = _RE_TS.sub(ts, data)
                out.write(data)
                written += len(data)
                offset = t_last + shift + 1.0
                rep += 1
                if written >= target:
                    break
    return written
