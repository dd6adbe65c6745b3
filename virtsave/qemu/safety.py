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
* argv chardevs other than the *rewritable* ones: ``file``/``pipe``/``serial``/``tty``/``parallel``/
  ``udp`` backends, sockets other than libvirt's monitor and channel sockets under
  ``/var/lib/libvirt/qemu/``; ``-serial``/``-parallel`` to files, pipes, sockets or host devices;
  ``-monitor``, ``-qmp``, ``-qmp-pretty``, a second ``-mon``, ``-gdb``/``-s``, ``-qtest``;
* file descriptors: any ``fd=``/``fds=``/``vhostfd=``/``vhostfds=`` except the monitor chardev; any
  ``-add-fd`` set used by anything but a file chardev (libvirt's serial log) or the incoming migration;
  ``/dev/fdset/N`` of an undeclared or foreign set;
* ``-object secret`` with ``file=`` other than libvirt's master key
  (``/var/lib/libvirt/qemu/domain-*/master-key.aes``), ``filter-dump``, ``input-linux``, other
  ``rng-random`` files, ``memory-backend-file`` outside hugepage/shm places;
* ``script=``/``downscript=`` (not ``no``), ``helper=``, ``guestfwd``/``hostfwd``/``smb``, socket
  netdevs; ``-plugin``, ``-loadvm``, ``-fsdev``/``-virtfs``, ``-D``, ``-trace file=``, ``-readconfig``/
  ``-writeconfig``; ``romfile=`` outside ``/usr/share/``;
* paths with a ``..`` component or relative, in guest file options (kernel, initrd, firmware, disks
  ``file=``/``filename``, ``fw_cfg``, ``-option-rom``, ``-audiodev`` wav ``path``) and in every phase's
  ``image.path``; guest files outside :data:`EXPECTED_PREFIXES`; image paths under
  :data:`DENY_PREFIXES` (``/etc``, ``/dev``, ``/proc`` …).

Rewritable (not findings), exactly what :mod:`virtsave.qemu.launch` replaces: the monitor chardev
``-chardev socket,id=charmonitor,fd=N`` (the chardev a ``-mon …,mode=control`` names), libvirt's
``-add-fd set=S,fd=F,opaque=…`` whose set only feeds ``pty``/``file``/``vc``/``stdio`` chardevs (the
serial log: ``-chardev file,…,path=/dev/fdset/S`` on 9.0, ``-chardev pty,…,logfile=/dev/fdset/S`` on
11.x — the launcher replaces those chardevs whole) or the incoming migration ``file:/dev/fdset/S``
(``-incoming`` or ``migrate-incoming``), and the master-key secret file.

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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from virtsave.core.errors import UnsafeTraceError

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
MASTER_KEY_GLOBS = ("/var/lib/libvirt/qemu/domain-*/master-key.aes", "/run/libvirt/qemu/*/master-key.aes")
#: QMP commands that read/write host files, open sockets or export guest data.
HOST_COMMANDS = frozenset({
    "human-monitor-command", "dump-guest-memory", "screendump", "pmemsave", "memsave", "drive-backup",
    "drive-mirror", "blockdev-snapshot-sync", "blockdev-create", "chardev-add", "chardev-change", "netdev_add",
    "nbd-server-start", "nbd-server-add", "block-export-add", "add_client", "xen-save-devices-state",
    "xen-load-devices-state", "snapshot-save", "snapshot-load", "migrate-recover", "dump-skeys",
    "x-blockdev-change", "blockdev-reopen", "block-commit", "block-stream",
})
FLAG_OPTIONS = frozenset({
    "-S", "-no-user-config", "-nodefaults", "-no-shutdown", "-no-reboot", "-no-acpi", "-no-hpet",
    "-enable-kvm", "-nographic", "-daemonize", "-snapshot", "-full-screen", "-enable-fips", "-s",
    "-no-fd-bootchk", "-no-quit", "-win2k-hack", "-old-param", "-only-migratable", "-preconfig", "-qmp-pretty",
})
_SAFE_CHARDEVS = frozenset({"pty", "null", "vc", "stdio", "spicevmc", "spiceport", "qemu-vdagent", "ringbuf",
                            "memory", "dbus", "msmouse", "braille", "wctablet", "testdev"})
#: Chardev backends the launcher replaces whole by a file it owns (their ``logfile=``/fdset uses go too).
_REWRITTEN_CHARDEVS = frozenset({"pty", "file", "vc", "stdio"})
_FD_KEYS = frozenset({"fd", "fds", "vhostfd", "vhostfds"})
_FILE_KEYS = frozenset({"file", "filename", "path", "romfile", "mem-path", "kernel", "initrd", "dtb", "bios",
                        "firmware", "x-file", "script", "downscript", "helper", "dir", "sock", "socket"})
_FDSET = re.compile(r"/dev/fdset/(\d+)")
_FD_IN_URI = re.compile(r"^fd:")


@dataclass(frozen=True)
class Finding:
    """One unsafe item: *item* (what, short), *where* (``argv[12]``, ``save.messages[3]`` …), *reason*."""

    item: str
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.item} ({self.where}): {self.reason}"


