"""Reliability scenarios 4 and 5: bad and hostile inputs through the CLI (in-process), no QEMU launched.

Guarantees checked (README "Reliability" section):
- missing and unreadable images → exit 2 with one line from ``inspect`` and ``restore``;
- malformed, foreign and future-version traces → exit 2 from ``validate``, ``diff``, ``replay``
  and ``export``;
- a libvirtd log with garbage lines → skipped (same trace as the clean log) or exit 2 when
  nothing is left;
- hostile traces (``exec:``, HMP, host-file chardevs, foreign fds, ``-object secret`` reading
  host files, ``..`` in image paths) → refused before launch, naming the item: the traced QEMU
  binary is a wrapper that records every launch, and no image file may appear.

Corrupt images cut from a real QEMU stream, and the cases that launch QEMU, are in
tests/integration/test_bad_images.py.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from badinput import FIX, assert_clean_error, kill_recorded, make_qemu_wrapper, synthetic_trace, write_trace

from virtsave.core.errors import UnsafeTraceError
from virtsave.trace import model as tr

# --------------------------------------------------------------------------- scenario 4: images


def test_missing_and_unreadable_image(cli, tmp_path):
    assert_clean_error(cli("inspect", str(tmp_path / "nope.save")))
    assert_clean_error(cli("inspect", str(tmp_path)))  # a directory
    assert_clean_error(cli("-c", "qemu+unix:///system?socket=/nonexistent/sock", "restore", str(tmp_path / "nope")))


# --------------------------------------------------------------------------- scenario 4: traces


def _bad_traces(tmp_path: Path) -> dict[str, Path]:
    good = synthetic_trace()
    text = json.dumps(good)
    future = copy.deepcopy(good)
    future["version"] = 99
    wrong_type = copy.deepcopy(good)
    wrong_type["phases"] = "save"
    bad_msg = copy.deepcopy(good)
    bad_msg["phases"][0]["messages"][0] = {"kind": "command"}  # no execute
    foreign = {"hello": "world"}
    out = {
        "truncated-json": text[: len(text) // 2],
        "not-json": "this is not json {",
        "binary": os.urandom(2048),
        "empty": "",
        "json-list": "[1, 2, 3]",
        "foreign-json": json.dumps(foreign),
        "future-version": json.dumps(future),
        "phases-not-a-list": json.dumps(wrong_type),
        "command-without-execute": json.dumps(bad_msg),
        "nan-and-deep": "{" * 100000,
    }
    paths = {}
    for name, content in out.items():
        p = tmp_path / f"{name}.json"
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        paths[name] = p
    return paths


BAD_TRACES = ["truncated-json", "not-json", "binary", "empty", "json-list", "foreign-json", "future-version",
              "phases-not-a-list", "command-without-execute", "nan-and-deep"]


@pytest.mark.parametrize("name", BAD_TRACES)
def test_bad_trace_every_command(cli, tmp_path, name):
    bad = _bad_traces(tmp_path)[name]
    good = write_trace(tmp_path / "good.json", synthetic_trace())
    assert cli("validate", str(good)).returncode == 0  # control
    line = assert_clean_error(cli("validate", str(bad)))
    if name == "future-version":
        assert "version" in line or "newer" in line, line
    assert_clean_error(cli("diff", str(good), str(bad)))
    assert_clean_error(cli("diff", str(bad), str(good)))
    assert_clean_error(cli("export", str(bad), "--format", "replies"))
    out = tmp_path / "r.json"
    assert_clean_error(cli("replay", str(bad), "-o", str(out), "--image", str(tmp_path / "x.save")))
    assert not out.exists() and not (tmp_path / "x.save").exists()


def test_future_version_named(cli, tmp_path):
    t = synthetic_trace()
    t["version"] = tr.VERSION + 1
    p = write_trace(tmp_path / "future.json", t)
    line = assert_clean_error(cli("replay", str(p)))
    assert str(tr.VERSION + 1) in line and ("newer" in line or "version" in line), line


# --------------------------------------------------------------------------- scenario 4: logs


GARBAGE_LINES = [
    "\x00\x01\x02 binary junk \xff",
    "2026-11-25 19:00:00.000+0000: 1: info : qemuMonitorJSONIOProcessLine:1 : QEMU_MONITOR_RECV_REPLY: "
    "mon=0x7f00deadbeef reply={\"return\": {\"unterminated",
    "2026-11-25 19:00:00.000+0000: 1: info : qemuMonitorSend:1 : QEMU_MONITOR_SEND_MSG: mon=0xzz msg={oops}",
    "2026-13-45 99:99:99.999+0000: xx: debug : nonsense",
    "QEMU_MONITOR_RECV_EVENT: mon=0x1 event=[1,2,3]",
    " fd=notanumber",
    "a" * 20000,
]


def _garbled(src: Path, dst: Path, every: int = 7) -> Path:
    out = []
    for i, line in enumerate(src.read_text(errors="replace").splitlines(keepends=True)):
        out.append(line)
        if i % every == 0:
            out.append(GARBAGE_LINES[(i // every) % len(GARBAGE_LINES)] + "\n")
    dst.write_text("".join(out), errors="surrogateescape")
    return dst


def _commands(t: dict) -> list[tuple[str, str]]:
    return [(p["name"], m["execute"]) for p in t["phases"] for m in p["messages"] if m["kind"] == "command"]


@pytest.mark.parametrize("fixture", ["libvirt-11.3-attributed/managedsave-running.log",
                                     "libvirt-11.3-attributed/managedsave-restore.log",
                                     "libvirt-9.0-attributed/managedsave-running.log"])
def test_log_with_garbage_lines(cli, tmp_path, fixture):
    """Garbage lines are skipped: the import gives the same commands as the clean log."""
    clean = cli("trace", "fxa", "--from-log", str(FIX / fixture), "-o", str(tmp_path / "clean.json"))
    assert clean.returncode == 0, clean.stderr
    log = _garbled(FIX / fixture, tmp_path / "garbled.log")
    proc = cli("trace", "fxa", "--from-log", str(log), "-o", str(tmp_path / "garbled.json"))
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert _commands(tr.load(tmp_path / "garbled.json")) == _commands(tr.load(tmp_path / "clean.json"))


@pytest.mark.parametrize("content", [b"", b"\n".join(g.encode("utf-8", "surrogateescape") for g in GARBAGE_LINES),
                                     os.urandom(100000)])
def test_log_of_only_garbage(cli, tmp_path, content):
    log = tmp_path / "garbage.log"
    log.write_bytes(content)
    assert_clean_error(cli("trace", "fxa", "--from-log", str(log)))


def test_log_missing(cli, tmp_path):
    assert_clean_error(cli("trace", "fxa", "--from-log", str(tmp_path / "none.log")))
    assert_clean_error(cli("trace", "fxa", "--from-log", str(tmp_path)))


# --------------------------------------------------------------------------- scenario 5: hostile traces


@pytest.fixture
def qemu_wrapper(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A QEMU 'binary' that records every launch (see badinput.make_qemu_wrapper); whatever it
    launched is killed afterwards (only what this test started: no host-wide process scan)."""
    wrapper, record = make_qemu_wrapper(tmp_path)
    yield wrapper, record
    kill_recorded(record)


