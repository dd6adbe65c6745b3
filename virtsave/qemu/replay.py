"""Replay a traced libvirt save/restore through the direct backend (no libvirt involved).

For each traced phase a QEMU is launched from the traced command line
(:mod:`virtsave.qemu.launch`) and the traced QMP commands are sent in order over a
recorded session (:mod:`virtsave.qemu.qmp`); the result is a new trace (``source: "direct"``)
of what actually went over the wire, so it can be diffed against the input.

* **save**: boot the guest (``cont``, run for *run_for* seconds), create the image with a
  ``LibvirtQemudPart`` header (traced domain XML), then the traced commands: where libvirt
  passed an fd (``getfd``/``add-fd``) ours goes by SCM_RIGHTS; ``fd:NAME`` stays,
  ``file:/dev/fdset/N,offset=…`` points at our stream offset; wait on ``MIGRATION`` events
  like libvirt; finalize the header (``LibvirtQemudSave``); ``quit`` (libvirt kills instead).
* **restore**: launch with ``-incoming defer`` and the image fd inherited (``fd:N``) or in
  an fdset (``-add-fd``, sparse images), compressed images through their decompressor;
  ``migrate-incoming`` rewritten to it; the traced ``cont`` (absent when restored paused).
* ``transport="tcp"``: QMP over 127.0.0.1, no fds: ``file:PATH,offset=N`` URIs (QEMU ≥ 8.2)
  or an ``exec:`` helper built here (older QEMU; ``exec:`` is never taken from a trace).
* ``mode="essential"``: only commands that change state (no ``query-*``/``qom-*`` probes,
  no post-save resets of a QEMU about to quit).
* Another QEMU than the traced one (``qemu_binary=``, or a trace from another host): what this QEMU
  knows is read first; a capability the trace turns on, or a parameter it sets to other than QEMU's
  default, that this QEMU lacks stops the replay before the guest is touched, naming it (exit 2 in the
  CLI); one that was off or at its default is left out where it is sent, as a recorded substitution.

Which commands go out is decided here; how the image is written and read (fds, URIs, the
transport substitution, finalizing, the failure paths) is :mod:`virtsave.qemu.migration`,
the same steps :mod:`virtsave.qemu.direct` takes.

Every deviation from the traced command is in ``phase["substitutions"]``; mode, transport,
argv rewrites and timings in ``trace["replay"]`` (``timings.save.seconds``: first traced
command to QEMU gone, image finalized and synced; ``timings.restore.seconds``: QEMU launch to
the traced commands done, i.e. running after ``cont``; ``migration_seconds``: the stream alone;
``end_seconds``: SIGTERM or ``quit`` until the saved QEMU is gone).
The image (default ``/var/lib/virtsave/replay/<name>-<pid>.save``) is left for the caller.
Untrusted traces are checked first (:func:`virtsave.qemu.safety.check_trace`): findings raise
:class:`UnsafeTraceError` before any process is started, unless *allow_unsafe*.

Example::

    from virtsave.qemu import replay
    from virtsave.trace import model as trace
    out = replay.replay(trace.load("t.json"), image="/var/tmp/g.save", mode="essential")
    trace.dump(out, "r.json")
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtsave.core import paths as config
from virtsave.core.errors import (
    OperationFailed,
    TraceError,
    UnsafeTraceError,
    UnsupportedError,
    VirtsaveError,
)
from virtsave.core.operation import Progress
from virtsave.image import saveimage
from virtsave.qemu import compat, migration, safety
from virtsave.qemu import launch as qemu_launch
from virtsave.qemu.qmp import QMPSession
from virtsave.trace import model as _trace

MODES = ("faithful", "essential")
TRANSPORTS = migration.TRANSPORTS
#: Read-only probes libvirt sends (skipped in essential mode).
PROBE_PREFIXES = ("query-", "qom-get", "qom-list", "device-list-properties", "qom-list-properties")
#: Commands whose failure fails the phase (a failed probe is recorded and passed over).
CRITICAL = frozenset({"stop", "cont", "migrate", "migrate-incoming", "getfd", "add-fd",
                      "migrate-set-capabilities", "migrate-set-parameters"})


def is_probe(execute: str) -> bool:
    """True for commands that only read state."""
    return execute.startswith(PROBE_PREFIXES)


# -- safety ------------------------------------------------------------------------------------
def check_safety(trace: _trace.Trace, allow_unsafe: bool = False) -> list[str]:
    """Run the safety checks (:mod:`virtsave.qemu.safety`); raise :class:`UnsafeTraceError` naming each
    finding unless allowed; the findings as text."""
    found = safety.check_trace(trace)
    if found and not allow_unsafe:
        raise UnsafeTraceError(safety.refusal_message(found))
    return [f"{f.item} at {f.where}: {f.reason}" for f in found]


# -- replay context ------------------------------------------------------------------------------
@dataclass
class _Phase:
    """State of one replayed phase."""

    traced: _trace.Phase
    out: _trace.Phase
    session: QMPSession
    mode: str
    stream: migration.Outgoing | migration.Incoming
    progress: Progress | None
    migration: str | None = None
    events_on: bool = False
    pid: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: What this QEMU knows of migration (read before the phase, unrecorded).
    known: compat.Known | None = None

    @property
    def transport(self) -> str:
        return self.stream.transport

    def substitute(self, index: int, field_: str, original: Any, replacement: Any, reason: str) -> None:
        self.out.setdefault("substitutions", []).append(
            {"index": index, "field": field_, "original": original, "replacement": replacement, "reason": reason})


def _rewrite_uri(ph: _Phase, idx: int, uri: str) -> str:
    """Point a traced migration URI at our image (recorded as a substitution where it differs)."""
    new, why = ph.stream.uri(uri)
    if why is not None:
        ph.substitute(idx, "arguments.uri", uri, new, why)
    return new


def _send(ph: _Phase, idx: int, execute: str, args: dict[str, Any] | None,
          fds: list[int] | None = None) -> dict[str, Any]:
    if args is not None and ph.known is not None:
        args = _fit(ph, idx, execute, args)
    rep = ph.session.execute_raw(execute, args, fds)
    if "error" in rep and execute in CRITICAL:
        err = rep["error"]
        raise OperationFailed(f"{ph.out['name']}: {execute} failed: {err.get('desc', err)}")
    return rep


def _fit(ph: _Phase, idx: int, execute: str, args: dict[str, Any]) -> dict[str, Any]:
    """*args* without what this QEMU lacks and the trace had off or at its default (a trace from
    another QEMU), each left-out piece recorded as a substitution."""
    assert ph.known is not None
    new, dropped = compat.fit(ph.known, execute, args)
    if not dropped:
        return args
    if execute == compat.CAPABILITIES:
        ph.substitute(idx, "arguments.capabilities", args.get("capabilities"), new.get("capabilities"),
                      f"capabilities this QEMU lacks, off in the trace, left out: {', '.join(dropped)}")
    for name in dropped if execute != compat.CAPABILITIES else ():
        ph.substitute(idx, f"arguments.{name}", args[name], None,
                      "this QEMU lacks it; off or at QEMU's default in the trace: left out")
    return new


def _wait(ph: _Phase, mark: int) -> None:
    t0 = time.monotonic()
    try:
        migration.await_completion(ph.session, mark, what=f"{ph.out['name']}: migration",
                                   progress=ph.stream.progress_cb(ph.progress, ph.pid),
                                   poll=None if ph.events_on else 0.2)
    finally:
        ph.timings["migration_seconds"] = round(time.monotonic() - t0, 6)
    ph.migration = "completed"


def _skipped(ph: _Phase, idx: int, execute: str, *, incoming: bool) -> bool:
    """Whether the traced command is not sent (recorded as a substitution where it is replaced)."""
    if execute == "qmp_capabilities":
        ph.substitute(idx, "execute", execute, None, "negotiated by qemu.qmp when connecting")
        return True
    return ph.mode == "essential" and (is_probe(execute) or (ph.migration == "completed" and not incoming))


def _fds(ph: _Phase, idx: int, msg: _trace.Message) -> list[int] | None:
    """The fds a traced command passes, ours in place of libvirt's; None: it is skipped (TCP)."""
    execute = msg["execute"]
    if not (msg.get("fds") or execute in ("getfd", "add-fd")):
        return []
    if ph.transport == "tcp":
        ph.substitute(idx, "fds", msg.get("fds", 1), 0,
                      f"{execute} skipped: TCP QMP cannot pass fds (the URI names the file instead)")
        return None
    ph.substitute(idx, "fds", msg.get("fds", 1), 1, "our image fd, passed by SCM_RIGHTS")
    return [ph.stream.qemu_fd]


