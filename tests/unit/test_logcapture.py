"""Pure logic of virtsave.libvirtd.logcapture and .logsettings: settings parsing, the shown vs
accepted filter forms, the capture settings, the quiet output levels, the state file, refcounting
and stale-owner repair.

The daemon is replaced by :class:`FakeDaemon`, a model of libvirt's ``virlog.c`` as read in its
source: a filter's match is stored wrapped in ``*…*`` (``virLogFilterNew``) or, for a daemon that
does not wrap, as given; filters are shown ``"L:M "`` each, outputs joined by one space with a
duplicate destination replaced by its last occurrence; a message passes when its priority reaches
the first filter matching its source (else the daemon's log level) and then goes to every output
whose level it reaches. The real daemon is exercised in tests/integration/test_logsettings.py and
test_trace.py."""

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
from virtsave.libvirtd import logsettings as ls

DEFAULT_OUT = "3:file:/var/log/libvirt/libvirtd.log"
OP_OUTPUTS = f"{DEFAULT_OUT} 2:file:/var/log/libvirt/op.log 3:syslog:vsop 4:stderr 2:journald"
FILTER_SETS = [
    "",
    "3:remote 4:event 1:qemu.qemu_agent",
    "2:qemu* 3:*rpc* 1:util.json 4:+object",
    "1:* ",
    "3:a:b 2:q?emu",
]


class FakeDaemon:
    """libvirtd's log settings as virlog.c keeps and shows them (see the module docstring)."""

    admin_uri = "libvirtd:///system"

    def __init__(self, filters: str = "", outputs: str = DEFAULT_OUT, *, wraps: bool = True,
                 level: int = 3) -> None:
        self.wraps = wraps
        self.level = level
        self.filters: list[tuple[int, str]] = []
        self.outputs: list[str] = []
        self.calls: list[tuple[str, str]] = []
        self.set_filters(filters)
        self.set_outputs(outputs)
        self.calls.clear()

    def set_filters(self, value: str) -> None:
        self.calls.append(("filters", value))
        stored = []
        for tok in value.split(" "):
            if tok:
                level, match = tok.split(":")[0], tok.split(":")[1].removeprefix("+")
                stored.append((int(level), f"*{match}*" if self.wraps else match))
        self.filters = stored

    def set_outputs(self, value: str) -> None:
        self.calls.append(("outputs", value))
        outs: list[str] = []
        for tok in value.split(" ") or []:
            if not tok:
                continue
            key = tok.split(":", 1)[1]
            outs = [o for o in outs if o.split(":", 1)[1] != key]
            outs.append(tok)
        self.outputs = outs or [DEFAULT_OUT]

    def get_filters(self) -> str:
        return "".join(f"{lvl}:{m} " for lvl, m in self.filters)

    def get_outputs(self) -> str:
        return " ".join(self.outputs)

    def shown(self) -> tuple[str, str]:
        return self.get_filters(), self.get_outputs()

    def receivers(self, source: str, priority: int) -> set[str]:
        """Destinations (output without its level) a message of *source* at *priority* reaches."""
        threshold = self.level
        for lvl, match in self.filters:
            if ls.glob_match(match if self.wraps else f"*{match}*", source):
                threshold = lvl
                break
        if priority < threshold:
            return set()
        return {o.split(":", 1)[1] for o in self.outputs if priority >= int(o.split(":", 1)[0])}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def session(d: FakeDaemon, tmp: Path, keep: bool = False) -> lc.CaptureSession:
    return lc.CaptureSession(runner=d, state_dir=tmp, settle=0.01, policy=lc.OutputPolicy(keep=keep)).start()


def kill_owners(tmp: Path) -> None:
    """Simulate SIGKILL: every owner in the state file becomes a process that no longer exists."""
    st = json.loads((tmp / "logcapture.json").read_text())
    for o in st["owners"]:
        o["pid"] = dead_pid()
    (tmp / "logcapture.json").write_text(json.dumps(st))


# --------------------------------------------------------------------------- settings strings


def test_parse_admin_output_keeps_the_shown_value_exactly() -> None:
    assert lc.parse_admin_output(" Logging filters: 1:*monitor* 1:*job* \n\n", "filters") == "1:*monitor* 1:*job* "
    assert lc.parse_admin_output(" Logging filters: \n", "filters") == ""
    assert lc.parse_admin_output("\n Logging outputs: 3:file:/a 1:file:/b\n", "outputs") == "3:file:/a 1:file:/b"
    with pytest.raises(LogError):
        lc.parse_admin_output("error: nope\n", "outputs")


