"""Direct backend against real QEMU and the real libvirtd: replay, direct save/restore.

Each test kills every QEMU it launched (also on failure). Guests are 256 MiB.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
import uuid as _uuid
from pathlib import Path

import pytest
from badinput import make_qemu_wrapper
from conftest import QEMU_VERSION, kill_qemus, needs_mapped_ram, require_format

from virtsave.harness import guest
from virtsave.image import saveimage
from virtsave.libvirtd import domainlog, logparse
from virtsave.qemu import launch as qemu_launch
from virtsave.qemu import migration
from virtsave.trace import model as trace

pytestmark = pytest.mark.integration

FIX = Path(__file__).resolve().parent.parent / "fixtures"
#: Save only once the replayed guest counts (a save before "tick 1" would restore to a first "tick 1").
WAIT = r"tick [2-9]"


_RUN_DIRS: list[str] = []


@pytest.fixture(autouse=True)
def _kill_our_qemus():
    pids: list[int] = []
    yield pids
    kill_qemus(pids)
    while _RUN_DIRS:  # left by 'direct restore' (its QEMU outlives the command)
        shutil.rmtree(_RUN_DIRS.pop(), ignore_errors=True)


def _trace(cli, name: str, path: Path, sparse: bool = False) -> None:
    """``virtsave trace`` of the guest: a live trace, never a recorded stand-in (a broken trace fails here)."""
    extra = ["--image-format", "sparse", "--parallel-channels", "2"] if sparse else []
    proc = cli("trace", name, "-o", str(path), *extra)
    assert proc.returncode == 0, f"virtsave trace failed: {proc.stderr}"


def _restarts_free(ticks: list[int]) -> bool:
    """One boot (a single 'tick 1') and a counter that never goes back to 1."""
    return ticks.count(1) == 1 and len(ticks) >= 2


def _libvirt_restores(conn, name: str, image: Path, floor: int = 2) -> None:
    """libvirt accepts *image* and the counter goes on past *floor*, never restarting. A replay's save
    phase boots the traced command line and saves once its guest printed a tick >= 2 (``WAIT``), so the
    image's counter is at least 2: a guest restored from it prints 3 or more, a rebooted one 1."""
    dom = conn.lookupByName(name)
    if dom.isActive():
        dom.destroy()
    mark = guest.tick_mark(name, floor=floor)
    conn.restore(str(image))
    c = guest.wait_ticks_continue(mark, timeout=60)
    assert c.survived, c


def test_replay_raw_trace_and_virsh_restore(cli, conn, make_guest, workdir):
    name = make_guest(256, 32)
    t, r, img, slog = workdir / "t.json", workdir / "r.json", workdir / "r.save", workdir / "serial.log"
    _trace(cli, name, t)
    proc = cli("replay", str(t), "-o", str(r), "--image", str(img), "--serial-log", str(slog),
               "--run-after", "2", "--wait-serial", WAIT)
    assert proc.returncode == 0, proc.stderr
    out = trace.load(r)  # validates
    assert out["source"] == "direct" and out["replay"]["mode"] == "faithful"
    assert [p["name"] for p in out["phases"]] == ["save", "restore"] and all(p["ok"] for p in out["phases"])
    save = out["phases"][0]
    assert any(m.get("execute") == "getfd" and m.get("fds") == 1 for m in save["messages"])
    assert any(m.get("event") == "MIGRATION" and m["data"]["status"] == "completed" for m in save["messages"])
    assert oct(img.stat().st_mode & 0o777) == "0o600"
    hdr = saveimage.read_header_path(img)
    assert not hdr.partial and hdr.format == "raw"
    # Our own restore: one boot, the counter went on after the restore.
    ticks = [int(x.split()[1]) for x in slog.read_text().splitlines() if x.startswith("tick ")]
    assert _restarts_free(ticks), ticks
    _libvirt_restores(conn, name, img)


