"""virtsave.libvirtd.logparse on the recorded libvirtd logs of both stacks and on logs derived from them."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from virtsave.core import errors
from virtsave.harness import logsynth
from virtsave.libvirtd import logparse
from virtsave.trace import model as trace

FIX = Path(__file__).resolve().parent.parent / "fixtures"

# Exact command sequences libvirt sent, per stack and scenario (read off the fixtures).
SAVE_90 = ["query-migrate", "stop", "migrate-set-capabilities", "migrate-set-parameters", "getfd", "migrate",
           "query-migrate", "migrate-set-capabilities", "migrate-set-parameters"]
SAVE_113 = ["query-migrate", "stop", "migrate-set-capabilities", "migrate-set-parameters", "getfd", "migrate",
            "query-migrate", "query-fdsets", "migrate-set-capabilities", "migrate-set-parameters"]
SAVE_113_SPARSE = ["query-migrate", "stop", "migrate-set-capabilities", "migrate-set-parameters", "query-fdsets",
                   "add-fd", "migrate", "query-migrate", "query-fdsets", "migrate-set-capabilities",
                   "migrate-set-parameters"]
_RESTORE_HEAD = ["qmp_capabilities", "query-migrate-capabilities", "migrate-set-capabilities", "query-chardev",
                 "query-hotpluggable-cpus", "query-cpus-fast", "qom-list"]
RESTORE_90 = [*_RESTORE_HEAD, "qom-get*398", "query-iothreads", "balloon", "migrate-incoming", "qom-list",
              "query-block"]
RESTORE_113 = [*_RESTORE_HEAD, "qom-get*464", "query-iothreads", "balloon", "migrate-set-capabilities",
               "migrate-incoming", "qom-list", "query-block"]
RESTORE_113_SPARSE = [*_RESTORE_HEAD, "qom-get*464", "query-iothreads", "balloon", "migrate-set-capabilities",
                      "migrate-set-parameters", "migrate-incoming", "qom-list", "query-block", "cont"]

# (fixture, monitor key, domain, phase, operation, expected commands)
CASES = [
    ("libvirt-9.0/managedsave-running.log", "0x7f06e4005180", None, "save", "save", SAVE_90),
    ("libvirt-9.0/save-bypass-cache.log", "0x7f06d41ce2f0", None, "save", "save", SAVE_90),
    ("libvirt-9.0/managedsave-restore.log", "0x7f06d41ce2f0", None, "restore", "restore", [*RESTORE_90, "cont"]),
    ("libvirt-9.0/restore-bypass-cache-paused.log", "0x7f06d41ce740", None, "restore", "restore", RESTORE_90),
    ("libvirt-9.0-attributed/managedsave-running.log", "0x7f06d41ceb90", "fxa", "save", "managed-save", SAVE_90),
    ("libvirt-9.0-attributed/save-bypass-cache.log", "0x7f06e4005460", "fxa", "save", "save", SAVE_90),
    ("libvirt-9.0-attributed/managedsave-restore.log", "0x7f06e4005460", "fxa", "restore", "start",
     [*RESTORE_90, "cont"]),
    ("libvirt-9.0-attributed/restore-bypass-cache-paused.log", "0x7f06e40052f0", "fxa", "restore", "restore",
     RESTORE_90),
    ("libvirt-11.3-attributed/managedsave-running.log", "0x7fe8380075d0", "fxa", "save", "managed-save", SAVE_113),
    ("libvirt-11.3-attributed/save-bypass-cache.log", "0x7fe838007b90", "fxa", "save", "save", SAVE_113),
    ("libvirt-11.3-attributed/save-sparse-parallel2.log", "0x7fe838007b90", "fxc", "save", "save", SAVE_113_SPARSE),
    ("libvirt-11.3-attributed/managedsave-restore.log", "0x7fe838007b90", "fxa", "restore", "start",
     [*RESTORE_113, "cont"]),
    ("libvirt-11.3-attributed/restore-bypass-cache-paused.log", "0x7fe838007b90", "fxa", "restore", "restore",
     RESTORE_113),
    ("libvirt-11.3-attributed/restore-sparse-parallel2.log", "0x7fe838007460", "fxc", "restore", "restore",
     RESTORE_113_SPARSE),
]


def collapse(executes: list[str]) -> list[str]:
    """Collapse runs of qom-get into 'qom-get*N'."""
    out: list[str] = []
    for ex in executes:
        if ex == "qom-get" and out and out[-1].startswith("qom-get*"):
            out[-1] = f"qom-get*{int(out[-1].split('*')[1]) + 1}"
        elif ex == "qom-get":
            out.append("qom-get*1")
        else:
            out.append(ex)
    return out


def executes(phase: dict) -> list[str]:
    return [m["execute"] for m in phase["messages"] if m["kind"] == "command"]


def grep_count(path: Path, mon: str) -> int:
    """Independent count of the monitor's SEND_MSG/RECV_REPLY/RECV_EVENT lines."""
    pat = re.compile(rf"QEMU_MONITOR_(SEND_MSG|RECV_REPLY|RECV_EVENT): mon={mon}\b")
    return sum(1 for line in path.read_text(errors="replace").splitlines() if pat.search(line))


