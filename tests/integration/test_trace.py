"""`virtsave trace` on the real libvirtd and real QEMU guests (issue 3 acceptance, issue 7 item 3).

Every test checks that libvirtd's log filters/outputs read the same before and after; a
session-scoped fixture records them at the start and asserts (and, if needed, restores) them at
the end. Other engineers may be tracing on the same daemon at the same moment, so "the
settings as the operator left them" are read only while no virtsave capture session is open
(the state file is absent).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from conftest import require_format
from daemonlog import capture_idle, log_settings

from tests.conftest import REPO, VIRTSAVE
from virtsave.core import paths as config
from virtsave.harness import guest
from virtsave.libvirtd import logcapture

pytestmark = pytest.mark.integration

STATE = Path(config.STATE_DIR) / "logcapture.json"


def admin(kind: str, value: str | None = None) -> str:
    args = ["virt-admin", "-c", "libvirtd:///system", f"daemon-log-{kind}"]
    if value is not None:
        args += ["--" + kind, value]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return " ".join(out.split(":", 1)[1].split()) if value is None else ""


def wait_idle(timeout: float = 600) -> None:
    """Wait until no virtsave capture session (ours or another engineer's) holds the daemon."""
    deadline = time.monotonic() + timeout
    while STATE.exists() and time.monotonic() < deadline:
        logcapture.repair_if_stale()  # a session whose process died does not count
        time.sleep(0.5)


def settings() -> tuple[str, str]:
    wait_idle()
    return admin("filters"), admin("outputs")


@pytest.fixture(scope="session", autouse=True)
def daemon_log_settings_unchanged() -> Iterator[tuple[str, str]]:
    before = settings()
    yield before
    after = settings()
    if after != before:  # put them back for everyone else, then fail
        admin("filters", before[0])
        admin("outputs", before[1])
    assert after == before, f"daemon log settings changed: {before} -> {after}"


def commands(phase: dict, name: str) -> list[dict]:
    return [m for m in phase["messages"] if m["kind"] == "command" and m["execute"] == name]


def migration_statuses(phase: dict) -> list[str]:
    return [m["data"]["status"] for m in phase["messages"] if m["kind"] == "event" and m["event"] == "MIGRATION"]


def phase(trace: dict, name: str) -> dict:
    found = [p for p in trace["phases"] if p["name"] == name]
    assert len(found) == 1, f"expected one {name} phase, got {[p['name'] for p in trace['phases']]}"
    return found[0]


def popen_trace(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*VIRTSAVE, "trace", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"})


def wait_job_started(dom: libvirt.virDomain, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Until libvirt's save job of *dom* has moved data (or the process ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(libvirt.libvirtError):
            info = dom.jobInfo()
            if info[0] != libvirt.VIR_DOMAIN_JOB_NONE and info[4] > 0:  # dataProcessed
                return
        time.sleep(0.05)
    raise AssertionError(f"save job of {dom.name()} never started (virtsave rc={proc.poll()})")


def job_active(dom: libvirt.virDomain) -> bool:
    try:
        return dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE
    except libvirt.libvirtError:  # not running any more: no job
        return False


def assert_running_and_ticking(conn: libvirt.virConnect, mark: guest.TickMark) -> None:
    """Running, and its counter went on past *mark* (taken before the save) without a restart."""
    dom = conn.lookupByName(mark.name)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, f"{mark.name} is not running: {dom.state()}"
    c = guest.wait_ticks_continue(mark, timeout=60)
    assert c.survived, f"{mark.name}: {c}"


# --------------------------------------------------------------------------------------------------


def test_trace_cycle_to_stdout(conn, make_guest, cli, workdir) -> None:  # type: ignore[no-untyped-def]
    name = make_guest(memory_mib=256, fill_mib=32)
    before = settings()
    mark = guest.tick_mark(name)
    proc = cli("trace", name)
    assert proc.returncode == 0, proc.stderr
    t = workdir / "t.json"
    t.write_text(proc.stdout)
    assert cli("validate", str(t)).returncode == 0
    trace = json.loads(proc.stdout)
    assert trace["source"] == "libvirt" and trace["domain"]["name"] == name
    assert trace["domain"]["uuid"] == conn.lookupByName(name).UUIDString()
    assert trace["domain"]["argv"] and "qemu-system" in trace["domain"]["argv"][0]
    assert trace["host"]["libvirt"] and trace["host"]["qemu"]

    save = phase(trace, "save")
    assert save["ok"] is True and save["operation"] == "managed-save"
    assert commands(save, "stop")
    getfd = commands(save, "getfd")
    assert [g.get("fds") for g in getfd] == [1]
    assert [m["arguments"]["uri"] for m in commands(save, "migrate")] == ["fd:migrate"]
    st = migration_statuses(save)
    assert st and st[-1] == "completed" and "active" in st, st
    assert save["image"]["size"] > 32 * 2**20 and save["image"]["header"]["format"] == "raw"

    restore = phase(trace, "restore")
    assert restore["ok"] is True and restore["operation"] == "start"
    assert len(commands(restore, "migrate-incoming")) == 1
    assert commands(restore, "cont")
    for ph in (save, restore):
        ts = [m["t"] for m in ph["messages"]]
        assert ts == sorted(ts)
        assert "unphased" not in ph, ph.get("unphased")  # every message of the window is in its phase
    # the save tail: statistics query, then capabilities reset (no polling of ours in between)
    names = [m["execute"] for m in save["messages"] if m["kind"] == "command"]
    assert names.count("query-migrate") == 2 and names[-1] == "migrate-set-parameters", names

    assert_running_and_ticking(conn, mark)
    assert settings() == before


def test_trace_sparse_parallel_channels(conn, make_guest, cli, workdir) -> None:  # type: ignore[no-untyped-def]
    require_format("sparse")
    name = make_guest(memory_mib=256, fill_mib=32)
    out = workdir / "sparse.json"
    mark = guest.tick_mark(name)
    proc = cli("trace", name, "--image-format", "sparse", "--parallel-channels", "2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    trace = json.loads(out.read_text())
    save, restore = phase(trace, "save"), phase(trace, "restore")
    assert save["operation"] == "save" and restore["operation"] == "restore"
    add_fd = commands(save, "add-fd")
    assert add_fd and all(m.get("fds") == 1 for m in add_fd)
    uris = [m["arguments"]["uri"] for m in commands(save, "migrate")]
    assert len(uris) == 1 and uris[0].startswith("file:/dev/fdset/"), uris
    assert save["image"]["header"]["format"] == "sparse"
    caps = [c for m in commands(save, "migrate-set-capabilities") for c in m["arguments"]["capabilities"]
            if c["state"]]
    assert {"mapped-ram", "multifd"} <= {c["capability"] for c in caps}
    inc = [m["arguments"]["uri"] for m in commands(restore, "migrate-incoming")]
    assert len(inc) == 1 and inc[0].startswith("file:/dev/fdset/"), inc
    assert_running_and_ticking(conn, mark)
    # The scratch image of the cycle is gone.
    assert not any((Path(config.STATE_DIR) / "trace-images").glob("*/*"))


def test_two_guests_traced_at_once(conn, make_guest, workdir) -> None:  # type: ignore[no-untyped-def]
    names = [make_guest(memory_mib=256, fill_mib=64) for _ in range(2)]
    procs = [popen_trace(n) for n in names]
    results = [p.communicate(timeout=600) for p in procs]
    traces = []
    for n, p, (out, err) in zip(names, procs, results, strict=True):
        assert p.returncode == 0, err
        tr = json.loads(out)
        assert tr["domain"]["name"] == n
        traces.append(tr)
    monitors = set()
    for tr in traces:
        for ph in tr["phases"]:
            monitors.add(ph["monitor"])
            ids = [m["id"] for m in ph["messages"] if m["kind"] == "command"]
            assert len(ids) == len(set(ids)), "commands of two monitors mixed in one phase"
            replies = [m["id"] for m in ph["messages"] if m["kind"] == "reply"]
            assert len(replies) == len(set(replies))
        assert len(commands(phase(tr, "save"), "stop")) == 1
        assert len(commands(phase(tr, "save"), "migrate")) == 1
        assert len(commands(phase(tr, "restore"), "migrate-incoming")) == 1
    assert len(monitors) == 4  # two phases per guest, each on its own QEMU's monitor
    # The two runs really overlapped (else this test would prove nothing).
    spans = [(tr["phases"][0]["window"]["since"], tr["phases"][-1]["window"]["until"]) for tr in traces]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
    for n in names:
        assert conn.lookupByName(n).state()[0] == libvirt.VIR_DOMAIN_RUNNING


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_mid_save_restores_everything(conn, make_guest, sig) -> None:  # type: ignore[no-untyped-def]
    name = make_guest(memory_mib=384, fill_mib=200)
    dom = conn.lookupByName(name)
    before = settings()
    qemu_id = dom.ID()
    mark = guest.tick_mark(name)
    proc = popen_trace(name)
    wait_job_started(dom, proc)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not STATE.exists() or str(proc.pid) not in STATE.read_text()
    assert_running_and_ticking(conn, mark)
    assert dom.ID() == qemu_id  # the save was cancelled: same QEMU, resumed (not saved and restarted)
    assert not dom.hasManagedSaveImage(0)
    assert settings() == before


@contextlib.contextmanager
def _repaired_at_the_end(state_dir: Path) -> Iterator[None]:
    """Whatever the CLI did, never leave the daemon logging into a killed trace's capture."""
    try:
        yield
    finally:
        logcapture.repair_if_stale(state_dir=state_dir)


def test_sigkill_during_trace_is_repaired_by_next_run(conn, make_guest, cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL of ``virtsave trace`` while capture is on: the next command that talks to libvirtd
    (``virtsave list``) puts the log settings back and says so. Deterministic on a shared daemon: the
    trace and the next command share a private state directory, and the default one's capture lock is
    held meanwhile, so no other virtsave can start a capture, join this one or repair it first."""
    name = make_guest(memory_mib=384, fill_mib=200)
    dom = conn.lookupByName(name)
    env = {**os.environ, "COLUMNS": "200", "VIRTSAVE_STATE_DIR": str(tmp_path / "state")}
    state = tmp_path / "state" / "logcapture.json"
    with capture_idle() as before, _repaired_at_the_end(tmp_path / "state"):
        proc = subprocess.Popen([*VIRTSAVE, "trace", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO, env=env)
        wait_job_started(dom, proc)
        assert [o["pid"] for o in json.loads(state.read_text())["owners"]] == [proc.pid]
        proc.kill()
        proc.communicate(timeout=60)
        assert log_settings() != before, "capture was not on"
        assert json.loads(state.read_text())["owners"][0]["pid"] == proc.pid     # left behind: stale
        nxt = subprocess.run([*VIRTSAVE, "list", "--match", name], capture_output=True, text=True, cwd=REPO,
                             env=env, timeout=120)
        assert nxt.returncode == 0, nxt.stderr
        assert f"restored libvirtd's log settings left by an interrupted virtsave (pid {proc.pid})" in nxt.stderr, \
            nxt.stderr
        assert name in nxt.stdout
        assert not state.exists()
        assert log_settings() == before
    # libvirtd finishes the save on its own; bring the guest back without virtsave, then trace it again.
    deadline = time.monotonic() + 300
    while job_active(dom) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not dom.isActive():
        dom.create()
    again = cli("trace", name, "--op", "cycle")
    assert again.returncode == 0, again.stderr
    assert settings() == before
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_failed_save_fs_full_is_traced(conn, make_guest, cli, workdir) -> None:  # type: ignore[no-untyped-def]
    name = make_guest(memory_mib=256, fill_mib=64)
    mnt = Path(f"{workdir}-tmpfs")
    mnt.mkdir(mode=0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        before = settings()
        out = workdir / "failed.json"
        mark = guest.tick_mark(name)
        proc = cli("trace", name, "--op", "save", "--file", str(mnt / "g.save"), "-o", str(out))
        assert proc.returncode == 2, proc.stderr
        assert "failed" in proc.stderr and "Traceback" not in proc.stderr
        trace = json.loads(out.read_text())
        save = phase(trace, "save")
        assert save["ok"] is False and save["error"]
        assert "failed" in migration_statuses(save)
        names = [m["execute"] for m in save["messages"] if m["kind"] == "command"]
        assert "migrate" in names and "cont" in names[names.index("migrate"):]
        assert conn.lookupByName(name).state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert_running_and_ticking(conn, mark)
        assert settings() == before
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def test_single_operations(conn, make_guest, cli, workdir) -> None:  # type: ignore[no-untyped-def]
    name = make_guest(memory_mib=256, fill_mib=32)
    dom = conn.lookupByName(name)
    img = workdir / "g.save"
    mark = guest.tick_mark(name)
    proc = cli("trace", name, "--op", "save", "--file", str(img), "--bypass-cache", "-o", str(workdir / "s.json"))
    assert proc.returncode == 0, proc.stderr
    assert not dom.isActive() and img.exists()
    t = json.loads((workdir / "s.json").read_text())
    assert [p["name"] for p in t["phases"]] == ["save"]
    save = t["phases"][0]
    assert save["operation"] == "save" and save["options"] == {"bypass_cache": True, "file": str(img)}
    assert save["image"]["path"] == str(img) and save["image"]["header"]["partial"] is False

    proc = cli("trace", name, "--op", "restore", "--file", str(img), "--paused", "-o", str(workdir / "r.json"))
    assert proc.returncode == 0, proc.stderr
    t = json.loads((workdir / "r.json").read_text())
    (restore,) = t["phases"]
    assert restore["name"] == "restore" and restore["operation"] == "restore"
    assert len(commands(restore, "migrate-incoming")) == 1 and not commands(restore, "cont")
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    dom.resume()

    proc = cli("trace", name, "--op", "managed-save", "-o", str(workdir / "m.json"))
    assert proc.returncode == 0, proc.stderr
    t = json.loads((workdir / "m.json").read_text())
    assert [p["operation"] for p in t["phases"]] == ["managed-save"]
    assert dom.hasManagedSaveImage(0) and not dom.isActive()
    dom.create()
    assert_running_and_ticking(conn, mark)


def test_secrets_are_redacted(conn, cli, workdir) -> None:  # type: ignore[no-untyped-def]
    secret = "Vs3cR7pw"  # VNC passwords: at most 8 characters
    name = guest.unique_name("vs-test")
    xml = guest.guest_xml(name, memory_mib=128, fill_mib=16).replace(
        "</devices>", f"<graphics type='vnc' autoport='yes' listen='127.0.0.1' passwd='{secret}'/></devices>")
    dom = conn.defineXML(xml)
    try:
        dom.create()
        guest.wait_tick(name, 1, timeout=120)
        assert secret in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
        out = workdir / "vnc.json"
        proc = cli("trace", name, "-o", str(out))
        assert proc.returncode == 0, proc.stderr
        text = out.read_text()
        trace = json.loads(text)
        # libvirt set the password over QMP on restore: the command is there, the value is not.
        assert commands(phase(trace, "restore"), "set_password")
        assert secret not in text
        assert cli("export", str(out), "--format", "replies").stdout.count(secret) == 0
    finally:
        guest.remove(conn, name)


def test_trace_errors_are_one_line(cli) -> None:  # type: ignore[no-untyped-def]
    proc = cli("trace", "vs-test-no-such-domain-xyz")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "domain not found" in proc.stderr
    proc = cli("trace", "x", "--op", "bogus")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