def refusal_message(findings: Iterable[Finding]) -> str:
    """One line naming every finding, for :class:`UnsafeTraceError` and the CLI."""
    fs = list(findings)
    items = "; ".join(str(f) for f in fs)
    return (f"unsafe trace, {len(fs)} item{'s' if len(fs) != 1 else ''} refused: {items} "
            "(replay only traces you trust, or pass --allow-unsafe)")


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


def _split_keyval(value: str) -> list[str]:
    parts, cur, i = [], [], 0
    while i < len(value):
        if value[i] == "," and value[i + 1:i + 2] == ",":
            cur.append(",")
            i += 2
            continue
        if value[i] == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(value[i])
        i += 1
    parts.append("".join(cur))
    return parts


def parse_option(value: str | None) -> tuple[str, dict[str, Any]]:
    """(first bare word or JSON type, key → value) of a QEMU option value (JSON or keyval)."""
    if value is None:
        return "", {}
    s = value.strip()
    if s.startswith("{"):
        try:
            obj = json.loads(s)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            kind = str(obj.get("qom-type") or obj.get("driver") or obj.get("backend") or obj.get("type") or "")
            return kind, obj
    parts = _split_keyval(value)
    d: dict[str, Any] = {}
    first = ""
    for n, p in enumerate(parts):
        k, eq, v = p.partition("=")
        if eq:
            d[k] = v
        elif n == 0:
            first = p
        else:
            d[p] = ""
    return first, d


def pairs(argv: list[str]) -> Iterator[tuple[int, str, str | None]]:
    """(index, option, value) of a QEMU argv (``argv[0]`` is the binary)."""
    i = 1
    while i < len(argv):
        opt = argv[i]
        if not opt.startswith("-"):
            yield i, opt, None
            i += 1
            continue
        if opt in FLAG_OPTIONS or i + 1 >= len(argv):
            yield i, opt, None
            i += 1
            continue
        yield i, opt, argv[i + 1]
        i += 2


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


def _walk_items(v: Any) -> Iterator[tuple[str, Any]]:
    """(key, value) of every dict entry, recursively."""
    if isinstance(v, dict):
        for k, x in v.items():
            yield k, x
            yield from _walk_items(x)
    elif isinstance(v, list):
        for x in v:
            yield from _walk_items(x)


def _uri_problem(uri: Any, incoming: bool, fdsets_ok: set[str]) -> str | None:
    if not isinstance(uri, str):
        return None
    if uri.startswith("exec:"):
        return "exec: migration URI runs a host command"
    if incoming and uri == "defer":
        return None
    if _FD_IN_URI.match(uri):
        return None
    m = re.match(r"^file:/dev/fdset/(\d+)(,offset=(0x[0-9a-fA-F]+|\d+))?$", uri)
    if m:
        return None
    if uri.startswith("file:"):
        return "file: migration URI names a host file (only file:/dev/fdset/N is replayable)"
    scheme = uri.split(":", 1)[0] if ":" in uri else uri
    return f"{scheme}: migration URI opens a connection (only fd: and file:/dev/fdset/N are replayable)"


# ----------------------------------------------------------------------------------------- argv


