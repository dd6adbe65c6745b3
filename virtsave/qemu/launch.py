"""Start a QEMU equivalent to a traced (libvirt-run) domain, under virtsave's own control.

libvirt's command line (``trace["domain"]["argv"]``, from the domain log) is kept as it is for
everything the guest sees (machine, CPU, memory, devices), so its migration stream fits; the pieces
that only make sense inside libvirt are rewritten by the rules of :data:`RULES`, one named entry each
(the option and backends it matches, what it becomes):

=================  ================================================================================
``monitor``        the QMP monitor chardev libvirt passes as ``fd=N`` → our socket (Unix in a private
                   0700 run dir, or TCP on 127.0.0.1 with a free port)
``master-key``     libvirt's master-key ``-object secret`` file → a fresh random key in the run dir
``serial-output``  a ``pty``/``vc``/``stdio``/``pipe`` chardev, or a ``file`` chardev on libvirt's
                   fdset, feeding a serial/console device → a file chardev (the serial log)
``chardev-log``    any other ``pty``/``vc``/``stdio``/``file`` chardev logged through libvirt's
                   fdset (``logfile=``/``path=/dev/fdset/N``) → a file chardev in the run dir
``libvirt-fdset``  ``-add-fd`` whose set only rewritten options (or the traced restore) use → dropped
``incoming``       ``-incoming defer|fd:N|stdio|file:/dev/fdset/N`` → dropped (ours is added)
``pidfile``        ``-pidfile`` → dropped (the launcher owns the process)
``daemonize``      ``-daemonize`` → dropped (QEMU stays our child)
``freeze``         ``-S`` → dropped (ours is added when starting paused)
``no-acpi``        ``-no-acpi`` (gone in QEMU ≥ 9) → ``-machine …,acpi=off``
``sandbox-spawn``  ``-sandbox …,spawn=deny`` → ``spawn=allow`` when an ``exec:`` helper is needed
=================  ================================================================================

Anything no rule matches stays as traced, except that an inherited ``fd=N`` or a libvirt fdset in
it is refused (:class:`LaunchError`): an fd we do not know is not ours to give. The safety check
(:mod:`virtsave.qemu.safety`) accepts exactly what a rule rewrites whole (:func:`rule_for`), so the
two cannot drift. :func:`rewrite_argv` is the pure rewrite; :func:`plan_launch` adds the run dir,
the key file and the checks that the binary and guest files (kernel, initrd, disks) exist. Every
rewrite is listed in :attr:`LaunchPlan.rewrites`.

Example::

    plan = plan_launch(trace["domain"]["argv"], incoming="defer")
    with start(plan) as proc:           # QemuProcess; killed and cleaned up on exit
        with proc.connect() as s:       # qmp.QMPSession
            print(s.execute("query-status"))

    >>> r = rewrite_argv(["qemu-system-x86_64", "-no-acpi", "-pidfile", "/run/libvirt/qemu/g.pid"],
    ...                  Target(Path("/run/virtsave/q1")), incoming="defer")
    >>> r.argv
    ['qemu-system-x86_64', '-S', '-machine', 'acpi=off', '-chardev', \
'socket,id=virtsave-qmp,path=/run/virtsave/q1/qmp.sock,server=on,wait=off', '-mon', \
'chardev=virtsave-qmp,mode=control', '-incoming', 'defer']
    >>> r.applied
    ['no-acpi', 'pidfile']
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtsave.core.errors import LaunchError
from virtsave.core.files import open_private
from virtsave.qemu.qmp import QMPSession
from virtsave.trace import argv as qargv
from virtsave.trace import model as tr
from virtsave.trace.argv import CommandLine, Option

__all__ = [
    "LAUNCHED", "MASTER_KEY_GLOBS", "RULES", "RUN_BASE", "SERIAL_DEVICES", "ArgvContext", "LaunchPlan",
    "QemuProcess", "Rewritten", "Rule", "Target", "binary_version", "context", "free_tcp_port",
    "is_qemu_binary", "make_run_dir", "plan_launch", "rewrite_argv", "rule_for", "start", "stop_all",
]

RUN_BASE = Path(os.environ.get("VIRTSAVE_RUN_DIR", "/run/virtsave"))
#: Where libvirt keeps a domain's master key: the one secret file a traced command line may name
#: (system daemon; a user's session daemon keeps it in ``~/.config/libvirt/qemu/lib/domain-*/``).
MASTER_KEY_GLOBS = ("/var/lib/libvirt/qemu/domain-*/master-key.aes", "/run/libvirt/qemu/*/master-key.aes",
                    "/*/.config/libvirt/qemu/lib/domain-*/master-key.aes")
#: Device models whose chardev is the guest's serial port or console (its output goes to the serial log).
SERIAL_DEVICES = frozenset({"isa-serial", "pci-serial", "pci-serial-2x", "pci-serial-4x", "usb-serial",
                            "spapr-vty", "sclpconsole", "sclplmconsole", "virtconsole"})
#: ``-incoming`` values of a libvirt restore (the launcher adds its own).
_LIBVIRT_INCOMING = re.compile(r"^(defer|stdio|fd:\S+|file:/dev/fdset/\d+(,offset=(0x[0-9a-fA-F]+|\d+))?)$")
_OUTPUT_CHARDEVS = ("pty", "vc", "stdio")
_FDSET_PATH = re.compile(r"/dev/fdset/(\d+)")


# ----------------------------------------------------------------------------------------- context


@dataclass(frozen=True)
class ArgvContext:
    """What the rules need to know about the whole command line: the control monitor's chardev (the
    first ``-mon …,mode=control``), the chardevs feeding serial/console devices, the fdsets declared by
    ``-add-fd`` and which options use each, and *qmp_fdsets*, the fdsets the traced QMP conversation
    migrates from (None: not known, as when the launcher runs a command line without its trace)."""

    cmdline: CommandLine
    monitor: str | None
    serial_chardevs: frozenset[str]
    fdsets: Mapping[str, Option]
    fdset_users: Mapping[str, tuple[Option, ...]]
    qmp_fdsets: frozenset[str] | None = None

    def declared_fdset(self, path: Any) -> bool:
        """True when *path* is exactly ``/dev/fdset/N`` of a set an ``-add-fd`` declares."""
        m = _FDSET_PATH.fullmatch(path) if isinstance(path, str) else None
        return m is not None and m.group(1) in self.fdsets


def _serial_chardevs(cl: CommandLine) -> frozenset[str]:
    ids = {str(o.parsed.get("chardev")) for o in cl.find("-device")
           if o.parsed.kind in SERIAL_DEVICES and o.parsed.get("chardev")}
    ids |= {o.value.removeprefix("chardev:") for o in cl.find("-serial") if o.value and o.value.startswith("chardev:")}
    return frozenset(ids)


def context(cmdline: CommandLine | Iterable[str], qmp_fdsets: Iterable[str] | None = None) -> ArgvContext:
    """The :class:`ArgvContext` of a command line (words or parsed)."""
    cl = cmdline if isinstance(cmdline, CommandLine) else qargv.parse(cmdline)
    monitor = next((str(o.parsed.get("chardev")) for o in cl.find("-mon")
                    if o.parsed.get("mode") == "control" and o.parsed.get("chardev")), None)
    fdsets = {str(o.parsed.get("set", "")): o for o in cl.find("-add-fd")}
    users: dict[str, list[Option]] = {}
    for o in cl.options:
        if o.value is not None and o.name != "-add-fd":
            for s in dict.fromkeys(qargv.fdset_references(o.value)):
                users.setdefault(s, []).append(o)
    return ArgvContext(cl, monitor, _serial_chardevs(cl), fdsets, {s: tuple(u) for s, u in users.items()},
                       None if qmp_fdsets is None else frozenset(qmp_fdsets))


# ----------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """Where rewritten things point: the private *run_dir*, the QMP transport, the serial log."""

    run_dir: Path
    transport: str = "unix"
    serial_log: Path | None = None
    paused: bool = True
    allow_spawn: bool = False
    qmp_port: int = 0

    @property
    def master_key(self) -> Path:
        return self.run_dir / "master-key.aes"

    @property
    def qmp_address(self) -> str:
        if self.transport == "tcp":
            return f"tcp:127.0.0.1:{self.qmp_port}"
        return f"unix:{self.run_dir / 'qmp.sock'}"

    def qmp_chardev(self, cid: str) -> str:
        if self.transport == "tcp":
            return f"socket,id={cid},host=127.0.0.1,port={self.qmp_port},server=on,wait=off"
        return f"socket,id={cid},path={self.run_dir / 'qmp.sock'},server=on,wait=off"


@dataclass
class _Rewriting:
    """State of one :func:`rewrite_argv` run, shared by the rules' rewrites."""

    target: Target
    ctx: ArgvContext
    serial_used: Path | None = None
    acpi_off: bool = False
    have_qmp: bool = False

    def output_file(self, cid: str, serial: bool) -> Path:
        """The serial log for the first serial chardev (or the first output at all when nothing is a
        serial device), else ``<run dir>/<id>.log``."""
        if self.serial_used is None and (serial or not self.ctx.serial_chardevs):
            self.serial_used = self.target.serial_log or self.target.run_dir / "serial.log"
            return self.serial_used
        return self.target.run_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', cid)}.log"


