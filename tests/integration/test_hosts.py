"""Remote and many hosts (issue 13) on two real daemons of this machine.

Host 1 is the system daemon (``qemu:///system``). Host 2 is a separate daemon: the session libvirtd
of the test user (:data:`tests.sshbed.USER`, made by ``scripts/setup``), reached as an operator
reaches a remote host — ``qemu+ssh://USER@127.0.0.1:PORT/session`` through a private sshd that the
session fixture starts on 127.0.0.1 with generated keys and stops afterwards (:mod:`tests.sshbed`).
Its guests run as that user (TCG; the test guest's kernel and initrd are world-readable), its log
settings, state directory and QEMU logs are its own. Each daemon runs its own uniquely named test
guests, removed at teardown, pass or fail.

What is checked: a remote trace (its log window read over ssh, the session daemon's settings byte
for byte as before, nothing left in its state directory) that ``replay --diff`` compares like a local
trace; ``list`` / ``managed-save --all`` / ``start --all`` across both daemons with a host column and
a refused login as one failed row; the ssh connection killed in the middle of a managed save and of a
trace, and what the next command does about it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.conftest import REPO, VIRTSAVE, run_cli
from tests.sshbed import SshBed, free_port, missing_prerequisite
from virtsave.harness import guest
from virtsave.image import saveimage

pytestmark = pytest.mark.integration

SYSTEM = "qemu:///system"
Guests = Callable[..., str]


# --------------------------------------------------------------------------- the two-host bed


@pytest.fixture(scope="session")
def bed() -> Iterator[SshBed]:
    why = missing_prerequisite()
    if why:
        pytest.skip(why)
    b = SshBed()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def remote(bed: SshBed) -> Iterator[libvirt.virConnect]:
    """A connection to host 2 (the session daemon over ssh), as an operator opens it."""
    if bed.proc is None:  # a test stopped the sshd and failed before starting it again
        bed.start()
    c = libvirt.open(bed.uri())
    yield c
    with contextlib.suppress(libvirt.libvirtError):
        c.close()


@pytest.fixture
def remote_guest(bed: SshBed) -> Iterator[Guests]:
    """Factory of test guests on host 2; every one is removed at teardown (pass or fail), with its
    QEMU log and serial log."""
    made: list[str] = []

    def make(memory_mib: int = 256, fill_mib: int = 32, prefix: str = "vs-test-h2") -> str:
        name = guest.unique_name(prefix)
        made.append(name)
        c = libvirt.open(bed.uri())
        try:
            guest.create(c, name, memory_mib=memory_mib, fill_mib=fill_mib, serial_dir=bed.serial_dir)
        finally:
            c.close()
        guest.wait_tick(name, 1, timeout=120)
        return name

    yield make
    if bed.proc is None:
        bed.start()
    c = libvirt.open(bed.uri())
    try:
        for name in made:
            guest.remove(c, name)
            with contextlib.suppress(FileNotFoundError):
                bed.domain_log(name).unlink()
    finally:
        c.close()


def remote_cli(bed: SshBed, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return run_cli("-c", bed.uri(), *args, **kw)  # type: ignore[arg-type]


def settled_state(bed: SshBed, name: str, timeout: float = 180) -> dict:
    """The guest's row of ``virtsave list`` once the daemon is done with it: no job, not paused, and
    not in the moment between a save stopping QEMU and marking the image (a save the daemon finishes
    on its own after its client went away). A guest that stays shut off without an image — lost —
    is returned as such after *timeout*."""
    deadline = time.monotonic() + timeout
    with contextlib.closing(libvirt.open(bed.uri())) as c:
        dom = c.lookupByName(name)
        while True:
            try:
                busy = dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE
            except libvirt.libvirtError:  # not running: no job to see (the image flag says the rest)
                busy = False
            p = remote_cli(bed, "--json", "list", "--match", name)
            assert p.returncode == 0, p.stderr
            rows = json.loads(p.stdout)
            assert len(rows) == 1, rows
            row = rows[0]
            done = row["state"] == "running" or (row["state"] == "shut off" and row["managed_save"])
            if (done and not busy) or time.monotonic() > deadline:
                return row
            time.sleep(0.5)


def assert_not_lost(bed: SshBed, remote: libvirt.virConnect, name: str, mark: guest.TickMark) -> str:
    """The guest is either running with its memory (the counter goes on) or saved with a complete
    image that brings it back with its memory. Returns which ("running" / "saved")."""
    row = settled_state(bed, name)
    if row["state"] == "running":
        assert not row["managed_save"], row
        c = guest.wait_ticks_continue(mark, timeout=60)
        assert c.survived, c
        return "running"
    assert row["state"] == "shut off" and row["managed_save"], row  # list says: saved
    hdr = saveimage.read_header_path(bed.managed_save_image(name), allow_partial=False)  # complete
    assert hdr.was_running
    p = remote_cli(bed, "start", name)
    assert p.returncode == 0 and "from its managed-save image" in p.stdout, p.stdout + p.stderr
    c = guest.wait_ticks_continue(mark, timeout=60)
    assert c.survived, c
    return "saved"


def ssh_children(pid: int) -> list[int]:
    """The ssh processes *pid* started (libvirt's connection; virtsave's own commands)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{d}/stat").read_bytes()
                comm = stat[stat.find(b"(") + 1:stat.rfind(b")")]
                if comm == b"ssh" and int(stat[stat.rfind(b")") + 2:].split()[1]) == pid:
                    out.append(int(d))
    return out