@pytest.mark.parametrize(("fixture", "mon", "domain", "phase", "operation", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_fixture_sequences(fixture, mon, domain, phase, operation, expected):
    path = FIX / fixture
    tr = logparse.trace_from_log(path)
    assert trace.validate(tr) == []
    assert tr["source"] == "libvirt"
    assert tr["domain"]["name"] == domain
    assert [p["name"] for p in tr["phases"]] == [phase]
    ph = tr["phases"][0]
    assert ph["monitor"] == mon
    assert ph["operation"] == operation
    assert ph["ok"] is True and ph["error"] is None
    assert collapse(executes(ph)) == expected
    # none dropped: every probe of the monitor is a message of the phase
    assert len(ph["messages"]) == grep_count(path, mon)
    assert tr["log"]["unphased"] == 0 and tr["log"]["skipped"] == 0 and tr["log"]["malformed"] == 0
    # replies match their commands, in order, times relative and monotonic
    ids = [m["id"] for m in ph["messages"] if m["kind"] == "command"]
    rids = [m["id"] for m in ph["messages"] if m["kind"] == "reply"]
    assert rids == ids
    ts = [m["t"] for m in ph["messages"]]
    assert ts[0] == 0 and ts == sorted(ts)
    if domain:
        assert logparse.trace_from_log(path, domain=domain)["phases"][0]["messages"] == ph["messages"]


@pytest.mark.parametrize("fixture", [c[0] for c in CASES if c[3] == "save"])
def test_save_phase_details(fixture):
    ph = logparse.trace_from_log(FIX / fixture)["phases"][0]
    cmds = [m for m in ph["messages"] if m["kind"] == "command"]
    with_fds = [(m["execute"], m.get("fds")) for m in cmds if m.get("fds")]
    mig = next(m for m in cmds if m["execute"] == "migrate")
    if "sparse" in fixture:
        assert with_fds == [("add-fd", 1)]
        assert mig["arguments"]["uri"].startswith("file:/dev/fdset/")
    else:
        assert with_fds == [("getfd", 1)]
        assert mig["arguments"]["uri"] == "fd:migrate"
    statuses = [m["data"]["status"] for m in ph["messages"] if m["kind"] == "event" and m["event"] == "MIGRATION"]
    assert statuses[0] == "setup" and statuses[-1] == "completed"
    assert any(m["kind"] == "event" and m["event"] == "STOP" for m in ph["messages"])


@pytest.mark.parametrize("fixture", [c[0] for c in CASES if c[3] == "restore"])
def test_restore_phase_details(fixture):
    ph = logparse.trace_from_log(FIX / fixture)["phases"][0]
    inc = next(m for m in ph["messages"] if m["kind"] == "command" and m["execute"] == "migrate-incoming")
    if "sparse" in fixture:
        assert inc["arguments"]["uri"].startswith("file:/dev/fdset/0,offset=")
    else:
        assert inc["arguments"]["uri"].startswith("fd:")
    if "11.3" in fixture:
        assert inc["arguments"]["exit-on-error"] is False
    statuses = [m["data"]["status"] for m in ph["messages"] if m["kind"] == "event" and m["event"] == "MIGRATION"]
    assert statuses[-1] == "completed"


def test_restore_image_path_from_process_start():
    tr = logparse.trace_from_log(FIX / "libvirt-9.0-attributed/managedsave-restore.log")
    assert tr["phases"][0]["image"]["path"] == "/var/lib/libvirt/qemu/save/fxa.save"


def test_list_monitors_fields():
    mons = logparse.list_monitors(FIX / "libvirt-11.3-attributed/save-sparse-parallel2.log")
    assert len(mons) == 1
    m = mons[0]
    assert m["key"] == "0x7fe838007b90" and m["domain"] == "fxc" and m["role"] == "save"
    assert m["commands"] == 11 and m["closed"] is True and m["opened"] is False
    assert m["notable"] == ["stop", "add-fd", "migrate"]
    assert m["migrate_uris"][0].startswith("file:/dev/fdset/1,offset=0x")
    assert m["operations"] == ["remoteDispatchDomainSaveParams"]
    assert m["migration_status"] == "completed"
    assert m["first"] <= m["last"]


# ---------------------------------------------------------------- derived logs


def read(rel: str) -> str:
    return (FIX / rel).read_text()


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def test_monitor_only_cycle_same_vm_is_taken(tmp_path):
    p = write(tmp_path, "cycle.log", read("libvirt-9.0/managedsave-running.log") +
              read("libvirt-9.0/managedsave-restore.log"))
    tr = logparse.trace_from_log(p, domain="fxa")
    assert [ph["name"] for ph in tr["phases"]] == ["save", "restore"]
    assert tr["domain"]["name"] == "fxa"
    assert tr["log"]["attribution"].startswith("assumed")
    assert collapse(executes(tr["phases"][0])) == SAVE_90
    assert collapse(executes(tr["phases"][1])) == [*RESTORE_90, "cont"]
    assert tr["log"]["unphased"] == 0
    # since/until cut the window: only the save
    save_end = logparse.list_monitors(p)[0]["last"]
    only = logparse.trace_from_log(p, until=save_end + 0.0005)
    assert [ph["name"] for ph in only["phases"]] == ["save"]
    later = logparse.trace_from_log(p, since=save_end + 0.5)
    assert [ph["name"] for ph in later["phases"]] == ["restore"]


def _rewrite(text: str, mon_from: str, mon_to: str, vm_from: str | None = None, vm_to: str | None = None) -> str:
    text = text.replace(mon_from, mon_to)
    if vm_from and vm_to:
        text = text.replace(vm_from, vm_to)
    return text


def test_monitor_only_two_domains_is_ambiguous(tmp_path):
    a = read("libvirt-9.0/managedsave-running.log")
    b = _rewrite(read("libvirt-9.0/save-bypass-cache.log"), "0x7f06d41ce2f0", "0x7f06d41c0000",
                 "0x7f06cc0346d0", "0x7f06cc999990")
    p = write(tmp_path, "two.log", a + b)
    with pytest.raises(errors.AmbiguousMonitor) as ei:
        logparse.trace_from_log(p, domain="fxa")
    exc = ei.value
    assert "\n" not in str(exc)
    assert "0x7f06e4005180" in str(exc) and "0x7f06d41c0000" in str(exc)
    assert [m["key"] for m in exc.monitors] == ["0x7f06e4005180", "0x7f06d41c0000"]
    assert all(m["role"] == "save" and m["commands"] == 9 for m in exc.monitors)
    assert all("migrate" in m["notable"] for m in exc.monitors)
    tr = logparse.trace_from_log(p, domain="fxa", monitor="0x7f06d41c0000")
    assert [ph["monitor"] for ph in tr["phases"]] == ["0x7f06d41c0000"]
    assert tr["domain"]["name"] == "fxa"
    with pytest.raises(errors.LogError, match="not found"):
        logparse.trace_from_log(p, monitor="0xdeadbeef")


def test_pointer_reuse_after_close(tmp_path):
    save = read("libvirt-9.0/managedsave-running.log")      # mon 0x7f06e4005180, ends with CLOSE
    restore = _rewrite(read("libvirt-9.0/managedsave-restore.log"), "0x7f06d41ce2f0", "0x7f06e4005180")
    p = write(tmp_path, "reuse.log", save + restore)
    keys = [m["key"] for m in logparse.list_monitors(p)]
    assert keys == ["0x7f06e4005180", "0x7f06e4005180#2"]
    tr = logparse.trace_from_log(p)
    assert [(ph["name"], ph["monitor"]) for ph in tr["phases"]] == [
        ("save", "0x7f06e4005180"), ("restore", "0x7f06e4005180#2")]
    # without the NEW line the closed pointer still starts a new instance
    no_new = "".join(line for line in restore.splitlines(keepends=True) if "QEMU_MONITOR_NEW" not in line)
    p2 = write(tmp_path, "reuse2.log", save + no_new)
    assert [m["key"] for m in logparse.list_monitors(p2)] == ["0x7f06e4005180", "0x7f06e4005180#2"]
    # the instance key selects exactly one instance; the bare pointer both
    assert [ph["name"] for ph in logparse.trace_from_log(p, monitor="0x7f06e4005180#2")["phases"]] == ["restore"]
    assert len(logparse.trace_from_log(p, monitor="0x7f06e4005180")["phases"]) == 2


_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})")


