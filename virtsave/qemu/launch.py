"""Start a QEMU equivalent to a traced (libvirt-run) domain, under virtsave's own control.

libvirt's command line (``trace["domain"]["argv"]``, from the domain log) is kept as it
is for everything the guest sees (machine, CPU, memory, devices), so its migration stream
fits; the pieces that only make sense inside libvirt are rewritten:

* the QMP monitor chardev libvirt passes as ``fd=N`` → our socket (Unix in a private
  0700 run dir, or TCP on 127.0.0.1 with a free port);
* the master-key secret → a fresh random key file in the run dir;
* ``-add-fd`` fdsets libvirt used for the serial log, ``pty``/``file`` chardevs →
  a plain file chardev in the run dir (or the log you pass), so the guest's output is visible;
* ``-pidfile``, ``-daemonize``, ``-incoming`` (replaced by ours: ``defer`` for restores),
  ``-no-acpi`` (gone in QEMU ≥ 9) → ``-machine …,acpi=off``;
* any other ``fd=N`` in the argv is refused: an fd we do not know is not ours to give.

Guest files (kernel, initrd, disks) and the binary must exist: else :class:`LaunchError`.
Every rewrite is listed in :attr:`LaunchPlan.rewrites`.

Example::

    plan = plan_launch(trace["domain"]["argv"], incoming="defer")
    with start(plan) as proc:           # QemuProcess; killed and cleaned up on exit
        with proc.connect() as s:       # qmp.QMPSession
            print(s.execute("query-status"))
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtsave.core.errors import LaunchError
from virtsave.core.files import open_private
from virtsave.qemu.qmp import QMPSession

#: QEMU options that take no value (the others in libvirt's argv all take exactly one).
FLAG_OPTIONS = frozenset({
    "-S", "-no-user-config", "-nodefaults", "-no-shutdown", "-no-reboot", "-no-acpi", "-no-hpet",
    "-enable-kvm", "-nographic", "-daemonize", "-snapshot", "-full-screen", "-enable-fips",
    "-no-fd-bootchk", "-no-quit", "-win2k-hack", "-old-param", "-only-migratable", "-preconfig",
})
RUN_BASE = Path(os.environ.get("VIRTSAVE_RUN_DIR", "/run/virtsave"))
_FD_RE = re.compile(r"(?:^|,)fd=(\d+)(?:,|$)")
_FDSET_RE = re.compile(r"/dev/fdset/(\d+)")


@dataclass
class LaunchPlan:
    """What will be executed, and why it differs from the traced argv."""

    argv: list[str]
    run_dir: Path
    qmp_address: str
    serial_log: Path | None
    pass_fds: tuple[int, ...] = ()
    rewrites: list[dict[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    owns_run_dir: bool = True


def _split_opts(value: str) -> list[str]:
    """Split a QEMU ``key=val,key=val`` option string (``,,`` escapes a comma)."""
    parts, cur, i = [], "", 0
    while i < len(value):
        c = value[i]
        if c == ",":
            if value[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    return parts


def _opt_dict(parts: list[str]) -> dict[str, str]:
    """``key=val`` parts as a dict; a leading bare word (the backend/driver) is under ``""``."""
    d = {k: v for k, _, v in (p.partition("=") for p in parts if "=" in p)}
    if parts and "=" not in parts[0]:
        d[""] = parts[0]
    return d


def pairs(argv: list[str]) -> list[tuple[str, str | None]]:
    """argv[1:] as (option, value-or-None) pairs."""
    out: list[tuple[str, str | None]] = []
    i = 1
    while i < len(argv):
        opt = argv[i]
        if not opt.startswith("-"):
            raise LaunchError(f"unexpected argument {opt!r} at position {i} of the QEMU command line")
        norm = "-" + opt.lstrip("-")
        if norm in FLAG_OPTIONS or i + 1 >= len(argv):
            out.append((norm, None))
            i += 1
        else:
            out.append((norm, argv[i + 1]))
            i += 2
    return out


def free_tcp_port() -> int:
    """A free TCP port on 127.0.0.1 (racy by nature, fine for a private QEMU)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_run_dir() -> Path:
    """A private (0700) directory for sockets, logs and keys of one QEMU."""
    base = RUN_BASE
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        base = Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="q", dir=base))


