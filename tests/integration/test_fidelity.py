"""A faithful replay of a live libvirt trace diffs clean (issue 11): ``virtsave trace DOM`` then
``virtsave replay t.json --diff`` prints "equivalent" and exits 0 — for the managed-save cycle, a save and
restore to a file, ``--bypass-cache`` and (where the stack has it) the sparse format with 2 channels. And
across QEMU versions: a trace of this stack replayed on an older QEMU build beside it works where that
QEMU has what the trace needs, and stops naming it where it does not.

Each test traces a fresh guest (256 MiB), so what the diff compares is what libvirt did, not a leftover.
"""

from __future__ import annotations

import re
from pathlib import Path

import libvirt
import pytest
from conftest import daemon_versions, format_unavailable, qemu_before

from virtsave.harness import guest
from virtsave.qemu import launch as qemu_launch
from virtsave.trace import model as trace

pytestmark = pytest.mark.integration

#: What `virtsave trace` is given for each scenario ({img}: a file in the test's directory).
SCENARIOS = {
    "managed-save": [],
    "file": ["--file", "{img}"],
    "bypass-cache": ["--file", "{img}", "--bypass-cache"],
    "sparse-2-channels": ["--image-format", "sparse", "--parallel-channels", "2"],
}


@pytest.fixture(autouse=True)
def _kill_our_qemus():
    yield
    qemu_launch.stop_all()


def _trace(cli, name: str, workdir: Path, scenario: str) -> Path:
    t = workdir / f"{scenario}.json"
    args = [a.format(img=workdir / "libvirt.save") for a in SCENARIOS[scenario]]
    proc = cli("trace", name, "-o", str(t), *args)
    assert proc.returncode == 0, proc.stderr
    return t


def _replay(cli, t: Path, workdir: Path, *extra: str):  # type: ignore[no-untyped-def]
    r = workdir / f"{t.stem}.replay.json"
    proc = cli("replay", str(t), "-o", str(r), "--image", str(workdir / f"{t.stem}.replay.save"), "--diff", *extra)
    return proc, r


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_faithful_replay_of_a_live_trace_is_equivalent(cli, make_guest, workdir, scenario):
    if scenario == "sparse-2-channels" and (missing := format_unavailable("sparse")):
        pytest.skip(missing)
    name = make_guest(256, 32)
    t = _trace(cli, name, workdir, scenario)
    proc, r = _replay(cli, t, workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().splitlines()[-1] == "equivalent", proc.stdout
    traced, out = trace.load(t), trace.load(r)
    assert out["replay"]["mode"] == "faithful" and out["replay"]["end"] == "sigterm"
    for name_ in ("save", "restore"):
        a, b = trace.find_phase(traced, name_), trace.find_phase(out, name_)
        assert a and b and b["ok"]
        assert [m["execute"] for m in trace.iter_commands(a)] == [m["execute"] for m in trace.iter_commands(b)]
    save = trace.find_phase(out, "save")
    assert save is not None
    # QEMU was ended as libvirt ends it: no quit; a SHUTDOWN by signal where libvirt heard one.
    heard = [m["data"]["reason"] for m in save["messages"] if m.get("event") == "SHUTDOWN"]
    libvirt_heard = [m["data"]["reason"] for m in trace.find_phase(traced, "save")["messages"]  # type: ignore[index]
                     if m.get("event") == "SHUTDOWN"]
    assert heard == libvirt_heard and set(heard) <= {"host-signal"}
    # The serial log went to QEMU as libvirt hands it: an fdset with libvirt's opaque (where libvirt used one).
    rewrites = out["replay"]["argv_rewrites"]["save"]
    kept = [w for w in rewrites if w["option"] == "-add-fd" and "opaque=serial0" in w["original"]]
    assert len(kept) == sum("opaque=serial0" in a for a in traced["domain"]["argv"]), rewrites
    assert all(re.fullmatch(r"set=\d+,fd=\d+,opaque=serial0-\w+", w["replacement"]) for w in kept), kept


def test_the_diff_still_sees_a_replay_that_quits(cli, make_guest, workdir):
    """The clean diff is not blindness: ended with ``quit`` (``--end quit``), the same replay differs
    where it must (the quit, the SHUTDOWN reason) and exits 1; in essential mode what it skips shows as
    missing, and no substitution lands on the wrong command (no false ``arguments.fds`` lines)."""
    name = make_guest(256, 32)
    t = _trace(cli, name, workdir, "managed-save")
    # libvirt 11 hears QEMU's SHUTDOWN (its reason then differs); libvirt 9.0 closes the monitor first.
    heard = any(m.get("event") == "SHUTDOWN" for m in trace.find_phase(trace.load(t), "save")["messages"])  # type: ignore[index]
    shutdown = "event-changed" if heard else "event-extra"
    proc, _ = _replay(cli, t, workdir, "--end", "quit")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"^\+ quit$", proc.stdout, re.M)
    assert ('"host-signal" → "host-qmp-quit"' in proc.stdout) == heard, proc.stdout
    assert re.search(rf"^2 differences: {shutdown} 1, extra 1$", proc.stdout, re.M), proc.stdout
    proc, r = _replay(cli, t, workdir, "--mode", "essential")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert not re.search(r"fds: ", proc.stdout), proc.stdout
    kinds = dict(re.findall(r"([\w-]+) (\d+)", proc.stdout.rstrip().splitlines()[-1].split(":", 1)[1]))
    assert set(kinds) <= {"missing", "extra", shutdown} and kinds.get("extra") == "1", proc.stdout
    save = trace.load(r)["phases"][0]
    subs = [s for s in save["substitutions"] if s.get("field") == "fds"]
    assert subs and all(save["messages"][s["sent"]]["execute"] == "getfd" for s in subs)


