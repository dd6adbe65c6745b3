"""Save and restore QEMUs without libvirt, in libvirt's image format.

:func:`save` drives an existing QEMU over its QMP socket the way libvirt does
(``stop``, capabilities, ``getfd`` + ``migrate fd:migrate``, wait for the ``MIGRATION``
event), but QEMU writes straight into the image file (no ``libvirt_iohelper`` pipe) and
gets ``quit`` instead of a SIGTERM-and-poll at the end. :func:`restore` launches a QEMU
from an argv with ``-incoming defer``, feeds it the image from its stream offset, ``cont``.

Over TCP no fd can be passed: QEMU opens the file itself (``file:PATH,offset=N``, QEMU ≥ 8.2)
or, on older QEMUs, a shell helper does (``exec:``; only ever built here, never taken from input).

The header needs a domain XML: pass the real one (``--xml``) if libvirt is to restore the
image (``virsh restore`` re-creates the domain from it); otherwise a minimal XML is
synthesized from ``query-name``/``query-uuid``/memory size, enough for virtsave's own
restore but not for libvirt's.

Example::

    from virtsave.qemu import direct
    r = direct.save("unix:/tmp/q/qmp.sock", "/var/tmp/g.save", xml=open("g.xml").read())
    print(r.seconds, r.image_size)
    proc, r2 = direct.restore("/var/tmp/g.save", argv)   # QEMU keeps running: proc.stop() ends it
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

from virtsave.core.errors import ImageError, OperationFailed, QMPError, UnsupportedError
from virtsave.core.files import open_private
from virtsave.image import saveimage
from virtsave.qemu import launch as qemu_launch
from virtsave.qemu.qmp import QMPSession
from virtsave.trace import model as _trace

#: libvirt's "unlimited" migration bandwidth (QEMU's default of 128 MiB/s would throttle us).
UNLIMITED_BANDWIDTH = 9223372036853727232
Progress = Callable[[dict[str, Any]], None]


@dataclass
class DirectResult:
    """Outcome of a direct save or restore."""

    operation: str
    image: str
    ok: bool = True
    seconds: float = 0.0
    image_size: int | None = None
    status: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    phase: _trace.Phase | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "phase"}


def qemu_version(session: QMPSession) -> tuple[int, int, int]:
    """QEMU's version as reported over QMP."""
    q = (session.execute("query-version") or {}).get("qemu", {})
    return int(q.get("major", 0)), int(q.get("minor", 0)), int(q.get("micro", 0))


def has_file_uri(version: tuple[int, int, int]) -> bool:
    """``file:PATH,offset=N`` migration URIs exist from QEMU 8.2."""
    return version >= (8, 2, 0)


def exec_done_marker(path: str) -> str:
    """Where the ``exec:`` save helper leaves its exit status (QEMU does not wait for it)."""
    return f"{path}.virtsave-dd-status"


