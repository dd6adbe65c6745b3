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
                   fdset, feeding a serial/console device → its output to the serial log: through
                   the same fdset when libvirt logs it through one (``logfile=``/``path=/dev/fdset/N``;
                   a ``pty`` stays a ``pty``, ``vc``/``stdio``/``pipe`` become ``null``), else a
                   file chardev
``chardev-log``    any other ``pty``/``vc``/``stdio``/``file`` chardev logged through libvirt's
                   fdset → the same, with a file of its own in the run dir
``libvirt-fdset``  ``-add-fd`` whose set only rewritten options (or the traced restore) use → the
                   same set and ``opaque`` holding our log file's fd (libvirt's way: ``query-fdsets``
                   answers alike), or dropped where no log file goes into it
``incoming``       ``-incoming defer|fd:N|stdio|file:/dev/fdset/N`` → dropped (ours is added)
``pidfile``        ``-pidfile`` → dropped (the launcher owns the process)
``daemonize``      ``-daemonize`` → dropped (QEMU stays our child)
``freeze``         ``-S`` → dropped (ours is added when starting paused)
``no-acpi``        ``-no-acpi`` (gone in QEMU ≥ 9) → ``-machine …,acpi=off``
``sandbox-spawn``  ``-sandbox …,spawn=deny`` → ``spawn=allow`` when an ``exec:`` helper is needed
=================  ================================================================================

A replay (:attr:`Target.isolated`, the default) runs a throwaway copy of a domain whose original may
still run, or hold a managed-save image: it must not touch what the original owns. These rules do
that (for a real restore, ``isolated=False``, they rewrite only inherited fds):

==================  ===============================================================================
``disk-overlay``    a writable top ``-blockdev`` node (what a device or ``pflash1=`` uses) → a qcow2
                    overlay of that name in a private directory over the node renamed ``vs-ro-N``
                    (:mod:`virtsave.qemu.overlay`)
``disk-read-only``  every other node of an original image → ``read-only``, ``force-share``
``legacy-drive``    ``-drive``/``-hda``/``-pflash``… on a host file → kept, plus ``-snapshot``
``nic-tap``         a NIC's tap/bridge netdev (libvirt's ``fd=N``) → a fresh tap in no bridge
``nic-user``        a NIC's ``user`` netdev → ``restrict=on``, no forwards
``nic-socket``      a NIC's stream/dgram/socket/vde/l2tpv3 netdev → a private listening socket
``channel-socket``  a socket chardev a guest device reads (agent …) → a private socket
``vnc``/``spice``   the display → a private ``unix:`` socket
==================  ===============================================================================

What no replay can run without sharing it with the original (host PCI/USB devices, vhost-user,
virtiofs, vDPA, vsock, TPMs, shared memory, network block devices …) is in :data:`REFUSALS`: a
replay raises :class:`LaunchError` naming the device before anything starts.

Anything no rule matches stays as traced, except that an inherited ``fd=N`` or a libvirt fdset in
it is refused (:class:`LaunchError`): an fd we do not know is not ours to give. The safety check
(:mod:`virtsave.qemu.safety`) accepts exactly what a rule rewrites whole (:func:`rule_for`), so the
two cannot drift; what a rule rewrites in part (a disk keeps its path) it still judges.
:func:`rewrite_argv` is the pure rewrite; :func:`plan_launch` adds the run dir, the key file, the
disk overlays and the checks that the binary and guest files (kernel, initrd, disks) exist. Every
rewrite is listed in :attr:`LaunchPlan.rewrites`. The log files a kept fdset carries are opened
by :func:`plan_launch` (0600 when new, appended to) and given to QEMU at exec, as libvirt gives it
virtlogd's pipes; :func:`rewrite_argv` names them (:attr:`Rewritten.log_sets`) and takes their fds
(:attr:`Target.log_fds`).

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
import dataclasses
import fnmatch
import os
import re
import secrets
import select
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
from virtsave.qemu import overlay
from virtsave.qemu.qmp import QMPSession
from virtsave.trace import argv as qargv
from virtsave.trace import model as tr
from virtsave.trace.argv import BlockGraph, CommandLine, Option, OptionValue

