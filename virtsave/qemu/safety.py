"""Safety check of untrusted traces before anything runs them (replay, launch).

A trace carries a QEMU command line (``domain.argv``) and QMP commands; replaying a hostile one could
run host commands, read or write host files, open sockets or hand QEMU file descriptors it should not
have. :func:`check_trace` lists every such item as a :class:`Finding` (item, where, reason);
:func:`require_safe` raises :class:`~virtsave.core.errors.UnsafeTraceError` naming each unless allowed.

Refused (each a finding):

* migration URIs other than ``fd:…`` and ``file:/dev/fdset/N…`` (and ``defer`` for ``-incoming``), in
  ``migrate``/``migrate-incoming`` (``uri`` or ``channels``) and ``-incoming``; ``exec:`` anywhere in
  command arguments or argv;
* ``human-monitor-command`` and QMP commands that write or read host files or open sockets
  (:data:`HOST_COMMANDS`: ``dump-guest-memory``, ``screendump``, ``pmemsave``, ``chardev-add``,
  ``netdev_add``, ``nbd-server-start``, ``drive-backup``, …); ``object-add``/``blockdev-add``/``device_add``
  whose file names fail the path rules;
* a binary that is not a QEMU system emulator (``argv[0]``); a positional word (QEMU opens it as a disk
  image); a value that is itself an option name (the option before it would be a flag the command-line
  model does not know, so the rest would be misread);
* argv chardevs the launcher does not replace: ``file`` (on a host path), ``pipe``, ``serial``,
  ``tty``, ``parallel``, ``udp`` backends, a ``logfile=`` on a host path, sockets other than channel
  sockets under ``/var/lib/libvirt/qemu/``; ``-serial``/``-parallel`` to files, pipes, sockets or host
  devices; ``-monitor``, ``-qmp``, ``-qmp-pretty``, a second ``-mon``, ``-gdb``/``-s``, ``-qtest``;
* file descriptors: any ``fd=``/``fds=``/``vhostfd=``/``vhostfds=``, any ``-add-fd`` and any
  ``/dev/fdset/N`` in an option the launcher does not replace; an ``-add-fd`` nothing uses;
* ``-object secret`` with ``file=`` other than libvirt's master key, ``filter-dump``, ``input-linux``,
  other ``rng-random`` files, ``memory-backend-file`` outside hugepage/shm places;
* ``script=``/``downscript=`` (not ``no``), ``helper=``, ``guestfwd``/``hostfwd``/``smb``, socket
  netdevs; ``-plugin``, ``-loadvm``, ``-fsdev``/``-virtfs``, ``-D``, ``-trace file=``, ``-readconfig``/
  ``-writeconfig``; ``romfile=`` outside ``/usr/share/``;
* paths with a ``..`` component or relative, in guest file options (kernel, initrd, firmware, disks
  ``file=``/``filename``, ``fw_cfg``, ``-option-rom``, ``-audiodev`` wav ``path``) and in every phase's
  ``image.path``; guest files outside :data:`EXPECTED_PREFIXES`; image paths under
  :data:`DENY_PREFIXES` (``/etc``, ``/dev``, ``/proc`` …).

* devices no replay can run without sharing them with the original domain (the launcher's
  :data:`~virtsave.qemu.launch.REFUSALS`: host PCI/USB/SCSI devices, vhost-user and virtiofs, vDPA,
  vsock, TPMs, shared-memory backends, network block devices, host NICs, D-Bus helpers), marked
  ``unreplayable``: the launcher refuses them even when ``--allow-unsafe`` lets the rest through;
* a ``-blockdev`` child naming no declared node (``"file":"libvirt-1-storage"`` names a node: not a
  path; ``file.filename`` is one).

Not findings: what the launcher rewrites whole, taken from its own rule table
(:data:`virtsave.qemu.launch.RULES` through :func:`~virtsave.qemu.launch.rule_for`), so the two cannot
drift — libvirt's monitor chardev on ``fd=N``, its master-key secret, the serial/console chardevs
(``pty``/``vc``/``stdio``/``pipe``, ``file`` on libvirt's fdset) and chardevs logged through libvirt's
fdsets, ``-add-fd`` sets only those (or the restore's ``migrate-incoming``) use, libvirt's
``-incoming``, ``-pidfile``, ``-daemonize``; the NICs, guest channel sockets and displays of a real
guest (private in a replay). Nothing of those reaches the QEMU a replay starts. Disks are rewritten in
part (read-only, under overlays): their paths are still judged.

Example::

    >>> from virtsave.trace import model as t
    >>> tr = t.new_trace("libvirt", domain={"argv": ["/usr/bin/qemu-system-x86_64", "-incoming", "exec:cat x"]})
    >>> [f.item for f in check_trace(tr)]
    ['-incoming exec:cat x']
"""