def _replay_one(ph: _Phase, idx: int, msg: _trace.Message, *, incoming: bool) -> str | None:
    """Send traced command *idx* (rewritten where needed); the name of what went out in its place
    (None: nothing did)."""
    execute = msg["execute"]
    if _skipped(ph, idx, execute, incoming=incoming):
        return execute if execute == "qmp_capabilities" else None  # qemu.qmp negotiated it for us
    args = copy.deepcopy(msg.get("arguments"))
    if execute == "migrate-set-capabilities" and args:
        ph.events_on |= any(c.get("capability") == "events" and c.get("state")
                            for c in args.get("capabilities", []))
    fds = _fds(ph, idx, msg)
    if fds is None:
        return None
    if execute in ("migrate", "migrate-incoming"):
        if not args or "uri" not in args:
            raise UnsupportedError(f"{execute} without a uri (channels) cannot be replayed yet")
        args["uri"] = _rewrite_uri(ph, idx, args["uri"])
        mark = ph.session.event_mark()
        _send(ph, idx, execute, args, fds or None)
        _wait(ph, mark)
        return execute
    _send(ph, idx, execute, args, fds or None)
    return execute


def _mark_sent(ph: _Phase, idx: int, sent: str | None) -> None:
    """Point the substitutions of traced command *idx* at the command that went out in its place
    (the last one of that name in the phase: a resend after a dropped argument is the one that counts)."""
    msgs = ph.out["messages"]
    where = None
    if sent is not None:
        where = next((i for i in range(len(msgs) - 1, -1, -1)
                      if msgs[i].get("kind") == "command" and msgs[i].get("execute") == sent), None)
    for sub in ph.out.get("substitutions") or []:
        if sub.get("index") == idx and "sent" not in sub:
            sub["sent"] = where


