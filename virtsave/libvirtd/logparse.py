"""Parse libvirtd debug logs: the QMP conversation of every QEMU monitor, attributed to its domain.

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

Phases (see :func:`_spans`):

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

How it works. A tokenizer (:class:`_Lexer`) maps the file and finds the lines that matter with
compiled patterns: monitor probes (one pattern that also checks the payload's shape and notes a
following continuation line), and a few anchors for the rarer attribution, job and banner lines; every
other line is skipped without being looked at in Python. It parses each such line into a token and
hands the tokens, in file order, to ONE state machine (:class:`_Machine`: monitor instances, pointer
reuse, jobs, attribution, and, for the chosen instances, their messages). :func:`list_monitors` is
one summary pass. :func:`trace_from_log` is a summary pass (which also counts garbage, notes each
instance's byte range and the runs of jobs that sent its commands) followed by a pass over only the
chosen instances' byte ranges, the only place where JSON payloads are decoded. When the import names its
monitors (``monitor=``), both passes hand the state machine the payload probes of those pointers only
(the tokenizer still checks every probe, for the line counters); if a named monitor is not found, a
whole summary gives the error its list. Memory stays constant: the file is mapped, not read, and the
summary keeps one small record per monitor instance.

Cost (CPU, the generated 300 MB log, warm, against ``grep -c QEMU_MONITOR`` ≈ 0.09–0.14 s on it):
CPython's ``re`` finds a literal at about 1.4× grep's cost per pass and the summary needs three such
passes (probes, attribution lines, job ends); the import adds the line-statistics pass and the IO_WRITE
probes. :func:`scan_floor` runs just those passes: ≈ 5.2× grep for the summary and ≈ 8.8× for the
import before any Python runs for a line. The rest is Python per probe line (≈ 1 µs each).

Example::

    >>> tr = trace_from_log("tests/fixtures/libvirt-9.0-attributed/managedsave-running.log")
    >>> [m["execute"] for m in tr["phases"][0]["messages"] if m["kind"] == "command"][:2]
    ['query-migrate', 'stop']
"""

from __future__ import annotations

import calendar
import datetime as _dt
import heapq
import mmap
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from virtsave.core import jsonload
from virtsave.core.errors import AmbiguousMonitor, LogError
from virtsave.trace import model as _trace

__all__ = [
    "NOTABLE", "OPERATIONS", "RESTORE_TAIL", "SAVE_PREP", "SAVE_TAIL", "LogStats", "Monitor", "Record", "Scan",
    "iter_records", "list_monitors", "scan", "scan_floor", "trace_from_log",
]

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


# --------------------------------------------------------------------------------------------------
# Lines and their parts

_NOTABLE_B = frozenset(n.encode() for n in NOTABLE)
_RE_EXEC = re.compile(rb'"exec(?:ute|-oob)"\s*:\s*"([^"]+)"')
_RE_URI = re.compile(rb'"uri"\s*:\s*"([^"]*)"')
_RE_STATUS = re.compile(rb'"status"\s*:\s*"([^"]*)"')
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
_RE_MON = re.compile(rb"QEMU_MONITOR_([A-Z_]+): mon=(0x[0-9a-fA-F]+)")   # a line's probe: its first match

# The probe patterns of the fast path. Their literal head (``Q``) lets the regex engine jump from
# candidate to candidate; an alternative takes a well-formed payload probe apart in one go: pointer, a
# payload that is one ``{…}`` up to the end of the line, the command's name when it comes first, and
# whether a continuation line (`` fd=…``/`` len=…``) follows. The group a match closes last
# (``lastindex``) tells the alternative. Any other ``QEMU_MONITOR_`` (``NEW``/``CLOSE``/``IO_SEND_FD``,
# an odd or malformed probe) and ``QMP"`` (libvirt's echo of the QMP greeting) go the exact per-line
# path, :meth:`_Lexer._exact`. The summary pattern never matches ``IO_WRITE`` (nothing to summarize).
_PTR = rb"(0x[0-9a-fA-F]+)"
_JSON_EOL = rb"(\{[^\n]*\})\r*(?=\n|\Z)"
_JSON_CONT = rb"(\{[^\n]*\})\r*(?:(?=\n( ))|(?=\n|\Z))"


def _probe_pattern(writes: bool) -> re.Pattern[bytes]:
    return re.compile(
        rb"Q(?:EMU_MONITOR_(?:"
        rb"SEND_MSG: mon=" + _PTR + rb' msg=(\{(?:"execute":"([^"]+)")?[^\n]*\})\r*(?:(?=\n( ))|(?=\n|\Z))()'
        rb"|RECV_REPLY: mon=" + _PTR + rb" reply=" + _JSON_EOL + rb"()"
        rb"|RECV_EVENT: mon=" + _PTR + rb" event=" + _JSON_EOL + rb"()"
        + (rb"|" if writes else rb"|(?!)") + rb"IO_WRITE: mon=" + _PTR + rb" buf=" + _JSON_CONT + rb"()"
        + (rb"|()" if writes else rb"|(?!IO_WRITE: )()")
        + rb')|MP"())')


_RX_ALL, _RX_SUMMARY = _probe_pattern(True), _probe_pattern(False)
# lastindex → (kind, pointer group, payload group, command-name group, continuation group)
_FAST = {5: ("send", 1, 2, 3, 4), 8: ("reply", 6, 7, 0, 0), 11: ("event", 9, 10, 0, 0), 15: ("write", 12, 13, 0, 14)}
_KINDS = {b"SEND_MSG": "send", b"IO_WRITE": "write", b"IO_SEND_FD": "sendfd", b"RECV_REPLY": "reply",
          b"RECV_EVENT": "event", b"NEW": "new", b"CLOSE": "close"}
_PAYLOAD_KEY = {"send": b" msg=", "write": b" buf=", "reply": b" reply=", "event": b" event="}
_CONTINUED = frozenset({"send", "write"})       # probes followed by a continuation line
_FOCUSED = frozenset({"send", "write", "reply", "event"})     # the probes a focused pass filters by pointer
_PROBES = tuple(_KINDS.values())

# Anchors of the other lines that matter: every line a rule below acts on holds one of them.
_ANCHOR_ATTRIBUTION = re.compile(rb"vm[:=]0x")          # mon:0x… vm:0x…, vm=0x… name=…
_ANCHOR_JOBEND = re.compile(rb"finished job")
_ANCHOR_ERROR = re.compile(rb" error : ")
_ANCHOR_BANNER = (re.compile(rb"libvirt version:"), re.compile(rb"hostname:"))
_SUMMARY_ANCHORS = (_ANCHOR_ATTRIBUTION, _ANCHOR_JOBEND)
_ALL_ANCHORS = (*_SUMMARY_ANCHORS, _ANCHOR_ERROR, *_ANCHOR_BANNER)

# Which rule a non-probe log line falls under: the first needle it holds decides (libvirt's message
# kinds never mix, but a hostile line might: the order is part of the contract).
_RULES = ((b" : Line [", "greeting"), (b"mon:0x", "monvm"), (b"name=", "named"), (b"finished job", "jobend"),
          (b" error : ", "error"), (b"libvirt version:", "version"), (b"hostname:", "version"),
          (b'"QMP"', "greeting"))

# Line statistics: what follows each newline (a log line's shape, a continuation, anything else).
_RX_LINE_HEADS = re.compile(rb"\n(?:[^\n]{4}-[^\n]{5} [^\n]{8}\.|(.)|)")
_RX_ODD_LINES = re.compile(rb"\n(?![^\n]{4}-[^\n]{5} [^\n]{8}\.)(?=[^ \n])")
_CHUNK = 4 << 20                 # bytes tokenized at a time: what stays mapped, and the list sizes
_MISS = object()
_END = float("inf")


