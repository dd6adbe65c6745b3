"""Trace what libvirt says to QEMU while it saves and restores a domain.

:func:`trace_domain` runs the operation through :mod:`virtsave.libvirtd.reference` while
:mod:`virtsave.libvirtd.logcapture` has libvirtd's monitor logging switched on, cuts this run's
window out of the log, parses the domain's monitor conversation with
:func:`virtsave.libvirtd.logparse.trace_from_log` (one phase per operation, by time window) and
fills in the host, the domain (XML, the QEMU command line libvirt ran the first phase with: the
QEMU saved, or the one started for a restore) and each phase's image. The capture window closes only
once libvirt has logged the end of each operation's job (bounded wait), so what it logs late is in.
Secrets are redacted before the trace is returned.

Operations (``op``):

- ``cycle`` (default): save then restore, so the domain ends as it began. Without *file*
  (and without a format/channel option) it is managed save + start; otherwise save to *file*
  (or to a private temporary image, removed afterwards) + restore from it.
- ``managed-save``, ``save`` (needs *file*), ``restore`` (needs *file*): one phase.

*progress* is passed to :mod:`virtsave.libvirtd.reference`, which then polls libvirt's job stats — and
libvirt answers those with ``query-migrate`` on the monitor being traced, so the trace then holds
commands libvirt sent only because we asked. The CLI passes None.

**A daemon on another host** (``qemu+ssh://``): the log capture runs there
(:mod:`virtsave.libvirtd.logcapture` over a :class:`~virtsave.libvirtd.transport.SshHost`), and the
domain's QEMU log (its command line), the save images' headers and a cycle's scratch image are read
and kept there too; phase windows are put on the daemon's clock (its offset measured over the same
connection). Image paths (``file``) are paths on the daemon's host.

A failed save (e.g. target filesystem full) does not raise: the trace records it (phase
``ok: false``, ``error``, the ``failed`` MIGRATION event, libvirt's ``cont``) and the restore
phase of a cycle is skipped — the guest is still running. Ctrl-C (or SIGTERM) during the
operation cancels libvirt's job (``abortJob``: libvirt cancels the migration and resumes the
guest); if the save had already finished in a cycle, the domain is started again from its
image; then :class:`KeyboardInterrupt` propagates after logging is restored.

Example (needs a running libvirtd, as root)::

    from virtsave.libvirtd import capture
    from virtsave.libvirtd import reference as lp
    from virtsave.trace import model as trace
    conn = lp.connect()
    tr = capture.trace_domain(conn, "vm1")            # managed save + start
    trace.dump(tr, "vm1.trace.json")

    tr = capture.import_log("libvirtd.log", "vm1")    # an existing daemon log
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import libvirt

from virtsave.core import locks
from virtsave.core.errors import (
    ConnectionFailed,
    DomainStateError,
    ImageError,
    LogError,
    UnsupportedError,
    VirtsaveError,
)
from virtsave.image import saveimage
from virtsave.libvirtd import domainlog, logcapture, transport
from virtsave.libvirtd import reference as lp
from virtsave.libvirtd import uri as liburi
from virtsave.libvirtd.transport import Host, LocalHost
from virtsave.trace import argv as qargv
from virtsave.trace import model as tr

OPS = ("cycle", "managed-save", "save", "restore")
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
#: Where the system QEMU driver keeps managed-save images on any host.
SYSTEM_SAVE_DIR = "/var/lib/libvirt/qemu/save"
# libvirt writes log timestamps with millisecond resolution: widen the per-phase window by
# this much on both sides so the first and last lines are not cut off by rounding.
_SLACK = _dt.timedelta(milliseconds=2)

Progress = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- small helpers


def host_info(conn: libvirt.virConnect, remote: bool = False) -> tr.Host:
    """libvirt and QEMU versions of the daemon behind *conn*, and the name of its host (this host's
    name, or the daemon's answer when it is *remote*)."""
    from virtsave.libvirtd import host

    v = host.versions(conn)
    name = socket.gethostname()
    if remote:
        with contextlib.suppress(libvirt.libvirtError):
            name = conn.getHostname()
    return {"libvirt": v.libvirt, "qemu": v.qemu, "hostname": name}


def _session(conn_uri: str | None) -> bool:
    target = liburi.parse(conn_uri or lp.DEFAULT_URI)
    return (target.path if target.is_local else target.remote_path) == "/session"


def domain_log_path(host: Host, conn_uri: str | None, name: str) -> str:
    """Where libvirt keeps *name*'s QEMU log on the daemon's host (a session daemon: in the user's
    ``~/.cache/libvirt/qemu/log``)."""
    if _session(conn_uri):
        return f"{host.info.home}/.cache/libvirt/qemu/log/{name}.log"
    return f"{QEMU_LOG_DIR}/{name}.log"


def managed_save_path(host: Host, conn_uri: str | None, name: str) -> str:
    """Where the QEMU driver keeps *name*'s managed-save image on the daemon's host."""
    if _session(conn_uri):
        return f"{host.info.home}/.config/libvirt/qemu/save/{name}.save"
    return f"{SYSTEM_SAVE_DIR}/{name}.save"


def _remote_text(host: Host, path: str) -> str | None:
    """The domain log at *path* on *host*, or None when it cannot be read."""
    with contextlib.suppress(OSError, VirtsaveError):
        data = host.read_bytes(path)
        if data:
            return data.decode("utf-8", errors="replace")
    return None


def qemu_argv(conn: libvirt.virConnect, name: str, xml: str | None,
              domain_log: str | os.PathLike[str] | None = None, when: float | None = None, *,
              host: Host | None = None, conn_uri: str | None = None) -> list[str]:
    """The QEMU command line libvirt used for *name*: from its QEMU log (on *host*, the daemon's,
    when given), the start that was running at epoch time *when* on the log's clock (None: the last
    start), else ``domxml-to-native qemu-argv`` of *xml* (an approximation: no fds, no runtime
    paths)."""
    path = Path(domain_log) if domain_log else QEMU_LOG_DIR / f"{name}.log"
    text: str | None = None
    if host is not None and domain_log is None:
        text = _remote_text(host, domain_log_path(host, conn_uri, name))
    elif path.is_file():
        with contextlib.suppress(OSError):
            text = path.read_text(encoding="utf-8", errors="replace")
    start = domainlog.running_at(text, when) if text else None
    if start is not None and start.argv:
        return list(start.argv)
    if domain_log:
        return []  # the caller named a log; do not silently describe another machine
    if xml and conn is not None:
        with contextlib.suppress(libvirt.libvirtError):
            return qargv.parse_shell(conn.domainXMLToNative("qemu-argv", xml, 0)).argv()
    return []


def read_header(host: Host | None, path: str, *, allow_partial: bool = True) -> saveimage.Header:
    """The save-image header of *path* on *host* (this machine when None or local): for a remote
    host only the header and its XML area come over the connection."""
    if host is None or not host.remote:
        return saveimage.read_header_path(path, allow_partial=allow_partial)
    try:
        fixed = host.read_bytes(path, 0, saveimage.HEADER_SIZE)
        if fixed is None:
            raise ImageError(f"cannot read image {path} on {host.label}: No such file or directory")
        data_len = int.from_bytes(fixed[20:24], "little") if len(fixed) >= 24 else 0
        more = host.read_bytes(path, len(fixed), min(data_len, saveimage.MAX_XML)) if data_len else b""
    except OSError as exc:
        raise ImageError(str(exc)) from None
    return saveimage.read_header(io.BytesIO(fixed + (more or b"")), allow_partial=allow_partial)


def image_info(path: str | os.PathLike[str] | None, host: Host | None = None) -> tr.ImageInfo | None:
    """Path, size and header fields of a save image (on *host*; header None when unreadable)."""
    if not path:
        return None
    p = os.fspath(path)
    if host is not None and host.remote:
        try:
            size: int | None = host.size(p) if host.exists(p) else None
        except OSError:
            size = None
    else:
        try:
            size = os.stat(p).st_size
        except OSError:
            size = None
    if size is None:
        return {"path": p, "size": None, "header": None}
    header = None
    with contextlib.suppress(ImageError):
        header = read_header(host, p).to_dict()
    return {"path": p, "size": size, "header": header}


def _redact(trace: tr.Trace) -> tr.Trace:
    from virtsave.trace import redact

    return redact.redact_trace(trace)


def _parse_window(path: Path, name: str, since: _dt.datetime, until: _dt.datetime, want: str,
                  operation: str, ok: bool | None) -> tuple[list[tr.Message], str | None, list[str]]:
    """Messages (and monitor) of *name*'s monitors between *since* and *until* in the window, and
    the names of messages in that window the parser could not place in a phase.

    Raises :class:`MixedTrace` when the window holds another libvirt client's save or restore of
    the domain (see :func:`foreign_job`): its messages are never written as this operation's."""
    from virtsave.libvirtd import logparse

    parsed = logparse.trace_from_log(path, domain=name, since=since - _SLACK, until=until + _SLACK)
    phases = parsed.get("phases", [])
    foreign = foreign_job(phases, want, operation, ok)
    if foreign:
        raise MixedTrace(f"another libvirt client worked on {name} during the traced {operation}: {foreign}; "
                         "its conversation is not written as this trace's")
    log = parsed.get("log")
    unphased = list(log["unphased_messages"])[: log["unphased"]] if log else []
    picked = [p for p in phases if p.get("name") == want] or phases
    messages: list[tr.Message] = []
    for p in picked:
        messages.extend(p.get("messages", []))
    if len(picked) > 1:  # several jobs in one op window: keep wire order, re-base t
        messages.sort(key=lambda m: m.get("t", 0))
    monitor = next((p.get("monitor") for p in picked if p.get("monitor")), None)
    return messages, monitor, unphased


# --------------------------------------------------------------------------- the end of libvirt's job

#: libvirt's async job behind each phase (its ``Stopping async job: JOB (vm=… name=…)`` line).
ASYNC_JOBS = {"save": "save", "restore": "start"}
#: How long to wait for the end of a job to show in the log after libvirt's call returned.
JOB_END_TIMEOUT = 10.0


def _await_job_ends(log: Path, offset: int, steps: list[dict[str, Any]], name: str,
                    timeout: float = JOB_END_TIMEOUT, *, host: Host | None = None,
                    clock_offset: float = 0.0) -> list[str]:
    """Wait, bounded, until libvirt has logged the end of each step's job in the capture *log* (read from
    *offset*, as it grows; on *host*, the daemon's, when given); each step's window then reaches that
    line, so messages libvirt logs late (a ``MIGRATION completed`` event, the capabilities reset) are
    inside it. *clock_offset*: seconds the log's clock is ahead of ours (a step's ``log_since`` /
    ``log_until``, when it has them, are on the log's clock). Returns the phases whose job end did not
    show."""
    from virtsave.libvirtd import logparse

    pending = list(steps)
    deadline = time.monotonic() + timeout
    rest = b""
    while pending:
        chunk = _read_from(log, offset, host)
        offset += len(chunk)
        *lines, rest = (rest + chunk).split(b"\n")
        for job, t in logparse.async_job_ends((x.decode(errors="replace") for x in lines), name):
            step = next((st for st in pending if ASYNC_JOBS[st["phase"]] == job
                         and t >= st.get("log_since", st["since"]).timestamp() - _SLACK.total_seconds()), None)
            if step is not None:
                at = _dt.datetime.fromtimestamp(t, _dt.UTC)
                step["until"] = max(step["until"], at - _dt.timedelta(seconds=clock_offset))
                if "log_until" in step:
                    step["log_until"] = max(step["log_until"], at)
                pending.remove(step)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.01)  # a late job end costs at most this much more
    return [st["phase"] for st in pending]


