"""Daemon faults and two clients on one domain (issue 15, items 2 and 3), on a private libvirtd.

Every test here runs against a libvirtd + virtlogd of its own (``tests/privdaemon.py``: a private
mount namespace, so killing and restarting them disturbs nobody else's tests) with a real TCG guest
(512 MiB, 480 MiB filled, so that a save lasts long enough for a fault to land inside it). ``virtsave``
runs inside that namespace as an operator's would. Faults come from outside and are timed by polling
what is observable (libvirt's job info), never by sleeping.

Guarantees checked, per fault (README "Reliability", rows 8-10):
- exit 2 with exactly one ``virtsave: error:`` line (the last; progress and warning lines before it
  are allowed), no traceback;
- the guest is running (its tick counter goes on from where it was: memory survived) or it is shut
  off with a complete managed-save image, and then ``virtsave start`` brings it back the same way —
  never lost; the error line says which;
- virtsave's capture state (``logcapture.json``, the capture directory) is gone, and the daemon
  shows no capture settings;
- the next ``virtsave trace`` of the guest works.
Two clients: a second ``virtsave trace`` of a domain being traced is refused at once, naming the
first's pid, and the first completes unharmed; ``virtsave trace`` during another client's save is
refused at once, and another client's save during a trace never ends up in the trace.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest
from privdaemon import PrivateDaemons

from virtsave.harness import guest
from virtsave.image import saveimage
from virtsave.trace import model as tr

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIG = {"memory_mib": 512, "fill_mib": 480}


@pytest.fixture(scope="module")
def privd() -> Iterator[PrivateDaemons]:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    with PrivateDaemons() as d:
        yield d


@pytest.fixture
def big_guest(privd: PrivateDaemons) -> Iterator[str]:
    """A counting 512 MiB guest on the private daemon, removed afterwards (the daemon is up again by then)."""
    name = guest.unique_name("vs-test-dfault")
    conn = libvirt.open(privd.uri)
    guest.create(conn, name, **BIG)
    conn.close()
    guest.wait_tick(name, 2, timeout=240)
    yield name
    if privd.virtlogd is None or privd.virtlogd.poll() is not None:
        privd.start_virtlogd()
    if privd.libvirtd is None or privd.libvirtd.poll() is not None:
        privd.start_libvirtd()
    conn = libvirt.open(privd.uri)
    guest.remove(conn, name)
    conn.close()


# --------------------------------------------------------------------------- helpers


def job_active(uri: str, name: str) -> bool:
    try:
        c = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    try:
        return c.lookupByName(name).jobInfo()[0] in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)
    except libvirt.libvirtError:
        return False
    finally:
        c.close()


def wait_for(pred: Callable[[], object], what: str, *, timeout: float = 180,
             while_alive: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if while_alive is not None and while_alive.poll() is not None:
            _out, err = while_alive.communicate()
            pytest.fail(f"virtsave finished (exit {while_alive.returncode}) before {what}: {err[-600:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def finish(p: subprocess.Popen[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def the_error_line(res: subprocess.CompletedProcess[str]) -> str:
    """Exit 2, no traceback, exactly one ``virtsave: error:`` line and it is the last line."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("virtsave: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    return errors[0]


def state(uri: str, name: str) -> int:
    c = libvirt.open(uri)
    try:
        return c.lookupByName(name).state()[0]
    finally:
        c.close()


def managed_image(privd: PrivateDaemons, name: str) -> bytes | None:
    try:
        return (privd.save_dir / f"{name}.save").read_bytes()[:16]
    except FileNotFoundError:
        return None


def assert_capture_cleared(privd: PrivateDaemons) -> None:
    assert not (privd.state_dir / "logcapture.json").exists(), (privd.state_dir / "logcapture.json").read_text()
    assert not (privd.state_dir / "logcapture").exists()
    shown = privd.admin("daemon-log-filters") + privd.admin("daemon-log-outputs")
    assert "monitor" not in shown and "logcapture" not in shown, shown