def _shaped(line: bytes) -> bool:
    """Does *line* look like ``YYYY-MM-DD HH:MM:SS.mmm…`` (the test libvirt's lines pass)?"""
    return line[4:5] == b"-" and line[19:20] == b"." and line[10:11] == b" "


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def _tid(line: bytes) -> int:
    """The thread id of a log line (``YYYY-MM-DD HH:MM:SS.mmm+0000: <tid>: …``; column 30 on)."""
    end = line.find(b":", 30)
    try:
        return int(line[30:end])
    except ValueError:
        return 0


def _loads(b: bytes) -> Any:
    """A payload's JSON, or None when malformed, nested too deep or holding an integer past Python's
    digit limit (:func:`virtsave.core.jsonload.loads`): counted as malformed, never raised."""
    try:
        return jsonload.loads(b.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None


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


class _Clock:
    """Log timestamp (a line's first 28 bytes) → epoch float; caches whole stamps and seconds."""

    def __init__(self) -> None:
        self.stamps: dict[bytes, float | None] = {}
        self.seconds: dict[bytes, int] = {}

    def __call__(self, stamp: bytes) -> float | None:
        t = self.stamps.get(stamp, _MISS)
        if t is _MISS:
            if len(self.stamps) > 20_000:
                self.stamps.clear()
            t = self.stamps[stamp] = self._parse(stamp)
        return t  # type: ignore[return-value]

    def _parse(self, s: bytes) -> float | None:
        key = s[:19] + s[23:28]
        base = self.seconds.get(key)
        if base is None:
            try:
                off = s[23:28]
                sign = -1 if off[:1] == b"-" else 1
                offs = sign * (int(off[1:3]) * 3600 + int(off[3:5]) * 60) if len(off) == 5 else 0
                fields = (int(s[0:4]), int(s[5:7]), int(s[8:10]), int(s[11:13]), int(s[14:16]), int(s[17:19]))
                base = calendar.timegm((*fields, 0, 0, 0)) - offs
            except ValueError:
                return None
            if len(self.seconds) > 10_000:
                self.seconds.clear()
            self.seconds[key] = base
        try:
            return base + int(s[20:23]) / 1000.0
        except ValueError:
            return None


# --------------------------------------------------------------------------------------------------
# The tokenizer


@dataclass
class LogStats:
    """Counters of one pass over a whole log."""

    lines: int = 0
    bytes: int = 0
    skipped: int = 0        # garbage: neither a log line nor a known continuation line
    malformed: int = 0      # monitor probes whose JSON or fields cannot be parsed


class _Lexer:
    """Finds the lines that matter in a mapped log and hands them, parsed, to a sink in file order.

    The sink has one method per token kind it wants. Probes (``send write sendfd reply event new
    close``) come as ``(ls, t, pointer, payload, execute=None)``: line start, epoch time, ``b"0x…"``,
    the JSON payload bytes (for kinds without one, the rest of the line) and the command's name when
    the pattern saw it. Other lines (``monvm named jobend error version greeting``) come as
    ``(ls, *fields)``, the fields their parser in :data:`_SIDE_PARSERS` returns; they are found through
    *anchors* (compiled patterns, one search of each chunk). *kinds*: the probes to deliver; *rules*:
    False to deliver no other line. *stats*: count lines, garbage and malformed probes (whole file).
    *focus*: deliver payload probes (:data:`_FOCUSED`) of these monitor pointers only (the others are
    still checked and counted, as *stats* wants).
    """

    def __init__(self, buf: Any, sink: Any, *, anchors: Iterable[re.Pattern[bytes]] = (),
                 kinds: Iterable[str] = _PROBES, rules: bool = True, stats: bool = False,
                 focus: frozenset[bytes] | None = None) -> None:
        self.buf, self.size, self.sink = buf, len(buf), sink
        self.anchors = tuple(anchors)
        self.focus = focus
        wanted = frozenset(kinds)
        self.on: dict[str, Callable[..., None] | None] = {
            k: getattr(sink, k, None) if k in wanted else None for k in _PROBES}
        self.side_handlers = {r: h for _, r in _RULES if rules and (h := getattr(sink, r, None)) is not None}
        self.rx = _RX_ALL if stats or "write" in wanted else _RX_SUMMARY
        self.fast: list[tuple[Any, ...] | None] = [None] * (self.rx.groups + 1)
        for mark, (kind, gp, gj, gx, gc) in _FAST.items():
            self.fast[mark] = (self.on[kind], gc, (gp, gj, gx) if gx else (gp, gj), gp)
        self.clock = _Clock()
        self.stats = LogStats(bytes=self.size) if stats else None
        self.sides: list[int] = []        # heap of line starts of candidate non-probe lines
        self.side_last = -1
        self.newlines = self.spaces = self.garbage = self.conts = self.bad_probes = 0

    def run(self, lo: int = 0, hi: int | None = None) -> LogStats | None:
        """Tokenize bytes [lo, hi) (line boundaries), chunk by chunk; returns the stats when counting."""
        hi = self.size if hi is None else hi
        pos = lo
        while pos < hi:
            end = self._chunk_end(pos, hi)
            if self.stats is not None:
                self._count_lines(pos, end)
            self.sides = sorted({self._line_start(pos, m.start()) for rx in self.anchors
                                 for m in rx.finditer(self.buf, pos, end)})
            self.side_last = -1
            self._probes(pos, end)
            self._sides_before(end)
            _release(self.buf, pos, end)
            pos = end
        return self._finish_stats()

    def _chunk_end(self, pos: int, hi: int) -> int:
        if hi - pos <= _CHUNK:
            return hi
        e = self.buf.find(b"\n", pos + _CHUNK, hi)
        while e >= 0 and self.buf[e + 1:e + 2] == b" ":     # keep a probe with its continuation line
            e = self.buf.find(b"\n", e + 1, hi)
        return hi if e < 0 else e + 1

    def _line_start(self, lo: int, pos: int) -> int:
        return self.buf.rfind(b"\n", lo, pos) + 1 or lo

    def _probes(self, lo: int, hi: int) -> None:
        """The hot loop: every probe candidate of [lo, hi); the fast path for well-formed payload probes."""
        buf, clock, fast = self.buf, self.clock, self.fast
        stamps, rfind, find = clock.stamps, buf.rfind, buf.find
        side = self.sides[0] if self.sides else _END
        first_only = self.rx is _RX_SUMMARY     # it skips IO_WRITE, whose payload may hold probe text
        counting = self.stats is not None
        focus = self.focus
        last = -1
        for mt in self.rx.finditer(buf, lo, hi):
            s = mt.start()
            ls = rfind(b"\n", lo, s) + 1 or lo
            if ls == last:          # a later match inside a line already handled (payload text)
                continue
            last = ls
            if side < ls:
                side = self._sides_before(ls)
            spec = fast[mt.lastindex]  # type: ignore[index]   # every alternative closes a group
            if spec is None or (first_only and find(b"QEMU_MONITOR_", ls, s) >= 0):
                self._exact(ls, hi)                 # a rare kind, an odd line, or not the line's first probe
                side = self.sides[0] if self.sides else _END
                continue
            stamp = buf[ls:ls + 28]
            t = stamps.get(stamp, _MISS)
            if t is _MISS:
                t = clock(stamp)
            if t is None:
                self._malformed(ls, hi)
                continue
            handler, gc, groups, gp = spec
            if gc and counting and mt.group(gc) is not None:
                self.conts += 1
            if handler is not None and (focus is None or mt.group(gp) in focus):
                handler(ls, t, *mt.group(*groups))

    def _exact(self, ls: int, hi: int) -> None:
        """The per-line rules, for a line the fast patterns did not take apart (odd, malformed, rare kinds)."""
        buf = self.buf
        le = buf.find(b"\n", ls, hi)
        le = hi if le < 0 else le
        line = buf[ls:le + 1]
        if b"QEMU_MONITOR_" not in line:          # a QMP greeting echo: a non-probe line
            heapq.heappush(self.sides, ls)
            return
        m = _RE_MON.search(line)
        kind = _KINDS.get(m.group(1)) if m else None
        payload = _payload(line, m.end(), kind) if m and kind else None
        t = self.clock(line[:28])
        if m is None or kind is None or payload is None or t is None:
            self._malformed(ls, hi)
            return
        if kind in _CONTINUED and buf[le + 1:le + 2] == b" ":
            self.conts += 1
        handler = self.on[kind]
        if handler is not None and (self.focus is None or kind not in _FOCUSED or m.group(2) in self.focus):
            handler(ls, t, m.group(2), payload)

    def _malformed(self, ls: int, hi: int) -> None:
        self.bad_probes += 1
        report = getattr(self.sink, "malformed", None)
        if report is not None:
            le = self.buf.find(b"\n", ls, hi)
            report(ls, self.buf[ls:le if le >= 0 else hi])

    def _sides_before(self, ls: int) -> float:
        """Hand over the candidate non-probe lines before *ls*; returns the next one's start."""
        sides = self.sides
        while sides and sides[0] < ls:
            pos = heapq.heappop(sides)
            if pos != self.side_last:
                self.side_last = pos
                self._side(pos)
        return sides[0] if sides else _END

    def _side(self, ls: int) -> None:
        """One non-probe log line: the first rule whose needle it holds decides what it means."""
        le = self.buf.find(b"\n", ls)
        line = self.buf[ls:le + 1 if le >= 0 else self.size]
        rule = _rule(line)
        handler = self.side_handlers.get(rule) if rule else None
        if handler is not None:
            parsed = _SIDE_PARSERS[rule](line, self.clock)  # type: ignore[index]
            if parsed is not None:
                handler(ls, *parsed)

    # -- statistics ------------------------------------------------------------------------------

    def _count_lines(self, lo: int, hi: int) -> None:
        """Count newlines, continuation-looking lines and garbage of the lines starting in [lo, hi)."""
        start = max(lo - 1, 0)
        heads = _RX_LINE_HEADS.findall(self.buf, start, hi - 1)
        self.newlines += len(heads)
        kinds = Counter(heads)
        self.spaces += kinds.pop(b" ", 0)
        kinds.pop(b"", None)
        if kinds:                                   # lines of another shape: look at each (rare)
            for m in _RX_ODD_LINES.finditer(self.buf, start, hi - 1):
                self._judge(m.start() + 1)
        if lo == 0 and self.size:
            self._judge(0)

    def _judge(self, ls: int) -> None:
        le = self.buf.find(b"\n", ls)
        line = self.buf[ls:le + 1 if le >= 0 else self.size]
        if line[:1] == b" ":
            self.spaces += 1
        elif b"QEMU_MONITOR_" not in line and not _shaped(line) and line.strip():
            self.garbage += 1

    def _finish_stats(self) -> LogStats | None:
        st = self.stats
        if st is not None:
            st.lines = self.newlines + (1 if self.size else 0)
            st.skipped = self.spaces - self.conts + self.garbage
            st.malformed = self.bad_probes
        return st


def _release(buf: Any, lo: int, hi: int) -> None:
    """Unmap the pages of [lo, hi) from this process once read: memory stays flat however large the log
    (the pages stay in the page cache; touching them again maps them back)."""
    if isinstance(buf, mmap.mmap) and hi - lo >= _CHUNK:
        start = lo - lo % mmap.PAGESIZE
        buf.madvise(mmap.MADV_DONTNEED, start, hi - start)


def _rule(line: bytes) -> str | None:
    """The rule a log line falls under (None for probe lines, garbage and lines no rule is about)."""
    if line[4:5] != b"-" or line[19:20] != b"." or line[10:11] != b" " or b"QEMU_MONITOR_" in line:
        return None
    for needle, rule in _RULES:
        if needle in line:
            return rule
    return None


def _payload(line: bytes, e: int, kind: str) -> bytes | None:
    """The JSON payload after the probe's key (``msg=``, ``reply=`` …), None when it is not one ``{…}``;
    for kinds without payload the rest of the line."""
    key = _PAYLOAD_KEY.get(kind)
    if key is None:
        return line[e:]
    if not line.startswith(key, e):
        e = line.find(key, e)
        if e < 0:
            return None
    payload = line[e + len(key):].rstrip(b"\r\n")
    return payload if payload.startswith(b"{") and payload.endswith(b"}") else None


# Parsers of the non-probe rules: line → the sink method's arguments (after the line start), or None.

def _parse_greeting(line: bytes, clock: _Clock) -> tuple[str] | None:
    v = _greeting_version(line)
    return (v,) if v else None


def _parse_monvm(line: bytes, clock: _Clock) -> tuple[bytes, str] | None:
    m = _RE_MONVM.search(line)
    if m is None or m.group(2) == b"(nil)" or clock(line[:28]) is None:
        return None
    return m.group(1), m.group(2).decode()


def _parse_named(line: bytes, clock: _Clock) -> tuple[Any, ...] | None:
    """``vm=0x… name=N``: a job start (``Starting job: API=…``) or a process line (maybe an image path)."""
    m = _RE_VMNAME.search(line)
    t = clock(line[:28]) if m else None
    if m is None or t is None:
        return None
    vm, name = m.group(1).decode(), _dec(m.group(2))
    job = _RE_JOB.search(line)
    if job:
        return "job", t, _tid(line), job.group(1).decode(), vm, name, b"job=async nested" in line
    path = _RE_PATH.search(line) if b"ath=" in line else None
    return "vm", t, vm, name, _dec(path.group(1)) if path else None


def _parse_jobend(line: bytes, clock: _Clock) -> tuple[float, int, str, int] | None:
    m = _RE_JOBEND.search(line)
    t = clock(line[:28]) if m else None
    if m is None or t is None:
        return None
    return t, int(m.group(1)), m.group(2).decode(), int(m.group(3))


def _parse_error(line: bytes, clock: _Clock) -> tuple[float, int, str] | None:
    t = clock(line[:28])
    return None if t is None else (t, _tid(line), _dec(line.split(b" : ", 2)[-1]).strip())


def _parse_version(line: bytes, clock: _Clock) -> tuple[str | None, str | None, str | None]:
    lv, qv, hn = _RE_LIBVIRT_VERSION.search(line), _RE_QEMU_VERSION.search(line), _RE_HOSTNAME.search(line)
    return (lv.group(1).decode() if lv else None, qv.group(1).decode() if qv else None,
            _dec(hn.group(1)) if hn else None)


_SIDE_PARSERS: dict[str, Callable[[bytes, _Clock], Any]] = {
    "greeting": _parse_greeting, "monvm": _parse_monvm, "named": _parse_named, "jobend": _parse_jobend,
    "error": _parse_error, "version": _parse_version,
}


class _Mapped:
    """A log file mapped read-only (an empty or unmappable file is read instead)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                try:
                    self.buf: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except (ValueError, OSError):          # empty, or a pipe/special file
                    self.buf = f.read()
        except OSError as exc:
            raise LogError(f"cannot read log {self.path}: {exc.strerror or exc}") from None

    def __enter__(self) -> _Mapped:
        return self

    def __exit__(self, *exc: object) -> None:
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()


# --------------------------------------------------------------------------------------------------
# Records: the tokens, one object each (for reading a log by hand)


@dataclass(slots=True)
class Record:
    """One parsed log fact. ``kind`` is one of:

    ``send`` (mon, payload=raw JSON bytes, fd), ``write`` (mon, payload, errno), ``sendfd`` (mon, fd),
    ``reply``/``event`` (mon, payload), ``new``/``close`` (mon), ``monvm`` (mon, vm),
    ``vmname`` (vm, name, text=image path), ``job`` (api, vm, name, tid, text="nested" or None),
    ``jobend`` (api, ret; tid = the job's thread), ``error`` (tid, text), ``version`` (vm=libvirt,
    name=qemu, text=hostname), ``greeting`` (text=QEMU version) and ``malformed`` (text).
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
    offset: int = 0


class _Records:
    """Sink turning tokens into :class:`Record` objects."""

    def __init__(self, buf: Any) -> None:
        self.buf = buf
        self.out: list[Record] = []

    def _cont(self, ls: int, rx: re.Pattern[bytes]) -> int | None:
        return _continuation(self.buf, ls, rx)

    def _probe(self, kind: str, ls: int, ptr: bytes, t: float, payload: bytes, tid: int = 0, **kw: Any) -> None:
        self.out.append(Record(kind, t, tid, mon=ptr.decode(), payload=payload, offset=ls, **kw))

    def send(self, ls: int, t: float, ptr: bytes, payload: bytes, ex: bytes | None = None) -> None:
        self._probe("send", ls, ptr, t, payload, fd=self._cont(ls, _RE_FD), tid=_tid(_line_at(self.buf, ls)))

    def write(self, ls: int, t: float, ptr: bytes, payload: bytes, ex: bytes | None = None) -> None:
        self._probe("write", ls, ptr, t, payload, ret=self._cont(ls, _RE_ERRNO))

    def sendfd(self, ls: int, t: float, ptr: bytes, rest: bytes, ex: bytes | None = None) -> None:
        m = _RE_FD.search(rest)
        self._probe("sendfd", ls, ptr, t, b"", fd=int(m.group(1)) if m else None)

    def reply(self, ls: int, t: float, ptr: bytes, payload: bytes, ex: bytes | None = None) -> None:
        self._probe("reply", ls, ptr, t, payload)

    def event(self, ls: int, t: float, ptr: bytes, payload: bytes, ex: bytes | None = None) -> None:
        self._probe("event", ls, ptr, t, payload)

    def new(self, ls: int, t: float, ptr: bytes, rest: bytes, ex: bytes | None = None) -> None:
        self._probe("new", ls, ptr, t, b"")

    def close(self, ls: int, t: float, ptr: bytes, rest: bytes, ex: bytes | None = None) -> None:
        self._probe("close", ls, ptr, t, b"")

    def monvm(self, ls: int, ptr: bytes, vm: str) -> None:
        self.out.append(Record("monvm", 0.0, 0, mon=ptr.decode(), vm=vm, offset=ls))

    def named(self, ls: int, what: str, t: float, *rest: Any) -> None:
        if what == "job":
            tid, api, vm, name, nested = rest
            self.out.append(Record("job", t, tid, vm=vm, name=name, api=api, text="nested" if nested else None,
                                   offset=ls))
        else:
            vm, name, path = rest
            self.out.append(Record("vmname", t, 0, vm=vm, name=name, text=path, offset=ls))

    def jobend(self, ls: int, t: float, tid: int, api: str, ret: int) -> None:
        self.out.append(Record("jobend", t, tid, api=api, ret=ret, offset=ls))

    def error(self, ls: int, t: float, tid: int, text: str) -> None:
        self.out.append(Record("error", t, tid, text=text, offset=ls))

    def version(self, ls: int, libvirt: str | None, qemu: str | None, hostname: str | None) -> None:
        self.out.append(Record("version", 0.0, 0, vm=libvirt, name=qemu, text=hostname, offset=ls))

    def greeting(self, ls: int, version: str) -> None:
        self.out.append(Record("greeting", 0.0, 0, text=version, offset=ls))

    def malformed(self, ls: int, line: bytes) -> None:
        self.out.append(Record("malformed", 0.0, 0, text=_dec(line[:200]).rstrip(), offset=ls))


def iter_records(path: str | os.PathLike[str], stats: LogStats | None = None) -> Iterator[Record]:
    """Yield the :class:`Record` s of the libvirtd log at *path* in file order, chunk by chunk.

    Lines that are neither log lines nor continuation lines count in ``stats.skipped``; monitor probes
    that cannot be parsed yield a ``malformed`` record and count in ``stats.malformed``. Raises
    :class:`LogError` when the file cannot be read.
    """
    with _Mapped(path) as log:
        sink = _Records(log.buf)
        lexer = _Lexer(log.buf, sink, anchors=_ALL_ANCHORS, stats=stats is not None)
        pos, size = 0, len(log.buf)
        while pos < size:
            end = lexer._chunk_end(pos, size)
            lexer.run(pos, end)
            yield from sink.out
            sink.out.clear()
            pos = end
        if stats is not None and lexer.stats is not None:
            for k, v in vars(lexer._finish_stats()).items():
                setattr(stats, k, v)


# --------------------------------------------------------------------------------------------------
# The state machine


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


@dataclass(eq=False)
class _Job:
    """A libvirt job: from its ``Starting job`` line (offset *line*) until it ends or another job of its
    thread replaces it (offset *stop*; -1 while it runs)."""

    tid: int
    api: str
    vm: str | None
    name: str | None
    start: float
    end: float | None = None
    ret: int | None = None
    error: str | None = None
    index: int = 0
    line: int = 0
    stop: int = -1


@dataclass(slots=True, eq=False)
class _Msg:
    """A collected message: its public fields (*body*) and what only the parser needs."""

    body: dict[str, Any]
    t: float
    job: _Job | None = None
    replies_to: str | None = None      # replies: the command they answer
    fds: int = 0                       # commands: 1 when SEND_MSG's continuation names an fd
    fdsent: int = 0                    # commands: IO_SEND_FD probes after it
    errno: int = 0                     # commands: a failed write


class _Track:
    """Private parser state of one monitor instance: its byte range in the file, the runs of jobs
    that sent its commands ([job, count], in order) and, when collected, its messages."""

    __slots__ = ("end", "last_cmd", "mon", "msgs", "outstanding", "replay", "runs", "start")

    def __init__(self, mon: Monitor, start: int) -> None:
        self.mon, self.start, self.end = mon, start, -1
        self.runs: list[list[Any]] = []
        self.msgs: list[_Msg] | None = None
        self.outstanding: dict[Any, _Msg] = {}
        self.last_cmd: _Msg | None = None
        self.replay: Iterator[_Job | None] | None = None

    def collect(self, runs: list[list[Any]]) -> None:
        """Collect messages; the job of the n-th command comes from *runs* (noted by the summary pass)."""
        self.msgs = []
        self.replay = (job for job, n in runs for _ in range(n))


def _hashable(v: Any) -> bool:
    return isinstance(v, str | int | float | bool) or v is None


class _Machine:
    """The one state machine over the tokens: monitor instances and pointer reuse, libvirt jobs,
    attribution of monitors to domains, and (for a collected instance) its messages.

    Summary pass: every instance gets a :class:`Monitor` and a :class:`_Track`. Collect pass
    (*collect* = (key, job runs), the lexer delivering one pointer's probes of the instance's byte
    range): the instance's messages. *since*/*until*: probes outside are ignored.
    """

    def __init__(self, buf: Any, since: float | None = None, until: float | None = None,
                 collect: tuple[str, list[list[Any]]] | None = None) -> None:
        self.buf = buf
        self.since, self.until = since, until
        self.windowed = since is not None or until is not None
        self.collect_key = collect
        self.monitors: dict[str, Monitor] = {}
        self.tracks: dict[str, _Track] = {}
        self.cur: dict[bytes, _Track] = {}            # pointer → live instance (closed ones leave)
        self.generation: dict[bytes, int] = {}
        self.tid_job: dict[int, _Job] = {}
        self.tids: dict[bytes, int] = {}
        self.vm_live: dict[str, list[Monitor]] = {}
        self.vm_names: dict[str, str] = {}
        self.vm_images: dict[str, str] = {}
        self.job_count = 0
        self.first_greeting: str | None = None       # the first QMP greeting's QEMU version
        self.last_new: Monitor | None = None          # the greeting belongs to the newest monitor
        self.undecodable = 0                          # collected payloads that are not the JSON expected

    def _inside(self, t: float) -> bool:
        return (self.since is None or t >= self.since) and (self.until is None or t <= self.until)

    def _instance(self, ptr: bytes, ls: int) -> _Track:
        """A new instance of monitor pointer *ptr*, from the line at *ls* on (a live one ends there)."""
        tr = self.cur.get(ptr)
        if tr is not None:
            tr.end = ls
        n = self.generation.get(ptr, 0) + 1
        self.generation[ptr] = n
        sp = ptr.decode()
        mon = Monitor(key=sp if n == 1 else f"{sp}#{n}", pointer=sp)
        tr = _Track(mon, ls)
        if self.collect_key is not None and mon.key == self.collect_key[0]:
            tr.collect(self.collect_key[1])
        self.cur[ptr] = self.tracks[mon.key] = tr
        self.monitors[mon.key] = mon
        return tr

    def _live(self, ptr: bytes, ls: int) -> _Track:
        """The live instance of *ptr*; a pointer seen again after its close starts a new one."""
        return self.cur.get(ptr) or self._instance(ptr, ls)

    def _attribute(self, m: Monitor, vm: str | None, name: str | None) -> None:
        if vm and m.vm is None:
            m.vm = vm
            self.vm_live.setdefault(vm, []).append(m)
        if m.domain is None:
            m.domain = name or (self.vm_names.get(m.vm) if m.vm else None)

    def finish(self, size: int) -> None:
        for tr in self.cur.values():
            tr.end = size

    # -- probes ------------------------------------------------------------------------------------

    def send(self, ls: int, t: float, ptr: bytes, payload: bytes, ex: bytes | None = None) -> None:
        if self.windowed and not self._inside(t):
            return
        tr = self.cur.get(ptr) or self._instance(ptr, ls)
        m = tr.mon
        if m.first is None:
            m.first = t
        m.last = t
        m.commands += 1
        if tr.replay is not None:
            job = next(tr.replay, None)
        else:
            job = self.tid_job.get(self._thread(ls)) if self.tid_job else None
            runs = tr.runs
            if runs and runs[-1][0] is job:
                runs[-1][1] += 1
            else:                                   # another job's commands begin
                runs.append([job, 1])
                if job is not None:
                    self._attribute(m, job.vm, job.name)
                    if job.api not in m.operations:
                        m.operations.append(job.api)
        if ex is None or ex in _NOTABLE_B:
            _note_command(m, payload)
        if tr.msgs is not None:
            self._command(tr, payload, t, job, ls)

    def _thread(self, ls: int) -> int:
        key = self.buf[ls + 30:ls + 44]
        tid = self.tids.get(key)
        if tid is None:
            if key.find(b":") < 0:                 # an unusually long thread field: the whole line
                le = self.buf.find(b"\n", ls)
                return _tid(self.buf[ls:le + 1 if le >= 0 else len(self.buf)])
            tid = self.tids[key] = _tid(self.buf[ls:ls + 44])
        return tid

    def reply(self, ls: int, t: float, ptr: bytes, payload: bytes, ex: bytes | None = None) -> None:
        if self.windowed and not self._inside(t):
            return
        tr = self.cur.get(ptr) or self._instance(ptr, ls)
        m = tr.mon
        if m.first is None:
            m.first = t
        m.last = t
        m.replies += 1
        if b'"error"' in payload:
            m.errors += 1
        if tr.msgs is not None:
            self._reply(tr, payload, t)

    def event(self, ls: int, t: float, ptr: bytes, payload: bytes, ex: bytes | None = None) -> None:
        if self.windowed and not self._inside(t):
            return
        tr = self.cur.get(ptr) or self._instance(ptr, ls)
        m = tr.mon
        if m.first is None:
            m.first = t
        m.last = t
        m.events += 1
        if b'"MIGRATION"' in payload:
            s = _RE_STATUS.search(payload)
            if s:
                m.migration_status = s.group(1).decode()
        if tr.msgs is not None:
            self._event(tr, payload, t)

    def write(self, ls: int, t: float, ptr: bytes, payload: bytes, ex: bytes | None = None) -> None:
        if self.windowed and not self._inside(t):
            return
        tr = self._live(ptr, ls)
        if tr.msgs is not None and tr.last_cmd is not None:
            errno = _continuation(self.buf, ls, _RE_ERRNO)
            if errno:
                tr.last_cmd.errno = errno

    def sendfd(self, ls: int, t: float, ptr: bytes, rest: bytes, ex: bytes | None = None) -> None:
        if self.windowed and not self._inside(t):
            return
        tr = self._live(ptr, ls)
        if tr.msgs is not None and tr.last_cmd is not None:
            tr.last_cmd.fdsent += 1

    def new(self, ls: int, t: float, ptr: bytes, rest: bytes, ex: bytes | None = None) -> None:
        tr = self._instance(ptr, ls)
        tr.mon.opened = t
        self.last_new = tr.mon

    def close(self, ls: int, t: float, ptr: bytes, rest: bytes, ex: bytes | None = None) -> None:
        tr = self.cur.pop(ptr, None)
        if tr is None:
            return
        m = tr.mon
        m.closed = t
        le = self.buf.find(b"\n", ls)
        tr.end = le + 1 if le >= 0 else len(self.buf)
        if m.vm and m in self.vm_live.get(m.vm, ()):
            self.vm_live[m.vm].remove(m)

    # -- other lines -------------------------------------------------------------------------------

    def monvm(self, ls: int, ptr: bytes, vm: str) -> None:
        self._attribute(self._live(ptr, ls).mon, vm, None)

    def named(self, ls: int, what: str, t: float, *rest: Any) -> None:
        if what == "job":
            self._job_start(ls, t, *rest)
        else:
            vm, name, path = rest
            self._name_vm(vm, name)
            if path:
                self.vm_images[vm] = path

    def _name_vm(self, vm: str, name: str) -> None:
        self.vm_names[vm] = name
        for m in self.vm_live.get(vm, ()):
            if m.domain is None:
                m.domain = name

    def _job_start(self, ls: int, t: float, tid: int, api: str, vm: str, name: str, nested: bool) -> None:
        self._name_vm(vm, name)
        j = self.tid_job.get(tid)
        # A top-level "Starting job" is a new job; "job=async nested" continues the thread's async job.
        if j is None or j.api != api or j.end is not None or not nested:
            if j is not None:
                j.stop = ls
            self.tid_job[tid] = _Job(tid, api, vm, name, t, index=self.job_count, line=ls)
            self.job_count += 1

    def jobend(self, ls: int, t: float, tid: int, api: str, ret: int) -> None:
        j = self.tid_job.get(tid)
        if j is not None and j.api == api:
            j.end, j.ret, j.stop = t, ret, ls
            del self.tid_job[tid]

    def error(self, ls: int, t: float, tid: int, text: str) -> None:
        j = self.tid_job.get(tid)
        if j is not None:
            j.error = text

    def greeting(self, ls: int, version: str) -> None:
        self.first_greeting = self.first_greeting or version
        if self.last_new is not None and self.last_new.qemu_version is None:
            self.last_new.qemu_version = version

    # -- messages (collect pass) -------------------------------------------------------------------

    def _command(self, tr: _Track, payload: bytes, t: float, job: _Job | None, ls: int) -> None:
        obj = _loads(payload)
        execute = (obj.get("execute") or obj.get("exec-oob")) if isinstance(obj, dict) else None
        if not isinstance(execute, str) or not isinstance(obj.get("arguments", {}), dict):
            self.undecodable += 1      # not the shape of a QMP command (the trace model's): malformed
            return
        body: dict[str, Any] = {"kind": "command", "execute": execute}
        if "arguments" in obj:
            body["arguments"] = obj["arguments"]
        body["id"] = obj.get("id")
        fd = _continuation(self.buf, ls, _RE_FD)
        msg = _Msg(body, t, job=job, fds=1 if fd is not None and fd >= 0 else 0)
        tr.msgs.append(msg)  # type: ignore[union-attr]
        tr.last_cmd = msg
        if _hashable(body["id"]):
            tr.outstanding[body["id"]] = msg

    def _reply(self, tr: _Track, payload: bytes, t: float) -> None:
        obj = _loads(payload)
        if not isinstance(obj, dict) or not isinstance(obj.get("error", {}), dict):
            self.undecodable += 1
            return
        rid = obj.get("id")
        out = tr.outstanding
        cmd = out.pop(rid, None) if _hashable(rid) else None
        if cmd is None and rid is None and len(out) == 1:     # error replies may lack the id
            rid, cmd = out.popitem()
        body: dict[str, Any] = {"kind": "reply", "id": rid}
        if "error" in obj:
            body["error"] = obj["error"]
        else:
            body["return"] = obj.get("return", {})
        tr.msgs.append(_Msg(body, t, replies_to=cmd.body["execute"] if cmd else None))  # type: ignore[union-attr]

    def _event(self, tr: _Track, payload: bytes, t: float) -> None:
        obj = _loads(payload)
        if (not isinstance(obj, dict) or not isinstance(obj.get("event"), str)
                or not isinstance(obj.get("data", {}), dict) or not isinstance(obj.get("timestamp", {}), dict)):
            self.undecodable += 1
            return
        body = {"kind": "event", "event": obj["event"], "data": obj.get("data"), "timestamp": obj.get("timestamp")}
        tr.msgs.append(_Msg(body, t))  # type: ignore[union-attr]


def _note_command(m: Monitor, payload: bytes) -> None:
    """Remember a notable command (and a migration's URI) in the monitor's summary."""
    ex = _RE_EXEC.search(payload)
    if ex is None or ex.group(1) not in _NOTABLE_B:
        return
    execute = ex.group(1).decode()
    if len(m.notable) < 200:
        m.notable.append(execute)
    if execute in ("migrate", "migrate-incoming"):
        u = _RE_URI.search(payload)
        if u:
            m.migrate_uris.append(_dec(u.group(1)))


def _line_at(buf: Any, ls: int) -> bytes:
    """The line starting at *ls*, with its newline."""
    le = buf.find(b"\n", ls)
    return buf[ls:le + 1 if le >= 0 else len(buf)]  # type: ignore[no-any-return]


def _continuation(buf: Any, ls: int, rx: re.Pattern[bytes]) -> int | None:
    """The number *rx* finds on the continuation line after the line at *ls* (`` fd=…``, `` errno=…``)."""
    end = buf.find(b"\n", ls)
    if end < 0 or buf[end + 1:end + 2] != b" ":
        return None
    m = rx.search(_line_at(buf, end + 1))
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------------
# Passes


_SUMMARY_KINDS = frozenset({"send", "reply", "event", "sendfd", "new", "close"})


def _summarize(log: _Mapped, since: float | None, until: float | None, *, stats: bool = False,
               focus: frozenset[bytes] | None = None) -> tuple[_Machine, LogStats | None]:
    """The summary pass over the whole log (with *stats*: also count lines, garbage, malformed probes).

    *focus*: summarize only the instances of these monitor pointers (every other line is still read:
    jobs, names, greetings and the counters do not depend on it).
    """
    machine = _Machine(log.buf, since, until)
    st = _Lexer(log.buf, machine, anchors=_SUMMARY_ANCHORS, kinds=_SUMMARY_KINDS, stats=stats, focus=focus).run()
    machine.finish(len(log.buf))
    return machine, st


def _collect(log: _Mapped, sc: _Machine, key: str) -> tuple[list[_Msg], int]:
    """The messages of instance *key*: its probes only, from its byte range (messages, malformed)."""
    track = sc.tracks[key]
    ptr, _, n = key.partition("#")
    machine = _Machine(log.buf, sc.since, sc.until, collect=(key, track.runs))
    machine.generation[ptr.encode()] = int(n) - 1 if n else 0
    _Lexer(log.buf, machine, rules=False, focus=frozenset({ptr.encode()})).run(track.start, track.end)
    got = machine.tracks.get(key)
    return (got.msgs or [] if got is not None else []), machine.undecodable


class _ErrorsOf:
    """Sink keeping the last error line of one job's thread (what libvirt reported for the job)."""

    def __init__(self, job: _Job) -> None:
        self.job = job

    def error(self, ls: int, t: float, tid: int, text: str) -> None:
        if tid == self.job.tid:
            self.job.error = text


def _job_errors(log: _Mapped, jobs: Iterable[_Job]) -> None:
    """Set each job's error from the error lines of its thread while it ran."""
    for job in jobs:
        job.error = None
        stop = job.stop if job.stop >= 0 else len(log.buf)
        _Lexer(log.buf, _ErrorsOf(job), anchors=(_ANCHOR_ERROR,), kinds=()).run(job.line, stop)


def _windows_back(buf: Any) -> Iterator[tuple[int, int]]:
    """[lo, hi) windows of whole lines covering *buf*, last first."""
    hi = len(buf)
    while hi > 0:
        lo = buf.rfind(b"\n", 0, max(hi - _CHUNK, 0)) + 1 if hi > _CHUNK else 0
        yield lo, hi
        hi = lo


def _last_lines(buf: Any, needle: bytes) -> Iterator[bytes]:
    """The lines holding *needle*, last first (pages are released behind the search)."""
    for lo, hi in _windows_back(buf):
        end = hi
        while (p := buf.rfind(needle, lo, end)) >= 0:
            end = buf.rfind(b"\n", lo, p) + 1 or lo
            le = buf.find(b"\n", p, hi)
            yield buf[end:le + 1 if le >= 0 else hi]
        _release(buf, lo, hi)


def _banner(buf: Any, qemu: bool = True) -> tuple[str | None, str | None, str | None]:
    """(libvirt, qemu, hostname): the last value of each in libvirt's banner lines, searched from the end.

    *qemu* False skips the QEMU version (never in libvirtd's own banner: looking costs a whole scan).
    """
    found: list[str | None] = [None, None, None]
    clock = _Clock()
    for i, needle in enumerate((b"libvirt version:", b"qemu version:", b"hostname:")):
        if i == 1 and not qemu:
            continue
        for line in _last_lines(buf, needle):
            found[i] = _parse_version(line, clock)[i] if _rule(line) == "version" else None
            if found[i]:
                break
    return found[0], found[1], found[2]


# --------------------------------------------------------------------------------------------------
# Phases


def _is_command(m: _Msg) -> bool:
    return m.body["kind"] == "command"


def _spans(msgs: list[_Msg]) -> list[tuple[str, int, int, int]]:
    """(name, start, end inclusive, anchor index) for every operation in one instance's conversation.

    With job tags (the log has ``Starting job`` lines) the operation is the span from the first to the
    last command its libvirt job sent, including commands other jobs slipped in between (a
    ``query-migrate`` from ``virsh domjobinfo``) and up to the next command after it. Without tags
    the command names decide (:data:`SAVE_PREP`, :data:`SAVE_TAIL`, :data:`RESTORE_TAIL`; ``query-*``
    probes are taken as part of the tail).
    """
    out: list[tuple[str, int, int, int]] = []
    cmds = [i for i, m in enumerate(msgs) if _is_command(m)]
    anchors = [n for n, i in enumerate(cmds) if msgs[i].body["execute"] in ("migrate", "migrate-incoming")]
    for q, n in enumerate(anchors):
        lo_n = anchors[q - 1] + 1 if q else 0                      # commands after the previous anchor
        hi_n = anchors[q + 1] - 1 if q + 1 < len(anchors) else len(cmds) - 1
        save = msgs[cmds[n]].body["execute"] == "migrate"
        start = cmds[_first_command(msgs, cmds, n, lo_n)] if save else 0
        e = _last_command(msgs, cmds, n, hi_n, SAVE_TAIL if save else RESTORE_TAIL)
        end = cmds[e + 1] - 1 if e + 1 < len(cmds) else len(msgs) - 1
        if out and start <= out[-1][2]:   # the previous tail ran into this operation: cut it there
            prev = out[-1]
            out[-1] = (prev[0], prev[1], start - 1, prev[3])
        out.append(("save" if save else "restore", start, end, cmds[n]))
    # Close gaps between phases of the same instance (restore … later save): nothing in between is dropped.
    for n in range(len(out) - 1):
        name, s, _e, a = out[n]
        out[n] = (name, s, out[n + 1][1] - 1, a)
    return out


def _first_command(msgs: list[_Msg], cmds: list[int], n: int, lo_n: int) -> int:
    """Index (into *cmds*) of a save's first command: its job's first, or the contiguous preparation."""
    job = msgs[cmds[n]].job
    s = n
    if job is not None:
        for k in range(n - 1, lo_n - 1, -1):
            m = msgs[cmds[k]]
            if m.job is job:
                s = k
            elif m.job is not None and not m.body["execute"].startswith("query-"):
                break
    else:
        while s > lo_n and msgs[cmds[s - 1]].body["execute"] in SAVE_PREP:
            s -= 1
    return s


def _last_command(msgs: list[_Msg], cmds: list[int], n: int, hi_n: int, tail: frozenset[str]) -> int:
    """Index (into *cmds*) of an operation's last command: its job's last, or the end of its tail."""
    job = msgs[cmds[n]].job
    e = n
    if job is not None:
        for k in range(n + 1, hi_n + 1):
            c = msgs[cmds[k]]
            if c.job is job or (c.job is None and c.body["execute"] in tail and e == k - 1):
                e = k
    else:
        while e < hi_n and (msgs[cmds[e + 1]].body["execute"] in tail
                            or msgs[cmds[e + 1]].body["execute"].startswith("query-")):
            e += 1
    return e


def _status(msgs: list[_Msg], anchor: int) -> tuple[bool | None, str | None]:
    """ok/error of an operation from its messages (MIGRATION events, query-migrate, error replies)."""
    ok: bool | None = None
    error: str | None = None
    anchor_id = msgs[anchor].body.get("id")
    for m in msgs[anchor:]:
        b = m.body
        if b["kind"] == "reply" and "error" in b:
            if b["id"] == anchor_id or m.replies_to in ("migrate", "migrate-incoming", "getfd", "add-fd"):
                ok = False
                error = error or _errtext(b["error"])
            continue
        status = _status_of(m)
        if status == "completed" and ok is None:
            ok = True
        elif status in ("failed", "cancelled"):
            ok = False
            error = _failure(b, status, error)
    return ok, error


def _status_of(m: _Msg) -> Any:
    """The migration status a MIGRATION event or a query-migrate reply tells."""
    b = m.body
    if b["kind"] == "event" and b["event"] == "MIGRATION":
        data = b.get("data")
        return data.get("status") if isinstance(data, dict) else None
    if b["kind"] == "reply" and m.replies_to == "query-migrate" and isinstance(b.get("return"), dict):
        return b["return"].get("status")
    return None


def _failure(b: dict[str, Any], status: str, error: str | None) -> str | None:
    """The error text after a failed migration: query-migrate's ``error-desc`` wins, else the first seen."""
    if b["kind"] == "event":
        return error or f"migration {status}"
    desc = b["return"].get("error-desc")
    return str(desc) if desc else error


def _errtext(e: Any) -> str:
    if isinstance(e, dict):
        return f"{e.get('class', 'Error')}: {e.get('desc', '')}".strip()
    return str(e)


def _iso(t: float) -> str:
    """Epoch seconds as ISO 8601 UTC with milliseconds (libvirt's log resolution).

    >>> _iso(1795633427.983)
    '2026-11-25T19:03:47.983+00:00'
    """
    return _dt.datetime.fromtimestamp(round(t, 3), _dt.UTC).isoformat(timespec="milliseconds")


_ASYNC_JOB_END = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})([+-]\d{4}): \d+: \w+ : \w+:\d+ : "
                            r"Stopping async job: (\S+) \(vm=0x[0-9a-fA-F]+ name=(.*)\)\s*$")


