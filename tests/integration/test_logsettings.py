"""The operator's own libvirtd log settings around `virtsave trace`, on the real daemon (issue 17).

An operator with a filter set of their own and an info-level file output traces a guest five times
in a row: ``virt-admin daemon-log-filters`` / ``daemon-log-outputs`` must print, byte for byte,
what they printed before, after every trace and after a SIGKILLed trace and its repair; the
operator's file must receive no monitor line unless ``--keep-log-outputs`` asked for it.

These tests change the daemon's log settings on purpose, for as short a time as they can: the
guests are booted first, the operator's settings are put in place only while no virtsave capture
session is open (under the capture's own lock), and the exact previous settings are put back
afterwards, pass or fail. Other engineers trace on the same daemon. A session of theirs that
overlaps the window makes the measurement meaningless (it may take the operator's settings as its
originals, or send its monitor traffic to the operator's file if it keeps outputs), so a window runs
first as an ordinary user's would, on the shared capture, watching its state file; if another
process joined, it runs again **exclusively**: holding the capture's lock for the whole window
(other virtsave processes wait for it to end) with a state directory of its own for its traces.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.conftest import REPO, URI, VIRTSAVE
from virtsave.libvirtd import logcapture
from virtsave.libvirtd import logsettings as ls

pytestmark = pytest.mark.integration

ADMIN = logcapture.admin_uri_for(URI)
PATHS = logcapture.Paths()
OPERATOR_FILTERS = "3:remote 4:event 1:qemu.qemu_agent 2:util.json* 3:*rpc* 4:+object"


def virt_admin(*commands: str) -> str:
    proc = subprocess.run(["virt-admin", "-c", ADMIN, "; ".join(commands)], capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C"}, check=False, timeout=60)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, commands, proc.stdout, proc.stderr)
    return proc.stdout


def shown() -> tuple[str, str]:
    """What `virt-admin daemon-log-filters` and `daemon-log-outputs` print, exactly."""
    return virt_admin("daemon-log-filters"), virt_admin("daemon-log-outputs")


def value(answer: str, kind: str) -> str:
    return logcapture.parse_admin_output(answer, kind)


@contextlib.contextmanager
def no_capture_session(timeout: float = 600) -> Iterator[None]:
    """Hold the capture's lock at a moment no virtsave capture session is open (ours or anyone's)."""
    PATHS.base.mkdir(parents=True, exist_ok=True)
    fd = os.open(PATHS.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    try:
        while True:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not PATHS.state.exists():
                break
            fcntl.flock(fd, fcntl.LOCK_UN)
            assert time.monotonic() < deadline, "a virtsave capture session stayed open for 10 minutes"
            logcapture.repair_if_stale(URI)  # a session whose process died does not count
            time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def put(filters: str, outputs: str) -> None:
    """Make the daemon show *filters*/*outputs* (shown values), trying the forms libvirt may want."""
    for form in ls.filter_input_forms(filters, None):
        virt_admin(f"daemon-log-outputs --outputs '{outputs}'", f"daemon-log-filters --filters '{form}'")
        if ls.same(value(virt_admin("daemon-log-filters"), "filters"), filters):
            return


@dataclass
class Window:
    """How one measurement window runs: on the shared capture, or exclusively (see the module doc)."""

    exclusive: bool
    state_dir: Path | None = None
    mine: set[int] = field(default_factory=set)

    @property
    def env(self) -> dict[str, str]:
        return {"VIRTSAVE_STATE_DIR": str(self.state_dir)} if self.state_dir else {}

    @contextlib.contextmanager
    def operator_settings(self, filters: str, outputs: str) -> Iterator[tuple[str, str]]:
        """The operator's settings (input form) for the block; the exact previous ones back afterwards."""
        with contextlib.ExitStack() as held:
            if self.exclusive:
                held.enter_context(no_capture_session())
            with contextlib.nullcontext() if self.exclusive else no_capture_session():
                before = shown()
                virt_admin(f"daemon-log-outputs --outputs '{outputs}'", f"daemon-log-filters --filters '{filters}'")
                mine = shown()
            try:
                yield mine
            finally:
                with contextlib.nullcontext() if self.exclusive else no_capture_session():
                    put(value(before[0], "filters"), value(before[1], "outputs"))
                    after = shown()
                assert after == before, f"could not put the daemon's log settings back: {before} -> {after}"

    def popen_trace(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([*VIRTSAVE, "-c", URI, "trace", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env={**os.environ, "COLUMNS": "200", **self.env})
        self.mine.add(proc.pid)
        return proc

    def trace(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = self.popen_trace(*args)
        out, err = proc.communicate(timeout=600)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class OwnerWatch(threading.Thread):
    """Every pid that appears as an owner of the shared capture while the window is open."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                self.seen |= {int(o["pid"]) for o in json.loads(PATHS.state.read_text())["owners"]}
            time.sleep(0.01)

    def __enter__(self) -> OwnerWatch:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.done.set()
        self.join()


@contextlib.contextmanager
def exclusive_window() -> Iterator[Window]:
    path = PATHS.base / f"test-state-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    try:
        yield Window(exclusive=True, state_dir=path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def measure(window: Callable[[Window], dict[str, Any]]) -> dict[str, Any]:
    """Run *window* on the shared capture; again exclusively if another virtsave process joined it."""
    shared = Window(exclusive=False)
    with OwnerWatch() as watch:
        result = window(shared)
    if watch.seen <= shared.mine:
        return {**result, "exclusive": False}
    with exclusive_window() as w:
        return {**window(w), "exclusive": True}


# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def daemon_settings_unchanged() -> Iterator[None]:
    with no_capture_session():
        before = shown()
    yield
    with no_capture_session():
        after = shown()
    assert after == before


@pytest.fixture
def operator_log() -> Iterator[Path]:
    """An info-level file output of the operator's (unique name), removed afterwards."""
    path = Path("/var/log/libvirt") / f"vs-op-{os.getpid()}-{secrets.token_hex(4)}.log"
    yield path
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def operator_outputs(op_log: Path) -> str:
    """Several outputs of every kind this daemon accepts, the operator's file at info level."""
    outputs = f"3:file:/var/log/libvirt/libvirtd.log 2:file:{op_log} 4:stderr 3:syslog:vs-op"
    with no_capture_session():
        before = virt_admin("daemon-log-outputs")
        try:
            virt_admin(f"daemon-log-outputs --outputs '{outputs} 3:journald'")
            outputs += " 3:journald"
        except subprocess.CalledProcessError:
            pass  # built without journald support
        finally:
            virt_admin(f"daemon-log-outputs --outputs '{value(before, 'outputs')}'")
    op_log.unlink(missing_ok=True)
    return outputs


def monitor_lines(path: Path) -> int:
    if not path.exists():
        return 0
    return sum("QEMU_MONITOR_" in line for line in path.read_text(errors="replace").splitlines())


def notices(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "raised to level" in line]


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


def wait_job_done(dom: libvirt.virDomain, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
                return
        except libvirt.libvirtError:  # not running any more: no job
            return
        time.sleep(0.2)
    raise AssertionError(f"save job of {dom.name()} still running after {timeout} s")


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("filters", ["", "3:remote", OPERATOR_FILTERS, "2:qemu* 1:*qemu.qemu_agent* 3:a:b 3:q?emu"],
                         ids=["none", "one", "several", "globs"])
def test_every_filter_form_round_trips_through_a_capture(operator_log: Path, filters: str) -> None:
    """The library on the real daemon: plain names, globs, '+', a colon, several filters; every kind
    of output. One capture session (no guest): the shown settings come back byte for byte."""
    outputs = operator_outputs(operator_log)

    def window(w: Window) -> dict[str, Any]:
        w.mine.add(os.getpid())  # the session is this process's own
        with w.operator_settings(filters, outputs) as before:
            with logcapture.capture(URI, state_dir=w.state_dir) as cap:
                during = shown()
                state = json.loads(cap.paths.state.read_text())
                log = cap.log_path
            return {"before": before, "during": during, "after": shown(), "state": state, "log": log}

    r = measure(window)
    assert r["after"] == r["before"], filters
    f_during, o_during = value(r["during"][0], "filters"), value(r["during"][1], "outputs")
    # how this daemon shows "1:monitor" decides the form the operator's filters go back in
    assert r["state"]["filters_wrapped"] == f_during.startswith("1:*monitor* "), f_during
    assert f_during.endswith(value(r["before"][0], "filters"))  # theirs behind ours, as they were shown
    assert f"1:file:{r['log']}" in o_during
    level = ls.quiet_level(value(r["before"][0], "filters"), ls.configured_log_level(ADMIN))
    assert level >= 3 and f"{level}:file:{operator_log}" in o_during  # raised from info for the window
    assert not Path(r["log"]).exists()


def test_five_traces_leave_the_settings_byte_for_byte_and_the_operators_log_quiet(
        make_guest, operator_log: Path, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    name = make_guest(memory_mib=128, fill_mib=16)
    outputs = operator_outputs(operator_log)

    def window(w: Window) -> dict[str, Any]:
        runs, after = [], []
        with w.operator_settings(OPERATOR_FILTERS, outputs) as before:
            for i in range(5):
                runs.append(w.trace(name, "-o", str(workdir / f"t{i}.json")))
                after.append(shown())
            lines = monitor_lines(operator_log)
        return {"before": before, "runs": runs, "after": after, "lines": lines}

    r = measure(window)
    for proc in r["runs"]:
        assert proc.returncode == 0, proc.stderr
        assert len(notices(proc.stderr)) == 1 and f"2:file:{operator_log}" in notices(proc.stderr)[0], proc.stderr
    assert r["after"] == [r["before"]] * 5
    assert r["lines"] == 0, f"{r['lines']} monitor lines reached the operator's {operator_log}"
    trace = json.loads((workdir / "t4.json").read_text())
    assert sum(len(p["messages"]) for p in trace["phases"]) > 20  # the capture itself still worked


def test_keep_log_outputs_sends_the_traffic_to_the_operators_log_too(
        make_guest, operator_log: Path, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    name = make_guest(memory_mib=128, fill_mib=16)
    outputs = operator_outputs(operator_log)

    def window(w: Window) -> dict[str, Any]:
        with w.operator_settings(OPERATOR_FILTERS, outputs) as before:
            runs = [w.trace(name, "--keep-log-outputs", "-o", str(workdir / f"k{i}.json")) for i in range(2)]
            after = shown()
            lines = monitor_lines(operator_log)
        return {"before": before, "runs": runs, "after": after, "lines": lines}

    r = measure(window)
    for proc in r["runs"]:
        assert proc.returncode == 0, proc.stderr
        assert not notices(proc.stderr), proc.stderr
    assert r["after"] == r["before"]
    assert r["lines"] > 0


def test_sigkilled_trace_is_repaired_byte_for_byte(conn, make_guest, operator_log: Path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL mid-save leaves the capture on; the next trace repairs it exactly. Always exclusive:
    any virtsave command repairs a stale capture (and other engineers' test fixtures poll for one),
    and such a repair does not show as an owner in the state file."""
    name = make_guest(memory_mib=384, fill_mib=200)
    dom = conn.lookupByName(name)
    outputs = operator_outputs(operator_log)
    with exclusive_window() as w, w.operator_settings(OPERATOR_FILTERS, outputs) as before:
        proc = w.popen_trace(name)
        wait_job_started(dom, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        left = shown()
        # libvirtd finishes the save on its own; bring the guest back without virtsave.
        wait_job_done(dom)
        if not dom.isActive():
            dom.create()
        nxt = w.trace(name)  # repairs first, then traces
        after = shown()
        lines = monitor_lines(operator_log)
        assert w.state_dir and not (w.state_dir / "logcapture.json").exists()
    assert nxt.returncode == 0, nxt.stderr
    assert left != before  # the killed run did leave its settings behind
    assert f"pid {proc.pid}" in nxt.stderr  # the next run said it repaired them
    assert after == before
    assert lines == 0, f"{lines} monitor lines reached the operator's {operator_log}"
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