def wait_for(what: str, cond: Callable[[], object], timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            pytest.fail(f"virtsave ended (exit {proc.returncode}) before {what}: {err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def popen_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*VIRTSAVE, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "200"}, start_new_session=True)


# --------------------------------------------------------------------------- 1. remote trace


def test_remote_trace_is_compared_by_replay_like_a_local_one(bed, remote, remote_guest, make_guest, workdir):
    before = bed.log_settings()
    rname, lname = remote_guest(256, 32), make_guest(256, 32)
    rt, lt = workdir / "remote.json", workdir / "local.json"

    mark = guest.tick_mark(rname)
    p = remote_cli(bed, "trace", rname, "-o", str(rt))
    assert p.returncode == 0, p.stderr
    # The session daemon's settings read byte for byte as before; its state directory holds nothing.
    assert bed.log_settings() == before
    assert not (bed.state_dir / "logcapture.json").exists()
    assert not (bed.state_dir / "logcapture").exists()
    assert guest.wait_ticks_continue(mark).survived  # the cycle brought the remote guest back

    t = json.loads(rt.read_text())
    assert run_cli("validate", str(rt)).returncode == 0
    assert [(ph["name"], ph["operation"], ph["ok"]) for ph in t["phases"]] == [
        ("save", "managed-save", True), ("restore", "start", True)]
    save = t["phases"][0]
    assert any(m.get("execute") == "migrate" for m in save["messages"])
    assert save["image"]["path"] == str(bed.managed_save_image(rname)) and save["image"]["header"]["format"] == "raw"
    # The command line is the session daemon's (from its QEMU log over ssh), not an approximation.
    argv = " ".join(t["domain"]["argv"])
    assert f"guest={rname}" in argv and f"{bed.home}/.config/libvirt/qemu/lib/" in argv and "fd=" in argv

    p = run_cli("trace", lname, "-o", str(lt))
    assert p.returncode == 0, p.stderr

    summaries = {}
    for kind, path in (("remote", rt), ("local", lt)):
        r = workdir / f"{kind}-replay.json"
        p = run_cli("replay", str(path), "-o", str(r), "--diff", timeout=600)
        assert p.returncode == 0, f"{kind}: {p.stderr}"
        assert p.stdout.startswith("--- A  (libvirt") and "+++ B  (direct" in p.stdout, p.stdout
        d = run_cli("--json", "diff", str(path), str(r))
        assert d.returncode in (0, 1), d.stderr
        summaries[kind] = json.loads(d.stdout)["summary"]
    assert summaries["remote"] == summaries["local"]
    # And the two libvirt traces themselves say the same, once normalized.
    d = run_cli("--json", "diff", str(lt), str(rt))
    assert d.returncode == 0, d.stdout


@pytest.mark.parametrize("uri", ["qemu+tls://127.0.0.1/system", "qemu+tcp://127.0.0.1/system",
                                 "qemu://127.0.0.1/system"])
def test_trace_over_tls_or_tcp_is_refused_in_one_line(uri):
    p = run_cli("-c", uri, "trace", "vs-test-nonexistent")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("virtsave: error: ")
    assert "qemu+ssh://" in p.stderr and "--from-log" in p.stderr


# --------------------------------------------------------------------------- 2. many hosts


def test_fan_out_across_both_daemons(bed, remote, remote_guest, make_guest, workdir):
    prefix = f"vs-test-fan-{os.getpid()}"
    local = [make_guest(128, 16, prefix=prefix) for _ in range(2)]
    far = [remote_guest(128, 16, prefix=prefix) for _ in range(2)]
    uris = ["-c", SYSTEM, "-c", bed.uri()]

    p = run_cli(*uris, "--json", "list", "--match", f"{prefix}-*")
    assert p.returncode == 0, p.stderr
    rows = {(r["host"], r["name"]): r["state"] for r in json.loads(p.stdout)}
    assert rows == {**{(SYSTEM, n): "running" for n in local}, **{(bed.uri(), n): "running" for n in far}}

    marks = {n: guest.tick_mark(n) for n in local + far}
    p = run_cli(*uris, "managed-save", "--all", "--match", f"{prefix}-*", "--parallel", "2")
    assert p.returncode == 0, p.stderr
    table = p.stdout
    assert "managed-save: 4 of 4 ok on 2 hosts" in table
    for n in local:
        assert any(SYSTEM in line and n in line for line in table.splitlines()), table
    for n in far:
        assert any(bed.label in line and n in line for line in table.splitlines()), table

    p = run_cli(*uris, "--json", "list", "--match", f"{prefix}-*")
    states = {r["name"]: (r["state"], r["managed_save"]) for r in json.loads(p.stdout)}
    assert states == {n: ("shut off", True) for n in local + far}

    hosts_file = workdir / "hosts"
    hosts_file.write_text(f"# the two daemons\n{SYSTEM}\n\n{bed.uri()}  # the session one\n")
    p = run_cli("--hosts", str(hosts_file), "--json", "start", "--all", "--match", f"{prefix}-*")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["ok"] and [h["host"] for h in out["hosts"]] == [SYSTEM, bed.uri()]
    assert sorted((r["host"], r["domain"]) for r in out["results"]) == sorted(
        [(SYSTEM, n) for n in local] + [(bed.uri(), n) for n in far])
    assert all(r["ok"] and r["detail"]["from_managed_save"] for r in out["results"])
    for n, mark in marks.items():
        c = guest.wait_ticks_continue(mark, timeout=60)
        assert c.survived, (n, c)


def test_refused_login_is_one_failed_row_and_the_others_go_on(bed, remote, remote_guest, make_guest):
    prefix = f"vs-test-refused-{os.getpid()}"
    local, far = make_guest(128, 16, prefix=prefix), remote_guest(128, 16, prefix=prefix)
    refused = bed.uri(user="nosuchuser")  # sshd: AllowUsers lets only the test user in
    down = f"qemu+ssh://127.0.0.1:{free_port()}/system?no_tty=1"  # nothing listens there
    p = run_cli("-c", SYSTEM, "-c", refused, "-c", bed.uri(), "-c", down, "--json", "managed-save", "--all",
                "--match", f"{prefix}-*")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("virtsave: error: 2 of 4 managed-save operations failed")
    out = json.loads(p.stdout)
    assert not out["ok"]
    by_host = {h["host"]: h for h in out["hosts"]}
    assert by_host[SYSTEM]["ok"] and by_host[bed.uri()]["ok"]
    assert not by_host[refused]["ok"] and "ermission denied" in by_host[refused]["error"]
    assert not by_host[down]["ok"]
    done = {(r["host"], r["domain"]): r["ok"] for r in out["results"]}
    assert done == {(SYSTEM, local): True, (bed.uri(), far): True, (refused, None): False, (down, None): False}

    # the table: one FAILED row per host that could not be reached, the saved guests as ok rows
    p = run_cli("-c", SYSTEM, "-c", refused, "-c", bed.uri(), "list", "--match", f"{prefix}-*")
    assert p.returncode == 2
    lines = p.stdout.splitlines()
    assert sum("FAILED" in line for line in lines) == 1
    assert any(local in line and "shut off" in line for line in lines)
    assert any(far in line and "shut off" in line for line in lines)


def test_one_host_commands_refuse_several_hosts(bed):
    p = run_cli("-c", SYSTEM, "-c", bed.uri(), "managed-save", "vs-test-nonexistent")
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "works on one host" in p.stderr


# --------------------------------------------------------------------------- 4. faults


def test_ssh_killed_mid_managed_save_loses_nothing(bed, remote, remote_guest):
    name = remote_guest(512, 400)  # a save long enough to cut in the middle
    mark = guest.tick_mark(name)
    image = bed.managed_save_image(name)
    proc = popen_cli("-c", bed.uri(), "managed-save", name)
    try:
        dom = remote.lookupByName(name)
        wait_for("the save to start", lambda: image.exists() or dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE,
                 proc=proc)
        kids = ssh_children(proc.pid)
        assert kids, "no ssh under virtsave: is libvirt's connection not over ssh?"
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2
    assert err.count("\n") == 1 and err.startswith("virtsave: error: "), err
    assert "connection to the daemon was lost" in err and f"-c {bed.uri()} list" in err, err
    print(f"after the cut: {assert_not_lost(bed, remote, name, mark)}")


def _capture_on(bed: SshBed) -> bool:
    return "/logcapture/capture.log" in bed.log_settings()[1]


def _owners(bed: SshBed) -> list[int]:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return [o["pid"] for o in json.loads((bed.state_dir / "logcapture.json").read_text())["owners"]]
    return []


def _remote_trace_started(bed: SshBed, remote_guest: Any) -> tuple[Any, str, guest.TickMark, subprocess.Popen[str]]:
    """A remote guest being saved by a ``virtsave trace`` (the log settings before it, the guest, its tick
    mark, the virtsave process)."""
    before = bed.log_settings()
    name = remote_guest(512, 300)
    mark = guest.tick_mark(name)
    return before, name, mark, popen_cli("-c", bed.uri(), "trace", name, "-o", os.devnull)


def _next_command_repairs(bed: SshBed, remote: libvirt.virConnect, name: str, mark: guest.TickMark,
                          before: Any) -> None:
    """The next virtsave command against the host puts its log settings back as they were, leaves no
    capture state there, and the guest is not lost."""
    p = remote_cli(bed, "list", "--match", name)
    assert p.returncode == 0, p.stderr
    assert f"restored libvirtd's log settings on {bed.label}" in p.stderr, p.stderr
    assert bed.log_settings() == before
    assert not list(bed.state_dir.glob("logcapture.json*")) and not (bed.state_dir / "logcapture").exists()
    assert assert_not_lost(bed, remote, name, mark) in ("running", "saved")


def _wait_owners_gone(bed: SshBed) -> None:
    """The owner recorded on the remote host (the anchor shell of the dead connection) has ended."""
    wait_for("the remote owner to end", lambda: all(not Path(f"/proc/{p}").exists() for p in _owners(bed)), 90)


def test_remote_trace_killed_with_its_ssh_is_repaired_by_the_next_command(bed, remote, remote_guest):
    before, name, mark, proc = _remote_trace_started(bed, remote_guest)
    try:
        wait_for("the remote capture to be on", lambda: (bed.state_dir / "logcapture.json").exists()
                 and _capture_on(bed), proc=proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # virtsave and libvirt's ssh (virtsave's own: see below)
        proc.communicate()
    _wait_owners_gone(bed)  # its anchor ssh saw virtsave's end of the pipe close
    assert _capture_on(bed), "the kill left nothing to repair: the test did not test"
    assert (bed.state_dir / "logcapture.json").exists()

    _next_command_repairs(bed, remote, name, mark, before)


def test_remote_trace_whose_ssh_dies_says_so_and_the_next_command_repairs(bed, remote, remote_guest):
    """The network to the host goes away during a trace (all its ssh connections die, no new login
    possible): the trace fails in one line, saying the settings there could not be put back; once
    the host is reachable again the next command puts them back."""
    before, name, mark, proc = _remote_trace_started(bed, remote_guest)
    try:
        wait_for("the remote capture to be on", lambda: (bed.state_dir / "logcapture.json").exists()
                 and _capture_on(bed), proc=proc)
        bed.stop()  # sshd and every session it serves: the connections drop, logins are refused
        _, err = proc.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if bed.proc is None:
            bed.start()
    assert proc.returncode == 2, err
    lines = [x for x in err.splitlines() if x.startswith("virtsave: error: ")]
    assert len(lines) == 1, err
    assert f"log settings on {bed.label} could not be put back" in err, err
    _wait_owners_gone(bed)
    assert _capture_on(bed)

    _next_command_repairs(bed, remote, name, mark, before)


def test_bed_leaves_no_sshd_listening_beyond_loopback(bed):
    out = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout
    ours = [line for line in out.splitlines() if f":{bed.port} " in line]
    assert ours and all(f"127.0.0.1:{bed.port} " in line for line in ours), ours
    assert sys.platform.startswith("linux")