def async_job_ends(lines: Iterable[str], domain: str) -> Iterator[tuple[str, float]]:
    """(job, epoch seconds) of each end of an async job of *domain* (``save``, ``start`` …) in *lines*:
    libvirt's ``Stopping async job`` line (filter ``1:job``), logged once every step of the job is done.

    >>> line = ("2026-11-25 19:03:49.831+0000: 15835: debug : virDomainObjEndAsyncJob:652 : "
    ...         "Stopping async job: save (vm=0x7fe828004ba0 name=fxa)")
    >>> list(async_job_ends([line], "fxa")), list(async_job_ends([line], "fxb"))
    ([('save', 1795633429.831)], [])
    """
    for line in lines:
        m = _ASYNC_JOB_END.match(line)
        if m and m.group(4) == domain:
            yield m.group(3), _dt.datetime.strptime(m.group(1) + m.group(2), "%Y-%m-%d %H:%M:%S.%f%z").timestamp()


def _public(part: list[_Msg]) -> list[dict[str, Any]]:
    """The trace messages: public fields, ``t`` relative to the first message, the ``fds`` count."""
    t0 = part[0].t
    out = []
    for m in part:
        b = m.body
        t = max(m.t - t0, 0.0)     # a log whose clock went back (hand-edited, spliced) never gives t < 0
        if b["kind"] == "command":
            msg = _trace.command(b["execute"], b.get("arguments"), id=b["id"], fds=max(m.fds, m.fdsent), t=t)
            if m.errno:
                msg["write_errno"] = m.errno
        elif b["kind"] == "reply":
            msg = {**b, "t": round(t, 6)}
        else:
            msg = _trace.event(b["event"], b["data"], b["timestamp"], t=t)
        out.append(msg)
    return out