def _records(text: str) -> list[tuple[str, str]]:
    """Split a log into (timestamp, record text incl. continuation lines)."""
    recs: list[tuple[str, str]] = []
    for line in text.splitlines(keepends=True):
        m = _TS.match(line)
        if m:
            recs.append((m.group(1), line))
        elif recs:
            recs[-1] = (recs[-1][0], recs[-1][1] + line)
    return recs


def test_interleaved_domains(tmp_path):
    a = read("libvirt-11.3-attributed/save-bypass-cache.log")                # fxa, 19:03:52
    b = read("libvirt-11.3-attributed/save-sparse-parallel2.log")            # fxc, same mon pointer
    b = _rewrite(b, "0x7fe838007b90", "0x7fe8380aaaa0", "0x7fe8185b1940", "0x7fe8185bbbb0")
    b = re.sub(r"(\+0000: )(\d+)(: )", lambda m: f"{m.group(1)}{int(m.group(2)) + 100000}{m.group(3)}", b)
    b = re.sub(r"Thread (\d+) ", lambda m: f"Thread {int(m.group(1)) + 100000} ", b)
    ra, rb = _records(a), _records(b)
    # move b onto a's clock (same second range) so the two saves overlap
    sa, sb = ra[0][0], rb[0][0]
    assert sa[:16] == "2026-11-25 19:03" and sb[:16] == "2026-11-25 19:04"
    rb = [(t.replace("19:04:", "19:03:", 1), r.replace(t, t.replace("19:04:", "19:03:", 1), 1)) for t, r in rb]
    shift = int(sa[17:19]) - int(sb[17:19])

    def sh(t: str) -> str:
        s = int(t[17:19]) + shift
        return f"{t[:17]}{s:02d}{t[19:]}"

    rb = [(sh(t), r.replace(t, sh(t), 1)) for t, r in rb]
    merged = sorted(ra + rb, key=lambda x: x[0])
    p = write(tmp_path, "inter.log", "".join(r for _, r in merged))
    mons = logparse.list_monitors(p)
    assert {m["domain"] for m in mons} == {"fxa", "fxc"}
    # the two conversations really interleave in time
    ma, mb = sorted(mons, key=lambda m: m["domain"])
    assert ma["first"] < mb["last"] and mb["first"] < ma["last"]
    ta = logparse.trace_from_log(p, domain="fxa")
    tc = logparse.trace_from_log(p, domain="fxc")
    assert collapse(executes(ta["phases"][0])) == SAVE_113
    assert collapse(executes(tc["phases"][0])) == SAVE_113_SPARSE
    assert ta["phases"][0]["monitor"] == "0x7fe838007b90" and tc["phases"][0]["monitor"] == "0x7fe8380aaaa0"
    assert len(ta["phases"][0]["messages"]) == grep_count(p, "0x7fe838007b90")
    assert len(tc["phases"][0]["messages"]) == grep_count(p, "0x7fe8380aaaa0")
    with pytest.raises(errors.AmbiguousMonitor):
        logparse.trace_from_log(p)
    with pytest.raises(errors.LogError, match="domains seen: fxa, fxc"):
        logparse.trace_from_log(p, domain="nosuch")


def _failed_save_log() -> str:
    """A failed save built from the real one: the migration fails (disk full), libvirt resumes the guest."""
    text = read("libvirt-9.0/managedsave-running.log")
    text = text.replace('"data": {"status": "completed"}', '"data": {"status": "failed"}')
    text = re.sub(r'reply=\{"return": \{"status": "completed".*?"id": "libvirt-419"\}',
                  'reply={"return": {"status": "failed", "error-desc": "Unable to write to file: No space left '
                  'on device"}, "id": "libvirt-419"}', text)
    lines = text.splitlines(keepends=True)
    close = next(i for i, ln in enumerate(lines) if "QEMU_MONITOR_CLOSE" in ln)
    last_reply = max(i for i, ln in enumerate(lines[:close]) if "QEMU_MONITOR_RECV_REPLY" in ln)
    ts = lines[last_reply][:29]
    extra = [
        f"{ts} 3968: info : qemuMonitorSend:861 : QEMU_MONITOR_SEND_MSG: mon=0x7f06e4005180 "
        'msg={"execute":"cont","id":"libvirt-422"}\r\n', " fd=-1\n",
        f"{ts} 12968: info : qemuMonitorIOWrite:366 : QEMU_MONITOR_IO_WRITE: mon=0x7f06e4005180 "
        'buf={"execute":"cont","id":"libvirt-422"}\r\n', " len=39 ret=39 errno=0\n",
        f"{ts} 12968: info : qemuMonitorJSONIOProcessLine:203 : QEMU_MONITOR_RECV_EVENT: mon=0x7f06e4005180 "
        'event={"timestamp": {"seconds": 1795633093, "microseconds": 1}, "event": "RESUME"}\n',
        f"{ts} 12968: info : qemuMonitorJSONIOProcessLine:208 : QEMU_MONITOR_RECV_REPLY: mon=0x7f06e4005180 "
        'reply={"return": {}, "id": "libvirt-422"}\n',
    ]
    return "".join(lines[:last_reply + 1] + extra)   # no CLOSE: the guest keeps running


def test_failed_save_recorded_with_cont(tmp_path):
    text = _failed_save_log()
    assert "libvirt-419" in text and "No space left" in text
    p = write(tmp_path, "failed.log", text)
    ph = logparse.trace_from_log(p)["phases"][0]
    assert ph["ok"] is False
    assert "No space left on device" in ph["error"]
    assert executes(ph) == [*SAVE_90, "cont"]
    assert ph["messages"][-1]["kind"] == "reply" and ph["messages"][-2]["event"] == "RESUME"