def _message(phase: dict, execute: str) -> dict:
    return next(m for m in phase["messages"] if m.get("execute") == execute)


def _set_uri(phase_index: int, execute: str, uri: str) -> Callable[[dict, Path], None]:
    def edit(t: dict, victim: Path) -> None:
        _message(t["phases"][phase_index], execute)["arguments"]["uri"] = uri.format(victim=victim)
    return edit


def _argv(*extra: str) -> Callable[[dict, Path], None]:
    def edit(t: dict, victim: Path) -> None:
        t["domain"]["argv"] += [x.format(victim=victim) for x in extra]
    return edit


def _hmp(t: dict, victim: Path) -> None:
    t["phases"][0]["messages"].insert(0, tr.command("human-monitor-command",
                                                    {"command-line": f"migrate exec:touch {victim}"}, id="x-1"))


def _image_path(t: dict, victim: Path) -> None:
    t["phases"][0]["image"] = {"path": "/var/lib/libvirt/qemu/save/../../../../etc/cron.d/evil", "size": 1,
                               "header": None}


_SECRET_JSON = json.dumps({"qom-type": "secret", "id": "s1", "format": "raw", "file": "/etc/shadow"})

#: kind → (edit of a valid trace, the text the refusal must name)
HOSTILE_EDITS: dict[str, tuple[Callable[[dict, Path], None], str]] = {
    "exec-migrate": (_set_uri(0, "migrate", "exec:touch {victim}"), "exec:"),
    "exec-incoming": (_set_uri(1, "migrate-incoming", "exec:cat /etc/shadow > {victim}"), "exec:"),
    "exec-argv": (_argv("-incoming", "exec:touch {victim}"), "exec:"),
    "hmp": (_hmp, "human-monitor-command"),
    "file-chardev": (_argv("-chardev", "file,id=steal,path={victim}", "-device", "isa-serial,chardev=steal"),
                     "file"),
    "pipe-chardev": (_argv("-chardev", "pipe,id=p0,path={victim}"), "pipe"),
    "socket-chardev-host-path": (_argv("-chardev", "socket,id=s0,path={victim},server=on,wait=off"), "socket"),
    "add-fd": (_argv("-add-fd", "set=9,fd=3,opaque=foreign"), "add-fd"),
    "fd-reference": (_argv("-chardev", "socket,id=foreign,fd=5"), "fd="),
    "netdev-script": (_argv("-netdev", "tap,id=n0,script={victim},downscript=no"), "script="),
    "secret-host-file": (_argv("-object", _SECRET_JSON.replace("{", "{{").replace("}", "}}")), "/etc/shadow"),
    "secret-host-file-keyval": (_argv("-object", "secret,id=s2,file=/root/.ssh/id_rsa"), "/root/.ssh/id_rsa"),
    "image-path-traversal": (_image_path, ".."),
    "migrate-file-traversal": (_set_uri(0, "migrate", "file:/var/tmp/../../etc/cron.d/evil,offset=0x400"), ".."),
    "extra-qmp-monitor": (_argv("-qmp", "unix:{victim},server=on,wait=off"), "-qmp"),
}