@dataclass
class _Phase:
    start: float
    end: float
    body: dict[str, Any]


def _phase(sc: _Machine, key: str, msgs: list[_Msg], span: tuple[str, int, int, int], images: dict[str, str]
           ) -> _Phase:
    name, s, e, a = span
    part = msgs[s:e + 1]
    job = msgs[a].job
    operation = OPERATIONS.get(job.api, name) if job else name
    ok, error = _status(part, a - s)
    if job is not None and job.ret is not None:
        if job.ret != 0:   # libvirt's own last error of the job is what the user was told
            ok = False
            error = job.error or error or f"{job.api} failed"
        elif ok is None:
            ok = True
    mon = sc.monitors[key]
    image = None
    if name == "restore" and mon.vm and mon.vm in images:
        image = {"path": images[mon.vm], "size": None, "header": None}
    body = {
        "name": name, "operation": operation, "ok": ok, "error": error if ok is False else None,
        "image": image, "monitor": key,
        "attribution": {"job": job.api if job else None, "domain": mon.domain, "vm": mon.vm},
        "messages": _public(part),
        "window": {"since": _iso(part[0].t), "until": _iso(part[-1].t)},
    }
    return _Phase(part[0].t, part[-1].t, body)


def _build_phases(sc: _Machine, conversations: dict[str, list[_Msg]], lo: float | None = None,
                  hi: float | None = None) -> tuple[list[dict[str, Any]], int, list[str]]:
    """Turn the collected conversations into trace phases, in time order.

    Returns (phases, unphased, unphased_executes): messages of those monitors inside the window that
    belong to no phase. The window is [lo, hi]; ``None`` ends default to the first phase start and
    the last phase end.
    """
    built: list[_Phase] = []
    leftovers: list[_Msg] = []
    for key, msgs in conversations.items():
        covered = [False] * len(msgs)
        for span in _spans(msgs):
            built.append(_phase(sc, key, msgs, span, sc.vm_images))
            covered[span[1]:span[2] + 1] = [True] * (span[2] + 1 - span[1])
        leftovers += [m for m, c in zip(msgs, covered, strict=True) if not c]
    built.sort(key=lambda p: p.start)
    w_lo = lo if lo is not None or not built else built[0].start
    w_hi = hi if hi is not None or not built else max(p.end for p in built)
    unphased = [m for m in leftovers if (w_lo is None or m.t >= w_lo) and (w_hi is None or m.t <= w_hi)]
    what = [m.body.get("execute") or m.body.get("event") or "reply" for m in unphased][:50]
    return [p.body for p in built], len(unphased), what


