"""The reference path: save, restore and managed save done by libvirt itself.

Everything goes through libvirt-python (never ``virsh``). Each operation returns an
:class:`~virtsave.core.operation.OpResult` (the result type both backends share; options go
by the names of :class:`~virtsave.core.operation.SaveOptions`); a failure raises a
:class:`~virtsave.core.errors.VirtsaveError` subclass with one clear line (pass
``raise_on_error=False`` to get ``OpResult(ok=False)`` instead; the exception also carries it
as ``.result``). While the blocking libvirt call runs, a side thread polls
``virDomainGetJobStats`` and feeds a *progress* callable with a dict (``domain``,
``operation``, ``data_processed``, ``data_total``, ``data_remaining``, ``memory_*``,
``time_elapsed`` …).

Bulk (like libvirt-guests ``ON_SHUTDOWN=suspend``, but with a report):
:func:`managed_save_all` / :func:`start_all` run on a thread pool, one libvirt
connection per worker, and never raise for a single domain's failure.

Example (needs a running libvirtd)::

    from virtsave.libvirtd import reference as lp
    conn = lp.connect()                       # $LIBVIRT_DEFAULT_URI or qemu:///system
    r = lp.managed_save(conn, "vm1", bypass_cache=True)
    print(r.ok, r.seconds, r.image, r.image_size)
    r = lp.start(conn, "vm1")
    print(r.detail["from_managed_save"], r.state)   # True running: booted from the managed-save image
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import threading
import time
import uuid as _uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import libvirt

from virtsave.core.errors import (
    ConnectionFailed,
    DomainNotFound,
    DomainStateError,
    ImageError,
    OperationFailed,
    UnsupportedError,
    VirtsaveError,
)
from virtsave.core.operation import OpResult as OpResult  # re-exported: callers know it as lp.OpResult
from virtsave.core.operation import domain_name
from virtsave.core.signals import deferred_signals
from virtsave.image.saveimage import Header, read_header_path
from virtsave.libvirtd import host
from virtsave.libvirtd import uri as conn_uri

DEFAULT_URI = "qemu:///system"
#: Where the system QEMU driver keeps managed-save images (``<save_dir>/<name>.save``).
MANAGED_SAVE_DIR = "/var/lib/libvirt/qemu/save"
POLL_INTERVAL = 0.2
#: When libvirtd goes away during a job, how long (seconds) to wait for it to come back and say where
#: the guest is (``$VIRTSAVE_DAEMON_WAIT`` overrides; a restart by an operator or systemd takes ~1-3 s).
DAEMON_RETURN_WAIT = 15.0

Progress = Callable[[dict[str, Any]], None]


def _silence(_ctx: object, _err: object) -> None:
    """libvirt's default handler prints every error on stderr; we report them ourselves."""


libvirt.registerErrorHandler(_silence, None)

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


# ---------------------------------------------------------------------------- errors


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def map_error(exc: libvirt.libvirtError, what: str, *, image: str | None = None) -> VirtsaveError:
    """One VirtsaveError subclass with one line for a libvirtError raised while doing *what*."""
    code = exc.get_error_code()
    msg = _first_line(exc.get_error_message() or str(exc))
    text = f"{what}: {msg}"
    low = msg.lower()
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFound(text)
    if code in (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_CANCELLED, libvirt.VIR_ERR_ACCESS_DENIED):
        return ConnectionFailed(f"{text} (permission problem: run as root or as a member of the libvirt group)")
    if "permission denied" in low:  # a file the daemon, its iohelper or QEMU may not touch
        cls = ImageError if image is not None else OperationFailed
        return cls(f"{text} (permission problem: check the file's owner/mode and its directory)")
    if code == libvirt.VIR_ERR_NO_CONNECT or code == libvirt.VIR_ERR_RPC:
        return ConnectionFailed(text)
    if code in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, libvirt.VIR_ERR_CONFIG_UNSUPPORTED):
        return UnsupportedError(text)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return DomainStateError(text)
    if image is not None and ("no such file" in low or "permission denied" in low or "image" in low
                              or "header" in low or "magic" in low):
        return ImageError(text)
    return OperationFailed(text)