def test_replay_essential_tcp(cli, conn, make_guest, workdir):
    name = make_guest(256, 32)
    t, r, img = workdir / "t.json", workdir / "r.json", workdir / "r.save"
    _trace(cli, name, t)
    proc = cli("replay", str(t), "-o", str(r), "--image", str(img), "--transport", "tcp", "--mode", "essential",
               "--wait-serial", WAIT)
    assert proc.returncode == 0, proc.stderr
    out = trace.load(r)
    assert out["replay"]["transport"] == "tcp" and out["replay"]["mode"] == "essential"
    for ph in out["phases"]:
        assert ph["ok"]
        subs = ph["substitutions"]
        uri = [s for s in subs if s["field"] == "arguments.uri"]
        # QEMU >= 8.2 opens the image itself (file: URI); before, the image is written and read
        # through our own dd behind an exec: URI (never a command taken from the trace)
        want = f"file:{img},offset=0x" if migration.has_file_uri(QEMU_VERSION or (0, 0, 0)) else "exec:dd "
        assert uri and uri[0]["replacement"].startswith(want) and str(img) in uri[0]["replacement"], subs
        cmds = [m["execute"] for m in trace.iter_commands(ph)]
        assert "getfd" not in cmds and not any(c.startswith(("query-", "qom-")) for c in cmds), cmds
    assert [s for s in out["phases"][0]["substitutions"] if s["field"] == "fds"]
    _libvirt_restores(conn, name, img)


@needs_mapped_ram
def test_replay_sparse_parallel2(cli, conn, make_guest, workdir):
    require_format("sparse")   # libvirt writes the traced sparse save
    name = make_guest(256, 32)
    t, r, img = workdir / "t.json", workdir / "r.json", workdir / "r.save"
    _trace(cli, name, t, sparse=True)
    proc = cli("replay", str(t), "-o", str(r), "--image", str(img), "--wait-serial", WAIT)
    assert proc.returncode == 0, proc.stderr
    out = trace.load(r)
    save = out["phases"][0]
    assert any(m.get("execute") == "add-fd" and m.get("fds") == 1 for m in save["messages"])
    mig = next(m for m in trace.iter_commands(save) if m["execute"] == "migrate")
    hdr = saveimage.read_header_path(img)
    assert hdr.format == "sparse" and not hdr.partial
    assert mig["arguments"]["uri"].endswith(f",offset={hdr.stream_offset:#x}")
    params = [m["arguments"] for m in trace.iter_commands(save) if m["execute"] == "migrate-set-parameters"]
    assert params[0].get("multifd-channels") == 2
    assert out["phases"][1]["ok"]
    # Sparse: fewer blocks allocated than the file's length.
    assert img.stat().st_blocks * 512 < img.stat().st_size
    _libvirt_restores(conn, name, img)


def test_direct_restore_of_libvirt_managed_save(cli, conn, make_guest, _kill_our_qemus):
    name = make_guest(256, 32)
    guest.wait_tick(name, 3)
    argv = domainlog.argv_from_domain_log(f"/var/log/libvirt/qemu/{name}.log")
    dom = conn.lookupByName(name)
    dom.managedSave(0)
    image = f"/var/lib/libvirt/qemu/save/{name}.save"
    before = guest.tick_mark(name)
    proc = cli("--json", "direct", "restore", image, "--serial-log", str(guest.serial_log(name)), "--", *argv)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    _kill_our_qemus.append(res["pid"])
    _RUN_DIRS.append(res["run_dir"])
    assert res["status"] == "running"
    c = guest.wait_ticks_continue(before, timeout=60)
    assert c.survived, c


@pytest.mark.parametrize("transport, fmt, extra", [
    ("unix", "raw", ()), ("tcp", "raw", ()),
    pytest.param("unix", "sparse", (), marks=needs_mapped_ram),
    pytest.param("unix", "sparse", ("--bypass-cache",), marks=needs_mapped_ram)])