# --------------------------------------------------------------------------------------------------
# Public API


@dataclass
class Scan:
    """What one summary pass learns: monitor instances, jobs, names, host facts, counters."""

    monitors: dict[str, Monitor] = field(default_factory=dict)
    job_count: int = 0
    vm_names: dict[str, str] = field(default_factory=dict)
    vm_images: dict[str, str] = field(default_factory=dict)
    libvirt_version: str | None = None
    qemu_version: str | None = None
    hostname: str | None = None
    stats: LogStats | None = None


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


def scan(path: str | os.PathLike[str], *, since: Any = None, until: Any = None, stats: bool = False) -> Scan:
    """One pass over the log at *path*: every monitor instance summarized, plus names and host facts.

    *since*/*until* (epoch seconds, ``datetime`` or ISO strings): only probes inside count. *stats*:
    also count lines, garbage lines and malformed probes (``Scan.stats``). Raises :class:`LogError`.
    """
    with _Mapped(path) as log:
        sc, st = _summarize(log, _to_epoch(since), _to_epoch(until), stats=stats)
        libvirt, qemu, hostname = _banner(log.buf)
    return Scan(sc.monitors, sc.job_count, sc.vm_names, sc.vm_images, libvirt, qemu or sc.first_greeting, hostname, st)


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
    with _Mapped(path) as log:
        sc, _ = _summarize(log, _to_epoch(since), _to_epoch(until))
    mons = sorted(sc.monitors.values(), key=lambda m: (m.first if m.first is not None else float("inf")))
    return [m.to_dict() for m in mons]