def check_argv(argv: list[str], incoming_fdsets: set[str] | None = None,
               prefixes: tuple[str, ...] = EXPECTED_PREFIXES) -> list[Finding]:
    """Findings in a QEMU command line; *incoming_fdsets*: fdsets the trace's restore migrates from."""
    out: list[Finding] = []
    ps = list(pairs(argv or []))
    incoming_fdsets = set(incoming_fdsets or ())

    def add(i: int, opt: str, val: str | None, reason: str) -> None:
        out.append(Finding(_short(f"{opt} {val}" if val is not None else opt), f"argv[{i}]", reason))

    monitors: set[str] = set()
    mon_count = 0
    for _i, opt, val in ps:
        if opt == "-mon" and val:
            _, d = parse_option(val)
            if d.get("mode") == "control" and d.get("chardev") and not monitors:
                monitors.add(str(d["chardev"]))
    # fdsets declared with -add-fd, and who uses each
    declared: dict[str, int] = {}
    uses: dict[str, list[tuple[int, str, bool]]] = {}   # set → (index, option, rewritable use)
    for i, opt, val in ps:
        if opt == "-add-fd" and val:
            _, d = parse_option(val)
            declared[str(d.get("set", ""))] = i
        if opt == "-incoming" and val:
            m = _FDSET.search(val)
            if m:
                incoming_fdsets.add(m.group(1))
    for i, opt, val in ps:
        if val is None or opt == "-add-fd":
            continue
        kind, d = parse_option(val)
        for m in _FDSET.finditer(val):
            rewritable = (opt == "-chardev" and kind in _REWRITTEN_CHARDEVS) or (opt == "-incoming")
            uses.setdefault(m.group(1), []).append((i, opt, rewritable))

    for i, opt, val in ps:
        kind, d = parse_option(val)
        if val is not None and "exec:" in val and opt not in ("-incoming", "-append"):
            add(i, opt, val, "exec: runs a host command")
        if opt == "-incoming":
            why = _uri_problem(val, True, incoming_fdsets)
            if why:
                add(i, opt, val, why)
        elif opt == "-chardev":
            cid = str(d.get("id", ""))
            lf = d.get("logfile")
            if lf is not None:
                fm = _FDSET.fullmatch(str(lf))
                if not (fm and fm.group(1) in declared and kind in _REWRITTEN_CHARDEVS):
                    add(i, opt, val, f"chardev logfile writes host file {lf}")
            if kind == "socket":
                if cid in monitors and "fd" in d and not any(k in d for k in ("path", "host", "port")):
                    continue   # libvirt's monitor: the launcher replaces it with its own socket
                if "fd" in d:
                    add(i, opt, val, "socket chardev on an inherited fd the launcher cannot rewrite")
                elif "path" in d:
                    if not str(d["path"]).startswith("/var/lib/libvirt/qemu/") or ".." in str(d["path"]):
                        add(i, opt, val, f"extra socket {d['path']} outside libvirt's channel directory")
                else:
                    add(i, opt, val, "network socket chardev")
                continue
            if kind == "file":
                p = str(d.get("path", ""))
                m = _FDSET.fullmatch(p)
                if not (m and m.group(1) in declared):
                    add(i, opt, val, f"file chardev writes host file {p}")
                continue
            if kind in ("pipe", "serial", "tty", "parallel", "parport", "udp"):
                add(i, opt, val, f"{kind} chardev reaches a host file, device or network")
                continue
            if kind not in _SAFE_CHARDEVS:
                add(i, opt, val, f"unknown chardev backend {kind!r}")
                continue
        elif opt in ("-serial", "-parallel", "-virtioconsole", "-debugcon"):
            v = val or ""
            if not (v in ("none", "null", "pty", "vc", "stdio", "mon:stdio") or v.startswith(("chardev:", "vc:"))):
                add(i, opt, val, f"{opt} to a host file, pipe, socket or device")
        elif opt in ("-monitor", "-qmp", "-qmp-pretty", "-gdb", "-s", "-qtest"):
            add(i, opt, val, "opens an extra monitor/debug channel")
        elif opt == "-mon":
            mon_count += 1
            if mon_count > 1 or str(d.get("chardev", "")) not in monitors:
                add(i, opt, val, "extra monitor")
        elif opt == "-add-fd":
            s = str(d.get("set", ""))
            users = uses.get(s, [])
            bad = [u for u in users if not u[2]]
            if s in incoming_fdsets and not bad:
                continue
            if not users and s not in incoming_fdsets:
                add(i, opt, val, f"fdset {s} passes an fd nothing rewritable uses")
            elif bad:
                add(i, opt, val, f"fdset {s} is used by {bad[0][1]} (argv[{bad[0][0]}]), which the launcher "
                                 "cannot rewrite")
            continue
        elif opt == "-object":
            if kind == "secret":
                f = d.get("file")
                if f and not any(fnmatch.fnmatch(str(f), g) for g in MASTER_KEY_GLOBS):
                    add(i, opt, val, f"secret object reads host file {f}")
            elif kind == "filter-dump":
                add(i, opt, val, "filter-dump writes network traffic to a host file")
            elif kind == "input-linux":
                add(i, opt, val, "input-linux grabs a host input device")
            elif kind == "rng-random" and d.get("filename") not in (None, "/dev/urandom", "/dev/random"):
                add(i, opt, val, f"rng-random reads {d.get('filename')}")
            elif kind == "memory-backend-file":
                mp = str(d.get("mem-path", ""))
                if not mp.startswith(("/dev/hugepages", "/dev/shm/", "/var/lib/libvirt/qemu/ram/")) or ".." in mp:
                    add(i, opt, val, f"memory backend file {mp} outside hugepage/shm places")
        elif opt in ("-netdev", "-net", "-nic"):
            for k in ("script", "downscript"):
                if k in d and str(d[k]) not in ("no", ""):
                    add(i, opt, val, f"{k}= runs a host program")
            if "helper" in d:
                add(i, opt, val, "helper= runs a host program")
            for k in ("guestfwd", "hostfwd", "smb"):
                if k in d:
                    add(i, opt, val, f"{k}= reaches host files, commands or ports")
            if kind in ("socket", "stream", "dgram", "vde", "l2tpv3", "vhost-user", "vhost-vdpa", "netmap", "af-xdp"):
                add(i, opt, val, f"{kind} netdev reaches host sockets or devices")
        elif opt in ("-plugin", "-loadvm", "-fsdev", "-virtfs", "-D", "-readconfig", "-writeconfig"):
            reasons = {"-plugin": "loads a host shared object into QEMU",
                       "-loadvm": "loads an internal snapshot instead of the traced state",
                       "-fsdev": "shares a host directory with the guest", "-virtfs": "shares a host directory",
                       "-D": "writes a host log file", "-readconfig": "reads a host config file",
                       "-writeconfig": "writes a host file"}
            add(i, opt, val, reasons[opt])
        elif opt == "-trace" and "file" in d:
            add(i, opt, val, "writes a host trace file")
        # file descriptors anywhere (keyval or JSON), except the monitor chardev handled above
        if val is not None and opt not in ("-add-fd",):
            fdkeys = [k for k, _ in _walk_items(d) if k in _FD_KEYS] if kind or d else []
            if fdkeys and opt != "-chardev":
                add(i, opt, val, f"{fdkeys[0]}= passes an inherited fd the launcher cannot rewrite")
            for m in _FDSET.finditer(val):
                s = m.group(1)
                if s not in declared and s not in incoming_fdsets:
                    add(i, opt, val, f"/dev/fdset/{s} is not declared by an -add-fd")
                elif not ((opt == "-chardev" and kind in _REWRITTEN_CHARDEVS) or opt == "-incoming"):
                    add(i, opt, val, f"/dev/fdset/{s} used by {opt}, which the launcher cannot rewrite")
        # guest file paths
        paths: list[str] = []
        if opt in ("-kernel", "-initrd", "-dtb", "-bios", "-L", "-option-rom", "-pflash", "-hda", "-hdb", "-hdc",
                   "-hdd", "-cdrom", "-fda", "-fdb", "-mtdblock", "-sd", "-mem-path"):
            paths.append(val or "")
        elif opt in ("-drive", "-blockdev", "-fw_cfg", "-device") and d:
            for k, x in _walk_items(d):
                if k in ("file", "filename", "romfile") and isinstance(x, str):
                    paths.append(x)
        elif opt == "-audiodev" and isinstance(d.get("path"), str):
            paths.append(d["path"])      # the wav backend writes there
        for p in paths:
            if not p or _FDSET.fullmatch(p):
                continue
            if opt == "-device" or (opt == "-option-rom"):
                if not p.startswith("/usr/share/") or ".." in p.split("/"):
                    add(i, opt, val, f"romfile {p} outside /usr/share/")
                continue
            why = path_problem(p, prefixes)
            if why:
                add(i, opt, val, f"{p}: {why}")
    return out


