"""The trace: what libvirt (or virtsave's direct backend) said to QEMU over QMP.

A trace is plain JSON so other tools can read it. This module owns its shape
(see ``schema/trace-v1.json``), loading, dumping (0600) and validation.

Shape (``version`` 1)::

    {"format": "virtsave-trace", "version": 1, "source": "libvirt" | "direct",
     "created": "2026-11-25T19:00:00Z",
     "host": {"libvirt": "11.3.0", "qemu": "10.0.2", "hostname": "..."},
     "domain": {"name": "g", "uuid": "...", "xml": "<domain...>", "argv": ["/usr/bin/qemu-system-x86_64", ...]},
     "phases": [
        {"name": "save" | "restore", "operation": "managed-save" | "save" | "restore" | "start",
         "ok": true, "error": null, "monitor": "0x7f..", "options": {...},
         "image": {"path": "...", "size": 123, "header": {...}} | null,
         "substitutions": [{"index": 3, "field": "uri", "original": "...", "replacement": "...",
                            "reason": "..."}],
         "messages": [
            {"kind": "command", "execute": "getfd", "arguments": {"fdname": "migrate"},
             "id": "libvirt-12", "fds": 1, "t": 0.001},
            {"kind": "reply", "id": "libvirt-12", "return": {}, "t": 0.002},
            {"kind": "event", "event": "STOP", "data": null,
             "timestamp": {"seconds": 1, "microseconds": 2}, "t": 0.003}]}],
     "replay": {"mode": "faithful", "transport": "unix", "input": "t.json"}   # direct traces only
    }

``t`` is seconds since the first message of the phase.

Example::

    >>> tr = new_trace("libvirt", domain={"name": "g"})
    >>> ph = add_phase(tr, "save", "managed-save")
    >>> ph["messages"].append(command("stop", id="libvirt-1", t=0.0))
    >>> validate(tr)
    []
    >>> [m["execute"] for m in iter_commands(tr["phases"][0])]
    ['stop']
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import sys
from collections.abc import Iterator
from importlib import resources
from typing import IO, Any

from virtsave.core.errors import TraceError
from virtsave.core.files import private_writer

FORMAT = "virtsave-trace"
VERSION = 1
PHASE_NAMES = ("save", "restore")
SOURCES = ("libvirt", "direct")

Trace = dict[str, Any]
Phase = dict[str, Any]
Message = dict[str, Any]


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_trace(
    source: str,
    host: dict[str, Any] | None = None,
    domain: dict[str, Any] | None = None,
) -> Trace:
    """Return an empty trace of the current version."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "created": _now(),
        "host": dict(host or {}),
        "domain": {"name": None, "uuid": None, "xml": None, "argv": [], **(domain or {})},
        "phases": [],
    }


def add_phase(trace: Trace, name: str, operation: str, **fields: Any) -> Phase:
    """Append a new phase and return it."""
    phase: Phase = {
        "name": name,
        "operation": operation,
        "ok": None,
        "error": None,
        "image": None,
        "messages": [],
        **fields,
    }
    trace["phases"].append(phase)
    return phase


def command(execute: str, arguments: dict[str, Any] | None = None, *, id: Any = None,
            fds: int = 0, t: float = 0.0) -> Message:
    """A command message; ``arguments`` is omitted when QEMU got none."""
    msg: Message = {"kind": "command", "execute": execute}
    if arguments is not None:
        msg["arguments"] = arguments
    msg["id"] = id
    if fds:
        msg["fds"] = fds
    msg["t"] = round(t, 6)
    return msg


def reply(id: Any, *, ret: Any = None, error: dict[str, Any] | None = None, t: float = 0.0) -> Message:
    """A reply message carrying either ``return`` or ``error``."""
    msg: Message = {"kind": "reply", "id": id}
    if error is not None:
        msg["error"] = error
    else:
        msg["return"] = ret if ret is not None else {}
    msg["t"] = round(t, 6)
    return msg


def event(name: str, data: Any = None, timestamp: dict[str, int] | None = None, *, t: float = 0.0) -> Message:
    """An asynchronous event message."""
    return {"kind": "event", "event": name, "data": data, "timestamp": timestamp, "t": round(t, 6)}


def iter_commands(phase: Phase) -> Iterator[Message]:
    """The command messages of *phase*, in wire order."""
    return (m for m in phase["messages"] if m["kind"] == "command")


def find_phase(trace: Trace, name: str) -> Phase | None:
    """The first phase called *name*, or None."""
    return next((p for p in trace["phases"] if p["name"] == name), None)


@functools.cache
def schema() -> dict[str, Any]:
    """The JSON Schema of the current trace version."""
    text = resources.files("virtsave.trace").joinpath(f"schema/trace-v{VERSION}.json").read_text()
    return json.loads(text)


def validate(trace: Any) -> list[str]:
    """Return schema violations as ``path: message`` strings; empty when valid."""
    import jsonschema

    if isinstance(trace, dict) and trace.get("format") == FORMAT:
        version = trace.get("version")
        if isinstance(version, int) and version > VERSION:
            return [f"version: trace version {version} is newer than this virtsave supports ({VERSION})"]
    validator = jsonschema.Draft202012Validator(schema())
    problems = []
    for err in sorted(validator.iter_errors(trace), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "(top)"
        problems.append(f"{where}: {err.message[:200]}")
    return problems


def loads(text: str | bytes, *, name: str = "trace") -> Trace:
    """Parse and validate a trace; raise :class:`TraceError` with one clear line."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceError(f"{name}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TraceError(f"{name}: not a virtsave trace (no \"format\": \"{FORMAT}\")")
    problems = validate(data)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TraceError(f"{name}: invalid trace: {problems[0]}{more}")
    return data


#: A trace is untrusted input: never read more than this into memory.
MAX_TRACE_BYTES = 512 * 1024 * 1024


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The raw bytes of a trace file (``-`` for stdin), refusing anything over 512 MiB."""
    name = "stdin" if os.fspath(path) == "-" else os.fspath(path)
    try:
        if name == "stdin":
            data = sys.stdin.buffer.read(MAX_TRACE_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_TRACE_BYTES + 1)
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from None
    if len(data) > MAX_TRACE_BYTES:
        raise TraceError(f"{name}: trace larger than 512 MiB, refusing")
    return data


def load(path: str | os.PathLike[str]) -> Trace:
    """Read and validate the trace at *path* (``-`` for stdin)."""
    return loads(read_bytes(path), name="stdin" if os.fspath(path) == "-" else os.fspath(path))


def dumps(trace: Trace) -> str:
    """Serialize a trace (stable key order as built, 1-space indent)."""
    return json.dumps(trace, indent=1, ensure_ascii=False) + "\n"


def dump(trace: Trace, path: str | os.PathLike[str] | None = None, stream: IO[str] | None = None) -> None:
    """Write *trace* to *path* (0600, atomic) or to *stream* (default stdout)."""
    text = dumps(trace)
    if path is None or os.fspath(path) == "-":
        (stream or sys.stdout).write(text)
        return
    with private_writer(path) as f:
        f.write(text.encode())
