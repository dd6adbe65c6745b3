"""QEMU launcher: rewriting libvirt's recorded command line, refusing what it cannot own.

Uses the real libvirt 9.0 domain log in tests/fixtures (no daemon). Nothing here starts a QEMU
machine (only ``--version`` probes): the launch of the rewritten command line is in
tests/integration/test_qemu_launch_live.py.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
from pathlib import Path

import pytest

from virtsave.core.errors import LaunchError, UnsafeTraceError
from virtsave.libvirtd import domainlog
from virtsave.qemu import launch as ql
from virtsave.qemu import replay
from virtsave.trace import model as trace

FXA = Path(__file__).resolve().parent.parent / "fixtures" / "qemu-domain-logs" / "fxa.log"
QEMU = shutil.which("qemu-system-x86_64")


@pytest.fixture
def fxa_argv() -> list[str]:
    return domainlog.argv_from_domain_log(FXA, 0)


@pytest.fixture
def plans():
    made: list[ql.LaunchPlan] = []
    yield made
    for p in made:
        p.close_fds()
        shutil.rmtree(p.run_dir, ignore_errors=True)


def _plan(plans, argv, **kw) -> ql.LaunchPlan:
    p = ql.plan_launch(argv, **kw)
    plans.append(p)
    return p


def _opt(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]


def test_domain_log_argv_is_read(fxa_argv):
    assert fxa_argv[0] == "/usr/bin/qemu-system-x86_64"
    assert "-S" in fxa_argv and "socket,id=charmonitor,fd=29,server=on,wait=off" in fxa_argv


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
def test_rewrite_removes_every_libvirt_fd_and_path(plans, fxa_argv):
    p = _plan(plans, fxa_argv, incoming="defer")
    argv = p.argv
    joined = " ".join(argv)
    # libvirt's serial-log fdset stays (same set, same opaque), holding our serial log's fd instead.
    (serial_fd,) = p.own_fds
    assert _opt(argv, "-add-fd") == [f"set=0,fd={serial_fd},opaque=serial0-source"]
    assert os.readlink(f"/proc/self/fd/{serial_fd}") == str(p.serial_log)
    assert fcntl.fcntl(serial_fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_APPEND) == os.O_WRONLY | os.O_APPEND
    assert joined.count("fd=") == 1 and "fd=29" not in joined and "fd=30" not in joined
    assert serial_fd in p.pass_fds
    assert "/var/lib/libvirt/qemu/domain-" not in joined
    sock = Path(p.qmp_address.removeprefix("unix:"))
    assert sock.parent == p.run_dir
    assert stat.S_IMODE(os.stat(p.run_dir).st_mode) == 0o700
    assert f"socket,id=charmonitor,path={sock},server=on,wait=off" in argv
    key = p.run_dir / "master-key.aes"
    assert key.stat().st_size == 32 and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert any(str(key) in v for v in _opt(argv, "-object"))
    assert "file,id=charserial0,path=/dev/fdset/0,append=on" in argv
    assert _opt(argv, "-incoming") == ["defer"]
    assert argv.count("-S") == 1
    assert "-no-acpi" not in argv and _opt(argv, "-machine")[0].endswith(",acpi=off")
    assert {r["option"] for r in p.rewrites} >= {"-object", "-chardev", "-add-fd", "-no-acpi"}


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
def test_tcp_transport_uses_loopback(plans, fxa_argv):
    p = _plan(plans, fxa_argv, transport="tcp")
    assert p.qmp_address.startswith("tcp:127.0.0.1:")
    port = p.qmp_address.rsplit(":", 1)[1]
    assert f"socket,id=charmonitor,host=127.0.0.1,port={port},server=on,wait=off" in p.argv


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
def test_extra_fds_are_added_and_inherited(plans, fxa_argv):
    p = _plan(plans, fxa_argv, incoming="defer", add_fds=[(0, 7, "virtsave-incoming")], pass_fds=(9,))
    assert "set=0,fd=7,opaque=virtsave-incoming" in _opt(p.argv, "-add-fd")
    assert p.pass_fds == tuple(sorted({7, 9, *p.own_fds}))


@pytest.mark.parametrize("extra, what", [
    (["-netdev", "tap,id=n0,fd=33"], "fd 33"),
    (["-chardev", "socket,id=chx,fd=40,server=on,wait=off"], "fd 40"),
    (["-drive", "file=/dev/fdset/0,if=none,id=d0"], "fdset 0"),
])
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
def test_unknown_fds_are_refused(plans, fxa_argv, extra, what, tmp_path, monkeypatch):
    monkeypatch.setattr(ql, "RUN_BASE", tmp_path)
    with pytest.raises(LaunchError, match=what):
        _plan(plans, fxa_argv + extra)
    assert list(tmp_path.iterdir()) == []  # the run dir (with its key) is gone again


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
def test_plan_is_the_pure_rewrite_plus_files(plans, fxa_argv, tmp_path):
    """plan_launch = rewrite_argv (pure: creates nothing) + run dir, key file and existence checks."""
    p = _plan(plans, fxa_argv, incoming="defer")
    target = ql.Target(p.run_dir, serial_log=None, paused=True, log_fds={"0": p.own_fds[0]})
    res = ql.rewrite_argv(fxa_argv, target, binary=p.argv[0], incoming="defer")
    assert res.argv == p.argv and res.rewrites == p.rewrites and res.serial_log == p.serial_log
    assert res.applied == ["freeze", "master-key", "monitor", "no-acpi", "libvirt-fdset", "serial-output"]
    assert res.log_sets == {"0": p.serial_log}
    nowhere = tmp_path / "never-made"
    ql.rewrite_argv(fxa_argv, ql.Target(nowhere), incoming="defer")
    assert not nowhere.exists()


def test_libvirt_serial_shapes_go_to_the_serial_log(tmp_path):
    """The serial port's chardev, as each libvirt writes it (9.0 file on an fdset, 11.x pty logged to an
    fdset, a pipe), becomes the serial log; another logged chardev gets its own file."""
    dev = ["-device", '{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}']
    for chardev in (["-add-fd", "set=0,fd=30,opaque=serial0-source", "-chardev",
                     "file,id=charserial0,path=/dev/fdset/0,append=on"],
                    ["-add-fd", "set=1,fd=38,opaque=serial0-log", "-chardev",
                     "pty,id=charserial0,logfile=/dev/fdset/1,logappend=on"],
                    ["-chardev", "pipe,id=charserial0,path=/var/lib/libvirt/qemu/g.pipe"]):
        res = ql.rewrite_argv(["qemu-system-x86_64", *chardev, *dev, "-add-fd", "set=4,fd=41",
                               "-chardev", "pty,id=charconsole1,logfile=/dev/fdset/4"], ql.Target(tmp_path))
        assert _opt(res.argv, "-chardev")[:2] == [f"file,id=charserial0,path={tmp_path}/serial.log,append=on",
                                                  f"file,id=charconsole1,path={tmp_path}/charconsole1.log,append=on"]
        assert res.serial_log == tmp_path / "serial.log" and "-add-fd" not in res.argv


def test_log_fdsets_keep_their_set_and_opaque_with_our_fd(tmp_path):
    """Given our log files' fds, libvirt's log fdsets stay as traced (set, opaque) and the chardevs write
    through them, as libvirt has QEMU do it; nothing else of the traced chardev is kept."""
    dev = ["-device", '{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}']
    shapes = {
        "file,id=charserial0,path=/dev/fdset/0,append=on": "file,id=charserial0,path=/dev/fdset/0,append=on",
        "pty,id=charserial0,logfile=/dev/fdset/0,logappend=off,path=/tmp/x":
            "pty,id=charserial0,logfile=/dev/fdset/0,logappend=on",
        "vc,id=charserial0,logfile=/dev/fdset/0": "null,id=charserial0,logfile=/dev/fdset/0,logappend=on",
    }
    for traced, kept in shapes.items():
        argv = ["qemu-system-x86_64", "-add-fd", "set=0,fd=30,opaque=serial0-log", "-chardev", traced, *dev,
                "-add-fd", "set=4,fd=41,opaque=console1-log", "-chardev", "pty,id=charconsole1,logfile=/dev/fdset/4"]
        first = ql.rewrite_argv(argv, ql.Target(tmp_path))
        assert first.log_sets == {"0": tmp_path / "serial.log", "4": tmp_path / "charconsole1.log"}
        res = ql.rewrite_argv(argv, ql.Target(tmp_path, log_fds={"0": 7, "4": 8}))
        assert _opt(res.argv, "-add-fd") == ["set=0,fd=7,opaque=serial0-log", "set=4,fd=8,opaque=console1-log"]
        assert _opt(res.argv, "-chardev")[:2] == [kept, "pty,id=charconsole1,logfile=/dev/fdset/4,logappend=on"]
        assert res.serial_log == tmp_path / "serial.log"


def test_missing_binary_and_guest_files(plans, fxa_argv):
    with pytest.raises(LaunchError, match="QEMU binary not found"):
        ql.plan_launch(["/nonexistent/qemu-system-x86_64", *fxa_argv[1:]])
    bad = [a.replace("/var/lib/virtsave/guest/vmlinuz", "/nonexistent/vmlinuz") for a in fxa_argv]
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 not installed")
    with pytest.raises(LaunchError, match="guest file missing: /nonexistent/vmlinuz"):
        _plan(plans, bad)


def test_only_qemu_binaries_are_executed(tmp_path):
    with pytest.raises(LaunchError, match="not a QEMU system emulator"):
        ql.plan_launch(["/bin/sh", "-c", "touch /tmp/pwned"])
    assert ql.binary_version("/bin/sh") == (0, 0, 0)
    tr = trace.new_trace("libvirt", domain={"name": "evil", "argv": ["/bin/sh", "-name", "x"]})
    with pytest.raises(UnsafeTraceError, match="not a QEMU system emulator"):
        replay.check_safety(tr)


def test_exec_trace_refused_before_launch(tmp_path):
    tr = trace.new_trace("libvirt", domain={"name": "evil", "argv": ["/nonexistent/qemu"]})
    ph = trace.add_phase(tr, "save", "save")
    ph["messages"].append(trace.command("migrate", {"uri": "exec:touch /tmp/pwned"}, id="libvirt-1"))
    with pytest.raises(UnsafeTraceError, match="exec:"):
        replay.replay(tr, image=tmp_path / "x.save")
    assert not (tmp_path / "x.save").exists()
