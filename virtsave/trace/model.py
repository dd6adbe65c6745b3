"""The trace: what libvirt (or virtsave's direct backend) said to QEMU over QMP.

A trace is plain JSON so other tools can read it. This module owns its shape: the
:class:`~typing.TypedDict` s below declare every field virtsave writes, and the closed JSON Schema
``schema/trace-v1.json`` says the same (``tests/unit/test_model.py`` keeps the two in step). It also
loads, dumps (0600) and validates traces.

Shape (``version`` 1; ``?`` = only where it applies)::

    {"format": "virtsave-trace", "version": 1, "source": "libvirt" | "direct",
     "created": "2026-11-25T19:00:00Z",
     "host": {"libvirt": "11.3.0", "qemu": "10.0.2", "hostname": "..."},
     "domain": {"name": "g", "uuid": "...", "xml": "<domain...>", "argv": ["/usr/bin/qemu-system-x86_64", ...]},
     "phases": [
        {"name": "save" | "restore", "operation": "managed-save" | "save" | "restore" | "start",
         "ok": true, "error": null, "image": {"path": "...", "size": 123, "header": {...}} | null,
         "monitor"?: "0x7f..", "options"?: {"bypass_cache": true, ...},
         "attribution"?: {"job": "remoteDispatchDomainManagedSave", "domain": "g", "vm": "0x7f.."},
         "seconds"?: 1.2, "window"?: {"since": "<ISO 8601>", "until": "<ISO 8601>"},
         "unphased"?: ["query-migrate"],
         "substitutions"?: [{"index": 3, "field": "arguments.uri", "original": "...",
                             "replacement": "...", "reason": "..."}],
         "messages": [
            {"kind": "command", "execute": "getfd", "arguments": {"fdname": "migrate"},
             "id": "libvirt-12", "fds": 1, "t": 0.001},
            {"kind": "reply", "id": "libvirt-12", "return": {}, "t": 0.002},
            {"kind": "event", "event": "STOP", "data": null,
             "timestamp": {"seconds": 1, "microseconds": 2}, "t": 0.003}]}],
     "log"?: {"path": "...", "lines": 1234, "attribution": "log", "unphased": 0, ...},   # imported logs
     "replay"?: {"mode": "faithful", "transport": "unix", "input": "t.json", "image": "...",
                 "argv_rewrites": {...}, "timings": {...}}                           # replays
    }

``t`` is seconds since the first message of the phase. QMP payloads (``arguments``, ``return``,
``data``, a reply's ``error``, an event's ``timestamp``) are QEMU's and stay open; every object
virtsave defines is closed. Keys starting with ``_`` are never part of a trace: :func:`dumps` leaves
them out of the objects virtsave defines (a parser's scratch state must not leak into files).

Example::

    >>> tr = new_trace("libvirt", domain={"name": "g"})
    >>> ph = add_phase(tr, "save", "managed-save")
    >>> ph["messages"].append(command("stop", id="libvirt-1", t=0.0))
    >>> validate(tr)
    []
    >>> [m["execute"] for m in iter_commands(tr["phases"][0])]
    ['stop']
"""

# No ``from __future__ import annotations`` here: the TypedDicts' Required/NotRequired markers must be
# real objects at run time so ``__required_keys__`` is right (the model/schema test reads it).

import datetime as _dt
import functools
import json
import os
import sys
from collections.abc import Iterator
from importlib import resources
from typing import IO, Any, Final, Literal, NotRequired, Required, TypedDict, Unpack, cast

from virtsave.core import jsonload
from virtsave.core.errors import TraceError
from virtsave.core.files import private_writer

__all__ = [
    "FORMAT", "MAX_TRACE_BYTES", "PHASE_NAMES", "SOURCES", "VERSION",
    "ArgvRewrite", "ArgvRewrites", "Attribution", "CommandMessage", "DiffDifference", "DiffNormalization",
    "DiffReport", "DiffSide", "Domain", "EventMessage", "Host", "ImageHeader", "ImageInfo", "LogInfo",
    "Message", "Phase", "PhaseFields", "PhaseName", "PhaseOptions", "PhaseTimings", "QMPErrorBody",
    "QMPTimestamp", "ReplayInfo", "ReplayProcess", "ReplayTimings", "ReplyMessage", "Source",
    "Substitution", "Trace", "Window",
    "add_phase", "command", "dump", "dumps", "event", "find_phase", "iter_commands", "load", "loads",
    "new_trace", "public", "read_bytes", "reply", "schema", "validate",
]