def _hostile(kind: str, wrapper: Path, tmp_path: Path) -> tuple[dict, str]:
    """A trace with one hostile item, and the text the refusal must name."""
    t = synthetic_trace(argv0=str(wrapper))
    edit, item = HOSTILE_EDITS[kind]
    edit(t, tmp_path / "victim")
    return t, item


HOSTILE = list(HOSTILE_EDITS)


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_trace_refused_before_anything_runs(cli, tmp_path, qemu_wrapper, kind):
    wrapper, record = qemu_wrapper
    t, item = _hostile(kind, wrapper, tmp_path)
    assert tr.validate(t) == [], tr.validate(t)  # hostile, but well-formed
    path = write_trace(tmp_path / f"{kind}.json", t)
    image = tmp_path / "out.save"
    out = tmp_path / "r.json"
    proc = cli("replay", str(path), "--image", str(image), "-o", str(out), "--run-for", "0", timeout=120)
    line = assert_clean_error(proc)
    assert "unsafe" in line.lower() or "refus" in line.lower(), line
    assert item in line, f"refusal does not name {item!r}: {line}"
    assert "allow-unsafe" in line, line
    assert not record.exists(), f"QEMU was launched: {record.read_text()}"
    assert not image.exists() and not out.exists() and not (tmp_path / "victim").exists()
    # the same trace checked by the library says the same (and names the item)
    from virtsave.qemu import replay

    findings = replay.check_safety(t, allow_unsafe=True)
    assert any(item in f for f in findings), findings


def test_allow_unsafe_lets_a_flagged_trace_through_the_check(tmp_path, qemu_wrapper):
    """--allow-unsafe turns the refusal into warnings (findings returned, nothing raised)."""
    from virtsave.qemu import replay

    wrapper, _ = qemu_wrapper
    t, item = _hostile("hmp", wrapper, tmp_path)
    with pytest.raises(UnsafeTraceError) as ei:
        replay.check_safety(t, allow_unsafe=False)
    assert item in str(ei.value) and "--allow-unsafe" in str(ei.value)
    assert any(item in f for f in replay.check_safety(t, allow_unsafe=True))


