"""The built-in demo/test guest: define, start, watch its ``tick`` counter, remove.

The guest (built by ``scripts/build-guest``) fills N MiB of RAM and prints ``tick N``
on its serial port each second; the serial output is appended to a per-domain log,
so a restored guest shows its counter continuing instead of starting again at 1.

Two shapes boot it: :func:`create` defines the bare disk-less guest (``guest.xml``: pc machine,
serial only — the fastest); :func:`create_real` one shaped as virt-install makes a Linux guest
(``realguest.xml``: q35, UEFI with per-domain NVRAM from Debian's ``ovmf``, a qcow2 virtio disk made
here, a virtio NIC on libvirt's ``default`` network, a guest-agent channel, VNC on 127.0.0.1 with
virtio video, USB tablet, virtio RNG, balloon, pty serial). Firmware boot under TCG makes the real
shape slower to reach its first tick (≈ 15 s here against ≈ 3 s).

Example (needs a running libvirtd)::

    import libvirt
    from virtsave.harness import guest
    conn = libvirt.open("qemu:///system")
    dom = guest.create(conn, "vs-demo-1", memory_mib=256, fill_mib=64)
    guest.wait_tick("vs-demo-1", 3)
    guest.remove(conn, "vs-demo-1")
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import uuid as _uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import libvirt

from virtsave.core.errors import LaunchError, VirtsaveError
from virtsave.core.paths import GUEST_DIR

SERIAL_LOG_DIR = Path("/var/log/libvirt/qemu")
_TICK = re.compile(rb"^tick (\d+)\r?$", re.M)
#: Debian's ``ovmf``: the UEFI code (shared, read-only) and the variable store template libvirt copies
#: into each domain's NVRAM file.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: Where :func:`create_real` makes the guests' qcow2 disks (removed by :func:`remove`).
DISK_DIR = GUEST_DIR.parent / "disks"
#: libvirt's NAT network on 192.168.122.0/24 (``scripts/setup`` starts it); it carries only test guests.
NETWORK = "default"
#: Guests whose serial log is not in :data:`SERIAL_LOG_DIR` (a session daemon's guest cannot write
#: there): name → directory, filled in by :func:`create`.
SERIAL_DIRS: dict[str, Path] = {}


def accel() -> str:
    """``kvm`` when this host's KVM boots the guest kernel (probed at build), else ``tcg``."""
    try:
        return (GUEST_DIR / "accel").read_text().strip() or "tcg"
    except FileNotFoundError:
        raise LaunchError(f"test guest not built ({GUEST_DIR}/accel missing): run scripts/setup") from None


def serial_log(name: str) -> Path:
    """Where the guest's serial output is appended."""
    return SERIAL_DIRS.get(name, SERIAL_LOG_DIR) / f"{name}-serial.log"


def _require_built() -> None:
    for f in ("vmlinuz", "initrd.gz"):
        if not (GUEST_DIR / f).is_file():
            raise LaunchError(f"test guest not built ({GUEST_DIR / f} missing): run scripts/setup")


def guest_xml(name: str, memory_mib: int = 256, fill_mib: int = 64, vcpus: int = 1,
              domain_uuid: str | None = None, serial_dir: str | os.PathLike[str] | None = None) -> str:
    """The domain XML of a test guest (template ``conf/guest.xml``); *serial_dir*: where its serial
    log goes (default :data:`SERIAL_LOG_DIR`)."""
    _require_built()
    template = (resources.files("virtsave.harness") / "guest.xml").read_text()
    template = re.sub(r"<!--.*?-->\s*", "", template, flags=re.S)
    return template.format(
        name=name,
        uuid=domain_uuid or str(_uuid.uuid4()),
        domain_type="kvm" if accel() == "kvm" else "qemu",
        memory_mib=memory_mib,
        vcpus=vcpus,
        kernel=GUEST_DIR / "vmlinuz",
        initrd=GUEST_DIR / "initrd.gz",
        fill_mib=fill_mib,
        serial_log=Path(serial_dir) / f"{name}-serial.log" if serial_dir is not None else serial_log(name),
    )