@pytest.mark.parametrize("filters", FILTER_SETS)
def test_input_form_of_a_shown_filter_reads_back_identically(filters: str) -> None:
    d = FakeDaemon(filters)
    shown = d.get_filters()
    d.set_filters(ls.filter_input_forms(shown, True)[0])
    assert d.get_filters() == shown
    d.set_filters(shown)  # the bug of issue 17: the shown form written back is wrapped again
    assert d.get_filters() != shown or not filters.strip()


def test_capture_settings_put_ours_first_and_keep_the_operators() -> None:
    assert ls.capture_filters("", True) == "1:monitor 1:job 1:qemu.qemu_process"
    assert ls.capture_filters("3:*util* 1:*monitor* ", True) == "1:monitor 1:job 1:qemu.qemu_process 3:util 1:monitor"
    assert ls.capture_filters("3:*util*", False) == "1:monitor 1:job 1:qemu.qemu_process 3:*util*"
    out = ls.capture_outputs(DEFAULT_OUT, "/x/capture.log")
    assert out == f"{DEFAULT_OUT} 1:file:/x/capture.log"
    assert ls.capture_outputs(out, "/x/capture.log") == out  # idempotent
    assert ls.capture_outputs("2:file:/o 4:stderr", "/c", raise_to=3) == "3:file:/o 4:stderr 1:file:/c"


def test_strip_ours_recovers_originals_without_state() -> None:
    f, o = ls.strip_ours("1:*monitor* 1:*job* 1:*qemu.qemu_process* 3:*util* ",
                         "3:file:/l 1:file:/x/capture.log", "/x/capture.log")
    assert (f, o) == ("3:*util* ", "3:file:/l")
    # Not ours (our output absent): untouched.
    assert ls.strip_ours("1:*monitor* ", "3:file:/l", "/x/capture.log") == ("1:*monitor* ", "3:file:/l")


def test_quiet_level_follows_the_operators_filters_for_the_monitor() -> None:
    assert ls.quiet_level("") == 3  # libvirt's default level: warnings and errors
    assert ls.quiet_level("3:*remote* 4:*event* 1:*qemu.qemu_agent* ") == 3
    assert ls.quiet_level("4:*qemu_monitor* ") == 4  # they want only errors of the monitor
    assert ls.quiet_level("1:*qemu* ") == 3  # "job" sources outside qemu.* still at the default
    assert ls.quiet_level("1:*qemu* 1:*job* 1:*monitor* ") == 1  # they already log all of it
    assert ls.quiet_level("1:*qemu* 1:*job* 1:*monitor* ", default_level=4) == 1
    assert ls.quiet_level("", default_level=4) == 4
    assert ls.quiet_level("", default_level=1) == 3  # never below warning for sources they did not name


def test_configured_log_level(tmp_path: Path) -> None:
    (tmp_path / "libvirtd.conf").write_text('#log_level = 1\nlog_level = 4  # errors only\n')
    assert ls.configured_log_level("libvirtd:///system", tmp_path) == 4
    assert ls.configured_log_level("virtqemud:///system", tmp_path) is None


def test_admin_uri_for() -> None:
    assert lc.admin_uri_for("qemu:///system") in ("libvirtd:///system", "virtqemud:///system")
    for no_shell in ("qemu+tcp://other/system", "qemu://other/system", "qemu+tls://other/system"):
        with pytest.raises(UnsupportedError):
            lc.admin_uri_for(no_shell)
    # over ssh: the admin socket next to the daemon socket the URI names (no login needed to say so)
    assert lc.admin_uri_for("qemu+ssh://other/system?socket=/run/libvirt/libvirt-sock") \
        == "libvirtd:///system?socket=/run/libvirt/libvirt-admin-sock"
    assert lc.admin_uri_for("qemu+ssh://u@other/session?socket=/h/.cache/libvirt/virtqemud-sock") \
        == "virtqemud:///session?socket=/h/.cache/libvirt/virtqemud-admin-sock"
    with pytest.raises(UnsupportedError):
        lc.admin_uri_for("xen:///system")


def test_state_roundtrip_and_prune() -> None:
    me = lc.Owner(pid=os.getpid(), start=lc.proc_starttime(os.getpid()), session="a")
    gone = lc.Owner(pid=dead_pid(), start=1, session="b")
    recycled = lc.Owner(pid=os.getpid(), start=(me.start or 0) + 1, session="c")  # same pid, other process
    st = lc.State("libvirtd:///system", "", "3:file:/l", "1:monitor", "3:file:/l 1:file:/c", "/c",
                  owners=[me, gone, recycled], filters_wrapped=True, raise_to=3, raised=["2:file:/o"])
    back = lc.State.from_json(st.to_json())
    assert back == st
    dropped = back.prune()
    assert [o.session for o in dropped] == ["b", "c"]
    assert [o.session for o in back.owners] == ["a"]
    with pytest.raises(ValueError):
        lc.State.from_json(json.dumps({"version": 99}))