# ----------------------------------------------------------------------------------------- QMP


def check_command(msg: dict[str, Any], where: str, prefixes: tuple[str, ...] = EXPECTED_PREFIXES) -> list[Finding]:
    """Findings in one QMP command message."""
    out: list[Finding] = []
    ex = str(msg.get("execute", ""))
    args = msg.get("arguments") or {}
    label = _short(f"{ex} {json.dumps(args, separators=(',', ':'))}" if args else ex)

    def add(reason: str) -> None:
        out.append(Finding(label, where, reason))

    if ex in HOST_COMMANDS:
        add("human monitor passthrough: arbitrary HMP commands" if ex == "human-monitor-command"
            else f"{ex} reads/writes host files or opens connections")
    if ex in ("migrate", "migrate-incoming") and isinstance(args, dict):
        if "uri" in args:
            why = _uri_problem(args.get("uri"), ex == "migrate-incoming", set())
            if why:
                add(why)
        for ch in args.get("channels") or []:
            addr = ch.get("addr") if isinstance(ch, dict) else None
            if isinstance(addr, dict):
                t = addr.get("transport")
                if t == "exec":
                    add("exec migration channel runs a host command")
                elif t == "file" and not _FDSET.fullmatch(str(addr.get("filename", ""))):
                    add(f"file migration channel writes {addr.get('filename')}")
                elif t in ("socket", "rdma"):
                    add(f"{t} migration channel opens a connection")
    elif any(s.startswith("exec:") for s in _walk_strings(args)):
        add("exec: runs a host command")
    if ex in ("object-add", "blockdev-add", "device_add", "netdev_add", "chardev-add") and isinstance(args, dict):
        if ex == "object-add" and args.get("qom-type") == "secret":
            f = args.get("file") or (args.get("props") or {}).get("file")
            if f and not any(fnmatch.fnmatch(str(f), g) for g in MASTER_KEY_GLOBS):
                add(f"secret object reads host file {f}")
        for k, x in _walk_items(args):
            if k in ("filename", "file", "mem-path", "romfile", "path") and isinstance(x, str) and \
                    not _FDSET.fullmatch(x) and x and ex != "chardev-add":
                why = path_problem(x, prefixes) if k != "romfile" else (
                    None if x.startswith("/usr/share/") and ".." not in x.split("/") else "outside /usr/share/")
                if why:
                    add(f"{k} {x}: {why}")
            if k in ("script", "downscript") and x not in ("no", ""):
                add(f"{k} runs a host program")
    return out


def check_trace(trace: Mapping[str, Any], prefixes: tuple[str, ...] = EXPECTED_PREFIXES) -> list[Finding]:
    """Every unsafe item of *trace* (argv, QMP commands, image paths); empty when it is safe to replay.

    Never raises on odd content: a malformed trace should be rejected by :func:`virtsave.trace.model.validate`.
    """
    out: list[Finding] = []
    phases = [p for p in (trace.get("phases") or []) if isinstance(p, dict)]
    incoming_fdsets: set[str] = set()
    for ph in phases:
        for m in ph.get("messages") or []:
            if isinstance(m, dict) and m.get("kind") == "command" and m.get("execute") == "migrate-incoming":
                uri = (m.get("arguments") or {}).get("uri")
                fm = _FDSET.search(uri) if isinstance(uri, str) else None
                if fm:
                    incoming_fdsets.add(fm.group(1))
    argv = (trace.get("domain") or {}).get("argv") or []
    if isinstance(argv, list):
        out += check_argv([str(a) for a in argv], incoming_fdsets, prefixes)
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