def disk_path(name: str) -> Path:
    """The qcow2 disk :func:`create_real` makes for *name*."""
    return DISK_DIR / f"{name}.qcow2"


def real_guest_xml(name: str, disk: str | os.PathLike[str], memory_mib: int = 256, fill_mib: int = 32,
                   vcpus: int = 1, domain_uuid: str | None = None, network: str = NETWORK) -> str:
    """The domain XML of a guest shaped like a real one (template ``realguest.xml``) on *disk*."""
    for f in (OVMF_CODE, OVMF_VARS):
        if not f.is_file():
            raise LaunchError(f"UEFI firmware missing ({f}; Debian package ovmf): run scripts/setup")
    _require_built()
    template = (resources.files("virtsave.harness") / "realguest.xml").read_text()
    template = re.sub(r"<!--.*?-->\s*", "", template, flags=re.S)
    return template.format(
        name=name, uuid=domain_uuid or str(_uuid.uuid4()),
        domain_type="kvm" if accel() == "kvm" else "qemu", memory_mib=memory_mib, vcpus=vcpus,
        kernel=GUEST_DIR / "vmlinuz", initrd=GUEST_DIR / "initrd.gz", fill_mib=fill_mib,
        serial_log=serial_log(name), loader=OVMF_CODE, vars_template=OVMF_VARS, disk=os.fspath(disk),
        network=network)


