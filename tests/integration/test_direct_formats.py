"""Every compressed format, written by the direct path, restored by libvirt (issue 14, item 4).

``virtsave direct save --image-format F`` of a QEMU started by hand, and ``virtsave replay`` of a
trace whose save was compressed: ``virsh restore`` (libvirt's own decompressor and QEMU) must accept
the image and the guest's tick counter must go on from where it was saved. Not timed (the speed is
P8 of ``scripts/bench``). Guests are 256 MiB with 8 MiB filled: bzip2 and xz are slow on the
filler's random data.
"""

from __future__ import annotations

import subprocess
import uuid as _uuid
from pathlib import Path

import pytest
from conftest import needs_mapped_ram, require_format, restore_unavailable

from virtsave.core.operation import SaveOptions
from virtsave.harness import guest
from virtsave.image import saveimage
from virtsave.qemu import migration
from virtsave.qemu.backend import DirectBackend
from virtsave.trace import model as trace

pytestmark = pytest.mark.integration

GUEST_DIR = "/var/lib/virtsave/guest"


def _hand_started(name: str, uid: str, sock: Path, fill: int) -> list[str]:
    """A QEMU command line like the one libvirt gives the test guest (what ``virsh restore`` re-creates)."""
    return ["qemu-system-x86_64", "-name", f"guest={name}", "-machine", "pc,usb=off,acpi=off",
            "-accel", guest.accel(), "-cpu", "qemu64", "-m", "256", "-smp", "1", "-uuid", uid,
            "-display", "none", "-no-user-config", "-nodefaults", "-rtc", "base=utc", "-no-shutdown",
            "-kernel", f"{GUEST_DIR}/vmlinuz", "-initrd", f"{GUEST_DIR}/initrd.gz",
            "-append", f"console=ttyS0 quiet panic=-1 virtsave.fill={fill}",
            "-device", "piix3-usb-uhci,id=usb,bus=pci.0,addr=0x1.0x2",
            "-chardev", f"file,id=charserial0,path={guest.serial_log(name)},append=on",
            "-device", "isa-serial,chardev=charserial0,id=serial0,index=0",
            "-qmp", f"unix:{sock},server=on,wait=off"]


#: xz and bzip2 compress the filler's random data at a few MB/s on this machine kind: minutes.
SLOW = ("xz", "bzip2")


@pytest.mark.parametrize(("fmt", "extra"), [
    *[pytest.param(f, (), marks=pytest.mark.slow) if f in SLOW else (f, ()) for f in migration.COMPRESSORS],
    pytest.param("zstd", ("--bypass-cache",), id="zstd-bypass-cache")])
def test_direct_save_in_every_compressed_format_restores_in_libvirt(cli, conn, workdir, our_qemus, fmt, extra):
    name, uid, fill = guest.unique_name(), str(_uuid.uuid4()), 8
    xml_file = workdir / "dom.xml"
    xml_file.write_text(guest.guest_xml(name, 256, fill, domain_uuid=uid))
    sock = workdir / "qmp.sock"
    q = subprocess.Popen(_hand_started(name, uid, sock, fill), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    our_qemus.append(q.pid)
    try:
        guest.wait_tick(name, 2, timeout=120)
        img = workdir / f"g.{fmt}.save"
        proc = cli("--json", "direct", "save", "--qmp", f"unix:{sock}", str(img), "--xml", str(xml_file),
                   "--image-format", fmt, *extra, timeout=1200)
        assert proc.returncode == 0, proc.stderr
        assert q.wait(30) == 0  # quit, not killed
        hdr = saveimage.read_header_path(img, allow_partial=False)
        assert hdr.format == fmt and f"<name>{name}</name>" in hdr.xml
        assert oct(img.stat().st_mode & 0o777) == "0o600"
        with open(img, "rb") as f:  # libvirt's decompressor gives back a QEMU stream
            f.seek(hdr.stream_offset)
            head = subprocess.run([*saveimage.DECOMPRESSORS[fmt]], stdin=f, capture_output=True).stdout[:4]
        assert head == b"QEVM"
        if restore_unavailable(fmt):  # the image is checked above; libvirt itself cannot read it here
            pytest.skip(restore_unavailable(fmt))
        before = guest.tick_mark(name)  # QEMU quit after the save: its last tick is the counter saved
        conn.restore(str(img))
        c = guest.wait_ticks_continue(before, timeout=90)
        assert c.survived, c
    finally:
        guest.remove(conn, name)


@needs_mapped_ram
def test_a_qemu_restored_from_sparse_saves_zstd_that_libvirt_restores(conn, workdir, our_qemus):
    """Sparse save, restore reading with O_DIRECT (--bypass-cache), then a zstd save of that restored
    QEMU: mapped-ram, multifd and direct-io it was loaded with must not leak into the piped stream."""
    name, uid, fill = guest.unique_name(), str(_uuid.uuid4()), 8
    xml = guest.guest_xml(name, 256, fill, domain_uuid=uid)
    argv = _hand_started(name, uid, workdir / "qmp.sock", fill)[:-2]  # the backend adds its own QMP
    try:
        with DirectBackend(argv, serial_log=guest.serial_log(name)) as b:
            our_qemus.append(b.launch().pid)
            guest.wait_tick(name, 2, timeout=120)
            sparse, zimg = workdir / "s.save", workdir / "z.save"
            b.save(b.target, sparse, SaveOptions(image_format="sparse", parallel_channels=2, bypass_cache=True,
                                                 xml=xml))
            b.close()
            mark = guest.tick_mark(name)
            res = b.restore(sparse, SaveOptions(parallel_channels=2, bypass_cache=True))
            assert res.state == "running" and b.qemu is not None
            our_qemus.append(b.qemu.pid)
            assert guest.wait_ticks_continue(mark, timeout=60).survived
            b.save(b.target, zimg, SaveOptions(image_format="zstd", xml=xml))
        assert saveimage.read_header_path(zimg, allow_partial=False).format == "zstd"
        before = guest.tick_mark(name)
        conn.restore(str(zimg))
        c = guest.wait_ticks_continue(before, timeout=90)
        assert c.survived, c
    finally:
        guest.remove(conn, name)


def test_replay_of_a_zstd_trace_writes_zstd_that_libvirt_restores(cli, conn, make_guest, workdir):
    require_format("zstd")
    name = make_guest(256, 8)
    t, r, img, slog = workdir / "t.json", workdir / "r.json", workdir / "r.save", workdir / "serial.log"
    proc = cli("trace", name, "--image-format", "zstd", "-o", str(t))
    assert proc.returncode == 0, proc.stderr
    traced = trace.load(t)
    assert traced["phases"][0]["image"]["header"]["format"] == "zstd"
    proc = cli("replay", str(t), "-o", str(r), "--image", str(img), "--serial-log", str(slog),
               "--run-after", "2", "--wait-serial", r"tick [2-9]")
    assert proc.returncode == 0, proc.stderr
    out = trace.load(r)
    assert all(p["ok"] for p in out["phases"])
    assert saveimage.read_header_path(img, allow_partial=False).format == "zstd"
    dom = conn.lookupByName(name)
    if dom.isActive():
        dom.destroy()
    mark = guest.tick_mark(name, floor=2)  # the replayed guest saved after its tick 2
    conn.restore(str(img))
    c = guest.wait_ticks_continue(mark, timeout=60)
    assert c.survived, c