def test_direct_save_of_hand_started_qemu(cli, conn, workdir, _kill_our_qemus, transport, fmt, extra):
    name = guest.unique_name()
    uid = str(_uuid.uuid4())
    xml = guest.guest_xml(name, 256, 32, domain_uuid=uid)
    xml_file = workdir / "dom.xml"
    xml_file.write_text(xml)
    sock = workdir / "qmp.sock"
    port = qemu_launch.free_tcp_port()
    serial = guest.serial_log(name)
    g = "/var/lib/virtsave/guest"
    argv = ["qemu-system-x86_64", "-name", f"guest={name}", "-machine", "pc,usb=off,acpi=off",
            "-accel", guest.accel(), "-cpu", "qemu64", "-m", "256", "-smp", "1", "-uuid", uid,
            "-display", "none", "-no-user-config", "-nodefaults", "-rtc", "base=utc", "-no-shutdown",
            "-kernel", f"{g}/vmlinuz", "-initrd", f"{g}/initrd.gz",
            "-append", "console=ttyS0 quiet panic=-1 virtsave.fill=32",
            "-device", "piix3-usb-uhci,id=usb,bus=pci.0,addr=0x1.0x2",
            "-chardev", f"file,id=charserial0,path={serial},append=on",
            "-device", "isa-serial,chardev=charserial0,id=serial0,index=0",
            "-qmp", f"unix:{sock},server=on,wait=off" if transport == "unix" else
            f"tcp:127.0.0.1:{port},server=on,wait=off"]
    qmp = f"unix:{sock}" if transport == "unix" else f"tcp:127.0.0.1:{port}"
    q = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_our_qemus.append(q.pid)
    try:
        guest.wait_tick(name, 2, timeout=120)
        img = workdir / "hand.save"
        proc = cli("direct", "save", "--qmp", qmp, str(img), "--xml", str(xml_file), "--image-format", fmt,
                   "--parallel-channels", "2" if fmt == "sparse" else "1", *extra)
        assert proc.returncode == 0, proc.stderr
        assert q.wait(30) == 0  # quit, not killed
        hdr = saveimage.read_header_path(img)
        assert not hdr.partial and f"<name>{name}</name>" in hdr.xml and hdr.format == fmt
        before = guest.tick_mark(name)   # QEMU quit after the save: the last tick is the counter saved
        conn.restore(str(img))
        c = guest.wait_ticks_continue(before, timeout=60)
        assert c.survived, c
    finally:
        guest.remove(conn, name)


def test_exec_trace_refused_nothing_started(cli, workdir):
    """The QEMU binary of the trace is a wrapper that records every launch: nothing may be recorded
    (our own process tracked, never a host-wide process scan)."""
    marker = f"vs-test-evil-{os.getpid()}-{time.monotonic_ns()}"
    wrapper, launches = make_qemu_wrapper(workdir)
    tr = trace.new_trace("libvirt", domain={"name": marker, "argv": [
        str(wrapper), "-name", f"guest={marker}", "-m", "64", "-display", "none"]})
    ph = trace.add_phase(tr, "save", "managed-save")
    ph["messages"] += [trace.command("stop", id="libvirt-1"),
                       trace.command("migrate", {"detach": True, "uri": f"exec:touch {workdir}/pwned"},
                                     id="libvirt-2")]
    t = workdir / "evil.json"
    trace.dump(tr, t)
    proc = cli("replay", str(t), "--image", str(workdir / "evil.save"), "--phases", "save")
    assert proc.returncode == 2
    assert "exec:" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not launches.exists(), f"QEMU was launched: {launches.read_text()}"
    assert not (workdir / "pwned").exists() and not (workdir / "evil.save").exists()


def test_debian12_trace_replays_on_this_qemu(cli, workdir):
    """libvirt 9.0 + QEMU 7.2's managed save/start (machine pc-i440fx-7.2) replayed on this QEMU: on QEMU 10
    with libvirt 9.0's capabilities that QEMU lacks left out; on QEMU 7.2 (the debian12 stack) as traced."""
    argv = domainlog.argv_from_domain_log(FIX / "qemu-domain-logs" / "fxa.log", 0)
    tr = trace.new_trace("libvirt", host={"libvirt": "9.0.0", "qemu": "7.2.0"},
                         domain={"name": "fxa", "uuid": None, "xml": None, "argv": argv})
    for log, name in (("managedsave-running.log", "save"), ("managedsave-restore.log", "restore")):
        src = logparse.trace_from_log(FIX / "libvirt-9.0-attributed" / log, domain="fxa")
        tr["phases"].append(next(p for p in src["phases"] if p["name"] == name))
    t, r = workdir / "deb12.json", workdir / "r.json"
    trace.dump(tr, t)
    proc = cli("replay", str(t), "-o", str(r), "--image", str(workdir / "d.save"))
    assert proc.returncode == 0, proc.stderr
    out = trace.load(r)
    assert all(p["ok"] for p in out["phases"])
    left_out = {c["capability"] for s in out["phases"][0]["substitutions"] if s["field"] == "arguments.capabilities"
                for c in s["original"] if c not in s["replacement"]}
    # QEMU 9.1 removed the 'compress' capability libvirt 9.0 sets (off): left out there, and said so.
    assert ("compress" in left_out) == (QEMU_VERSION is not None and QEMU_VERSION >= (9, 1, 0)), left_out


