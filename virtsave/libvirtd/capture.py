"""Trace what libvirt says to QEMU while it saves and restores a domain.

:func:`trace_domain` runs the operation through :mod:`virtsave.libvirtd.reference` while
:mod:`virtsave.libvirtd.logcapture` has libvirtd's monitor logging switched on, cuts this run's
window out of the log, parses the domain's monitor conversation with
:func:`virtsave.libvirtd.logparse.trace_from_log` (one phase per operation, by time window) and
fills in the host, the domain (XML, the QEMU command line libvirt used) and each phase's
image. Secrets are redacted before the trace is returned.

Operations (``op``):

- ``cycle`` (default): save then restore, so the domain ends as it began. Without *file*
  (and without a format/channel option) it is managed save + start; otherwise save to *file*
  (or to a private temporary image, removed afterwards) + restore from it.
- ``managed-save``, ``save`` (needs *file*), ``restore`` (needs *file*): one phase.

*progress* is passed to :mod:`virtsave.libvirtd.reference`, which then polls libvirt's job stats — and
libvirt answers those with ``query-migrate`` on the monitor being traced, so the trace then holds
commands libvirt sent only because we asked. The CLI passes None.

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
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import libvirt

from virtsave.core import paths as config
from virtsave.core.errors import DomainStateError, ImageError, LogError, UnsupportedError, VirtsaveError
from virtsave.image import saveimage
from virtsave.libvirtd import domainlog, logcapture
from virtsave.libvirtd import reference as lp
from virtsave.trace import argv as qargv
from virtsave.trace import model as tr

OPS = ("cycle", "managed-save", "save", "restore")
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
# libvirt writes log timestamps with millisecond resolution: widen the per-phase window by
# this much on both sides so the first and last lines are not cut off by rounding.
_SLACK = _dt.timedelta(milliseconds=2)

Progress = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- small helpers


def host_info(conn: libvirt.virConnect) -> tr.Host:
    """libvirt and QEMU versions of the daemon behind *conn*, and this host's name."""
    from virtsave.libvirtd import host

    v = host.versions(conn)
    return {"libvirt": v.libvirt, "qemu": v.qemu, "hostname": socket.gethostname()}


def qemu_argv(conn: libvirt.virConnect, name: str, xml: str | None,
              domain_log: str | os.PathLike[str] | None = None) -> list[str]:
    """The QEMU command line libvirt used for *name*: the last start in its QEMU log, else
    ``domxml-to-native qemu-argv`` of *xml* (an approximation: no fds, no runtime paths)."""
    path = Path(domain_log) if domain_log else QEMU_LOG_DIR / f"{name}.log"
    if path.is_file():
        with contextlib.suppress(VirtsaveError):
            last = domainlog.last_start(path)  # the newest only: a long history costs ms per start
            if last is not None and last.argv:
                return list(last.argv)
    if domain_log:
        return []  # the caller named a log; do not silently describe another machine
    if xml and conn is not None:
        with contextlib.suppress(libvirt.libvirtError):
            return qargv.parse_shell(conn.domainXMLToNative("qemu-argv", xml, 0)).argv()
    return []


def image_info(path: str | os.PathLike[str] | None) -> tr.ImageInfo | None:
    """Path, size and header fields of a save image (header None when unreadable)."""
    if not path:
        return None
    p = os.fspath(path)
    try:
        size: int | None = os.stat(p).st_size
    except OSError:
        return {"path": p, "size": None, "header": None}
    header = None
    with contextlib.suppress(ImageError):
        header = saveimage.read_header_path(p).to_dict()
    return {"path": p, "size": size, "header": header}


def _redact(trace: tr.Trace) -> tr.Trace:
    from virtsave.trace import redact

    return redact.redact_trace(trace)


def _parse_window(path: Path, name: str, since: _dt.datetime, until: _dt.datetime,
                  want: str) -> tuple[list[tr.Message], str | None, list[str]]:
    """Messages (and monitor) of *name*'s monitors between *since* and *until* in the window, and
    the names of messages in that window the parser could not place in a phase."""
    from virtsave.libvirtd import logparse

    parsed = logparse.trace_from_log(path, domain=name, since=since - _SLACK, until=until + _SLACK)
    log = parsed.get("log")
    unphased = list(log["unphased_messages"])[: log["unphased"]] if log else []
    phases = parsed.get("phases", [])
    picked = [p for p in phases if p.get("name") == want] or phases
    messages: list[tr.Message] = []
    for p in picked:
        messages.extend(p.get("messages", []))
    if len(picked) > 1:  # several jobs in one op window: keep wire order, re-base t
        messages.sort(key=lambda m: m.get("t", 0))
    monitor = next((p.get("monitor") for p in picked if p.get("monitor")), None)
    return messages, monitor, unphased


