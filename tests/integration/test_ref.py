"""Reference path on the real libvirtd with real QEMU guests (issue 2 acceptance).

Every guest is made by ``make_guest`` (uniquely named ``vs-test-…``, removed at
teardown) and every ``--all`` run is restricted with ``--match`` to this test's own
guests, so other people's domains on the shared daemon are never touched.
Memory survival is shown by the guest's serial ``tick`` counter: after a restore the
first new tick is larger than the last one before the save, and no tick 1 (reboot) shows up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import libvirt
import pytest
from conftest import format_unavailable

from virtsave.harness import guest
from virtsave.image.saveimage import read_header_path
from virtsave.libvirtd import host
from virtsave.libvirtd import reference as lp

pytestmark = pytest.mark.integration

MEM, FILL = 256, 32


def state(conn, name: str) -> str:  # type: ignore[no-untyped-def]
    return lp.state_name(conn.lookupByName(name))


def ok(proc) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


def one_line_exit2(proc, *needles: str) -> str:  # type: ignore[no-untyped-def]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def assert_ticks_continue(mark: guest.TickMark) -> None:
    c = guest.wait_ticks_continue(mark, timeout=60)
    assert c.survived, f"{mark.name}: {c}: memory state lost"


def ticking_guest(make_guest) -> str:  # type: ignore[no-untyped-def]
    name = make_guest(memory_mib=MEM, fill_mib=FILL)
    guest.wait_tick(name, 3)  # the fill is done and the counter runs
    return name


def test_managed_save_then_start_continues(conn, make_guest, cli) -> None:  # type: ignore[no-untyped-def]
    name = ticking_guest(make_guest)
    res = json.loads(ok(cli("--json", "managed-save", name)).stdout)
    assert res["ok"] and res["operation"] == "managed-save"
    before = guest.tick_mark(name)
    assert state(conn, name) == "shut off"
    dom = conn.lookupByName(name)
    assert dom.hasManagedSaveImage(0) == 1
    hdr = read_header_path(res["image"])
    assert hdr.magic == "LibvirtQemudSave" and not hdr.partial and hdr.was_running
    assert res["image_size"] == os.stat(res["image"]).st_size > MEM * 1024  # holds guest memory

    [row] = json.loads(ok(cli("--json", "list", "--match", name)).stdout)
    assert row["managed_save"] is True and row["state"] == "shut off" and row["image_size"] == res["image_size"]

    # saving a shut-off domain again: one line, exit 2
    one_line_exit2(cli("managed-save", name), "not running")

    out = ok(cli("start", name)).stdout
    assert "from its managed-save image" in out, out
    assert state(conn, name) == "running"
    assert not dom.hasManagedSaveImage(0)
    assert_ticks_continue(before)


@pytest.mark.parametrize("bypass", [False, True], ids=["cached", "bypass-cache"])
def test_save_restore_file(conn, make_guest, cli, workdir: Path, bypass: bool) -> None:  # type: ignore[no-untyped-def]
    name = ticking_guest(make_guest)
    img = workdir / f"{name}.img"
    flags = ["--bypass-cache"] if bypass else []
    res = json.loads(ok(cli("--json", "save", name, str(img), *flags)).stdout)
    before = guest.tick_mark(name)
    assert state(conn, name) == "shut off"
    assert bool(res["detail"]["flags"] & libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE) == bypass
    hdr = read_header_path(img)
    assert hdr.magic == "LibvirtQemudSave" and hdr.format == "raw" and name in hdr.xml
    assert img.stat().st_size > MEM * 1024

    res = json.loads(ok(cli("--json", "restore", str(img), *flags)).stdout)
    assert res["domain"] == name and res["detail"]["state_after"] == "running"
    assert state(conn, name) == "running"
    assert_ticks_continue(before)
    # the image's domain runs now: a second restore is refused before libvirt is asked
    one_line_exit2(cli("restore", str(img)), "already running")


def test_paused_honoured(conn, make_guest, cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    name = ticking_guest(make_guest)
    img = workdir / f"{name}.img"
    # --paused on save is recorded in the image (was_running = 0) …
    ok(cli("save", name, str(img), "--paused"))
    assert read_header_path(img).was_running is False
    before = guest.tick_mark(name)
    ok(cli("restore", str(img)))
    assert state(conn, name) == "paused"
    # … and --running on restore overrides it
    conn.lookupByName(name).destroy()
    ok(cli("restore", str(img), "--running"))
    assert state(conn, name) == "running"
    assert_ticks_continue(before)

    # --paused on restore of a running image; the guest stays frozen until resumed
    ok(cli("save", name, str(img)))
    before = guest.tick_mark(name)
    ok(cli("restore", str(img), "--paused", "--bypass-cache"))
    assert state(conn, name) == "paused"
    conn.lookupByName(name).resume()
    assert_ticks_continue(before)


@pytest.mark.parametrize("fmt,channels", [("sparse", 2), ("zstd", None)])
def test_image_formats(conn, make_guest, cli, workdir: Path, fmt: str, channels: int | None) -> None:  # type: ignore[no-untyped-def]
    missing = format_unavailable(fmt)   # read from virsh, not from virtsave.host (whose answer is checked below)
    if missing:
        pytest.skip(missing)
    name = ticking_guest(make_guest)
    img = workdir / f"{name}.{fmt}"
    extra = ["--parallel-channels", str(channels)] if channels else []
    res = json.loads(ok(cli("--json", "save", name, str(img), "--image-format", fmt, *extra)).stdout)
    before = guest.tick_mark(name)
    assert res["detail"]["image_format"] == fmt
    hdr = read_header_path(img)
    assert hdr.magic == "LibvirtQemudSave" and hdr.format == fmt
    if fmt == "sparse":
        # mapped-ram: every page has its own offset; the zero ones stay holes
        assert res["detail"]["image_allocated"] < img.stat().st_size
    res = json.loads(ok(cli("--json", "restore", str(img), *extra)).stdout)
    assert res["detail"]["image_format"] == fmt and res["detail"]["state_after"] == "running"
    assert_ticks_continue(before)


@pytest.mark.parametrize("fmt", host.IMAGE_FORMATS)
def test_format_support_matches_the_stack(conn, fmt: str) -> None:  # type: ignore[no-untyped-def]
    """virtsave's capability answer agrees with the versions virsh reports (the compressor binary aside:
    that is the daemon host's business, libvirt's error names it)."""
    missing = format_unavailable(fmt)
    expected = missing is None or missing.endswith("installed")
    problem = host.format_problem(conn, fmt)
    assert (problem is None) == expected, (fmt, problem, missing)
    if problem:
        assert "needs" in problem and "≥" in problem, problem   # names the version it needs


def test_managed_save_all_and_start_all(conn, make_guest, cli) -> None:  # type: ignore[no-untyped-def]
    prefix = f"vs-test-bulk{uuid.uuid4().hex[:4]}"
    names = [make_guest(memory_mib=MEM, fill_mib=FILL, prefix=prefix) for _ in range(3)]
    for n in names:
        guest.wait_tick(n, 3)
    match = f"{prefix}-*"
    out = json.loads(ok(cli("--json", "managed-save", "--all", "--match", match, "--parallel", "2")).stdout)
    assert out["ok"] is True
    assert sorted(r["domain"] for r in out["results"]) == sorted(names)
    before = {n: guest.tick_mark(n) for n in names}
    for n in names:
        assert state(conn, n) == "shut off"
        assert conn.lookupByName(n).hasManagedSaveImage(0)

    proc = ok(cli("start", "--all", "--match", match, "--parallel", "2"))
    assert "start: 3 of 3 ok" in proc.stdout, proc.stdout
    assert proc.stdout.count("from managed-save image") == 3, proc.stdout
    for n in names:
        assert state(conn, n) == "running"
        assert_ticks_continue(before[n])

    # nothing left to start: exit 0, nothing done
    out = json.loads(ok(cli("--json", "start", "--all", "--match", match)).stdout)
    assert out["results"] == []


def test_bulk_failure_exits_2_with_table(conn, make_guest, cli) -> None:  # type: ignore[no-untyped-def]
    name = make_guest(memory_mib=128, fill_mib=16, start=False)  # defined, shut off, no image
    conn.lookupByName(name).create()
    guest.wait_tick(name, 2)
    ok(cli("managed-save", name))
    # make its managed-save image unusable behind libvirt's back: start --all must report it
    path = lp.managed_save_path(conn, name)
    assert path
    with open(path, "r+b") as f:
        f.seek(read_header_path(path).stream_offset)
        f.write(b"\0" * 4096)  # destroy the QEVM stream start
    proc = cli("start", "--all", "--match", name)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "FAILED" in proc.stdout and name in proc.stdout
    one_line_exit2(proc, "1 of 1 start operations failed", name)


def test_no_such_domain(cli) -> None:  # type: ignore[no-untyped-def]
    one_line_exit2(cli("managed-save", "no-such-domain"), "domain not found", "no-such-domain")
    one_line_exit2(cli("start", "no-such-domain"), "domain not found")


def test_failed_save_to_missing_dir_leaves_guest_running(conn, make_guest, cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    name = ticking_guest(make_guest)
    line = one_line_exit2(cli("save", name, str(workdir / "no-such-dir" / "x.img")), "failed")
    assert f"domain {name} is running" in line
    before = guest.last_tick(name)
    assert state(conn, name) == "running"
    assert guest.wait_tick(name, before + 1) > before


@pytest.fixture
def tiny_fs(workdir: Path):  # type: ignore[no-untyped-def]
    """An 8 MiB tmpfs: a save of a 256 MiB guest with 32 MiB filled runs out of space mid-stream."""
    mnt = workdir / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", str(mnt)], check=False)


def test_failed_save_mid_stream_leaves_guest_running(conn, make_guest, cli, tiny_fs: Path) -> None:  # type: ignore[no-untyped-def]
    name = ticking_guest(make_guest)
    img = tiny_fs / "x.img"
    line = one_line_exit2(cli("save", name, str(img)), "No space left on device")
    assert f"domain {name} is running" in line
    assert not img.exists()  # libvirt removed the partial image
    before = guest.last_tick(name)
    assert state(conn, name) == "running"
    assert guest.wait_tick(name, before + 1) > before  # and it still runs: not merely "active"


def test_xml_option_replaces_domain_xml(conn, make_guest, cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    name = ticking_guest(make_guest)
    img = workdir / f"{name}.img"
    base = conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)

    def with_description(text: str) -> Path:
        p = workdir / f"{text}.xml"
        p.write_text(base.replace(f"<name>{name}</name>", f"<name>{name}</name><description>{text}</description>", 1))
        return p

    ok(cli("save", name, str(img), "--xml", str(with_description("vs-saved-xml"))))
    assert "<description>vs-saved-xml</description>" in read_header_path(img).xml
    before = guest.tick_mark(name)
    ok(cli("restore", str(img), "--xml", str(with_description("vs-restored-xml"))))
    assert "<description>vs-restored-xml</description>" in conn.lookupByName(name).XMLDesc(0)
    assert_ticks_continue(before)


def test_ctrl_c_during_managed_save_cancels_it(conn, make_guest) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C while libvirt's save job moves data aborts the job: exit 130, one line saying so and that
    the guest runs, no managed-save image, and the guest keeps counting. The signal lands inside the
    job: it is sent once libvirt reports data processed and data still to go (a 512 MiB guest with
    480 MiB filled takes about a second and a half to save), and that is checked, not assumed."""
    name = make_guest(memory_mib=512, fill_mib=480)
    guest.wait_tick(name, 2, timeout=180)
    dom = conn.lookupByName(name)
    mark = guest.tick_mark(name)
    proc = subprocess.Popen([sys.executable, "-m", "virtsave.cli", "managed-save", name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, ("the save ended before its job was seen", proc.communicate())
            assert time.monotonic() < deadline, "libvirt's save job never moved data"
            with contextlib.suppress(libvirt.libvirtError):
                job = dom.jobStats()
                if job.get("type") in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED) \
                        and job.get("data_processed", 0) > 0 and job.get("data_remaining", 0) > 64 << 20:
                    break
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    assert "interrupted" in line and f"domain {name} is running" in line, line
    assert lp.state_name(dom) == "running" and not dom.hasManagedSaveImage(0)
    assert_ticks_continue(mark)     # the same guest going on: the save was cancelled, not restored