def scan_floor(path: str | os.PathLike[str], *, whole: bool = False) -> int:
    """The regex passes this parser makes over *path*, with nothing done per line: what a summary
    (:func:`list_monitors`) or, with *whole*, an import (:func:`trace_from_log`: the line statistics
    and the IO_WRITE probes too) costs before any Python runs for a line — the floor of its cost.
    The bench times it beside P5/P5b. Returns how many matches the passes visited.

    It runs exactly the patterns :class:`_Lexer` runs (chunk by chunk, pages released), and only visits
    each match, so ``summary time − floor`` is what the per-line work costs.

    >>> scan_floor("tests/fixtures/libvirt-9.0-attributed/managedsave-running.log") > 0
    True
    """
    rxs = (_RX_ALL if whole else _RX_SUMMARY, *_SUMMARY_ANCHORS)
    visited = 0
    with _Mapped(path) as log:
        buf, pos, size = log.buf, 0, len(log.buf)
        chunks = _Lexer(buf, None, kinds=(), rules=False)       # its chunking only
        while pos < size:
            end = chunks._chunk_end(pos, size)
            if whole:                               # the line statistics, as _Lexer._count_lines
                visited += Counter(_RX_LINE_HEADS.findall(buf, max(pos - 1, 0), end - 1)).total()
            for rx in rxs:
                visited += sum(1 for _ in rx.finditer(buf, pos, end))
            _release(buf, pos, end)
            pos = end
    return visited


