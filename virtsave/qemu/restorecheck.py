"""Non-destructive restore check: would this QEMU build load this save image?

The build is launched paused (``-S``) with ``-incoming defer`` from a command line that fits the
image (machine type, memory, CPU, devices — the migration stream's sections must find their
devices); the image's QEMU stream is fed from its offset through a **read-only** fd, and once the
migration is ``completed`` ``query-status`` must say the guest is there (paused); then ``quit``.
The guest never runs, and nothing of it is opened for writing:

* disks: ``-blockdev`` file/format nodes become ``null-co`` nodes of the same name and size (no
  file opened at all); ``-drive`` gets ``snapshot=on`` (QEMU opens it read-only, writes go to a
  temporary overlay);
* ``memory-backend-file`` (hugepages, shared memory files) becomes ``memory-backend-ram``;
* network backends become a restricted ``user`` backend, character devices (serial ports, channels)
  ``null`` ones (the guest never runs anyway);
* the command line's own monitor goes (virtsave's QMP socket replaces it); the rest of the
  libvirt-specific rewriting is :mod:`virtsave.qemu.launch`'s.

The machine type is the one the stream's ``configuration`` section names (what QEMU actually ran),
which overrides the command line's when they differ (e.g. an XML that says ``pc``).

Example::

    from virtsave.qemu import restorecheck
    argv = restorecheck.argv_from_xml(header.xml)          # or libvirt's domxml-to-native argv
    r = restorecheck.check_image("/var/lib/libvirt/qemu/save/vm1.save", argv,
                                 binary="/var/lib/virtsave/qemu/debian12/bin/qemu-system-x86_64")
    print(r.status, r.reason)                              # loads None / refuses "…unsupported machine type"
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from virtsave.core.errors import ImageError, LaunchError, QMPError, VirtsaveError
from virtsave.image import saveimage
from virtsave.qemu import launch as qemu_launch
from virtsave.qemu import migration, safety
from virtsave.trace import argv as qargv

__all__ = ["RestoreCheck", "argv_from_xml", "check_image", "clean_reason", "domain_name", "machine_of_argv",
           "prepare_argv", "stream_machine"]

_QEVM = b"QEVM"
_STAMP = re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z\s+")
_SEC_CONFIGURATION = 0x07
_PROTOCOL_DRIVERS = frozenset({"file", "host_device", "host_cdrom", "nbd", "iscsi", "rbd", "gluster", "nfs",
                               "ssh", "http", "https", "ftp", "ftps", "vvfat"})
_FORMAT_DRIVERS = frozenset({"raw", "qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc", "luks", "parallels",
                             "dmg", "bochs", "cloop", "copy-on-read", "throttle"})


@dataclass
class RestoreCheck:
    """Outcome of one image × build check: ``loads`` or ``refuses`` (with QEMU's reason)."""

    status: str
    reason: str | None = None
    machine: str | None = None
    qemu_status: str | None = None
    seconds: float = 0.0
    argv: list[str] = field(default_factory=list)
    rewrites: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- what the image needs ----------------------------------------------------------------------
def _head_bytes(path: str, header: saveimage.Header, n: int = 512) -> bytes:
    """The first *n* bytes of the QEMU stream (through the decompressor for compressed images)."""
    if header.format in saveimage.DECOMPRESSORS:
        with open(path, "rb") as f:
            f.seek(header.stream_offset)
            try:
                p = subprocess.Popen(saveimage.DECOMPRESSORS[header.format], stdin=f, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
            except OSError:
                return b""
            assert p.stdout is not None
            data = p.stdout.read(n)
            p.kill()
            p.wait()
            p.stdout.close()
            return data
    with open(path, "rb") as f:
        f.seek(header.stream_offset)
        return f.read(n)


def stream_machine(path: str | os.PathLike[str], header: saveimage.Header | None = None) -> str | None:
    """The machine type the stream's ``configuration`` section names (None if the stream has none)."""
    p = os.fspath(path)
    hdr = header or saveimage.read_header_path(p)
    data = _head_bytes(p, hdr)
    if len(data) < 13 or data[:4] != _QEVM or data[8] != _SEC_CONFIGURATION:
        return None
    (n,) = struct.unpack(">I", data[9:13])
    if n > 256 or len(data) < 13 + n:
        return None
    return data[13:13 + n].decode("ascii", "replace")


def _xml_root(xml: str) -> Any:
    from lxml import etree

    try:
        # Untrusted input (SECURITY.md): no entity expansion, no network.
        return etree.fromstring(xml.encode(), etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as exc:
        raise ImageError(f"domain XML is not well-formed: {exc.msg}") from None


def domain_name(xml: str) -> str | None:
    """The ``<name>`` of a domain XML (None when the XML has none or is not well-formed)."""
    try:
        name = _xml_root(xml).findtext("name")
        return str(name) if name is not None else None
    except ImageError:
        return None


def clean_reason(text: str) -> str:
    """QEMU's message without the ``-msg timestamp=on`` stamps libvirt's command lines ask for.

    >>> clean_reason("2026-11-30T09:41:53.272146Z qemu-system-x86_64: unsupported machine type")
    'qemu-system-x86_64: unsupported machine type'
    """
    return _STAMP.sub("", text).replace(" | Use -machine help to list supported machines", "").strip()


def _memory_mib(root: Any) -> int:
    el = root.find("memory")
    if el is None or not (el.text or "").strip().isdigit():
        raise ImageError("domain XML has no <memory> size")
    scale = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1 << 20, "mib": 1 << 20,
             "mb": 10**6, "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40}
    unit = (el.get("unit") or "KiB").lower()
    return int(el.text.strip()) * scale.get(unit, 1024) // (1 << 20)


def argv_from_xml(xml: str, *, binary: str = "qemu-system-x86_64") -> list[str]:
    """A minimal QEMU command line for a domain XML (when libvirt cannot make one).

    Models what decides whether a migration stream loads: machine type (ACPI off unless
    ``<features><acpi/>``, USB controller as libvirt adds it), memory, vCPUs, CPU model, the
    direct kernel boot (its option ROM is part of the stream) and serial ports. Other devices
    are not modelled: their sections then make QEMU refuse the stream ("Unknown savevm section").

    >>> xml = ("<domain type='qemu'><name>g</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>"
    ...        "<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>"
    ...        "<devices><serial type='pty'><target port='0'/></serial></devices></domain>")
    >>> argv_from_xml(xml, binary="qemu-system-x86_64")[1:8]
    ['-machine', 'pc-i440fx-7.2,usb=off,acpi=off', '-accel', 'tcg', '-m', '128', '-smp']
    """
    root = _xml_root(xml)
    os_type = root.find("os/type")
    machine = (os_type.get("machine") if os_type is not None else None) or "pc"
    acpi = root.find("features/acpi") is not None
    argv = [binary, "-machine", f"{machine},usb=off" + ("" if acpi else ",acpi=off"),
            "-accel", "kvm" if root.get("type") == "kvm" else "tcg",
            "-m", str(_memory_mib(root)), "-smp", (root.findtext("vcpu") or "1").strip(),
            "-nodefaults", "-no-user-config", "-display", "none"]
    cpu = root.find("cpu")
    model = cpu.findtext("model") if cpu is not None else None
    if model:
        argv += ["-cpu", model.strip()]
    for tag, opt in (("os/kernel", "-kernel"), ("os/initrd", "-initrd"), ("os/cmdline", "-append")):
        val = (root.findtext(tag) or "").strip()
        if val:
            argv += [opt, val]
    usb = root.find("devices/controller[@type='usb']")
    if machine.startswith("pc") and "q35" not in machine and (usb is None or usb.get("model") != "none"):
        argv += ["-device", "piix3-usb-uhci,id=usb,bus=pci.0,addr=0x1.0x2"]
    for i, ser in enumerate(root.findall("devices/serial")):
        port = ser.find("target")
        idx = port.get("port", str(i)) if port is not None else str(i)
        argv += ["-chardev", f"null,id=charserial{idx}", "-device",
                 f"isa-serial,chardev=charserial{idx},id=serial{idx},index={idx}"]
    return argv


# -- the command line made harmless ------------------------------------------------------------
def _qcow2_size(path: str) -> int | None:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        head = f.read(32)
        if head[:4] == b"QFI\xfb" and len(head) >= 32:
            return int(struct.unpack(">Q", head[24:32])[0])
    return None


def _blockdev_null(spec: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """A ``null-co`` node in place of a file-backed one (same node name, the disk's size)."""
    path = spec.get("filename") if spec.get("driver") in _PROTOCOL_DRIVERS else files.get(str(spec.get("file")))
    size = 0
    if isinstance(path, str):
        size = (_qcow2_size(path) if spec.get("driver") == "qcow2" else None) or 0
        if not size:
            with contextlib.suppress(OSError):
                size = os.stat(path).st_size
    out: dict[str, Any] = {"driver": "null-co", "node-name": spec.get("node-name"), "size": size}
    return {k: v for k, v in out.items() if v is not None}


def _rewrite_json(opt: str, spec: dict[str, Any], files: dict[str, str]) -> dict[str, Any] | None:
    if opt == "-blockdev" and spec.get("driver") in _PROTOCOL_DRIVERS | _FORMAT_DRIVERS:
        return _blockdev_null(spec, files)
    if opt == "-object" and spec.get("qom-type") == "memory-backend-file":
        return {"qom-type": "memory-backend-ram", "id": spec.get("id"), "size": spec.get("size")}
    if opt == "-netdev" and spec.get("type") not in (None, "user"):
        return {"type": "user", "id": spec.get("id"), "restrict": True}
    return None


def _rewrite_keyval(o: qargv.Option) -> str | None:
    v = o.parsed
    if o.name == "-drive" and "file" in v and v.get("snapshot") != "on":
        return str(v.updated({"snapshot": "on"}))
    if o.name == "-netdev" and v.kind != "user":
        return qargv.join_keyval([(None, "user"), ("id", str(v.get("id") or "net0")), ("restrict", "on")])
    return None


def _machine_type(v: qargv.OptionValue) -> str:
    return str(v.get("type") or "")


def _block_files(cl: qargv.CommandLine) -> dict[str, str]:
    """Protocol node name → the file it opens (a format node's ``file`` names such a node)."""
    files: dict[str, str] = {}
    for node, o in cl.block_nodes().items():
        spec = o.parsed
        if spec.get("driver") in _PROTOCOL_DRIVERS and isinstance(spec.get("filename"), str):
            files[node] = spec.get("filename")
    return files


def _rewrite_option(o: qargv.Option, machine: str | None, files: dict[str, str]) -> tuple[str | None, str]:
    """The restore check's value for option *o* (None: as written) and why."""
    v = o.parsed
    if o.name == "-machine" and machine and _machine_type(v) != machine:
        return str(v.updated({"type": machine})), "the machine type the image's stream was saved with"
    if o.name == "-chardev" and v.kind != "null":
        return (qargv.join_keyval([(None, "null"), ("id", str(v.get("id") or ""))]),
                "restore check: the guest never runs, its character devices go nowhere")
    why = "restore check: nothing opened for writing"
    if v.syntax == "json":
        spec = _rewrite_json(o.name, dict(v.props), files)
        return (qargv.format_json(spec) if spec is not None else None), why
    return _rewrite_keyval(o), why


def prepare_argv(argv: list[str], *, machine: str | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """*argv* with every guest disk/memory file/network backend neutralized and libvirt's monitor
    removed; *machine* (from the stream) replaces the command line's machine type. Returns the
    new argv and the rewrites made (option, original, replacement, reason).

    >>> new, notes = prepare_argv(["qemu-system-x86_64", "-machine", "pc,usb=off", "-blockdev",
    ...     '{"driver":"file","filename":"/nonexistent/d.img","node-name":"n1"}'], machine="pc-i440fx-7.2")
    >>> new[1:]
    ['-machine', 'pc-i440fx-7.2,usb=off', '-blockdev', '{"driver":"null-co","node-name":"n1","size":0}']
    """
    cl = qargv.parse(argv)
    monitors = {str(o.parsed.get("chardev") or "") for o in cl.find("-mon")}
    files = _block_files(cl)
    out: list[str] = [cl.binary or argv[0]]
    notes: list[dict[str, str]] = []

    def note(opt: str, old: str | None, new: str | None, why: str) -> None:
        notes.append({"option": opt, "original": old or "", "replacement": new or "", "reason": why})

    for o in cl.options:
        if o.name == "-mon" or (o.name == "-chardev" and o.parsed.get("id") in monitors):
            note(o.word, o.value, None, "the command line's monitor: virtsave's QMP socket replaces it")
            continue
        if o.value is None:
            out.append(o.word)
            continue
        new, why = _rewrite_option(o, machine, files)
        if new is not None and new != o.value:
            note(o.word, o.value, new, why)
            out += [o.word, new]
        else:
            out += [o.word, o.value]
    return out, notes


# -- the check ---------------------------------------------------------------------------------
def _reason(proc: qemu_launch.QemuProcess | None, fallback: str) -> str:
    """QEMU's own words (its error lines on stderr) or *fallback*."""
    if proc is None:
        return fallback
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in proc.stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
        lines = [clean_reason(ln) for ln in lines]
        errors = [ln for ln in lines if "warning:" not in ln and not ln.startswith("Use -machine help")]
        if errors:
            return " | ".join(errors[-3:])
    return fallback


def _warnings(proc: qemu_launch.QemuProcess) -> list[str]:
    with contextlib.suppress(OSError):
        text = proc.stderr_path.read_text(errors="replace")
        return [clean_reason(ln) for ln in text.splitlines() if "warning:" in ln]
    return []


def _load(proc: qemu_launch.QemuProcess, uri: str, sparse: bool, timeout: float) -> tuple[str, str | None]:
    """Feed the stream; return (query-status status, failure or None)."""
    with proc.connect() as s:
        caps = [{"capability": "events", "state": True}]
        if sparse:
            caps.append({"capability": "mapped-ram", "state": True})
        rep = s.execute_raw("migrate-set-capabilities", {"capabilities": caps})
        if "error" in rep:
            return "", f"migrate-set-capabilities: {rep['error'].get('desc')}"
        mark = s.event_mark()
        rep = s.execute_raw("migrate-incoming", {"uri": uri})
        if "error" in rep:
            return "", f"migrate-incoming: {rep['error'].get('desc')}"
        final = s.wait_migration(since=mark, timeout=timeout)
        if final != "completed":
            desc = ""
            with contextlib.suppress(QMPError):
                desc = str((s.execute("query-migrate") or {}).get("error-desc") or "")
            return "", f"migration {final}{': ' + desc if desc else ''}"
        status = str((s.execute("query-status") or {}).get("status"))
        s.quit()
    return status, None


def check_image(image: str | os.PathLike[str], argv: list[str], *, binary: str | None = None,
                timeout: float = 300.0) -> RestoreCheck:
    """Launch *binary* (default ``argv[0]``) paused with ``-incoming defer`` from *argv* made
    harmless (:func:`prepare_argv`), load *image* read-only, ``query-status``, ``quit``.

    ``loads``: the migration completed and QEMU holds the guest (paused). ``refuses``: QEMU
    exited, or the load failed, or it was left in another state — with QEMU's reason.
    Raises :class:`ImageError` only for an image that is no complete save image at all.
    """
    path = os.fspath(image)
    hdr = saveimage.read_header_path(path, allow_partial=False)
    machine = stream_machine(path, hdr)
    new_argv, notes = prepare_argv(argv, machine=machine)
    res = RestoreCheck("refuses", machine=machine, rewrites=notes, argv=new_argv)
    # The command line comes from the image's (untrusted) domain XML: the replay's safety rules apply.
    findings = safety.check_argv(new_argv)
    if findings:
        res.reason = "not launched: unsafe command line: " + "; ".join(str(f) for f in findings)
        return res
    t0 = time.monotonic()
    proc = None
    try:
        with migration.loading(path) as inc:     # the one restore step: fd, fdset or decompressor
            plan = inc.plan_launch(new_argv, binary=binary)
            res.argv, res.rewrites = plan.argv, notes + plan.rewrites
            proc = inc.start(plan)
            status, failure = _load(proc, inc.uri()[0], hdr.format == "sparse", timeout)
            proc.wait(15)
        res.qemu_status = status or None
        if failure is None and status in ("paused", "prelaunch", "postmigrate"):
            res.status = "loads"
        else:
            res.reason = _reason(proc, failure or f"QEMU reports status {status!r} after the load")
    except (LaunchError, QMPError) as exc:
        res.reason = _reason(proc, str(exc).splitlines()[0])
    except VirtsaveError as exc:
        res.reason = _reason(proc, str(exc).splitlines()[0])
    finally:
        if proc is not None:
            res.warnings = _warnings(proc)
            proc.stop(grace=1.0)
        res.seconds = round(time.monotonic() - t0, 3)
    return res


def machine_of_argv(argv: list[str]) -> str | None:
    """The machine type an argv asks for (first word of ``-machine``)."""
    for o in qargv.parse(argv).find("-machine", "-M"):
        if o.value:
            return _machine_type(o.parsed) or None
    return None
