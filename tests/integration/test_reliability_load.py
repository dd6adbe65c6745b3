"""Reliability under load (issue 7, scenario 7): bulk managed save while another guest is traced,
and the ``scripts/soak`` trace+replay loop.

The bulk run is restricted to this test's own guests with ``--match`` (never other domains), and
the test checks that exactly those were selected. "Nothing lost": every guest's ``tick`` counter
goes on after ``start --all`` (a reboot would restart it at 1), and the traced guest, saved and
restored at the same time by ``virtsave trace``, keeps counting too and its trace holds only its
own monitor's messages. This is the only module that runs 5 guests at once (256 MiB each).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest
from daemonlog import log_settings

from virtsave.harness import guest
from virtsave.image import saveimage
from virtsave.trace import model as tr

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent.parent
VIRTSAVE = [sys.executable, "-m", "virtsave.cli"]
STATE_DIR = Path(os.environ.get("VIRTSAVE_STATE_DIR", "/var/lib/virtsave"))
SAVE_DIR = Path("/var/lib/libvirt/qemu/save")


def _no_capture_running(timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while ((STATE_DIR / "logcapture.json").exists() or "/logcapture/" in log_settings()[1]) \
            and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.fixture(scope="module", autouse=True)
def daemon_log_settings_unchanged():  # type: ignore[no-untyped-def]
    _no_capture_running()
    before = log_settings()
    yield before
    _no_capture_running()
    assert log_settings() == before, "libvirtd's log filters/outputs differ after the load tests"


def _magic(p: Path) -> bytes | None:
    try:
        with open(p, "rb") as f:
            return f.read(16)
    except FileNotFoundError:
        return None


def _bulk_job_times(conn: libvirt.virConnect, names: list[str], proc: subprocess.Popen[str]) -> list[dt.datetime]:
    """While *proc* runs: the (UTC) moments at which libvirt reported a job on any of *names* (polled),
    libvirt's own view of when the bulk save was saving, independent of virtsave's report."""
    doms = [conn.lookupByName(n) for n in names]
    seen = []
    while proc.poll() is None:
        for d in doms:
            try:
                if d.jobInfo()[0] in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED):
                    seen.append(dt.datetime.now(dt.UTC))
                    break
            except libvirt.libvirtError:
                continue
        time.sleep(0.02)
    return seen


def test_bulk_managed_save_while_tracing(cli, conn, make_guest, workdir):
    """``managed-save --all --parallel 4`` on 4 guests while a fifth is traced: all saved with
    complete images, ``start --all`` brings all back with their counters going on; the traced
    guest runs on and its trace is valid and its own; and the bulk save really ran inside the
    trace's capture window (libvirt's jobs polled, compared with the trace's phase windows)."""
    pid = os.getpid()
    bulk = [make_guest(memory_mib=256, fill_mib=32, prefix="vs-test-load") for _ in range(4)]
    # the traced guest is the big one: its save and restore outlast the bulk command's start-up
    traced = make_guest(memory_mib=512, fill_mib=400, prefix="vs-test-ltr")
    glob = f"vs-test-load-{pid}-*"
    for n in [*bulk, traced]:
        guest.wait_tick(n, 2, timeout=180)
    before = {n: guest.tick_mark(n) for n in [*bulk, traced]}

    out = workdir / "t.json"
    tp = subprocess.Popen([*VIRTSAVE, "trace", traced, "-o", str(out)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO)
    # the bulk save starts once the trace has switched capture on (so they really overlap)
    deadline = time.monotonic() + 60
    while not (STATE_DIR / "logcapture.json").exists() and tp.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    bp = subprocess.Popen([*VIRTSAVE, "--json", "managed-save", "--all", "--match", glob, "--parallel", "4"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    bulk_active = _bulk_job_times(conn, bulk, bp)
    ms_out, ms_err = bp.communicate(timeout=600)
    ms = subprocess.CompletedProcess(bp.args, bp.returncode, ms_out, ms_err)
    _t_out, t_err = tp.communicate(timeout=600)

    assert ms.returncode == 0, ms.stderr
    report = json.loads(ms.stdout)
    assert sorted(r["domain"] for r in report["results"]) == sorted(bulk), "--all selected other domains"
    assert all(r["ok"] for r in report["results"]), report
    for n in bulk:
        dom = conn.lookupByName(n)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF and dom.hasManagedSaveImage(0)
        assert _magic(SAVE_DIR / f"{n}.save") == saveimage.MAGIC

    assert tp.returncode == 0, t_err
    t = tr.load(out)
    assert t["domain"]["name"] == traced
    # overlap: libvirt had a bulk job while the trace's capture window was open
    since = dt.datetime.fromisoformat(t["phases"][0]["window"]["since"])
    until = dt.datetime.fromisoformat(t["phases"][-1]["window"]["until"])
    inside = [x for x in bulk_active if since <= x <= until]
    assert inside, (f"the bulk save never ran while the trace captured ({since} … {until}); bulk jobs seen "
                    f"{bulk_active[0] if bulk_active else None} … {bulk_active[-1] if bulk_active else None}")
    cmds = {p["name"]: [m["execute"] for m in p["messages"] if m["kind"] == "command"] for p in t["phases"]}
    assert "migrate" in cmds["save"] and "migrate-incoming" in cmds["restore"], cmds
    # one save of one domain: exactly one stop and one migrate (another guest's would double them)
    assert cmds["save"].count("migrate") == 1 and cmds["save"].count("stop") == 1, cmds["save"]
    assert conn.lookupByName(traced).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    c = guest.wait_ticks_continue(before[traced], timeout=60)
    assert c.survived, f"{traced}: {c}"

    st = cli("--json", "start", "--all", "--match", glob, "--parallel", "4")
    assert st.returncode == 0, st.stderr
    report = json.loads(st.stdout)
    assert sorted(r["domain"] for r in report["results"]) == sorted(bulk)
    assert all(r["ok"] and r["detail"]["from_managed_save"] for r in report["results"]), report
    for n in bulk:
        assert conn.lookupByName(n).state()[0] == libvirt.VIR_DOMAIN_RUNNING
        c = guest.wait_ticks_continue(before[n], timeout=60)
        assert c.survived, f"{n}: {c}: memory lost"
        assert not (SAVE_DIR / f"{n}.save").exists(), "managed-save image left after start"


def _soak_guests() -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                         text=True).stdout
    return [n for n in out.split() if n.startswith(f"vs-test-soak-{os.getpid()}")]


def test_soak_script(daemon_log_settings_unchanged):
    """``scripts/soak --count 2``: two trace+replay cycles, ``failures = 0``, exit 0, guest removed."""
    p = subprocess.run([str(REPO / "scripts" / "soak"), "--count", "2", "--max-seconds", "900",
                        "--prefix", f"vs-test-soak-{os.getpid()}"], capture_output=True, text=True, timeout=1200)
    assert "soak: 2 cycles, failures = 0" in p.stdout, (p.stdout, p.stderr[-2000:])
    assert p.returncode == 0
    assert "Traceback" not in p.stderr
    assert _soak_guests() == []


def test_soak_script_counts_failures(tmp_path):
    """The soak loop can fail: a cycle whose trace fails (virtsave's state dir is unusable, so log
    capture cannot start) is counted, the exit is non-zero, and the guest is still removed."""
    p = subprocess.run([str(REPO / "scripts" / "soak"), "--count", "2", "--prefix", f"vs-test-soak-{os.getpid()}"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "VIRTSAVE_STATE_DIR": "/dev/null/not-a-dir"})
    assert p.returncode == 1, (p.returncode, p.stderr[-1000:])
    assert "soak: 2 cycles, failures = 2" in p.stdout, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    assert _soak_guests() == []


def test_soak_script_ctrl_c_cleans_up(daemon_log_settings_unchanged):
    """SIGINT to the soak loop mid-cycle: it stops, says how far it got, removes its guest and
    lets virtsave put libvirtd's log settings back."""
    p = subprocess.Popen([str(REPO / "scripts" / "soak"), "--count", "50",
                          "--prefix", f"vs-test-soak-{os.getpid()}"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    # wait until a cycle is under way (its trace has switched capture on)
    while time.monotonic() < deadline and p.poll() is None:
        if _soak_guests() and (STATE_DIR / "logcapture.json").exists():
            break
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 130, (p.returncode, err[-1000:])
    assert re.search(r"soak: \d+ cycles, failures = 0", out), (out, err)
    assert "Traceback" not in err
    assert _soak_guests() == [], "soak left its guest behind"
    _no_capture_running()
    assert log_settings() == daemon_log_settings_unchanged
