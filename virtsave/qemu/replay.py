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
  an fdset (``-add-fd``, sparse images); ``migrate-incoming`` rewritten to it; the traced
  ``cont`` (absent when restored paused).
* ``transport="tcp"``: QMP over 127.0.0.1, no fds: ``file:PATH,offset=N`` URIs (QEMU ≥ 8.2)
  or an ``exec:`` helper built here (older QEMU; ``exec:`` is never taken from a trace).
* ``mode="essential"``: only commands that change state (no ``query-*``/``qom-*`` probes,
  no post-save resets of a QEMU about to quit).

Every deviation from the traced command is in ``phase["substitutions"]``; mode, transport,
argv rewrites and timings in ``trace["replay"]`` (``timings.save.seconds``: first traced
command to QEMU gone, image finalized and synced; ``timings.restore.seconds``: QEMU launch to
the traced commands done, i.e. running after ``cont``; ``migration_seconds``: the stream alone).
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtsave.core import paths as config
from virtsave.core.errors import (
    OperationFailed,
    QMPError,
    TraceError,
    UnsafeTraceError,
    UnsupportedError,
    VirtsaveError,
)
from virtsave.image import saveimage
from virtsave.qemu import direct, safety
from virtsave.qemu import launch as qemu_launch
from virtsave.qemu.qmp import QMPSession
from virtsave.trace import model as _trace

MODES = ("faithful", "essential")
TRANSPORTS = ("unix", "tcp")
#: Read-only probes libvirt sends (skipped in essential mode).
PROBE_PREFIXES = ("query-", "qom-get", "qom-list", "device-list-properties", "qom-list-properties")
#: Commands whose failure fails the phase (a failed probe is recorded and passed over).
CRITICAL = frozenset({"stop", "cont", "migrate", "migrate-incoming", "getfd", "add-fd",
                      "migrate-set-capabilities", "migrate-set-parameters"})
Progress = Callable[[dict[str, Any]], None]
_FDSET_URI = re.compile(r"^file:/dev/fdset/(\d+)(?:,offset=(0x[0-9a-fA-F]+|\d+))?$")


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
    transport: str
    mode: str
    image: str
    header: saveimage.Header
    fd: int
    use_exec: bool
    progress: Progress | None
    migration: str | None = None
    events_on: bool = False
    pid: int | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def substitute(self, index: int, field_: str, original: Any, replacement: Any, reason: str) -> None:
        self.out.setdefault("substitutions", []).append(
            {"index": index, "field": field_, "original": original, "replacement": replacement, "reason": reason})


def _offset_hex(n: int) -> str:
    return f"{n:#x}"


def _rewrite_uri(ph: _Phase, idx: int, uri: str, incoming: bool) -> str:
    """Point a traced migration URI at our image."""
    off = ph.header.stream_offset
    if ph.transport == "tcp":
        if ph.use_exec:
            new = direct.exec_restore_uri(ph.image, off) if incoming else direct.exec_save_uri(ph.image, off)
            why = "TCP QMP cannot pass fds; QEMU < 8.2 has no file: URI, so a dd helper built by virtsave"
        else:
            new = f"file:{ph.image},offset={_offset_hex(off)}"
            why = "TCP QMP cannot pass fds: QEMU opens the image by path"
        ph.substitute(idx, "arguments.uri", uri, new, why)
        return new
    m = _FDSET_URI.match(uri)
    if m:
        new = f"file:/dev/fdset/{m.group(1)},offset={_offset_hex(off)}"
        if new != uri:
            ph.substitute(idx, "arguments.uri", uri, new, "our image's stream offset")
        return new
    if uri.startswith("fd:"):
        if incoming:
            new = f"fd:{ph.fd}"
            if new != uri:
                ph.substitute(idx, "arguments.uri", uri, new, "our image fd, inherited by QEMU at exec")
            return new
        return uri  # fd:NAME from getfd: the same name, our fd
    raise UnsupportedError(f"cannot replay migration URI {uri!r} (only fd: and file:/dev/fdset/ are replayed)")