FORMAT: Final = "virtsave-trace"
VERSION: Final = 1
PHASE_NAMES: Final = ("save", "restore")
SOURCES: Final = ("libvirt", "direct")

PhaseName = Literal["save", "restore"]
Source = Literal["libvirt", "direct"]


# --------------------------------------------------------------------------------------------------
# The model. Comments are short; the schema's descriptions say the same at length.


class Host(TypedDict, total=False):
    """Where the trace was taken; None when unknown."""

    libvirt: str | None     # libvirt's version ("11.3.0"); None in direct traces
    qemu: str | None        # QEMU's version ("10.0.2")
    hostname: str | None


class Domain(TypedDict, total=False):
    """The traced domain."""

    name: Required[str | None]
    uuid: str | None
    xml: str | None         # libvirt's domain XML, secrets redacted
    argv: list[str]         # the QEMU command line libvirt ran, secrets redacted


# -- messages (QMP payloads are QEMU's: typed Any / open) ------------------------------------------

QMPErrorBody = TypedDict("QMPErrorBody", {"class": str, "desc": str}, total=False)
"""The ``error`` object of an error reply (QEMU-defined, open)."""


class QMPTimestamp(TypedDict, total=False):
    """An event's ``timestamp`` (QEMU-defined, open)."""

    seconds: int
    microseconds: int


class CommandMessage(TypedDict):
    """A command sent to QEMU."""

    kind: Literal["command"]
    execute: str
    arguments: NotRequired[dict[str, Any]]   # absent when the command had none
    id: NotRequired[Any]                     # "libvirt-12", qemu.qmp's "__qmp#00001", null when none
    fds: NotRequired[int]                    # descriptors passed with it (SCM_RIGHTS); absent = 0
    write_errno: NotRequired[int]            # libvirtd logged this errno writing the command
    t: float


# "return" is a Python keyword: the reply's fields are declared in the functional form.
ReplyMessage = TypedDict("ReplyMessage", {
    "kind": Literal["reply"],
    "id": Any,
    "return": NotRequired[Any],              # the command's result (exactly one of return / error)
    "error": NotRequired[QMPErrorBody],
    "t": float,
})
"""QEMU's answer to a command: ``return`` or ``error``."""


class EventMessage(TypedDict):
    """An asynchronous event from QEMU."""

    kind: Literal["event"]
    event: str
    data: NotRequired[Any]
    timestamp: NotRequired[QMPTimestamp | None]
    t: float


Message = CommandMessage | ReplyMessage | EventMessage


# -- phases ------------------------------------------------------------------------------------------


class ImageHeader(TypedDict):
    """A save image's libvirt header (:meth:`virtsave.image.saveimage.Header.to_dict`)."""

    magic: str
    version: int
    data_len: int
    was_running: bool
    compressed: int
    cookie_offset: int
    format: str
    partial: bool
    stream_offset: int


class ImageInfo(TypedDict, total=False):
    """The save image a phase wrote or read."""

    path: str | None
    size: int | None
    header: ImageHeader | None


class PhaseOptions(TypedDict, total=False):
    """Options the traced operation ran with (only those set)."""

    bypass_cache: bool
    image_format: str
    parallel_channels: int
    state: str              # "running" / "paused" after a restore
    file: str


class Attribution(TypedDict):
    """How the log parser tied the phase to its domain."""

    job: str | None         # libvirt's job API ("remoteDispatchDomainManagedSave")
    domain: str | None
    vm: str | None          # libvirt's virDomainObj pointer


class Window(TypedDict):
    """When a phase happened (ISO 8601, UTC): live, around the libvirt call; imported from a log, its
    first and last message."""

    since: str
    until: str


class Substitution(TypedDict, total=False):
    """Where a replay sent something else than the trace said, and why."""

    index: int | None       # the message's index in the traced phase; None for the command line
    sent: int | None        # the index in this phase's messages of the command sent in its place; None: none
    field: str | None       # "arguments.uri", "fds", "execute", "argv" …
    original: Required[Any]
    replacement: Required[Any]
    reason: Required[str]


class Phase(TypedDict):
    """One save or restore: its outcome and its QMP conversation."""

    name: PhaseName
    operation: str          # managed-save / save / restore / start
    ok: bool | None
    error: NotRequired[str | None]
    image: NotRequired[ImageInfo | None]
    monitor: NotRequired[str | None]
    options: NotRequired[PhaseOptions]
    attribution: NotRequired[Attribution]
    seconds: NotRequired[float]
    window: NotRequired[Window]
    unphased: NotRequired[list[str]]
    substitutions: NotRequired[list[Substitution]]
    messages: list[Message]