def test_error_reply_fails_phase(tmp_path):
    text = read("libvirt-9.0/managedsave-running.log").replace(
        'reply={"return": {}, "id": "libvirt-418"}',
        'reply={"id": "libvirt-418", "error": {"class": "GenericError", "desc": "There\'s a migration process in '
        'progress"}}')
    p = write(tmp_path, "err.log", text)
    ph = logparse.trace_from_log(p)["phases"][0]
    rep = next(m for m in ph["messages"] if m["kind"] == "reply" and m["id"] == "libvirt-418")
    assert rep["error"]["class"] == "GenericError" and "return" not in rep
    assert ph["ok"] is False and "migration process in progress" in ph["error"]
    assert trace.validate(logparse.trace_from_log(p)) == []
    assert logparse.list_monitors(p)[0]["errors"] == 1


def test_failed_job_from_attributed_log(tmp_path):
    text = read("libvirt-9.0-attributed/managedsave-running.log")
    assert "finished job remoteDispatchDomainManagedSave with ret=0" in text
    m = re.search(r"^(\S+ \S+ )(\d+): debug : virThreadJobClear:\d+ : Thread (\d+) \(rpc-libvirtd\) finished job "
                  r"remoteDispatchDomainManagedSave", text, re.M)
    err = (f"{m.group(1)}{m.group(3)}: error : qemuMigrationSrcToFile:99 : operation failed: "
           "domain save job: failed\n")
    text = text.replace(m.group(0), err + m.group(0)).replace(
        "finished job remoteDispatchDomainManagedSave with ret=0",
        "finished job remoteDispatchDomainManagedSave with ret=-1")
    ph = logparse.trace_from_log(write(tmp_path, "job.log", text))["phases"][0]
    assert ph["operation"] == "managed-save"
    assert ph["ok"] is False and ph["error"] == "operation failed: domain save job: failed"


def test_garbage_truncation_and_non_utf8(tmp_path):
    raw = (FIX / "libvirt-9.0/managedsave-running.log").read_bytes()
    lines = raw.splitlines(keepends=True)
    junk = [b"garbage line without timestamp\n", b"\xff\xfe\x00binary\x80junk\n", b"2026-11-25 not a log line\n",
            b"2026-11-25 18:58:12.820+0000: 3968: info : qemuMonitorSend:861 : QEMU_MONITOR_SEND_MSG: "
            b"mon=0x7f06e4005180 msg={not json\n"]
    mixed = lines[:2] + junk + lines[2:]
    # a non-UTF-8 byte inside a reply string survives as U+FFFD
    mixed = [ln.replace(b'"return": {}, "id": "libvirt-416"', b'"return": {"x": "a\xffb"}, "id": "libvirt-416"')
             for ln in mixed]
    # truncated lines: cut the final line in half and add a half SEND_MSG
    mixed[-1] = mixed[-1][:40] + b"\n"
    mixed.append(b'2026-11-25 18:58:14.000+0000: 3968: info : qemuMonitorSend:861 : QEMU_MONITOR_SEND_MSG: '
                 b'mon=0x7f06e4005180 msg={"execute":"query-st')
    p = write(tmp_path, "junk.log", b"".join(mixed))
    tr = logparse.trace_from_log(p)
    assert trace.validate(tr) == []
    assert tr["log"]["skipped"] == 3      # the three junk lines (the cut last line still looks like a log line)
    assert tr["log"]["malformed"] == 2    # the bad SEND_MSG and the truncated one
    ph = tr["phases"][0]
    assert executes(ph) == SAVE_90
    rep = next(m for m in ph["messages"] if m["kind"] == "reply" and m["id"] == "libvirt-416")
    assert rep["return"] == {"x": "a\ufffdb"}


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(errors.LogError) as ei:
        logparse.trace_from_log(tmp_path / "nope.log")
    assert "\n" not in str(ei.value) and "nope.log" in str(ei.value)
    with pytest.raises(errors.LogError, match="no QEMU monitor commands"):
        logparse.trace_from_log(write(tmp_path, "empty.log", ""))
    with pytest.raises(errors.LogError):
        logparse.list_monitors(tmp_path)      # a directory


def test_host_versions_from_banner(tmp_path):
    banner = ("2026-11-25 19:03:40.000+0000: 15831: info : libvirt version: 11.3.0, package: 11.3.0-2~bpo12+1 "
              "(Debian)\n2026-11-25 19:03:40.000+0000: 15831: info : hostname: vm\n")
    p = write(tmp_path, "banner.log", banner + read("libvirt-11.3-attributed/save-bypass-cache.log"))
    tr = logparse.trace_from_log(p)
    assert tr["host"]["libvirt"] == "11.3.0" and tr["host"]["hostname"] == "vm"


def test_iter_records_streams(tmp_path):
    recs = logparse.iter_records(FIX / "libvirt-9.0/managedsave-running.log")
    first = next(recs)                       # a generator: nothing read past what is needed
    assert first.kind == "monvm"
    kinds = {r.kind for r in recs}
    assert {"send", "write", "sendfd", "reply", "event", "close"} <= kinds


def test_generate_log_and_benchmark_helpers(tmp_path):
    p = tmp_path / "big.log"
    n = logsynth.generate_log(p, 3)
    assert n >= 3_000_000 and p.stat().st_size == n
    mons = logparse.list_monitors(p)
    assert len(mons) > 6
    assert any("#" in m["key"] for m in mons)          # pointer reuse exercised
    firsts = [m["first"] for m in mons]
    assert firsts == sorted(firsts)
    tr = logparse.trace_from_log(p, monitor=mons[-1]["key"])
    assert trace.validate(tr) == [] and tr["log"]["skipped"] == 0


def test_bench_p5_times_the_parser_against_grep(tmp_path):
    """P5's measurement: grep, the summary and the import on the same generated log, pairwise; log removed."""
    from virtsave.harness import bench

    s = bench.parser_samples()
    bench.measure_parser(tmp_path / "p5.log", 2, 2, s)
    assert not (tmp_path / "p5.log").exists()
    for what in ("grep -c QEMU_MONITOR", "log summary", "log import"):
        assert len(s[f"{what} (CPU)"].values) == len(s[f"{what} (wall)"].values) == 2
        assert all(v >= 0 for v in s[f"{what} (wall)"].values)
    assert all(r > 1e6 for r in s["log import rate (CPU)"].values)
    ratios = bench.parser_ratios(s)
    assert set(ratios) == {"P5", "P5b"} and set(bench.GOALS) >= {"P5", "P5b"}
    assert all(len(s[name].values) == 2 and min(s[name].values) >= 0 for name in bench.FLOORS.values())
    floors = bench.parser_floors(s)
    assert set(floors) == {"P5", "P5b"} and all(v == v for v in floors.values())      # measured, not NaN
    assert "P5b" in bench.floor_notes(floors)[1]