# ---------------------------------------------------------------------------- connection


def connect(uri: str | None = None) -> libvirt.virConnect:
    """Open a read-write connection; ConnectionFailed with one clear line otherwise."""
    uri = uri or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        msg = _first_line(exc.get_error_message() or str(exc))
        low = msg.lower()
        socket_gone = "failed to connect socket" in low and ("no such file" in low or "connection refused" in low)
        if not socket_gone and (
            any(w in low for w in ("permission denied", "authentication", "authoriz", "polkit", "system bus"))
            or exc.get_error_code() in (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_CANCELLED,
                                        libvirt.VIR_ERR_ACCESS_DENIED)):
            raise ConnectionFailed(f"cannot connect to {uri}: permission problem ({msg}); "
                                   "run as root or as a member of the libvirt group") from None
        if socket_gone:
            raise ConnectionFailed(f"cannot connect to {uri}: the libvirt daemon is not running ({msg})") from None
        raise ConnectionFailed(f"cannot connect to {uri}: {msg}") from None
    if conn is None:  # very old bindings
        raise ConnectionFailed(f"cannot connect to {uri}")
    return conn


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    """The domain called *name* (or with that UUID, or that running id)."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise map_error(exc, f"cannot look up domain {name}") from None
    with contextlib.suppress(ValueError, libvirt.libvirtError):
        return conn.lookupByUUIDString(str(_uuid.UUID(name)))
    if name.isdigit():
        with contextlib.suppress(libvirt.libvirtError):
            return conn.lookupByID(int(name))
    raise DomainNotFound(f"domain not found: {name} (no domain with that name or UUID on {_uri(conn)})")


def _uri(conn: libvirt.virConnect) -> str:
    try:
        return str(conn.getURI())
    except libvirt.libvirtError:
        return "?"


def state_name(dom: libvirt.virDomain) -> str:
    """``running``, ``paused``, ``shut off`` …"""
    try:
        st, _reason = dom.state()
    except libvirt.libvirtError:
        return "unknown"
    return STATE_NAMES.get(st, f"state {st}")


def managed_save_path(conn: libvirt.virConnect, name: str) -> str | None:
    """Where the managed-save image of *name* lives (system QEMU driver only, else None)."""
    uri = _uri(conn)
    if uri.startswith("qemu:///system") or uri.startswith("qemu+unix:///system"):
        return os.path.join(MANAGED_SAVE_DIR, f"{name}.save")
    return None


def _stat(path: str | None) -> os.stat_result | None:
    if not path:
        return None
    try:
        return os.stat(path)
    except OSError:
        return None


# ---------------------------------------------------------------------------- progress


@contextlib.contextmanager
def _watch(get_dom: Callable[[], libvirt.virDomain | None], name: str, operation: str,
           progress: Progress | None) -> Iterator[dict[str, Any]]:
    """Poll job stats in a side thread while the body runs; yields the last stats seen."""
    last: dict[str, Any] = {}
    if progress is None:
        yield last
        return
    stop = threading.Event()

    def run() -> None:
        dom = None
        while not stop.wait(POLL_INTERVAL):
            try:
                dom = dom or get_dom()
                if dom is None:
                    continue
                stats = dom.jobStats(0)
            except libvirt.libvirtError:
                dom = None  # e.g. restore: domain not there yet, or gone after save
                continue
            if not stats or stats.get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE:
                continue
            # libvirt's own "operation" is an int (VIR_DOMAIN_JOB_OPERATION_*): keep it as job_operation
            stats = {**stats, "job_operation": stats.get("operation"), "domain": name, "operation": operation}
            last.clear()
            last.update(stats)
            with contextlib.suppress(Exception):  # a broken progress display must not break the save
                progress(stats)

    thread = threading.Thread(target=run, name=f"jobstats-{name}", daemon=True)
    thread.start()
    try:
        yield last
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            progress({"domain": name, "operation": operation, "done": True})


# ---------------------------------------------------------------------------- typed parameters

_INT_PARAMS = {"parallel.channels"}


def _params_call(func: str, capsule: Any, capsule_name: bytes, params: dict[str, Any], flags: int) -> int:
    """Call ``virDomainSaveParams``/``virDomainRestoreParams`` of libvirt.so.0 directly.

    Why: libvirt-python 11.3 has no type hint for ``parallel.channels`` and sends a
    Python int as ``ullong``, which the daemon rejects ("expected 'int'"). Building
    the typed parameters with ``virTypedParamsAdd*`` gives the right types. ctypes
    releases the GIL, and errors land in libvirt's thread-local last error.
    """
    import ctypes

    lib = ctypes.CDLL("libvirt.so.0", use_errno=True)
    get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
    get_ptr.restype = ctypes.c_void_p
    get_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]
    obj = get_ptr(capsule, capsule_name)
    tparams = ctypes.c_void_p()
    n = ctypes.c_int(0)
    maxp = ctypes.c_int(0)
    try:
        for key, value in params.items():
            k = key.encode()
            if key in _INT_PARAMS:
                rc = lib.virTypedParamsAddInt(ctypes.byref(tparams), ctypes.byref(n), ctypes.byref(maxp), k,
                                              ctypes.c_int(int(value)))
            else:
                rc = lib.virTypedParamsAddString(ctypes.byref(tparams), ctypes.byref(n), ctypes.byref(maxp), k,
                                                 ctypes.c_char_p(str(value).encode()))
            if rc < 0:
                raise libvirt.libvirtError(f"virTypedParamsAdd {key} failed")
        fn = getattr(lib, func)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
        ret = fn(obj, tparams, n, flags)
    finally:
        lib.virTypedParamsFree(tparams, n)
    if ret < 0:
        raise libvirt.libvirtError(f"{func}() failed")
    return int(ret)


def _call_params(obj: libvirt.virDomain | libvirt.virConnect, params: dict[str, Any], flags: int) -> Any:
    """``saveParams`` of a domain / ``restoreParams`` of a connection; straight through
    libvirt.so where the binding sends an int parameter with the wrong type."""
    domain = isinstance(obj, libvirt.virDomain)
    try:
        return obj.saveParams(params, flags) if domain else obj.restoreParams(params, flags)
    except libvirt.libvirtError as exc:
        wrong_type = (exc.get_error_code() == libvirt.VIR_ERR_INVALID_ARG
                      and "invalid type" in str(exc) and any(k in str(exc) for k in _INT_PARAMS & params.keys()))
        if not wrong_type:
            raise
    if domain:
        return _params_call("virDomainSaveParams", obj._o, b"virDomainPtr", params, flags)
    return _params_call("virDomainRestoreParams", obj._o, b"virConnectPtr", params, flags)


# ---------------------------------------------------------------------------- operations


def _state_flags(state: str | None, running: int, paused: int) -> int:
    if state is None:
        return 0
    if state == "running":
        return running
    if state == "paused":
        return paused
    raise ValueError(f"state must be None, 'running' or 'paused', not {state!r}")


def _save_flags(state: str | None, bypass_cache: bool) -> int:
    """``virDomainSaveRestoreFlags`` for the options *state* and *bypass_cache*."""
    flags = _state_flags(state, libvirt.VIR_DOMAIN_SAVE_RUNNING, libvirt.VIR_DOMAIN_SAVE_PAUSED)
    return flags | libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE if bypass_cache else flags


def _check_channels(conn: libvirt.virConnect, parallel_channels: int | None) -> None:
    if parallel_channels is not None:
        if parallel_channels < 1:
            raise UnsupportedError(f"--parallel-channels must be ≥ 1, not {parallel_channels}")
        host.require_save_params(conn, "--parallel-channels")


def _typed_params(path: str, xml: str | None, image_format: str | None = None,
                  parallel_channels: int | None = None) -> dict[str, Any]:
    """The typed parameters of ``virDomainSaveParams``/``virDomainRestoreParams``."""
    params: dict[str, Any] = {libvirt.VIR_DOMAIN_SAVE_PARAM_FILE: path}
    if xml:
        params[libvirt.VIR_DOMAIN_SAVE_PARAM_DXML] = xml
    if image_format is not None:
        params[libvirt.VIR_DOMAIN_SAVE_PARAM_IMAGE_FORMAT] = image_format
    if parallel_channels is not None:
        params[libvirt.VIR_DOMAIN_SAVE_PARAM_PARALLEL_CHANNELS] = parallel_channels
    return params


def abortable(call: Callable[[], Any], dom: libvirt.virDomain | None, flags: dict[str, Any]) -> Any:
    """Run *call*; in the main thread, a Ctrl-C aborts libvirt's job instead of being held.

    Why: the binding blocks in C, so a KeyboardInterrupt would only arrive after a multi-GiB
    save finished. The call runs in a worker; on Ctrl-C ``virDomainAbortJob`` cancels it
    (libvirt resumes the guest) and we wait for libvirt's answer: it is the truth (a job
    past the point of no return still completes), so it is returned or raised as usual,
    with ``flags["interrupted"]`` set.
    """
    if dom is None or threading.current_thread() is not threading.main_thread():
        return call()
    box: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    # An Event, not Thread.join: a join() interrupted by Ctrl-C can later return while the
    # thread still runs (seen here on Python 3.11), which reported an aborted save as done.
    threading.Thread(target=work, name="virtsave-libvirt-call", daemon=True).start()
    try:
        while not done.wait(0.2):
            pass
    except KeyboardInterrupt:
        flags["interrupted"] = True
        with contextlib.suppress(libvirt.libvirtError):
            dom.abortJob()
        # A second Ctrl-C is held while libvirt finishes cancelling (the guest must be resumed).
        with deferred_signals():
            while not done.wait(0.2):
                pass
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _settled_state(dom: libvirt.virDomain, was_running: bool) -> str:
    """The state after a failed job; libvirt resumes a cancelled save's guest just after answering."""
    st = state_name(dom)
    deadline = time.monotonic() + 5
    while was_running and st == "paused" and time.monotonic() < deadline:
        time.sleep(0.1)
        st = state_name(dom)
    return st


