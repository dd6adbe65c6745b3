"""Two clients, one domain (issue 15, item 3), without a daemon: the per-domain trace lock and the check
that keeps another client's job out of a trace. The same on the real libvirtd with real guests:
tests/integration/test_daemon_faults.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest

from virtsave.core import locks
from virtsave.libvirtd import capture

HOLD = """
import sys, time
from virtsave.core import locks
with locks.exclusive(sys.argv[1], sys.argv[2], state_dir=sys.argv[3]):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_lock(name: str, what: str, state_dir: Path) -> subprocess.Popen[str]:
    """Another process holding lock *name* (returns once it holds it)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, name, what, str(state_dir)], stdout=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parent.parent.parent)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_second_holder_refused_at_once_naming_the_first(tmp_path: Path) -> None:
    p = hold_lock("trace-x", "trace --op cycle of vm1", tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(locks.Busy) as exc, locks.exclusive("trace-x", "trace of vm1", state_dir=tmp_path,
                                                                busy="cannot trace vm1"):
            pass
        assert time.monotonic() - t0 < 5  # refused, not queued (generous: a loaded machine)
        assert str(exc.value).startswith("cannot trace vm1: virtsave pid ")
        assert f"pid {p.pid} (trace --op cycle of vm1" in str(exc.value)
        assert "\n" not in str(exc.value)
        assert exc.value.holder is not None and exc.value.holder.pid == p.pid
        assert locks.holder("trace-x", state_dir=tmp_path).pid == p.pid  # type: ignore[union-attr]
    finally:
        p.kill()
        p.wait()


def test_a_killed_holder_leaves_nothing_to_repair(tmp_path: Path) -> None:
    p = hold_lock("trace-y", "trace of vm2", tmp_path)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert locks.holder("trace-y", state_dir=tmp_path) is None
    with locks.exclusive("trace-y", "trace of vm2", state_dir=tmp_path) as me:
        assert me.pid == os.getpid()
        assert locks.holder("trace-y", state_dir=tmp_path) == me
    assert locks.holder("trace-y", state_dir=tmp_path) is None


def test_second_trace_of_a_domain_refused_by_the_cli(cli, isolated_from_machine: Path) -> None:  # type: ignore[no-untyped-def]
    """``virtsave trace DOM`` while another virtsave traces DOM: exit 2, one line naming the first's pid,
    before anything touches the daemon's logging (virt-admin is a failing stub here)."""
    conn = libvirt.open("test:///default")
    uuid = conn.lookupByName("test").UUIDString()
    conn.close()
    p = hold_lock(f"trace-{uuid}", "trace --op cycle of test", isolated_from_machine / "state")
    try:
        proc = cli("-c", "test:///default", "trace", "test")
    finally:
        p.kill()
        p.wait()
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"virtsave: error: cannot trace test: virtsave pid {p.pid} (trace --op cycle of test, since "
                     f"{lines[0].split('since ')[1]}"], proc.stderr
    assert "virt-admin" not in proc.stderr


PH = {"name": "save", "ok": True, "attribution": {"job": "remoteDispatchDomainManagedSave", "domain": "vm1",
                                                    "vm": "0x1"}}


@pytest.mark.parametrize(("phases", "want", "operation", "ok", "foreign"), [
    ([PH], "save", "managed-save", True, None),                                          # ours
    ([], "save", "managed-save", False, None),                                           # ours failed early
    ([{**PH, "attribution": {"job": "remoteDispatchDomainSaveFlags"}}], "save", "managed-save", False, "save job"),
    ([PH], "save", "managed-save", False, "succeeded while libvirt refused ours"),        # a second managedsave
    ([PH, PH], "save", "managed-save", True, "2 save conversations"),
    ([{**PH, "name": "restore", "attribution": {"job": "remoteDispatchDomainRestoreFlags"}}], "restore", "start",
     True, "restore job"),
    ([{**PH, "name": "restore", "attribution": {"job": "remoteDispatchDomainCreate"}}], "restore", "start",
     True, None),
    ([{**PH, "attribution": {}}], "save", "save", True, None),                           # monitor-only log
])
def test_foreign_job_in_a_traced_window(phases, want, operation, ok, foreign) -> None:  # type: ignore[no-untyped-def]
    got = capture.foreign_job(phases, want, operation, ok)
    assert (got is None) if foreign is None else (got is not None and foreign in got), got


class _Dom:
    def __init__(self, kind: int, operation: int | None) -> None:
        self.kind, self.operation = kind, operation

    def jobInfo(self) -> list[int]:
        return [self.kind, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]

    def jobStats(self, _flags: int = 0) -> dict[str, int]:
        return {"type": self.kind} | ({"operation": self.operation} if self.operation is not None else {})


def test_domain_with_another_clients_job_refused_at_once() -> None:
    from virtsave.core.errors import DomainStateError

    with pytest.raises(DomainStateError, match=r"^cannot trace vm1: another libvirt client has a save job running"):
        capture.refuse_busy_domain(_Dom(libvirt.VIR_DOMAIN_JOB_UNBOUNDED, libvirt.VIR_DOMAIN_JOB_OPERATION_SAVE), "vm1")
    with pytest.raises(DomainStateError, match="has a job running"):
        capture.refuse_busy_domain(_Dom(libvirt.VIR_DOMAIN_JOB_BOUNDED, None), "vm1")
    capture.refuse_busy_domain(_Dom(libvirt.VIR_DOMAIN_JOB_NONE, None), "vm1")   # no job: nothing to say
