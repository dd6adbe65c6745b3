"""Remote and many hosts without a daemon (issue 13): URIs read as libvirt's remote driver reads them,
the ssh command line libvirt's ssh transport would run, the :class:`SshHost` protocol (its shell
scripts run for real, through a stand-in ``ssh`` that runs the command on this machine), the
log-capture state kept and repaired on the "remote" host, and the CLI's several-hosts rules with
libvirt's in-process test driver plus an unreachable daemon.

The real ssh login, the session daemon and the faults are in tests/integration/test_hosts.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_logcapture import OP_OUTPUTS, FakeDaemon, dead_pid
from virtsave.core.errors import UnsupportedError
from virtsave.libvirtd import fleet, transport
from virtsave.libvirtd import logcapture as lc
from virtsave.libvirtd import uri as liburi

UNREACHABLE = "qemu:///system?socket=/nonexistent/virtsave-test-sock"  # no daemon there, quickly


# --------------------------------------------------------------------------- URIs


@pytest.mark.parametrize(("uri", "transport_", "local", "ssh"), [
    ("qemu:///system", None, True, False),
    ("qemu+unix:///session", "unix", True, False),
    ("qemu+ssh://root@db1/system", "ssh", False, True),
    ("qemu+SSH://db1/system", "ssh", False, True),
    ("qemu+libssh2://db1:2222/system", "libssh2", False, True),
    ("qemu://db1/system", "tls", False, False),
    ("qemu+tcp://db1/system", "tcp", False, False),
    ("qemu+ext:///system?command=/bin/x", "ext", False, False),
])
def test_uri_transport_like_libvirt(uri: str, transport_: str | None, local: bool, ssh: bool) -> None:
    u = liburi.parse(uri)
    assert (u.transport, u.is_local, u.is_ssh) == (transport_, local, ssh)


def test_uri_params_and_names() -> None:
    u = liburi.parse("qemu+ssh://u@h:2222/system?KeyFile=/a&keyfile=/b&no_verify=0&name=qemu:///session")
    assert u.params["keyfile"] == "/b" and not u.flag("no_verify")
    assert u.remote_uri == "qemu:///session" and u.remote_path == "/session"
    assert u.label == "u@h:2222/system"
    with pytest.raises(UnsupportedError):
        liburi.parse("qemu+ssh://h/system?no_tty=yes").flag("no_tty")
    for bad in ("qemu+carrier-pigeon://h/system", "qemu+unix://h/system", "/no/scheme", "qemu://h:99999/system"):
        with pytest.raises(UnsupportedError):
            liburi.parse(bad)


def test_ssh_command_line_is_libvirts() -> None:
    u = liburi.parse("qemu+ssh://root@db1:2222/system?keyfile=/k&no_verify=1&no_tty=1&command=/opt/ssh")
    assert transport.ssh_argv(u, "id", ["-o", "X=y"]) == [
        "/opt/ssh", "-p", "2222", "-l", "root", "-i", "/k", "-T", "-e", "none", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "X=y", "--", "db1", "id"]
    assert transport.ssh_argv(liburi.parse("qemu+ssh:///system"), "id") == [
        "ssh", "-T", "-e", "none", "--", "localhost", "id"]
    with pytest.raises(UnsupportedError):
        transport.ssh_argv(liburi.parse("qemu+libssh://h/system?known_hosts_verify=maybe"), "id")


def test_hosts_without_a_shell_are_refused() -> None:
    for uri in ("qemu+tls://h/system", "qemu+tcp://h/system", "qemu://h/system"):
        with pytest.raises(UnsupportedError, match="qemu\\+ssh://"):
            transport.host_for(uri)
    assert not transport.host_for("qemu:///system").remote
    assert transport.host_for("qemu+ssh://h/system").remote  # nothing is run until it is used


def test_hosts_file() -> None:
    assert fleet.read_hosts_file("#x\n\n qemu:///system \nqemu+ssh://h/system # db\n# qemu+ssh://off/x\n") == [
        "qemu:///system", "qemu+ssh://h/system"]


# --------------------------------------------------------------------------- this machine


def test_local_host_files(tmp_path: Path) -> None:
    h = transport.LocalHost(tmp_path)
    f = str(tmp_path / "d" / "state.json")
    h.write_private(f, b"0123456789")
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert (h.read_bytes(f), h.read_bytes(f, 3, 4), h.size(f)) == (b"0123456789", b"3456", 10)
    assert h.read_bytes(str(tmp_path / "none")) is None and h.size(str(tmp_path / "none")) == 0
    log = str(tmp_path / "cap" / "capture.log")
    h.new_private_file(log)
    assert stat.S_IMODE(os.stat(tmp_path / "cap").st_mode) == 0o700
    assert h.listdir(str(tmp_path)) == ["cap", "d"]
    h.remove(str(tmp_path / "d"), tree=True)
    assert not h.exists(f)
    assert h.owner() == (os.getpid(), transport.proc_starttime(os.getpid()))


# --------------------------------------------------------------------------- over "ssh"

FAKE_SSH = """#!/bin/sh
# Stands in for ssh in unit tests: skips ssh's options and the host, runs the command here.
while [ $# -gt 0 ]; do
  case $1 in --) shift; break ;; -p|-l|-i|-e|-o|-F|-S) shift 2 ;; *) shift ;; esac
