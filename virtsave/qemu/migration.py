"""The save and restore steps on the QEMU side, written once for every backend that drives QEMU.

:mod:`virtsave.qemu.direct` (virtsave's own command list) and :mod:`virtsave.qemu.replay`
(a traced command list) differ only in WHICH commands they send; HOW an image is written
and read is here:

Save — :func:`saving` yields an :class:`Outgoing` image:

1. the image is created 0600 with a ``LibvirtQemudPart`` header (:func:`create_image`);
2. QEMU gets the file: over a Unix socket by SCM_RIGHTS (:attr:`Outgoing.qemu_fd` for ``getfd``
   → ``fd:NAME``, or ``add-fd`` → ``file:/dev/fdset/N,offset=…``); over TCP it opens the file
   by path (``file:PATH,offset=N``, QEMU ≥ 8.2) or an ``exec:`` dd helper built here does.
   :meth:`Outgoing.uri` turns the URI libvirt uses into the one for our image and says why.
   Compressed formats (gzip … zstd) put a compressor between QEMU and the file, as libvirt does:
   QEMU writes its stream into a pipe (``getfd`` → ``fd:migrate``), the compressor
   (:func:`compressor_argv`, multi-threaded where the format's tool can) writes the image;
3. after ``migrate``, :func:`await_completion` waits for the ``MIGRATION`` event;
4. :meth:`Outgoing.finish` is the one place an image becomes complete (helper or compressor done,
   header put back if QEMU opened the file itself, fsync of the data and of the directory, magic
   ``LibvirtQemudSave``, fsync);
5. on any failure the partial image is removed and the guest resumed if it was running
   (libvirt sends ``cont`` too); :func:`end_saved_qemu` ends QEMU after a completed save (SIGTERM
   as libvirt does, or ``quit``).

Restore — :func:`loading` yields an :class:`Incoming` image: opened at its stream offset
(through a decompressor for compressed formats, as libvirt does), handed to a QEMU launched
with ``-incoming defer`` (inherited fd, or an ``-add-fd`` fdset for sparse images),
``migrate-incoming`` with :meth:`Incoming.uri`; on failure that QEMU is killed
(:meth:`~virtsave.qemu.launch.QemuProcess.abort`).

Example::

    with QMPSession("unix:/run/q/qmp.sock") as s:
        with migration.saving("/var/tmp/g.save", xml, session=s, resume=True) as out:
            s.execute("stop")
            s.execute("getfd", {"fdname": "migrate"}, fds=[out.qemu_fd])
            mark = s.event_mark()
            s.execute("migrate", {"uri": out.uri("fd:migrate")[0]})
            migration.await_completion(s, mark, what="migration to /var/tmp/g.save")
            size = out.finish()
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar
from xml.sax.saxutils import escape

from virtsave.core.errors import ImageError, OperationFailed, QMPError, UnsupportedError
from virtsave.core.files import open_private
from virtsave.core.operation import Progress
from virtsave.image import saveimage
from virtsave.qemu import launch as qemu_launch
from virtsave.qemu.qmp import QMPSession

__all__ = ["COMPRESSORS", "END_WAYS", "FDSET_URI", "UNLIMITED_BANDWIDTH", "ZSTD_THREADS", "Incoming", "Outgoing",
           "await_completion",
           "compressor_argv", "create_image",
           "end_saved_qemu", "exec_restore_uri", "exec_save_uri", "has_file_uri", "loading",
           "migration_progress", "open_image", "qemu_version", "saving", "synthesize_xml", "wait_exec_helper",
           "zstd_threads"]

#: libvirt's "unlimited" migration bandwidth (QEMU's default of 128 MiB/s would throttle us).
UNLIMITED_BANDWIDTH = 9223372036853727232
FDSET_URI = re.compile(r"^file:/dev/fdset/(\d+)(?:,offset=(0x[0-9a-fA-F]+|\d+))?$")
TRANSPORTS = ("unix", "tcp")
#: Stands in :data:`COMPRESSORS` for zstd's thread option, chosen by :func:`zstd_threads`.
ZSTD_THREADS = "{zstd-threads}"
#: Compressors of libvirt's compressed formats, best first: each reads QEMU's stream on stdin and
#: writes what libvirt's ``FORMAT -dc`` reads back, at the tool's default level (libvirt runs
#: ``FORMAT -c``). The multi-threaded ones are tried first (pigz / lbzip2 / pbzip2 when installed;
#: ``xz -T0``); zstd's threads follow the CPUs (:func:`zstd_threads`); lzop has no threads.
COMPRESSORS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gzip": (("pigz", "-c"), ("gzip", "-c")),
    "bzip2": (("lbzip2", "-c"), ("pbzip2", "-c"), ("bzip2", "-c")),
    "xz": (("xz", "-c", "-T0"),),
    "lzop": (("lzop", "-c"),),
    "zstd": (("zstd", "-c", "-q", ZSTD_THREADS),),
}
#: The pipe between QEMU and the compressor (libvirt's iohelper pipe is 1 MiB as well).
PIPE_SIZE = 1024 * 1024
#: How long a compressor may take to drain what QEMU wrote before it reported ``completed``.
COMPRESSOR_DRAIN = 600.0


# -- QEMU facts ---------------------------------------------------------------------------------
def qemu_version(session: QMPSession) -> tuple[int, int, int]:
    """QEMU's version as reported over QMP."""
    q = (session.execute("query-version") or {}).get("qemu", {})
    return int(q.get("major", 0)), int(q.get("minor", 0)), int(q.get("micro", 0))


