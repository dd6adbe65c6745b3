"""Save and restore QEMUs without libvirt, in libvirt's image format.

:func:`save` drives an existing QEMU over its QMP socket the way libvirt does
(``stop``, capabilities, ``getfd`` + ``migrate fd:migrate``, wait for the ``MIGRATION``
event), but QEMU writes straight into the image file (no ``libvirt_iohelper`` pipe; for a
compressed format into the compressor's pipe, the compressor into the file) and gets ``quit``
instead of a SIGTERM-and-poll at the end. :func:`restore` launches a QEMU
from an argv with ``-incoming defer``, feeds it the image from its stream offset, ``cont``.
What is sent is decided here; how the image is written and read (fds, URIs over Unix or
TCP, finalizing, the failure path) is :mod:`virtsave.qemu.migration`, shared with replay.

The header needs a domain XML: pass the real one (``SaveOptions(xml=…)``) if libvirt is to
restore the image (``virsh restore`` re-creates the domain from it); otherwise a minimal XML is
synthesized from ``query-name``/``query-uuid``/memory size, enough for virtsave's own
restore but not for libvirt's.

Example::

    from virtsave.core.operation import SaveOptions
    from virtsave.qemu import direct
    r = direct.save("unix:/tmp/q/qmp.sock", "/var/tmp/g.save", SaveOptions(xml=open("g.xml").read()))
    print(r.seconds, r.image_size)
    proc, r2 = direct.restore("/var/tmp/g.save", argv)   # QEMU keeps running: proc.stop() ends it
"""

from __future__ import annotations

import os
import time
from typing import Any

from virtsave.core.errors import UnsupportedError
from virtsave.core.operation import OpResult, Progress, SaveOptions, domain_name
from virtsave.qemu import launch as qemu_launch
from virtsave.qemu import migration
from virtsave.qemu.qmp import QMPSession
from virtsave.trace import model as _trace

__all__ = ["restore", "save"]

#: What direct save writes: QEMU's stream as it is (raw), mapped-ram (sparse), or through a
#: compressor like libvirt's (:data:`~virtsave.qemu.migration.COMPRESSORS`).
SAVE_FORMATS = ("raw", "sparse", *migration.COMPRESSORS)


def _check_save(fmt: str, options: SaveOptions, transport: str, version: tuple[int, int, int] | None) -> None:
    """Refuse, before the guest is paused, what this QEMU or transport cannot do."""
    if fmt not in SAVE_FORMATS:
        raise UnsupportedError(f"direct save writes {', '.join(SAVE_FORMATS)} images, not {fmt}")
    if fmt in migration.COMPRESSORS and transport != "unix":
        raise UnsupportedError(f"direct save of a {fmt} image needs a unix: QMP socket (QEMU gets the "
                               "compressor's pipe by fd passing)")
    if fmt == "sparse" and version is not None and version < (9, 0, 0):
        raise UnsupportedError(f"image format sparse (mapped-ram) needs QEMU >= 9.0 "
                               f"(this QEMU is {'.'.join(map(str, version))})")
    if options.bypass_cache and not ((fmt == "sparse" or fmt in migration.COMPRESSORS) and transport == "unix"):
        raise UnsupportedError("direct save --bypass-cache needs --image-format sparse or a compressed format "
                               "over a unix: QMP socket")