def _read_from(log: Path, offset: int, host: Host | None) -> bytes:
    """What *log* (on *host*, when given) holds from *offset* on."""
    if host is not None and host.remote:
        return host.read_bytes(str(log), offset) or b""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""


class MixedTrace(VirtsaveError):
    """The traced window holds another libvirt client's save/restore of the same domain."""


def foreign_job(phases: list[tr.Phase], want: str, operation: str, ok: bool | None) -> str | None:
    """Why the parsed *phases* of one traced step are not all this step's own, or None.

    One step (*operation*, e.g. ``managed-save``; libvirt answered *ok*, None when no answer came:
    the daemon went away) is one libvirt job, so its
    window holds at most one phase named *want*, done by a job of that operation (the log's
    ``Starting job: API=…``), and a successful one only if libvirt told us it succeeded — anything
    else is another client's job (``virsh save`` of the same domain) that libvirt ran before or
    instead of ours.

    >>> ph = {"name": "save", "ok": True, "attribution": {"job": "remoteDispatchDomainSaveFlags"}}
    >>> foreign_job([ph], "save", "managed-save", ok=False)
    'a save job (remoteDispatchDomainSaveFlags)'
    >>> foreign_job([{**ph, "attribution": {"job": "remoteDispatchDomainManagedSave"}}], "save", "managed-save", True)
    """
    from virtsave.libvirtd.logparse import OPERATIONS

    mine = [p for p in phases if p.get("name") == want]
    for p in phases:
        job = (p.get("attribution") or {}).get("job")
        if job and OPERATIONS.get(job, job) != operation:
            return f"a {OPERATIONS.get(job, job)} job ({job})"
    if ok is False and any(p.get("ok") for p in mine):
        job = next(((p.get("attribution") or {}).get("job") for p in mine if p.get("ok")), None)
        return f"a {operation} job that succeeded while libvirt refused ours" + (f" ({job})" if job else "")
    if len(mine) > 1:
        return f"{len(mine)} {want} conversations in the window of one {operation}"
    return None