def _daemon_gone(dom: libvirt.virDomain | None) -> bool:
    """The connection *dom* came from is closed: libvirtd went away (killed, restarted, crashed)."""
    if dom is None:
        return False
    try:
        return not dom.connect().isAlive()
    except (libvirt.libvirtError, AttributeError):
        return False


def _image_note(image: str | None) -> str:
    """``; image PATH is complete`` (or partial, or absent): where a saved guest's memory is."""
    if not image:
        return ""
    from virtsave.image.saveimage import MAGIC, MAGIC_PARTIAL

    try:
        with open(image, "rb") as f:
            magic = f.read(16)
    except FileNotFoundError:
        return f"; no image at {image}"
    except OSError as exc:
        return f"; image {image} unreadable ({exc.strerror})"
    what = {MAGIC: "complete", MAGIC_PARTIAL: "partial (LibvirtQemudPart: libvirt did not finish it)"}
    return f"; image {image} is {what.get(magic, 'not a save image')}"


def _reconnect(uri: str, wait: float) -> libvirt.virConnect | None:
    deadline = time.monotonic() + wait
    while True:
        with contextlib.suppress(libvirt.libvirtError):
            return libvirt.open(uri)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def after_daemon_loss(dom: libvirt.virDomain, name: str, image: str | None,
                      wait: float | None = None) -> tuple[str, str]:
    """(state, one-line note) of *name* after libvirtd went away during a job on it.

    Reconnects (waiting up to *wait* seconds, default :data:`DAEMON_RETURN_WAIT`) and looks: a
    restarted libvirtd cancels a save it did not finish and resumes the guest, or finds it saved;
    which one happened, and whether *image* is complete, is the note. A daemon that does not come
    back leaves the state unknown (and the note says so)."""
    if wait is None:
        wait = float(os.environ.get("VIRTSAVE_DAEMON_WAIT") or DAEMON_RETURN_WAIT)
    try:
        uri = dom.connect().getURI()
    except libvirt.libvirtError:
        uri = None
    conn = _reconnect(uri, wait) if uri else None
    if conn is None:
        return "unknown", (f"libvirtd is not back after {wait:g} s, so where {name} is stays unknown until it "
                           f"is (a restarted libvirtd finishes or cancels the job it was doing){_image_note(image)}")
    try:
        st = _settled_state(conn.lookupByName(name), was_running=True)
    except libvirt.libvirtError as exc:
        return "unknown", f"libvirtd is back but cannot tell where {name} is ({_first_line(str(exc))})"
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
    return st, f"libvirtd is back: domain {name} is {st}{_image_note(image)}"