def _select(monitors: dict[str, Monitor], domain: str | None, monitor: str | Iterable[str] | None
            ) -> tuple[list[str], str | None, str]:
    """Pick the monitor instances of the trace; returns (keys, domain name, how it was decided)."""
    cands = sorted((m for m in monitors.values() if m.commands > 0), key=lambda m: m.first or 0.0)
    if monitor:
        return _select_given(monitors, cands, domain, monitor)
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
    if not pool_named and len({m.vm or m.key for m in pool}) == 1:
        # The log names no domain: accept one unambiguous group, i.e. all saving/restoring instances share
        # one vm pointer (libvirt's virDomainObj outlives the QEMU processes of a persistent domain).
        how = "assumed: the log does not name domains and holds one domain object's save/restore monitors"
        return [m.key for m in pool], domain, how
    what = f"domain {domain}" if domain else "the domain"
    if not domain and pool_named:
        what = f"the domain (several in the log: {', '.join(sorted(pool_named))}; name one)"
    raise AmbiguousMonitor(
        f"log holds {len(pool)} monitors and cannot tell which is {what}'s; pick with --monitor: "
        + "; ".join(m.describe() for m in pool), [m.to_dict() for m in pool])


def _select_given(monitors: dict[str, Monitor], cands: list[Monitor], domain: str | None,
                  monitor: str | Iterable[str]) -> tuple[list[str], str | None, str]:
    wanted = [w.strip() for w in ([monitor] if isinstance(monitor, str) else list(monitor))
              for w in w.split(",") if w.strip()]
    keys: list[str] = []
    for w in wanted:
        hit = [m.key for m in cands if (m.key == w if "#" in w else m.pointer == w)]
        if not hit:
            raise LogError(f"monitor {w} not found in log; monitors: "
                           + ", ".join(m.key for m in cands) if cands else f"monitor {w}: log has no monitors")
        keys += [k for k in hit if k not in keys]
    names = {d for k in keys if (d := monitors[k].domain)}
    if domain and names and domain not in names:
        raise LogError(f"monitor(s) {', '.join(keys)} belong to {', '.join(sorted(names))}, not {domain}")
    return keys, domain or (names.pop() if len(names) == 1 else None), "monitor"