@pytest.mark.parametrize("name", ["libvirt-9.0-attributed/managedsave-running.log",
                                  "libvirt-11.3-attributed/managedsave-running.log"])
def test_scan_floor_runs_the_lexers_passes(name):
    """The P5 floor visits what the parser's passes find: an import's passes add one match per line
    (the line statistics) and one per IO_WRITE probe (the summary skips those) to the summary's."""
    path = FIX / name
    data = path.read_bytes()
    summary, whole = logparse.scan_floor(path), logparse.scan_floor(path, whole=True)
    probes = len(re.findall(rb"QEMU_MONITOR_(?:SEND_MSG|RECV_REPLY|RECV_EVENT|NEW|CLOSE|IO_SEND_FD): ", data))
    assert summary >= probes > 0
    assert whole - summary == data.count(b"\n") - data.endswith(b"\n") + data.count(b"QEMU_MONITOR_IO_WRITE: ")


def test_restore_then_save_on_one_instance(tmp_path):
    """The 9.0 fixtures managedsave-restore and save-bypass-cache are one monitor instance, recorded in a row."""
    text = read("libvirt-9.0/managedsave-restore.log") + read("libvirt-9.0/save-bypass-cache.log")
    if True:
        path = write(tmp_path, "rs.log", text)
        assert [m["key"] for m in logparse.list_monitors(path)] == ["0x7f06d41ce2f0"]
        tr = logparse.trace_from_log(path)
        assert [(ph["name"], ph["monitor"]) for ph in tr["phases"]] == [
            ("restore", "0x7f06d41ce2f0"), ("save", "0x7f06d41ce2f0")]
        assert collapse(executes(tr["phases"][0])) == [*RESTORE_90, "cont"]
        assert collapse(executes(tr["phases"][1])) == SAVE_90
        assert tr["log"]["unphased"] == 0
        assert sum(len(ph["messages"]) for ph in tr["phases"]) == grep_count(path, "0x7f06d41ce2f0")


def _passes_agree(path: Path, monkeypatch: pytest.MonkeyPatch, **kw) -> None:
    """The parser's views of one log agree with each other.

    The summary pass (what list_monitors shows) and the import's pass (which also counts garbage and sees
    IO_WRITE) find the same monitor instances; each instance's collected conversation (read from its byte
    range only) holds exactly the commands, replies and events the summary counted; and the tokenizer's
    fast patterns give the same tokens as its exact per-line rules.
    """
    lo, hi = logparse._to_epoch(kw.get("since")), logparse._to_epoch(kw.get("until"))
    summary = logparse.list_monitors(path, **kw)
    full = logparse.scan(path, stats=True, **kw)
    assert sorted(summary, key=lambda m: m["key"]) == sorted((m.to_dict() for m in full.monitors.values()),
                                                               key=lambda m: m["key"])
    with logparse._Mapped(path) as log:
        sc, _ = logparse._summarize(log, lo, hi)
        for key, mon in sc.monitors.items():
            msgs, undecodable = logparse._collect(log, sc, key)
            got = Counter(m.body["kind"] for m in msgs)
            assert got["command"] + got["reply"] + got["event"] + undecodable == \
                mon.commands + mon.replies + mon.events, key
            if not undecodable:
                assert (got["command"], got["reply"], got["event"]) == (mon.commands, mon.replies, mon.events), key
    fast = list(logparse.iter_records(path))
    monkeypatch.setattr(logparse, "_FAST", {})          # every probe line through the exact per-line rules
    assert list(logparse.iter_records(path)) == fast


@pytest.mark.parametrize("fixture", sorted({c[0] for c in CASES}))
def test_passes_agree_on_fixtures(fixture, monkeypatch):
    _passes_agree(FIX / fixture, monkeypatch)


def test_passes_agree_on_derived_logs(tmp_path, monkeypatch):
    junk = (FIX / "libvirt-9.0/managedsave-running.log").read_bytes().replace(
        b'"id": "libvirt-416"}', b'"id": "libvirt-416"}\n\xff junk \x00\n  stray continuation\n')
    _passes_agree(write(tmp_path, "junk.log", junk + b"2026-11-25 18:58:14.000+0000: 1: info : x : "
                        b"QEMU_MONITOR_SEND_MSG: mon=0x7f06e4005180 msg={\"execute\":\"q"), monkeypatch)
    _passes_agree(write(tmp_path, "failed.log", _failed_save_log()), monkeypatch)
    cycle = write(tmp_path, "cycle.log", read("libvirt-9.0/managedsave-running.log") +
                  read("libvirt-9.0/managedsave-restore.log"))
    _passes_agree(cycle, monkeypatch)
    _passes_agree(cycle, monkeypatch, since=logparse.list_monitors(cycle)[0]["last"] + 0.5)
    big = tmp_path / "gen.log"
    logsynth.generate_log(big, 2)
    _passes_agree(big, monkeypatch)


def test_other_job_poll_inside_save_stays_in_phase(tmp_path, monkeypatch):
    """virsh domjobinfo during a save: a query-migrate from another thread/job lands inside the save phase."""
    text = read("libvirt-9.0-attributed/managedsave-running.log")
    anchor = 'reply={"return": {}, "id": "libvirt-418"}\n'
    assert anchor in text
    ts = "2026-11-25 18:59:11.380+0000"
    poll = (
        f"{ts}: 4000: debug : virDomainObjBeginJobInternal:318 : Starting job: API=remoteDispatchDomainGetJobStats "
        "job=query agentJob=none asyncJob=none (vm=0x7f06cc034220 name=fxa, current job=none agentJob=none "
        "async=save)\n"
        f"{ts}: 4000: info : qemuMonitorSend:861 : QEMU_MONITOR_SEND_MSG: mon=0x7f06d41ceb90 "
        'msg={"execute":"query-migrate","id":"libvirt-999"}\r\n fd=-1\n'
        f"{ts}: 13341: info : qemuMonitorJSONIOProcessLine:208 : QEMU_MONITOR_RECV_REPLY: mon=0x7f06d41ceb90 "
        'reply={"return": {"status": "active"}, "id": "libvirt-999"}\n'
        f"{ts}: 4000: debug : virThreadJobClear:118 : Thread 4000 (rpc-libvirtd) finished job "
        "remoteDispatchDomainGetJobStats with ret=0\n")
    p = write(tmp_path, "poll.log", text.replace(anchor, anchor + poll, 1))
    tr = logparse.trace_from_log(p, domain="fxa")
    (ph,) = tr["phases"]
    ids = [m["id"] for m in ph["messages"] if m["kind"] == "command"]
    assert ids == ["libvirt-413", "libvirt-414", "libvirt-415", "libvirt-416", "libvirt-417", "libvirt-418",
                   "libvirt-999", "libvirt-419", "libvirt-420", "libvirt-421"]
    assert ph["operation"] == "managed-save" and ph["ok"] is True
    assert tr["log"]["unphased"] == 0
    assert len(ph["messages"]) == grep_count(p, "0x7f06d41ceb90")
    _passes_agree(p, monkeypatch)