def _with_tail(err: VirtsaveError, tail: str) -> VirtsaveError:
    """*err* with ``; tail`` on its one line (same class and exit code)."""
    code = err.exit_code
    out = type(err)(f"{err}; {tail}")
    out.exit_code = code
    return out


def _run(name: str, operation: str, call: Callable[[], Any], *, raise_on_error: bool,
         what: str, image: str | None = None, image_error: bool = False,
         after_fail: Callable[[], str] | None = None,
         dom: libvirt.virDomain | None = None) -> tuple[OpResult, Any]:
    t0 = time.monotonic()
    flags: dict[str, Any] = {}
    try:
        value = abortable(call, dom, flags)
    except libvirt.libvirtError as exc:
        gone = _daemon_gone(dom)
        err = map_error(exc, what, image=image if image_error else None)
        lost = _connection_lost(dom) if gone else None
        if lost and not _is_local_uri(lost):
            # a remote daemon whose connection died (its ssh cut) may well have finished the job: say
            # so, do not guess the state; a local daemon that went away is waited for below
            err = ConnectionFailed(f"{err}; the connection to the daemon was lost, so whether the {operation} "
                                   f"of {name} completed is not known here: `virtsave -c {lost} list` shows it")
            gone = False
        elif gone:
            err = ConnectionFailed(f"{what}: libvirtd went away before answering "
                                   f"({_first_line(exc.get_error_message() or str(exc))})")
        if flags.get("interrupted"):
            err = OperationFailed(f"interrupted: {err}")
            err.exit_code = 130
        res = OpResult(name, operation, False, round(time.monotonic() - t0, 3), image, None, str(err))
        res.detail.update(flags)
        if gone and dom is not None:
            res.state, tail = after_daemon_loss(dom, name, image)
            res.detail["daemon_lost"] = True
            err = _with_tail(err, tail)
        elif after_fail and not lost:
            res.state = after_fail()
            if res.state:
                # one line, but say where the guest is: a failed save leaves it running
                err = _with_tail(err, f"domain {name} is {res.state}"
                                 + (_image_note(image) if res.state == "shut off" else ""))
        res.error = str(err)
        if raise_on_error:
            err.result = res  # type: ignore[attr-defined]
            raise err from None
        return res, None
    res = OpResult(name, operation, True, round(time.monotonic() - t0, 3), image)
    res.detail.update(flags)  # "interrupted": Ctrl-C came too late to stop the job
    return res, value