def _send(ph: _Phase, idx: int, execute: str, args: dict[str, Any] | None,
          fds: list[int] | None = None) -> dict[str, Any]:
    rep = ph.session.execute_raw(execute, args, fds)
    if "error" in rep and execute in CRITICAL:
        if execute in ("migrate-set-capabilities", "migrate-set-parameters"):
            return _retry_known(ph, idx, execute, args or {}, rep)
        err = rep["error"]
        # A newer QEMU's optional argument (e.g. migrate-incoming's exit-on-error, QEMU >= 9.1) that
        # this QEMU rejects: drop it, resend, and record the substitution.
        m = re.fullmatch(r"Parameter '([\w-]+)' is unexpected", str(err.get("desc", "")))
        if m and args and m.group(1) in args and execute in ("migrate", "migrate-incoming"):
            new = {k: v for k, v in args.items() if k != m.group(1)}
            ph.substitute(idx, f"arguments.{m.group(1)}", args[m.group(1)], None,
                          f"argument unknown to this QEMU ({err.get('desc')}) dropped")
            return _send(ph, idx, execute, new, fds)
        raise OperationFailed(f"{ph.out['name']}: {execute} failed: {err.get('desc', err)}")
    return rep


def _retry_known(ph: _Phase, idx: int, execute: str, args: dict[str, Any], rep: dict[str, Any]) -> dict[str, Any]:
    """A trace from another QEMU may name capabilities/parameters this one lacks: drop those
    (only if they were off / left at their value) and resend, as a recorded substitution."""
    if execute == "migrate-set-capabilities":
        known = {c["capability"] for c in ph.session.execute("query-migrate-capabilities") or []}
        caps = args.get("capabilities", [])
        dropped = [c for c in caps if c.get("capability") not in known]
        if not dropped or any(c.get("state") for c in dropped):
            raise OperationFailed(f"{ph.out['name']}: {execute} failed: {rep['error'].get('desc')}")
        new = {**args, "capabilities": [c for c in caps if c.get("capability") in known]}
        ph.substitute(idx, "arguments.capabilities", [c["capability"] for c in dropped], None,
                      "capabilities unknown to this QEMU (all off in the trace) dropped")
    else:
        known = set((ph.session.execute("query-migrate-parameters") or {}).keys())
        dropped_p = sorted(k for k in args if k not in known)
        if not dropped_p:
            raise OperationFailed(f"{ph.out['name']}: {execute} failed: {rep['error'].get('desc')}")
        new = {k: v for k, v in args.items() if k in known}
        ph.substitute(idx, "arguments", dropped_p, None, "parameters unknown to this QEMU dropped")
    rep2 = ph.session.execute_raw(execute, new)
    if "error" in rep2:
        raise OperationFailed(f"{ph.out['name']}: {execute} failed: {rep2['error'].get('desc')}")
    return rep2


def _wait(ph: _Phase, mark: int, incoming: bool) -> None:
    cb = direct.migration_progress(ph.progress, "restore" if incoming else "save", pid=ph.pid, image=ph.image,
                                   stream_offset=ph.header.stream_offset)
    poll = None if ph.events_on else 0.2
    t0 = time.monotonic()
    ph.migration = ph.session.wait_migration(since=mark, progress=cb, poll=poll)
    ph.timings["migration_seconds"] = round(time.monotonic() - t0, 6)
    if ph.migration != "completed":
        desc = ""
        with contextlib.suppress(QMPError):
            desc = str((ph.session.execute("query-migrate") or {}).get("error-desc", ""))
        raise OperationFailed(f"{ph.out['name']}: migration {ph.migration}: {desc}".rstrip(": "))