def _replay_commands(ph: _Phase, *, incoming: bool) -> None:
    """Send the traced phase's commands in order (rewritten where needed)."""
    for idx, msg in enumerate(ph.traced["messages"]):
        if msg.get("kind") == "command":
            _mark_sent(ph, idx, _replay_one(ph, idx, msg, incoming=incoming))
    if ph.migration is None:
        raise TraceError(f"traced {ph.out['name']} phase has no {'migrate-incoming' if incoming else 'migrate'}")


# -- phases --------------------------------------------------------------------------------------
class ReplayFailed(OperationFailed):
    """A phase failed; :attr:`trace` holds the direct trace so far (the evidence)."""

    def __init__(self, message: str, trace: _trace.Trace) -> None:
        self.trace = trace
        super().__init__(message)


def _explain(exc: BaseException, proc: qemu_launch.QemuProcess | None) -> str:
    """One line for a failed phase, with QEMU's last words if it died (*proc* None: it never started)."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if proc is not None and not proc.alive():
        msg += f" (QEMU exited: {proc.last_stderr(2) or 'no output'})"
    return msg


@contextlib.contextmanager
def _evidence(phase: _trace.Phase, proc: qemu_launch.QemuProcess | None) -> Iterator[None]:
    """A failure inside marks *phase* failed, with its one-line reason, unless its outcome is already
    known (failed: the first reason stays; succeeded: a later failure, e.g. ending QEMU, does not undo it)."""
    try:
        yield
    except BaseException as exc:
        if phase.get("ok") is None:
            phase["ok"], phase["error"] = False, _explain(exc, proc)
        raise


def _image_format(traced: _trace.Phase) -> str:
    """The format the traced save wrote: sparse when it set mapped-ram; a compressed format when its
    image (or its options) says so — the commands are a raw save's, the compressor sat behind the fd."""
    header = (traced.get("image") or {}).get("header") or {}
    for fmt in (header.get("format"), (traced.get("options") or {}).get("image_format")):
        if fmt in migration.COMPRESSORS:
            return str(fmt)
    for m in _trace.iter_commands(traced):
        if m["execute"] == "migrate-set-capabilities":
            for c in (m.get("arguments") or {}).get("capabilities", []):
                if c.get("capability") == "mapped-ram" and c.get("state"):
                    return "sparse"
    return "raw"


