"""Parse a domain's QEMU log as libvirt writes it (``/var/log/libvirt/qemu/NAME.log``).

Each QEMU start is a block::

    2026-11-25 18:58:10.516+0000: starting up libvirt version: 9.0.0, package: 9.0.0-4+deb12u2 (Debian), \
qemu version: 7.2.22Debian 1:7.2+dfsg-7+deb12u18+b3, kernel: 6.18.44-fc-v669, hostname: vm
    LC_ALL=C \\
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin \\
    /usr/bin/qemu-system-x86_64 \\
    -name guest=fxa,debug-threads=on \\
    -object '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/..."}' \\
    ...
    -msg timestamp=on
    <QEMU's own stderr lines, warnings>
    2026-11-25 18:58:12.965+0000: shutting down, reason=saved

The command line is shell-quoted by libvirt, one option per line ending in `` \\``; the first line
without the trailing backslash ends it. It is read with the command-line model
(:mod:`virtsave.trace.argv`): the leading ``NAME=value`` words are the environment, the next word is
the binary (``argv[0]``).

Example::

    >>> starts = parse_domain_log("tests/fixtures/qemu-domain-logs/fxa.log")
    >>> starts[0].libvirt_version, starts[0].qemu_version, starts[0].argv[0]
    ('9.0.0', '7.2.22', '/usr/bin/qemu-system-x86_64')
    >>> argv_from_domain_log("tests/fixtures/qemu-domain-logs/fxa.log")[1:3]
    ['-name', 'guest=fxa,debug-threads=on']
"""

from __future__ import annotations

import calendar
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from virtsave.core.errors import LogError
from virtsave.trace import argv as qargv

__all__ = ["QemuStart", "argv_from_domain_log", "last_start", "parse_domain_log", "parse_domain_log_text",
           "running_at", "start_at"]

_START = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})([+-]\d{4}): starting up (.*)$")
_START_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})([+-]\d{4}): starting up ")
_START_ANYWHERE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}[+-]\d{4}: starting up ", re.M)
_END = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})([+-]\d{4}): shutting down(?:, reason=(\S+))?")
_LIBVIRT = re.compile(r"libvirt version: ([0-9][0-9.]*[0-9])(?:, package: ([^,]*))?")
_QEMU = re.compile(r"qemu version: ([0-9]+(?:\.[0-9]+)*)([^,]*)")
_KERNEL = re.compile(r"kernel: ([^,]+)")
_HOST = re.compile(r"hostname: (\S+)")


@dataclass
class QemuStart:
    """One QEMU start recorded in a domain log."""

    time: float                      # epoch seconds of the "starting up" line
    time_iso: str
    libvirt_version: str | None = None
    libvirt_package: str | None = None
    qemu_version: str | None = None  # numeric part, e.g. "7.2.22"
    qemu_package: str | None = None  # the rest, e.g. "Debian 1:7.2+dfsg-7+deb12u18+b3"
    kernel: str | None = None
    hostname: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)   # argv[0] is the QEMU binary
    complete: bool = True            # False when the command line block was cut or unbalanced
    shutdown_reason: str | None = None
    shutdown_time: float | None = None
    messages: list[str] = field(default_factory=list)   # lines between the command line and shutdown

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _epoch(stamp: str, off: str) -> float:
    y, mo, d = int(stamp[0:4]), int(stamp[5:7]), int(stamp[8:10])
    h, mi, s, ms = int(stamp[11:13]), int(stamp[14:16]), int(stamp[17:19]), int(stamp[20:23])
    sign = -1 if off[0] == "-" else 1
    offs = sign * (int(off[1:3]) * 3600 + int(off[3:5]) * 60)
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) - offs + ms / 1000.0


def _finish(start: QemuStart, lines: list[str], complete: bool) -> None:
    words, ok = qargv.shell_words(" ".join(lines))   # not ok: unbalanced quote (cut log), best effort
    start.complete = complete and ok
    cl = qargv.parse(words)
    start.env = dict(cl.env)
    start.argv = cl.argv()


def _new_start(m: re.Match[str]) -> QemuStart:
    """The start a "starting up" line (matched by ``_START``) announces, with its versions."""
    head = m.group(3)
    st = QemuStart(time=_epoch(m.group(1), m.group(2)), time_iso=m.group(1).replace(" ", "T") + m.group(2))
    lv, qv, kv, hv = _LIBVIRT.search(head), _QEMU.search(head), _KERNEL.search(head), _HOST.search(head)
    if lv:
        st.libvirt_version, st.libvirt_package = lv.group(1), (lv.group(2) or "").strip() or None
    if qv:
        st.qemu_version, st.qemu_package = qv.group(1), qv.group(2).strip() or None
    st.kernel = kv.group(1).strip() if kv else None
    st.hostname = hv.group(1) if hv else None
    return st