# --------------------------------------------------------------------------- byte-identical restore


@pytest.mark.parametrize("wraps", [True, False], ids=["wrapping", "verbatim"])
@pytest.mark.parametrize("filters", FILTER_SETS)
@pytest.mark.parametrize("keep", [False, True], ids=["quiet", "keep"])
def test_five_sessions_restore_the_shown_settings_exactly(tmp_path: Path, filters: str, wraps: bool,
                                                          keep: bool) -> None:
    d = FakeDaemon(filters, OP_OUTPUTS, wraps=wraps)
    before = d.shown()
    for _ in range(5):
        s = session(d, tmp_path, keep)
        assert s.first
        assert d.get_filters().startswith("1:*monitor* 1:*job* " if wraps else "1:monitor 1:job ")
        assert d.get_filters().endswith(before[0])  # the operator's filters, unchanged, behind ours
        assert s.stop() is None
        assert d.shown() == before
    assert not (tmp_path / "logcapture.json").exists()


def test_verbatim_daemon_with_starred_filters(tmp_path: Path) -> None:
    """A daemon that does not wrap shows "1:*foo*" for "1:*foo*": that form must go back as is."""
    d = FakeDaemon("1:*foo* 3:bar", wraps=False)
    before = d.shown()
    s = session(d, tmp_path)
    assert d.get_filters().endswith("1:*foo* 3:bar ")
    assert json.loads((tmp_path / "logcapture.json").read_text())["filters_wrapped"] is False
    s.stop()
    assert d.shown() == before


def test_state_of_an_older_virtsave_is_restored_by_trying_both_forms(tmp_path: Path) -> None:
    """An older virtsave sharing the state file drops the fields it does not know: with
    ``filters_wrapped`` unknown, the restore tries the unwrapped form, reads back, then the other."""
    for wraps in (True, False):
        d = FakeDaemon("1:*foo* 3:*bar*", wraps=wraps)
        before = d.shown()
        session(d, tmp_path)
        st = json.loads((tmp_path / "logcapture.json").read_text())
        for k in ("filters_wrapped", "raise_to", "raised"):
            del st[k]
        st["original_filters"] = st["original_filters"].strip()  # older virtsave normalised blanks
        for o in st["owners"]:
            o["pid"] = dead_pid()
        (tmp_path / "logcapture.json").write_text(json.dumps(st))
        assert "restored" in (lc.repair_if_stale(state_dir=tmp_path, runner=d) or "")
        assert d.shown() == before, wraps


def test_refcounted_sessions_restore_once(tmp_path: Path) -> None:
    d = FakeDaemon(filters="3:util")
    before = d.shown()
    a = session(d, tmp_path)
    assert a.first
    assert d.get_filters().split()[:3] == ["1:*monitor*", "1:*job*", "1:*qemu.qemu_process*"]
    assert d.get_outputs().endswith(f"1:file:{tmp_path}/logcapture/capture.log")
    assert stat.S_IMODE(os.stat(tmp_path / "logcapture").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(a.log_path).st_mode) == 0o600
    with open(a.log_path, "a") as f:
        f.write("line-a-only\n")
    b = session(d, tmp_path)
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
    assert d.shown() == before
    assert not (tmp_path / "logcapture.json").exists()
    assert not (tmp_path / "logcapture").exists()


# --------------------------------------------------------------------------- nothing leaks


def operator_receivers(d: FakeDaemon, operator_outputs: str, sources: list[str]) -> set[tuple[str, int, str]]:
    """(source, priority, destination) for every message that reaches one of the operator's outputs."""
    theirs = {o.split(":", 1)[1] for o in ls.tokens(operator_outputs)}
    return {(src, p, dest) for src in sources for p in (1, 2, 3, 4) for dest in d.receivers(src, p) & theirs}


SOURCES = [*ls.CAPTURE_SOURCES, "lxc.lxc_monitor", "qemu.qemu_agent", "rpc.virnetserver", "util.json",
           "remote.remote_daemon"]