class PhaseFields(TypedDict, total=False):
    """The optional fields :func:`add_phase` takes."""

    ok: bool | None
    error: str | None
    image: ImageInfo | None
    monitor: str | None
    options: PhaseOptions
    attribution: Attribution
    seconds: float
    window: Window
    unphased: list[str]
    substitutions: list[Substitution]


# -- trace-level blocks ------------------------------------------------------------------------------


CorpusInfo = TypedDict("CorpusInfo", {
    "name": str,
    "scenario": str,
    "from": list[str],
})
CorpusInfo.__doc__ = """What a trace of the shipped corpus (``virtsave/harness/corpus/``) was made from."""


class LogInfo(TypedDict):
    """Where an imported trace came from (``virtsave trace --from-log``)."""

    path: str
    lines: int
    skipped: int
    malformed: int
    monitors: list[str]
    attribution: str        # "log", "monitor" or "assumed: …"
    unphased: int
    unphased_messages: list[str]


class ArgvRewrite(TypedDict):
    """One change the launcher made to the traced command line."""

    option: str
    original: str
    replacement: str
    reason: str




class PhaseTimings(TypedDict, total=False):
    """How long a replayed phase took."""

    seconds: Required[float]
    migration_seconds: float
    end_seconds: float


#: Command-line rewrites per replayed phase.
ArgvRewrites = dict[PhaseName, list[ArgvRewrite]]
#: Timings per replayed phase.
ReplayTimings = dict[PhaseName, PhaseTimings]


class ReplayProcess(TypedDict):
    """The QEMU a replay left running (``keep_running``)."""

    pid: int
    qmp: str
    serial_log: str | None
    run_dir: str


class DiffSide(TypedDict, total=False):
    """One side of a trace diff."""

    label: Required[str]
    source: str | None
    host: Host


class DiffDifference(TypedDict):
    """One difference of a trace diff."""

    phase: str
    kind: str
    name: str
    a_index: int | None
    b_index: int | None
    details: list[str]


class DiffNormalization(TypedDict):
    """The normalization a trace diff applied."""

    table: str
    rules: list[str]


class DiffReport(TypedDict):
    """A trace diff (:meth:`virtsave.trace.diff.TraceDiff.to_json`, ``virtsave diff --json``)."""

    format: Literal["virtsave-diff"]
    kind: Literal["trace"]
    equivalent: bool
    strict: bool
    a: DiffSide
    b: DiffSide
    summary: dict[str, int]     # difference kind → count
    differences: list[DiffDifference]
    normalization: DiffNormalization


class ReplayInfo(TypedDict, total=False):
    """How a direct trace was replayed (:mod:`virtsave.qemu.replay`)."""

    mode: Literal["faithful", "essential"]
    transport: Literal["unix", "tcp"]
    end: Literal["sigterm", "quit"]
    input: str | None
    image: str
    argv_rewrites: ArgvRewrites
    timings: ReplayTimings
    qemu: ReplayProcess
    diff: DiffReport


class Trace(TypedDict):
    """A whole trace."""

    format: Literal["virtsave-trace"]
    version: Literal[1]
    source: Source
    created: NotRequired[str]
    host: Host
    domain: Domain
    phases: list[Phase]
    log: NotRequired[LogInfo]
    replay: NotRequired[ReplayInfo]
    corpus: NotRequired[CorpusInfo]


