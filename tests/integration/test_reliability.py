"""Reliability under faults, on the real libvirtd and real QEMU (issue 7, scenarios 1, 2, 3, 6).

Every test asserts that the guest is running (or that its image is complete and restorable),
and that nothing claims success falsely: no image with the ``LibvirtQemudSave`` magic unless it
is complete, ``virtsave list`` tells the truth, exit code 2 with one line on failure.

Faults are injected from outside, as an operator or the kernel would: a full tmpfs mounted by
the test, SIGKILL of the domain's QEMU (pid from ``/run/libvirt/qemu/<name>.pid``) or of the
direct backend's QEMU, SIGINT/SIGKILL to the ``virtsave`` process. Faults are timed by polling
what is observable (libvirt's job info, the image growing, the QEMU process appearing), never by
sleeping. libvirtd's log filters/outputs are read before this module runs and must be the same
at the end (checked by a module fixture).

Guests: 256 MiB, or 512 MiB with 480 MiB filled where a fault must land inside a save.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid as _uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest
from badinput import kill_recorded, make_qemu_wrapper, recorded_pids
from conftest import require_format
from daemonlog import capture_idle, log_settings

from virtsave.harness import guest
from virtsave.image import saveimage
from virtsave.libvirtd import domainlog
from virtsave.qemu import launch as qemu_launch
from virtsave.qemu.qmp import QMPSession
from virtsave.trace import model as tr

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent.parent
VIRTSAVE = [sys.executable, "-m", "virtsave.cli"]
URI = os.environ.get("VIRTSAVE_TEST_URI", "qemu:///system")
SAVE_DIR = Path("/var/lib/libvirt/qemu/save")
STATE_DIR = Path(os.environ.get("VIRTSAVE_STATE_DIR", "/var/lib/virtsave"))
BIG = {"memory_mib": 512, "fill_mib": 480}
#: The replayed guest must be counting before it is saved (else a restore restarts at 1).
COUNTING = r"tick [2-9]"
#: Every command first repairs log settings left by a killed ``virtsave trace`` (anyone's) and says so:
#: that note is not part of the command's own error.
REPAIR_NOTE = "warning: restored libvirtd's log settings"
#: The fault tests replay a trace this module made itself (SECURITY.md: --allow-unsafe is for exactly
#: that); that such a trace passes the safety check on its own is test_own_trace_passes_safety_check.
OWN = ("--allow-unsafe",)


# --------------------------------------------------------------------------- helpers


def _capture_on() -> bool:
    """Some virtsave (ours or a colleague's, whatever its state dir) has log capture switched on."""
    return (STATE_DIR / "logcapture.json").exists() or "/logcapture/" in log_settings()[1]


def _no_capture_running(timeout: float = 180) -> None:
    """Wait (bounded) until no virtsave has log capture switched on."""
    deadline = time.monotonic() + timeout
    while _capture_on() and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.fixture(scope="module", autouse=True)
def daemon_log_settings_unchanged() -> Iterator[tuple[str, str]]:
    """libvirtd's log settings are the same after this module as before it."""
    _no_capture_running()
    before = log_settings()
    yield before
    _no_capture_running()
    assert log_settings() == before, "libvirtd's log filters/outputs differ after the reliability tests"


def magic(path: Path) -> bytes | None:
    """The first 16 bytes of *path* (None when it does not exist)."""
    try:
        with open(path, "rb") as f:
            return f.read(16)
    except FileNotFoundError:
        return None


def assert_not_complete(path: Path) -> None:
    """Gone, or not claiming completeness."""
    m = magic(path)
    assert m != saveimage.MAGIC, f"{path} claims to be a complete save image after a failed save"


def assert_one_error_line(proc_or_err: subprocess.CompletedProcess[str] | str, code: int | None = 2,
                          allow_info: tuple[str, ...] = ()) -> str:
    """One ``virtsave: error:`` line on stderr (progress lines with *allow_info* prefixes aside), no traceback."""
    if isinstance(proc_or_err, str):
        err, rc = proc_or_err, None
    else:
        err, rc = proc_or_err.stderr, proc_or_err.returncode
    assert "Traceback" not in err, err
    if code is not None and rc is not None:
        assert rc == code, f"exit {rc}, stderr {err!r}"
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith((*allow_info, REPAIR_NOTE))]
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("virtsave: error: "), lines[0]
    return lines[0]