def _guest_files(opt: str, value: str) -> list[str]:
    """Host files the guest needs, named by option *opt*."""
    if opt in ("-kernel", "-initrd", "-bios"):
        return [value]
    files: list[str] = []
    if opt == "-drive":
        d = _opt_dict(_split_opts(value))
        if "file" in d and not d["file"].startswith(("/dev/fdset/", "nbd:", "iscsi:", "rbd:")):
            files.append(d["file"])
    elif opt == "-blockdev" and value.startswith("{"):
        with contextlib.suppress(ValueError):
            spec = json.loads(value)
            if spec.get("driver") in ("file", "host_device") and isinstance(spec.get("filename"), str):
                files.append(spec["filename"])
    return files


_QEMU_NAME = re.compile(r"^(qemu-system-[A-Za-z0-9_]+|qemu-kvm)$")


def is_qemu_binary(path: str) -> bool:
    """True when *path* names a QEMU system emulator (``qemu-system-*``, ``qemu-kvm``): the
    only programs a (possibly untrusted) command line may make virtsave execute."""
    return bool(_QEMU_NAME.match(os.path.basename(path)))


def binary_version(binary: str) -> tuple[int, int, int]:
    """``qemu-system-x86_64 --version`` as a tuple (0, 0, 0) if it cannot be read."""
    if not is_qemu_binary(binary):
        return (0, 0, 0)
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0, 0)
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else (0, 0, 0)


def plan_launch(argv: list[str], **kw: Any) -> LaunchPlan:
    """Rewrite a libvirt (or hand-made) QEMU argv into one virtsave can run and drive.

    Keywords as :func:`_plan_launch`. A run dir made here is removed again if planning fails.
    """
    if kw.get("run_dir") is not None:
        return _plan_launch(argv, **kw)
    rdir = make_run_dir()
    try:
        plan = _plan_launch(argv, **{**kw, "run_dir": rdir})
    except BaseException:
        shutil.rmtree(rdir, ignore_errors=True)
        raise
    plan.owns_run_dir = True
    return plan