# --------------------------------------------------------------------------------------------------
# Building


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_trace(source: Source, host: Host | None = None, domain: Domain | None = None) -> Trace:
    """Return an empty trace of the current version."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    dom: Domain = {"name": None, "uuid": None, "xml": None, "argv": []}
    if domain:
        dom.update(domain)
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "created": _now(),
        "host": Host(**host) if host else {},
        "domain": dom,
        "phases": [],
    }


def add_phase(trace: Trace, name: PhaseName, operation: str, **fields: Unpack[PhaseFields]) -> Phase:
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
            fds: int = 0, t: float = 0.0) -> CommandMessage:
    """A command message; ``arguments`` is omitted when QEMU got none."""
    msg: dict[str, Any] = {"kind": "command", "execute": execute}  # built in wire-key order
    if arguments is not None:
        msg["arguments"] = arguments
    msg["id"] = id
    if fds:
        msg["fds"] = fds
    msg["t"] = round(t, 6)
    return cast(CommandMessage, msg)


def reply(id: Any, *, ret: Any = None, error: QMPErrorBody | None = None, t: float = 0.0) -> ReplyMessage:
    """A reply message carrying either ``return`` or ``error``."""
    if error is not None:
        return {"kind": "reply", "id": id, "error": error, "t": round(t, 6)}
    return {"kind": "reply", "id": id, "return": ret if ret is not None else {}, "t": round(t, 6)}


def event(name: str, data: Any = None, timestamp: QMPTimestamp | None = None, *, t: float = 0.0) -> EventMessage:
    """An asynchronous event message."""
    return {"kind": "event", "event": name, "data": data, "timestamp": timestamp, "t": round(t, 6)}


# --------------------------------------------------------------------------------------------------
# Reading


def iter_commands(phase: Phase) -> Iterator[CommandMessage]:
    """The command messages of *phase*, in wire order."""
    return (m for m in phase["messages"] if m["kind"] == "command")


def find_phase(trace: Trace, name: str) -> Phase | None:
    """The first phase called *name*, or None."""
    return next((p for p in trace["phases"] if p["name"] == name), None)


@functools.cache
def schema() -> dict[str, Any]:
    """The JSON Schema of the current trace version."""
    text = resources.files("virtsave.trace").joinpath(f"schema/trace-v{VERSION}.json").read_text()
    return cast(dict[str, Any], json.loads(text))


def validate(trace: object) -> list[str]:
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
        data = jsonload.loads(text)
    except jsonload.JSONRefused as exc:
        raise TraceError(f"{name}: {exc}") from None
    except ValueError as exc:  # malformed, undecodable, an integer past Python's digit limit
        raise TraceError(f"{name}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TraceError(f"{name}: not a virtsave trace (no \"format\": \"{FORMAT}\")")
    problems = validate(data)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TraceError(f"{name}: invalid trace: {problems[0]}{more}")
    return cast(Trace, data)


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


# --------------------------------------------------------------------------------------------------
# Writing


def _visible(obj: Any) -> Any:
    """*obj* without its ``_``-keys when it is a dict that has some (else *obj* itself, not copied)."""
    if isinstance(obj, dict) and any(isinstance(k, str) and k.startswith("_") for k in obj):
        return {k: v for k, v in obj.items() if not (isinstance(k, str) and k.startswith("_"))}
    return obj


def _public_phase(phase: Any) -> Any:
    out = dict(_visible(phase))
    for key in ("image", "options", "attribution", "window"):
        if isinstance(out.get(key), dict):
            out[key] = _visible(out[key])
    if isinstance(out.get("image"), dict) and isinstance(out["image"].get("header"), dict):
        out["image"] = {**out["image"], "header": _visible(out["image"]["header"])}
    for key in ("substitutions", "messages"):
        if isinstance(out.get(key), list):
            out[key] = [_visible(x) for x in out[key]]
    return out


def public(trace: Trace) -> Trace:
    """*trace* without ``_``-keys in the objects virtsave defines: the trace, host, domain, log, replay,
    each phase, its image, options, attribution, window, substitutions and messages (not inside QMP
    payloads, which are QEMU's). A shallow copy; *trace* is not modified.

    >>> tr = new_trace("direct")
    >>> ph = add_phase(tr, "save", "save")
    >>> ph["messages"].append({**command("stop"), "_t": 12.5})  # type: ignore[typeddict-unknown-key]
    >>> public(tr)["phases"][0]["messages"][0]
    {'kind': 'command', 'execute': 'stop', 'id': None, 't': 0.0}
    >>> "_t" in tr["phases"][0]["messages"][0]
    True
    """
    out = dict(_visible(trace))
    for key in ("host", "domain", "log", "replay"):
        if isinstance(out.get(key), dict):
            out[key] = _visible(out[key])
    if isinstance(out.get("phases"), list):
        out["phases"] = [_public_phase(p) if isinstance(p, dict) else p for p in out["phases"]]
    return cast(Trace, out)


def dumps(trace: Trace) -> str:
    """Serialize a trace (stable key order as built, 1-space indent), ``_``-keys left out (:func:`public`)."""
    return json.dumps(public(trace), indent=1, ensure_ascii=False) + "\n"


def dump(trace: Trace, path: str | os.PathLike[str] | None = None, stream: IO[str] | None = None) -> None:
    """Write *trace* to *path* (0600, atomic) or to *stream* (default stdout)."""
    text = dumps(trace)
    if path is None or os.fspath(path) == "-":
        (stream or sys.stdout).write(text)
        return
    with private_writer(path) as f:
        f.write(text.encode())