def assert_guest_kept(privd: PrivateDaemons, name: str, mark: guest.TickMark, line: str) -> None:
    """Running (memory survived), or shut off with a complete managed-save image that ``virtsave start``
    restores (memory survived); the error *line* said which."""
    st = state(privd.uri, name)
    if st == libvirt.VIR_DOMAIN_SHUTOFF:
        assert managed_image(privd, name) == saveimage.MAGIC, managed_image(privd, name)
        assert "shut off" in line and "is complete" in line, line
        res = privd.run("start", name)
        assert res.returncode == 0, res.stderr
        assert "started from its managed-save image" in res.stdout, res.stdout
    else:
        assert st == libvirt.VIR_DOMAIN_RUNNING, st
    c = guest.wait_ticks_continue(mark, timeout=120)
    assert c.survived, f"{name}: {c}"


def assert_next_trace_works(privd: PrivateDaemons, name: str, tmp: Path) -> None:
    out = tmp / "next.json"
    res = privd.run("trace", name, "-o", str(out))
    assert res.returncode == 0, res.stderr
    t = tr.load(out)
    assert [(p["name"], p["ok"]) for p in t["phases"]] == [("save", True), ("restore", True)]
    assert state(privd.uri, name) == libvirt.VIR_DOMAIN_RUNNING
    assert_capture_cleared(privd)


def iohelper_of(privd: PrivateDaemons) -> int | None:
    """The ``libvirt_iohelper`` our libvirtd runs for a save (it copies QEMU's stream into the file)."""
    assert privd.libvirtd is not None
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            exe = (d / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2:].split()[1]) == privd.libvirtd.pid and exe.endswith(b"libvirt_iohelper"):
            return int(d.name)
    return None