def make_disk(path: str | os.PathLike[str], size_mib: int = 64) -> None:
    """An empty qcow2 disk of *size_mib* MiB at *path* (``qemu-img create``)."""
    Path(path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", os.fspath(path), f"{size_mib}M"],
                       check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise LaunchError(f"cannot create the test disk {path}: {exc}") from None


def nvram_path(dom: libvirt.virDomain) -> Path | None:
    """The domain's UEFI variable store (libvirt made it from the template), if it has one."""
    m = re.search(r"<nvram[^>]*>([^<]+)</nvram>", dom.XMLDesc(0))
    return Path(m.group(1)) if m else None


def _require_network(conn: libvirt.virConnect, network: str) -> None:
    try:
        active = conn.networkLookupByName(network).isActive()
    except libvirt.libvirtError:
        active = False
    if not active:
        raise LaunchError(f"libvirt network {network!r} is not active: run scripts/setup (it starts it)")


def create_real(conn: libvirt.virConnect, name: str, memory_mib: int = 256, fill_mib: int = 32, vcpus: int = 1,
                disk_mib: int = 64, start: bool = True) -> libvirt.virDomain:
    """Define (persistent) and optionally start a guest shaped like a real one, with a fresh
    *disk_mib* MiB qcow2 disk (:func:`disk_path`); :func:`remove` takes it all away again."""
    _require_network(conn, NETWORK)
    xml = real_guest_xml(name, disk_path(name), memory_mib, fill_mib, vcpus)
    with contextlib.suppress(FileNotFoundError):
        serial_log(name).unlink()
    make_disk(disk_path(name), disk_mib)
    try:
        dom = conn.defineXML(xml)
        if start:
            dom.create()
    except libvirt.libvirtError:
        remove(conn, name)
        raise
    return dom


def create(conn: libvirt.virConnect, name: str, memory_mib: int = 256, fill_mib: int = 64,
           vcpus: int = 1, start: bool = True, serial_dir: str | os.PathLike[str] | None = None) -> libvirt.virDomain:
    """Define (persistent) and optionally start a test guest. *serial_dir*: where its serial log goes
    (a directory the daemon's QEMU user may write; default :data:`SERIAL_LOG_DIR`)."""
    if serial_dir is not None:
        SERIAL_DIRS[name] = Path(serial_dir)
    with contextlib.suppress(FileNotFoundError):
        serial_log(name).unlink()
    dom = conn.defineXML(guest_xml(name, memory_mib, fill_mib, vcpus))
    if start:
        try:
            dom.create()
        except libvirt.libvirtError:
            remove(conn, name)
            raise
    return dom


def remove(conn: libvirt.virConnect, name: str) -> None:
    """Destroy and undefine *name* with its managed-save image, NVRAM, serial log and the disk
    :func:`create_real` made; quiet if gone."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        dom = None
    if dom is not None:
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA \
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefineFlags(flags)
    # libvirt keeps the domain's QEMU log after undefine; a throwaway guest leaves nothing behind.
    for log in (serial_log(name), SERIAL_LOG_DIR / f"{name}.log", disk_path(name)):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            log.unlink()
    SERIAL_DIRS.pop(name, None)


def ticks(name: str) -> list[int]:
    """Every tick number the guest printed so far, in order."""
    try:
        data = serial_log(name).read_bytes()
    except FileNotFoundError:
        return []
    return [int(m) for m in _TICK.findall(data)]


def last_tick(name: str) -> int:
    """The newest tick number (0 when none yet)."""
    t = ticks(name)
    return t[-1] if t else 0


def wait_tick(name: str, at_least: int = 1, timeout: float = 90.0) -> int:
    """Wait until the guest printed a tick >= *at_least*; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = last_tick(name)
        if t >= at_least:
            return t
        time.sleep(0.2)
    raise VirtsaveError(f"guest {name} printed no tick >= {at_least} within {timeout:.0f} s "
                        f"(last {last_tick(name)}; see {serial_log(name)})")


@dataclass(frozen=True)
class TickMark:
    """Where a guest's tick counter stood at a save point: how many ticks its serial log held then
    (``count``) and the counter's value then (``last``: every tick printed after a faithful restore
    must be greater)."""

    name: str
    count: int
    last: int


def tick_mark(name: str, *, floor: int | None = None) -> TickMark:
    """Mark the save point now. *floor* overrides the value to beat (for an image made elsewhere, e.g.
    by a replay: the counter it holds is at least the traced guest's value at the libvirt save).

    >>> tick_mark("vs-doctest-no-such-guest")
    TickMark(name='vs-doctest-no-such-guest', count=0, last=0)
    """
    t = ticks(name)
    return TickMark(name, len(t), (t[-1] if t else 0) if floor is None else floor)


@dataclass(frozen=True)
class Continuity:
    """The tick counter across a save point: the last value before it, the first printed after it, and
    how many restarts (a tick of value 1) came after it."""

    last_before: int
    first_after: int
    restarts: int

    @property
    def survived(self) -> bool:
        """The guest's memory came back: the counter went on past the save point and never restarted.

        >>> Continuity(5, 6, 0).survived, Continuity(5, 3, 0).survived, Continuity(2, 3, 1).survived
        (True, False, False)
        """
        return self.last_before > 0 and self.first_after > self.last_before and self.restarts == 0

    def __str__(self) -> str:
        return (f"tick counter {self.last_before} → {self.first_after}"
                + (f", {self.restarts} restart(s)" if self.restarts else ""))


def wait_ticks_continue(mark: TickMark, timeout: float = 30.0, *, settle: int = 2) -> Continuity:
    """After a restore: wait for *settle* ticks printed after *mark* and compare them with it.

    Every tick after the mark counts (also those printed before this call), so a guest that rebooted
    before the call shows as a restart and a first value not above the mark.
    """
    deadline = time.monotonic() + timeout
    while True:
        new = ticks(mark.name)[mark.count:]
        if len(new) >= settle or (new and time.monotonic() >= deadline):
            return Continuity(mark.last, new[0], sum(1 for x in new if x == 1))
        if time.monotonic() >= deadline:
            raise VirtsaveError(f"guest {mark.name} printed no tick within {timeout:.0f} s after restore")
        time.sleep(0.2)


def unique_name(prefix: str = "vs-test") -> str:
    """A domain name that will not collide with anyone else's on a shared daemon."""
    return f"{prefix}-{os.getpid()}-{_uuid.uuid4().hex[:6]}"