def _plan_launch(argv: list[str], *, incoming: str | None = None, transport: str = "unix",
                paused: bool = True, serial_log: str | os.PathLike[str] | None = None,
                add_fds: list[tuple[int, int, str]] | None = None, pass_fds: tuple[int, ...] = (),
                allow_spawn: bool = False, binary: str | None = None,
                run_dir: Path | None = None) -> LaunchPlan:
    """The rewriting behind :func:`plan_launch`.

    *incoming*: ``-incoming`` value (``defer`` for restores) or None. *add_fds*: extra
    ``-add-fd`` (set, fd, opaque) entries, whose fds are inherited. *allow_spawn*: let QEMU
    run helpers (needed only for ``exec:`` migration URIs). Nothing is started here.
    """
    if not argv:
        raise LaunchError("empty QEMU command line (trace has no domain argv)")
    exe = binary or argv[0]
    if not is_qemu_binary(exe):
        raise LaunchError(f"refusing to execute {exe}: not a QEMU system emulator (qemu-system-*)")
    resolved = exe if "/" in exe else shutil.which(exe)
    if not resolved or not os.path.isfile(resolved) or not os.access(resolved, os.X_OK):
        raise LaunchError(f"QEMU binary not found or not executable: {exe}")
    own_dir = run_dir is None
    rdir = run_dir or make_run_dir()
    rewrites: list[dict[str, str]] = []

    def note(opt: str, old: str | None, new: str | None, why: str) -> None:
        rewrites.append({"option": opt, "original": old or "", "replacement": new or "", "reason": why})

    ps = pairs(argv)
    # Which chardevs are control monitors, and which feed a serial device.
    monitors = {(_opt_dict(_split_opts(v)).get("chardev") or "") for o, v in ps
                if o == "-mon" and v and "mode=control" in v}
    serial_chardevs: list[str] = []
    for o, v in ps:
        if o == "-device" and v:
            spec: dict[str, Any] = {}
            if v.startswith("{"):
                with contextlib.suppress(ValueError):
                    spec = json.loads(v)
            else:
                spec = _opt_dict(_split_opts(v))
                spec["driver"] = spec.get("driver") or spec.get("", "")
            if "serial" in str(spec.get("driver", "")) and spec.get("chardev"):
                serial_chardevs.append(str(spec["chardev"]))
    libvirt_fdsets: set[str] = set()
    for o, v in ps:
        if o == "-add-fd" and v:
            libvirt_fdsets.add(_opt_dict(_split_opts(v)).get("set", ""))

    if transport == "tcp":
        qmp_port = free_tcp_port()
        qmp_address = f"tcp:127.0.0.1:{qmp_port}"
        qmp_chardev = f"socket,id={{id}},host=127.0.0.1,port={qmp_port},server=on,wait=off"
    else:
        sock = rdir / "qmp.sock"
        qmp_address = f"unix:{sock}"
        qmp_chardev = f"socket,id={{id}},path={sock},server=on,wait=off"
    log_path = Path(serial_log) if serial_log else rdir / "serial.log"
    serial_used: Path | None = None
    have_qmp = False
    machine_idx: int | None = None
    drop_acpi = False

    out: list[str] = [resolved]
    for opt, val in ps:
        if opt in ("-S", "-incoming", "-pidfile", "-daemonize", "-add-fd"):
            if opt == "-add-fd" and val:
                fdset = _opt_dict(_split_opts(val)).get("set", "")
                note(opt, val, None, f"libvirt's fdset {fdset}: its users are rewritten to files we own")
            elif opt != "-S":
                note(opt, val, None, "libvirt-only; the launcher sets its own")
            continue
        if opt == "-no-acpi":
            drop_acpi = True
            note(opt, None, "-machine …,acpi=off", "-no-acpi was removed in QEMU 9; same meaning")
            continue
        if val is None:
            out.append(opt)
            continue
        if opt == "-object" and '"secret"' in val and "masterKey" in val:
            spec = json.loads(val)
            key = rdir / "master-key.aes"
            fd = open_private(key)
            try:
                os.write(fd, secrets.token_bytes(32))
            finally:
                os.close(fd)
            new = json.dumps({**spec, "file": str(key)}, separators=(",", ":"))
            note(opt, val, new, "libvirt's per-domain master key → a fresh key of our own")
            out += [opt, new]
            continue
        if opt == "-machine":
            machine_idx = len(out) + 1
        if opt == "-sandbox" and allow_spawn and "spawn=deny" in val:
            new = val.replace("spawn=deny", "spawn=allow")
            note(opt, val, new, "exec: migration needs QEMU to spawn a helper")
            out += [opt, new]
            continue
        if opt == "-chardev":
            parts = _split_opts(val)
            d = _opt_dict(parts)
            cid = d.get("id", "")
            if cid in monitors and "fd" in d:
                new = qmp_chardev.format(id=cid)
                note(opt, val, new, "libvirt's monitor fd → virtsave's own QMP socket")
                out += [opt, new]
                have_qmp = True
                continue
            if parts[0] in ("pty", "file", "pipe", "vc", "stdio"):
                if serial_used is None and (cid in serial_chardevs or not serial_chardevs):
                    target = log_path
                    serial_used = target
                else:
                    target = rdir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', cid)}.log"
                new = f"file,id={cid},path={target},append=on"
                note(opt, val, new, "guest output → a file virtsave owns")
                out += [opt, new]
                continue
        # Any fd or fdset still left is one we did not create: refuse.
        m = _FD_RE.search(val)
        if m:
            raise LaunchError(f"command line passes fd {m.group(1)} in {opt} {val[:80]}; "
                              "the launcher cannot rewrite it (refusing)")
        m = _FDSET_RE.search(val)
        if m and m.group(1) in libvirt_fdsets:
            raise LaunchError(f"command line uses libvirt's fdset {m.group(1)} in {opt} {val[:80]}; "
                              "the launcher cannot rewrite it (refusing)")
        for f in _guest_files(opt, val):
            if not os.path.exists(f):
                raise LaunchError(f"guest file missing: {f} (from {opt})")
        out += [opt, val]

    if drop_acpi:
        if machine_idx is not None:
            out[machine_idx] += ",acpi=off"
        else:
            out += ["-machine", "acpi=off"]
    if not have_qmp:
        out += ["-chardev", qmp_chardev.format(id="virtsave-qmp"), "-mon", "chardev=virtsave-qmp,mode=control"]
        note("-mon", None, "virtsave-qmp", "QMP monitor for virtsave")
    if paused:
        out.insert(1, "-S")
    for fdset, fd, opaque in add_fds or ():
        out += ["-add-fd", f"set={fdset},fd={fd},opaque={opaque}"]
    if incoming:
        out += ["-incoming", incoming]
    fds = tuple(sorted({*pass_fds, *(fd for _, fd, _ in add_fds or ())}))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(rdir)}
    return LaunchPlan(out, rdir, qmp_address, serial_used, fds, rewrites, env, own_dir)