# -- across QEMU versions --------------------------------------------------------------------------
OLD_QEMU = qemu_before((8, 0, 0))


def _newer_stack_and_old_qemu() -> str | None:
    """Why a trace of this stack cannot be replayed on an older QEMU here, or None."""
    v = daemon_versions()
    if v["libvirt"] < (11, 0, 0) or v["qemu"] < (9, 0, 0):
        return (f"needs a libvirt >= 11 daemon with QEMU >= 9 to record a trace newer than QEMU 7.2 "
                f"(this daemon: libvirt {'.'.join(map(str, v['libvirt']))}, QEMU {'.'.join(map(str, v['qemu']))})")
    if OLD_QEMU is None:
        return "needs a QEMU 7.x build beside the system's (scripts/setup --extra-qemu debian12)"
    return None


@pytest.fixture
def guest_72(conn):  # type: ignore[no-untyped-def]
    """A test guest whose machine type QEMU 7.2 has too (pc-i440fx-7.2)."""
    name = guest.unique_name()
    try:
        xml = guest.guest_xml(name, 256, 32).replace("machine='pc'", "machine='pc-i440fx-7.2'")
        conn.defineXML(xml).create()
        guest.wait_tick(name, 2, timeout=120)
        yield name
    finally:
        guest.remove(conn, name)


def test_a_trace_of_this_stack_replays_on_qemu_72(cli, guest_72, workdir):
    if missing := _newer_stack_and_old_qemu():
        pytest.skip(missing)
    t = _trace(cli, guest_72, workdir, "managed-save")
    proc, r = _replay(cli, t, workdir, "--qemu", str(OLD_QEMU))
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    out = trace.load(r)
    assert out["host"]["qemu"].startswith("7.") and all(p["ok"] for p in out["phases"])
    subs = [s for p in out["phases"] for s in p["substitutions"]]
    caps = [s for s in subs if s["field"] == "arguments.capabilities"]
    assert caps
    for s in caps:  # what was left out was off in the trace, and the replay says which
        left_out = [c for c in s["original"] if c not in s["replacement"]]
        assert left_out and not any(c["state"] for c in left_out), s
        assert "switchover-ack" in {c["capability"] for c in left_out} and "switchover-ack" in s["reason"]
    assert any(s["field"] == "arguments.exit-on-error" and s["original"] is False for s in subs)
    # Same commands in the same order: only QEMU 7.2's answers differ from QEMU 10's.
    kinds = set(re.findall(r"(event-[\w-]+|reply|missing|extra|reordered|changed|outcome)",
                           proc.stdout.rstrip().splitlines()[-1]))
    assert kinds <= {"reply", "event-missing", "event-extra", "event-changed"}, proc.stdout.splitlines()[-1]


def test_a_sparse_trace_is_refused_by_qemu_72_naming_mapped_ram(cli, conn, guest_72, workdir):
    if missing := _newer_stack_and_old_qemu() or format_unavailable("sparse"):
        pytest.skip(missing)
    t = _trace(cli, guest_72, workdir, "sparse-2-channels")
    proc, _ = _replay(cli, t, workdir, "--qemu", str(OLD_QEMU))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("virtsave: error:")]
    assert len(errors) == 1 and "mapped-ram" in errors[0] and "7.2" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workdir / f"{t.stem}.replay.save").exists()
    assert conn.lookupByName(guest_72).state()[0] == libvirt.VIR_DOMAIN_RUNNING