done
shift
exec sh -c "$1"
"""


@pytest.fixture
def fake_ssh(tmp_path: Path) -> str:
    p = tmp_path / "fake-ssh"
    p.write_text(FAKE_SSH)
    p.chmod(0o755)
    return f"qemu+ssh://user@far.invalid:2222/session?command={p}"


def test_ssh_host_runs_its_scripts_there(fake_ssh: str, tmp_path: Path) -> None:
    with transport.host_for(fake_ssh) as h:
        assert isinstance(h, transport.SshHost)
        assert h.info.state_dir == os.environ["VIRTSAVE_STATE_DIR"]  # the login's environment decides
        f = str(tmp_path / "r" / "x y.json")  # a blank in the path goes through both shells intact
        h.write_private(f, b"\x00binary\xffdata\n")
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        assert h.read_bytes(f) == b"\x00binary\xffdata\n" and h.read_bytes(f, 1, 6) == b"binary"
        assert h.read_bytes(f, 7) == b"\xffdata\n" and h.read_bytes(f, 0, 0) == b""
        assert h.read_bytes(str(tmp_path / "none")) is None
        assert h.size(f) == 13 and h.exists(f) and h.listdir(str(tmp_path / "r")) == ["x y.json"]
        h.make_private_dir(str(tmp_path / "p" / "q"))
        assert stat.S_IMODE(os.stat(tmp_path / "p" / "q").st_mode) == 0o700
        assert h.run(["sh", "-c", 'printf %s "$1"', "sh", "it's $HOME"]).stdout == b"it's $HOME"
        assert h.run(["no-such-program-virtsave"]).returncode == 127
        assert h.proc_starttime(os.getpid()) == transport.proc_starttime(os.getpid())
        assert h.proc_starttime(dead_pid()) is None
        offset, slack = h.clock_offset()
        assert abs(offset) < 1 + slack
        # the anchor: a process there stands for us, and holds the lock only when asked
        lock = str(tmp_path / "state" / "logcapture.lock")
        pid, start = h.owner() if h.anchor(lock) else (0, None)
        assert pid != os.getpid() and transport.proc_starttime(pid) == start
        with h.locked(lock):
            other = subprocess.run(["flock", "-n", lock, "true"], check=False)
            assert other.returncode == 1  # held
        assert subprocess.run(["flock", "-n", lock, "true"], check=False).returncode == 0
    assert transport.proc_starttime(pid) is None  # closing the host ends the anchor


def test_capture_state_lives_on_the_daemons_host_and_is_repaired_there(fake_ssh: str, tmp_path: Path) -> None:
    """A capture over ssh keeps its state, lock and capture log in the state directory there, copies
    back only its window, and a capture whose connection died is repaired through the next login."""
    d = FakeDaemon("3:remote", OP_OUTPUTS)
    before = d.shown()
    state_dir = Path(os.environ["VIRTSAVE_STATE_DIR"])
    host = transport.host_for(fake_ssh)
    s = lc.CaptureSession(fake_ssh, runner=d, host=host, settle=0.01).start()
    assert (state_dir / "logcapture.json").exists()
    assert d.get_outputs().endswith(f"1:file:{state_dir}/logcapture/capture.log")
    with open(state_dir / "logcapture" / "capture.log", "a") as f:
        f.write("in my window\n")
    assert s.window_text() == "in my window\n" and not str(s.window_path()).startswith(str(state_dir))
    owner = json.loads((state_dir / "logcapture.json").read_text())["owners"][0]["pid"]
    assert owner != os.getpid()  # the anchor there, not this process
    host.close()  # the connection dies: its anchor ends, the settings stay
    (state_dir / "logcapture.json.tmp-99999").write_text("{")  # a write that was cut off half-way
    assert d.shown() != before
    msg = lc.repair_if_stale(fake_ssh, runner=d)
    assert msg and "restored libvirtd's log settings on user@far.invalid:2222/session" in msg
    assert d.shown() == before and not list(state_dir.glob("logcapture.json*"))


# --------------------------------------------------------------------------- the CLI with several hosts


def test_list_on_several_hosts_has_a_host_column_and_one_failed_row(cli) -> None:
    p = cli("-c", "test:///default", "-c", UNREACHABLE, "--json", "list")
    assert p.returncode == 2 and p.stderr.strip().startswith("virtsave: error: 1 of 2 hosts failed")
    rows = json.loads(p.stdout)
    assert {r["host"] for r in rows} == {"test:///default", UNREACHABLE}
    assert [r["name"] for r in rows if r["host"] == "test:///default"] == ["test"]
    failed = [r for r in rows if r["host"] == UNREACHABLE]
    assert len(failed) == 1 and failed[0]["name"] is None and "cannot connect" in failed[0]["error"]
    p = cli("-c", "test:///default", "-c", UNREACHABLE, "list")
    assert p.returncode == 2
    assert "test:///default" in p.stdout and sum("FAILED" in x for x in p.stdout.splitlines()) == 1


def test_bulk_on_several_hosts_goes_on_past_a_dead_host(cli, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(f"test:///default\n{UNREACHABLE}  # down\n")
    p = cli("--hosts", str(hosts), "--json", "managed-save", "--all", "--parallel", "3")
    assert p.returncode == 2
    out = json.loads(p.stdout)
    assert [h["ok"] for h in out["hosts"]] == [True, False]
    assert {(r["host"], r["domain"], r["ok"]) for r in out["results"]} == {
        ("test:///default", "test", True), (UNREACHABLE, None, False)}
    assert p.stderr.strip().splitlines()[-1].startswith("virtsave: error: 1 of 2 managed-save operations failed")


def test_named_domains_missing_everywhere_fail(cli) -> None:
    p = cli("-c", "test:///default", "-c", "test:///default?x=1", "--json", "start", "--all", "vs-none")
    assert p.returncode == 2
    out = json.loads(p.stdout)
    assert out["missing"] == ["vs-none"] and out["results"] == []


@pytest.mark.parametrize("args", [("managed-save", "test"), ("save", "test", "/tmp/x.img"), ("trace", "test"),
                                  ("start", "test"), ("managed-save-remove", "test")])
def test_one_host_commands_refuse_several_hosts(cli, args: tuple[str, ...]) -> None:
    p = cli("-c", "test:///default", "-c", UNREACHABLE, *args)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "works on one host" in p.stderr


@pytest.mark.parametrize("content", [None, "# nothing\n\n"])
def test_bad_hosts_file_is_one_line(cli, tmp_path: Path, content: str | None) -> None:
    f = tmp_path / "hosts"
    if content is not None:
        f.write_text(content)
    p = cli("--hosts", str(f), "list")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("virtsave: error: ")


def test_trace_over_tcp_is_refused_before_connecting(cli) -> None:
    p = cli("-c", "qemu+tcp://127.0.0.1:1/system", "trace", "vm")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "qemu+ssh://" in p.stderr


def test_offline_commands_ignore_several_hosts(cli) -> None:
    p = cli("-c", "test:///default", "-c", UNREACHABLE, "--version")
    assert p.returncode == 0 and p.stdout.strip()
    assert sys.version_info >= (3, 11)


def test_anchor_gives_up_without_heartbeats_and_lives_with_them(fake_ssh: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A cut network (no EOF, no heartbeat) ends the anchor there after ANCHOR_TIMEOUT, so the next
    virtsave sees its capture's owner gone; heartbeats keep a live one alive."""
    import time

    monkeypatch.setattr(transport, "ANCHOR_TIMEOUT", 1)
    lock = str(tmp_path / "lock")
    monkeypatch.setattr(transport, "HEARTBEAT", 0.2)
    with transport.host_for(fake_ssh) as alive:
        pid, start = alive.owner() if alive.anchor(lock) else (0, None)
        time.sleep(3)
        assert transport.proc_starttime(pid) == start  # beaten every 0.2 s: still there
    monkeypatch.setattr(transport, "HEARTBEAT", 3600)
    with transport.host_for(fake_ssh) as silent:
        pid, start = silent.owner() if silent.anchor(lock) else (0, None)
        deadline = time.monotonic() + 60
        while transport.proc_starttime(pid) == start and time.monotonic() < deadline:
            time.sleep(0.1)
        assert transport.proc_starttime(pid) != start, "the anchor outlived its heartbeats"