from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from virtsave.core.errors import UnsafeTraceError
from virtsave.qemu import launch as qemu_launch
from virtsave.trace import argv as qargv
from virtsave.trace.argv import Option, OptionValue

__all__ = ["DENY_PREFIXES", "EXPECTED_PREFIXES", "HOST_COMMANDS", "Finding", "check_argv", "check_command",
           "check_trace", "path_problem", "refusal_message", "require_safe"]

#: Where guest files (images, kernels, firmware, disks) are expected. Anything else is a finding.
EXPECTED_PREFIXES: tuple[str, ...] = (
    "/var/lib/libvirt/", "/var/lib/virtsave/", "/var/cache/libvirt/", "/usr/share/", "/usr/lib/",
    "/usr/local/share/", "/var/tmp/", "/tmp/", "/srv/", "/home/", "/mnt/", "/media/", "/dev/fdset/",
)
#: Never acceptable for a save image a replay reads or writes (system files, devices, logs, sockets).
DENY_PREFIXES: tuple[str, ...] = (
    "/etc/", "/proc/", "/sys/", "/dev/", "/boot/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/usr/bin/",
    "/usr/sbin/", "/usr/lib/", "/run/", "/var/run/", "/var/log/", "/root/.",
)
#: QMP commands that read/write host files, open sockets or export guest data.
HOST_COMMANDS = frozenset({
    "human-monitor-command", "dump-guest-memory", "screendump", "pmemsave", "memsave", "drive-backup",
    "drive-mirror", "blockdev-snapshot-sync", "blockdev-create", "chardev-add", "chardev-change", "netdev_add",
    "nbd-server-start", "nbd-server-add", "block-export-add", "add_client", "xen-save-devices-state",
    "xen-load-devices-state", "snapshot-save", "snapshot-load", "migrate-recover", "dump-skeys",
    "x-blockdev-change", "blockdev-reopen", "block-commit", "block-stream",
})
_SAFE_CHARDEVS = frozenset({"pty", "null", "vc", "stdio", "spicevmc", "spiceport", "qemu-vdagent", "ringbuf",
                            "memory", "dbus", "msmouse", "braille", "wctablet", "testdev"})
_FDSET = re.compile(r"/dev/fdset/(\d+)")


@dataclass(frozen=True)
class Finding:
    """One unsafe item: *item* (what, short), *where* (``argv[12]``, ``save.messages[3]`` …), *reason*.
    *unreplayable*: a device no replay runs (:data:`virtsave.qemu.launch.REFUSALS`), trusted or not."""

    item: str
    where: str
    reason: str
    unreplayable: bool = False

    def __str__(self) -> str:
        return f"{self.item} ({self.where}): {self.reason}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def refusal_message(findings: Iterable[Finding]) -> str:
    """One line naming every finding, for :class:`UnsafeTraceError` and the CLI.

    >>> refusal_message([Finding("-device vfio-pci (hostdev0)", "argv[9]", "host PCI device passthrough",
    ...                          unreplayable=True)])
    'cannot replay 1 device: -device vfio-pci (hostdev0) (argv[9]): host PCI device passthrough (nothing was started)'
    """
    fs = list(findings)
    devices = [f for f in fs if f.unreplayable]
    rest = [f for f in fs if not f.unreplayable]
    unsafe = (f"unsafe trace, {_plural(len(rest), 'item')} refused: {'; '.join(str(f) for f in rest)}"
              if rest else "")
    if not devices:
        return f"{unsafe} (replay only traces you trust, or pass --allow-unsafe)"
    head = f"cannot replay {_plural(len(devices), 'device')}: {'; '.join(str(f) for f in devices)}"
    return f"{head}{'; also ' + unsafe if unsafe else ''} (nothing was started)"


