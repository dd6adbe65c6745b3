"""Replaying guests shaped like real ones (issue 16) against the real libvirtd and QEMU.

The guest is :func:`virtsave.harness.guest.create_real`: q35, UEFI with per-domain NVRAM (Debian's
ovmf), a qcow2 virtio disk, a virtio NIC on libvirt's default network, a guest-agent channel, VNC on
127.0.0.1 with virtio video, USB tablet, virtio RNG, balloon, pty serial — booting the tick guest.

What the tests prove, each on a live trace of such a guest:

* a replay never writes what the original owns: the original's disk, NVRAM and managed-save image
  keep their sha256 while the replayed QEMU writes into its disk and its NVRAM (``qemu-io`` through
  its own monitor), with the original running and with it shut off holding a managed-save image
  (which then still restores, the guest's counter going on);
* the replayed QEMU has the original's guest-visible devices (``query-pci``) and NIC features, while
  its NIC, agent channel and display are private (no host network, no libvirt socket, no TCP port);
* trace → replay (faithful and essential) → ``--diff``; the replay's image restored by libvirt
  (``virsh restore --xml``) onto a copy of the disk, the tick counter going on;
* ``direct save``/``direct restore`` of a hand-started QEMU with a disk and UEFI: the restore is the
  guest, its writes land in its own disk;
* a traced device no replay can run: one line naming it, exit 2, nothing started.

Every guest and QEMU made here is removed again, also on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from virtsave.core.errors import QMPError
from virtsave.harness import guest
from virtsave.image import saveimage
from virtsave.libvirtd import domainlog
from virtsave.qemu import launch as qemu_launch
from virtsave.qemu import replay
from virtsave.qemu.qmp import QMPSession
from virtsave.trace import model as trace

pytestmark = pytest.mark.integration

FIX = Path(__file__).resolve().parent.parent / "fixtures"
#: Save only once the replayed guest counts (a save before "tick 1" would restore to a first "tick 1").
WAIT = r"tick [2-9]"
#: UEFI firmware boot under TCG: the first tick comes after ≈ 15 s on an idle machine.
BOOT_TIMEOUT = 300
#: What the replayed QEMU writes through its own monitor: into the disk, and into the NVRAM.
DISK_WRITE = "write -P 0x5a 0 64k"
NVRAM_WRITE = "write -P 0xa5 0 4k"


@pytest.fixture
def real_guest(conn):
    """Factory: ``name = real_guest()`` boots a real-shaped guest and waits for its first tick."""
    made: list[str] = []

    def make(memory_mib: int = 256, fill_mib: int = 32) -> str:
        name = guest.unique_name("vs-test-real")
        made.append(name)
        guest.create_real(conn, name, memory_mib=memory_mib, fill_mib=fill_mib)
        guest.wait_tick(name, 1, timeout=BOOT_TIMEOUT)
        return name

    yield make
    for name in made:
        guest.remove(conn, name)


@pytest.fixture(autouse=True)
def _kill_our_qemus(our_qemus: list[int]) -> list[int]:
    return our_qemus


def _sha(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _trace(cli, name: str, path: Path) -> trace.Trace:
    proc = cli("trace", name, "-o", str(path))
    assert proc.returncode == 0, f"virtsave trace failed: {proc.stderr}"
    return trace.load(path)


def _monitor(conn, name: str, execute: str, arguments: dict[str, Any] | None = None) -> Any:
    """A read-only query to the original's QEMU, through libvirt (which owns its monitor)."""
    cmd = {"execute": execute, **({"arguments": arguments} if arguments else {})}
    return json.loads(libvirt_qemu.qemuMonitorCommand(conn.lookupByName(name), json.dumps(cmd), 0))["return"]