def assert_interrupted(res: subprocess.CompletedProcess[str]) -> None:
    """Ctrl-C: exit 130 (128 + SIGINT), no traceback, and exactly one ``virtsave:`` line, last, saying
    it was interrupted (progress lines before it are fine; the ref path also names the guest's state)."""
    assert res.returncode == 130, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(REPAIR_NOTE)]
    assert lines and lines[-1].startswith("virtsave:") and "interrupted" in lines[-1], res.stderr
    assert sum(ln.startswith("virtsave:") for ln in lines) == 1, res.stderr


def list_entry(cli: Callable[..., subprocess.CompletedProcess[str]], name: str) -> dict:
    """``virtsave --json list`` entry of *name*."""
    proc = cli("--json", "list", "--match", name)
    assert proc.returncode == 0, proc.stderr
    entries = [d for d in json.loads(proc.stdout) if d["name"] == name]
    assert len(entries) == 1, entries
    return entries[0]


def assert_list_truthful(cli: Callable[..., subprocess.CompletedProcess[str]], conn: libvirt.virConnect,
                         name: str) -> dict:
    """``virtsave list`` agrees with libvirt and with the disk about state and managed-save image."""
    d = list_entry(cli, name)
    dom = conn.lookupByName(name)
    assert d["state"] == {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
                          libvirt.VIR_DOMAIN_SHUTOFF: "shut off"}.get(dom.state()[0], d["state"])
    img = SAVE_DIR / f"{name}.save"
    assert d["managed_save"] == bool(dom.hasManagedSaveImage(0))
    # "has a managed-save image" must mean a complete one on disk, and vice versa.
    assert d["managed_save"] == (magic(img) == saveimage.MAGIC), (d, magic(img))
    return d