def _is_local_uri(text: str) -> bool:
    """*text* names a daemon on this machine (its Unix socket); an unparsable URI counts as local."""
    try:
        return conn_uri.parse(text).is_local
    except VirtsaveError:
        return True


def _connection_lost(dom: libvirt.virDomain | None) -> str | None:
    """The URI of *dom*'s connection when that connection is dead (its ssh killed, the daemon
    gone), else None."""
    if dom is None:
        return None
    try:
        conn = dom.connect()
        return None if conn.isAlive() else _uri(conn)
    except libvirt.libvirtError:
        return None


def _require_active(dom: libvirt.virDomain, what: str) -> None:
    if not dom.isActive():
        raise DomainStateError(f"{what}: domain {dom.name()} is not running (state {state_name(dom)})")


def managed_save(conn: libvirt.virConnect, name: str, *, bypass_cache: bool = False, state: str | None = None,
                 progress: Progress | None = None, raise_on_error: bool = True) -> OpResult:
    """``virDomainManagedSave``: save *name*'s memory to the managed-save image and stop it."""
    dom = lookup(conn, name)
    name = dom.name()
    _require_active(dom, f"cannot managed-save {name}")
    flags = _save_flags(state, bypass_cache)
    path = managed_save_path(conn, name)
    was_running = state_name(dom) == "running"
    with _watch(lambda: dom, name, "managed-save", progress) as last:
        res, _ = _run(name, "managed-save", lambda: dom.managedSave(flags), raise_on_error=raise_on_error,
                      what=f"managed-save of {name} failed", image=path,
                      after_fail=lambda: _settled_state(dom, was_running), dom=dom)
    if res.ok:
        st = _stat(path)
        res.image_size = st.st_size if st else None
        res.detail["has_managed_save"] = bool(dom.hasManagedSaveImage(0))
        res.state = state_name(dom)
    res.detail["flags"] = flags
    res.stats = dict(last)
    return res