# ----------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """One rewrite of the launcher: it applies to *option* values of kind *backends* (any when empty)
    for which *matches* holds; *rewrite* gives the replacement words (``[]``: dropped; None: kept as
    is). *whole*: the traced value never reaches QEMU, so the safety check need not judge it.
    *reason* is recorded with each rewrite (nothing recorded when empty), with *shows* as the
    replacement when the new words alone would not say it."""

    name: str
    option: str
    backends: tuple[str, ...]
    matches: Callable[[Option, ArgvContext], bool]
    rewrite: Callable[[Option, _Rewriting], list[str] | None]
    reason: str
    whole: bool = True
    shows: str = ""

    def applies(self, opt: Option, ctx: ArgvContext) -> bool:
        return opt.name == self.option and (not self.backends or opt.parsed.kind in self.backends) \
            and self.matches(opt, ctx)


def _is_monitor(o: Option, ctx: ArgvContext) -> bool:
    v = o.parsed
    return ctx.monitor is not None and v.get("id") == ctx.monitor and "fd" in v \
        and not any(k in v for k in ("path", "host", "port"))


def _new_monitor(o: Option, st: _Rewriting) -> list[str]:
    st.have_qmp = True
    return [o.word, st.target.qmp_chardev(str(o.parsed.get("id")))]


def _is_master_key(o: Option, ctx: ArgvContext) -> bool:
    f = o.parsed.get("file")
    return isinstance(f, str) and any(fnmatch.fnmatch(f, g) for g in MASTER_KEY_GLOBS)


def _logfile_ok(o: Option, ctx: ArgvContext) -> bool:
    lf = o.parsed.get("logfile")
    return lf is None or ctx.declared_fdset(lf)


def _is_serial_output(o: Option, ctx: ArgvContext) -> bool:
    v = o.parsed
    if v.get("id") not in ctx.serial_chardevs or not _logfile_ok(o, ctx):
        return False
    return v.kind != "file" or ctx.declared_fdset(v.get("path"))


def _is_logged_chardev(o: Option, ctx: ArgvContext) -> bool:
    v = o.parsed
    if v.get("id") in ctx.serial_chardevs:
        return False
    if v.kind == "file":
        return ctx.declared_fdset(v.get("path")) and _logfile_ok(o, ctx)
    return ctx.declared_fdset(v.get("logfile"))


def _to_file(serial: bool) -> Callable[[Option, _Rewriting], list[str]]:
    def rewrite(o: Option, st: _Rewriting) -> list[str]:
        cid = str(o.parsed.get("id", ""))
        return [o.word, f"file,id={cid},path={st.output_file(cid, serial)},append=on"]
    return rewrite


def _is_libvirt_fdset(o: Option, ctx: ArgvContext) -> bool:
    s = str(o.parsed.get("set", ""))
    users = ctx.fdset_users.get(s, ())
    if not all(_rewritten_whole(u, ctx) for u in users):
        return False
    return bool(users) or ctx.qmp_fdsets is None or s in ctx.qmp_fdsets


def _no_acpi(o: Option, st: _Rewriting) -> list[str]:
    st.acpi_off = True
    return []


def _sandbox(o: Option, st: _Rewriting) -> list[str] | None:
    if not st.target.allow_spawn:
        return None
    return [o.word, str(o.parsed.updated({"spawn": "allow"}))]


def _is_libvirt_incoming(o: Option, ctx: ArgvContext) -> bool:
    return bool(_LIBVIRT_INCOMING.match(o.value or ""))


def _any(o: Option, ctx: ArgvContext) -> bool:
    return True


def _drop(o: Option, st: _Rewriting) -> list[str]:
    return []


def _new_key(o: Option, st: _Rewriting) -> list[str]:
    return [o.word, str(o.parsed.updated({"file": str(st.target.master_key)}))]


#: What the launcher rewrites: the one table (the safety check reads it too).
RULES: tuple[Rule, ...] = (
    Rule("monitor", "-chardev", ("socket",), _is_monitor, _new_monitor,
         "libvirt's monitor fd → virtsave's own QMP socket"),
    Rule("master-key", "-object", ("secret",), _is_master_key, _new_key,
         "libvirt's per-domain master key → a fresh key of our own"),
    Rule("serial-output", "-chardev", (*_OUTPUT_CHARDEVS, "pipe", "file"), _is_serial_output, _to_file(True),
         "guest output → a file virtsave owns"),
    Rule("chardev-log", "-chardev", (*_OUTPUT_CHARDEVS, "file"), _is_logged_chardev, _to_file(False),
         "guest output → a file virtsave owns"),
    Rule("libvirt-fdset", "-add-fd", (), _is_libvirt_fdset, _drop,
         "libvirt's fdset: its users are rewritten to files we own"),
    Rule("incoming", "-incoming", (), _is_libvirt_incoming, _drop,
         "libvirt-only; the launcher sets its own"),
    Rule("pidfile", "-pidfile", (), _any, _drop, "libvirt-only; the launcher sets its own"),
    Rule("daemonize", "-daemonize", (), _any, _drop, "libvirt-only; the launcher sets its own"),
    Rule("freeze", "-S", (), _any, _drop, ""),
    Rule("no-acpi", "-no-acpi", (), _any, _no_acpi, "-no-acpi was removed in QEMU 9; same meaning",
         shows="-machine …,acpi=off"),
    Rule("sandbox-spawn", "-sandbox", (), lambda o, c: o.parsed.get("spawn") == "deny", _sandbox,
         "exec: migration needs QEMU to spawn a helper", whole=False),
)
_BY_OPTION: dict[str, tuple[Rule, ...]] = {r.option: tuple(x for x in RULES if x.option == r.option) for r in RULES}


def rule_for(opt: Option, ctx: ArgvContext) -> Rule | None:
    """The rule of :data:`RULES` that rewrites *opt*, or None (kept as traced)."""
    return next((r for r in _BY_OPTION.get(opt.name, ()) if r.applies(opt, ctx)), None)


def _rewritten_whole(opt: Option, ctx: ArgvContext) -> bool:
    rule = rule_for(opt, ctx)
    return rule is not None and rule.whole


# ----------------------------------------------------------------------------------------- rewrite


@dataclass
class Rewritten:
    """The result of :func:`rewrite_argv`: the argv to run, the rewrites made (option, original,
    replacement, reason), the names of the rules applied, and the serial log chosen (if any)."""

    argv: list[str]
    rewrites: list[dict[str, str]] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    serial_log: Path | None = None

    def note(self, opt: str, old: str | None, new: str | None, why: str) -> None:
        self.rewrites.append({"option": opt, "original": old or "", "replacement": new or "", "reason": why})


def _refuse_foreign(o: Option, ctx: ArgvContext) -> None:
    """Refuse an option kept as traced that passes an fd or uses a libvirt fdset."""
    if o.positional:
        raise LaunchError(f"unexpected argument {o.word!r} at position {o.index} of the QEMU command line")
    if o.value is None:
        return
    short = o.value[:80]
    if o.name == "-add-fd":
        s = str(o.parsed.get("set", ""))
        users = ", ".join(u.name for u in ctx.fdset_users.get(s, ())) or "nothing the launcher knows"
        raise LaunchError(f"command line declares fdset {s} (fd {o.parsed.get('fd')}) for {users}; "
                          "the launcher cannot rewrite it (refusing)")
    fds = qargv.fd_references(o.parsed)
    if fds:
        raise LaunchError(f"command line passes fd {fds[0][1]} in {o.name} {short}; "
                          "the launcher cannot rewrite it (refusing)")
    for s in qargv.fdset_references(o.value):
        if s in ctx.fdsets:
            raise LaunchError(f"command line uses libvirt's fdset {s} in {o.name} {short}; "
                              "the launcher cannot rewrite it (refusing)")


def _apply_rules(ctx: ArgvContext, st: _Rewriting, res: Rewritten) -> int | None:
    """Rewrite every option into ``res.argv``; the index of the ``-machine`` value there, if any."""
    machine: int | None = None
    for o in ctx.cmdline.options:
        rule = rule_for(o, ctx)
        new = rule.rewrite(o, st) if rule is not None else None
        if rule is None or new is None:
            _refuse_foreign(o, ctx)
            if o.name == "-machine":
                machine = len(res.argv) + 1
            res.argv += o.words()
            continue
        res.applied.append(rule.name)
        if rule.reason:
            res.note(o.name, o.value, rule.shows or " ".join(new[1:]), rule.reason)
        res.argv += new
    return machine


def rewrite_argv(argv: list[str], target: Target, *, binary: str | None = None, incoming: str | None = None,
                 add_fds: Iterable[tuple[int, int, str]] = (), qmp_fdsets: Iterable[str] | None = None) -> Rewritten:
    """*argv* rewritten by :data:`RULES` for *target* — a pure function: nothing is created or started.

    *binary* replaces ``argv[0]``; *incoming*: our ``-incoming`` (``defer`` for restores) or None;
    *add_fds*: our ``-add-fd`` (set, fd, opaque) entries; *qmp_fdsets*: see :class:`ArgvContext`.
    Raises :class:`LaunchError` for an fd or libvirt fdset no rule rewrites.
    """
    cl = qargv.parse(argv)
    if cl.binary is None:
        raise LaunchError("QEMU command line does not start with a binary")
    ctx = context(cl, qmp_fdsets)
    st = _Rewriting(target, ctx)
    res = Rewritten([binary or cl.binary])
    machine = _apply_rules(ctx, st, res)
    out = res.argv
    if st.acpi_off:
        if machine is not None:
            out[machine] = str(qargv.parse_value(out[machine], "-machine").updated({"acpi": "off"}))
        else:
            out += ["-machine", "acpi=off"]
    if not st.have_qmp:
        out += ["-chardev", target.qmp_chardev("virtsave-qmp"), "-mon", "chardev=virtsave-qmp,mode=control"]
        res.note("-mon", None, "virtsave-qmp", "QMP monitor for virtsave")
    if target.paused:
        out.insert(1, "-S")
    for fdset, fd, opaque in add_fds:
        out += ["-add-fd", f"set={fdset},fd={fd},opaque={opaque}"]
    if incoming:
        out += ["-incoming", incoming]
    res.serial_log = st.serial_used
    return res


# ----------------------------------------------------------------------------------------- plan


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


def _guest_files(opt: Option) -> list[str]:
    """Host files the guest needs, named by *opt*."""
    if opt.name in ("-kernel", "-initrd", "-bios") and opt.value is not None:
        return [opt.value]
    v = opt.parsed
    f = v.get("file")
    if opt.name == "-drive" and isinstance(f, str) and not f.startswith(("/dev/fdset/", "nbd:", "iscsi:", "rbd:")):
        return [f]
    if opt.name == "-blockdev" and v.syntax == "json" and v.kind in ("file", "host_device") \
            and isinstance(v.get("filename"), str):
        return [str(v.get("filename"))]
    return []


_QEMU_NAME = re.compile(r"^(qemu-system-[A-Za-z0-9_]+|qemu-kvm)$")


def is_qemu_binary(path: str) -> bool:
    """True when *path* names a QEMU system emulator (``qemu-system-*``, ``qemu-kvm``): the
    only programs a (possibly untrusted) command line may make virtsave execute.

    >>> is_qemu_binary("/usr/bin/qemu-system-x86_64"), is_qemu_binary("/bin/sh")
    (True, False)
    """
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


def _resolve_binary(exe: str) -> str:
    if not is_qemu_binary(exe):
        raise LaunchError(f"refusing to execute {exe}: not a QEMU system emulator (qemu-system-*)")
    resolved = exe if "/" in exe else shutil.which(exe)
    if not resolved or not os.path.isfile(resolved) or not os.access(resolved, os.X_OK):
        raise LaunchError(f"QEMU binary not found or not executable: {exe}")
    return resolved


def _write_key(path: Path) -> None:
    fd = open_private(path)
    try:
        os.write(fd, secrets.token_bytes(32))
    finally:
        os.close(fd)


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
    """:func:`rewrite_argv` plus what it needs on the host: the run dir, the master key file, the
    checks that the binary and the guest files exist.

    *incoming*: ``-incoming`` value (``defer`` for restores) or None. *add_fds*: extra
    ``-add-fd`` (set, fd, opaque) entries, whose fds are inherited. *allow_spawn*: let QEMU
    run helpers (needed only for ``exec:`` migration URIs). Nothing is started here.
    """
    if not argv:
        raise LaunchError("empty QEMU command line (trace has no domain argv)")
    resolved = _resolve_binary(binary or argv[0])
    own_dir = run_dir is None
    rdir = run_dir or make_run_dir()
    target = Target(rdir, transport, Path(serial_log) if serial_log else None, paused, allow_spawn,
                    free_tcp_port() if transport == "tcp" else 0)
    res = rewrite_argv(argv, target, binary=resolved, incoming=incoming, add_fds=add_fds or ())
    for o in qargv.parse(res.argv).options:
        for f in _guest_files(o):
            if not os.path.exists(f):
                raise LaunchError(f"guest file missing: {f} (from {o.name})")
    if "master-key" in res.applied:
        _write_key(target.master_key)
    fds = tuple(sorted({*pass_fds, *(fd for _, fd, _ in add_fds or ())}))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(rdir)}
    return LaunchPlan(res.argv, rdir, target.qmp_address, res.serial_log, fds, res.rewrites, env, own_dir)

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

    def connect(self, timeout: float = 30.0, phase: tr.Phase | None = None) -> QMPSession:
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