# --------------------------------------------------------------------------- the traced run


class _Run:
    """One traced run: operations in order, each with its time window and result."""

    def __init__(self, conn: libvirt.virConnect, name: str, progress: Progress | None) -> None:
        self.conn = conn
        self.name = name
        self.progress = progress
        self.steps: list[dict[str, Any]] = []

    def step(self, phase: str, operation: str, call: Callable[[], lp.OpResult],
             dom: libvirt.virDomain | None, image: str | None, options: dict[str, Any]) -> lp.OpResult:
        # A restore reads the image before it runs (start deletes a managed-save image); a save
        # after (before a following start can delete it).
        img = image_info(image) if phase == "restore" else None
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
            img = image_info(res.image or image)
        self.steps.append({"phase": phase, "operation": operation, "result": res, "since": since,
                           "until": until, "image": img, "options": options})
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


def trace_domain(conn: libvirt.virConnect, name: str, op: str = "cycle", file: str | os.PathLike[str] | None = None,
                 *, uri: str | None = None, bypass_cache: bool = False, image_format: str | None = None,
                 parallel_channels: int | None = None, state: str | None = None,
                 progress: Progress | None = None, on_warning: Callable[[str], None] | None = None) -> tr.Trace:
    """Run *op* on domain *name* with monitor logging on and return its trace (redacted).

    *state* (``"running"``/``"paused"``) is the state after restore/start, as in ``virsh``.
    """
    file = os.path.abspath(os.fspath(file)) if file else None
    _check_op(op, file, image_format, parallel_channels)
    dom = lp.lookup(conn, name)
    name = dom.name()
    if op == "restore":
        if dom.isActive():
            raise DomainStateError(f"cannot trace restore of {name}: it is running (save it first)")
        hdr = saveimage.read_header_path(file, allow_partial=False)  # type: ignore[arg-type]
        m = re.search(r"<uuid>\s*([^<\s]+)\s*</uuid>", hdr.xml)
        if m and m.group(1).lower() != dom.UUIDString().lower():
            other = re.search(r"<name>\s*([^<]+?)\s*</name>", hdr.xml)
            raise ImageError(f"{file} holds domain {other.group(1) if other else m.group(1)}, not {name}")
    elif not dom.isActive():
        raise DomainStateError(f"cannot trace {op} of {name}: domain is {lp.state_name(dom)}, not running")

    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
    options = {"bypass_cache": bypass_cache, "image_format": image_format,
               "parallel_channels": parallel_channels, "state": state}
    use_file = op in ("save", "restore") or (op == "cycle" and bool(file or image_format or parallel_channels))
    tmpdir: Path | None = None
    if op == "cycle" and use_file and not file:
        # A private scratch image for the cycle (libvirt/iohelper run as root; QEMU gets an fd).
        start = logcapture.proc_starttime(os.getpid())
        tmpdir = _images_dir() / f"{os.getpid()}-{start}-{secrets.token_hex(4)}"
        tmpdir.mkdir(mode=0o700, parents=True)
        os.chmod(tmpdir.parent, 0o700)
        file = str(tmpdir / f"{name}.save")

    for left in stale_images():
        if on_warning:
            on_warning(f"image left by an interrupted trace: {left} (restore it with "
                       f"`virtsave restore {left}`, or delete it)")
    run = _Run(conn, name, progress)
    trace = tr.new_trace("libvirt", host=host_info(conn),
                         domain={"name": name, "uuid": dom.UUIDString(), "xml": xml, "argv": []})
    try:
        with logcapture.capture(uri or _conn_uri(conn), on_warning=on_warning) as cap:
            was_running = dom.isActive()
            try:
                _do_ops(run, dom, op, file, use_file, bypass_cache, image_format, parallel_channels, state, options)
            except KeyboardInterrupt:
                _recover_after_interrupt(conn, dom, op, was_running, file if use_file else None)
                raise
            window = cap.window_path()
            keep = os.environ.get("VIRTSAVE_KEEP_WINDOW")
            if keep:  # debugging aid: keep this run's raw log slice (0600)
                from virtsave.core.files import private_writer

                with private_writer(keep) as f:
                    f.write(window.read_bytes())
            for s in run.steps:
                res: lp.OpResult = s["result"]
                try:
                    messages, monitor, unphased = _parse_window(window, name, s["since"], s["until"], s["phase"])
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
    finally:
        if tmpdir is not None:
            _drop_scratch(tmpdir, dom, run, on_warning)
    trace["domain"]["argv"] = qemu_argv(conn, name, xml)
    return _redact(trace)


