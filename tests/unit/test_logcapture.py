"""Pure logic of virtsave.libvirtd.logcapture: settings parsing/merging, the state file, refcounting and
stale-owner repair. The daemon is replaced by a small in-memory stand-in that stores the two
strings the way libvirt does (``1:monitor`` read back as ``1:*monitor*``); the real daemon is
exercised in tests/integration/test_trace.py."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from virtsave.core.errors import LogError, UnsupportedError
from virtsave.libvirtd import logcapture as lc


class FakeDaemon:
    """Stores filters/outputs like libvirtd's admin API (canonical filter spelling)."""

    admin_uri = "libvirtd:///system"

    def __init__(self, filters: str = "", outputs: str = "3:file:/var/log/libvirt/libvirtd.log") -> None:
        self.filters = self._canon(filters)
        self.outputs = outputs
        self.calls: list[tuple[str, str]] = []

    @staticmethod
    def _canon(filters: str) -> str:
        out = []
        for tok in filters.split():
            level, _, match = tok.partition(":")
            out.append(f"{level}:{match if '*' in match else f'*{match}*'}")
        return " ".join(out)

    def get_filters(self) -> str:
        return self.filters

    def get_outputs(self) -> str:
        return self.outputs

    def set_filters(self, value: str) -> None:
        self.calls.append(("filters", value))
        self.filters = self._canon(value)

    def set_outputs(self, value: str) -> None:
        self.calls.append(("outputs", value))
        self.outputs = " ".join(value.split()) or "3:file:/var/log/libvirt/libvirtd.log"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_parse_admin_output() -> None:
    assert lc.parse_admin_output(" Logging filters: 1:*monitor* 1:*job* \n\n", "filters") == "1:*monitor* 1:*job*"
    assert lc.parse_admin_output(" Logging filters: \n", "filters") == ""
    assert lc.parse_admin_output(" Logging outputs: 3:file:/a 1:file:/b\n", "outputs") == "3:file:/a 1:file:/b"
    with pytest.raises(LogError):
        lc.parse_admin_output("error: nope\n", "outputs")


def test_merge_puts_ours_first_and_keeps_operators() -> None:
    assert lc.merge_filters("") == "1:monitor 1:job 1:qemu.qemu_process"
    assert lc.merge_filters("3:util 1:*monitor*") == "1:monitor 1:job 1:qemu.qemu_process 3:util"
    out = lc.merge_outputs("3:file:/var/log/libvirt/libvirtd.log", "/x/capture.log")
    assert out == "3:file:/var/log/libvirt/libvirtd.log 1:file:/x/capture.log"
    assert lc.merge_outputs(out, "/x/capture.log") == out  # idempotent


def test_strip_ours_recovers_originals_without_state() -> None:
    f, o = lc.strip_ours("1:*monitor* 1:*job* 1:*qemu.qemu_process* 3:*util*",
                         "3:file:/l 1:file:/x/capture.log", "/x/capture.log")
    assert (f, o) == ("3:*util*", "3:file:/l")
    # Not ours (our output absent): untouched.
    assert lc.strip_ours("1:*monitor*", "3:file:/l", "/x/capture.log") == ("1:*monitor*", "3:file:/l")


def test_admin_uri_for() -> None:
    assert lc.admin_uri_for("qemu:///system") in ("libvirtd:///system", "virtqemud:///system")
    with pytest.raises(UnsupportedError):
        lc.admin_uri_for("qemu+ssh://other/system")
    with pytest.raises(UnsupportedError):
        lc.admin_uri_for("xen:///system")


def test_state_roundtrip_and_prune() -> None:
    me = lc.Owner(pid=os.getpid(), start=lc.proc_starttime(os.getpid()), session="a")
    gone = lc.Owner(pid=dead_pid(), start=1, session="b")
    recycled = lc.Owner(pid=os.getpid(), start=(me.start or 0) + 1, session="c")  # same pid, other process
    st = lc.State("libvirtd:///system", "", "3:file:/l", "1:monitor", "3:file:/l 1:file:/c", "/c",
                  owners=[me, gone, recycled])
    back = lc.State.from_json(st.to_json())
    assert back == st
    dropped = back.prune()
    assert [o.session for o in dropped] == ["b", "c"]
    assert [o.session for o in back.owners] == ["a"]
    with pytest.raises(ValueError):
        lc.State.from_json(json.dumps({"version": 99}))