def _answer(res: lp.OpResult) -> bool | None:
    """What libvirt answered: ok, failed, or None when it never answered (the daemon went away)."""
    return None if res.detail.get("daemon_lost") else bool(res.ok)


def refuse_busy_domain(dom: libvirt.virDomain, name: str) -> None:
    """Refuse at once when another client has a libvirt job (save, migration, dump …) running on *name*:
    its conversation would land in the trace's window."""
    try:
        kind = dom.jobInfo()[0]
    except libvirt.libvirtError:
        return
    if kind not in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED):
        return
    what = "a job"
    with contextlib.suppress(libvirt.libvirtError, TypeError):
        op = dom.jobStats(0).get("operation")
        names = {getattr(libvirt, n): n.removeprefix("VIR_DOMAIN_JOB_OPERATION_").lower().replace("_", " ")
                 for n in dir(libvirt) if n.startswith("VIR_DOMAIN_JOB_OPERATION_")}
        if op in names and names[op] != "unknown":
            what = f"a {names[op]} job"
    raise DomainStateError(f"cannot trace {name}: another libvirt client has {what} running on it; "
                           "try again when it is done")


# --------------------------------------------------------------------------- the traced run


class _Run:
    """One traced run: operations in order, each with its time window and result.

    *clock*: (offset of the daemon's clock from ours, its uncertainty) in seconds, to put the
    windows on the clock of the log's timestamps."""

    def __init__(self, conn: libvirt.virConnect, name: str, progress: Progress | None, host: Host,
                 conn_uri: str | None, clock: tuple[float, float] = (0.0, 0.0)) -> None:
        self.conn = conn
        self.name = name
        self.progress = progress
        self.host = host
        self.conn_uri = conn_uri
        self.clock = clock
        self.steps: list[dict[str, Any]] = []

    def managed_save_path(self) -> str | None:
        if not self.host.remote:
            return lp.managed_save_path(self.conn, self.name)
        return managed_save_path(self.host, self.conn_uri, self.name)

    def step(self, phase: str, operation: str, call: Callable[[], lp.OpResult],
             dom: libvirt.virDomain | None, image: str | None, options: dict[str, Any]) -> lp.OpResult:
        # A restore reads the image before it runs (start deletes a managed-save image); a save
        # after (before a following start can delete it).
        img = image_info(image, self.host) if phase == "restore" else None
        since = _dt.datetime.now(_dt.UTC)
        flags: dict[str, Any] = {}
        try:
            res = lp.abortable(call, dom, flags)
        except Exception:
            if flags.get("interrupted"):  # libvirt cancelled the job: report the Ctrl-C, not its error
                raise KeyboardInterrupt from None
            raise
        if flags.get("interrupted"):
            raise KeyboardInterrupt
        until = _dt.datetime.now(_dt.UTC)
        if phase == "save":
            img = image_info(res.image or image, self.host)
        offset, slack = self.clock
        self.steps.append({"phase": phase, "operation": operation, "result": res, "since": since,
                           "until": until, "image": img, "options": options,
                           "log_since": since + _dt.timedelta(seconds=offset - slack),
                           "log_until": until + _dt.timedelta(seconds=offset + slack)})
        return res