def require_safe(trace: dict[str, Any], allow_unsafe: bool = False) -> list[Finding]:
    """:func:`check_trace`, raising :class:`UnsafeTraceError` (message: :func:`refusal_message`) on
    findings unless *allow_unsafe*; returns the findings."""
    found = check_trace(trace)
    if found and not allow_unsafe:
        raise UnsafeTraceError(refusal_message(found))
    return found


# ----------------------------------------------------------------------------------------- helpers


def _short(s: str, n: int = 120) -> str:
    s = s.replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


def path_problem(path: str, prefixes: tuple[str, ...] = EXPECTED_PREFIXES, *, deny_only: bool = False) -> str | None:
    """Why *path* is not an acceptable guest file path, or None.

    Guest files must lie under *prefixes*; with ``deny_only`` (save images, which users put anywhere)
    only :data:`DENY_PREFIXES` are refused. ``..`` components and relative paths are always refused.
    """
    if not isinstance(path, str) or not path:
        return None
    if path.startswith(("nbd:", "iscsi:", "rbd:", "gluster:", "http:", "https:", "ftp:", "ssh:")):
        return f"network storage {path.split(':', 1)[0]}: reaches outside this host's files"
    if "\x00" in path:
        return "NUL byte in path"
    if ".." in path.replace("\\", "/").split("/"):
        return "path traversal ('..')"
    if not path.startswith("/"):
        return "relative path (resolved against an unknown directory)"
    norm = os.path.normpath(path) + ("/" if path.endswith("/") else "")
    if deny_only:
        if norm.startswith(DENY_PREFIXES) and not norm.startswith("/dev/fdset/"):
            return "a system file, device, log or runtime path"
        return None
    if not norm.startswith(prefixes) and norm + "/" not in prefixes:
        return f"outside the expected places ({', '.join(p.rstrip('/') for p in prefixes[:4])}, …)"
    return None


def _walk_strings(v: Any) -> Iterator[str]:
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _walk_strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from _walk_strings(x)


def _uri_problem(uri: Any, incoming: bool) -> str | None:
    if not isinstance(uri, str):
        return None
    if uri.startswith("exec:"):
        return "exec: migration URI runs a host command"
    if incoming and uri == "defer":
        return None
    if uri.startswith("fd:"):
        return None
    m = re.match(r"^file:/dev/fdset/(\d+)(,offset=(0x[0-9a-fA-F]+|\d+))?$", uri)
    if m:
        return None
    if uri.startswith("file:"):
        return "file: migration URI names a host file (only file:/dev/fdset/N is replayable)"
    scheme = uri.split(":", 1)[0] if ":" in uri else uri
    return f"{scheme}: migration URI opens a connection (only fd: and file:/dev/fdset/N are replayable)"


# ----------------------------------------------------------------------------------------- argv


@dataclass
class _Scan:
    """What the per-option checks of one command line share."""

    ctx: qemu_launch.ArgvContext
    prefixes: tuple[str, ...]
    monitors_seen: int = 0


def _fdset_use_problems(o: Option, scan: _Scan) -> list[str]:
    out = []
    for s in dict.fromkeys(qargv.fdset_references(o.value or "")):
        if s not in scan.ctx.fdsets and s not in (scan.ctx.qmp_fdsets or ()):
            out.append(f"/dev/fdset/{s} is not declared by an -add-fd")
        else:
            out.append(f"/dev/fdset/{s} used by {o.name}, which the launcher cannot rewrite")
    return out