def _heard_shutdown(traced: _trace.Phase) -> bool:
    """Whether libvirt still listened when it ended the saved QEMU (11.x kills, then closes the monitor:
    its trace ends with ``SHUTDOWN``; 9.0 closes the monitor first and hears nothing)."""
    return any(m.get("kind") == "event" and m.get("event") == "SHUTDOWN" for m in traced["messages"])


def _wait_guest(proc: qemu_launch.QemuProcess, run_for: float, serial_pattern: str | None) -> None:
    """Let the guest run: *run_for* seconds, or until *serial_pattern* shows in its serial log."""
    deadline = time.monotonic() + (run_for if serial_pattern is None else max(run_for, 120.0))
    pat = re.compile(serial_pattern.encode()) if serial_pattern else None
    while time.monotonic() < deadline:
        proc.check_alive()
        if pat is not None and proc.serial_log is not None:
            with contextlib.suppress(OSError):
                if pat.search(proc.serial_log.read_bytes()):
                    return
        time.sleep(0.1)
    if pat is not None:
        raise OperationFailed(f"guest never printed {serial_pattern!r} on its serial port")


@dataclass
class _Run:
    """What every phase of one replay shares."""

    trace: _trace.Trace
    out: _trace.Trace
    image: str
    transport: str
    mode: str
    use_exec: bool
    progress: Progress | None
    serial_log: str | None
    #: The disk overlays both phases write (a replay never writes the original's disks).
    overlays: Path = field(default_factory=qemu_launch.make_run_dir)
    end: str = "sigterm"
    #: The traced phases to replay (each launch checks what they need first).
    traced: tuple[_trace.Phase, ...] = ()

    def settings(self, session: QMPSession) -> compat.Known:
        """What this QEMU knows, checked against every traced phase (before anything is changed)."""
        known = compat.Known.read(session)
        compat.check(known, self.traced, self.out["host"].get("qemu") or "?")
        return known

    def new_phase(self, name: str, traced: _trace.Phase) -> _trace.Phase:
        return _trace.add_phase(self.out, name, traced.get("operation", name),
                                options=dict(traced.get("options") or {}), substitutions=[])

    def rewrites(self, name: str) -> list[Any]:
        return self.out["replay"]["argv_rewrites"].setdefault(name, [])  # type: ignore[no-any-return]


def _save_phase(run: _Run, traced: _trace.Phase, *, run_for: float, serial_pattern: str | None) -> dict[str, float]:
    plan = qemu_launch.plan_launch(run.trace["domain"]["argv"], transport=run.transport, paused=True,
                                   serial_log=run.serial_log, allow_spawn=run.use_exec, overlay_dir=run.overlays)
    run.rewrites("save").extend(plan.rewrites)
    proc = qemu_launch.start(plan)
    try:
        with proc.connect() as s:
            known = run.settings(s)
            # What libvirt does at domain start (not part of the save phase): migration events on, run.
            s.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            s.execute("cont")
            _wait_guest(proc, run_for, serial_pattern)
            xml = run.trace["domain"].get("xml") or migration.synthesize_xml(s)
            with migration.saving(run.image, xml, session=s, resume=True, image_format=_image_format(traced),
                                  transport=run.transport, use_exec=run.use_exec) as out:
                phase = run.new_phase("save", traced)
                ph = _Phase(traced, phase, s, run.mode, out, run.progress, events_on=True, known=known)
                t0 = time.monotonic()
                s.record_into(phase)
                with _evidence(phase, proc):
                    _replay_commands(ph, incoming=False)
                    size = out.finish()
            t_end = time.monotonic()
            with _evidence(phase, proc):  # the image is complete: a failure here does not undo it
                migration.end_saved_qemu(s, proc, how=run.end, close_first=not _heard_shutdown(traced))
            s.record_into(None)
        proc.wait(15)
        ph.timings["end_seconds"] = round(time.monotonic() - t_end, 6)
        seconds = time.monotonic() - t0
        phase["ok"] = True
        final = saveimage.read_header_path(run.image)
        phase["image"] = {"path": run.image, "size": size, "header": final.to_dict()}
        return {"seconds": round(seconds, 6), **ph.timings}
    finally:
        proc.stop(grace=1.0)