def _check_op(op: str, file: str | None, image_format: str | None, parallel_channels: int | None) -> None:
    if op not in OPS:
        raise UnsupportedError(f"--op must be one of {', '.join(OPS)}, not {op!r}")
    if op in ("save", "restore") and not file:
        raise UnsupportedError(f"--op {op} needs --file IMAGE")
    if op == "managed-save" and (image_format or parallel_channels or file):
        raise UnsupportedError("--op managed-save takes no --file/--image-format/--parallel-channels "
                               "(use --op save or cycle)")
    if op == "restore" and image_format:
        raise UnsupportedError("--image-format is a save option (the image header says the format)")


def _image_path(file: str | os.PathLike[str] | None, host: Host) -> str | None:
    """*file* as the daemon sees it: made absolute here; on another host it must be absolute already."""
    if not file:
        return None
    p = os.fspath(file)
    if not host.remote:
        return os.path.abspath(p)
    if not os.path.isabs(p):
        raise UnsupportedError(f"--file {p}: give an absolute path on the daemon's host {host.label}")
    return p


def _check_domain(dom: libvirt.virDomain, op: str, file: str | None, host: Host) -> None:
    name = dom.name()
    if op == "restore":
        if dom.isActive():
            raise DomainStateError(f"cannot trace restore of {name}: it is running (save it first)")
        hdr = read_header(host, file or "", allow_partial=False)
        m = re.search(r"<uuid>\s*([^<\s]+)\s*</uuid>", hdr.xml)
        if m and m.group(1).lower() != dom.UUIDString().lower():
            other = re.search(r"<name>\s*([^<]+?)\s*</name>", hdr.xml)
            raise ImageError(f"{file} holds domain {other.group(1) if other else m.group(1)}, not {name}")
    elif not dom.isActive():
        raise DomainStateError(f"cannot trace {op} of {name}: domain is {lp.state_name(dom)}, not running")