@pytest.mark.parametrize("fixture", [c[0] for c in CASES if c[3] == "restore"])
def test_host_versions_from_restore_logs(fixture):
    """The QMP greeting (logged as "Line [{"QMP": …") names QEMU; libvirt's child logs its banner (11.3)."""
    tr = logparse.trace_from_log(FIX / fixture)
    if "11.3" in fixture:
        assert tr["host"] == {"libvirt": "11.3.0", "qemu": "10.0.2", "hostname": "vm"}
    else:
        assert tr["host"]["qemu"] == "7.2.22"
    mon = logparse.list_monitors(FIX / fixture)[0]
    assert mon["qemu_version"] == tr["host"]["qemu"]


def test_monitor_only_other_domains_polls_do_not_make_it_ambiguous(tmp_path):
    """A second domain that only answered a stats poll is no candidate for the save."""
    ts = "2026-11-25 18:58:12.500+0000"
    other = (f"{ts}: 3999: debug : qemuMonitorGetStatus:1 : mon:0x7f06aaaa0000 vm:0x7f06bbbb0000 fd:40\n"
             f"{ts}: 3999: info : qemuMonitorSend:861 : QEMU_MONITOR_SEND_MSG: mon=0x7f06aaaa0000 "
             'msg={"execute":"query-status","id":"libvirt-7"}\r\n fd=-1\n'
             f"{ts}: 12968: info : qemuMonitorJSONIOProcessLine:208 : QEMU_MONITOR_RECV_REPLY: mon=0x7f06aaaa0000 "
             'reply={"return": {"status": "running", "running": true}, "id": "libvirt-7"}\n')
    p = write(tmp_path, "other.log", other + read("libvirt-9.0/managedsave-running.log"))
    assert [m["role"] for m in logparse.list_monitors(p)] == ["other", "save"]
    tr = logparse.trace_from_log(p, domain="fxa")
    assert [ph["monitor"] for ph in tr["phases"]] == ["0x7f06e4005180"]
    assert tr["log"]["monitors"] == ["0x7f06e4005180"]
    assert collapse(executes(tr["phases"][0])) == SAVE_90


def test_import_decodes_only_the_chosen_monitors_payloads(tmp_path, monkeypatch):
    """The import decodes JSON for the chosen instance's messages only (plus the rare QMP greetings)."""
    big = tmp_path / "gen.log"
    logsynth.generate_log(big, 2)
    mons = logparse.list_monitors(big)
    pick = next(m for m in mons if m["role"] == "restore" and "#" not in m["key"])
    greetings = sum(1 for line in big.read_bytes().splitlines() if b'{"QMP"' in line)
    decoded: list[bytes] = []
    real = logparse._loads
    monkeypatch.setattr(logparse, "_loads", lambda b: decoded.append(b) or real(b))
    tr = logparse.trace_from_log(big, monitor=pick["key"])
    messages = sum(len(ph["messages"]) for ph in tr["phases"]) + tr["log"]["unphased"]
    assert messages == pick["commands"] + pick["replies"] + pick["events"]
    assert len(decoded) == messages + greetings


def _keys(obj: object) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


@pytest.mark.parametrize("fixture", sorted({c[0] for c in CASES}))
def test_no_parser_state_in_what_is_returned(fixture):
    """Traces and monitor summaries carry public fields only (the parser keeps its state to itself)."""
    tr = logparse.trace_from_log(FIX / fixture)
    phase_keys = {k for ph in tr["phases"] for k in ph}
    assert phase_keys == {"name", "operation", "ok", "error", "image", "monitor", "attribution", "messages", "window"}
    message_keys = {k for ph in tr["phases"] for m in ph["messages"] for k in m}
    assert message_keys <= {"kind", "execute", "arguments", "id", "fds", "t", "return", "error", "event", "data",
                            "timestamp", "write_errno"}
    mons = logparse.list_monitors(FIX / fixture)
    assert not [k for k in {*_keys({k: v for k, v in tr.items() if k != "phases"}), *phase_keys, *message_keys,
                            *_keys(mons)} if k.startswith("_")]


def test_line_counts_garbage_and_malformed_probes(tmp_path):
    """Garbage is counted line by line, the same way whatever the line's shape (and never read twice)."""
    base = read("libvirt-9.0/save-bypass-cache.log")
    stamp = "2026-11-25 18:58:16.000+0000: 1: info : f:1 : "
    odd = [
        " orphan continuation (no SEND_MSG or IO_WRITE before it)",     # skipped
        "no timestamp at all",                                            # skipped
        "\t\r",                                                          # blank: not counted
        "",                                                               # blank
        stamp + "QEMU_MONITOR_IO_WRITE: mon=0x7f06d41ce2f0 buf={cut",     # malformed
        stamp + "QEMU_MONITOR_IO_PROCESS: mon=0x7f06d41ce2f0 buf=x",      # malformed (kind unknown here)
        "xx26-11-25 18:58:16.000+0000: 1: info : f:1 : QEMU_MONITOR_CLOSE: mon=0x7f06d41ce2f0",  # malformed
        stamp + "QEMU_MONITOR_SEND_MSG: mon=0x7f06d41ce2f0 msg=[1]",      # malformed: not an object
    ]
    text = "\n".join(odd) + "\n" + base
    p = write(tmp_path, "odd.log", text + "tail without newline")
    st = logparse.scan(p, stats=True).stats
    assert st.lines == text.count("\n") + 1 and st.bytes == p.stat().st_size
    assert (st.skipped, st.malformed) == (3, 4)
    stats = logparse.LogStats()
    assert sum(1 for r in logparse.iter_records(p, stats) if r.kind == "malformed") == 4
    assert stats == st
    assert [m["key"] for m in logparse.list_monitors(p)] == ["0x7f06d41ce2f0"]