def test_direct_restore_of_libvirt_zstd_save(cli, conn, make_guest, workdir, _kill_our_qemus):
    """A compressed libvirt image goes through the decompressor into QEMU, as libvirt does it."""
    require_format("zstd")
    name = make_guest(256, 32)
    guest.wait_tick(name, 3)
    argv = domainlog.argv_from_domain_log(f"/var/log/libvirt/qemu/{name}.log")
    img = workdir / "z.save"
    subprocess.run(["virsh", "-c", "qemu:///system", "save", name, str(img), "--image-format", "zstd"],
                   check=True, capture_output=True)
    assert saveimage.read_header_path(img).format == "zstd"
    before = guest.tick_mark(name)
    proc = cli("--json", "direct", "restore", str(img), "--serial-log", str(guest.serial_log(name)), "--", *argv)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    _kill_our_qemus.append(res["pid"])
    _RUN_DIRS.append(res["run_dir"])
    c = guest.wait_ticks_continue(before, timeout=60)
    assert c.survived, c


def _takes_o_direct(d: Path) -> bool:
    """Whether files in *d* can be opened with O_DIRECT (tmpfs: Linux >= 6.6)."""
    probe = d / ".o_direct_probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError as exc:
        assert exc.errno == errno.EINVAL, exc
        return False
    os.close(fd)
    probe.unlink()
    return True


@needs_mapped_ram
def test_direct_save_bypass_cache_to_tmpfs_completes_or_refuses_cleanly(cli, conn, workdir, _kill_our_qemus):
    """tmpfs takes O_DIRECT only on kernels >= 6.6: either the save completes with a complete image,
    or it is one line, exit 2, the guest resumed and no image left — never a half-written image."""
    name = guest.unique_name()
    sock = workdir / "qmp.sock"
    serial = guest.serial_log(name)
    g = "/var/lib/virtsave/guest"
    mnt = workdir / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(mnt)], check=True)
    argv = ["qemu-system-x86_64", "-machine", "pc,acpi=off", "-accel", guest.accel(), "-m", "128", "-nodefaults",
            "-display", "none", "-kernel", f"{g}/vmlinuz", "-initrd", f"{g}/initrd.gz",
            "-append", "console=ttyS0 quiet panic=-1 virtsave.fill=8",
            "-chardev", f"file,id=s0,path={serial},append=on", "-device", "isa-serial,chardev=s0",
            "-qmp", f"unix:{sock},server=on,wait=off"]
    q = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_our_qemus.append(q.pid)
    try:
        guest.wait_tick(name, 1, timeout=120)
        img = mnt / "x.save"
        direct_io = _takes_o_direct(mnt)     # asked of the kernel here, not of virtsave
        proc = cli("direct", "save", "--qmp", f"unix:{sock}", str(img), "--image-format", "sparse",
                   "--parallel-channels", "2", "--bypass-cache")
        if direct_io:   # a kernel whose tmpfs takes O_DIRECT (>= 6.6): then the image must be complete
            assert proc.returncode == 0, proc.stderr
            assert not saveimage.read_header_path(img).partial
            return
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "O_DIRECT" in proc.stderr, proc.stderr
        assert not img.exists()
        before = guest.last_tick(name)
        guest.wait_tick(name, before + 1, timeout=30)  # resumed: still counting
        assert q.poll() is None
    finally:
        q.kill()
        q.wait(10)
        subprocess.run(["umount", str(mnt)], check=False)
        guest.remove(conn, name)