def _after_command_line(st: QemuStart, line: str) -> None:
    """A line after the command line: the shutdown, or one of QEMU's messages (the first 1000 kept)."""
    e = _END.match(line)
    if e:
        st.shutdown_time = _epoch(e.group(1), e.group(2))
        st.shutdown_reason = e.group(3)
    elif line and len(st.messages) < 1000:
        st.messages.append(line)


def _read_starts(lines: Iterable[str]) -> list[QemuStart]:
    starts: list[QemuStart] = []
    cur: QemuStart | None = None
    cmd: list[str] | None = None      # command-line lines of cur while still inside the block
    for raw in lines:
        line = raw.rstrip("\r\n")
        m = _START.match(line)
        if m:
            if cur is not None and cmd is not None:
                _finish(cur, cmd, complete=False)
            cur, cmd = _new_start(m), []
            starts.append(cur)
        elif cur is not None and cmd is not None:
            cmd.append(line[:-1].rstrip() if line.endswith("\\") else line)
            if not line.endswith("\\"):
                _finish(cur, cmd, complete=True)
                cmd = None
        elif cur is not None:
            _after_command_line(cur, line)
    if cur is not None and cmd is not None:
        _finish(cur, cmd, complete=False)
    return starts


def parse_domain_log(path: str | os.PathLike[str]) -> list[QemuStart]:
    """Every QEMU start in the domain log at *path*, oldest first (streaming over the lines).

    Lines that belong to no block (before the first start) are ignored. A block cut by the end of
    the file or by the next "starting up" line gets ``complete=False``. Raises :class:`LogError` when
    the file cannot be read.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _read_starts(f)
    except OSError as exc:
        raise LogError(f"cannot read domain log {os.fspath(path)}: {exc.strerror or exc}") from None


def last_start(path: str | os.PathLike[str]) -> QemuStart | None:
    """The newest QEMU start in the domain log at *path* (None: none recorded), parsing only that one.

    A guest's log keeps every start ever made; parsing each command line of a long history costs
    ≈ 8 ms per start, which ``virtsave trace`` would pay on every call.

    >>> log = "tests/fixtures/qemu-domain-logs/fxa.log"
    >>> last_start(log).time_iso == parse_domain_log(log)[-1].time_iso
    True
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise LogError(f"cannot read domain log {os.fspath(path)}: {exc.strerror or exc}") from None
    at = max((m.start() for m in _START_ANYWHERE.finditer(text)), default=None)
    if at is None:
        return None
    starts = _read_starts(text[at:].splitlines())
    return starts[-1] if starts else None


def parse_domain_log_text(text: str) -> list[QemuStart]:
    """:func:`parse_domain_log` of a domain log's *text* (read from another host).

    >>> parse_domain_log_text("no start here\\n")
    []
    """
    return _read_starts(text.splitlines(keepends=True))


def running_at(text: str, when: float | None) -> QemuStart | None:
    """The start running at epoch time *when* in a domain log's *text* — the last one begun before it,
    else the newest (*when* None: the newest) — parsing only that start's block (≈ 8 ms per start
    saved on a long history; what :func:`start_at` picks from :func:`parse_domain_log_text`).

    >>> text = open("tests/fixtures/qemu-domain-logs/fxa.log").read()
    >>> every = parse_domain_log_text(text)
    >>> [running_at(text, s.time).time_iso for s in every] == [s.time_iso for s in every]
    True
    >>> running_at(text, None).time_iso == every[-1].time_iso
    True
    """
    at = [m.start() for m in _START_ANYWHERE.finditer(text)]
    if not at:
        return None
    pick = len(at) - 1
    if when is not None:
        begun = [i for i, pos in enumerate(at)
                 if (m := _START_STAMP.match(text, pos)) and _epoch(m.group(1), m.group(2)) <= when]
        pick = begun[-1] if begun else pick
    end = at[pick + 1] if pick + 1 < len(at) else len(text)
    starts = _read_starts(text[at[pick]:end].splitlines())
    return starts[0] if starts else None


def start_at(starts: list[QemuStart], when: float) -> QemuStart | None:
    """The start that was running at epoch time *when* (the last one begun before it), or None."""
    best = None
    for s in starts:
        if s.time <= when:
            best = s
    return best


def argv_from_domain_log(path: str | os.PathLike[str], index: int = -1) -> list[str]:
    """The QEMU argv of the *index*-th start recorded in the domain log at *path* (the last by
    default); :class:`LogError` when the log records none."""
    if index == -1:
        last = last_start(path)
        if last is None:
            raise LogError(f"{os.fspath(path)}: no QEMU start recorded")
        return list(last.argv)
    starts = parse_domain_log(path)
    if not starts:
        raise LogError(f"{os.fspath(path)}: no QEMU start recorded")
    return list(starts[index].argv)
