"""The log capture when libvirtd restarts or dies under it (issue 15, item 2), on a model of the daemon.

A restarted libvirtd forgets every log setting made at run time — the capture's and the operator's —
and shows its configured ones. The capture notices (the daemon's pid and start time, ``SO_PEERCRED``
on its admin socket, differ), says so in one warning, puts nothing back, and removes its state; a
later capture works. The same on a real, private libvirtd: tests/integration/test_daemon_faults.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from unit.test_logcapture import DEFAULT_OUT, FakeDaemon
from virtsave.core.errors import ConnectionFailed
from virtsave.libvirtd import logcapture as lc


class RestartableDaemon(FakeDaemon):
    """FakeDaemon plus an identity and a restart (back to its configured settings), or death."""

    def __init__(self, filters: str = "", outputs: str = DEFAULT_OUT, *, config: tuple[str, str] = ("", DEFAULT_OUT)):
        self.dead = False
        super().__init__(filters, outputs)
        self.config = config
        self.identity: list[int] | None = [1000, 11]

    def daemon_identity(self) -> list[int] | None:
        return None if self.dead else self.identity

    def restart(self) -> None:
        assert self.identity is not None
        self.identity = [self.identity[0] + 1, self.identity[1] + 1]
        self.dead = False
        self.set_filters(self.config[0])
        self.set_outputs(self.config[1])
        self.calls.clear()

    def die(self) -> None:
        self.dead = True

    def get_filters(self) -> str:
        if self.dead:
            raise ConnectionFailed("virt-admin: Failed to connect socket: Connection refused")
        return super().get_filters()

    def set_filters(self, value: str) -> None:
        if self.dead:
            raise ConnectionFailed("virt-admin: Failed to connect socket: Connection refused")
        super().set_filters(value)


def start(d: FakeDaemon, tmp: Path) -> lc.CaptureSession:
    return lc.CaptureSession(runner=d, state_dir=tmp, settle=0.01).start()


def test_restart_during_capture_is_named_and_nothing_is_put_back(tmp_path: Path) -> None:
    d = RestartableDaemon()
    s = start(d, tmp_path)
    assert "monitor" in d.get_filters() and "capture.log" in d.get_outputs()
    d.restart()
    warning = s.stop()
    assert warning is not None and "libvirtd restarted during the capture (pid 1000 → 1001)" in warning
    assert "not put back" not in warning      # the configured settings are the operator's: nothing lost
    assert not [c for c in d.calls if c[0] in ("filters", "outputs")], d.calls   # no writes after the restart
    assert d.shown() == ("", DEFAULT_OUT)
    assert not (tmp_path / "logcapture.json").exists()
    assert not (tmp_path / "logcapture").exists()


def test_operators_runtime_settings_lost_in_the_restart_are_named(tmp_path: Path) -> None:
    d = RestartableDaemon("3:remote", f"{DEFAULT_OUT} 2:file:/var/log/libvirt/op.log")
    s = start(d, tmp_path)
    d.restart()
    warning = s.stop()
    assert warning is not None and "were set at run time and went with the old process: not put back" in warning
    assert "'3:*remote* '" in warning
    assert d.shown() == ("", DEFAULT_OUT)


def test_next_capture_after_a_restart_works(tmp_path: Path) -> None:
    d = RestartableDaemon()
    start(d, tmp_path)
    d.restart()
    s2 = start(d, tmp_path)            # the live owner (this process) does not keep the dead capture
    assert s2.warning is not None and "restarted" in s2.warning
    assert "monitor" in d.get_filters() and "capture.log" in d.get_outputs()
    assert s2.stop() == s2.warning     # the note of the start is delivered once, at the end; nothing new
    assert d.shown() == ("", DEFAULT_OUT)
    assert not (tmp_path / "logcapture.json").exists()


def test_daemon_gone_at_the_end_clears_the_state(tmp_path: Path) -> None:
    d = RestartableDaemon()
    s = start(d, tmp_path)
    d.die()
    warning = s.stop()
    assert warning is not None and warning.startswith("daemon not reachable while restoring log settings")
    assert not (tmp_path / "logcapture.json").exists()
    d.restart()
    s2 = start(d, tmp_path)
    assert s2.warning is None
    assert s2.stop() is None
    assert d.shown() == ("", DEFAULT_OUT)


def test_unchanged_daemon_restores_as_before(tmp_path: Path) -> None:
    """The identity check does not disturb the normal path: same daemon, settings put back, no warning."""
    d = RestartableDaemon("3:remote")
    before = d.shown()
    s = start(d, tmp_path)
    assert s.stop() is None
    assert d.shown() == before


@pytest.mark.parametrize(("uri", "path"), [
    ("libvirtd:///system", "/run/libvirt/libvirt-admin-sock"),
    ("virtqemud:///system", "/run/libvirt/virtqemud-admin-sock"),
    ("libvirtd:///system?socket=/var/tmp/x/admin.sock", "/var/tmp/x/admin.sock"),
])
def test_admin_socket_of_an_admin_uri(uri: str, path: str) -> None:
    assert str(lc.admin_socket(uri)) == path


def test_identity_of_a_socket_nobody_listens_on(tmp_path: Path) -> None:
    assert lc.daemon_identity(f"libvirtd:///system?socket={tmp_path / 'none.sock'}") is None