def test_clean_trace_has_no_findings(tmp_path):
    """Control for the hostile cases: libvirt's own sequence and the master-key secret are fine."""
    from virtsave.qemu import replay

    t = synthetic_trace()
    t["domain"]["argv"] += ["-object", json.dumps({"qom-type": "secret", "id": "masterKey0", "format": "raw",
                                                   "file": "/var/lib/libvirt/qemu/domain-1-x/master-key.aes"})]
    assert replay.check_safety(t) == []

def test_plugin_and_extra_monitor_refused(cli, tmp_path, qemu_wrapper):
    wrapper, record = qemu_wrapper
    t = synthetic_trace(argv0=str(wrapper))
    t["domain"]["argv"] += ["-plugin", "/tmp/evil.so"]
    line = assert_clean_error(cli("replay", str(write_trace(tmp_path / "p.json", t)), "--image",
                                  str(tmp_path / "x.save")))
    assert "-plugin" in line or "evil.so" in line, line
    assert not record.exists() and not (tmp_path / "x.save").exists()


SECRETS = ["VNCPW123", "SPICEPW1", "ARGVSECRETDATA", "JSONSECRETDATA", "SPICEOPTPW", "QMPSECRETDATA",
           "QMPVNCPW", "CHGVNCPW"]


def test_redaction_covers_what_security_md_lists(cli, tmp_path):
    """Every secret kind SECURITY.md names is redacted by ``virtsave.trace.redact`` and never reaches a
    ``virtsave export --format replies`` output (export works from the redacted trace)."""
    from virtsave.trace import redact

    t = synthetic_trace()
    t["domain"]["xml"] = ("<domain type='qemu'><name>s</name><devices>"
                          "<graphics type='vnc' passwd='VNCPW123'/><graphics type='spice' passwd='SPICEPW1'/>"
                          "</devices></domain>")
    t["domain"]["argv"] += ["-object", "secret,id=sec0,data=ARGVSECRETDATA,format=raw",
                            "-object", json.dumps({"qom-type": "secret", "id": "sec1", "data": "JSONSECRETDATA",
                                                   "format": "base64"}),
                            "-spice", "port=5901,password=SPICEOPTPW"]
    ph = t["phases"][1]["messages"]
    for i, (execute, args) in enumerate([
            ("object-add", {"qom-type": "secret", "id": "s2", "data": "QMPSECRETDATA", "format": "raw"}),
            ("set_password", {"protocol": "vnc", "password": "QMPVNCPW"}),
            ("change-vnc-password", {"password": "CHGVNCPW"})]):
        ph.insert(0, tr.reply(f"r-{i}", ret={}))
        ph.insert(0, tr.command(execute, args, id=f"r-{i}"))
    assert tr.validate(t) == []
    red = json.dumps(redact.redact_trace(copy.deepcopy(t)))
    leaked = [s for s in SECRETS if s in red]
    assert not leaked, f"not redacted: {leaked}"
    path = write_trace(tmp_path / "unredacted.json", t)
    proc = cli("export", str(path), "--format", "replies")
    assert proc.returncode == 0, proc.stderr
    assert "set_password" in proc.stdout  # control: the command itself is exported
    leaked = [s for s in SECRETS if s in proc.stdout + proc.stderr]
    assert not leaked, f"exported in clear: {leaked}"

def test_oversized_trace_refused_by_every_command(cli, tmp_path):
    """SECURITY.md: traces are size-capped (512 MiB) — for every command that reads one. A sparse
    file costs no disk; a command that reads it whole instead of refusing costs 513 MiB of RAM."""
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.write(b'{"format": "virtsave-trace", "version": 1, "pad": "')  # looks like a trace
        f.truncate(513 * 1024 * 1024)
    good = write_trace(tmp_path / "good.json", synthetic_trace())
    for args in (("replay", str(big)), ("export", str(big)), ("diff", str(good), str(big)), ("validate", str(big))):
        line = assert_clean_error(cli(*args))
        assert "512 MiB" in line or "too large" in line or "larger" in line, (args, line)
