"""Synthetic libvirtd debug logs of any size, made from the recorded ones (for the parser benchmark).

The repository's ``tests/fixtures`` hold real libvirtd logs of both stacks (monitor-only and with
job/process attribution). :func:`generate_log` repeats them until the wanted size, each repetition
moved forward in time and given fresh monitor/vm pointers, so the result reads like one long daemon
log with hundreds of domains saved and restored one after the other (pointers reused now and then).

Example::

    >>> import os, tempfile
    >>> from virtsave.libvirtd import logparse
    >>> with tempfile.TemporaryDirectory() as d:
    ...     n = generate_log(os.path.join(d, "big.log"), 1)
    ...     mons = logparse.list_monitors(os.path.join(d, "big.log"))
    >>> n >= 1_000_000 and len(mons) > 2
    True
"""

from __future__ import annotations

import calendar
import datetime as _dt
import os
import re
from collections.abc import Iterable
from pathlib import Path

from virtsave.core.errors import LogError

__all__ = ["FIXTURE_SETS", "fixture_logs", "generate_log"]

#: The recorded log sets under ``tests/fixtures`` used by default.
FIXTURE_SETS = ("libvirt-9.0", "libvirt-9.0-attributed", "libvirt-11.3-attributed")

_RE_TS = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3})", re.M)
_RE_PTR = re.compile(rb"0x7f[0-9a-f]{6,10}")
_RE_MONPTR = re.compile(rb"mon[=:](0x7f[0-9a-f]{6,10})")


def fixture_logs() -> list[Path]:
    """The recorded libvirtd logs of the source tree (empty when virtsave runs from an installed wheel)."""
    base = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
    return [f for sub in FIXTURE_SETS if (base / sub).is_dir() for f in sorted((base / sub).glob("*.log"))]


def _epoch(seconds: bytes, millis: bytes) -> float:
    """A UTC log timestamp (``YYYY-MM-DD HH:MM:SS`` and ``mmm``) as epoch seconds."""
    fields = (int(seconds[0:4]), int(seconds[5:7]), int(seconds[8:10]),
              int(seconds[11:13]), int(seconds[14:16]), int(seconds[17:19]))
    return calendar.timegm((*fields, 0, 0, 0)) + int(millis) / 1000.0


def _stamp(t: float) -> bytes:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:23].encode()


def _repetition(chunk: bytes, rep: int, offset: float, last_mon: bytes | None) -> tuple[bytes, float, bytes | None]:
    """One copy of a source log: shifted to start at *offset*, pointers remapped.

    The k-th distinct pointer of the copy becomes the base of its group + k; every fourth copy shares
    the previous one's group, so its pointers are reused after the earlier CLOSE (its first monitor
    takes the previous copy's last monitor pointer). Returns (bytes, next offset, last monitor pointer).
    """
    stamps = _RE_TS.findall(chunk)
    t_first, t_last = _epoch(*stamps[0]), _epoch(*stamps[-1])
    shift = offset - t_first if rep else 0.0
    group = rep - 1 if rep % 4 == 3 else rep
    mapping: dict[bytes, bytes] = {}
    first_mon = _RE_MONPTR.search(chunk)
    if rep % 4 == 3 and first_mon and last_mon:
        mapping[first_mon.group(1)] = last_mon

    def ptr(m: re.Match[bytes]) -> bytes:
        q = mapping.get(m.group(0))
        if q is None:
            q = mapping[m.group(0)] = b"0x7f%010x" % ((0x0600000000 + group * 0x100000 + len(mapping) * 0x40)
                                                       & 0xFFFFFFFFFF)
        return q

    data = _RE_PTR.sub(ptr, chunk)
    mons = _RE_MONPTR.findall(data)
    data = _RE_TS.sub(lambda m: _stamp(_epoch(m.group(1), m.group(2)) + shift), data)
    return data, t_last + shift + 1.0, mons[-1] if mons else None


def generate_log(path: str | os.PathLike[str], size_mb: float, sources: Iterable[str | os.PathLike[str]] = ()) -> int:
    """Write a realistic synthetic libvirtd log of about *size_mb* MB by repeating real logs.

    *sources*: the logs to repeat (default: :func:`fixture_logs`). Each repetition gets its timestamps
    shifted forward so time keeps increasing, and every ``0x7f…`` pointer remapped to a fresh value
    (every fourth repetition reuses the previous repetition's pointers, exercising pointer reuse).
    Returns the number of bytes written. Raises :class:`LogError` without sources.
    """
    chunks = []
    for s in list(sources) or fixture_logs():
        try:
            data = Path(s).read_bytes()
        except OSError as exc:
            raise LogError(f"cannot read log {os.fspath(s)}: {exc.strerror or exc}") from None
        if _RE_TS.search(data):
            chunks.append(data)
    if not chunks:
        raise LogError("generate_log: no source logs (the recorded fixtures come with the source tree)")
    target = int(size_mb * 1e6)
    written = rep = 0
    offset = 0.0
    last_mon: bytes | None = None
    with open(path, "wb") as out:
        while written < target:
            for chunk in chunks:
                data, offset, last_mon = _repetition(chunk, rep, offset, last_mon)
                out.write(data)
                written += len(data)
                rep += 1
                if written >= target:
                    break
    return written