def _settings(fmt: str, options: SaveOptions,
              current: dict[str, bool] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The migration capabilities and parameters of a save (libvirt's, for the format).

    *current*: the capabilities QEMU has on now (``query-migrate-capabilities``). A QEMU that was
    itself restored from a sparse image still has mapped-ram/multifd (and ``direct-io``) on, which a
    stream into an fd or pipe must not inherit; like libvirt, whatever is on and not wanted is
    switched off.

    >>> caps, params = _settings("zstd", SaveOptions(), {"events": True, "mapped-ram": True, "multifd": True})
    >>> [(c["capability"], c["state"]) for c in caps], params["direct-io"]
    ([('events', True), ('mapped-ram', False), ('multifd', False)], False)
    """
    caps: list[dict[str, Any]] = [{"capability": "events", "state": True}]
    params: dict[str, Any] = {"max-bandwidth": migration.UNLIMITED_BANDWIDTH}
    if fmt == "sparse":
        caps += [{"capability": "mapped-ram", "state": True},
                 {"capability": "multifd", "state": options.channels > 1}]
        if options.channels > 1:
            params["multifd-channels"] = options.channels
        if options.bypass_cache:
            params["direct-io"] = True
    wanted = {c["capability"] for c in caps}
    caps += [{"capability": name, "state": False} for name, on in (current or {}).items()
             if on and name not in wanted]
    if current and current.get("mapped-ram") and "direct-io" not in params:
        params["direct-io"] = False
    return caps, params


def _hand_over(s: QMPSession, out: migration.Outgoing, bypass_cache: bool) -> str:
    """Give QEMU the image the way libvirt does (``add-fd`` for sparse, else ``getfd``); the URI."""
    if out.transport == "tcp":
        return out.uri("fd:migrate")[0]  # no fd over TCP: QEMU opens the file itself
    if out.header.format != "sparse":
        s.execute("getfd", {"fdname": "migrate"}, fds=[out.qemu_fd])
        return out.uri("fd:migrate")[0]
    added = s.execute("add-fd", {"opaque": "virtsave-outgoing-migrate-fd"}, fds=[out.qemu_fd]) or {}
    if bypass_cache:
        dfd = out.open_direct()
        try:
            s.execute("add-fd", {"opaque": "virtsave-outgoing-migrate-directfd",
                                 "fdset-id": added.get("fdset-id")}, fds=[dfd])
        finally:
            os.close(dfd)
    return out.uri(f"file:/dev/fdset/{added.get('fdset-id')}")[0]


def save(qmp_address: str, image_path: str | os.PathLike[str], options: SaveOptions | None = None, *,
         cookie: str | None = None, quit: bool = True, progress: Progress | None = None,
         phase: _trace.Phase | None = None, timeout: float | None = None) -> OpResult:
    """Save the QEMU at *qmp_address* into *image_path* (libvirt's format, 0600).

    *options*: ``image_format`` ``raw`` (default: QEMU's stream written sequentially into the
    fd), ``gzip``/``bzip2``/``xz``/``lzop``/``zstd`` (that stream through the format's compressor,
    multi-threaded where it can; unix: QMP sockets only) or ``sparse`` (libvirt ≥ 11.2's format:
    QEMU's mapped-ram, with ``parallel_channels`` multifd threads writing RAM pages at fixed
    offsets; needs QEMU ≥ 9.0); ``bypass_cache``
    has QEMU write the pages with O_DIRECT (sparse: its ``direct-io`` parameter, as libvirt's
    ``--bypass-cache``; compressed: ``dd oflag=direct`` writes what the compressor makes); ``state``
    the state the image records; ``xml`` the domain XML.

    The guest is paused first; on success QEMU gets ``quit`` (unless *quit* is False: then it
    stays paused like after ``virsh save --paused``… and you own it); on failure it is resumed
    if it was running and the partial image removed. *phase* (optional) records the QMP
    conversation.
    """
    options = options or SaveOptions()
    image = os.fspath(image_path)
    fmt = options.image_format or "raw"
    transport = "tcp" if qmp_address.startswith("tcp:") else "unix"
    t_start = time.monotonic()
    with QMPSession(qmp_address) as s:
        s.record_into(phase)
        was_running = bool((s.execute("query-status") or {}).get("running"))
        version = migration.qemu_version(s) if transport == "tcp" or fmt == "sparse" else None
        xml = options.xml or migration.synthesize_xml(s)
        _check_save(fmt, options, transport, version)
        current = {c["capability"]: bool(c.get("state")) for c in s.execute("query-migrate-capabilities") or []}
        caps, params = _settings(fmt, options, current)
        # Set up before pausing: the guest's downtime starts at "stop".
        s.execute("migrate-set-capabilities", {"capabilities": caps})
        s.execute("migrate-set-parameters", params)
        use_exec = version is not None and transport == "tcp" and not migration.has_file_uri(version)
        recorded = was_running if options.state is None else options.state == "running"
        with migration.saving(image, xml, cookie, session=s, resume=was_running, was_running=recorded,
                              image_format=fmt, transport=transport, use_exec=use_exec,
                              bypass_cache=options.bypass_cache) as out:
            if was_running:
                s.execute("stop")
            uri = _hand_over(s, out, options.bypass_cache)
            mark = s.event_mark()
            s.execute("migrate", {"uri": uri})
            migration.await_completion(s, mark, what=f"migration to {image}", timeout=timeout,
                                       progress=out.progress_cb(progress))
            stats = s.execute("query-migrate") or {}
            size = out.finish()
        if quit:
            migration.end_saved_qemu(s)
    return OpResult(domain_name(xml), "save", True, time.monotonic() - t_start, image, size,
                    state="shut off" if quit else "paused", migration="completed", backend="direct",
                    stats={"total-time": stats.get("total-time"), "ram": stats.get("ram")})


def _check_restore(options: SaveOptions) -> None:
    options.only("state", "parallel_channels", "bypass_cache", what="direct restore")


def restore(image_path: str | os.PathLike[str], argv: list[str], options: SaveOptions | None = None, *,
            transport: str = "unix", serial_log: str | os.PathLike[str] | None = None,
            progress: Progress | None = None, phase: _trace.Phase | None = None,
            timeout: float | None = None) -> tuple[qemu_launch.QemuProcess, OpResult]:
    """Launch QEMU from *argv* and load *image_path* into it.

    The guest then runs if the image says it was running, unless *options* ``state`` says
    otherwise; a sparse image loads with ``parallel_channels`` multifd channels (default one
    stream), and with ``bypass_cache`` its pages are read with O_DIRECT (QEMU's ``direct-io``).
    Returns the running :class:`~virtsave.qemu.launch.QemuProcess` (call ``.stop()`` to end it)
    and the result. QEMU is killed again if anything fails.
    """
    options = options or SaveOptions()
    _check_restore(options)
    image = os.fspath(image_path)
    t_start = time.monotonic()
    binary_ver = qemu_launch.binary_version(argv[0] if argv else "qemu-system-x86_64")
    use_exec = transport == "tcp" and not migration.has_file_uri(binary_ver)
    with migration.loading(image, transport=transport, use_exec=use_exec) as inc:
        if options.bypass_cache:
            inc.add_direct()
        # A real restore: the QEMU is the guest, its disks, NICs and displays are its own (not a replay's).
        plan = inc.plan_launch(argv, serial_log=serial_log, isolated=False)
        plan.owns_run_dir = False  # QEMU keeps running after we return: its socket dir must stay
        proc = inc.start(plan)
        with proc.connect() as s:
            s.record_into(phase)
            _load(s, inc, options, progress, timeout)
            run = options.state == "running" or (options.state is None and inc.header.was_running)
            if run:
                s.execute("cont")
            s.record_into(None)
    return proc, OpResult(domain_name(inc.header.xml), "restore", True, time.monotonic() - t_start, image,
                          os.stat(image).st_size, state="running" if run else "paused", migration="completed",
                          backend="direct")


def _load(s: QMPSession, inc: migration.Incoming, options: SaveOptions, progress: Progress | None,
          timeout: float | None) -> None:
    """Set the incoming side up like the saving side was, ``migrate-incoming``, wait."""
    sparse = inc.header.format == "sparse"
    caps = [{"capability": "events", "state": True}]
    if sparse:
        caps += [{"capability": "mapped-ram", "state": True},
                 {"capability": "multifd", "state": options.channels > 1}]
    s.execute("migrate-set-capabilities", {"capabilities": caps})
    params: dict[str, Any] = {}
    if sparse and options.channels > 1:
        params["multifd-channels"] = options.channels
    if inc.direct_fd is not None:
        params["direct-io"] = True
    if params:
        s.execute("migrate-set-parameters", params)
    mark = s.event_mark()
    s.execute("migrate-incoming", {"uri": inc.uri()[0]})
    migration.await_completion(s, mark, what=f"loading {inc.path}", timeout=timeout, qemu=inc.qemu,
                               progress=inc.progress_cb(progress, inc.reader_pid()))
    inc.check_helper()