def save(conn: libvirt.virConnect, name: str, path: str | os.PathLike[str], *, bypass_cache: bool = False,
         state: str | None = None, xml: str | None = None, image_format: str | None = None,
         parallel_channels: int | None = None, progress: Progress | None = None,
         raise_on_error: bool = True) -> OpResult:
    """``virDomainSaveFlags`` / ``virDomainSaveParams``: save *name* to *path* and stop it.

    *xml* is a replacement domain XML (dxml) stored in the image. *image_format* and
    *parallel_channels* need libvirt ≥ 11.2 (UnsupportedError naming the version otherwise).
    """
    path = os.path.abspath(os.fspath(path))
    if image_format is not None:
        host.require_format(conn, image_format)
    _check_channels(conn, parallel_channels)
    if parallel_channels is not None and image_format != "sparse":
        # libvirt 11.3: "Parallel save is only supported with the 'sparse' save image format"
        raise UnsupportedError("--parallel-channels needs --image-format sparse (QEMU multifd + mapped-ram)")
    dom = lookup(conn, name)
    name = dom.name()
    _require_active(dom, f"cannot save {name}")
    flags = _save_flags(state, bypass_cache)
    params = _typed_params(path, xml, image_format, parallel_channels)

    def call() -> Any:
        if image_format is not None or parallel_channels is not None:
            return _call_params(dom, params, flags)
        return dom.saveFlags(path, xml, flags)

    was_running = state_name(dom) == "running"
    with _watch(lambda: dom, name, "save", progress) as last:
        res, _ = _run(name, "save", call, raise_on_error=raise_on_error, what=f"save of {name} to {path} failed",
                      image=path, after_fail=lambda: _settled_state(dom, was_running), dom=dom)
    if res.ok:
        st = _stat(path)
        res.image_size = st.st_size if st else None
        if st:
            res.detail["image_allocated"] = st.st_blocks * 512  # sparse images have holes
        res.state = state_name(dom)
    res.detail.update(flags=flags, image_format=image_format, parallel_channels=parallel_channels)
    res.stats = dict(last)
    return res


_UUID = re.compile(r"<uuid>\s*([^<]+?)\s*</uuid>")