def test_hostile_lines_do_not_confuse_or_crash(tmp_path):
    """Probe text inside a payload stays payload; list ids and deeply nested JSON are no crash."""
    text = read("libvirt-9.0/save-bypass-cache.log")
    fake = 'QEMU_MONITOR_RECV_EVENT: mon=0x7f06d41ce2f0 event={\\"event\\": \\"STOP\\"}'
    text = text.replace('reply={"return": {}, "id": "libvirt-',
                        'reply={"return": {"s": "' + fake + '"}, "id": "libvirt-', 1)
    first = re.search(r'"id": ?"(libvirt-\d+)"', text).group(1)
    text = re.sub(rf'("id": ?)"{first}"', rf'\1["{first}"]', text)           # a list id: command and reply
    deep = "[" * 100_000 + "]" * 100_000
    text = re.sub(r'reply=\{"return": \{\}, "id": "(libvirt-\d+)"\}',
                  lambda m: f'reply={{"return": {deep}, "id": "{m.group(1)}"}}', text, count=1)
    p = write(tmp_path, "hostile.log", text)
    clean = logparse.list_monitors(FIX / "libvirt-9.0/save-bypass-cache.log")[0]
    mon = logparse.list_monitors(p)[0]
    assert (mon["events"], mon["commands"], mon["replies"]) == (clean["events"], clean["commands"], clean["replies"])
    tr = logparse.trace_from_log(p)
    assert tr["log"]["malformed"] == 1 and [ph["name"] for ph in tr["phases"]] == ["save"]
    msgs = tr["phases"][0]["messages"]
    assert next(m for m in msgs if m["kind"] == "command")["id"] == [first]
    assert next(m for m in msgs if m["kind"] == "reply")["id"] == [first]


def _fuzzed(name: str) -> str:
    """Inputs fuzzing found troublesome in the old parser (more in tests/test_fuzz.py's regressions)."""
    log = read("libvirt-11.3-attributed/save-bypass-cache.log")
    if name == "list-ids":
        return re.sub(r'"id": ?"(libvirt-\d+)"', r'"id": ["\1"]', log)
    return re.sub(r'"event": "MIGRATION", "data": (\{[^}]*\})', r'"event": "MIGRATION", "data": [\1]', log)


@pytest.mark.parametrize("name", ["list-ids", "migration-data-list"])
def test_odd_payloads_still_give_a_valid_trace(tmp_path, name):
    """List ids and list event data are no crash: the import is a valid trace of the save."""
    p = write(tmp_path, f"{name}.log", _fuzzed(name))
    tr = logparse.trace_from_log(p)
    assert trace.validate(tr) == []
    (ph,) = tr["phases"]
    assert ph["name"] == "save" and min(m["t"] for m in ph["messages"]) == 0
    if name == "list-ids":
        cmds = [m for m in ph["messages"] if m["kind"] == "command"]
        replies = [m for m in ph["messages"] if m["kind"] == "reply"]
        assert [m["id"] for m in replies] == [m["id"] for m in cmds] and isinstance(cmds[0]["id"], list)
        assert tr["log"]["malformed"] == 0


# ---------------------------------------------------------------- real logs recorded for these tests
# tests/unit/data/: windows kept by `VIRTSAVE_KEEP_WINDOW=… virtsave trace …` on libvirt 11.3 + QEMU 10.0.2
# (filters 1:monitor 1:job 1:qemu.qemu_process), with test guests of this machine.
DATA = Path(__file__).resolve().parent / "data"


def _instance_counts(path: Path, ptr: str) -> list[int]:
    """Probe lines of *ptr* per monitor instance (a NEW after a CLOSE starts the next one)."""
    counts: list[int] = [0]
    closed = False
    pat = re.compile(rf"QEMU_MONITOR_(SEND_MSG|RECV_REPLY|RECV_EVENT|NEW|CLOSE): mon={ptr}\b")
    for line in path.read_text(errors="replace").splitlines():
        m = pat.search(line)
        if not m:
            continue
        if m.group(1) == "CLOSE":
            closed = True
        elif m.group(1) == "NEW" or closed:
            if closed or counts[-1]:
                counts.append(0)
            closed = False
            if m.group(1) == "NEW":
                continue
        else:
            counts[-1] += 1
    return counts


def test_real_failed_save_full_disk(monkeypatch):
    """`virtsave trace G --op save --file <16 MiB tmpfs>/x.save`: iohelper hits ENOSPC, libvirt resumes."""
    p = DATA / "libvirt-11.3-failed-save-enospc.log"
    tr = logparse.trace_from_log(p)
    assert trace.validate(tr) == []
    (ph,) = tr["phases"]
    assert tr["domain"]["name"] == "vs-lp-1534" and ph["operation"] == "save"
    assert ph["ok"] is False
    assert ph["error"].startswith("operation failed: /usr/lib/libvirt/libvirt_iohelper: failure with ")
    assert ph["error"].endswith("No space left on device")
    assert executes(ph) == [*SAVE_113, "cont"]
    statuses = [m["data"]["status"] for m in ph["messages"] if m["kind"] == "event" and m["event"] == "MIGRATION"]
    assert statuses == ["setup", "active", "failed"]
    qm = [m for m in ph["messages"] if m["kind"] == "reply" and isinstance(m.get("return"), dict)
          and m["return"].get("status") == "failed"]
    assert qm[0]["return"]["error-desc"] == "Unable to write to file: Broken pipe"
    assert [m.get("event") for m in ph["messages"][-2:]] == ["RESUME", None]
    assert tr["log"]["unphased"] == 0 and len(ph["messages"]) == grep_count(p, ph["monitor"])
    _passes_agree(p, monkeypatch)


@pytest.fixture(scope="module")
def five_saves(tmp_path_factory) -> Path:
    import gzip

    p = tmp_path_factory.mktemp("real") / "five-saves.log"
    p.write_bytes(gzip.decompress((DATA / "libvirt-11.3-five-saves.log.gz").read_bytes()))
    return p


FIVE = {  # domain → [(phase, operation, monitor, commands)]; other engineers' test guests were busy too
    "vs-lp-a2523": [("save", "save", "0x7f5fb4078d00", SAVE_113)],
    "vs-lp-b2523": [("save", "save", "0x7f5fb4025010", SAVE_113)],
    "vs-test-1399-43c6b6": [
        ("save", "managed-save", "0x7f5fc40c4b90", SAVE_113[:7] + ["query-migrate"] * 9 + SAVE_113[7:]),
        ("restore", "start", "0x7f5fc40e12f0#2", [*_RESTORE_HEAD, "qom-get*464", "query-iothreads",
                                                   "migrate-set-capabilities", "migrate-incoming", "qom-list",
                                                   "query-block", "cont"])],
    "vs-test-2622-372a4c": [("save", "managed-save", "0x7f5fb4078010",
                             SAVE_113[:7] + ["query-migrate"] * 3 + SAVE_113[7:])],
    "vs-test-rel-2018-093775": [
        ("save", "managed-save", "0x7f5fc40e12f0", SAVE_113),
        ("restore", "start", "0x7f5fc40c45d0", [*_RESTORE_HEAD, "qom-get*464", "query-iothreads",
                                                 "migrate-set-capabilities", "migrate-incoming", "qom-list",
                                                 "query-block", "cont"])],
}