def has_file_uri(version: tuple[int, int, int]) -> bool:
    """``file:PATH,offset=N`` migration URIs exist from QEMU 8.2.

    >>> has_file_uri((8, 2, 0)), has_file_uri((7, 2, 0))
    (True, False)
    """
    return version >= (8, 2, 0)


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


def zstd_threads(cpus: int | None = None) -> str:
    """zstd's thread option for a save on *cpus* CPUs (default: the CPUs this process may run on).

    QEMU's migration thread and the writer behind zstd each keep a CPU busy; zstd's workers get the
    rest, and with one or none to spare zstd compresses in its own I/O thread (``--single-thread``).
    Measured on 2 CPUs (2 GiB guest, 1.5 GiB random data, 3 runs each): ``--single-thread`` 2.25–2.67 s,
    ``-T1`` 2.68–3.02 s, ``-T2`` 2.85–2.89 s, ``-T0`` 2.94–3.42 s; the images' sizes within 0.02 %.

    >>> zstd_threads(2), zstd_threads(3), zstd_threads(8)
    ('--single-thread', '--single-thread', '-T6')
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0))
    spare = cpus - 2
    return "--single-thread" if spare <= 1 else f"-T{spare}"


def compressor_argv(image_format: str) -> list[str]:
    """The compressor command for *image_format*: the first of :data:`COMPRESSORS` installed.

    >>> compressor_argv("zstd")[:3], compressor_argv("zstd")[3] == zstd_threads()
    (['zstd', '-c', '-q'], True)
    >>> compressor_argv("sparse")
    Traceback (most recent call last):
    ...
    virtsave.core.errors.UnsupportedError: sparse is not a compressed image format
    """
    choices = COMPRESSORS.get(image_format)
    if choices is None:
        raise UnsupportedError(f"{image_format} is not a compressed image format")
    for argv in choices:
        if shutil.which(argv[0]):
            return [zstd_threads() if a == ZSTD_THREADS else a for a in argv]
    raise UnsupportedError(f"no compressor for {image_format} images installed "
                           f"({' or '.join(a[0] for a in choices)})")


def _pipe() -> tuple[int, int]:
    """A pipe (close-on-exec) of :data:`PIPE_SIZE` where the kernel allows it."""
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # a bigger pipe: fewer context switches (best effort)
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


def _spawn(argv: list[str], stdin: int, stdout: int, what: str) -> subprocess.Popen[bytes]:
    """Start a helper of a save. Own session: a Ctrl-C meant for virtsave must not kill it half-way
    (the failure path ends it)."""
    try:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise UnsupportedError(f"cannot run {argv[0]} for {what}: {exc.strerror}") from None


# -- exec: helpers (QEMU < 8.2 over TCP; only ever built here, never taken from input) -----------
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


# -- image files ----------------------------------------------------------------------------------
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


def open_image(image_path: str | os.PathLike[str], *, compressed_ok: bool = False) -> tuple[int, saveimage.Header]:
    """Open a complete save image read-only; return (fd at its stream offset, header)."""
    hdr = saveimage.read_header_path(image_path, allow_partial=False)
    decomp = saveimage.DECOMPRESSORS
    if hdr.format not in ("raw", "sparse") and not (compressed_ok and hdr.format in decomp):
        raise UnsupportedError(f"image format {hdr.format} is not supported here (raw, sparse"
                               f"{', ' + ', '.join(decomp) if compressed_ok else ''})")
    try:
        fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"cannot open image {image_path}: {exc.strerror}") from None
    os.lseek(fd, hdr.stream_offset, os.SEEK_SET)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return fd, hdr


# -- progress and completion ----------------------------------------------------------------------
def _read_position(pid: int, image: str) -> int | None:
    """How far process *pid* has read *image*: the largest file position among its fds on it."""
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
    side): how far process *pid* (QEMU, or the decompressor) has read *image* past *stream_offset*.
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
            pos = _read_position(pid, image)  # None once the reader closed the image: keep the last figure
            last[0] = max(last[0], 0 if pos is None else pos - stream_offset)
            done, total = last[0], size
        if info.get("status") == "completed" and total:
            done = total
        progress({"domain": operation, "operation": operation, "data_processed": done, "data_total": total,
                  "status": info.get("status")})
    return cb


def fail_reason(session: QMPSession) -> str:
    """Why the migration failed, as QEMU tells it (``error-desc``)."""
    with contextlib.suppress(QMPError):
        info = session.execute("query-migrate") or {}
        return str(info.get("error-desc") or info.get("status"))
    return "unknown error"


def await_completion(session: QMPSession, mark: int, *, what: str, progress: Progress | None = None,
                     timeout: float | None = None, poll: float | None = None,
                     qemu: qemu_launch.QemuProcess | None = None) -> None:
    """Wait for the ``MIGRATION`` event (after event index *mark*) to say ``completed``.

    Anything else raises :class:`OperationFailed` ``"{what} {status}: {QEMU's reason}"``,
    with the last words of *qemu* (a QEMU we launched) when given.
    """
    final = session.wait_migration(since=mark, timeout=timeout, poll=poll, progress=progress)
    if final != "completed":
        last_words = f" {qemu.last_stderr(2)}" if qemu is not None else ""
        raise OperationFailed(f"{what} {final}: {fail_reason(session)}{last_words}".rstrip())


# -- the image as QEMU's migration stream ---------------------------------------------------------
@dataclass
class _Stream:
    """An image being written or read by QEMU, and how QEMU reaches it."""

    operation: ClassVar[str]
    path: str
    header: saveimage.Header
    fd: int
    transport: str = "unix"
    use_exec: bool = False
    #: The fd QEMU gets (SCM_RIGHTS, or inherited at exec).
    qemu_fd: int = -1
    _own_fds: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise UnsupportedError(f"transport must be one of {', '.join(TRANSPORTS)}, not {self.transport!r}")

    def uri(self, wanted: str) -> tuple[str, str | None]:
        """The migration URI for our image in place of *wanted* (the URI libvirt uses:
        ``fd:NAME``, ``fd:N``, ``file:/dev/fdset/N[,offset=…]``), and why it differs (None: same)."""
        off = self.header.stream_offset
        incoming = self.operation == "restore"
        if self.transport == "tcp":
            if self.use_exec:
                new = exec_restore_uri(self.path, off) if incoming else exec_save_uri(self.path, off)
                return new, "TCP QMP cannot pass fds; QEMU < 8.2 has no file: URI, so a dd helper built by virtsave"
            return f"file:{self.path},offset={off:#x}", "TCP QMP cannot pass fds: QEMU opens the image by path"
        m = FDSET_URI.match(wanted)
        if m:
            new = f"file:/dev/fdset/{m.group(1)},offset={off:#x}"
            return new, (None if new == wanted else "our image's stream offset")
        if wanted.startswith("fd:"):
            if not incoming:
                return wanted, None  # fd:NAME from getfd: the same name, our fd
            new = f"fd:{self.qemu_fd}"
            return new, (None if new == wanted else "our image fd, inherited by QEMU at exec")
        raise UnsupportedError(f"cannot replay migration URI {wanted!r} (only fd: and file:/dev/fdset/ are replayed)")

    def progress_cb(self, progress: Progress | None, pid: int | None = None) -> Progress | None:
        """*progress* fed from ``query-migrate`` (and, loading, from how far *pid* has read)."""
        return migration_progress(progress, self.operation, pid=pid, image=self.path,
                                  stream_offset=self.header.stream_offset)

    def close(self) -> None:
        for fd in (self.fd, *self._own_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._own_fds.clear()


@dataclass
class Outgoing(_Stream):
    """A save image QEMU writes; complete only after :meth:`finish`."""

    operation: ClassVar[str] = "save"
    header_bytes: bytes = b""
    #: The compressor process of a compressed image (None: QEMU writes the file itself).
    compressor: subprocess.Popen[bytes] | None = None
    compressor_name: str = ""
    #: With *bypass_cache*: ``dd`` writing the compressor's output into the image with O_DIRECT.
    writer: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls, path: str, xml: str, cookie: str | None = None, *, was_running: bool = True,
               image_format: str = "raw", transport: str = "unix", use_exec: bool = False,
               bypass_cache: bool = False) -> Outgoing:
        """Create *path* with a partial header and get the fd QEMU will write through.

        *bypass_cache* (compressed formats; sparse ones do it in QEMU, see :meth:`open_direct`): the
        compressed stream is written with O_DIRECT, past the page cache, like libvirt's iohelper
        with ``--bypass-cache``."""
        compressor = None
        if image_format in COMPRESSORS:  # refused before any file exists
            if transport != "unix":
                raise UnsupportedError(f"a {image_format} image needs a unix: QMP socket (QEMU gets the "
                                       "compressor's pipe by fd passing)")
            compressor = compressor_argv(image_format)
        fd, hdr = create_image(path, xml, cookie, was_running=was_running, image_format=image_format)
        out = cls(path, hdr, fd, transport, use_exec, fd,
                  header_bytes=saveimage.encode_header(xml, cookie, was_running=was_running,
                                                       image_format=image_format))
        try:
            if transport == "unix" and hdr.format == "sparse":
                # QEMU dups fdset members by access mode: an outgoing file: URI wants O_WRONLY.
                out.qemu_fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                out._own_fds.append(out.qemu_fd)
            else:
                os.lseek(fd, hdr.stream_offset, os.SEEK_SET)
            if compressor is not None:
                out._compress(compressor, direct=bypass_cache)
        except BaseException:
            out.close()
            out.discard()
            raise
        return out

    def _compress(self, argv: list[str], *, direct: bool) -> None:
        """Like libvirt: QEMU writes its stream into a pipe, *argv* reads it and writes the image
        (its stdout is the image fd at the stream offset, or with *direct* the pipe into
        :meth:`_direct_writer`). QEMU gets the first pipe's write end."""
        pipe_r, pipe_w = _pipe()
        self._own_fds.append(pipe_w)
        target = self._direct_writer() if direct else self.fd
        try:
            self.compressor = _spawn(argv, pipe_r, target, f"a {self.header.format} image")
        finally:
            os.close(pipe_r)
            if target != self.fd:
                os.close(target)
        self.qemu_fd = pipe_w
        self.compressor_name = argv[0]

    def _direct_writer(self) -> int:
        """Start ``dd`` writing its input into the image with O_DIRECT from the stream offset (4 MiB
        blocks; GNU dd writes a last short block without O_DIRECT); return the pipe into it."""
        try:  # the very file we created (not its path again), in an open file description of its own
            dfd = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as exc:
            raise UnsupportedError(f"--bypass-cache: cannot open {self.path} with O_DIRECT "
                                   f"({exc.strerror}; e.g. tmpfs)") from None
        pipe_r, pipe_w = _pipe()
        try:
            os.lseek(dfd, self.header.stream_offset, os.SEEK_SET)
            self.writer = _spawn(["dd", "bs=4M", "iflag=fullblock", "oflag=direct", "status=none"], pipe_r, dfd,
                                 "the O_DIRECT writer")
        except BaseException:
            os.close(pipe_w)
            raise
        finally:
            os.close(pipe_r)
            os.close(dfd)
        return pipe_w

    def _finish_compressor(self) -> None:
        """QEMU closed its end of the pipe when the migration ended; ours goes now, so the
        compressor sees the end of the stream (and then the writer the end of its). Each must
        exit 0."""
        if self.qemu_fd in self._own_fds:
            self._own_fds.remove(self.qemu_fd)
            os.close(self.qemu_fd)
        for proc, name in ((self.compressor, self.compressor_name), (self.writer, "dd (O_DIRECT writer)")):
            if proc is None:
                continue
            try:
                _, err = proc.communicate(timeout=COMPRESSOR_DRAIN)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise OperationFailed(f"{name} did not finish writing {self.path} within "
                                      f"{COMPRESSOR_DRAIN:.0f} s after QEMU completed") from None
            if proc.returncode != 0:
                last = (err.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
                raise OperationFailed(f"{name} failed writing {self.path} (exit {proc.returncode}): {last}")

    def open_direct(self) -> int:
        """A second write fd with O_DIRECT (the caller closes it): QEMU picks fdset members by
        open flags, so multifd page writes use it and the unaligned stream parts the plain one
        (libvirt's ``--bypass-cache`` does this)."""
        try:
            return os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as exc:
            raise UnsupportedError(f"--bypass-cache: cannot open {self.path} with O_DIRECT "
                                   f"({exc.strerror}; e.g. tmpfs)") from None

    def finish(self) -> int:
        """Make the image complete after QEMU reported ``completed``; return its size.

        The one place a save image is finalized: the ``exec:`` helper must be done, the
        header is put back where QEMU opened the file by path (it may truncate), then
        :func:`~virtsave.image.saveimage.finalize` syncs the data and the directory entry, then
        flips the magic and syncs again.
        """
        if self.compressor is not None:
            self._finish_compressor()
        if self.transport == "tcp":
            if self.use_exec:
                wait_exec_helper(self.path)
            os.pwrite(self.fd, self.header_bytes, 0)
        saveimage.finalize(self.fd, self.path)
        return os.fstat(self.fd).st_size

    def discard(self) -> None:
        """Remove the (partial) image."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def close(self) -> None:
        super().close()
        for proc in (self.compressor, self.writer):
            if proc is not None and proc.poll() is None:
                proc.kill()  # a failed save: what it would still write is going away
                proc.wait()


@contextlib.contextmanager
def saving(path: str | os.PathLike[str], xml: str, cookie: str | None = None, *, session: QMPSession,
           resume: bool, was_running: bool = True, image_format: str = "raw", transport: str = "unix",
           use_exec: bool = False, bypass_cache: bool = False) -> Iterator[Outgoing]:
    """Create the image, yield it; if the body fails, remove it and (when *resume*) ``cont`` the guest.

    *was_running* is what the header records (the state a restore brings back).
    """
    out = Outgoing.create(os.fspath(path), xml, cookie, was_running=was_running, image_format=image_format,
                          transport=transport, use_exec=use_exec,
                          bypass_cache=bypass_cache and image_format in COMPRESSORS)
    try:
        yield out
    except BaseException:
        out.discard()
        if resume:
            with contextlib.suppress(QMPError):
                session.execute("cont")  # libvirt resumes the guest after a failed save
        raise
    finally:
        out.close()


#: How a QEMU is ended after a completed save: ``sigterm`` as libvirt does it, or QMP ``quit``.
END_WAYS = ("sigterm", "quit")


def end_saved_qemu(session: QMPSession, qemu: qemu_launch.QemuProcess | None = None, *, how: str = "quit",
                   close_first: bool = False, timeout: float = 15.0) -> None:
    """End a QEMU whose save completed — the one place that choice is made.

    ``how="sigterm"``: libvirt's way (``qemuProcessKill``): SIGTERM to *qemu* (a QEMU virtsave
    launched), which reports ``SHUTDOWN`` (``host-signal``) and exits; its exit is waited for on a
    pidfd, not polled (:meth:`~virtsave.qemu.launch.QemuProcess.terminate`), and the session keeps
    recording until it has read that event or QEMU's hang-up, so a trace holds it as libvirt 11's
    does. *close_first*: the monitor is closed before the signal, as libvirt 9.0 does it (its traces
    have no ``SHUTDOWN``).
    ``how="quit"``: QMP ``quit`` (QEMU answers, reports ``SHUTDOWN`` ``host-qmp-quit`` and exits): for
    a QEMU virtsave did not start, and for replays that need not look like libvirt.
    """
    if how not in END_WAYS:
        raise UnsupportedError(f"QEMU is ended by {' or '.join(END_WAYS)}, not {how!r}")
    if how == "quit":
        session.quit()
        if qemu is not None:
            qemu.wait_exit(timeout)
        return
    if qemu is None:
        raise UnsupportedError("ending QEMU by SIGTERM needs the QEMU process (one virtsave launched)")
    if close_first:
        session.close()
        qemu.terminate(timeout)
        return
    mark = session.event_mark()
    qemu.terminate(timeout)
    session.wait_event("SHUTDOWN", since=mark, timeout=2.0)


@dataclass
class Incoming(_Stream):
    """A complete save image a QEMU launched for it loads."""

    operation: ClassVar[str] = "restore"
    #: The fdset the image goes in at launch (None: inherited as a plain fd).
    fdset: int | None = None
    #: An O_DIRECT read fd in that fdset too (:meth:`add_direct`), else None.
    direct_fd: int | None = None
    helper: subprocess.Popen[bytes] | None = None
    qemu: qemu_launch.QemuProcess | None = None

    @classmethod
    def open(cls, path: str, *, transport: str = "unix", use_exec: bool = False,
             wanted_uri: str | None = None) -> Incoming:
        """Open *path*; *wanted_uri* is the URI libvirt loads it with (None: what libvirt would use
        for this image, an fdset for sparse ones). Compressed images go through their decompressor."""
        fd, hdr = open_image(path, compressed_ok=True)
        inc = cls(path, hdr, fd, transport, use_exec, fd)
        try:
            if hdr.format in saveimage.DECOMPRESSORS:
                inc._decompress()
            elif transport == "unix":
                m = FDSET_URI.match(wanted_uri or ("file:/dev/fdset/0" if hdr.format == "sparse" else "fd:"))
                inc.fdset = int(m.group(1)) if m else None
        except BaseException:
            inc.close()
            raise
        return inc

    def add_direct(self) -> None:
        """Put an O_DIRECT read fd beside the plain one in the image's fdset: with QEMU's
        ``direct-io`` its multifd channels read the pages through it, past the page cache
        (libvirt's ``--bypass-cache`` on restore). Sparse images over a unix: socket only."""
        if self.fdset is None:
            raise UnsupportedError("--bypass-cache on restore needs a sparse image and a unix: QMP socket")
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as exc:
            raise UnsupportedError(f"--bypass-cache: cannot open {self.path} with O_DIRECT "
                                   f"({exc.strerror}; e.g. tmpfs)") from None
        self._own_fds.append(fd)
        self.direct_fd = fd

    def _decompress(self) -> None:
        """Like libvirt: a decompressor reads the image and feeds QEMU through a pipe
        (inherited at exec, so this works whatever the QMP transport)."""
        argv = saveimage.DECOMPRESSORS[self.header.format]
        pipe_r, pipe_w = _pipe()  # 1 MiB: QEMU reads its stream in small chunks
        self._own_fds.append(pipe_r)
        try:
            self.helper = subprocess.Popen(argv, stdin=self.fd, stdout=pipe_w, stderr=subprocess.DEVNULL)
        except OSError as exc:
            raise UnsupportedError(f"cannot run {argv[0]} for a {self.header.format} image: {exc.strerror}") from None
        finally:
            os.close(pipe_w)
        self.qemu_fd = pipe_r

    def uri(self, wanted: str | None = None) -> tuple[str, str | None]:
        """As :meth:`_Stream.uri`; *wanted* None: the URI this image was opened for."""
        if self.helper is not None:
            new = f"fd:{self.qemu_fd}"  # the decompressor's pipe, whatever the transport
            return new, (None if new == wanted else "the decompressor's pipe, inherited by QEMU at exec")
        if wanted is None:
            wanted = f"file:/dev/fdset/{self.fdset}" if self.fdset is not None else "fd:"
        return super().uri(wanted)

    def plan_launch(self, argv: list[str], *, serial_log: str | os.PathLike[str] | None = None,
                    binary: str | None = None, isolated: bool = True,
                    overlay_dir: str | os.PathLike[str] | None = None) -> qemu_launch.LaunchPlan:
        """A paused ``-incoming defer`` launch of *argv* (run by *binary*, default ``argv[0]``) that
        gives QEMU this image; *isolated* and *overlay_dir* as :func:`virtsave.qemu.launch.plan_launch`."""
        add_fds = [(self.fdset, self.fd, "virtsave-incoming")] if self.fdset is not None else []
        if self.fdset is not None and self.direct_fd is not None:
            add_fds.append((self.fdset, self.direct_fd, "virtsave-incoming-direct"))
        pass_fds = (self.qemu_fd,) if self.helper is not None or (self.transport == "unix" and not add_fds) else ()
        return qemu_launch.plan_launch(argv, incoming="defer", transport=self.transport, paused=True,
                                       serial_log=serial_log, add_fds=add_fds, pass_fds=pass_fds,
                                       allow_spawn=self.use_exec, binary=binary, isolated=isolated,
                                       overlay_dir=overlay_dir)

    def start(self, plan: qemu_launch.LaunchPlan) -> qemu_launch.QemuProcess:
        """Launch *plan*; this QEMU is killed if the load fails (see :func:`loading`)."""
        self.qemu = qemu_launch.start(plan)
        return self.qemu

    def reader_pid(self) -> int | None:
        """The process reading the image (the decompressor, else QEMU): for progress."""
        return self.helper.pid if self.helper is not None else (self.qemu.pid if self.qemu else None)

    def check_helper(self) -> None:
        """Raise if the decompressor failed (QEMU may report ``completed`` on a short stream)."""
        if self.helper is not None and self.helper.wait(30) != 0:
            argv = saveimage.DECOMPRESSORS[self.header.format]
            raise OperationFailed(f"{argv[0]} failed on {self.path} (exit {self.helper.returncode})")

    def close(self) -> None:
        super().close()
        if self.helper is not None and self.helper.poll() is None:
            self.helper.kill()
            self.helper.wait()


@contextlib.contextmanager
def loading(path: str | os.PathLike[str], *, transport: str = "unix", use_exec: bool = False,
            wanted_uri: str | None = None) -> Iterator[Incoming]:
    """Open the image, yield it; if the body fails, the QEMU launched for it is killed."""
    inc = Incoming.open(os.fspath(path), transport=transport, use_exec=use_exec, wanted_uri=wanted_uri)
    try:
        yield inc
    except BaseException:
        if inc.qemu is not None:
            inc.qemu.abort()
        raise
    finally:
        inc.close()