def _scratch_dir(host: Host) -> str:
    """A private directory for a cycle's image, named after the process that stands for us there
    (so :func:`stale_images` can tell whether its owner still runs)."""
    pid, start = host.owner()
    d = f"{_images_dir(host)}/{pid}-{start}-{secrets.token_hex(4)}"
    if host.remote:
        host.make_private_dir(d)
        return d
    Path(d).mkdir(mode=0o700, parents=True)
    os.chmod(Path(d).parent, 0o700)
    return d


def require_traceable(conn_uri: str | None) -> None:
    """:class:`~virtsave.core.errors.UnsupportedError` (one line) unless virtsave can switch the logging
    of the daemon behind *conn_uri* on: a local daemon, or one reached over ssh.

    >>> require_traceable("qemu+tls://h/system")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    virtsave.core.errors.UnsupportedError: qemu+tls://h/system: the tls transport gives no shell on ...
    """
    transport.host_for(conn_uri).close()


def trace_domain(conn: libvirt.virConnect, name: str, op: str = "cycle", file: str | os.PathLike[str] | None = None,
                 *, uri: str | None = None, bypass_cache: bool = False, image_format: str | None = None,
                 parallel_channels: int | None = None, state: str | None = None,
                 progress: Progress | None = None, on_warning: Callable[[str], None] | None = None,
                 on_start: Callable[[], None] | None = None) -> tr.Trace:
    """Run *op* on domain *name* with monitor logging on and return its trace (redacted).

    *state* (``"running"``/``"paused"``) is the state after restore/start, as in ``virsh``.
    *on_start* is called once the checks passed, just before the daemon's logging is switched on.
    A daemon on another host is traced over ssh (see the module docstring); transports without a
    shell there (tls, tcp) raise :class:`~virtsave.core.errors.UnsupportedError`.

    One trace per domain at a time: a second ``trace_domain`` of the same domain (any virtsave
    process on this machine) raises :class:`~virtsave.core.locks.Busy` at once, naming the first
    one's pid. A domain on which another libvirt client has a job running is refused at once
    (:func:`refuse_busy_domain`); a job of another client that libvirt runs inside the traced
    window raises :class:`MixedTrace` (no trace is returned: never a mixed one).
    """
    conn_uri = uri or _conn_uri(conn)
    options = {"bypass_cache": bypass_cache, "image_format": image_format, "parallel_channels": parallel_channels,
               "state": state, "progress": progress}
    with transport.host_for(conn_uri) as host:
        try:
            path = _image_path(file, host)
            _check_op(op, path, image_format, parallel_channels)
            dom = lp.lookup(conn, name)
            name = dom.name()
            with locks.exclusive(f"trace-{dom.UUIDString()}", f"trace --op {op} of {name}",
                                 busy=f"cannot trace {name}"):
                try:
                    return _trace(conn, dom, op, path, host, conn_uri, on_warning, on_start, options)
                except MixedTrace as exc:
                    raise MixedTrace(f"{exc}; {name} is {lp.state_name(dom)}") from None
        except libvirt.libvirtError as exc:  # a call outside the operations (e.g. the connection died)
            raise lp.map_error(exc, f"trace of {name} failed") from None