def _check_socket_chardev(v: OptionValue) -> list[str]:
    if qargv.fd_references(v):
        return ["socket chardev on an inherited fd the launcher cannot rewrite"]
    if "path" not in v:
        return ["network socket chardev"]
    path = str(v.get("path"))
    if not path.startswith("/var/lib/libvirt/qemu/") or ".." in path:
        return [f"extra socket {path} outside libvirt's channel directory"]
    return []


def _check_chardev(o: Option, v: OptionValue, scan: _Scan) -> list[str]:
    out: list[str] = []
    kind = v.kind
    lf = v.get("logfile")
    if lf is not None:
        out.append(f"chardev logfile writes host file {lf}" if not scan.ctx.declared_fdset(lf)
                   else f"chardev logfile on libvirt's fdset, which the launcher cannot rewrite for {kind!r}")
    if kind == "socket":
        return out + _check_socket_chardev(v)
    fds = qargv.fd_references(v)
    if fds:
        out.append(f"{fds[0][0]}= passes an inherited fd the launcher cannot rewrite")
    if kind == "file":
        p = str(v.get("path", ""))
        return out if scan.ctx.declared_fdset(p) else [*out, f"file chardev writes host file {p}"]
    if kind in ("pipe", "serial", "tty", "parallel", "parport", "udp"):
        return [*out, f"{kind} chardev reaches a host file, device or network"]
    if kind not in _SAFE_CHARDEVS:
        return [*out, f"unknown chardev backend {kind!r}"]
    return out + _fdset_use_problems(o, scan)


def _check_char_option(o: Option, v: OptionValue, scan: _Scan) -> list[str]:
    val = o.value or ""
    if val in ("none", "null", "pty", "vc", "stdio", "mon:stdio") or val.startswith(("chardev:", "vc:")):
        return []
    return [f"{o.name} to a host file, pipe, socket or device"]


def _check_mon(o: Option, v: OptionValue, scan: _Scan) -> list[str]:
    scan.monitors_seen += 1
    if scan.monitors_seen > 1 or v.get("chardev") != scan.ctx.monitor:
        return ["extra monitor"]
    return []


def _rewritten_whole(o: Option, ctx: qemu_launch.ArgvContext) -> bool:
    rule = qemu_launch.rule_for(o, ctx)
    return rule is not None and rule.whole


def _check_add_fd(o: Option, v: OptionValue, scan: _Scan) -> list[str]:
    s = str(v.get("set", ""))
    bad = [u for u in scan.ctx.fdset_users.get(s, ()) if not _rewritten_whole(u, scan.ctx)]
    if bad:
        return [f"fdset {s} is used by {bad[0].name} (argv[{bad[0].index}]), which the launcher cannot rewrite"]
    return [f"fdset {s} passes an fd nothing rewritable uses"]


def _check_object(o: Option, v: OptionValue, scan: _Scan) -> list[str]:
    kind = v.kind
    if kind == "secret":
        f = v.get("file")
        return [f"secret object reads host file {f}"] if f else []
    if kind == "filter-dump":
        return ["filter-dump writes network traffic to a host file"]
    if kind == "input-linux":
        return ["input-linux grabs a host input device"]
    if kind == "rng-random" and v.get("filename") not in (None, "/dev/urandom", "/dev/random"):
        return [f"rng-random reads {v.get('filename')}"]
    if kind == "memory-backend-file":
        mp = str(v.get("mem-path", ""))
        if not mp.startswith(("/dev/hugepages", "/dev/shm/", "/var/lib/libvirt/qemu/ram/")) or ".." in mp:
            return [f"memory backend file {mp} outside hugepage/shm places"]
    return []


_HOST_NETDEVS = ("socket", "stream", "dgram", "vde", "l2tpv3", "vhost-user", "vhost-vdpa", "netmap", "af-xdp")