class QemuProcess:
    """A running QEMU started by :func:`start`; kill it with :meth:`stop` (or a ``with`` block)."""

    def __init__(self, plan: LaunchPlan, proc: subprocess.Popen[bytes], stderr_path: Path) -> None:
        self.plan = plan
        self.proc = proc
        self.stderr_path = stderr_path
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def qmp_address(self) -> str:
        return self.plan.qmp_address

    @property
    def serial_log(self) -> Path | None:
        return self.plan.serial_log

    def alive(self) -> bool:
        return self.proc.poll() is None

    def last_stderr(self, lines: int = 5) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(x.strip() for x in text.strip().splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise :class:`LaunchError` with QEMU's last words if it has exited."""
        rc = self.proc.poll()
        if rc is not None:
            raise LaunchError(f"QEMU exited with status {rc}: {self.last_stderr() or '(no output)'}")

    def connect(self, timeout: float = 30.0, phase: dict[str, Any] | None = None) -> QMPSession:
        """Connect a QMP session to this QEMU (fails fast if QEMU dies); record into *phase*
        from the very first message (the negotiation) when given."""
        s = QMPSession(self.qmp_address, connect_timeout=timeout, alive=self.alive)
        s.record_into(phase)
        try:
            return s.connect()
        except Exception:
            s.close()
            if not self.alive():
                self.check_alive()
            raise

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for exit; None on timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after *grace* seconds; remove the run dir if we made it."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            if self.wait(grace) is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.wait(10)
        if self.plan.owns_run_dir:
            # Everything in the run dir goes (pass serial_log= elsewhere to keep the guest output).
            shutil.rmtree(self.plan.run_dir, ignore_errors=True)

    def __enter__(self) -> QemuProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def abort(self) -> None:
        """End this QEMU for good (its operation failed, or its owner is done with it): SIGTERM,
        SIGKILL after a second, and its run dir removed even where it was meant to outlive us."""
        self.plan.owns_run_dir = True
        self.stop(grace=1.0)


#: Every QEMU started by this process, so callers (and tests) can kill them all.
LAUNCHED: list[QemuProcess] = []


def start(plan: LaunchPlan) -> QemuProcess:
    """Execute *plan*; QEMU's stdout/stderr go to ``qemu.log`` in the run dir."""
    err_path = plan.run_dir / "qemu.log"
    fd = open_private(err_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        proc = subprocess.Popen(plan.argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                pass_fds=plan.pass_fds, env=plan.env, cwd=plan.run_dir,
                                start_new_session=True)
    except OSError as exc:
        raise LaunchError(f"cannot execute {plan.argv[0]}: {exc.strerror}") from None
    finally:
        os.close(fd)
    qp = QemuProcess(plan, proc, err_path)
    LAUNCHED.append(qp)
    return qp


def stop_all() -> None:
    """Kill every QEMU this process launched (teardown helper)."""
    for qp in LAUNCHED:
        with contextlib.suppress(Exception):
            qp.stop(grace=1.0)


def argv_from_domain_log(path: str | os.PathLike[str], index: int = -1) -> list[str]:
    """The QEMU argv of the *index*-th start recorded in a libvirt domain log.

    Uses :func:`virtsave.libvirtd.domainlog.parse_domain_log` when available; else a small reader of
    the ``VAR=… \\`` / ``/usr/bin/qemu… \\`` block libvirt writes after "starting up".
    """
    try:
        from virtsave.libvirtd import domainlog as qemulog  # type: ignore[attr-defined]
    except ImportError:
        qemulog = None
    if qemulog is not None:
        starts = qemulog.parse_domain_log(path)
        if not starts:
            raise LaunchError(f"{path}: no QEMU start recorded")
        return list(starts[index].argv)
    import shlex

    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as exc:
        raise LaunchError(f"cannot read domain log {path}: {exc.strerror}") from None
    blocks: list[list[str]] = []
    cur: list[str] | None = None
    for line in lines:
        if "starting up libvirt" in line:
            cur = []
            continue
        if cur is not None:
            cur.append(line.rstrip("\\").rstrip())
            if not line.endswith("\\"):
                blocks.append(shlex.split(" ".join(cur)))
                cur = None
    if not blocks:
        raise LaunchError(f"{path}: no QEMU start recorded")
    words = blocks[index]
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words.pop(0)
    return words
