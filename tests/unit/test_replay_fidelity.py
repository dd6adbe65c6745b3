"""The pieces of a faithful replay (issue 11) that need no QEMU and no daemon: a traced command fitted to
another QEMU, substitutions undone on the right command, the normalization of a restored QEMU's
leftovers, the end of libvirt's job in the capture log, the domain-log start of an imported trace, and
ending a process with SIGTERM waited for on a pidfd."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from virtsave.core.errors import LogError, UnsupportedError
from virtsave.libvirtd import capture, logparse
from virtsave.qemu import compat, migration
from virtsave.qemu import launch as ql
from virtsave.trace import diff as tdiff
from virtsave.trace import model as tr

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DOMAIN_LOG = FIXTURES / "qemu-domain-logs" / "fxa.log"

# -- a traced command fitted to the QEMU it is replayed on -------------------------------------------
QEMU_72 = compat.Known(frozenset({"events", "xbzrle", "multifd", "postcopy-ram"}),
                       {"migrate-set-parameters": frozenset({"max-bandwidth", "multifd-channels"}),
                        "migrate-incoming": frozenset({"uri"}), "migrate": frozenset({"uri", "detach", "resume"})})


def _phase(*commands: tuple[str, dict[str, Any]]) -> tr.Phase:
    t = tr.new_trace("libvirt")
    ph = tr.add_phase(t, "save", "save")
    ph["messages"] += [tr.command(name, args, id=f"libvirt-{i}") for i, (name, args) in enumerate(commands)]
    return ph


def test_what_the_older_qemu_lacks_and_the_trace_had_off_is_left_out():
    caps = {"capabilities": [{"capability": "xbzrle", "state": False},
                             {"capability": "switchover-ack", "state": False},
                             {"capability": "mapped-ram", "state": False}]}
    args, dropped = compat.fit(QEMU_72, "migrate-set-capabilities", caps)
    assert args == {"capabilities": [{"capability": "xbzrle", "state": False}]}
    assert dropped == ["switchover-ack", "mapped-ram"]
    assert compat.fit(QEMU_72, "migrate-incoming", {"uri": "fd:3", "exit-on-error": False}) == (
        {"uri": "fd:3"}, ["exit-on-error"])
    assert compat.fit(QEMU_72, "migrate-set-parameters", {"max-bandwidth": 1, "direct-io": False}) == (
        {"max-bandwidth": 1}, ["direct-io"])
    unchanged = {"max-bandwidth": 1}
    assert compat.fit(QEMU_72, "migrate-set-parameters", unchanged) == (unchanged, [])
    assert compat.fit(QEMU_72, "query-status", {"x": 1}) == ({"x": 1}, [])   # not a fitted command
    with pytest.raises(UnsupportedError, match="mapped-ram"):
        compat.fit(QEMU_72, "migrate-set-capabilities", {"capabilities": [{"capability": "mapped-ram",
                                                                           "state": True}]})


def test_what_the_trace_needs_and_the_qemu_lacks_is_named_in_one_line():
    sparse = _phase(("migrate-set-capabilities", {"capabilities": [{"capability": "mapped-ram", "state": True},
                                                                   {"capability": "multifd", "state": True},
                                                                   {"capability": "switchover-ack", "state": False}]}),
                    ("migrate-set-parameters", {"max-bandwidth": 1, "direct-io": True,
                                                "zero-page-detection": "multifd"}))
    with pytest.raises(UnsupportedError) as err:
        compat.check(QEMU_72, [sparse], "7.2.22")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("QEMU 7.2.22 lacks what the trace needs: ")
    assert "capability mapped-ram on (libvirt's sparse image format, QEMU >= 9.0)" in msg
    assert "migrate-set-parameters direct-io=True" in msg
    assert "switchover-ack" not in msg and "multifd" not in msg     # off, or known to this QEMU
    assert "zero-page-detection" not in msg          # at QEMU's default: left out, not needed
    compat.check(QEMU_72, [_phase(("migrate-incoming", {"uri": "fd:3", "exit-on-error": False}))], "7.2.22")


def test_known_arguments_come_from_the_schema():
    schema = [{"name": "migrate-incoming", "meta-type": "command", "arg-type": "101"},
              {"name": "101", "meta-type": "object", "members": [{"name": "uri", "type": "str"},
                                                                  {"name": "exit-on-error", "type": "bool"}]},
              {"name": "migrate", "meta-type": "command", "arg-type": "102"},
              {"name": "102", "meta-type": "object", "members": [{"name": "uri", "type": "str"}]}]
    assert compat._arguments(schema, compat.FITTED) == {"migrate-incoming": frozenset({"uri", "exit-on-error"}),
                                                        "migrate": frozenset({"uri"})}


# -- substitutions undone on the command they were made on -------------------------------------------
def _traced_and_essential_replay() -> tuple[tr.Trace, tr.Trace]:
    """A libvirt save phase with probes, and an essential replay of it (probes skipped) whose getfd
    carried our fd: the substitution names the traced index (7) and where it was sent (2)."""
    a = tr.new_trace("libvirt")
    pa = tr.add_phase(a, "save", "save", ok=True)
    pa["messages"] += [tr.command("query-migrate", id="l1"), tr.reply("l1", ret={}),
                       tr.command("query-status", id="l2"), tr.reply("l2", ret={"running": True}),
                       tr.command("stop", id="l3"), tr.reply("l3", ret={}),
                       tr.command("query-fdsets", id="l4"), tr.command("getfd", {"fdname": "migrate"}, id="l5", fds=1),
                       tr.reply("l4", ret=[]), tr.reply("l5", ret={}),
                       tr.command("migrate", {"uri": "fd:migrate"}, id="l6"), tr.reply("l6", ret={})]
    b = tr.new_trace("direct")
    pb = tr.add_phase(b, "save", "save", ok=True)
    pb["messages"] += [tr.command("stop", id="d1"), tr.reply("d1", ret={}),
                       tr.command("getfd", {"fdname": "migrate"}, id="d2", fds=1), tr.reply("d2", ret={}),
                       tr.command("migrate", {"uri": "fd:migrate"}, id="d3"), tr.reply("d3", ret={})]
    pb["substitutions"] = [{"index": 7, "sent": 2, "field": "fds", "original": 1, "replacement": 1,
                            "reason": "our image fd, passed by SCM_RIGHTS"}]
    return a, b


def test_a_substitution_is_undone_on_the_command_sent_not_on_the_traced_index():
    a, b = _traced_and_essential_replay()
    d = tdiff.diff_traces(a, b)
    assert {x.kind for x in d.differences} == {"missing"}, d.render()
    assert "fds" not in "".join(line for x in d.differences for line in x.details)
    # Undoing lands where it says: a changed URI on the sent migrate is put back.
    b["phases"][0]["messages"][4]["arguments"] = {"uri": "file:/x,offset=0x10"}
    b["phases"][0]["substitutions"].append({"index": 10, "sent": 4, "field": "arguments.uri",
                                            "original": "fd:migrate", "replacement": "file:/x,offset=0x10",
                                            "reason": "tcp"})
    assert {x.kind for x in tdiff.diff_traces(a, b).differences} == {"missing"}
    # sent null: nothing went out in its place, nothing is undone.
    b["phases"][0]["substitutions"][-1]["sent"] = None
    assert "changed" in {x.kind for x in tdiff.diff_traces(a, b).differences}


def test_a_replay_without_sent_is_matched_through_the_traced_phase():
    a, b = _traced_and_essential_replay()
    del b["phases"][0]["substitutions"][0]["sent"]
    b["phases"][0]["messages"][4]["arguments"] = {"uri": "exec:dd"}
    b["phases"][0]["substitutions"].append({"index": 10, "field": "arguments.uri", "original": "fd:migrate",
                                            "replacement": "exec:dd", "reason": "tcp"})
    assert {x.kind for x in tdiff.diff_traces(a, b).differences} == {"missing"}


# -- a QEMU that was itself restored before its save ------------------------------------------------
def _save_phase(first_reply: Any, fdsets: list[Any]) -> tr.Trace:
    t = tr.new_trace("libvirt")
    ph = tr.add_phase(t, "save", "save", ok=True)
    ph["messages"] += [tr.command("query-migrate", id="a"), tr.reply("a", ret=first_reply),
                       tr.command("query-fdsets", id="b"), tr.reply("b", ret=fdsets)]
    return t


def test_a_restored_qemus_leftovers_are_normalized_and_nothing_else():
    serial = {"fdset-id": 1, "fds": [{"fd": 6, "opaque": "serial0-log"}]}
    leftover = {"fdset-id": 0, "fds": [{"fd": 7, "opaque": "libvirt-incoming-migrate-buffered-fd"}]}
    restored = _save_phase({"status": "completed"}, [serial, leftover])
    fresh = _save_phase({}, [serial])
    assert tdiff.diff_traces(restored, fresh).equivalent
    assert not tdiff.diff_traces(restored, fresh, strict=True).equivalent
    # A real difference stays one: a failed migration, a statistics-bearing completion, another fdset.
    for first, sets in (({"status": "failed"}, [serial]), ({"status": "completed", "total-time": 5}, [serial]),
                        ({}, [serial, {"fdset-id": 2, "fds": [{"fd": 9, "opaque": "other"}]}])):
        assert not tdiff.diff_traces(_save_phase(first, sets), fresh).equivalent, (first, sets)


# -- the end of libvirt's job in the capture log ---------------------------------------------------
def _line(when: dt.datetime, text: str) -> str:
    return f"{when.strftime('%Y-%m-%d %H:%M:%S.%f')[:23]}+0000: 15835: debug : {text}\n"


def test_the_window_waits_for_the_end_of_libvirts_job(tmp_path):
    log = tmp_path / "capture.log"
    since = dt.datetime.now(dt.UTC)
    log.write_text(_line(since, "virDomainObjBeginJobInternal:383 : Started job: async nested (vm=0x1 name=g)"))
    steps = [{"phase": "save", "since": since, "until": since + dt.timedelta(milliseconds=5)}]
    end = since + dt.timedelta(milliseconds=900)

    def libvirt_finishes_late() -> None:
        time.sleep(0.3)
        with open(log, "a") as f:
            f.write(_line(end, "virDomainObjEndAsyncJob:652 : Stopping async job: save (vm=0x1 name=other)"))
            f.write(_line(end, "virDomainObjEndAsyncJob:652 : Stopping async job: save (vm=0x2 name=g)"))

    t = threading.Thread(target=libvirt_finishes_late)
    t.start()
    assert capture._await_job_ends(log, 0, steps, "g", timeout=10) == []
    t.join()
    assert steps[0]["until"] == end.replace(microsecond=end.microsecond // 1000 * 1000)
    # Never logged: the wait is bounded and says which phase.
    steps = [{"phase": "restore", "since": since, "until": since}]
    t0 = time.monotonic()
    assert capture._await_job_ends(log, 0, steps, "g", timeout=0.3) == ["restore"]
    assert time.monotonic() - t0 < 5 and steps[0]["until"] == since


def test_async_job_ends_of_both_libvirt_generations():
    for log, job in (("libvirt-9.0-attributed/managedsave-running.log", "save"),
                     ("libvirt-11.3-attributed/managedsave-running.log", "save"),
                     ("libvirt-9.0-attributed/managedsave-restore.log", "start")):
        with open(FIXTURES / log) as f:
            ends = list(logparse.async_job_ends(f, "fxa"))
        assert [j for j, _ in ends] == [job], log


# -- the command line of an imported trace ---------------------------------------------------------
def test_import_takes_the_domain_log_start_that_ran_the_conversation(tmp_path):
    save = capture.import_log(FIXTURES / "libvirt-9.0-attributed" / "managedsave-running.log", "fxa",
                              domain_log=DOMAIN_LOG)
    assert save["host"]["libvirt"] == "9.0.0" and save["host"]["qemu"] == "7.2.22"   # not the log's last start
    assert "-incoming" not in save["domain"]["argv"] and "pc-i440fx-7.2" in " ".join(save["domain"]["argv"])
    restore = capture.import_log(FIXTURES / "libvirt-9.0-attributed" / "managedsave-restore.log", "fxa",
                                 domain_log=DOMAIN_LOG)
    assert "-incoming" in restore["domain"]["argv"]            # the QEMU started for the restore
    assert restore["phases"][0]["window"]["since"] < restore["phases"][0]["window"]["until"]
    later = tmp_path / "later.log"
    text = DOMAIN_LOG.read_text()
    later.write_text(text[text.index("2026-11-25 19:03:45.161"):])   # only libvirt 11.3's starts
    with pytest.raises(LogError, match="records no QEMU start before 2026-11-25T18:59:11"):
        capture.import_log(FIXTURES / "libvirt-9.0-attributed" / "managedsave-running.log", "fxa",
                           domain_log=later)


# -- ending a process as libvirt ends QEMU ---------------------------------------------------------
def _process(tmp_path: Path, code: str) -> ql.QemuProcess:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    plan = ql.LaunchPlan([sys.executable], tmp_path, "unix:/nonexistent", None, owns_run_dir=False)
    return ql.QemuProcess(plan, proc, tmp_path / "qemu.log")


def test_terminate_sends_sigterm_and_sees_the_exit_at_once(tmp_path):
    p = _process(tmp_path, "import signal,sys,time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
                           "print('ready', flush=True)\ntime.sleep(60)")
    t0 = time.monotonic()
    assert p.terminate(timeout=30) == 7
    assert time.monotonic() - t0 < 20 and not p.alive()
    assert p.terminate() == 7                                   # already gone: its status again


def test_terminate_kills_what_ignores_sigterm(tmp_path):
    p = _process(tmp_path, "import signal,time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                           "print('ready', flush=True)\ntime.sleep(60)")
    assert p.terminate(timeout=0.5) == -signal.SIGKILL


def test_end_saved_qemu_names_its_choices():
    with pytest.raises(UnsupportedError, match="sigterm or quit"):
        migration.end_saved_qemu(None, how="kill")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedError, match="needs the QEMU process"):
        migration.end_saved_qemu(None, how="sigterm")  # type: ignore[arg-type]


def test_replay_refuses_an_unknown_end_before_launching(cli, tmp_path):
    t = tr.new_trace("libvirt", domain={"name": "g", "argv": ["qemu-system-x86_64", "-m", "64"]})
    ph = tr.add_phase(t, "save", "save")
    ph["messages"].append(tr.command("migrate", {"uri": "fd:migrate"}, id="libvirt-1"))
    path = tmp_path / "t.json"
    tr.dump(t, path)
    res = cli("replay", str(path), "--end", "kill", "--image", str(tmp_path / "x.save"))
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == \
        "virtsave: error: end must be one of sigterm, quit, not 'kill'", res.stderr
    assert not (tmp_path / "x.save").exists()



@pytest.mark.parametrize(("equivalent", "code"), [(True, 0), (False, 1)])
def test_demo_exit_code_is_its_verdict(cli, monkeypatch, equivalent, code):
    from virtsave.harness import demo

    text = "equivalent\n" if equivalent else "1 difference: extra 1\n"
    ticks = {p: demo.PathTicks(2, 3) for p in demo.PATHS}
    result = demo.DemoResult("vs-demo-x", timings={"save": {"libvirt": 1.0, "direct": 0.5}}, paths=ticks,
                             equivalent=equivalent, diff_text=text, diff_summary={} if equivalent else {"extra": 1})
    monkeypatch.setattr(demo, "run", lambda *a, **k: result)
    res = cli("demo")
    assert res.returncode == code, res.stderr
    assert res.stdout.rstrip().splitlines()[-1].startswith(f"verdict: {'equivalent' if equivalent else 'differs'} —")
    assert cli("--json", "demo").returncode == code


@pytest.mark.parametrize(("mode", "end", "expected"), [("faithful", None, "sigterm"), ("essential", None, "quit"),
                                                      ("faithful", "quit", "quit")])
def test_replay_hands_its_phases_the_end_and_the_traced_phases(monkeypatch, tmp_path, mode, end, expected):
    """What replay() gives the phases (caught before anything is launched): how to end the saved QEMU,
    the traced phases each launch checks, and a private overlay directory."""
    from virtsave.qemu import replay

    t = tr.new_trace("libvirt", domain={"name": "g", "argv": ["qemu-system-x86_64", "-m", "64"]})
    save = tr.add_phase(t, "save", "save")
    save["messages"].append(tr.command("migrate", {"uri": "fd:migrate"}, id="libvirt-1"))
    seen = {}
    monkeypatch.setattr(replay, "_run_phases", lambda run, *a, **k: seen.setdefault("run", run))
    out = replay.replay(t, image=tmp_path / "x.save", mode=mode, end=end, phases=("save",))
    run = seen["run"]
    assert run.end == expected == out["replay"]["end"]
    assert run.traced == (save,)
    assert isinstance(run.overlays, Path) and run.overlays.is_absolute()