def _check_netdev(o: Option, v: OptionValue, scan: _Scan) -> list[str]:
    out = [f"{k}= runs a host program" for k in ("script", "downscript") if k in v and str(v.get(k)) not in ("no", "")]
    if "helper" in v:
        out.append("helper= runs a host program")
    out += [f"{k}= reaches host files, commands or ports" for k in ("guestfwd", "hostfwd", "smb") if k in v]
    if v.kind in _HOST_NETDEVS:
        out.append(f"{v.kind} netdev reaches host sockets or devices")
    return out


def _check_incoming(o: Option, v: OptionValue, scan: _Scan) -> list[str]:
    why = _uri_problem(o.value, True)
    return [why] if why else []


_REFUSED_OPTIONS = {
    "-monitor": "opens an extra monitor/debug channel", "-qmp": "opens an extra monitor/debug channel",
    "-qmp-pretty": "opens an extra monitor/debug channel", "-gdb": "opens an extra monitor/debug channel",
    "-s": "opens an extra monitor/debug channel", "-qtest": "opens an extra monitor/debug channel",
    "-plugin": "loads a host shared object into QEMU",
    "-loadvm": "loads an internal snapshot instead of the traced state",
    "-fsdev": "shares a host directory with the guest", "-virtfs": "shares a host directory",
    "-D": "writes a host log file", "-readconfig": "reads a host config file", "-writeconfig": "writes a host file",
}
_OPTION_CHECKS: dict[str, Callable[[Option, OptionValue, _Scan], list[str]]] = {
    "-chardev": _check_chardev, "-serial": _check_char_option, "-parallel": _check_char_option,
    "-virtioconsole": _check_char_option, "-debugcon": _check_char_option, "-mon": _check_mon,
    "-add-fd": _check_add_fd, "-object": _check_object, "-netdev": _check_netdev, "-net": _check_netdev,
    "-nic": _check_netdev, "-incoming": _check_incoming,
    "-trace": lambda o, v, s: ["writes a host trace file"] if "file" in v else [],
}
#: Options whose own check also covers fds and fdsets (libvirt's fd passing lives there).
_OWN_FD_CHECK = frozenset({"-chardev", "-add-fd"})
_PATH_OPTIONS = frozenset({"-kernel", "-initrd", "-dtb", "-bios", "-L", "-option-rom", "-pflash", "-hda", "-hdb",
                           "-hdc", "-hdd", "-cdrom", "-fda", "-fdb", "-mtdblock", "-sd", "-mem-path"})
_OPTION_WORD = re.compile(r"--?[A-Za-z][A-Za-z0-9-]*")


def _blockdev_paths(v: OptionValue, scan: _Scan) -> tuple[list[str], list[str]]:
    """A ``-blockdev``'s host paths (``filename``, also dotted ``file.filename``), and its problems: a
    child named by reference (``"file":"libvirt-1-storage"``) is a node, never a path, but must name
    a node the command line declares."""
    refs = {id(x) for _, x in qargv.block_children(v) if isinstance(x, str)}
    paths = [x for k, x in qargv.walk_items(v.props) if k.rsplit(".", 1)[-1] == "filename" and isinstance(x, str)]
    nodes = scan.ctx.graph.nodes
    problems = [f"{k} {x}: names no -blockdev node (a -blockdev child is a node, not a path)"
                for k, x in qargv.block_children(v) if x not in nodes]
    inline = [x for k, x in qargv.walk_items(v.props)
              if k.rsplit(".", 1)[-1] in ("file",) and isinstance(x, str) and id(x) not in refs]
    return paths + inline, problems


def _guest_paths(o: Option, v: OptionValue) -> list[str]:
    if o.name in _PATH_OPTIONS:
        return [o.value or ""]
    if o.name in ("-drive", "-fw_cfg", "-device") and v.props:
        return [x for k, x in qargv.walk_items(v.props) if k in ("file", "filename", "romfile") and isinstance(x, str)]
    if o.name == "-audiodev" and isinstance(v.get("path"), str):
        return [str(v.get("path"))]      # the wav backend writes there
    return []