def _do_ops(run: _Run, dom: libvirt.virDomain, op: str, file: str | None, use_file: bool, bypass_cache: bool,
            image_format: str | None, parallel_channels: int | None, state: str | None,
            options: dict[str, Any]) -> None:
    conn, name, progress = run.conn, run.name, run.progress
    save_opts = {k: options[k] for k in ("bypass_cache", "image_format", "parallel_channels")}
    rest_opts = {"bypass_cache": bypass_cache, "parallel_channels": parallel_channels, "state": state}
    if op in ("cycle", "managed-save") and not use_file:
        res = run.step("save", "managed-save", lambda: lp.managed_save(
            conn, name, bypass_cache=bypass_cache, progress=progress, raise_on_error=False),
            dom, lp.managed_save_path(conn, name), save_opts)
        if op == "cycle" and res.ok:
            run.step("restore", "start", lambda: lp.start(
                conn, name, bypass_cache=bypass_cache, state=state, progress=progress, raise_on_error=False),
                dom, res.image or lp.managed_save_path(conn, name), {"bypass_cache": bypass_cache, "state": state})
        return
    if op in ("cycle", "save"):
        res = run.step("save", "save", lambda: lp.save(
            conn, name, file, bypass_cache=bypass_cache, image_format=image_format,  # type: ignore[arg-type]
            parallel_channels=parallel_channels, progress=progress, raise_on_error=False),
            dom, file, {**save_opts, "file": file})
        if op == "save" or not res.ok:
            return
    run.step("restore", "restore", lambda: lp.restore(
        conn, file, bypass_cache=bypass_cache, state=state,  # type: ignore[arg-type]
        parallel_channels=parallel_channels, progress=progress, raise_on_error=False),
        dom, file, {**rest_opts, "file": file})


def _drop_scratch(tmpdir: Path, dom: libvirt.virDomain, run: _Run,
                  on_warning: Callable[[str], None] | None) -> None:
    """Remove a cycle's scratch image — unless it now holds the guest's only state (saved, not
    restored: the restore failed or was interrupted)."""
    saved = any(s["phase"] == "save" and s["result"].ok for s in run.steps)
    try:
        active = bool(dom.isActive())
    except libvirt.libvirtError:
        active = False
    if saved and not active and any(tmpdir.glob("*.save")):
        if on_warning:
            img = next(tmpdir.glob("*.save"))
            on_warning(f"{dom.name()} is not running; its saved state is kept in {img} "
                       f"(restore it with `virtsave restore {img}`)")
        return
    shutil.rmtree(tmpdir, ignore_errors=True)


def _images_dir() -> Path:
    return Path(config.STATE_DIR) / "trace-images"


def stale_images() -> list[Path]:
    """Scratch images of cycle traces whose virtsave process died (SIGKILL) before removing them.

    They are never deleted automatically: after a kill between save and restore the image is the
    guest's only state."""
    out = []
    with contextlib.suppress(OSError):
        for d in _images_dir().iterdir():
            pid, _, rest = d.name.partition("-")
            start = rest.partition("-")[0]
            if not pid.isdigit():
                continue
            now = logcapture.proc_starttime(int(pid))
            if now is not None and str(now) == start:
                continue  # its owner still runs
            files = sorted(d.glob("*.save"))
            if files:
                out.extend(files)
            else:
                shutil.rmtree(d, ignore_errors=True)
    return out


def _recover_after_interrupt(conn: libvirt.virConnect, dom: libvirt.virDomain, op: str, was_running: bool,
                             file: str | None) -> None:
    """After Ctrl-C: a cycle must not leave the guest saved-and-stopped."""
    if op != "cycle" or not was_running:
        return
    with contextlib.suppress(libvirt.libvirtError, VirtsaveError):
        if dom.isActive():
            return  # the save was cancelled: libvirt resumed the guest
        if file is None and dom.hasManagedSaveImage(0):
            dom.create()
        elif file is not None and os.path.exists(file):
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
        starts = domainlog.parse_domain_log(domain_log)
        if starts:
            last = starts[-1]
            trace["domain"]["argv"] = list(last.argv)
            host = trace["host"]  # what the daemon log did not say, the domain log may
            host["libvirt"] = host.get("libvirt") or last.libvirt_version
            host["qemu"] = host.get("qemu") or last.qemu_version
            host["hostname"] = host.get("hostname") or last.hostname
    return _redact(trace)