def _trace(conn: libvirt.virConnect, dom: libvirt.virDomain, op: str, file: str | None, host: Host,
           conn_uri: str | None, on_warning: Callable[[str], None] | None, on_start: Callable[[], None] | None,
           options: dict[str, Any]) -> tr.Trace:
    name = dom.name()
    _check_domain(dom, op, file, host)
    refuse_busy_domain(dom, name)
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
    use_file = op in ("save", "restore") or (op == "cycle" and bool(
        file or options["image_format"] or options["parallel_channels"]))
    for left in stale_images(host):
        if on_warning:
            on_warning(f"image left by an interrupted trace: {left} (restore it with "
                       f"`virtsave restore {left}`, or delete it)")
    scratch: str | None = None
    if op == "cycle" and use_file and not file:
        # A private scratch image for the cycle (libvirt/iohelper write it; QEMU gets an fd).
        scratch = _scratch_dir(host)
        file = f"{scratch}/{name}.save"
    run = _Run(conn, name, options.pop("progress"), host, conn_uri, host.clock_offset())
    trace = tr.new_trace("libvirt", host=host_info(conn, host.remote),
                         domain={"name": name, "uuid": dom.UUIDString(), "xml": xml, "argv": []})
    if on_start is not None:
        on_start()
    try:
        with logcapture.capture(conn_uri, on_warning=on_warning, host=host) as cap:
            was_running = dom.isActive()
            try:
                _do_ops(run, dom, op, file, use_file, options)
            except KeyboardInterrupt:
                _recover_after_interrupt(conn, dom, op, was_running, file if use_file else None, host)
                raise
            for late in _await_job_ends(cap.log_path, cap.start_offset, run.steps, name, host=host,
                                        clock_offset=run.clock[0]):
                if on_warning:
                    on_warning(f"{late} phase: libvirt's end of its job did not show in the log within "
                               f"{JOB_END_TIMEOUT:.0f} s; its last messages may be missing")
            _fill_phases(trace, run, _window(cap, run), on_warning)
    finally:
        if scratch is not None:
            _drop_scratch(scratch, dom, run, on_warning)
    trace["domain"]["argv"] = qemu_argv(conn, name, xml, when=_first_qemu_time(run.steps),
                                        host=host if host.remote else None, conn_uri=conn_uri)
    return _redact(trace)


def _first_qemu_time(steps: list[dict[str, Any]]) -> float | None:
    """When the QEMU of the first phase was running, on the log's clock — a save: as it began (the
    QEMU saved); a restore: as it ended (the QEMU started for it). A replay launches that command
    line (its fdsets, its machine) for both phases."""
    if not steps:
        return None
    first = steps[0]
    return float((first["log_since"] if first["phase"] == "save" else first["log_until"]).timestamp())


def _window(cap: logcapture.CaptureSession, run: _Run) -> Path:
    """This run's log window; when the daemon's host is gone and an operation already failed, that
    failure (it says the connection was lost, and how to see the guest's state) is the error."""
    try:
        return cap.window_path()
    except transport.HostUnreachable as exc:
        failed = next((s["result"] for s in run.steps if not s["result"].ok), None)
        if failed is None or not failed.error:
            raise
        raise ConnectionFailed(f"{failed.error} (no trace: {exc})") from None