def popen_cli(*args: str, umask: int | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    kw = {} if umask is None else {"umask": umask}
    return subprocess.Popen([*VIRTSAVE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "COLUMNS": "200", **(env or {})}, **kw)


def finish(p: subprocess.Popen[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def wait_for(pred: Callable[[], object], what: str, timeout: float = 120, every: float = 0.01,
             while_alive: subprocess.Popen[str] | None = None) -> object:
    """Poll *pred* until truthy; fail if *while_alive* exits first (the window was missed)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if while_alive is not None and while_alive.poll() is not None:
            _out, err = while_alive.communicate()
            pytest.fail(f"virtsave finished (exit {while_alive.returncode}) before {what}: {err[-400:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(every)


def job_active(dom: libvirt.virDomain) -> bool:
    """libvirt reports a save/migration job under way (bounded or unbounded, not completed)."""
    try:
        return dom.jobInfo()[0] in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)
    except libvirt.libvirtError:
        return False


def domain_qemu_pid(name: str) -> int | None:
    try:
        return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def children(pid: int) -> list[int]:
    """Direct children of *pid*."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
            out.append(int(d.name))
    return out


def qemu_child(pid: int) -> int | None:
    """The guest QEMU *pid* started (not a short ``qemu-system-x86_64 --version`` probe)."""
    for c in children(pid):
        args = cmdline(c)
        if args and "qemu-system" in args[0] and "-machine" in args and "--version" not in args:
            return c
    return None


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st[st.rfind(")") + 2] != "Z"


def ticks_continue(mark: guest.TickMark, timeout: float = 60) -> None:
    """The guest's counter went on past the save point *mark* without a restart (memory survived)."""
    c = guest.wait_ticks_continue(mark, timeout=timeout)
    assert c.survived, f"{mark.name}: {c}"


def serial_ticks(path: Path) -> list[int]:
    try:
        return [int(x) for x in re.findall(rb"^tick (\d+)\r?$", path.read_bytes(), re.M)]
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def small_tmpfs(size_mib: int = 48) -> Iterator[Path]:
    """A tmpfs of *size_mib* under /var/tmp/vs-test-…, unmounted and removed afterwards (also on failure)."""
    d = Path("/var/tmp") / f"vs-test-{os.getpid()}-{_uuid.uuid4().hex[:6]}-full"
    d.mkdir(mode=0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        r = subprocess.run(["umount", str(d)], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)
        with contextlib.suppress(OSError):
            d.rmdir()


@pytest.fixture
def full_fs() -> Iterator[Path]:
    with small_tmpfs() as d:
        yield d


@pytest.fixture(scope="module")
def big_trace(conn, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """``virtsave trace`` of a 512 MiB guest (480 MiB filled): the input of the direct-path faults.
    The guest is removed right after (the trace needs only its kernel and initrd)."""
    d = tmp_path_factory.mktemp("big-trace")
    name = guest.unique_name("vs-test-rel")
    try:
        guest.create(conn, name, **BIG)
        guest.wait_tick(name, 2, timeout=180)
        out = d / "big.json"
        proc = subprocess.run([*VIRTSAVE, "trace", name, "-o", str(out)], capture_output=True, text=True,
                              cwd=REPO, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert tr.load(out)["domain"]["argv"], "trace has no argv"
    finally:
        guest.remove(conn, name)
    return out


# --------------------------------------------------------------------------- 1. target filesystem full


def test_disk_full_libvirt_save(cli, conn, make_guest, full_fs):
    """libvirt path: save into a full filesystem → exit 2, one line; guest keeps running; no
    complete-looking image; ``list`` tells the truth."""
    name = make_guest(memory_mib=256, fill_mib=128)
    target = full_fs / "x.img"
    proc = cli("save", name, str(target))
    line = assert_one_error_line(proc)
    assert name in line
    dom = conn.lookupByName(name)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, dom.state()
    assert_not_complete(target)
    d = assert_list_truthful(cli, conn, name)
    assert d["state"] == "running" and not d["managed_save"]
    before = guest.last_tick(name)
    assert guest.wait_tick(name, before + 1, timeout=60) > before


def test_disk_full_traced_save(cli, conn, make_guest, full_fs, workdir):
    """``virtsave trace --file`` into a full filesystem: exit 2, one line, but the trace is still
    written as evidence — its save phase says ``ok: false`` with the error and holds libvirt's
    ``cont``; no restore phase; the guest runs on; no complete image."""
    name = make_guest(memory_mib=256, fill_mib=128)
    target = full_fs / "x.img"
    out = workdir / "t.json"
    proc = cli("trace", name, "--file", str(target), "-o", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert conn.lookupByName(name).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert_not_complete(target)
    t = tr.load(out)
    assert [p["name"] for p in t["phases"]] == ["save"], [p["name"] for p in t["phases"]]
    save = t["phases"][0]
    assert save["ok"] is False and save["error"], save["error"]
    cmds = [m["execute"] for m in save["messages"] if m["kind"] == "command"]
    assert "migrate" in cmds and "cont" in cmds[cmds.index("migrate"):], cmds
    before = guest.last_tick(name)
    assert guest.wait_tick(name, before + 1, timeout=60) > before


def test_disk_full_direct_save(cli, conn, make_guest, full_fs, workdir, our_qemus):
    """direct path: ``virtsave direct save`` of a QEMU launched by hand from the guest's own
    command line into a full filesystem → exit 2, the QEMU's guest is running again (query-status)
    and keeps counting, no image with the complete magic."""
    name = make_guest(memory_mib=256, fill_mib=128)
    argv = domainlog.argv_from_domain_log(f"/var/log/libvirt/qemu/{name}.log")
    conn.lookupByName(name).destroy()  # only our own QEMU from now on
    serial = workdir / "serial.log"
    plan = qemu_launch.plan_launch(argv, paused=False, serial_log=serial)
    proc = qemu_launch.start(plan)
    our_qemus.append(proc.pid)
    wait_for(lambda: max(serial_ticks(serial), default=0) >= 2, "the hand-launched guest counting")
    target = full_fs / "x.img"
    res = cli("direct", "save", "--qmp", proc.qmp_address, str(target))
    assert_one_error_line(res)
    assert proc.alive(), "QEMU died during a failed save"
    with QMPSession(proc.qmp_address) as s:
        st = s.execute("query-status")
    assert st["running"] is True and st["status"] == "running", st
    assert_not_complete(target)
    n = max(serial_ticks(serial))
    wait_for(lambda: max(serial_ticks(serial)) > n, "a new tick after the failed save", timeout=60)


@pytest.mark.slow
def test_disk_full_replay_save(cli, big_trace, full_fs, workdir):
    """direct path via replay: the save phase into a full filesystem → exit 2, no complete image,
    no phase claiming success in the evidence trace, no QEMU left behind."""
    target = full_fs / "x.img"
    out = workdir / "r.json"
    traced, launches = _recorded_copy(big_trace, workdir)
    proc = cli("replay", str(traced), *OWN, "--image", str(target), "-o", str(out), "--wait-serial", COUNTING)
    assert_one_error_line(proc, allow_info=("replaying ",))
    assert_not_complete(target)
    _no_false_success(out, "save")
    pids = recorded_pids(launches)
    left = [p for p in pids if alive(p)]
    kill_recorded(launches)
    assert pids, "control: the replay launched no QEMU"
    assert not left, f"replay left its QEMU running (pids {left})"


def test_own_trace_passes_safety_check(big_trace):
    """A trace ``virtsave trace`` just recorded of the standard test guest is not refused by the
    untrusted-trace check (else every replay needs --allow-unsafe and the check means nothing)."""
    from virtsave.qemu import replay

    t = tr.load(big_trace)
    assert replay.check_safety(t, allow_unsafe=True) == []


def _recorded_copy(trace_path: Path, d: Path) -> tuple[Path, Path]:
    """*trace_path* with its QEMU binary replaced by a wrapper that records each launch (pid first):
    the QEMUs of this replay, tracked by pid (never a host-wide process scan). Returns (trace, record)."""
    wrapper, record = make_qemu_wrapper(d)
    t = tr.load(trace_path)
    t["domain"]["argv"][0] = str(wrapper)
    out = d / "recorded.json"
    tr.dump(t, out)
    return out, record


def _no_false_success(out: Path, failed: str | None) -> None:
    """A replay that failed in phase *failed* wrote its trace as evidence, ending with that phase, which
    is marked failed (``ok`` false, also when QEMU died before the phase got anywhere; earlier
    phases may have succeeded: they did); an interrupted one (*failed* None) wrote no trace."""
    if failed is None:
        assert not out.exists(), "an interrupted replay wrote its trace as if complete"
        return
    phases = [(p["name"], p["ok"]) for p in tr.load(out)["phases"]]
    assert phases and phases[-1][0] == failed and phases[-1][1] is False, phases


# --------------------------------------------------------------------------- 2. QEMU killed


@pytest.mark.slow
@pytest.mark.parametrize("how", ["managed-save", "save-gzip"])
def test_qemu_killed_during_save(cli, conn, make_guest, workdir, how):
    """libvirt path: SIGKILL the domain's QEMU while libvirt's save job runs (managed save, and a
    gzip save to a file) → exit 2, one line; no image claiming completeness; ``list`` says shut off
    and agrees with the disk; the next start is a cold boot and says so (nothing pretends the
    memory survived)."""
    require_format("gzip" if how == "save-gzip" else None)
    name = make_guest(**BIG)
    dom = conn.lookupByName(name)
    qpid = domain_qemu_pid(name)
    assert qpid and alive(qpid)
    target = SAVE_DIR / f"{name}.save" if how == "managed-save" else workdir / "g.save"
    args = ["managed-save", name] if how == "managed-save" else ["save", name, str(target), "--image-format", "gzip"]
    p = popen_cli(*args)
    wait_for(lambda: job_active(dom), "libvirt's save job", while_alive=p)
    os.kill(qpid, signal.SIGKILL)
    res = finish(p)
    assert_one_error_line(res)
    assert_not_complete(target)
    d = assert_list_truthful(cli, conn, name)
    assert d["state"] == "shut off" and d["managed_save"] is False, d
    st = cli("--json", "start", name)
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["detail"]["from_managed_save"] is False


@pytest.mark.slow
def test_qemu_killed_during_restore(cli, conn, make_guest, workdir):
    """libvirt path: SIGKILL QEMU while it loads a (gzip, so the load takes a while) image →
    exit 2, one line; the domain is shut off and ``list`` says so; the image is untouched,
    complete, and a second restore brings the guest back with its counter going on."""
    require_format("gzip")
    name = make_guest(**BIG)
    img = workdir / "g.save"
    r = cli("save", name, str(img), "--image-format", "gzip")
    assert r.returncode == 0, r.stderr
    assert magic(img) == saveimage.MAGIC
    size = img.stat().st_size
    before = guest.tick_mark(name)
    dom = conn.lookupByName(name)
    p = popen_cli("restore", str(img))
    qpid = wait_for(lambda: domain_qemu_pid(name), "the restoring QEMU", while_alive=p)
    wait_for(lambda: alive(qpid), "QEMU process", while_alive=p)  # type: ignore[arg-type]
    os.kill(qpid, signal.SIGKILL)  # type: ignore[arg-type]
    res = finish(p)
    assert_one_error_line(res)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    d = assert_list_truthful(cli, conn, name)
    assert d["state"] == "shut off"
    assert magic(img) == saveimage.MAGIC and img.stat().st_size == size
    r = cli("restore", str(img))
    assert r.returncode == 0, r.stderr
    ticks_continue(before)


@pytest.mark.slow
def test_qemu_killed_during_replay_save(cli, big_trace, workdir):
    """direct path: SIGKILL the replay's QEMU while the stream is written → exit 2, one line;
    the image is gone or partial; no phase claims success."""
    img = workdir / "r.save"
    out = workdir / "r.json"
    p = popen_cli("replay", str(big_trace), *OWN, *OWN, "--image", str(img), "-o", str(out), "--wait-serial", COUNTING)
    qpid = wait_for(lambda: qemu_child(p.pid), "the replay's QEMU", while_alive=p)
    wait_for(lambda: img.exists() and img.stat().st_size > 64 << 20, "the stream being written", while_alive=p)
    os.kill(qpid, signal.SIGKILL)  # type: ignore[arg-type]
    res = finish(p)
    assert_one_error_line(res, allow_info=("replaying ",))
    assert_not_complete(img)
    _no_false_success(out, "save")


@pytest.mark.slow
def test_qemu_killed_during_replay_restore(cli, big_trace, workdir):
    """direct path: SIGKILL the replay's QEMU during the restore phase → exit 2, one line; the
    image is unchanged and complete, and restoring it again works."""
    img = workdir / "r.save"
    r = cli("replay", str(big_trace), *OWN, "--phases", "save", "--image", str(img), "--wait-serial", COUNTING)
    assert r.returncode == 0, r.stderr
    assert magic(img) == saveimage.MAGIC
    digest = _digest(img)
    out = workdir / "r.json"
    p = popen_cli("replay", str(big_trace), *OWN, *OWN, "--phases", "restore", "--image", str(img), "-o", str(out),
                  "--run-after", "5")
    qpid = wait_for(lambda: qemu_child(p.pid), "the replay's QEMU", while_alive=p, every=0.002)
    os.kill(qpid, signal.SIGKILL)  # type: ignore[arg-type]
    res = finish(p)
    assert_one_error_line(res, allow_info=("replaying ",))
    _no_false_success(out, "restore")
    assert _digest(img) == digest, "a failed restore modified the image"
    r = cli("replay", str(big_trace), *OWN, "--phases", "restore", "--image", str(img), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert tr.load(out)["phases"][0]["ok"] is True


def _digest(p: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- 3. Ctrl-C and SIGKILL of virtsave


@pytest.mark.slow
@pytest.mark.parametrize("how", ["managed-save", "save-gzip"])
def test_sigint_during_save(cli, conn, make_guest, workdir, daemon_log_settings_unchanged, how):
    """Ctrl-C while libvirt saves (managed save; gzip save to a file): the save is cancelled, the
    guest runs on and keeps counting, no managed-save image and no complete file."""
    require_format("gzip" if how == "save-gzip" else None)
    name = make_guest(**BIG)
    dom = conn.lookupByName(name)
    target = SAVE_DIR / f"{name}.save" if how == "managed-save" else workdir / "g.save"
    args = ["managed-save", name] if how == "managed-save" else ["save", name, str(target), "--image-format", "gzip"]
    mark = guest.tick_mark(name)
    p = popen_cli(*args)
    wait_for(lambda: job_active(dom), "libvirt's save job", while_alive=p)
    p.send_signal(signal.SIGINT)
    res = finish(p)
    assert_interrupted(res)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, f"guest not running after Ctrl-C: {dom.state()}"
    assert_not_complete(target)
    d = assert_list_truthful(cli, conn, name)
    assert not d["managed_save"]
    ticks_continue(mark)
    _no_capture_running()  # a colleague's trace may have capture on right now
    assert log_settings() == daemon_log_settings_unchanged


def _our_capture_files(pid: int) -> list[Path]:
    found = list((STATE_DIR / "logcapture").glob(f"window-{pid}-*")) if (STATE_DIR / "logcapture").is_dir() else []
    found += list((STATE_DIR / "trace-images").glob(f"{pid}-*")) if (STATE_DIR / "trace-images").is_dir() else []
    return found


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "sig"), [(None, signal.SIGINT), ("gzip", signal.SIGINT), (None, signal.SIGTERM)],
                         ids=["managed-save", "gzip-file-cycle", "sigterm"])
def test_sigint_during_trace(cli, conn, make_guest, workdir, daemon_log_settings_unchanged, fmt, sig):
    """Ctrl-C during ``virtsave trace``: the save is cancelled (libvirt resumes the guest), no trace
    claims success, temporary files (capture window, scratch image) are gone, and libvirtd's log
    settings are back. gzip: the scratch image of a file cycle. SIGTERM (a service manager stopping
    virtsave) is handled the same way."""
    require_format(fmt)
    name = make_guest(**BIG)
    dom = conn.lookupByName(name)
    out = workdir / "t.json"
    args = ["trace", name, "-o", str(out)] + (["--image-format", fmt] if fmt else [])
    mark = guest.tick_mark(name)
    p = popen_cli(*args)
    wait_for(lambda: job_active(dom), "libvirt's save job", while_alive=p)
    p.send_signal(sig)
    res = finish(p)
    assert_interrupted(res)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, f"guest not running after Ctrl-C: {dom.state()}"
    d = assert_list_truthful(cli, conn, name)
    assert not d["managed_save"]
    assert not out.exists(), "an interrupted trace was written as if complete"
    assert _our_capture_files(p.pid) == []
    _no_capture_running(60)
    assert log_settings() == daemon_log_settings_unchanged
    ticks_continue(mark)


@pytest.mark.slow
def test_sigint_during_replay(cli, big_trace, workdir):
    """Ctrl-C during ``virtsave replay``'s save: exit 130, the replay's QEMU is gone (not left
    paused), its run directory removed, the image gone or partial, no phase claims success."""
    img = workdir / "r.save"
    out = workdir / "r.json"
    p = popen_cli("replay", str(big_trace), *OWN, *OWN, "--image", str(img), "-o", str(out), "--wait-serial", COUNTING)
    qpid = wait_for(lambda: qemu_child(p.pid), "the replay's QEMU", while_alive=p)
    # The launcher's private run directory: where its QMP socket is (-chardev socket,…,path=RUN_DIR/qmp.sock).
    (run_dir,) = {Path(a.split("path=")[1].split(",")[0]).parent for a in cmdline(qpid)  # type: ignore[arg-type]
                  if "qmp.sock" in a and "path=" in a}
    assert run_dir.parent == qemu_launch.RUN_BASE and run_dir.is_dir(), run_dir
    wait_for(lambda: img.exists() and img.stat().st_size > 64 << 20, "the stream being written", while_alive=p)
    p.send_signal(signal.SIGINT)
    res = finish(p)
    assert_interrupted(res)
    assert not alive(qpid), "the replay's QEMU survived Ctrl-C"  # type: ignore[arg-type]
    assert not run_dir.exists(), f"run dir {run_dir} left behind"
    assert_not_complete(img)
    _no_false_success(out, None)


@pytest.mark.slow
def test_sigkill_during_trace_repaired_by_next_command(cli, conn, make_guest, tmp_path, daemon_log_settings_unchanged):
    """``virtsave trace`` killed with SIGKILL while logging is on: the next virtsave command
    (``virtsave list``) notices, puts libvirtd's log settings back and says so. The trace and ``list``
    share a private state directory while the default one's capture lock is held (``capture_idle``), so
    no other virtsave on this daemon can join the capture or repair it first."""
    from virtsave.libvirtd import logcapture

    name = make_guest(**BIG)
    dom = conn.lookupByName(name)
    private = tmp_path / "state"
    env = {"VIRTSAVE_STATE_DIR": str(private)}
    with capture_idle() as before:
        assert before == daemon_log_settings_unchanged
        p = popen_cli("trace", name, "-o", os.devnull, env=env)
        try:
            wait_for(lambda: job_active(dom), "libvirt's save job", while_alive=p)
            state = json.loads((private / "logcapture.json").read_text())
            assert [o["pid"] for o in state["owners"]] == [p.pid], state
            p.kill()
            p.wait(30)
            assert log_settings() != before, "capture was not on"  # still ours: stale
            r = finish(popen_cli("list", "--match", name, env=env))
            assert r.returncode == 0, r.stderr
            assert f"restored libvirtd's log settings left by an interrupted virtsave (pid {p.pid})" in r.stderr, \
                r.stderr
            assert log_settings() == before, "virtsave list did not repair the log settings left by a killed trace"
            assert not (private / "logcapture.json").exists()
        finally:
            if p.poll() is None:
                p.kill()
            # never leave the daemon in debug logging, whatever the CLI did
            logcapture.repair_if_stale(URI, state_dir=private)
    # the libvirt job ran on without virtsave: whatever state it left, list tells the truth
    wait_for(lambda: not job_active(dom), "libvirt's job to end", every=0.2)
    assert_list_truthful(cli, conn, name)


# --------------------------------------------------------------------------- 6. secrets


VNC_PASSWORD = "s3cr3tVN"  # libvirt allows at most 8 characters for VNC
LUKS_PASSPHRASE = "LuksPass-4711-s3cr3t"


def _create_luks(disk: Path, passphrase: str) -> None:
    """``qemu-img create -f luks`` with QEMU 7.2's flaky PBKDF benchmark retried.

    QEMU 7.2 times 2^15 PBKDF2 rounds with the thread's CPU clock; on a tick-accounted kernel that
    reads 0 ms in about one run in eight and qemu-img stops with "Unable to get accurate CPU usage"
    (measured here: 4 of 30 runs of Debian 12's qemu-img). Only that message is retried; any other
    failure stops the fixture with qemu-img's own words.
    """
    for _ in range(10):
        proc = subprocess.run(["qemu-img", "create", "--object", f"secret,id=sec0,data={passphrase}", "-f", "luks",
                               "-o", "key-secret=sec0", str(disk), "16M"], capture_output=True, text=True)
        if proc.returncode == 0:
            return
        if "Unable to get accurate CPU usage" not in proc.stderr:
            break
    raise AssertionError(f"qemu-img create -f luks failed: {proc.stderr.strip()}")


@pytest.fixture
def secret_guest(conn, workdir) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A test guest with a VNC password and a LUKS disk whose passphrase is a libvirt ``<secret>``
    (libvirt hands it to QEMU as a ``secret`` object, encrypted with the domain's master key)."""
    name = guest.unique_name("vs-test-sec")
    disk = workdir / f"{name}.luks"
    _create_luks(disk, LUKS_PASSPHRASE)
    disk.chmod(0o644)
    sec_uuid = str(_uuid.uuid4())
    sec = conn.secretDefineXML(f"<secret ephemeral='no' private='yes'><uuid>{sec_uuid}</uuid>"
                               f"<usage type='volume'><volume>{disk}</volume></usage></secret>")
    xml = guest.guest_xml(name, memory_mib=256, fill_mib=32)
    xml = xml.replace("</devices>", f"<graphics type='vnc' autoport='yes' listen='127.0.0.1' passwd='{VNC_PASSWORD}'/>"
                      f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{disk}'>"
                      f"<encryption format='luks'><secret type='passphrase' uuid='{sec_uuid}'/></encryption>"
                      "</source><target dev='vdb' bus='virtio'/></disk></devices>")
    try:
        sec.setValue(LUKS_PASSPHRASE.encode())
        conn.defineXML(xml).create()
        guest.wait_tick(name, 1, timeout=120)
        yield name
    finally:
        guest.remove(conn, name)
        with contextlib.suppress(libvirt.libvirtError):
            sec.undefine()


def _secret_object_data(name: str) -> list[str]:
    """``data`` values of secret objects on the QEMU command lines libvirt logged for *name*."""
    text = Path(f"/var/log/libvirt/qemu/{name}.log").read_text(errors="replace")
    return sorted(set(re.findall(r'"qom-type":"secret"[^}]*"data":"([^"]+)"', text)))


def _master_key_b64(name: str) -> list[str]:
    """libvirt's per-domain master key (base64 and hex), as found in its private dir."""
    found = []
    for p in Path("/var/lib/libvirt/qemu").glob(f"domain-*-{name[:20]}*/master-key.aes"):  # libvirt cuts names
        key = p.read_bytes()
        found += [base64.b64encode(key).decode(), key.hex()]
    return found


def test_secrets_not_in_trace_or_replies(cli, conn, secret_guest, workdir):
    """A domain with a VNC password and a ``<secret>``-backed LUKS disk: the trace (XML, argv,
    messages) and its ``.replies`` export hold no secret value (password, passphrase, the secret
    object's data, libvirt's master key); the trace and export are 0600 even with umask 000."""
    name = secret_guest
    keys = _master_key_b64(name)
    assert keys, "control: libvirt's master key of the domain not found"
    secrets_ = [VNC_PASSWORD, LUKS_PASSPHRASE, base64.b64encode(LUKS_PASSPHRASE.encode()).decode(), *keys]
    xml = conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
    assert VNC_PASSWORD in xml  # control: libvirt does hold the secret
    out = workdir / "t.json"
    p = popen_cli("trace", name, "-o", str(out), umask=0)
    res = finish(p)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    data = _secret_object_data(name)
    assert data, "control: no secret object with data on the command line"
    leaked = [x for x in [*secrets_, *data] if x in text]
    assert not leaked, f"secret values in the trace: {leaked}"
    argv = tr.load(out)["domain"]["argv"]
    assert any('"qom-type":"secret"' in a and '"data":"<redacted>"' in a for a in argv), \
        "the secret object's data was dropped, not redacted"
    t = tr.load(out)
    assert "redacted" in json.dumps(t["domain"]["xml"]), "the password attribute was dropped, not redacted"
    # libvirt hands QEMU the VNC password over QMP at start (set_password): it was there to redact
    sent = [m for p in t["phases"] for m in p["messages"] if m["kind"] == "command"
            and m["execute"] in ("set_password", "change-vnc-password", "object-add")]
    assert any(m["execute"] == "set_password" for m in sent), "control: no set_password traced"
    assert all("redacted" in json.dumps(m.get("arguments")) for m in sent if m["execute"] != "object-add"), sent
    rep = workdir / "t.replies"
    p = popen_cli("export", str(out), "--format", "replies", "-o", str(rep), umask=0)
    res = finish(p)
    assert res.returncode == 0, res.stderr
    assert rep.stat().st_size > 0
    stdout = cli("export", str(out), "--format", "replies").stdout
    leaked = [x for x in [*secrets_, *data] if x in rep.read_text() + stdout]
    assert not leaked, f"secret values in the .replies export: {leaked}"
    for p_ in (out, rep):
        assert (p_.stat().st_mode & 0o777) == 0o600, (p_, oct(p_.stat().st_mode))
    assert VNC_PASSWORD not in res.stderr + res.stdout


def test_image_private_with_umask_000(conn, make_guest, workdir):
    """An image written by ``virtsave save`` (libvirt) and by ``virtsave replay`` is 0600 even
    when virtsave runs with umask 000."""
    name = make_guest(memory_mib=256, fill_mib=32)
    img = workdir / "u.save"
    res = finish(popen_cli("save", name, str(img), umask=0))
    assert res.returncode == 0, res.stderr
    assert (img.stat().st_mode & 0o777) == 0o600, oct(img.stat().st_mode)