def test_refcounted_sessions_restore_once(tmp_path: Path) -> None:
    d = FakeDaemon(filters="3:util")
    before = (d.filters, d.outputs)
    a = lc.CaptureSession(runner=d, state_dir=tmp_path, settle=0.01).start()
    assert a.first
    assert d.filters.split()[:3] == ["1:*monitor*", "1:*job*", "1:*qemu.qemu_process*"]
    assert d.outputs.endswith(f"1:file:{tmp_path}/logcapture/capture.log")
    assert stat.S_IMODE(os.stat(tmp_path / "logcapture").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(a.log_path).st_mode) == 0o600
    with open(a.log_path, "a") as f:
        f.write("line-a-only\n")
    b = lc.CaptureSession(runner=d, state_dir=tmp_path, settle=0.01).start()
    assert not b.first
    n_calls = len(d.calls)
    with open(a.log_path, "a") as f:
        f.write("line-both\n")
    assert a.window_text() == "line-a-only\nline-both\n"
    assert stat.S_IMODE(os.stat(a.window_path()).st_mode) == 0o600
    assert a.stop() is None
    assert len(d.calls) == n_calls  # b still active: nothing changed
    assert json.loads((tmp_path / "logcapture.json").read_text())["owners"][0]["session"] == b.session
    with open(a.log_path, "a") as f:
        f.write("line-b-only\n")
    assert b.window_text() == "line-both\nline-b-only\n"
    assert b.stop() is None
    assert (d.filters, d.outputs) == before
    assert not (tmp_path / "logcapture.json").exists()
    assert not (tmp_path / "logcapture").exists()


def test_stale_owner_repaired(tmp_path: Path) -> None:
    d = FakeDaemon()
    before = (d.filters, d.outputs)
    s = lc.CaptureSession(runner=d, state_dir=tmp_path, settle=0.01).start()
    assert (d.filters, d.outputs) != before
    # Simulate SIGKILL: the owner in the state file is a process that no longer exists.
    st = json.loads((tmp_path / "logcapture.json").read_text())
    st["owners"][0]["pid"] = dead_pid()
    (tmp_path / "logcapture.json").write_text(json.dumps(st))
    msg = lc.repair_if_stale(state_dir=tmp_path, runner=d)
    assert msg and "restored" in msg
    assert (d.filters, d.outputs) == before
    assert not (tmp_path / "logcapture.json").exists()
    assert lc.repair_if_stale(state_dir=tmp_path, runner=d) is None
    s._active = False  # its state is gone; nothing left to do


def test_repair_keeps_live_owners(tmp_path: Path) -> None:
    d = FakeDaemon()
    s = lc.CaptureSession(runner=d, state_dir=tmp_path, settle=0.01).start()
    st = json.loads((tmp_path / "logcapture.json").read_text())
    st["owners"].append({"pid": dead_pid(), "start": 5, "session": "x", "since": ""})
    (tmp_path / "logcapture.json").write_text(json.dumps(st))
    applied = (d.filters, d.outputs)
    assert lc.repair_if_stale(state_dir=tmp_path, runner=d) is None
    assert (d.filters, d.outputs) == applied  # a live owner still captures
    assert [o["session"] for o in json.loads((tmp_path / "logcapture.json").read_text())["owners"]] == [s.session]
    s.stop()
    assert d.filters == ""


def test_new_session_after_crash_keeps_true_originals(tmp_path: Path) -> None:
    d = FakeDaemon(filters="2:rpc")
    before = (d.filters, d.outputs)
    lc.CaptureSession(runner=d, state_dir=tmp_path, settle=0.01).start()
    st = json.loads((tmp_path / "logcapture.json").read_text())
    st["owners"][0]["pid"] = dead_pid()
    (tmp_path / "logcapture.json").write_text(json.dumps(st))
    s2 = lc.CaptureSession(runner=d, state_dir=tmp_path, settle=0.01).start()
    assert s2.first
    saved = json.loads((tmp_path / "logcapture.json").read_text())
    assert (saved["original_filters"], saved["original_outputs"]) == before
    s2.stop()
    assert (d.filters, d.outputs) == before


def test_lost_state_file_does_not_make_our_settings_the_originals(tmp_path: Path) -> None:
    d = FakeDaemon()
    before = (d.filters, d.outputs)
    lc.CaptureSession(runner=d, state_dir=tmp_path, settle=0.01).start()
    (tmp_path / "logcapture.json").unlink()
    s2 = lc.CaptureSession(runner=d, state_dir=tmp_path, settle=0.01).start()
    s2.stop()
    assert (d.filters, d.outputs) == before


def test_settings_changed_by_someone_else_are_left_alone(tmp_path: Path) -> None:
    d = FakeDaemon()
    s = lc.CaptureSession(runner=d, state_dir=tmp_path, settle=0.01).start()
    d.set_filters("1:qemu")
    warning = s.stop()
    assert warning and "changed by someone else" in warning
    assert d.filters == "1:*qemu*"
    assert not (tmp_path / "logcapture.json").exists()


def test_capture_restores_on_error_and_on_sigterm(tmp_path: Path) -> None:
    d = FakeDaemon()
    before = (d.filters, d.outputs)
    with pytest.raises(RuntimeError), lc.capture(runner=d, state_dir=tmp_path):
        assert (d.filters, d.outputs) != before
        raise RuntimeError("boom")
    assert (d.filters, d.outputs) == before
    old = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), lc.capture(runner=d, state_dir=tmp_path):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
        raise AssertionError("SIGTERM did not interrupt")
    assert (d.filters, d.outputs) == before
    assert signal.getsignal(signal.SIGTERM) is old
    assert not (tmp_path / "logcapture.json").exists()


def test_unreadable_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "logcapture.json").write_text("{not json")
    with pytest.raises(LogError, match="unreadable log-capture state"):
        lc.repair_if_stale(state_dir=tmp_path, runner=FakeDaemon())