def _path_problems(o: Option, v: OptionValue, scan: _Scan) -> list[str]:
    out: list[str] = []
    paths = _guest_paths(o, v)
    if o.name == "-blockdev":
        paths, out = _blockdev_paths(v, scan)
    prefixes = scan.prefixes
    for p in paths:
        if not p or _FDSET.fullmatch(p):
            continue
        if o.name in ("-device", "-option-rom"):
            if not p.startswith("/usr/share/") or ".." in p.split("/"):
                out.append(f"romfile {p} outside /usr/share/")
            continue
        why = path_problem(p, prefixes)
        if why:
            out.append(f"{p}: {why}")
    return out


def _value_problems(o: Option) -> list[str]:
    out = []
    if o.value is not None and "exec:" in o.value and o.name not in ("-incoming", "-append"):
        out.append("exec: runs a host command")
    if o.value is not None and _OPTION_WORD.fullmatch(o.value) and o.name != "-append":
        out.append(f"value {o.value} is an option: {o.name} takes no value in QEMU (an unknown flag?), "
                   "so the rest of the command line would be misread")
    return out


def _generic_problems(o: Option, v: OptionValue, scan: _Scan) -> list[str]:
    """Checks every option kept as traced gets: fds, fdsets, guest paths."""
    out = []
    if o.name not in _OWN_FD_CHECK:
        fds = qargv.fd_references(v) if o.value is not None else []
        if fds:
            out.append(f"{fds[0][0]}= passes an inherited fd the launcher cannot rewrite")
        out += _fdset_use_problems(o, scan)
    return out + _path_problems(o, v, scan)


def _option_problems(o: Option, scan: _Scan) -> list[str]:
    if o.positional:
        return ["positional argument: QEMU opens it as a disk image"]
    v = o.parsed
    out = _value_problems(o)
    if o.name in _REFUSED_OPTIONS:
        out.append(_REFUSED_OPTIONS[o.name])
    check = _OPTION_CHECKS.get(o.name)
    if check is not None:
        out += check(o, v, scan)
    return out + _generic_problems(o, v, scan)


def check_argv(argv: list[str], incoming_fdsets: Iterable[str] | None = None,
               prefixes: tuple[str, ...] = EXPECTED_PREFIXES) -> list[Finding]:
    """Findings in a QEMU command line; *incoming_fdsets*: fdsets the trace's restore migrates from.

    An option the launcher rewrites whole (:func:`virtsave.qemu.launch.rule_for`) is no finding:
    nothing of it reaches QEMU. Every other option is judged as it stands.
    """
    cl = qargv.parse(argv or [])
    ctx = qemu_launch.context(cl, qmp_fdsets=set(incoming_fdsets or ()))
    out: list[Finding] = []
    if cl.binary is not None and not qemu_launch.is_qemu_binary(cl.binary):
        out.append(Finding(_short(cl.binary), "argv[0]", "not a QEMU system emulator (qemu-system-*), would be "
                                                          "executed"))
    scan = _Scan(ctx, prefixes)
    for o in cl.options:
        refusal = qemu_launch.refusal_for(o, ctx)
        if refusal is not None:
            out.append(Finding(refusal.describe(o), f"argv[{o.index}]", refusal.reason, unreplayable=True))
        rule = qemu_launch.rule_for(o, ctx)
        if rule is not None and rule.whole:
            continue
        out += [Finding(_short(o.text()), f"argv[{o.index}]", why) for why in _option_problems(o, scan)]
    return out


# ----------------------------------------------------------------------------------------- QMP


def _migrate_problems(ex: str, args: dict[str, Any]) -> list[str]:
    out = []
    if "uri" in args:
        why = _uri_problem(args.get("uri"), ex == "migrate-incoming")
        if why:
            out.append(why)
    for ch in args.get("channels") or []:
        addr = ch.get("addr") if isinstance(ch, dict) else None
        t = addr.get("transport") if isinstance(addr, dict) else None
        if t == "exec":
            out.append("exec migration channel runs a host command")
        elif t == "file" and isinstance(addr, dict) and not _FDSET.fullmatch(str(addr.get("filename", ""))):
            out.append(f"file migration channel writes {addr.get('filename')}")
        elif t in ("socket", "rdma"):
            out.append(f"{t} migration channel opens a connection")
    return out