@contextlib.contextmanager
def stalled_save(privd: PrivateDaemons) -> Iterator[None]:
    """Hold the running save where it is (a disk that stopped answering): SIGSTOP libvirt's iohelper,
    so QEMU's stream waits on a full pipe and libvirt's job stays active; SIGCONT at the end."""
    pid: int | None = None
    deadline = time.monotonic() + 60
    while pid is None and time.monotonic() < deadline:
        pid = iohelper_of(privd)
        time.sleep(0.01)
    if pid is None:
        pytest.fail("no libvirt_iohelper appeared under our libvirtd during the save")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def start_trace_and_wait_for_the_save(privd: PrivateDaemons, name: str, out: Path,
                                      env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    p = privd.virtsave("trace", name, "-o", str(out), env=env)
    wait_for(lambda: job_active(privd.uri, name), "libvirt's save job", while_alive=p)
    return p


# --------------------------------------------------------------------------- item 2: daemon faults


def test_libvirtd_restarted_mid_trace(privd: PrivateDaemons, big_guest: str, tmp_path: Path) -> None:
    """``systemctl restart libvirtd`` while ``virtsave trace`` saves: the runtime log settings (the
    operator's and the capture's) vanish with the old process. virtsave names the restart, says where
    the guest is (libvirt finishes or cancels the save on restart), removes its capture state."""
    privd.admin("daemon-log-filters", "--filters", "3:remote 4:event")   # the operator's, set at run time
    mark = guest.tick_mark(big_guest)
    p = start_trace_and_wait_for_the_save(privd, big_guest, tmp_path / "t.json")
    privd.stop("libvirtd", signal.SIGTERM)
    privd.start_libvirtd()
    res = finish(p)
    line = the_error_line(res)
    assert "libvirtd went away before answering" in line and "libvirtd is back: domain" in line, line
    assert re.search(r"restarted during the capture \(pid \d+ → \d+\)", res.stderr), res.stderr
    assert "went with the old process: not put back" in res.stderr, res.stderr   # the operator's 3:remote
    assert_capture_cleared(privd)
    assert_guest_kept(privd, big_guest, mark, line)
    assert_next_trace_works(privd, big_guest, tmp_path)


def test_libvirtd_killed_mid_managed_save(privd: PrivateDaemons, big_guest: str, tmp_path: Path) -> None:
    """SIGKILL of libvirtd during the traced managed save, back only after virtsave gave up waiting:
    the state is unknown then (the line says so); once libvirtd is back it cancels the save and
    resumes the guest, or finds it saved — either way nothing is lost."""
    mark = guest.tick_mark(big_guest)
    p = start_trace_and_wait_for_the_save(privd, big_guest, tmp_path / "t.json", env={"VIRTSAVE_DAEMON_WAIT": "2"})
    privd.stop("libvirtd", signal.SIGKILL)
    res = finish(p)
    line = the_error_line(res)
    assert "libvirtd went away before answering" in line and "libvirtd is not back after 2 s" in line, line
    assert "daemon not reachable while restoring log settings" in res.stderr, res.stderr
    assert not (privd.state_dir / "logcapture.json").exists()
    privd.start_libvirtd()
    wait_for(lambda: state(privd.uri, big_guest) != libvirt.VIR_DOMAIN_PAUSED, "libvirt's recovery of the job",
             timeout=60)
    assert_capture_cleared(privd)
    st = state(privd.uri, big_guest)
    if st == libvirt.VIR_DOMAIN_SHUTOFF:
        line += "; shut off, image is complete"  # the line could not know: checked by assert_guest_kept
    assert_guest_kept(privd, big_guest, mark, line)
    assert_next_trace_works(privd, big_guest, tmp_path)


def test_virtlogd_killed_mid_save(privd: PrivateDaemons, big_guest: str, tmp_path: Path) -> None:
    """SIGKILL of virtlogd during the traced managed save: the save completes, the start of the cycle
    cannot (libvirt needs virtlogd for the guest's log) — exit 2, the line says the guest is shut off
    with a complete image; with virtlogd back, ``virtsave start`` restores it."""
    mark = guest.tick_mark(big_guest)
    p = start_trace_and_wait_for_the_save(privd, big_guest, tmp_path / "t.json")
    privd.stop("virtlogd", signal.SIGKILL)
    res = finish(p)
    line = the_error_line(res)
    assert "virtlogd" in line, line
    assert_capture_cleared(privd)
    privd.start_virtlogd()
    assert_guest_kept(privd, big_guest, mark, line)
    assert_next_trace_works(privd, big_guest, tmp_path)


# --------------------------------------------------------------------------- item 3: two clients


def test_second_trace_of_a_domain_refused_at_once(privd: PrivateDaemons, big_guest: str, tmp_path: Path) -> None:
    mark = guest.tick_mark(big_guest)
    first = start_trace_and_wait_for_the_save(privd, big_guest, tmp_path / "first.json")
    with stalled_save(privd):   # the first trace is inside its save for as long as the second runs
        t0 = time.monotonic()
        second = privd.run("trace", big_guest, "-o", str(tmp_path / "second.json"), timeout=120)
        refused_in = time.monotonic() - t0
        assert first.poll() is None and job_active(privd.uri, big_guest)
    line = the_error_line(second)
    want = f"virtsave: error: cannot trace {big_guest}: virtsave pid {first.pid} (trace --op cycle"
    assert line.startswith(want), line
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert not (tmp_path / "second.json").exists()
    res = finish(first)
    assert res.returncode == 0, res.stderr
    t = tr.load(tmp_path / "first.json")
    save = t["phases"][0]
    assert [p["name"] for p in t["phases"]] == ["save", "restore"] and all(p["ok"] for p in t["phases"])
    assert [m["execute"] for m in save["messages"] if m["kind"] == "command"].count("migrate") == 1
    c = guest.wait_ticks_continue(mark, timeout=120)
    assert c.survived, str(c)
    print(f"second trace refused after {refused_in:.2f} s")


def _clients(privd: PrivateDaemons) -> int:
    """Clients connected to our libvirtd now."""
    return sum(1 for ln in privd.admin("srv-clients-list", "libvirtd").splitlines() if re.match(r"\s*\d+\s", ln))


def _virsh_save(privd: PrivateDaemons, name: str, path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(["virsh", "-q", "-c", privd.uri, "save", name, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_trace_refused_while_another_client_saves(privd: PrivateDaemons, big_guest: str, tmp_path: Path) -> None:
    """``virsh save`` runs, then ``virtsave trace`` of the same domain: refused at once, naming the job;
    the other client's save completes unharmed (and the guest comes back from its file)."""
    img = Path("/var/tmp") / f"{big_guest}.virsh.save"
    mark = guest.tick_mark(big_guest)
    virsh = _virsh_save(privd, big_guest, img)
    try:
        wait_for(lambda: job_active(privd.uri, big_guest), "virsh's save job")
        with stalled_save(privd):   # virsh's save is under way for as long as virtsave runs
            res = privd.run("trace", big_guest, "-o", str(tmp_path / "t.json"), timeout=120)
            assert job_active(privd.uri, big_guest)
        line = the_error_line(res)
        assert f"cannot trace {big_guest}: another libvirt client has a save job running" in line, line
        assert not (tmp_path / "t.json").exists()
        assert virsh.wait(timeout=300) == 0, virsh.communicate()[1]
        assert state(privd.uri, big_guest) == libvirt.VIR_DOMAIN_SHUTOFF
        r = subprocess.run(["virsh", "-q", "-c", privd.uri, "restore", str(img)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        c = guest.wait_ticks_continue(mark, timeout=120)
        assert c.survived, str(c)
    finally:
        img.unlink(missing_ok=True)


def test_another_clients_save_during_a_trace_never_in_it(privd: PrivateDaemons, big_guest: str,
                                                           tmp_path: Path) -> None:
    """``virsh save`` of the domain while ``virtsave trace`` saves it: libvirt runs one job at a time, so
    one of them fails. The trace is then either refused (exit 2, no file) or holds only its own
    conversation: one save by libvirt's managed-save job, one restore by its start job."""
    img = Path("/var/tmp") / f"{big_guest}.virsh.save"
    out = tmp_path / "t.json"
    p = start_trace_and_wait_for_the_save(privd, big_guest, out)
    with stalled_save(privd):   # virsh asks while the traced save is under way
        before = _clients(privd)
        virsh = _virsh_save(privd, big_guest, img)
        wait_for(lambda: _clients(privd) > before or virsh.poll() is not None, "virsh connected", timeout=60)
    try:
        res = finish(p)
        virsh_rc = virsh.wait(timeout=300)
        print(f"trace exit {res.returncode}, virsh save exit {virsh_rc}: {virsh.communicate()[1].strip()[:200]}")
        if res.returncode == 0:
            t = tr.load(out)
            assert [(ph["name"], ph["operation"], ph["ok"]) for ph in t["phases"]] == [
                ("save", "managed-save", True), ("restore", "start", True)], t["phases"]
            for ph in t["phases"]:
                cmds = [m["execute"] for m in ph["messages"] if m["kind"] == "command"]
                assert cmds.count("migrate") + cmds.count("migrate-incoming") == 1, cmds
        else:
            line = the_error_line(res)
            assert "another libvirt client" in line or "failed" in line, line
            if out.exists():  # a failed operation's evidence: one conversation of ours at most
                t = json.loads(out.read_text())
                for ph in t["phases"]:
                    cmds = [m["execute"] for m in ph["messages"] if m["kind"] == "command"]
                    assert cmds.count("migrate") + cmds.count("migrate-incoming") <= 1, cmds
                    assert not (ph["ok"] is False and ("migrate" in cmds and any(
                        m["kind"] == "event" and (m.get("data") or {}).get("status") == "completed"
                        for m in ph["messages"]))), "a failed phase holding a completed migration: not ours"
        if virsh_rc == 0:   # virsh's save won: bring the guest back from its file
            assert state(privd.uri, big_guest) == libvirt.VIR_DOMAIN_SHUTOFF
            r = subprocess.run(["virsh", "-q", "-c", privd.uri, "restore", str(img)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        assert state(privd.uri, big_guest) == libvirt.VIR_DOMAIN_RUNNING
        assert_capture_cleared(privd)
    finally:
        img.unlink(missing_ok=True)