def _fill_phases(trace: tr.Trace, run: _Run, window: Path, on_warning: Callable[[str], None] | None) -> None:
    """One phase per step, its messages cut from this run's *window* of the daemon's log."""
    keep = os.environ.get("VIRTSAVE_KEEP_WINDOW")
    if keep:  # debugging aid: keep this run's raw log slice (0600)
        from virtsave.core.files import private_writer

        with private_writer(keep) as f:
            f.write(window.read_bytes())
    name = run.name
    for s in run.steps:
        res: lp.OpResult = s["result"]
        try:
            messages, monitor, unphased = _parse_window(window, name, s["log_since"], s["log_until"], s["phase"],
                                                        s["operation"], _answer(res))
        except LogError as exc:
            if res.ok:  # it worked, yet nothing was logged: the capture itself failed
                raise LogError(f"{s['operation']} of {name} succeeded but its monitor traffic was not "
                               f"captured ({exc}); were libvirtd's log settings changed meanwhile?") from None
            # failed before QEMU migrated anything: record the failure without messages
            messages, monitor, unphased = [], None, []
            if on_warning:
                on_warning(f"{s['phase']} phase: no migration found in the log ({exc})")
        if unphased and on_warning:
            on_warning(f"{s['phase']} phase: {len(unphased)} message(s) of {name}'s monitor in the "
                       f"operation's window were not placed in the phase ({', '.join(unphased[:6])}…)")
        phase = tr.add_phase(trace, s["phase"], s["operation"], monitor=monitor, options=cast(
            tr.PhaseOptions, {k: v for k, v in s["options"].items() if v not in (None, False)}))
        phase["ok"] = bool(res.ok)
        phase["error"] = res.error
        phase["image"] = s["image"]
        phase["messages"] = messages
        phase["seconds"] = res.seconds
        phase["window"] = {"since": s["since"].isoformat(), "until": s["until"].isoformat()}
        if unphased:
            phase["unphased"] = unphased


def _do_ops(run: _Run, dom: libvirt.virDomain, op: str, file: str | None, use_file: bool,
            options: dict[str, Any]) -> None:
    conn, name, progress = run.conn, run.name, run.progress
    bypass_cache, state = options["bypass_cache"], options["state"]
    image_format, parallel_channels = options["image_format"], options["parallel_channels"]
    save_opts = {k: options[k] for k in ("bypass_cache", "image_format", "parallel_channels")}
    rest_opts = {"bypass_cache": bypass_cache, "parallel_channels": parallel_channels, "state": state}
    if op in ("cycle", "managed-save") and not use_file:
        res = run.step("save", "managed-save", lambda: lp.managed_save(
            conn, name, bypass_cache=bypass_cache, progress=progress, raise_on_error=False),
            dom, run.managed_save_path(), save_opts)
        if op == "cycle" and res.ok:
            run.step("restore", "start", lambda: lp.start(
                conn, name, bypass_cache=bypass_cache, state=state, progress=progress, raise_on_error=False),
                dom, res.image or run.managed_save_path(), {"bypass_cache": bypass_cache, "state": state})
        return
    if op in ("cycle", "save"):
        res = run.step("save", "save", lambda: lp.save(
            conn, name, file, bypass_cache=bypass_cache, image_format=image_format,  # type: ignore[arg-type]
            parallel_channels=parallel_channels, progress=progress, raise_on_error=False),
            dom, file, {**save_opts, "file": file})
        if op == "save" or not res.ok:
            return
    header = read_header(run.host, file or "", allow_partial=False) if run.host.remote else None
    run.step("restore", "restore", lambda: lp.restore(
        conn, file, bypass_cache=bypass_cache, state=state,  # type: ignore[arg-type]
        parallel_channels=parallel_channels, progress=progress, raise_on_error=False, header=header),
        dom, file, {**rest_opts, "file": file})


def _drop_scratch(scratch: str, dom: libvirt.virDomain, run: _Run,
                  on_warning: Callable[[str], None] | None) -> None:
    """Remove a cycle's scratch image — unless it now holds the guest's only state (saved, not
    restored: the restore failed or was interrupted)."""
    host = run.host
    saved = any(s["phase"] == "save" and s["result"].ok for s in run.steps)
    try:
        active = bool(dom.isActive())
    except libvirt.libvirtError:
        active = False
    images = [f for f in _listdir(host, scratch) if f.endswith(".save")]
    if saved and not active and images:
        if on_warning:
            img = f"{scratch}/{images[0]}"
            where = f" on {host.label}" if host.remote else ""
            on_warning(f"{dom.name()} is not running; its saved state is kept in {img}{where} "
                       f"(restore it with `virtsave restore {img}`)")
        return
    with contextlib.suppress(OSError, VirtsaveError):
        host.remove(scratch, tree=True)