def restore(conn: libvirt.virConnect, path: str | os.PathLike[str], *, bypass_cache: bool = False,
            state: str | None = None, xml: str | None = None, parallel_channels: int | None = None,
            progress: Progress | None = None, raise_on_error: bool = True, header: Header | None = None) -> OpResult:
    """``virDomainRestoreFlags`` / ``virDomainRestoreParams``: start the domain saved in *path*.

    The image header is checked first (:func:`virtsave.image.saveimage.read_header_path`), so a
    missing, truncated, partial or foreign file gives one line naming the offset. *header*: the
    header already read (from the daemon's host, when that is another machine).
    """
    path = os.path.abspath(os.fspath(path))
    hdr = header or read_header_path(path, allow_partial=False)
    u = _UUID.search(hdr.xml)
    name = domain_name(hdr.xml) or os.path.basename(path)
    dom_uuid = u.group(1) if u else None
    if dom_uuid:
        with contextlib.suppress(libvirt.libvirtError):
            existing = conn.lookupByUUIDString(dom_uuid)
            if existing.isActive():
                raise DomainStateError(f"cannot restore {path}: domain {existing.name()} is already running")
    _check_channels(conn, parallel_channels)
    flags = _save_flags(state, bypass_cache)
    params = _typed_params(path, xml, parallel_channels=parallel_channels)

    def call() -> Any:
        if parallel_channels is not None:
            return _call_params(conn, params, flags)
        return conn.restoreFlags(path, xml, flags)

    def get_dom() -> libvirt.virDomain | None:
        return conn.lookupByUUIDString(dom_uuid) if dom_uuid else conn.lookupByName(name)

    with _watch(get_dom, name, "restore", progress) as last:
        res, _ = _run(name, "restore", call, raise_on_error=raise_on_error, what=f"restore of {path} failed",
                      image=path, image_error=True)
    st = _stat(path)
    res.image_size = st.st_size if st else None
    res.detail.update(flags=flags, image_format=hdr.format, was_running=hdr.was_running,
                      parallel_channels=parallel_channels)
    res.stats = dict(last)
    if res.ok:
        with contextlib.suppress(libvirt.libvirtError):
            res.state = state_name(get_dom())
    return res


def start(conn: libvirt.virConnect, name: str, *, bypass_cache: bool = False, state: str | None = None,
          progress: Progress | None = None, raise_on_error: bool = True) -> OpResult:
    """``virDomainCreateWithFlags``: boot *name*, from its managed-save image when it has one.

    ``detail["from_managed_save"]`` says which happened. *state* ``"paused"`` starts paused.
    """
    dom = lookup(conn, name)
    name = dom.name()
    if dom.isActive():
        raise DomainStateError(f"cannot start {name}: domain is already {state_name(dom)}")
    if state not in (None, "running", "paused"):
        raise ValueError(f"state must be None, 'running' or 'paused', not {state!r}")
    flags = libvirt.VIR_DOMAIN_START_PAUSED if state == "paused" else 0
    if bypass_cache:
        flags |= libvirt.VIR_DOMAIN_START_BYPASS_CACHE
    had = bool(dom.hasManagedSaveImage(0))
    path = managed_save_path(conn, name) if had else None
    st = _stat(path)
    with _watch(lambda: dom, name, "start", progress) as last:
        res, _ = _run(name, "start", lambda: dom.createWithFlags(flags), raise_on_error=raise_on_error,
                      what=f"start of {name} failed", image=path, image_error=had, dom=dom,
                      after_fail=lambda: state_name(dom))
    res.image_size = st.st_size if st else None
    res.detail.update(from_managed_save=had, flags=flags)
    res.stats, res.state = dict(last), state_name(dom)
    return res


def managed_save_remove(conn: libvirt.virConnect, name: str) -> OpResult:
    """Delete *name*'s managed-save image (its next start is a cold boot). No image: ok, removed False."""
    dom = lookup(conn, name)
    name = dom.name()
    had = bool(dom.hasManagedSaveImage(0))
    path = managed_save_path(conn, name)
    st = _stat(path)
    res, _ = _run(name, "managed-save-remove", lambda: dom.managedSaveRemove(0) if had else None,
                  raise_on_error=True, what=f"managed-save-remove of {name} failed", image=path)
    res.image_size = st.st_size if st and had else None
    res.detail["removed"] = had
    return res


# ---------------------------------------------------------------------------- listing


def domain_info(conn: libvirt.virConnect, dom: libvirt.virDomain, now: float | None = None) -> dict[str, Any]:
    """Name, uuid, id, state, managed-save image (path, size, age) of one domain."""
    name = dom.name()
    has = bool(dom.hasManagedSaveImage(0))
    path = managed_save_path(conn, name) if has else None
    st = _stat(path)
    now = time.time() if now is None else now
    return {
        "name": name,
        "uuid": dom.UUIDString(),
        "id": dom.ID() if dom.isActive() else None,
        "state": state_name(dom),
        "persistent": bool(dom.isPersistent()),
        "managed_save": has,
        "image": path,
        "image_size": st.st_size if st else None,
        "image_age": round(now - st.st_mtime, 1) if st else None,
    }