def _restore_phase(run: _Run, traced: _trace.Phase, *, run_after: float,
                   keep_running: bool) -> tuple[dict[str, float], qemu_launch.QemuProcess | None]:
    uri0 = next((((m.get("arguments") or {}).get("uri") or "") for m in _trace.iter_commands(traced)
                 if m["execute"] == "migrate-incoming"), "")
    with migration.loading(run.image, transport=run.transport, use_exec=run.use_exec,
                           wanted_uri=uri0 or None) as inc:
        plan = inc.plan_launch(run.trace["domain"]["argv"], serial_log=run.serial_log, overlay_dir=run.overlays)
        plan.owns_overlays = keep_running  # a QEMU left running takes the overlays with it
        run.rewrites("restore").extend(plan.rewrites)
        phase = run.new_phase("restore", traced)
        if inc.fdset is not None:
            phase["substitutions"].append({"index": None, "field": "argv", "original": None,
                                           "replacement": f"-add-fd set={inc.fdset},fd={inc.fd}",
                                           "reason": "our image in the fdset the traced URI names"})
        t0 = time.monotonic()
        with _evidence(phase, None):  # QEMU that never started (or died at once) fails the phase too
            proc = inc.start(plan)
        with _evidence(phase, proc), proc.connect(phase=phase) as s:
            ph = _Phase(traced, phase, s, run.mode, inc, run.progress, pid=inc.reader_pid(), known=run.settings(s))
            with _evidence(phase, proc):
                _replay_commands(ph, incoming=True)
            seconds = time.monotonic() - t0
            phase["ok"] = True
            phase["image"] = {"path": run.image, "size": os.fstat(inc.fd).st_size, "header": inc.header.to_dict()}
            s.record_into(None)
            if run_after > 0:
                _wait_guest(proc, run_after, None)
            if not keep_running:
                s.quit()
        if not keep_running:
            proc.wait(15)
            proc.stop(grace=1.0)
    return {"seconds": round(seconds, 6), **ph.timings}, (proc if keep_running else None)


def default_image_path(trace: _trace.Trace) -> str:
    """Where a replayed save goes when no image is named."""
    d = Path(config.STATE_DIR) / "replay"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", trace["domain"].get("name") or "domain")
    return str(d / f"{name}-{os.getpid()}.save")


def _check_choices(mode: str, transport: str, phases: tuple[str, ...] | list[str],
                   end: str | None = None) -> tuple[str, ...]:
    if end is not None and end not in migration.END_WAYS:
        raise UnsupportedError(f"end must be one of {', '.join(migration.END_WAYS)}, not {end!r}")
    if mode not in MODES:
        raise UnsupportedError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if transport not in TRANSPORTS:
        raise UnsupportedError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
    for p in phases:
        if p not in _trace.PHASE_NAMES:
            raise UnsupportedError(f"unknown phase {p!r} (save, restore)")
    return tuple(phases)