def _replay_commands(ph: _Phase, *, incoming: bool) -> None:
    """Send the traced phase's commands in order (rewritten where needed)."""
    fd_for_scm = [ph.fd]
    for idx, msg in enumerate(ph.traced["messages"]):
        if msg.get("kind") != "command":
            continue
        execute = msg["execute"]
        args = copy.deepcopy(msg.get("arguments"))
        if execute == "qmp_capabilities":
            ph.substitute(idx, "execute", execute, None, "negotiated by qemu.qmp when connecting")
            continue
        if ph.mode == "essential" and (is_probe(execute) or (ph.migration == "completed" and not incoming)):
            continue
        if execute == "migrate-set-capabilities" and args:
            for c in args.get("capabilities", []):
                if c.get("capability") == "events" and c.get("state"):
                    ph.events_on = True
        fds: list[int] | None = None
        if msg.get("fds") or execute in ("getfd", "add-fd"):
            if ph.transport == "tcp":
                ph.substitute(idx, "fds", msg.get("fds", 1), 0,
                              f"{execute} skipped: TCP QMP cannot pass fds (the URI names the file instead)")
                continue
            fds = fd_for_scm
            ph.substitute(idx, "fds", msg.get("fds", 1), 1, "our image fd, passed by SCM_RIGHTS")
        if execute in ("migrate", "migrate-incoming"):
            if not args or "uri" not in args:
                raise UnsupportedError(f"{execute} without a uri (channels) cannot be replayed yet")
            args["uri"] = _rewrite_uri(ph, idx, args["uri"], incoming)
            mark = ph.session.event_mark()
            _send(ph, idx, execute, args, fds)
            _wait(ph, mark, incoming)
            continue
        _send(ph, idx, execute, args, fds)
    if ph.migration is None:
        raise TraceError(f"traced {ph.out['name']} phase has no {'migrate-incoming' if incoming else 'migrate'}")


# -- phases --------------------------------------------------------------------------------------
class ReplayFailed(OperationFailed):
    """A phase failed; :attr:`trace` holds the direct trace so far (the evidence)."""

    def __init__(self, message: str, trace: _trace.Trace) -> None:
        self.trace = trace
        super().__init__(message)