def list_domains(conn: libvirt.virConnect, match: str | None = None) -> list[dict[str, Any]]:
    """Every domain (optionally whose name matches the glob *match*), sorted by name."""
    out = []
    now = time.time()
    for dom in conn.listAllDomains(0):
        try:
            if match and not fnmatch.fnmatchcase(dom.name(), match):
                continue
            out.append(domain_info(conn, dom, now))
        except libvirt.libvirtError as exc:  # went away while listing
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise map_error(exc, "cannot list domains") from None
    return sorted(out, key=lambda d: d["name"])


# ---------------------------------------------------------------------------- bulk


def select_domains(conn: libvirt.virConnect, kind: str, names: Iterable[str] | None = None,
                   match: str | None = None) -> list[str]:
    """Names for a bulk run: ``kind`` ``"active"`` (running or paused) or ``"managed-save"``
    (inactive with a managed-save image), restricted to *names* and/or the glob *match*."""
    wanted = set(names) if names else None
    out = []
    for dom in conn.listAllDomains(0):
        try:
            name = dom.name()
            if wanted is not None and name not in wanted:
                continue
            if match and not fnmatch.fnmatchcase(name, match):
                continue
            if kind == "active" and not dom.isActive():
                continue
            if kind == "managed-save" and (dom.isActive() or not dom.hasManagedSaveImage(0)):
                continue
        except libvirt.libvirtError:
            continue
        out.append(name)
    if wanted is not None:
        missing = sorted(wanted - {d.name() for d in conn.listAllDomains(0)})
        if missing:
            raise DomainNotFound(f"domain not found: {', '.join(missing)}")
    return sorted(out)


def _bulk(conn: libvirt.virConnect, names: list[str], parallel: int,
          op: Callable[[libvirt.virConnect, str], OpResult], operation: str) -> list[OpResult]:
    if parallel < 1:
        raise UnsupportedError(f"--parallel must be ≥ 1, not {parallel}")
    uri = _uri(conn)
    local = threading.local()
    opened: list[libvirt.virConnect] = []
    lock = threading.Lock()

    def worker(name: str) -> OpResult:
        t0 = time.monotonic()
        try:
            c = getattr(local, "conn", None)
            if c is None:  # one connection per worker thread
                c = local.conn = connect(uri)
                with lock:
                    opened.append(c)
            return op(c, name)
        except VirtsaveError as exc:
            res = getattr(exc, "result", None)
            return res or OpResult(name, operation, False, round(time.monotonic() - t0, 3), error=str(exc))
        except libvirt.libvirtError as exc:  # e.g. the connection died between two calls
            return OpResult(name, operation, False, round(time.monotonic() - t0, 3),
                            error=str(map_error(exc, f"{operation} of {name} failed")))

    try:
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix=f"virtsave-{operation}") as pool:
            return list(pool.map(worker, names))
    finally:
        for c in opened:
            with contextlib.suppress(libvirt.libvirtError):
                c.close()


def managed_save_all(conn: libvirt.virConnect, names: Iterable[str] | None = None, parallel: int = 2, *,
                     match: str | None = None, bypass_cache: bool = False, state: str | None = None,
                     progress: Progress | None = None) -> list[OpResult]:
    """Managed-save every active domain (restricted to *names* / glob *match*), *parallel* at a time."""
    todo = select_domains(conn, "active", names, match)
    return _bulk(conn, todo, parallel, lambda c, n: managed_save(
        c, n, bypass_cache=bypass_cache, state=state, progress=progress), "managed-save")


def start_all(conn: libvirt.virConnect, names: Iterable[str] | None = None, parallel: int = 2, *,
              match: str | None = None, bypass_cache: bool = False, state: str | None = None,
              progress: Progress | None = None) -> list[OpResult]:
    """Start every inactive domain that has a managed-save image (restricted likewise)."""
    todo = select_domains(conn, "managed-save", names, match)
    return _bulk(conn, todo, parallel, lambda c, n: start(
        c, n, bypass_cache=bypass_cache, state=state, progress=progress), "start")