def replay(trace: _trace.Trace, *, image: str | os.PathLike[str] | None = None, transport: str = "unix",
           mode: str = "faithful", phases: tuple[str, ...] | list[str] = ("save", "restore"),
           allow_unsafe: bool = False, progress: Progress | None = None, diff: bool = False,
           run_for: float = 3.0, serial_pattern: str | None = None, serial_log: str | None = None,
           run_after: float = 0.0, keep_running: bool = False, input_name: str | None = None,
           qemu_binary: str | None = None, end: str | None = None) -> _trace.Trace:
    """Replay *trace*'s phases through the direct backend; return the direct trace.

    Raises :class:`UnsafeTraceError` (before launching anything) for unsafe traces,
    :class:`OperationFailed` when a phase fails (the QEMU is killed, a partial image removed).
    With *keep_running* the restored QEMU stays up: ``trace["replay"]["qemu"]`` says where.
    *qemu_binary* runs another QEMU build than the traced ``argv[0]`` (the caller's choice: it
    must still be a ``qemu-system-*``); the direct trace's ``domain.argv[0]`` names it.
    *end*: how the saved QEMU is ended (:data:`~virtsave.qemu.migration.END_WAYS`): ``sigterm`` as
    libvirt does (the default in faithful mode) or ``quit`` (the default in essential mode).
    A capability or parameter value the traced phases need and this QEMU lacks raises
    :class:`UnsupportedError` naming it, before the guest is changed.
    """
    phases = _check_choices(mode, transport, phases, end)
    end = end or ("sigterm" if mode == "faithful" else "quit")
    problems = _trace.validate(trace)
    if problems:
        raise TraceError(f"invalid trace: {problems[0]}")
    check_safety(trace, allow_unsafe)
    argv = trace.get("domain", {}).get("argv") or []
    if not argv:
        raise TraceError("trace has no QEMU command line (domain.argv): cannot launch an equivalent QEMU")
    if qemu_binary is not None:
        if not qemu_launch.is_qemu_binary(qemu_binary):
            raise UnsupportedError(f"qemu_binary {qemu_binary}: not a QEMU system emulator (qemu-system-*)")
        argv = [qemu_binary, *argv[1:]]
        trace = {**trace, "domain": {**trace["domain"], "argv": argv}}
    traced = {p: _trace.find_phase(trace, p) for p in phases}
    for p, t in traced.items():
        if t is None:
            raise TraceError(f"trace has no {p} phase")
    if "save" not in phases and image is None:
        raise TraceError("replaying only the restore phase needs --image (a complete save image)")
    img = os.fspath(image) if image is not None else default_image_path(trace)

    version = qemu_launch.binary_version(argv[0])
    out = _trace.new_trace("direct", host={"libvirt": None, "qemu": ".".join(map(str, version)),
                                            "hostname": socket.gethostname()},
                           domain=copy.deepcopy(trace.get("domain")))
    out["replay"] = {"mode": mode, "transport": transport, "end": end,  # type: ignore[typeddict-item]
                     "input": input_name, "image": img, "argv_rewrites": {}, "timings": {}}
    run = _Run(trace, out, img, transport, mode, transport == "tcp" and not migration.has_file_uri(version),
               progress, serial_log, end=end, traced=tuple(t for t in traced.values() if t is not None))
    try:
        _run_phases(run, traced, phases, run_for=run_for, serial_pattern=serial_pattern, run_after=run_after,
                    keep_running=keep_running)
    except VirtsaveError as exc:
        failed = next((p for p in out["phases"] if p.get("ok") is False), None)
        msg = f"{failed['name']} phase failed: {failed['error']}" if failed else str(exc)
        raise ReplayFailed(msg, out) from None
    finally:
        if "qemu" not in out["replay"]:
            shutil.rmtree(run.overlays, ignore_errors=True)
    if diff:
        with contextlib.suppress(ImportError):
            from virtsave.trace import diff as _diff  # type: ignore[attr-defined]

            out["replay"]["diff"] = _diff.diff_traces(trace, out).to_json()
    return out


def _run_phases(run: _Run, traced: dict[str, Any], phases: tuple[str, ...], *, run_for: float,
                serial_pattern: str | None, run_after: float, keep_running: bool) -> None:
    timings = run.out["replay"]["timings"]
    if "save" in phases:
        timings["save"] = _save_phase(run, traced["save"], run_for=run_for, serial_pattern=serial_pattern)
    if "restore" in phases:
        timings["restore"], proc = _restore_phase(run, traced["restore"], run_after=run_after,
                                                  keep_running=keep_running)
        if proc is not None:
            run.out["replay"]["qemu"] = {"pid": proc.pid, "qmp": proc.qmp_address,
                                         "serial_log": str(proc.serial_log) if proc.serial_log else None,
                                         "run_dir": str(proc.plan.run_dir)}