@pytest.mark.parametrize("level", [1, 3, 4])
@pytest.mark.parametrize("filters", [*FILTER_SETS, "4:qemu 1:monitor", "4:monitor", "1:qemu 1:job 1:monitor"])
def test_quiet_capture_sends_the_operators_outputs_nothing_new(tmp_path: Path, filters: str, level: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ls, "configured_log_level", lambda *_a, **_k: level)
    d = FakeDaemon(filters, OP_OUTPUTS, level=level)
    without = operator_receivers(d, OP_OUTPUTS, SOURCES)
    s = session(d, tmp_path)
    during = operator_receivers(d, OP_OUTPUTS, SOURCES)
    assert during <= without, sorted(during - without)[:5]
    capture = {(src, p) for src in SOURCES for p in (1, 2) if str(s.log_path) in " ".join(d.receivers(src, p))}
    assert ("qemu.qemu_monitor", 2) in capture and ("qemu.qemu_process", 1) in capture  # we still get ours
    s.stop()


def test_keep_policy_leaves_the_operators_outputs_and_they_get_the_monitor(tmp_path: Path) -> None:
    d = FakeDaemon("", OP_OUTPUTS)
    s = session(d, tmp_path, keep=True)
    assert d.get_outputs().startswith(OP_OUTPUTS + " ")
    assert "file:/var/log/libvirt/op.log" in d.receivers("qemu.qemu_monitor", 2)
    assert s.notice is None
    s.stop()
    assert d.get_outputs() == OP_OUTPUTS


def test_quiet_session_raises_and_says_so_once(tmp_path: Path) -> None:
    d = FakeDaemon("", OP_OUTPUTS)
    seen: list[str] = []
    with lc.output_policy(announce=seen.append), lc.capture(runner=d, state_dir=tmp_path) as s:
        assert d.get_outputs() == (f"{DEFAULT_OUT} 3:file:/var/log/libvirt/op.log 3:syslog:vsop 4:stderr "
                                   f"3:journald 1:file:{s.log_path}")
        assert "file:/var/log/libvirt/op.log" not in d.receivers("qemu.qemu_monitor", 2)
    assert len(seen) == 1 and "2:file:/var/log/libvirt/op.log 2:journald raised to level 3" in seen[0]
    assert d.get_outputs() == OP_OUTPUTS


def test_quiet_session_joining_a_keep_session_raises_until_the_end(tmp_path: Path) -> None:
    d = FakeDaemon("", OP_OUTPUTS)
    keep = session(d, tmp_path, keep=True)
    assert "file:/var/log/libvirt/op.log" in d.receivers("qemu.qemu_monitor", 2)
    quiet = session(d, tmp_path)
    assert "file:/var/log/libvirt/op.log" not in d.receivers("qemu.qemu_monitor", 2)
    assert quiet.notice and "raised" in quiet.notice
    late_keep = session(d, tmp_path, keep=True)
    assert late_keep.notice and "stay raised" in late_keep.notice
    for s in (quiet, keep, late_keep):
        assert s.stop() is None
    assert d.get_outputs() == OP_OUTPUTS


def test_outputs_raised_before_filters_open_and_filters_closed_before_outputs_drop(tmp_path: Path) -> None:
    d = FakeDaemon("", OP_OUTPUTS)
    s = session(d, tmp_path)
    assert [k for k, _ in d.calls] == ["outputs", "filters"]
    d.calls.clear()
    s.stop()
    assert [k for k, _ in d.calls] == ["filters", "outputs"]


# --------------------------------------------------------------------------- crashes and others


def test_stale_owner_repaired_exactly(tmp_path: Path) -> None:
    d = FakeDaemon("3:remote 4:event", OP_OUTPUTS)
    before = d.shown()
    s = session(d, tmp_path)
    assert d.shown() != before
    kill_owners(tmp_path)
    msg = lc.repair_if_stale(state_dir=tmp_path, runner=d)
    assert msg and "restored" in msg
    assert d.shown() == before
    assert not (tmp_path / "logcapture.json").exists()
    assert lc.repair_if_stale(state_dir=tmp_path, runner=d) is None
    s._active = False  # its state is gone; nothing left to do


def test_repair_keeps_live_owners(tmp_path: Path) -> None:
    d = FakeDaemon()
    s = session(d, tmp_path)
    st = json.loads((tmp_path / "logcapture.json").read_text())
    st["owners"].append({"pid": dead_pid(), "start": 5, "session": "x", "since": ""})
    (tmp_path / "logcapture.json").write_text(json.dumps(st))
    applied = d.shown()
    assert lc.repair_if_stale(state_dir=tmp_path, runner=d) is None
    assert d.shown() == applied  # a live owner still captures
    assert [o["session"] for o in json.loads((tmp_path / "logcapture.json").read_text())["owners"]] == [s.session]
    s.stop()
    assert d.get_filters() == ""