def _pointers(monitor: str | list[str] | None) -> frozenset[bytes] | None:
    """The monitor pointers named by *monitor* (``0x…``, ``0x…#N``, comma-separated or a list), None if none.

    >>> sorted(_pointers("0x7f01#2, 0x7f02"))
    [b'0x7f01', b'0x7f02']
    """
    if not monitor:
        return None
    wanted = [w.strip() for w in ([monitor] if isinstance(monitor, str) else monitor) for w in w.split(",")]
    return frozenset(w.partition("#")[0].encode("utf-8", "surrogateescape") for w in wanted if w)


def _summarize_select(log: _Mapped, lo: float | None, hi: float | None, domain: str | None,
                      monitor: str | list[str] | None
                      ) -> tuple[_Machine, LogStats | None, list[str], str | None, str]:
    """The import's summary pass and its choice of instances. When the monitors are named, the pass
    follows only their pointers (what the choice and the trace read of the summary is the same); when
    the choice fails, a whole summary gives the error its list of the log's monitors."""
    focus = _pointers(monitor)
    sc, st = _summarize(log, lo, hi, stats=True, focus=focus)
    try:
        keys, name, how = _select(sc.monitors, domain, monitor)
    except LogError:
        if focus is None:
            raise
        sc, st = _summarize(log, lo, hi, stats=True)
        keys, name, how = _select(sc.monitors, domain, monitor)
    return sc, st, keys, name, how


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
    if monitor is not None and not isinstance(monitor, str):
        monitor = list(monitor)
    with _Mapped(path) as log:
        sc, st, keys, name, how = _summarize_select(log, lo, hi, domain, monitor)
        conversations: dict[str, list[_Msg]] = {}
        for key in keys:
            conversations[key], bad = _collect(log, sc, key)
            st.malformed += bad  # type: ignore[union-attr]
        _job_errors(log, {m.job for msgs in conversations.values() for m in msgs if m.job is not None})
        phases, unphased, unphased_what = _build_phases(sc, conversations, lo, hi)
        if not phases:
            raise LogError(f"no save or restore (migrate / migrate-incoming) found on monitor(s) {', '.join(keys)}")
        qemu = next((sc.monitors[k].qemu_version for k in keys if sc.monitors[k].qemu_version), None)
        libvirt, banner_qemu, hostname = _banner(log.buf, qemu=qemu is None)
    host = {"libvirt": libvirt, "qemu": qemu or banner_qemu or sc.first_greeting, "hostname": hostname}
    tr = _trace.new_trace("libvirt", host=host, domain={"name": name})
    tr["phases"] = phases
    tr["log"] = {
        "path": os.path.abspath(os.fspath(path)), "lines": st.lines, "skipped": st.skipped,  # type: ignore[union-attr]
        "malformed": st.malformed, "monitors": keys, "attribution": how,  # type: ignore[union-attr]
        "unphased": unphased, "unphased_messages": unphased_what,
    }
    return tr