def test_real_five_interleaved_saves(five_saves, monkeypatch):
    p = five_saves
    mons = logparse.list_monitors(p)
    assert {m["domain"] for m in mons if m["role"] != "other"} == set(FIVE)
    # the saves really overlap in time (A and B fully; four of the five at 19:38:45.3)
    saves = {m["domain"]: m for m in mons if m["role"] == "save"}
    a, b = saves["vs-lp-a2523"], saves["vs-lp-b2523"]
    assert len(saves) == 5 and a["first"] < b["first"] and b["last"] < a["last"]
    assert sum(1 for m in saves.values() if m["first"] <= 1795635525.3 <= m["last"]) == 4
    # pointer reuse across domains: the same pointer is a save of one domain, then a restore of another
    reused = {m["key"]: m["domain"] for m in mons if m["pointer"] == "0x7f5fc40e12f0"}
    assert reused == {"0x7f5fc40e12f0": "vs-test-rel-2018-093775", "0x7f5fc40e12f0#2": "vs-test-1399-43c6b6"}
    per_instance: dict[str, int] = {}
    for ptr in {m["pointer"] for m in mons}:
        for n, c in enumerate(_instance_counts(p, ptr), 1):
            per_instance[ptr if n == 1 else f"{ptr}#{n}"] = c
    for name, expected in FIVE.items():
        tr = logparse.trace_from_log(p, domain=name)
        assert trace.validate(tr) == []
        assert tr["domain"]["name"] == name and tr["host"]["qemu"] == "10.0.2"
        got = [(ph["name"], ph["operation"], ph["monitor"], collapse(executes(ph))) for ph in tr["phases"]]
        assert got == expected, name
        assert all(ph["ok"] is True for ph in tr["phases"])
        assert tr["log"]["unphased"] == 0
        for ph in tr["phases"]:
            assert len(ph["messages"]) == per_instance[ph["monitor"]], (name, ph["monitor"])
    with pytest.raises(errors.AmbiguousMonitor) as ei:
        logparse.trace_from_log(p)
    assert "vs-lp-a2523" in str(ei.value)
    _passes_agree(p, monkeypatch)


def test_window_accepts_datetimes_and_iso(tmp_path):
    import datetime as dt

    p = write(tmp_path, "cycle.log", read("libvirt-9.0/managedsave-running.log") +
              read("libvirt-9.0/managedsave-restore.log"))
    save_end = logparse.list_monitors(p)[0]["last"]
    aware = dt.datetime.fromtimestamp(save_end + 0.5, dt.UTC)
    naive = aware.replace(tzinfo=None)                      # naive = UTC
    for since in (aware, naive, aware.isoformat(), str(save_end + 0.5)):
        assert [ph["name"] for ph in logparse.trace_from_log(p, since=since)["phases"]] == ["restore"]
    with pytest.raises(errors.LogError, match="cannot understand time"):
        logparse.trace_from_log(p, since="yesterday")
    assert logparse.scan(p).job_count == 0                 # monitor-only: no job lines


def _imports_agree(path: Path, monkeypatch: pytest.MonkeyPatch, monitor, **kw) -> dict:
    """An import naming its monitors (one pass following their pointers only) gives the trace the
    whole summary gives (the same import with the focus switched off)."""
    focused = logparse.trace_from_log(path, monitor=monitor, **kw)
    with monkeypatch.context() as m:
        m.setattr(logparse, "_pointers", lambda monitor: None)
        whole = logparse.trace_from_log(path, monitor=monitor, **kw)
    focused.pop("created"), whole.pop("created")
    assert focused == whole
    return focused


def test_import_naming_its_monitor_follows_only_that_pointer(tmp_path, monkeypatch):
    for fixture, mon, *_ in CASES:
        _imports_agree(FIX / fixture, monkeypatch, mon)
    save = read("libvirt-9.0/managedsave-running.log")      # mon 0x7f06e4005180, ends with CLOSE
    restore = _rewrite(read("libvirt-9.0/managedsave-restore.log"), "0x7f06d41ce2f0", "0x7f06e4005180")
    reuse = write(tmp_path, "reuse.log", save + restore)
    for monitor in ("0x7f06e4005180", "0x7f06e4005180#2"):
        _imports_agree(reuse, monkeypatch, monitor)
    big = tmp_path / "gen.log"
    logsynth.generate_log(big, 3)
    mons = [m for m in logparse.list_monitors(big) if m["role"] != "other"]
    reused = next(m["key"] for m in logparse.list_monitors(big) if "#" in m["key"] and m["commands"])
    for monitor in (mons[0]["key"], reused, reused.partition("#")[0], [mons[1]["key"], mons[2]["key"]],
                    f"{mons[3]['key']}, {mons[4]['pointer']}"):
        tr = _imports_agree(big, monkeypatch, monitor)
        assert tr["phases"] and tr["log"]["unphased"] == 0
    _imports_agree(big, monkeypatch, reused, since=mons[0]["last"])
    # Handlers of the summary are not called for other pointers' payload probes.
    seen: set[bytes] = set()
    real = logparse._Machine.reply
    monkeypatch.setattr(logparse._Machine, "reply", lambda self, ls, t, ptr, *a: seen.add(ptr) or real(
        self, ls, t, ptr, *a))
    logparse.trace_from_log(big, monitor=mons[0]["key"])
    assert seen == {mons[0]["pointer"].encode()}


def test_import_naming_an_unknown_monitor_lists_the_logs_monitors(tmp_path):
    p = FIX / "libvirt-9.0/managedsave-running.log"
    with pytest.raises(errors.LogError, match=r"monitor 0x1 not found in log; monitors: 0x7f06e4005180"):
        logparse.trace_from_log(p, monitor="0x1")
    with pytest.raises(errors.LogError, match=r"monitor 0x7f06e4005180#2 not found in log; monitors: 0x7f06e40"):
        logparse.trace_from_log(p, monitor=iter(["0x7f06e4005180", "0x7f06e4005180#2"]))