def test_new_session_after_crash_keeps_true_originals(tmp_path: Path) -> None:
    d = FakeDaemon(filters="2:rpc 3:*remote*", outputs=OP_OUTPUTS)
    before = d.shown()
    session(d, tmp_path)
    kill_owners(tmp_path)
    s2 = session(d, tmp_path)
    assert s2.first
    saved = json.loads((tmp_path / "logcapture.json").read_text())
    assert (saved["original_filters"], saved["original_outputs"]) == before
    s2.stop()
    assert d.shown() == before


def test_lost_state_file_does_not_make_our_settings_the_originals(tmp_path: Path) -> None:
    d = FakeDaemon("3:remote")
    before = d.shown()
    session(d, tmp_path)
    (tmp_path / "logcapture.json").unlink()
    s2 = session(d, tmp_path)
    assert s2.warning and "without a state file" in s2.warning
    s2.stop()
    assert d.shown() == before


def test_settings_changed_by_someone_else_are_left_alone(tmp_path: Path) -> None:
    d = FakeDaemon()
    s = session(d, tmp_path)
    d.set_filters("1:qemu")
    warning = s.stop()
    assert warning and "changed by someone else" in warning
    assert d.get_filters() == "1:*qemu* "
    assert not (tmp_path / "logcapture.json").exists()


def test_capture_restores_on_error_and_on_sigterm(tmp_path: Path) -> None:
    d = FakeDaemon("3:remote", OP_OUTPUTS)
    before = d.shown()
    with pytest.raises(RuntimeError), lc.capture(runner=d, state_dir=tmp_path):
        assert d.shown() != before
        raise RuntimeError("boom")
    assert d.shown() == before
    old = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), lc.capture(runner=d, state_dir=tmp_path):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
        raise AssertionError("SIGTERM did not interrupt")
    assert d.shown() == before
    assert signal.getsignal(signal.SIGTERM) is old
    assert not (tmp_path / "logcapture.json").exists()


def test_failure_while_switching_on_puts_everything_back(tmp_path: Path) -> None:
    class Refuses(FakeDaemon):
        def set_filters(self, value: str) -> None:
            if value.startswith("1:monitor"):
                raise LogError("refused")
            super().set_filters(value)

    d = Refuses("3:remote", OP_OUTPUTS)
    before = d.shown()
    with pytest.raises(LogError):
        session(d, tmp_path)
    assert d.shown() == before
    assert not (tmp_path / "logcapture.json").exists()


def test_unreadable_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "logcapture.json").write_text("{not json")
    with pytest.raises(LogError, match="unreadable log-capture state"):
        lc.repair_if_stale(state_dir=tmp_path, runner=FakeDaemon())


def test_keep_log_outputs_is_a_live_trace_option(cli, fixtures_dir: Path) -> None:  # type: ignore[no-untyped-def]
    log = next((fixtures_dir / "libvirt-9.0").glob("*.log"))
    proc = cli("trace", "fx", "--from-log", str(log), "--keep-log-outputs")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("virtsave: error: --from-log imports a log") and proc.stderr.count("\n") == 1
    assert "--keep-log-outputs" in cli("trace", "--help").stdout


@pytest.mark.parametrize("wraps", [True, False], ids=["wrapping", "verbatim"])
def test_killed_between_applying_and_recording_is_still_repaired(tmp_path: Path, wraps: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A session killed right after the daemon took its settings, before the state file got libvirt's
    spelling of them (seen over ssh, where that window is a round trip): the repair still knows them
    as ours and puts the operator's back."""
    d = FakeDaemon("3:remote 1:util.json", OP_OUTPUTS, wraps=wraps)
    before = d.shown()
    real_save, saves = lc._save_state, []

    def save_then_die(host: object, paths: lc.Paths, state: lc.State) -> None:
        saves.append(state.applied_filters)
        if d.get_outputs() != before[1]:  # the daemon has ours: die before recording them
            raise KeyboardInterrupt
        real_save(host, paths, state)  # type: ignore[arg-type]

    monkeypatch.setattr(lc, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        session(d, tmp_path)
    monkeypatch.setattr(lc, "_save_state", real_save)
    assert d.shown() != before and "1:monitor" in json.loads((tmp_path / "logcapture.json").read_text())[
        "applied_filters"]
    kill_owners(tmp_path)
    assert "restored" in (lc.repair_if_stale(state_dir=tmp_path, runner=d) or "")
    assert d.shown() == before