def exec_save_uri(path: str, offset: int) -> str:
    """An ``exec:`` URI writing the stream into *path* after its header (QEMU < 8.2 over TCP).

    Removes any stale status file first. The helper writes its exit status to
    :func:`exec_done_marker` when it is done: QEMU reports ``completed`` once it closed
    the pipe, possibly before ``dd`` wrote the last block.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(exec_done_marker(path))  # a stale status must not pass for this run's
    marker = shlex.quote(exec_done_marker(path))
    return (f"exec:dd of={shlex.quote(path)} bs=4M oflag=seek_bytes seek={offset} conv=notrunc status=none;"
            f" echo $? > {marker}")


def wait_exec_helper(path: str, timeout: float = 60.0) -> None:
    """Wait for the ``exec:`` save helper of *path* to finish; raise if it failed."""
    marker = exec_done_marker(path)
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError, ValueError):
            with open(marker) as f:
                text = f.read()
            if text.endswith("\n"):
                os.unlink(marker)
                if int(text) != 0:
                    raise OperationFailed(f"the dd helper writing {path} failed (exit {text.strip()})")
                return
        if time.monotonic() > deadline:
            raise OperationFailed(f"the dd helper writing {path} did not finish within {timeout:.0f} s")
        time.sleep(0.02)


def exec_restore_uri(path: str, offset: int) -> str:
    """An ``exec:`` URI reading the stream from *path* at *offset* (QEMU < 8.2 over TCP)."""
    return f"exec:dd if={shlex.quote(path)} bs=4M iflag=skip_bytes skip={offset} status=none"


def create_image(path: str | os.PathLike[str], xml: str, cookie: str | None = None, *,
                 was_running: bool = True, image_format: str = "raw") -> tuple[int, saveimage.Header]:
    """Create *path* (0600) with a partial header; return (read-write fd, header)."""
    fd = open_private(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        with io.FileIO(fd, "r+", closefd=False) as f:
            hdr = saveimage.write_header(f, xml, cookie, was_running=was_running, image_format=image_format,
                                         partial=True)
    except BaseException:
        os.close(fd)
        raise
    return fd, hdr


def synthesize_xml(session: QMPSession) -> str:
    """A minimal domain XML from what QEMU tells about itself (not enough for ``virsh restore``)."""
    name = "virtsave-direct"
    with contextlib.suppress(QMPError):
        name = (session.execute("query-name") or {}).get("name") or name
    uuid = None
    with contextlib.suppress(QMPError):
        uuid = (session.execute("query-uuid") or {}).get("UUID")
    mem = 0
    with contextlib.suppress(QMPError):
        mem = int((session.execute("query-memory-size-summary") or {}).get("base-memory", 0))
    cpus = 1
    with contextlib.suppress(QMPError):
        cpus = max(1, len(session.execute("query-cpus-fast") or []))
    uuid_el = f"<uuid>{escape(uuid)}</uuid>" if uuid and uuid != "00000000-0000-0000-0000-000000000000" else ""
    kib = mem // 1024
    return (f"<domain type='qemu'><name>{escape(name)}</name>{uuid_el}"
            f"<memory unit='KiB'>{kib}</memory><currentMemory unit='KiB'>{kib}</currentMemory>"
            f"<vcpu>{cpus}</vcpu><os><type arch='x86_64'>hvm</type></os></domain>")


def _read_position(pid: int, image: str) -> int | None:
    """How far QEMU (*pid*) has read *image*: the largest file position among its fds on it."""
    best = None
    real = os.path.realpath(image)
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") != real:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    pos = int(f.readline().split()[1])
                best = pos if best is None else max(best, pos)
    return best


def migration_progress(progress: Progress | None, operation: str, *, pid: int | None = None,
                       image: str | None = None, stream_offset: int = 0) -> Progress | None:
    """Turn ``query-migrate`` answers into libvirt-job-like stats for *progress*.

    Saving: RAM bytes transferred of the guest's RAM size (zero pages are skipped, so the
    total is reached at completion). Loading (QEMU reports no RAM stats on the incoming
    side): how far QEMU *pid* has read *image* past *stream_offset*.
    """
    if progress is None:
        return None
    size = None
    if image is not None and operation == "restore":
        with contextlib.suppress(OSError):
            size = os.stat(image).st_size - stream_offset

    last = [0]

    def cb(info: dict[str, Any]) -> None:
        ram = info.get("ram") or {}
        done, total = ram.get("transferred"), ram.get("total")
        if operation == "restore" and pid is not None and image is not None:
            pos = _read_position(pid, image)  # None once QEMU closed the image: keep the last figure
            last[0] = max(last[0], 0 if pos is None else pos - stream_offset)
            done, total = last[0], size
        if info.get("status") == "completed" and total:
            done = total
        progress({"domain": operation, "operation": operation, "data_processed": done, "data_total": total,
                  "status": info.get("status")})
    return cb


def _fail_info(session: QMPSession) -> str:
    with contextlib.suppress(QMPError):
        info = session.execute("query-migrate") or {}
        return str(info.get("error-desc") or info.get("status"))
    return "unknown error"


def save(qmp_address: str, image_path: str | os.PathLike[str], *, xml: str | None = None,
         cookie: str | None = None, quit: bool = True, progress: Progress | None = None,
         phase: _trace.Phase | None = None, timeout: float | None = None, image_format: str = "raw",
         parallel_channels: int = 1, bypass_cache: bool = False) -> DirectResult:
    """Save the QEMU at *qmp_address* into *image_path* (libvirt's format, 0600).

    *image_format* ``raw`` (QEMU's stream written sequentially into the fd) or ``sparse``
    (libvirt ≥ 11.2's format: QEMU's mapped-ram, with *parallel_channels* multifd threads
    writing RAM pages at fixed offsets; needs QEMU ≥ 9.0). *bypass_cache* (sparse only) has
    QEMU write the pages with O_DIRECT (its ``direct-io`` parameter, as libvirt's
    ``--bypass-cache``): no page-cache copy, and the final fsync has little left to flush.

    The guest is paused first; on success QEMU gets ``quit`` (unless *quit* is False: then it
    stays paused like after ``virsh save --paused``… and you own it); on failure it is resumed
    if it was running and the partial image removed. *phase* (optional) records the QMP
    conversation.
    """
    image = os.fspath(image_path)
    t_start = time.monotonic()
    with QMPSession(qmp_address) as s:
        s.record_into(phase)
        status = s.execute("query-status") or {}
        was_running = bool(status.get("running"))
        unix = not qmp_address.startswith("tcp:")
        version = qemu_version(s) if not unix else (0, 0, 0)
        if xml is None:
            xml = synthesize_xml(s)
        if image_format not in ("raw", "sparse"):
            raise UnsupportedError(f"direct save writes raw or sparse images, not {image_format}")
        sparse = image_format == "sparse"
        if sparse:
            have = qemu_version(s)
            if have < (9, 0, 0):
                raise UnsupportedError(f"image format sparse (mapped-ram) needs QEMU >= 9.0 "
                                       f"(this QEMU is {'.'.join(map(str, have))})")
        if bypass_cache and not (sparse and unix):
            raise UnsupportedError("direct save --bypass-cache needs --image-format sparse over a unix: QMP socket")
        caps = [{"capability": "events", "state": True}]
        params: dict[str, Any] = {"max-bandwidth": UNLIMITED_BANDWIDTH}
        if sparse:
            caps += [{"capability": "mapped-ram", "state": True},
                     {"capability": "multifd", "state": parallel_channels > 1}]
            if parallel_channels > 1:
                params["multifd-channels"] = parallel_channels
            if bypass_cache:
                params["direct-io"] = True
        # Set up before pausing: the guest's downtime starts at "stop".
        s.execute("migrate-set-capabilities", {"capabilities": caps})
        s.execute("migrate-set-parameters", params)
        if was_running:
            s.execute("stop")
        fd, hdr = create_image(image, xml, cookie, was_running=was_running, image_format=image_format)
        ok = False
        wfd = -1
        try:
            mark = s.event_mark()
            if unix and sparse:
                # QEMU dups fdset members by access mode: an outgoing file: URI wants O_WRONLY.
                wfd = os.open(image, os.O_WRONLY | os.O_CLOEXEC)
                added = s.execute("add-fd", {"opaque": "virtsave-outgoing-migrate-fd"}, fds=[wfd]) or {}
                if bypass_cache:
                    # QEMU picks fdset members by open flags: multifd page writes use the O_DIRECT
                    # one, the unaligned stream parts the plain one (libvirt's --bypass-cache does this).
                    try:
                        dfd = os.open(image, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
                    except OSError as exc:
                        raise UnsupportedError(f"--bypass-cache: cannot open {image} with O_DIRECT "
                                               f"({exc.strerror}; e.g. tmpfs)") from None
                    try:
                        s.execute("add-fd", {"opaque": "virtsave-outgoing-migrate-directfd",
                                             "fdset-id": added.get("fdset-id")}, fds=[dfd])
                    finally:
                        os.close(dfd)
                uri = f"file:/dev/fdset/{added.get('fdset-id')},offset={hdr.stream_offset:#x}"
            elif unix:
                os.lseek(fd, hdr.stream_offset, os.SEEK_SET)
                s.execute("getfd", {"fdname": "migrate"}, fds=[fd])
                uri = "fd:migrate"
            elif has_file_uri(version):
                uri = f"file:{image},offset={hdr.stream_offset:#x}"
            else:
                uri = exec_save_uri(image, hdr.stream_offset)
            s.execute("migrate", {"uri": uri})
            final = s.wait_migration(since=mark, timeout=timeout, progress=migration_progress(progress, "save"))
            if final != "completed":
                raise OperationFailed(f"migration to {image} {final}: {_fail_info(s)}")
            stats = s.execute("query-migrate") or {}
            if uri.startswith("exec:"):
                wait_exec_helper(image)
            if not unix:
                # QEMU opened the file itself: rewrite the header in case it truncated it.
                os.pwrite(fd, saveimage.encode_header(xml, cookie, was_running=was_running,
                                                      image_format=image_format), 0)
            saveimage.finalize(fd)
            ok = True
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
            if wfd >= 0:
                os.close(wfd)
            if not ok:
                with contextlib.suppress(OSError):
                    os.unlink(image)
                if was_running:
                    with contextlib.suppress(QMPError):
                        s.execute("cont")
        if quit:
            s.quit()
    return DirectResult("save", image, True, time.monotonic() - t_start, size, "completed",
                        {"total-time": stats.get("total-time"), "ram": stats.get("ram")}, phase)


#: Decompressors for libvirt's compressed formats (libvirt pipes the stream through the same programs).
DECOMPRESSORS = {"gzip": ["gzip", "-dc"], "bzip2": ["bzip2", "-dc"], "xz": ["xz", "-dc"],
                 "lzop": ["lzop", "-dc"], "zstd": ["zstd", "-dc"]}


def open_image(image_path: str | os.PathLike[str], *, compressed_ok: bool = False) -> tuple[int, saveimage.Header]:
    """Open a complete save image read-only; return (fd at its stream offset, header)."""
    hdr = saveimage.read_header_path(image_path, allow_partial=False)
    if hdr.format not in ("raw", "sparse") and not (compressed_ok and hdr.format in DECOMPRESSORS):
        raise UnsupportedError(f"image format {hdr.format} is not supported here (raw, sparse"
                               f"{', ' + ', '.join(DECOMPRESSORS) if compressed_ok else ''})")
    try:
        fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"cannot open image {image_path}: {exc.strerror}") from None
    os.lseek(fd, hdr.stream_offset, os.SEEK_SET)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return fd, hdr


def restore(image_path: str | os.PathLike[str], argv: list[str], *, transport: str = "unix",
            paused: bool = False, serial_log: str | os.PathLike[str] | None = None,
            parallel_channels: int = 2, progress: Progress | None = None,
            phase: _trace.Phase | None = None, timeout: float | None = None
            ) -> tuple[qemu_launch.QemuProcess, DirectResult]:
    """Launch QEMU from *argv* and load *image_path* into it; the guest runs unless *paused*.

    Returns the running :class:`~virtsave.qemu.launch.QemuProcess` (call ``.stop()`` to end
    it) and the result. QEMU is killed again if anything fails.
    """
    image = os.fspath(image_path)
    t_start = time.monotonic()
    fd, hdr = open_image(image, compressed_ok=True)
    sparse = hdr.format == "sparse"
    proc = None
    helper: subprocess.Popen[bytes] | None = None
    pipe_r = -1
    try:
        binary_ver = qemu_launch.binary_version(argv[0] if argv else "qemu-system-x86_64")
        use_exec = transport == "tcp" and not has_file_uri(binary_ver)
        add_fds: list[tuple[int, int, str]] = []
        pass_fds: tuple[int, ...] = ()
        if hdr.format in DECOMPRESSORS:
            # Like libvirt: a decompressor reads the image and feeds QEMU through a pipe
            # (inherited at exec, so this works whatever the QMP transport).
            pipe_r, pipe_w = os.pipe()
            try:
                helper = subprocess.Popen(DECOMPRESSORS[hdr.format], stdin=fd, stdout=pipe_w,
                                          stderr=subprocess.DEVNULL)
            except OSError as exc:
                os.close(pipe_r)
                raise UnsupportedError(f"cannot run {DECOMPRESSORS[hdr.format][0]} for a {hdr.format} image: "
                                       f"{exc.strerror}") from None
            finally:
                os.close(pipe_w)
            pass_fds = (pipe_r,)
            uri = f"fd:{pipe_r}"
        elif transport == "tcp":
            uri = exec_restore_uri(image, hdr.stream_offset) if use_exec else \
                f"file:{image},offset={hdr.stream_offset:#x}"
        elif sparse:
            add_fds = [(0, fd, "virtsave-incoming")]
            uri = f"file:/dev/fdset/0,offset={hdr.stream_offset:#x}"
        else:
            pass_fds = (fd,)
            uri = f"fd:{fd}"
        # A real restore: the QEMU is the guest, its disks, NICs and displays are its own (not a replay's).
        plan = qemu_launch.plan_launch(argv, incoming="defer", transport=transport, serial_log=serial_log,
                                       add_fds=add_fds, pass_fds=pass_fds, allow_spawn=use_exec, isolated=False)
        plan.owns_run_dir = False  # QEMU keeps running after we return: its socket dir must stay
        proc = qemu_launch.start(plan)
        with proc.connect() as s:
            s.record_into(phase)
            caps = [{"capability": "events", "state": True}]
            if sparse:
                caps += [{"capability": "mapped-ram", "state": True},
                         {"capability": "multifd", "state": parallel_channels > 1}]
            s.execute("migrate-set-capabilities", {"capabilities": caps})
            if sparse and parallel_channels > 1:
                s.execute("migrate-set-parameters", {"multifd-channels": parallel_channels})
            mark = s.event_mark()
            s.execute("migrate-incoming", {"uri": uri})
            cb = migration_progress(progress, "restore", pid=helper.pid if helper else proc.pid, image=image,
                                    stream_offset=hdr.stream_offset)
            final = s.wait_migration(since=mark, timeout=timeout, progress=cb)
            if final != "completed":
                raise OperationFailed(f"loading {image} {final}: {_fail_info(s)} {proc.last_stderr(2)}")
            if helper is not None and helper.wait(30) != 0:
                raise OperationFailed(f"{DECOMPRESSORS[hdr.format][0]} failed on {image} (exit {helper.returncode})")
            run = hdr.was_running and not paused
            if run:
                s.execute("cont")
            s.record_into(None)
        return proc, DirectResult("restore", image, True, time.monotonic() - t_start,
                                  os.stat(image).st_size, "running" if run else "paused")
    except BaseException:
        if proc is not None:
            proc.plan.owns_run_dir = True
            proc.stop(grace=1.0)
        raise
    finally:
        os.close(fd)
        if pipe_r >= 0:
            os.close(pipe_r)
        if helper is not None and helper.poll() is None:
            helper.kill()
            helper.wait()