def _pci(devices: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Every PCI function the guest sees: bus, slot, function, vendor/device ids, qdev id (recursively)."""
    out: list[tuple[Any, ...]] = []
    for d in devices:
        out.append((d["bus"], d["slot"], d["function"], d["id"]["vendor"], d["id"]["device"], d.get("qdev_id")))
        out += _pci(((d.get("pci_bridge") or {}).get("devices")) or [])
    return out


def _guest_pci(query: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted(t for bus in query for t in _pci(bus["devices"]))


def _net_features(ask: Any) -> list[str] | None:
    """The virtio-net device's offered features (``x-query-virtio-status``), None on a QEMU without it."""
    try:
        st = ask("x-query-virtio-status", {"path": "/machine/peripheral/net0/virtio-backend"})
    except (libvirt.libvirtError, QMPError) as exc:
        if "not found" in str(exc).lower():   # CommandNotFound: a QEMU without it
            return None
        raise
    return sorted(st["host-features"]["dev-features"])


def _hmp(s: QMPSession, line: str) -> str:
    return str(s.execute("human-monitor-command", {"command-line": line}))


def _write_through_replay(s: QMPSession, log: Path) -> None:
    """The replayed QEMU writes its disk and its NVRAM and reads its writes back (``qemu-io`` prints to
    QEMU's stdout, which the launcher keeps in *log*; the monitor answers only errors)."""
    disk = "/machine/peripheral/virtio-disk0/virtio-backend"
    for dev, write in ((disk, DISK_WRITE), ("/machine/system.flash1", NVRAM_WRITE)):
        pattern, offset, length = write.split()[2:]
        for cmd in (write, f"read -P {pattern} {offset} {length}"):
            err = _hmp(s, f'qemu-io -d {dev} "{cmd}"')
            assert err == "", err
    out = log.read_text(errors="replace")
    assert out.count("wrote 65536/65536 bytes at offset 0") == 1 and out.count("wrote 4096/4096 bytes at offset 0") == 1
    assert "read 65536/65536 bytes" in out and "Pattern verification failed" not in out, out


def _kept_qemu(out: trace.Trace) -> qemu_launch.QemuProcess:
    info = out["replay"]["qemu"]
    return next(p for p in qemu_launch.LAUNCHED if p.pid == info["pid"])


def _replay_and_write(tr_in: trace.Trace, workdir: Path, tag: str) -> tuple[trace.Trace, qemu_launch.QemuProcess]:
    out = replay.replay(tr_in, image=str(workdir / f"{tag}.save"), keep_running=True, serial_pattern=WAIT,
                        serial_log=str(workdir / f"{tag}-serial.log"), run_for=1.0)
    assert all(p["ok"] for p in out["phases"])
    proc = _kept_qemu(out)
    with QMPSession(proc.qmp_address) as s:
        _write_through_replay(s, proc.stderr_path)
    return out, proc


def _stop(proc: qemu_launch.QemuProcess) -> None:
    """Stop a replay's QEMU: its run dir and its disk overlays go with it."""
    overlays = proc.plan.overlay_dir
    proc.stop(grace=2.0)
    assert not proc.plan.run_dir.exists()
    assert overlays is not None and not overlays.exists(), overlays


def _netdev(pid: int) -> dict[str, Any]:
    """The (JSON) ``-netdev`` a replayed QEMU runs with."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return dict(json.loads(argv[argv.index(b"-netdev") + 1]))


def _link_exists(ifname: str) -> bool:
    return subprocess.run(["ip", "link", "show", ifname], capture_output=True).returncode == 0


# ----------------------------------------------------------------------------------- 1-3: the original is safe


def test_replay_never_writes_the_originals_running_or_managed_saved(cli, conn, real_guest, workdir):
    name = real_guest()
    guest.wait_tick(name, 2, timeout=60)
    t = _trace(cli, name, workdir / "t.json")
    dom = conn.lookupByName(name)
    disk, nvram = guest.disk_path(name), guest.nvram_path(dom)
    assert nvram is not None and nvram.is_file()
    originals = {p: _sha(p) for p in (disk, nvram)}

    # -- the original runs: the replay writes its own disk and NVRAM, the original's stay as they were
    out, proc = _replay_and_write(t, workdir, "running")
    rewrites = out["replay"]["argv_rewrites"]["restore"]
    assert any(r["option"] == "-blockdev" and "overlay" in r["reason"] for r in rewrites), rewrites
    assert any(".qcow2" in r["replacement"] and "vs-ovl-" in r["replacement"] for r in rewrites)
    tap = _netdev(proc.pid)["ifname"]
    assert _link_exists(tap)
    _stop(proc)
    assert {p: _sha(p) for p in (disk, nvram)} == originals
    assert dom.isActive() and guest.wait_tick(name, guest.last_tick(name) + 1, timeout=30)
    assert not _link_exists(tap)      # the replay's tap went with its QEMU

    # -- the original is shut off with a managed-save image: a replay must not spoil its next start
    dom.managedSave(0)
    managed = Path(f"/var/lib/libvirt/qemu/save/{name}.save")
    saved = {p: _sha(p) for p in (disk, nvram, managed)}
    mark = guest.tick_mark(name)
    _, proc = _replay_and_write(t, workdir, "saved")
    _stop(proc)
    assert {p: _sha(p) for p in (disk, nvram, managed)} == saved
    dom.create()                # restores the managed-save image
    c = guest.wait_ticks_continue(mark, timeout=60)
    assert c.survived, c


def test_replayed_devices_are_the_originals_and_reach_nothing_of_the_host(cli, conn, real_guest, workdir):
    name = real_guest()
    guest.wait_tick(name, 2, timeout=60)
    t = _trace(cli, name, workdir / "t.json")
    pci = _guest_pci(_monitor(conn, name, "query-pci"))
    features = _net_features(lambda c, a=None: _monitor(conn, name, c, a))
    chardevs = {c["label"]: c["filename"] for c in _monitor(conn, name, "query-chardev")}
    agent = re.search(r"unix:([^,]+)", chardevs["charchannel0"]).group(1)   # "disconnected:unix:PATH,server=on"
    agent_before = os.stat(agent)
    vnc_before = _monitor(conn, name, "query-vnc")

    out = replay.replay(t, image=str(workdir / "r.save"), keep_running=True, serial_pattern=WAIT,
                        serial_log=str(workdir / "serial.log"), run_for=1.0)
    proc = _kept_qemu(out)
    run_dir = str(proc.plan.run_dir)
    with QMPSession(proc.qmp_address) as s:
        # the guest sees the same PCI functions, and the NIC offers the same features (state loadable)
        assert _guest_pci(s.execute("query-pci")) == pci
        mine = _net_features(s.execute)
        if features is not None:
            assert mine == features
        # the agent channel and the serial port are private files; VNC listens on a private socket
        ours = {c["label"]: c["filename"] for c in s.execute("query-chardev")}
        assert re.search(r"unix:([^,]+)", ours["charchannel0"]).group(1).startswith(f"{run_dir}/"), ours
        assert "fd" not in ours["charchannel0"]
        vnc = s.execute("query-vnc")
        assert vnc.get("enabled") and vnc.get("family") == "unix" and run_dir in str(vnc.get("service")), vnc
    netdev = _netdev(proc.pid)
    assert netdev["type"] == "tap" and netdev["script"] == "no" and "fd" not in netdev, netdev
    link = subprocess.run(["ip", "-d", "link", "show", netdev["ifname"]], capture_output=True, text=True).stdout
    assert "master" not in link and "state DOWN" in link and "inet" not in link, link   # in no bridge, down
    ticks = [int(x.split()[1]) for x in (workdir / "serial.log").read_text(errors="replace").split("\n")
             if x.startswith("tick ")]
    assert ticks.count(1) == 1 and len(ticks) >= 2, ticks    # one boot, the counter went on after the restore
    _stop(proc)
    # the original's own channel socket and display are untouched
    assert os.stat(agent).st_ino == agent_before.st_ino
    assert _monitor(conn, name, "query-vnc") == vnc_before


# ----------------------------------------------------------------------------------- 6: trace, replay, restore


def _libvirt_xml_onto_copies(xml: str, disk: Path, disk_copy: Path, nvram: Path, nvram_copy: Path) -> str:
    assert str(disk) in xml and str(nvram) in xml
    return xml.replace(f"'{disk}'", f"'{disk_copy}'").replace(f">{nvram}<", f">{nvram_copy}<")


def test_trace_replay_diff_and_libvirt_restores_the_replay_onto_a_copy(cli, conn, real_guest, workdir):
    name = real_guest()
    guest.wait_tick(name, 2, timeout=60)
    t = workdir / "t.json"
    _trace(cli, name, t)
    for mode in ("essential", "faithful"):
        r, img = workdir / f"{mode}.json", workdir / f"{mode}.save"
        proc = cli("replay", str(t), "-o", str(r), "--image", str(img), "--mode", mode, "--diff",
                   "--wait-serial", WAIT, "--serial-log", str(workdir / f"{mode}-serial.log"))
        # --diff exits 1 while differences remain: essential mode skips the probes by design; the faithful
        # replay of a real guest differs only where its writable disks are overlays (README "Real guests").
        assert proc.returncode == 1, proc.stdout + proc.stderr
        if mode == "faithful":
            changed = {x.split()[1] for x in proc.stdout.splitlines() if x[:2] in ("~ ", "+ ", "- ", "> ")}
            assert changed == {"query-block"}, proc.stdout
        out = trace.load(r)
        assert out["replay"]["mode"] == mode and all(p["ok"] for p in out["phases"])
        assert proc.stdout.strip(), "no diff printed"
        reasons = {x["reason"] for x in out["replay"]["argv_rewrites"]["save"]}
        assert any("overlay" in x for x in reasons) and any("tap device" in x for x in reasons), reasons
        assert any("agent" in x for x in reasons) and any("VNC" in x for x in reasons), reasons
    # libvirt takes the faithful replay's image, onto copies of the disk and the NVRAM
    dom = conn.lookupByName(name)
    disk, nvram = guest.disk_path(name), guest.nvram_path(dom)
    assert nvram is not None
    dom.destroy()
    originals = {p: _sha(p) for p in (disk, nvram)}
    disk_copy, nvram_copy = workdir / "copy.qcow2", workdir / "copy_VARS.fd"
    shutil.copyfile(disk, disk_copy)
    shutil.copyfile(nvram, nvram_copy)
    img = workdir / "faithful.save"
    xml = _libvirt_xml_onto_copies(saveimage.read_header_path(img).xml, disk, disk_copy, nvram, nvram_copy)
    mark = guest.tick_mark(name, floor=2)
    conn.restoreFlags(str(img), xml, 0)
    c = guest.wait_ticks_continue(mark, timeout=90)
    assert c.survived, c
    running = conn.lookupByName(name).XMLDesc(0)
    assert str(disk_copy) in running and str(nvram_copy) in running
    assert {p: _sha(p) for p in (disk, nvram)} == originals


def _hand_started_argv(name: str, workdir: Path, disk: Path, vars_copy: Path, sock: Path) -> list[str]:
    g = "/var/lib/virtsave/guest"
    return ["qemu-system-x86_64", "-name", f"guest={name}", "-machine", "q35,usb=off", "-accel", guest.accel(),
            "-cpu", "qemu64", "-m", "256", "-smp", "1", "-display", "none", "-no-user-config", "-nodefaults",
            "-blockdev", json.dumps({"driver": "file", "filename": str(guest.OVMF_CODE), "node-name": "code",
                                     "read-only": True}),
            "-blockdev", json.dumps({"driver": "file", "filename": str(vars_copy), "node-name": "vars"}),
            "-machine", "pflash0=code,pflash1=vars",
            "-kernel", f"{g}/vmlinuz", "-initrd", f"{g}/initrd.gz",
            "-append", "console=ttyS0 quiet panic=-1 virtsave.fill=32",
            "-blockdev", json.dumps({"driver": "file", "filename": str(disk), "node-name": "disk0-file"}),
            "-blockdev", json.dumps({"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"}),
            "-device", "virtio-blk-pci,drive=disk0,id=virtio-disk0",
            "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0,id=net0",
            "-chardev", f"file,id=charserial0,path={guest.serial_log(name)},append=on",
            "-device", "isa-serial,chardev=charserial0,id=serial0,index=0",
            "-qmp", f"unix:{sock},server=on,wait=off"]


def test_direct_save_and_restore_of_hand_started_qemu_with_disk(cli, workdir, _kill_our_qemus):
    name = guest.unique_name("vs-test-hand")
    disk, vars_copy, sock = workdir / "disk.qcow2", workdir / "VARS.fd", workdir / "qmp.sock"
    guest.make_disk(disk, 64)
    shutil.copyfile(guest.OVMF_VARS, vars_copy)
    argv = _hand_started_argv(name, workdir, disk, vars_copy, sock)
    q = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_our_qemus.append(q.pid)
    run_dir = None
    try:
        guest.wait_tick(name, 2, timeout=BOOT_TIMEOUT)
        img = workdir / "hand.save"
        proc = cli("direct", "save", "--qmp", f"unix:{sock}", str(img))
        assert proc.returncode == 0, proc.stderr
        assert q.wait(30) == 0
        mark = guest.tick_mark(name)
        restore_argv = argv[:argv.index("-qmp")]
        proc = cli("--json", "direct", "restore", str(img), "--serial-log", str(guest.serial_log(name)), "--",
                   *restore_argv)
        assert proc.returncode == 0, proc.stderr
        res = json.loads(proc.stdout)
        _kill_our_qemus.append(res["pid"])
        run_dir = res["run_dir"]
        c = guest.wait_ticks_continue(mark, timeout=60)
        assert c.survived, c
        # A restore is the guest itself: its disk is the real one, and what it writes stays there.
        cmdline = Path(f"/proc/{res['pid']}/cmdline").read_bytes().decode()
        assert str(disk) in cmdline and "vs-ovl-" not in cmdline and "vs-ro-" not in cmdline
        with QMPSession(res["qmp"]) as s:
            assert _hmp(s, f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "{DISK_WRITE}"') == ""
            s.quit()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{res['pid']}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        check = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 64k", str(disk)],
                               capture_output=True, text=True)
        assert check.returncode == 0 and "Pattern verification failed" not in check.stdout, check.stdout
    finally:
        q.kill()
        q.wait(10)
        if run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            guest.serial_log(name).unlink()


# ----------------------------------------------------------------------------------- 5: refused devices


@pytest.mark.parametrize("device", [
    ["-device", '{"driver":"vfio-pci","host":"0000:01:00.0","id":"hostdev0"}'],
    ["-device", '{"driver":"vhost-user-fs-pci","id":"fs0","chardev":"chr-vu-fs0","tag":"share"}'],
    ["-tpmdev", "emulator,id=tpm-tpm0,chardev=chrtpm"],
], ids=["vfio-pci", "virtiofs", "tpm-emulator"])
def test_unreplayable_device_one_line_exit_2_nothing_started(cli, workdir, device):
    marker = f"vs-test-refused-{os.getpid()}-{time.monotonic_ns()}"
    argv = domainlog.argv_from_domain_log(FIX / "qemu-domain-logs" / "fxa.log", 0)
    argv[argv.index("-name") + 1] = f"guest={marker}"
    tr_in = trace.new_trace("libvirt", domain={"name": marker, "argv": [*argv, *device]})
    ph = trace.add_phase(tr_in, "save", "managed-save")
    ph["messages"] += [trace.command("stop", id="libvirt-1"),
                       trace.command("migrate", {"detach": True, "uri": "fd:migrate"}, id="libvirt-2")]
    t = workdir / "refused.json"
    trace.dump(tr_in, t)
    for extra in ((), ("--allow-unsafe",)):
        proc = cli("replay", str(t), "--image", str(workdir / "r.save"), "--phases", "save", *extra)
        assert proc.returncode == 2, proc.stderr
        errors = [x for x in proc.stderr.splitlines() if x.startswith("virtsave: error:")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "cannot replay" in errors[0] and f"{device[0]} " in errors[0], errors[0]
        assert subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 1
        assert not (workdir / "r.save").exists()