def _listdir(host: Host, path: str) -> list[str]:
    with contextlib.suppress(OSError, VirtsaveError):
        return host.listdir(path)
    return []


def _images_dir(host: Host | None = None) -> str:
    return f"{(host or LocalHost()).info.state_dir}/trace-images"


def stale_images(host: Host | None = None) -> list[str]:
    """Scratch images of cycle traces whose virtsave process died (SIGKILL) before removing them
    (on *host*: the daemon's; default this machine).

    They are never deleted automatically: after a kill between save and restore the image is the
    guest's only state."""
    host = host or LocalHost()
    top = _images_dir(host)
    out = []
    for d in _listdir(host, top):
        pid, _, rest = d.partition("-")
        start = rest.partition("-")[0]
        if not pid.isdigit():
            continue
        now = host.proc_starttime(int(pid))
        if now is not None and str(now) == start:
            continue  # its owner still runs
        files = sorted(f for f in _listdir(host, f"{top}/{d}") if f.endswith(".save"))
        if files:
            out.extend(f"{top}/{d}/{f}" for f in files)
        else:
            with contextlib.suppress(OSError, VirtsaveError):
                host.remove(f"{top}/{d}", tree=True)
    return out


def _recover_after_interrupt(conn: libvirt.virConnect, dom: libvirt.virDomain, op: str, was_running: bool,
                             file: str | None, host: Host) -> None:
    """After Ctrl-C: a cycle must not leave the guest saved-and-stopped."""
    if op != "cycle" or not was_running:
        return
    with contextlib.suppress(libvirt.libvirtError, VirtsaveError, OSError):
        if dom.isActive():
            return  # the save was cancelled: libvirt resumed the guest
        if file is None and dom.hasManagedSaveImage(0):
            dom.create()
        elif file is not None and host.exists(file):
            conn.restore(file)


def _conn_uri(conn: libvirt.virConnect) -> str | None:
    try:
        return conn.getURI()
    except libvirt.libvirtError:
        return None


# --------------------------------------------------------------------------- importing a log


def import_log(log: str | os.PathLike[str], domain: str | None = None, *, monitor: str | None = None,
               domain_log: str | os.PathLike[str] | None = None, since: Any = None,
               until: Any = None) -> tr.Trace:
    """A trace from an existing libvirtd debug log (the seed's ``LIBVIRT_LOG_FILTERS=1:monitor``
    or richer). Raises :class:`~virtsave.core.errors.AmbiguousMonitor` (``.monitors``) when the log
    cannot tell which monitor is *domain*'s and no *monitor* was given."""
    from virtsave.libvirtd import logparse

    if not os.path.isfile(log):
        why = "not a regular file" if os.path.exists(log) else "No such file or directory"
        raise LogError(f"cannot read log {log}: {why}")
    trace = logparse.trace_from_log(log, domain=domain, monitor=monitor, since=since, until=until)
    if domain and not trace["domain"].get("name"):
        trace["domain"]["name"] = domain
    if domain_log:
        start = _start_of(trace, domainlog.parse_domain_log(domain_log), domain_log)
        trace["domain"]["argv"] = list(start.argv)
        host = trace["host"]  # what the daemon log did not say, the domain log may
        host["libvirt"] = host.get("libvirt") or start.libvirt_version
        host["qemu"] = host.get("qemu") or start.qemu_version
        host["hostname"] = host.get("hostname") or start.hostname
    return _redact(trace)


def _start_of(trace: tr.Trace, starts: list[domainlog.QemuStart],
              domain_log: str | os.PathLike[str]) -> domainlog.QemuStart:
    """The QEMU start of the domain log that ran the traced conversation: the one running when its
    first phase began (a save: the QEMU that was saved; a restore: the QEMU started for it)."""
    since = trace["phases"][0]["window"]["since"]
    when = _dt.datetime.fromisoformat(since).timestamp()
    start = domainlog.start_at(starts, when)
    if start is None:
        raise LogError(f"domain log {os.fspath(domain_log)} records no QEMU start before {since} "
                       "(the traced conversation's first message): not this domain's log, or cut")
    return start