def _added_object_problems(ex: str, args: dict[str, Any], prefixes: tuple[str, ...]) -> list[str]:
    """``object-add``/``blockdev-add``/``device_add``/``netdev_add``/``chardev-add``: files and helpers."""
    out = []
    if ex == "object-add" and args.get("qom-type") == "secret":
        f = args.get("file") or (args.get("props") or {}).get("file")
        if f and not any(fnmatch.fnmatch(str(f), g) for g in qemu_launch.MASTER_KEY_GLOBS):
            out.append(f"secret object reads host file {f}")
    for k, x in qargv.walk_items(args):
        if k in ("filename", "file", "mem-path", "romfile", "path") and isinstance(x, str) and \
                not _FDSET.fullmatch(x) and x and ex != "chardev-add":
            why = path_problem(x, prefixes) if k != "romfile" else (
                None if x.startswith("/usr/share/") and ".." not in x.split("/") else "outside /usr/share/")
            if why:
                out.append(f"{k} {x}: {why}")
        if k in ("script", "downscript") and x not in ("no", ""):
            out.append(f"{k} runs a host program")
    return out


def check_command(msg: dict[str, Any], where: str, prefixes: tuple[str, ...] = EXPECTED_PREFIXES) -> list[Finding]:
    """Findings in one QMP command message."""
    ex = str(msg.get("execute", ""))
    args = msg.get("arguments") or {}
    label = _short(f"{ex} {json.dumps(args, separators=(',', ':'))}" if args else ex)
    reasons = []
    if ex in HOST_COMMANDS:
        reasons.append("human monitor passthrough: arbitrary HMP commands" if ex == "human-monitor-command"
                       else f"{ex} reads/writes host files or opens connections")
    if ex in ("migrate", "migrate-incoming") and isinstance(args, dict):
        reasons += _migrate_problems(ex, args)
    elif any(s.startswith("exec:") for s in _walk_strings(args)):
        reasons.append("exec: runs a host command")
    if ex in ("object-add", "blockdev-add", "device_add", "netdev_add", "chardev-add") and isinstance(args, dict):
        reasons += _added_object_problems(ex, args, prefixes)
    return [Finding(label, where, why) for why in reasons]


def _incoming_fdsets(phases: list[dict[str, Any]]) -> set[str]:
    """The fdsets the traced ``migrate-incoming`` commands read the stream from."""
    out: set[str] = set()
    for ph in phases:
        for m in ph.get("messages") or []:
            if isinstance(m, dict) and m.get("kind") == "command" and m.get("execute") == "migrate-incoming":
                uri = (m.get("arguments") or {}).get("uri")
                out.update(qargv.fdset_references(uri) if isinstance(uri, str) else ())
    return out


def check_trace(trace: Mapping[str, Any], prefixes: tuple[str, ...] = EXPECTED_PREFIXES) -> list[Finding]:
    """Every unsafe item of *trace* (argv, QMP commands, image paths); empty when it is safe to replay.

    Never raises on odd content: a malformed trace should be rejected by :func:`virtsave.trace.model.validate`.
    """
    out: list[Finding] = []
    phases = [p for p in (trace.get("phases") or []) if isinstance(p, dict)]
    argv = (trace.get("domain") or {}).get("argv") or []
    if isinstance(argv, list):
        out += check_argv([str(a) for a in argv], _incoming_fdsets(phases), prefixes)
    for ph in phases:
        name = str(ph.get("name", "phase"))
        img = ph.get("image") or {}
        p = img.get("path") if isinstance(img, dict) else None
        if isinstance(p, str) and p:
            why = path_problem(p, prefixes, deny_only=True)
            if why:
                out.append(Finding(_short(p), f"{name}.image.path", why))
        for n, m in enumerate(ph.get("messages") or []):
            if isinstance(m, dict) and m.get("kind") == "command":
                out += check_command(m, f"{name}.messages[{n}]", prefixes)
    return out