__all__ = [
    "LAUNCHED", "MASTER_KEY_GLOBS", "REFUSALS", "RULES", "RUN_BASE", "SERIAL_DEVICES", "ArgvContext", "LaunchPlan",
    "QemuProcess", "Refusal", "Rewritten", "Rule", "Target", "binary_version", "context", "free_tcp_port",
    "is_qemu_binary", "make_run_dir", "nic_backend", "plan_launch", "refusal_for", "rewrite_argv", "rule_for",
    "start", "stop_all",
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
    #: The ``-blockdev`` graph; its writable tops on local files (overlaid in a replay) and the nodes below them.
    graph: BlockGraph = field(default_factory=lambda: BlockGraph({}, {}))
    writable_tops: frozenset[str] = frozenset()
    under_writable: frozenset[str] = frozenset()
    #: Chardevs a guest device reads (``-device …,chardev=``, ``-serial chardev:``), netdevs a NIC uses.
    device_chardevs: frozenset[str] = frozenset()
    nic_netdevs: frozenset[str] = frozenset()

    def declared_fdset(self, path: Any) -> bool:
        """True when *path* is exactly ``/dev/fdset/N`` of a set an ``-add-fd`` declares."""
        m = _FDSET_PATH.fullmatch(path) if isinstance(path, str) else None
        return m is not None and m.group(1) in self.fdsets


def _serial_chardevs(cl: CommandLine) -> frozenset[str]:
    ids = {str(o.parsed.get("chardev")) for o in cl.find("-device")
           if o.parsed.kind in SERIAL_DEVICES and o.parsed.get("chardev")}
    ids |= {o.value.removeprefix("chardev:") for o in cl.find("-serial") if o.value and o.value.startswith("chardev:")}
    return frozenset(ids)


def _device_props(cl: CommandLine, prop: str) -> frozenset[str]:
    return frozenset(str(o.parsed.get(prop)) for o in cl.find("-device") if isinstance(o.parsed.get(prop), str))


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
    graph = cl.block_graph()
    tops = frozenset(t for t in graph.tops() if not graph.read_only(t) and overlay.local_chain(graph, t))
    below = frozenset(n for t in tops for n in graph.below(t))
    serial = _serial_chardevs(cl)
    chardevs = _device_props(cl, "chardev") | serial
    return ArgvContext(cl, monitor, serial, fdsets, {s: tuple(u) for s, u in users.items()},
                       None if qmp_fdsets is None else frozenset(qmp_fdsets), graph, tops, below - tops,
                       chardevs, _device_props(cl, "netdev"))


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
    #: A throwaway copy of a domain (a replay): it must not touch what the original owns — disks go
    #: through overlays, NICs, channels and displays become private. False for a real restore (the
    #: restored QEMU *is* the guest): only what cannot work outside libvirt (inherited fds) is rewritten.
    isolated: bool = True
    #: The NIC backend replacing the host's network: ``tap`` (a fresh tap device in no bridge, link
    #: down: same virtio offloads as libvirt's tap) or ``user`` (``restrict=on``; when no tap can be made).
    nic: str = "tap"
    #: Where disk overlays go (default: the run dir); the phases of one replay share it.
    overlay_dir: Path | None = None

    @property
    def overlays(self) -> Path:
        return self.overlay_dir or self.run_dir

    def tap_name(self, n: int) -> str:
        """A host interface name for the *n*-th NIC (≤ 15 characters, unique per run dir)."""
        return f"vs{re.sub(r'[^a-z0-9]', '', self.run_dir.name.lower())[-8:]}{n}"

    def socket_path(self, kind: str, ident: str) -> Path:
        return self.run_dir / f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', ident)[:40]}.sock"
    #: fdset id → the fd of the log file that set carries (libvirt's log fdsets kept, ours inside).
    log_fds: Mapping[str, int] = field(default_factory=dict)

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
    overlays: list[overlay.Overlay] = field(default_factory=list)
    nics: int = 0
    legacy_snapshot: bool = False
    log_sets: dict[str, Path] = field(default_factory=dict)

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
    is). *whole*: in a replay the traced value never reaches QEMU, so the safety check need not judge
    it. *reason* is recorded with each rewrite (nothing recorded when empty), with *shows* as the
    replacement when the new words alone would not say it. *also*: more option names it looks at."""

    name: str
    option: str
    backends: tuple[str, ...]
    matches: Callable[[Option, ArgvContext], bool]
    rewrite: Callable[[Option, _Rewriting], list[str] | None]
    reason: str
    whole: bool = True
    shows: str = ""
    also: tuple[str, ...] = ()

    def applies_to(self, name: str) -> bool:
        """The rule looks at options named *name*."""
        return name == self.option or name in self.also

    def applies(self, opt: Option, ctx: ArgvContext) -> bool:
        return self.applies_to(opt.name) and (not self.backends or opt.parsed.kind in self.backends) \
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


def _log_fdset(o: Option, ctx: ArgvContext) -> str | None:
    """The declared fdset the chardev *o* writes its log (or, a ``file`` chardev, its output) through."""
    for key in ("logfile", "path") if o.parsed.kind == "file" else ("logfile",):
        m = _FDSET_PATH.fullmatch(str(o.parsed.get(key, "")))
        if m and ctx.declared_fdset(m.group(0)):
            return m.group(1)
    return None


def _through_fdset(o: Option, fdset: str) -> str:
    """*o* writing through libvirt's fdset *fdset* as traced, nothing else of the traced value kept
    (a ``pty`` stays a ``pty``; a backend reaching host files or the terminal becomes ``null``). Always
    appending: QEMU truncates a file it opens through an fdset otherwise, and our log spans phases."""
    v = o.parsed
    cid = str(v.get("id", ""))
    if v.kind == "file" and str(v.get("path", "")) == f"/dev/fdset/{fdset}":
        return f"file,id={cid},path=/dev/fdset/{fdset},append=on"
    kind = "pty" if v.kind == "pty" else "null"
    return f"{kind},id={cid},logfile=/dev/fdset/{fdset},logappend=on"


def _to_file(serial: bool) -> Callable[[Option, _Rewriting], list[str]]:
    def rewrite(o: Option, st: _Rewriting) -> list[str]:
        cid = str(o.parsed.get("id", ""))
        path = st.output_file(cid, serial)
        fdset = _log_fdset(o, st.ctx)
        if fdset is not None:
            st.log_sets.setdefault(fdset, path)
            if fdset in st.target.log_fds:
                return [o.word, _through_fdset(o, fdset)]
        return [o.word, f"file,id={cid},path={path},append=on"]
    return rewrite


def _is_libvirt_fdset(o: Option, ctx: ArgvContext) -> bool:
    s = str(o.parsed.get("set", ""))
    users = ctx.fdset_users.get(s, ())
    if not all(_rewritten_whole(u, ctx) for u in users):
        return False
    return bool(users) or ctx.qmp_fdsets is None or s in ctx.qmp_fdsets


def _keep_log_fdset(o: Option, st: _Rewriting) -> list[str]:
    """libvirt's fdset as traced (set, ``opaque``) with our log file's fd in it; dropped without one."""
    s = str(o.parsed.get("set", ""))
    fd = st.target.log_fds.get(s)
    if fd is None:
        return []
    opaque = o.parsed.get("opaque")
    return [o.word, f"set={s},fd={fd}" + (f",opaque={opaque}" if opaque is not None else "")]


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


# -- disks (a replay never opens an original image for writing) ------------------------------------


def _is_writable_top(o: Option, ctx: ArgvContext) -> bool:
    return o.parsed.get("node-name") in ctx.writable_tops


def _to_overlay(o: Option, st: _Rewriting) -> list[str] | None:
    if not st.target.isolated:
        return None
    node = str(o.parsed.get("node-name"))
    ov = overlay.Overlay(node, len(st.overlays) + 1, st.target.overlays / overlay.file_name(node),
                         overlay.size_query(st.ctx.graph, node))
    st.overlays.append(ov)
    return [w for v in overlay.overlay_words(o.parsed, ov) for w in (o.word, v)]


def _is_original_node(o: Option, ctx: ArgvContext) -> bool:
    node = o.parsed.get("node-name")
    if not isinstance(node, str) or node in ctx.writable_tops or node not in ctx.graph.nodes:
        return False
    if node in ctx.under_writable:
        return True
    return ctx.graph.protocol(node) and not ctx.graph.read_only(node) and overlay.local_chain(ctx.graph, node)


def _read_only_node(o: Option, st: _Rewriting) -> list[str] | None:
    if not st.target.isolated:
        return None
    return [o.word, overlay.read_only(o.parsed).text]


_LEGACY_DISKS = ("-drive", "-hda", "-hdb", "-hdc", "-hdd", "-pflash", "-mtdblock", "-sd", "-fda", "-fdb")


def _is_legacy_disk(o: Option, ctx: ArgvContext) -> bool:
    f = o.parsed.get("file") if o.name == "-drive" else o.value
    return isinstance(f, str) and f.startswith("/") and not f.startswith("/dev/fdset/")


def _legacy_snapshot(o: Option, st: _Rewriting) -> list[str] | None:
    if not st.target.isolated:
        return None
    st.legacy_snapshot = True
    return o.words()


# -- NICs (no host network) ----------------------------------------------------------------------


def _is_nic(o: Option, ctx: ArgvContext) -> bool:
    return o.parsed.get("id") in ctx.nic_netdevs


def _json_or_keyval(v: OptionValue, props: dict[str, Any]) -> str:
    if v.syntax == "json":
        return qargv.format_json(props)
    def word(x: Any) -> str:
        return ("on" if x else "off") if isinstance(x, bool) else str(x)
    return qargv.join_keyval([(None, word(props.pop("type")))] + [(k, word(x)) for k, x in props.items()])


def _truthy(x: Any) -> bool:
    return x is True or x in ("on", "true", "yes", "")


def _private_tap(o: Option, st: _Rewriting) -> list[str] | None:
    v = o.parsed
    if not st.target.isolated and not qargv.fd_references(v):
        return None
    st.nics += 1
    ident = str(v.get("id"))
    if st.target.nic == "user":
        return [o.word, _json_or_keyval(v, {"type": "user", "id": ident, "restrict": True})]
    props: dict[str, Any] = {"type": "tap", "id": ident, "ifname": st.target.tap_name(st.nics),
                             "script": "no", "downscript": "no"}
    fds = str(v.get("fds") or "")
    if fds:
        props["queues"] = len(fds.split(":")) if v.syntax == "keyval" else str(len(fds.split(":")))
    if _truthy(v.get("vhost")) and "vhost" in v:
        props["vhost"] = True
    if "vnet_hdr" in v:
        props["vnet_hdr"] = _truthy(v.get("vnet_hdr"))
    if v.syntax == "json" and "queues" in props:
        props["queues"] = int(props["queues"])
    return [o.word, _json_or_keyval(v, props)]


def _restricted_user(o: Option, st: _Rewriting) -> list[str] | None:
    if not st.target.isolated:
        return None
    drop = {k: None for k in ("hostfwd", "guestfwd", "smb", "smbserver", "tftp", "bootfile", "tftp-server-name")}
    return [o.word, o.parsed.updated({**drop, "restrict": True if o.parsed.syntax == "json" else "on"}).text]


def _private_stream(o: Option, st: _Rewriting) -> list[str] | None:
    v = o.parsed
    if not st.target.isolated and not qargv.fd_references(v):
        return None
    path = str(st.target.socket_path("net", str(v.get("id"))))
    if v.syntax == "json":
        return [o.word, qargv.format_json({"type": "stream", "id": v.get("id"), "server": True,
                                           "addr": {"type": "unix", "path": path}})]
    return [o.word, qargv.join_keyval([(None, "stream"), ("id", str(v.get("id"))), ("server", "on"),
                                       ("addr.type", "unix"), ("addr.path", path)])]


# -- chardevs and displays -------------------------------------------------------------------------


def _is_device_socket(o: Option, ctx: ArgvContext) -> bool:
    cid = o.parsed.get("id")
    return cid != ctx.monitor and cid in ctx.device_chardevs


def _private_socket(o: Option, st: _Rewriting) -> list[str] | None:
    v = o.parsed
    if not st.target.isolated and not qargv.fd_references(v):
        return None
    cid = str(v.get("id"))
    return [o.word, f"socket,id={cid},path={st.target.socket_path('chr', cid)},server=on,wait=off"]


#: ``-vnc``/``-spice`` keys kept (what the display looks like, not where it listens or whose keys it reads).
_VNC_KEEP = ("id", "display", "head", "audiodev", "password", "password-secret", "share", "lossy", "non-adaptive",
             "key-delay-ms", "power-control")
_SPICE_KEEP = ("disable-ticketing", "password-secret", "image-compression", "jpeg-wan-compression",
               "zlib-glz-wan-compression", "streaming-video", "agent-mouse", "playback-compression",
               "seamless-migration", "disable-copy-paste", "disable-agent-file-xfer", "gl", "rendernode",
               "video-codecs")


def _private_vnc(o: Option, st: _Rewriting) -> list[str] | None:
    if not st.target.isolated:
        return None
    v = o.parsed
    where = "none" if v.get("vnc") == "none" else f"unix:{st.target.socket_path('vnc', 'display')}"
    return [o.word, qargv.join_keyval([(None, where)] + [(k, x) for k, x in v.parts if k in _VNC_KEEP])]


def _private_spice(o: Option, st: _Rewriting) -> list[str] | None:
    if not st.target.isolated:
        return None
    v = o.parsed
    kept = [(k, x) for k, x in v.parts if k in _SPICE_KEEP]
    where = [("unix", "on"), ("addr", str(st.target.socket_path("spice", "display")))]
    return [o.word, qargv.join_keyval(where + kept)]


#: What the launcher rewrites: the one table (the safety check reads it too).
RULES: tuple[Rule, ...] = (
    Rule("monitor", "-chardev", ("socket",), _is_monitor, _new_monitor,
         "libvirt's monitor fd → virtsave's own QMP socket"),
    Rule("master-key", "-object", ("secret",), _is_master_key, _new_key,
         "libvirt's per-domain master key → a fresh key of our own"),
    Rule("serial-output", "-chardev", (*_OUTPUT_CHARDEVS, "pipe", "file"), _is_serial_output, _to_file(True),
         "guest output → a file virtsave owns (through libvirt's log fdset where it has one)"),
    Rule("chardev-log", "-chardev", (*_OUTPUT_CHARDEVS, "file"), _is_logged_chardev, _to_file(False),
         "guest output → a file virtsave owns (through libvirt's log fdset where it has one)"),
    Rule("libvirt-fdset", "-add-fd", (), _is_libvirt_fdset, _keep_log_fdset,
         "libvirt's fdset: its users are rewritten to files we own (a log's set keeps its id and opaque, "
         "with our file's fd)"),
    Rule("incoming", "-incoming", (), _is_libvirt_incoming, _drop,
         "libvirt-only; the launcher sets its own"),
    Rule("pidfile", "-pidfile", (), _any, _drop, "libvirt-only; the launcher sets its own"),
    Rule("daemonize", "-daemonize", (), _any, _drop, "libvirt-only; the launcher sets its own"),
    Rule("freeze", "-S", (), _any, _drop, ""),
    Rule("no-acpi", "-no-acpi", (), _any, _no_acpi, "-no-acpi was removed in QEMU 9; same meaning",
         shows="-machine …,acpi=off"),
    Rule("sandbox-spawn", "-sandbox", (), lambda o, c: o.parsed.get("spawn") == "deny", _sandbox,
         "exec: migration needs QEMU to spawn a helper", whole=False),
    Rule("disk-overlay", "-blockdev", (), _is_writable_top, _to_overlay,
         "writable disk/NVRAM → a throwaway qcow2 overlay in the run dir over the original, opened read-only",
         whole=False),
    Rule("disk-read-only", "-blockdev", (), _is_original_node, _read_only_node,
         "an original image: read-only, sharing the lock of a running original", whole=False),
    Rule("legacy-drive", "-drive", (), _is_legacy_disk, _legacy_snapshot,
         "legacy drive: QEMU's own temporary overlays (-snapshot, in the run dir)", whole=False,
         shows="as traced, plus -snapshot", also=_LEGACY_DISKS[1:]),
    Rule("nic-tap", "-netdev", ("tap", "bridge"), _is_nic, _private_tap,
         "host network → a tap device of our own in no bridge (same NIC model, MAC and offloads)"),
    Rule("nic-user", "-netdev", ("user",), _is_nic, _restricted_user,
         "user networking → restrict=on, no forwards (no host connectivity)"),
    Rule("nic-socket", "-netdev", ("stream", "dgram", "socket", "vde", "l2tpv3"), _is_nic, _private_stream,
         "host socket network → a private listening socket nobody connects to"),
    Rule("channel-socket", "-chardev", ("socket",), _is_device_socket, _private_socket,
         "guest channel socket (agent …) → a private socket in the run dir"),
    Rule("vnc", "-vnc", (), _any, _private_vnc, "VNC → a private socket in the run dir (no TCP port)"),
    Rule("spice", "-spice", (), _any, _private_spice, "SPICE → a private socket in the run dir (no TCP port)"),
)
_BY_OPTION: dict[str, tuple[Rule, ...]] = {
    name: tuple(r for r in RULES if r.applies_to(name)) for name in {n for r in RULES for n in (r.option, *r.also)}}


# ----------------------------------------------------------------------------------------- refusals


@dataclass(frozen=True)
class Refusal:
    """A device no replay can run without sharing what belongs to the original domain: *option* values
    whose kind matches one of *kinds* (shell patterns; any kind when empty) and *matches*."""

    name: str
    option: str
    kinds: tuple[str, ...]
    reason: str
    matches: Callable[[Option, ArgvContext], bool] = _any

    def applies(self, opt: Option, ctx: ArgvContext) -> bool:
        kind = opt.parsed.kind
        return opt.name == self.option and (not self.kinds or any(fnmatch.fnmatchcase(kind, k) for k in self.kinds)) \
            and self.matches(opt, ctx)

    @staticmethod
    def describe(opt: Option) -> str:
        """``-device vfio-pci (hostdev0)``: the option, its kind and its id, for one line."""
        v = opt.parsed
        ident = v.get("id") or v.get("node-name")
        return f"{opt.name} {v.kind or (opt.value or '')[:40]}" + (f" ({ident})" if ident else "")


def _shared(o: Option, ctx: ArgvContext) -> bool:
    return _truthy(o.parsed.get("share", "off"))


def _network_drive(o: Option, ctx: ArgvContext) -> bool:
    v = o.parsed
    f = v.get("file")
    drivers = {str(v.get("driver", "")), str(v.get("file.driver", ""))}
    return (isinstance(f, str) and f.split(":", 1)[0] in ("nbd", "iscsi", "rbd", "gluster", "ssh", "http", "https",
                                                          "ftp", "ftps", "nfs")) or bool(drivers & overlay.NETWORK)


_HOST_OWNED = "belongs to the original domain"
#: What a replay refuses, first match wins: one line naming the device, nothing started.
REFUSALS: tuple[Refusal, ...] = (
    Refusal("host-pci", "-device", ("vfio-*",), f"host PCI/mediated device passthrough: the device {_HOST_OWNED}"),
    Refusal("host-usb", "-device", ("usb-host",), f"host USB device passthrough: the device {_HOST_OWNED}"),
    Refusal("virtiofs", "-device", ("vhost-user-fs*",),
            "virtiofs: a virtiofsd process of the original domain shares a host directory"),
    Refusal("vhost-user", "-device", ("vhost-user-*",),
            f"vhost-user: the device runs in a host process that {_HOST_OWNED}"),
    Refusal("vhost-user", "-netdev", ("vhost-user",), f"vhost-user: the NIC runs in a host process that {_HOST_OWNED}"),
    Refusal("vhost-vdpa", "-netdev", ("vhost-vdpa",), f"vDPA: a host device that {_HOST_OWNED}"),
    Refusal("vhost-vdpa", "-device", ("vhost-vdpa-*",), f"vDPA: a host device that {_HOST_OWNED}"),
    Refusal("host-scsi", "-device", ("scsi-generic", "scsi-block", "vhost-scsi*"),
            f"host SCSI device or kernel SCSI target: {_HOST_OWNED}"),
    Refusal("vsock", "-device", ("vhost-vsock*",),
            "vsock: the guest's context id belongs to the original domain and reaches host processes"),
    Refusal("tpm", "-tpmdev", (), "TPM: its state lives in the original domain's swtpm process or the host's TPM"),
    Refusal("shared-memory", "-object", ("memory-backend-file",),
            "shared memory backend: the file is mapped shared with the original QEMU or other processes",
            _shared),
    Refusal("shared-memory", "-device", ("ivshmem*",), "inter-VM shared memory: shared with the original and peers"),
    Refusal("network-block", "-blockdev", tuple(sorted(overlay.NETWORK)),
            "network block device: a remote server the original domain uses"),
    Refusal("network-block", "-drive", (), "network block device: a remote server the original domain uses",
            _network_drive),
    Refusal("host-nic", "-netdev", ("af-xdp", "netmap"), f"a host network interface that {_HOST_OWNED}"),
    Refusal("dbus", "-display", ("dbus",), "D-Bus display: talks to the original domain's D-Bus daemon"),
    Refusal("dbus", "-object", ("dbus-vmstate",),
            "D-Bus vmstate: helper processes of the original domain carry part of its state"),
)


def refusal_for(opt: Option, ctx: ArgvContext) -> Refusal | None:
    """The :data:`REFUSALS` entry *opt* falls under, or None."""
    return next((r for r in REFUSALS if r.applies(opt, ctx)), None)


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
    overlays: list[overlay.Overlay] = field(default_factory=list)
    #: fdset id → the log file that set carries (its fd comes from :attr:`Target.log_fds`).
    log_sets: dict[str, Path] = field(default_factory=dict)

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
        if not rule.whole:
            _refuse_foreign(o, ctx)     # the traced value still reaches QEMU
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
    if target.isolated:
        for o in cl.options:
            refusal = refusal_for(o, ctx)
            if refusal is not None:
                raise LaunchError(f"cannot replay {refusal.describe(o)} (argv[{o.index}]): {refusal.reason}")
    st = _Rewriting(target, ctx)
    res = Rewritten([binary or cl.binary])
    machine = _apply_rules(ctx, st, res)
    out = res.argv
    if st.legacy_snapshot and not cl.find("-snapshot"):
        out.append("-snapshot")
    res.overlays = st.overlays
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
    res.log_sets = st.log_sets
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
    #: Disk overlays outside the run dir (:func:`plan_launch`'s *overlay_dir*), removed by
    #: :meth:`QemuProcess.stop` only when *owns_overlays* (the last phase of a replay).
    overlay_dir: Path | None = None
    owns_overlays: bool = False
    #: fds opened for this launch only (log files in kept fdsets): closed once QEMU has them.
    own_fds: tuple[int, ...] = ()

    def close_fds(self) -> None:
        """Close the fds opened for this launch (after the exec, or when it never happens)."""
        _close_all(self.own_fds)
        self.own_fds = ()


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


def nic_backend() -> str:
    """``tap`` when this process can create tap devices (root and ``/dev/net/tun``), else ``user``."""
    return "tap" if os.geteuid() == 0 and os.path.exists("/dev/net/tun") else "user"


def _plan_launch(argv: list[str], *, incoming: str | None = None, transport: str = "unix",
                 paused: bool = True, serial_log: str | os.PathLike[str] | None = None,
                 add_fds: list[tuple[int, int, str]] | None = None, pass_fds: tuple[int, ...] = (),
                 allow_spawn: bool = False, binary: str | None = None,
                 run_dir: Path | None = None, isolated: bool = True,
                 overlay_dir: str | os.PathLike[str] | None = None) -> LaunchPlan:
    """:func:`rewrite_argv` plus what it needs on the host: the run dir, the master key file, the
    disk overlays, the checks that the binary and the guest files exist.

    *incoming*: ``-incoming`` value (``defer`` for restores) or None. *add_fds*: extra
    ``-add-fd`` (set, fd, opaque) entries, whose fds are inherited. *allow_spawn*: let QEMU
    run helpers (needed only for ``exec:`` migration URIs). *isolated*: see :class:`Target` (False
    for a real restore). *overlay_dir*: where disk overlays go, reused when there (default: the run
    dir). Nothing is started here.
    """
    if not argv:
        raise LaunchError("empty QEMU command line (trace has no domain argv)")
    resolved = _resolve_binary(binary or argv[0])
    own_dir = run_dir is None
    rdir = run_dir or make_run_dir()
    odir = Path(overlay_dir) if overlay_dir is not None else None
    target = Target(rdir, transport, Path(serial_log) if serial_log else None, paused, allow_spawn,
                    free_tcp_port() if transport == "tcp" else 0, isolated, nic_backend(), odir)
    res = rewrite_argv(argv, target, binary=resolved, incoming=incoming, add_fds=add_fds or ())
    ours = {str(ov.path) for ov in res.overlays}
    for o in qargv.parse(res.argv).options:
        for f in _guest_files(o):
            if f not in ours and not os.path.exists(f):
                raise LaunchError(f"guest file missing: {f} (from {o.name})")
    if res.overlays:
        target.overlays.mkdir(mode=0o700, parents=True, exist_ok=True)
        overlay.create(res.overlays, resolved)
    log_fds = _open_logs(res.log_sets)
    try:
        if log_fds:  # the same rewrite, now with the fds the kept fdsets carry
            target = dataclasses.replace(target, log_fds=log_fds)
            res = rewrite_argv(argv, target, binary=resolved, incoming=incoming, add_fds=add_fds or ())
        if "master-key" in res.applied:
            _write_key(target.master_key)
    except BaseException:
        _close_all(log_fds.values())
        raise
    fds = tuple(sorted({*pass_fds, *(fd for _, fd, _ in add_fds or ()), *log_fds.values()}))
    # TMPDIR: where -snapshot puts QEMU's temporary overlays of legacy drives.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(rdir), "TMPDIR": str(rdir)}
    return LaunchPlan(res.argv, rdir, target.qmp_address, res.serial_log, fds, res.rewrites, env, own_dir, odir,
                      own_fds=tuple(log_fds.values()))


def _open_logs(log_sets: Mapping[str, Path]) -> dict[str, int]:
    """Open each log file a kept fdset carries (write-only and appending, as QEMU wants it for a log;
    0600 when created); fdset id → fd."""
    fds: dict[str, int] = {}
    try:
        for s, path in log_sets.items():
            try:
                fds[s] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise LaunchError(f"cannot open log file {path}: {exc.strerror}") from None
    except BaseException:
        _close_all(fds.values())
        raise
    return fds


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)

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

    def terminate(self, timeout: float = 15.0) -> int | None:
        """End QEMU the way libvirt does (``qemuProcessKill``): SIGTERM — QEMU reports ``SHUTDOWN``
        (``host-signal``) and exits — then SIGKILL if it is still there after *timeout* seconds. The
        exit is waited for on a pidfd, so it is seen the moment it happens (libvirt polls every
        200 ms). Returns the exit status (negative: the signal that ended it)."""
        return self.wait_exit(timeout, signal.SIGTERM)

    def wait_exit(self, timeout: float = 15.0, sig: int | None = None) -> int | None:
        """Send *sig* (if any), wait up to *timeout* seconds for the exit on a pidfd (woken the moment
        it happens, no polling), then SIGKILL; reap it and return its status."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return self.wait(10)
        try:
            if sig is not None:
                signal.pidfd_send_signal(pidfd, sig)
            if not select.select([pidfd], [], [], timeout)[0]:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass  # exited meanwhile
        finally:
            os.close(pidfd)
        return self.wait(10)

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
        if self.plan.owns_overlays and self.plan.overlay_dir is not None:
            shutil.rmtree(self.plan.overlay_dir, ignore_errors=True)

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
        plan.close_fds()
    qp = QemuProcess(plan, proc, err_path)
    LAUNCHED.append(qp)
    return qp


def stop_all() -> None:
    """Kill every QEMU this process launched (teardown helper)."""
    for qp in LAUNCHED:
        with contextlib.suppress(Exception):
            qp.stop(grace=1.0)