def _explain(exc: BaseException, proc: qemu_launch.QemuProcess) -> str:
    """One line for a failed phase, with QEMU's last words if it died."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not proc.alive():
        msg += f" (QEMU exited: {proc.last_stderr(2) or 'no output'})"
    return msg


def _image_format(traced: _trace.Phase) -> str:
    for m in _trace.iter_commands(traced):
        if m["execute"] == "migrate-set-capabilities":
            for c in (m.get("arguments") or {}).get("capabilities", []):
                if c.get("capability") == "mapped-ram" and c.get("state"):
                    return "sparse"
    return "raw"


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


def _save_phase(trace: _trace.Trace, out: _trace.Trace, traced: _trace.Phase, image: str, *,
                transport: str, mode: str, use_exec: bool, progress: Progress | None, run_for: float,
                serial_pattern: str | None, serial_log: str | None, rewrites: list[Any],
                overlay_dir: str | None = None) -> dict[str, float]:
    argv = trace["domain"]["argv"]
    plan = qemu_launch.plan_launch(argv, transport=transport, paused=True, serial_log=serial_log,
                                   allow_spawn=use_exec, overlay_dir=overlay_dir)
    rewrites.extend(plan.rewrites)
    proc = qemu_launch.start(plan)
    fd = -1
    created = False
    try:
        s = proc.connect()
        with s:
            # What libvirt does at domain start (not part of the save phase): migration events on, run.
            s.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            s.execute("cont")
            _wait_guest(proc, run_for, serial_pattern)
            xml = trace["domain"].get("xml") or direct.synthesize_xml(s)
            fmt = _image_format(traced)
            fd, hdr = direct.create_image(image, xml, None, was_running=True, image_format=fmt)
            created = True
            scm_fd = fd
            if fmt == "sparse" and transport == "unix":
                # QEMU dups fdset members by access mode: an outgoing file: URI wants O_WRONLY.
                scm_fd = os.open(image, os.O_WRONLY | os.O_CLOEXEC)
            else:
                os.lseek(fd, hdr.stream_offset, os.SEEK_SET)
            phase = _trace.add_phase(out, "save", traced.get("operation", "save"),
                                     options=dict(traced.get("options") or {}), substitutions=[])
            ph = _Phase(traced, phase, s, transport, mode, image, hdr, scm_fd, use_exec, progress, events_on=True)
            t0 = time.monotonic()
            s.record_into(phase)
            try:
                _replay_commands(ph, incoming=False)
            except BaseException as exc:
                phase["ok"], phase["error"] = False, _explain(exc, proc)
                with contextlib.suppress(QMPError):
                    if ph.migration not in (None, "completed"):
                        s.execute("cont")  # libvirt resumes the guest after a failed save
                raise
            finally:
                if scm_fd != fd:
                    os.close(scm_fd)
            if use_exec:
                direct.wait_exec_helper(image)
            if transport == "tcp":
                # QEMU opened the file by path (and may have truncated it): put the header back.
                os.pwrite(fd, saveimage.encode_header(xml, None, was_running=True, image_format=fmt), 0)
            saveimage.finalize(fd)
            s.quit()
            s.record_into(None)
        proc.wait(15)
        seconds = time.monotonic() - t0
        phase["ok"] = True
        size = os.fstat(fd).st_size
        final = saveimage.read_header_path(image)
        phase["image"] = {"path": image, "size": size, "header": final.to_dict()}
        return {"seconds": round(seconds, 6), **ph.timings}
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(image)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
        proc.stop(grace=1.0)


def _restore_phase(trace: _trace.Trace, out: _trace.Trace, traced: _trace.Phase, image: str, *,
                   transport: str, mode: str, use_exec: bool, progress: Progress | None,
                   serial_log: str | None, run_after: float, keep_running: bool,
                   rewrites: list[Any], overlay_dir: str | None = None
                   ) -> tuple[dict[str, float], qemu_launch.QemuProcess | None]:
    argv = trace["domain"]["argv"]
    fd, hdr = direct.open_image(image)
    proc = None
    try:
        uri0 = next((((m.get("arguments") or {}).get("uri") or "") for m in _trace.iter_commands(traced)
                     if m["execute"] == "migrate-incoming"), "")
        add_fds: list[tuple[int, int, str]] = []
        pass_fds: tuple[int, ...] = ()
        if transport == "unix":
            m = _FDSET_URI.match(uri0)
            if m:
                add_fds = [(int(m.group(1)), fd, "virtsave-incoming")]
            else:
                pass_fds = (fd,)
        plan = qemu_launch.plan_launch(argv, incoming="defer", transport=transport, paused=True,
                                       serial_log=serial_log, add_fds=add_fds, pass_fds=pass_fds,
                                       allow_spawn=use_exec, overlay_dir=overlay_dir)
        plan.owns_overlays = keep_running  # a QEMU left running takes the overlays with it
        rewrites.extend(plan.rewrites)
        phase = _trace.add_phase(out, "restore", traced.get("operation", "restore"),
                                 options=dict(traced.get("options") or {}), substitutions=[])
        if add_fds:
            phase["substitutions"].append({"index": None, "field": "argv", "original": None,
                                           "replacement": f"-add-fd set={add_fds[0][0]},fd={fd}",
                                           "reason": "our image in the fdset the traced URI names"})
        t0 = time.monotonic()
        proc = qemu_launch.start(plan)
        with proc.connect(phase=phase) as s:
            ph = _Phase(traced, phase, s, transport, mode, image, hdr, fd, use_exec, progress, pid=proc.pid)
            try:
                _replay_commands(ph, incoming=True)
            except BaseException as exc:
                phase["ok"], phase["error"] = False, _explain(exc, proc)
                raise
            seconds = time.monotonic() - t0
            phase["ok"] = True
            phase["image"] = {"path": image, "size": os.fstat(fd).st_size, "header": hdr.to_dict()}
            s.record_into(None)
            if run_after > 0:
                _wait_guest(proc, run_after, None)
            if not keep_running:
                s.quit()
        if not keep_running:
            proc.wait(15)
        return {"seconds": round(seconds, 6), **ph.timings}, (proc if keep_running else None)
    except BaseException:
        if proc is not None:
            proc.plan.owns_run_dir = True
            proc.stop(grace=1.0)
        raise
    finally:
        os.close(fd)
        if proc is not None and not keep_running:
            proc.stop(grace=1.0)


def default_image_path(trace: _trace.Trace) -> str:
    """Where a replayed save goes when no image is named."""
    d = Path(config.STATE_DIR) / "replay"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", trace["domain"].get("name") or "domain")
    return str(d / f"{name}-{os.getpid()}.save")


def replay(trace: _trace.Trace, *, image: str | os.PathLike[str] | None = None, transport: str = "unix",
           mode: str = "faithful", phases: tuple[str, ...] | list[str] = ("save", "restore"),
           allow_unsafe: bool = False, progress: Progress | None = None, diff: bool = False,
           run_for: float = 3.0, serial_pattern: str | None = None, serial_log: str | None = None,
           run_after: float = 0.0, keep_running: bool = False, input_name: str | None = None) -> _trace.Trace:
    """Replay *trace*'s phases through the direct backend; return the direct trace.

    Raises :class:`UnsafeTraceError` (before launching anything) for unsafe traces,
    :class:`OperationFailed` when a phase fails (the QEMU is killed, a partial image removed).
    With *keep_running* the restored QEMU stays up: ``trace["replay"]["qemu"]`` says where.
    """
    if mode not in MODES:
        raise UnsupportedError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if transport not in TRANSPORTS:
        raise UnsupportedError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
    phases = tuple(phases)
    for p in phases:
        if p not in _trace.PHASE_NAMES:
            raise UnsupportedError(f"unknown phase {p!r} (save, restore)")
    problems = _trace.validate(trace)
    if problems:
        raise TraceError(f"invalid trace: {problems[0]}")
    check_safety(trace, allow_unsafe)
    argv = trace.get("domain", {}).get("argv") or []
    if not argv:
        raise TraceError("trace has no QEMU command line (domain.argv): cannot launch an equivalent QEMU")
    traced = {p: _trace.find_phase(trace, p) for p in phases}
    for p, t in traced.items():
        if t is None:
            raise TraceError(f"trace has no {p} phase")
    if "save" not in phases and image is None:
        raise TraceError("replaying only the restore phase needs --image (a complete save image)")
    img = os.fspath(image) if image is not None else default_image_path(trace)

    version = qemu_launch.binary_version(argv[0])
    use_exec = transport == "tcp" and not direct.has_file_uri(version)
    out = _trace.new_trace("direct", host={"libvirt": None, "qemu": ".".join(map(str, version)),
                                            "hostname": socket.gethostname()},
                           domain=copy.deepcopy(trace.get("domain")))
    out["replay"] = {"mode": mode, "transport": transport, "input": input_name, "image": img,
                     "argv_rewrites": {}, "timings": {}}
    overlays = qemu_launch.make_run_dir()  # the disk overlays both phases write (never the original's disks)
    try:
        _run_phases(trace, out, traced, img, phases, transport=transport, mode=mode, use_exec=use_exec,
                    progress=progress, run_for=run_for, serial_pattern=serial_pattern, serial_log=serial_log,
                    run_after=run_after, keep_running=keep_running, overlay_dir=str(overlays))
    except VirtsaveError as exc:
        failed = next((p for p in out["phases"] if p.get("ok") is False), None)
        msg = f"{failed['name']} phase failed: {failed['error']}" if failed else str(exc)
        raise ReplayFailed(msg, out) from None
    finally:
        if "qemu" not in out["replay"]:
            shutil.rmtree(overlays, ignore_errors=True)
    if diff:
        with contextlib.suppress(ImportError):
            from virtsave.trace import diff as _diff  # type: ignore[attr-defined]

            out["replay"]["diff"] = _diff.diff_traces(trace, out).to_json()
    return out


def _run_phases(trace: _trace.Trace, out: _trace.Trace, traced: dict[str, Any], img: str, phases: tuple[str, ...],
                *, transport: str, mode: str, use_exec: bool, progress: Progress | None, run_for: float,
                serial_pattern: str | None, serial_log: str | None, run_after: float, keep_running: bool,
                overlay_dir: str | None = None) -> None:
    timings = out["replay"]["timings"]
    if "save" in phases:
        timings["save"] = _save_phase(trace, out, traced["save"], img, transport=transport, mode=mode,  # type: ignore[arg-type]
                                      use_exec=use_exec, progress=progress, run_for=run_for,
                                      serial_pattern=serial_pattern, serial_log=serial_log,
                                      rewrites=out["replay"]["argv_rewrites"].setdefault("save", []),
                                      overlay_dir=overlay_dir)
    if "restore" in phases:
        timings["restore"], proc = _restore_phase(
            trace, out, traced["restore"], img, transport=transport, mode=mode,  # type: ignore[arg-type]
            use_exec=use_exec, progress=progress, serial_log=serial_log, run_after=run_after,
            keep_running=keep_running, rewrites=out["replay"]["argv_rewrites"].setdefault("restore", []),
            overlay_dir=overlay_dir)
        if proc is not None:
            out["replay"]["qemu"] = {"pid": proc.pid, "qmp": proc.qmp_address,
                                     "serial_log": str(proc.serial_log) if proc.serial_log else None,
                                     "run_dir": str(proc.plan.run_dir)}
