"""Reliability scenarios 4 and 5: corrupt and hostile inputs through the real CLI.

No libvirtd is needed: a real QEMU migration stream is produced once per session by a tiny
QEMU (TCG, 32 MiB, no devices) started here and saved with ``virtsave direct save``, and the
corrupt variants are cut and flipped from that real image. Each bad input must give one clear
line on stderr (``virtsave: error: …``), exit 2, and never a traceback. Hostile traces must be
refused by ``virtsave replay`` before anything runs: the traced QEMU binary is a wrapper that
records every launch, and no image file may appear.

Guarantees checked (README "Reliability" section):
- corrupt/partial/foreign images → exit 2 with the problem (and where) in one line, from
  ``inspect``, ``diff``, ``restore`` and ``replay --phases restore``;
- malformed, foreign and future-version traces → exit 2 from ``validate``, ``diff``, ``replay``
  and ``export``;
- a libvirtd log with garbage lines → skipped (same trace as the clean log) or exit 2 when
  nothing is left;
- hostile traces (``exec:``, HMP, host-file chardevs, foreign fds, ``-object secret`` reading
  host files, ``..`` in image paths) → refused before launch, naming the item.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from virtsave.image import saveimage
from virtsave.trace import model as tr

REPO = Path(__file__).resolve().parent.parent.parent
FIX = REPO / "tests" / "fixtures"
#: Every command first repairs log settings left by a killed ``virtsave trace`` (anyone's) and says so:
#: that note is not part of the command's own error.
REPAIR_NOTE = "warning: restored libvirtd's log settings"
VIRTSAVE = [sys.executable, "-m", "virtsave.cli"]
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
#: The tiny machine both the session image and the synthetic traces use.
MACHINE = ["-machine", "pc,accel=tcg", "-m", "32", "-nodefaults", "-display", "none", "-no-user-config"]


# --------------------------------------------------------------------------- helpers


def assert_clean_error(proc: subprocess.CompletedProcess[str], *, allow_info: tuple[str, ...] = ()) -> str:
    """Exit 2, exactly one stderr line (the error), no traceback; returns that line.

    *allow_info*: prefixes of progress lines a command prints before it fails (reported as a
    finding in docs/reliability.md when used)."""
    err = proc.stderr
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith((*allow_info, REPAIR_NOTE))]
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr: {err!r}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err!r}"
    assert lines[0].startswith("virtsave: error: "), lines[0]
    return lines[0]


def _wait_path(p: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not p.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{p} never appeared")
        time.sleep(0.05)


@contextlib.contextmanager
def tiny_qemu(d: Path):
    """A paused 32 MiB TCG QEMU with its QMP on a Unix socket in *d*; killed afterwards."""
    sock = d / "qmp.sock"
    log = open(d / "qemu.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([QEMU, *MACHINE, "-S", "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        _wait_path(sock)
        yield f"unix:{sock}"
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="session")
def real_image(tmp_path_factory, cli) -> Path:
    """A real libvirt-format image (header + QEMU 10 stream) written by ``virtsave direct save``."""
    d = tmp_path_factory.mktemp("real-image")
    img = d / "good.save"
    with tiny_qemu(d) as qmp:
        cli("direct", "save", "--qmp", qmp, str(img), check=True)
    hdr = saveimage.read_header_path(img)
    assert not hdr.partial and img.stat().st_size > hdr.stream_offset + 1000
    return img


@pytest.fixture(scope="session")
def image_facts(real_image: Path, cli) -> dict:
    """inspect --json of the good image (stream offset, section offsets)."""
    proc = cli("inspect", "--json", str(real_image), check=True)
    return json.loads(proc.stdout)


def _variant(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    data = bytearray(src.read_bytes())
    data = edit(data)
    dst.write_bytes(bytes(data))
    return dst


def _flip(off: int, value: int | None = None):  # type: ignore[no-untyped-def]
    def edit(b: bytearray) -> bytearray:
        b[off] = (b[off] ^ 0xFF) if value is None else value
        return b
    return edit


def _put32(off: int, value: int):  # type: ignore[no-untyped-def]
    def edit(b: bytearray) -> bytearray:
        b[off:off + 4] = struct.pack("<I", value)
        return b
    return edit


def _stream_offset(real_image: Path) -> int:
    return saveimage.read_header_path(real_image).stream_offset


def _section_offset(facts: dict, name: str) -> int:
    """Absolute file offset of the first section called *name* (inspect reports stream-relative)."""
    for s in facts["stream"]["sections"]:
        if s["name"] == name:
            return int(s["offset"])
    raise AssertionError(f"no section {name} in {sorted(s['name'] for s in facts['stream']['sections'])}")


# Corrupt images: name → edit (applied to the good image). "header" ones are caught before any
# daemon or QEMU is involved; "stream" ones need the stream reader (inspect/diff) or QEMU (replay).
def _corruptions(real_image: Path, facts: dict) -> dict[str, tuple[str, object]]:
    so = _stream_offset(real_image)
    size = real_image.stat().st_size
    xml_len = len(saveimage.read_header_path(real_image).xml)
    timer = so + _section_offset(facts, "timer")
    return {
        "empty": ("header", lambda b: bytearray()),
        "truncated-in-header": ("header", lambda b: b[:50]),
        "truncated-in-xml": ("header", lambda b: b[:saveimage.HEADER_SIZE + 100]),
        "truncated-at-stream-start": ("stream", lambda b: b[:so + 2]),
        "truncated-mid-stream": ("stream", lambda b: b[:so + (size - so) // 2]),
        "truncated-in-devices": ("stream", lambda b: b[:so + _section_offset(facts, "cpu") + 100]),
        "truncated-vmdesc": ("vmdesc", lambda b: b[:size - 4096]),
        "flipped-magic": ("header", _flip(3)),
        "flipped-version": ("header", _put32(16, 7)),
        "huge-data-len": ("header", _put32(20, 0x7FFFFFF0)),
        "flipped-was-running": ("header", _put32(24, 0xFF)),
        "unknown-format": ("header", _put32(28, 99)),
        "cookie-beyond-data": ("header", _put32(32, 0x00FFFFFF)),
        "flipped-xml-start": ("header", _flip(saveimage.HEADER_SIZE + 1)),
        "xml-not-utf8": ("header", _flip(saveimage.HEADER_SIZE + xml_len // 2, 0xFF)),
        "xml-not-terminated": ("header", lambda b: b[:saveimage.HEADER_SIZE]
                               + bytearray(b"<domain>" + b"A" * (so - saveimage.HEADER_SIZE - 8)) + b[so:]),
        "flipped-qevm-magic": ("stream", _flip(so + 1)),
        "flipped-stream-version": ("stream", _flip(so + 7)),
        "flipped-section-type": ("stream", _flip(timer, 0x55)),
        "flipped-section-id": ("stream", _flip(timer + 4)),
    }


def _bad_image(tmp_path: Path, real_image: Path, facts: dict, name: str) -> tuple[str, Path]:
    kind, edit = _corruptions(real_image, facts)[name]
    return kind, _variant(real_image, tmp_path / f"{name}.save", edit)  # type: ignore[arg-type]


CORRUPTIONS = ["empty", "truncated-in-header", "truncated-in-xml", "truncated-at-stream-start",
               "truncated-mid-stream", "truncated-in-devices",
               "truncated-vmdesc", "flipped-magic", "flipped-version",
               "huge-data-len", "flipped-was-running", "unknown-format", "cookie-beyond-data",
               "flipped-xml-start", "xml-not-utf8", "xml-not-terminated", "flipped-qevm-magic",
               "flipped-stream-version", "flipped-section-type", "flipped-section-id"]


def _synthetic_trace(name: str = "vs-test-bad-input", argv0: str = QEMU) -> dict:
    """A valid trace of the tiny machine: libvirt's raw save and restore sequence (11.3 shape)."""
    t = tr.new_trace("libvirt", host={"libvirt": "11.3.0", "qemu": "10.0.2"},
                     domain={"name": name, "uuid": "8d7d5b3c-6b8e-4d8a-9d61-3f1f6f0c0a01",
                             "xml": f"<domain type='qemu'><name>{name}</name></domain>",
                             "argv": [argv0, *MACHINE]})
    save = tr.add_phase(t, "save", "managed-save")
    i = 0

    def cmd(execute: str, args: dict | None = None, fds: int | None = None) -> None:
        nonlocal i
        i += 1
        m = tr.command(execute, args, id=f"libvirt-{i}", fds=fds or 0, t=i * 0.001)
        save_or_restore["messages"].append(m)
        save_or_restore["messages"].append(tr.reply(f"libvirt-{i}", ret={}, t=i * 0.001))

    save_or_restore = save
    cmd("stop")
    cmd("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    cmd("getfd", {"fdname": "migrate"}, fds=1)
    cmd("migrate", {"uri": "fd:migrate", "detach": True, "resume": False})
    save["messages"].append(tr.event("MIGRATION", {"status": "completed"}, t=0.5))
    save["ok"] = True
    restore = tr.add_phase(t, "restore", "start")
    save_or_restore = restore
    cmd("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    cmd("migrate-incoming", {"uri": "fd:25", "exit-on-error": False})
    restore["messages"].append(tr.event("MIGRATION", {"status": "completed"}, t=0.6))
    cmd("cont")
    restore["ok"] = True
    assert tr.validate(t) == [], tr.validate(t)
    return t


def _write_trace(path: Path, t: dict) -> Path:
    path.write_text(json.dumps(t, indent=1))
    return path


# --------------------------------------------------------------------------- scenario 4: images


def test_good_image_passes_every_command(cli, tmp_path, real_image):
    """Control: the untouched image is accepted, so every failure below is caused by the damage."""
    assert cli("inspect", str(real_image)).returncode == 0
    assert cli("diff", str(real_image), str(real_image)).returncode == 0
    t = _write_trace(tmp_path / "t.json", _synthetic_trace())
    proc = cli("replay", str(t), "--phases", "restore", "--image", str(real_image), "-o", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    assert tr.load(tmp_path / "r.json")["phases"][0]["ok"] is True


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_image_inspect_and_diff(cli, tmp_path, real_image, image_facts, name):
    _kind, bad = _bad_image(tmp_path, real_image, image_facts, name)
    line = assert_clean_error(cli("inspect", str(bad)))
    assert "offset" in line or "truncated" in line or "empty" in line or "not a libvirt" in line, line
    assert_clean_error(cli("inspect", "--json", str(bad)))
    assert_clean_error(cli("diff", str(real_image), str(bad)))
    assert_clean_error(cli("diff", str(bad), str(real_image)))


#: Damage a header check sees (the others are in the stream: only its readers can see them).
HEADER_CORRUPTIONS = [n for n in CORRUPTIONS if n in (
    "empty", "truncated-in-header", "truncated-in-xml", "flipped-magic", "flipped-version", "huge-data-len",
    "flipped-was-running", "unknown-format", "cookie-beyond-data", "flipped-xml-start", "xml-not-utf8",
    "xml-not-terminated")]


@pytest.mark.parametrize("name", HEADER_CORRUPTIONS)
def test_corrupt_image_restore_refused_before_daemon(cli, tmp_path, real_image, image_facts, name):
    """``virtsave restore`` checks the header before asking libvirt: a bad header never reaches it.
    The URI points at a socket that does not exist, so reaching the daemon would show as another error."""
    kind, bad = _bad_image(tmp_path, real_image, image_facts, name)
    assert kind == "header"
    line = assert_clean_error(cli("-c", "qemu+unix:///system?socket=/nonexistent/sock", "restore", str(bad)))
    assert "connect" not in line, line


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n != "truncated-vmdesc"])
def test_corrupt_image_replay_restore(cli, tmp_path, real_image, image_facts, name):
    """The direct backend's restore refuses a bad header before launching, and a damaged stream
    fails the load (QEMU rejects it) with one line — never a phase claiming success."""
    _kind, bad = _bad_image(tmp_path, real_image, image_facts, name)
    t = _write_trace(tmp_path / "t.json", _synthetic_trace())
    out = tmp_path / "r.json"
    proc = cli("replay", str(t), "--phases", "restore", "--image", str(bad), "-o", str(out), timeout=120)
    assert_clean_error(proc, allow_info=("replaying ",))
    assert_no_false_success(out)


def assert_no_false_success(out: Path) -> None:
    """A failed replay may leave its trace as evidence, but no phase in it may claim success."""
    if out.exists():
        t = json.loads(out.read_text())
        assert all(p.get("ok") is not True for p in t.get("phases", [])), [
            (p["name"], p.get("ok")) for p in t["phases"]]


def _partial_image(tmp_path: Path, real_image: Path) -> Path:
    def edit(b: bytearray) -> bytearray:
        b[0:16] = saveimage.MAGIC_PARTIAL
        return b
    return _variant(real_image, tmp_path / "partial.save", edit)


def test_partial_image_refused_everywhere(cli, tmp_path, real_image):
    """A LibvirtQemudPart image (an unfinished save) is never treated as complete."""
    part = _partial_image(tmp_path, real_image)
    line = assert_clean_error(cli("inspect", str(part)))
    assert "partial" in line.lower(), line
    proc = cli("diff", str(real_image), str(part))
    if proc.returncode == 1:  # reported as a header difference: acceptable, if it says so
        assert "LibvirtQemudPart" in proc.stdout and "Traceback" not in proc.stderr, proc
    else:
        assert_clean_error(proc)
    assert_clean_error(cli("-c", "qemu+unix:///system?socket=/nonexistent/sock", "restore", str(part)))
    t = _write_trace(tmp_path / "t.json", _synthetic_trace())
    line = assert_clean_error(cli("replay", str(t), "--phases", "restore", "--image", str(part)),
                              allow_info=("replaying ",))
    assert "partial" in line.lower(), line
    # ...but it can be looked at on purpose, and then it says it is partial.
    proc = cli("--json", "inspect", "--allow-partial", str(part))
    if proc.returncode == 0:
        assert json.loads(proc.stdout)["header"]["partial"] is True


@pytest.mark.parametrize("content", [b"", b"hello, I am not an image\n", os.urandom(4096),
                                     b'{"format": "virtsave-trace"}', b"\x7fELF" + b"\0" * 200, b"QEVM\0\0\0\3"])
def test_non_image_file(cli, tmp_path, real_image, content):
    f = tmp_path / "not-an-image"
    f.write_bytes(content)
    assert_clean_error(cli("inspect", str(f)))
    assert_clean_error(cli("-c", "qemu+unix:///system?socket=/nonexistent/sock", "restore", str(f)))
    t = _write_trace(tmp_path / "t.json", _synthetic_trace())
    assert_clean_error(cli("replay", str(t), "--phases", "restore", "--image", str(f)), allow_info=("replaying ",))
    proc = cli("diff", str(real_image), str(f))
    assert_clean_error(proc)


def test_missing_and_unreadable_image(cli, tmp_path):
    assert_clean_error(cli("inspect", str(tmp_path / "nope.save")))
    assert_clean_error(cli("inspect", str(tmp_path)))  # a directory
    assert_clean_error(cli("-c", "qemu+unix:///system?socket=/nonexistent/sock", "restore", str(tmp_path / "nope")))


def test_xml_external_entity_not_resolved(cli, tmp_path, real_image):
    """The domain XML of an image is untrusted: an external entity must not pull in a host file."""
    secret = tmp_path / "host-secret.txt"
    secret.write_text("HOST-FILE-CONTENT-4242\n")
    xml = (f'<?xml version="1.0"?><!DOCTYPE domain [<!ENTITY x SYSTEM "file://{secret}">]>'
           "<domain type='qemu'><name>&x;</name><description>&x;</description></domain>")
    # '<?xml' is not '<domain': the header reader may refuse it outright — also fine.
    stream = real_image.read_bytes()[_stream_offset(real_image):]
    blob = saveimage.encode_header(xml, None, partial=False) + stream
    img = tmp_path / "xxe.save"
    img.write_bytes(blob)
    for args in (("inspect", str(img)), ("--json", "inspect", str(img)), ("diff", str(real_image), str(img))):
        proc = cli(*args)
        assert "HOST-FILE-CONTENT" not in proc.stdout + proc.stderr, args
        assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- scenario 4: traces


def _bad_traces(tmp_path: Path) -> dict[str, Path]:
    good = _synthetic_trace()
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
    good = _write_trace(tmp_path / "good.json", _synthetic_trace())
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
    t = _synthetic_trace()
    t["version"] = tr.VERSION + 1
    p = _write_trace(tmp_path / "future.json", t)
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
def qemu_wrapper(tmp_path: Path) -> tuple[Path, Path]:
    """A QEMU 'binary' that records every invocation (except ``--version``) and then runs QEMU.

    Used as the traced argv[0]: if replay launches anything, the record shows it."""
    record = tmp_path / "launches.txt"
    wrapper = tmp_path / "qemu-system-x86_64"
    wrapper.write_text(f"""#!/bin/sh
if [ "$1" != "--version" ]; then echo "$*" >> {record}; fi
exec {QEMU} "$@"
""")
    wrapper.chmod(0o755)
    return wrapper, record


def _hostile(kind: str, wrapper: Path, tmp_path: Path) -> tuple[dict, str]:
    """A trace with one hostile item, and the text the refusal must name."""
    t = _synthetic_trace(argv0=str(wrapper))
    save = t["phases"][0]
    restore = t["phases"][1]
    argv = t["domain"]["argv"]
    victim = tmp_path / "victim"
    if kind == "exec-migrate":
        m = next(m for m in save["messages"] if m.get("execute") == "migrate")
        m["arguments"]["uri"] = f"exec:touch {victim}"
        return t, "exec:"
    if kind == "exec-incoming":
        m = next(m for m in restore["messages"] if m.get("execute") == "migrate-incoming")
        m["arguments"]["uri"] = f"exec:cat /etc/shadow > {victim}"
        return t, "exec:"
    if kind == "exec-argv":
        argv += ["-incoming", f"exec:touch {victim}"]
        return t, "exec:"
    if kind == "hmp":
        save["messages"].insert(0, tr.command("human-monitor-command",
                                              {"command-line": f"migrate exec:touch {victim}"}, id="x-1"))
        return t, "human-monitor-command"
    if kind == "file-chardev":
        argv += ["-chardev", f"file,id=steal,path={victim}", "-device", "isa-serial,chardev=steal"]
        return t, "file"
    if kind == "pipe-chardev":
        argv += ["-chardev", f"pipe,id=p0,path={victim}"]
        return t, "pipe"
    if kind == "socket-chardev-host-path":
        argv += ["-chardev", f"socket,id=s0,path={victim},server=on,wait=off"]
        return t, "socket"
    if kind == "add-fd":
        argv += ["-add-fd", "set=9,fd=3,opaque=foreign"]
        return t, "add-fd"
    if kind == "fd-reference":
        argv += ["-chardev", "socket,id=foreign,fd=5"]
        return t, "fd="
    if kind == "netdev-script":
        argv += ["-netdev", f"tap,id=n0,script={victim},downscript=no"]
        return t, "script="
    if kind == "secret-host-file":
        argv += ["-object", json.dumps({"qom-type": "secret", "id": "s1", "format": "raw", "file": "/etc/shadow"})]
        return t, "/etc/shadow"
    if kind == "secret-host-file-keyval":
        argv += ["-object", "secret,id=s2,file=/root/.ssh/id_rsa"]
        return t, "/root/.ssh/id_rsa"
    if kind == "image-path-traversal":
        save["image"] = {"path": "/var/lib/libvirt/qemu/save/../../../../etc/cron.d/evil", "size": 1, "header": None}
        return t, ".."
    if kind == "migrate-file-traversal":
        m = next(m for m in save["messages"] if m.get("execute") == "migrate")
        m["arguments"]["uri"] = "file:/var/tmp/../../etc/cron.d/evil,offset=0x400"
        return t, ".."
    if kind == "extra-qmp-monitor":
        argv += ["-qmp", f"unix:{victim},server=on,wait=off"]
        return t, "-qmp"
    raise AssertionError(kind)


HOSTILE = ["exec-migrate", "exec-incoming", "exec-argv", "hmp", "file-chardev", "pipe-chardev",
           "socket-chardev-host-path", "add-fd", "fd-reference", "netdev-script", "secret-host-file",
           "secret-host-file-keyval", "image-path-traversal", "migrate-file-traversal", "extra-qmp-monitor"]


def _qemu_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_trace_refused_before_anything_runs(cli, tmp_path, qemu_wrapper, kind):
    wrapper, record = qemu_wrapper
    t, item = _hostile(kind, wrapper, tmp_path)
    assert tr.validate(t) == [], tr.validate(t)  # hostile, but well-formed
    path = _write_trace(tmp_path / f"{kind}.json", t)
    image = tmp_path / "out.save"
    out = tmp_path / "r.json"
    before = _qemu_pids()
    proc = cli("replay", str(path), "--image", str(image), "-o", str(out), "--run-for", "0", timeout=120)
    new = _qemu_pids() - before
    line = assert_clean_error(proc)
    assert "unsafe" in line.lower() or "refus" in line.lower(), line
    assert item in line, f"refusal does not name {item!r}: {line}"
    assert "allow-unsafe" in line, line
    assert not record.exists(), f"QEMU was launched: {record.read_text()}"
    assert not any(str(wrapper) in _cmdline(p) for p in new), "a QEMU from this trace is running"
    assert not image.exists() and not out.exists() and not (tmp_path / "victim").exists()
    # the same trace checked by the library says the same (and names the item)
    from virtsave.qemu import replay

    findings = replay.check_safety(t, allow_unsafe=True)
    assert any(item in f for f in findings), findings


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_allow_unsafe_lets_a_flagged_trace_through_the_check(tmp_path, qemu_wrapper):
    """--allow-unsafe turns the refusal into warnings (findings returned, nothing raised)."""
    from virtsave.qemu import replay

    wrapper, _ = qemu_wrapper
    t, item = _hostile("hmp", wrapper, tmp_path)
    with pytest.raises(Exception) as ei:
        replay.check_safety(t, allow_unsafe=False)
    assert item in str(ei.value)
    assert any(item in f for f in replay.check_safety(t, allow_unsafe=True))


def test_clean_trace_has_no_findings(tmp_path):
    """Control for the hostile cases: libvirt's own sequence and the master-key secret are fine."""
    from virtsave.qemu import replay

    t = _synthetic_trace()
    t["domain"]["argv"] += ["-object", json.dumps({"qom-type": "secret", "id": "masterKey0", "format": "raw",
                                                   "file": "/var/lib/libvirt/qemu/domain-1-x/master-key.aes"})]
    assert replay.check_safety(t) == []


# --------------------------------------------------------------------------- scenario 6 (no daemon part)


def test_private_files_even_with_umask_000(tmp_path, real_image):
    """Traces and images virtsave writes are 0600 whatever the umask (direct save, replay -o, export -o)."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VIRTSAVE, *args], capture_output=True, text=True, cwd=REPO, umask=0, timeout=300)

    img = tmp_path / "umask.save"
    with tiny_qemu(tmp_path) as qmp:
        proc = run("direct", "save", "--qmp", qmp, str(img))
    assert proc.returncode == 0, proc.stderr
    t = _write_trace(tmp_path / "t.json", _synthetic_trace())
    out = tmp_path / "r.json"
    proc = run("replay", str(t), "--phases", "restore", "--image", str(real_image), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    rep = tmp_path / "t.replies"
    proc = run("export", str(t), "--format", "replies", "-o", str(rep))
    assert proc.returncode == 0, proc.stderr
    for p in (img, out, rep):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, (p, oct(p.stat().st_mode))


def test_allow_unsafe_warns_naming_the_item(cli, tmp_path, qemu_wrapper):
    """SECURITY.md: ``--allow-unsafe`` turns the refusal into a *warning* — the replay runs, and
    stderr still names what the check found. (HMP ``info status`` is harmless to actually run.)"""
    wrapper, record = qemu_wrapper
    t = _synthetic_trace(argv0=str(wrapper))
    t["phases"][0]["messages"].insert(0, tr.command("human-monitor-command", {"command-line": "info status"},
                                                    id="x-1"))
    path = _write_trace(tmp_path / "hmp.json", t)
    img = tmp_path / "x.save"
    proc = cli("replay", str(path), "--allow-unsafe", "--phases", "save", "--run-for", "0", "--image", str(img),
               "-o", str(tmp_path / "r.json"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert record.exists()  # it did run
    assert saveimage.read_header_path(img).partial is False
    assert "human-monitor-command" in proc.stderr and "warn" in proc.stderr.lower(), \
        f"--allow-unsafe replayed silently, no warning naming the finding: {proc.stderr!r}"


def test_plugin_and_extra_monitor_refused(cli, tmp_path, qemu_wrapper):
    wrapper, record = qemu_wrapper
    t = _synthetic_trace(argv0=str(wrapper))
    t["domain"]["argv"] += ["-plugin", "/tmp/evil.so"]
    line = assert_clean_error(cli("replay", str(_write_trace(tmp_path / "p.json", t)), "--image",
                                  str(tmp_path / "x.save")))
    assert "-plugin" in line or "evil.so" in line, line
    assert not record.exists() and not (tmp_path / "x.save").exists()


SECRETS = ["VNCPW123", "SPICEPW1", "ARGVSECRETDATA", "JSONSECRETDATA", "SPICEOPTPW", "QMPSECRETDATA",
           "QMPVNCPW", "CHGVNCPW"]


def test_redaction_covers_what_security_md_lists(cli, tmp_path):
    """Every secret kind SECURITY.md names is redacted by ``virtsave.trace.redact`` and never reaches a
    ``virtsave export --format replies`` output (export works from the redacted trace)."""
    from virtsave.trace import redact

    t = _synthetic_trace()
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
    path = _write_trace(tmp_path / "unredacted.json", t)
    proc = cli("export", str(path), "--format", "replies")
    assert proc.returncode == 0, proc.stderr
    assert "set_password" in proc.stdout  # control: the command itself is exported
    leaked = [s for s in SECRETS if s in proc.stdout + proc.stderr]
    assert not leaked, f"exported in clear: {leaked}"


def test_cookie_external_entity_not_resolved(cli, tmp_path, real_image):
    """The cookie XML (unlike the domain XML) need not start with '<domain': an external entity
    there must not pull a host file into inspect's output."""
    secret = tmp_path / "host-secret.txt"
    secret.write_text("HOST-FILE-CONTENT-4343\n")
    cookie = (f'<?xml version="1.0"?><!DOCTYPE cookie [<!ENTITY x SYSTEM "file://{secret}">]>'
              "<cookie><cpu>&x;</cpu></cookie>")
    stream = real_image.read_bytes()[_stream_offset(real_image):]
    img = tmp_path / "xxe-cookie.save"
    img.write_bytes(saveimage.encode_header("<domain type='qemu'><name>c</name></domain>", cookie,
                                            partial=False) + stream)
    for args in (("inspect", str(img)), ("--json", "inspect", str(img)), ("diff", str(real_image), str(img))):
        proc = cli(*args)
        assert "HOST-FILE-CONTENT" not in proc.stdout + proc.stderr, args
        assert "Traceback" not in proc.stderr


def test_oversized_trace_refused_by_every_command(cli, tmp_path):
    """SECURITY.md: traces are size-capped (512 MiB) — for every command that reads one. A sparse
    file costs no disk; a command that reads it whole instead of refusing costs 513 MiB of RAM."""
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.write(b'{"format": "virtsave-trace", "version": 1, "pad": "')  # looks like a trace
        f.truncate(513 * 1024 * 1024)
    good = _write_trace(tmp_path / "good.json", _synthetic_trace())
    for args in (("replay", str(big)), ("export", str(big)), ("diff", str(good), str(big)), ("validate", str(big))):
        line = assert_clean_error(cli(*args))
        assert "512 MiB" in line or "too large" in line or "larger" in line, (args, line)


def test_cookie_entity_expansion_bomb(cli, tmp_path, real_image):
    """A 'billion laughs' cookie is refused quickly with one line (libxml2's amplification limit),
    not expanded into gigabytes."""
    ents = '<!ENTITY a0 "LOLLOLLOLLOL">' + "".join(
        f'<!ENTITY a{i} "' + f"&a{i - 1};" * 10 + '">' for i in range(1, 10))
    cookie = f'<?xml version="1.0"?><!DOCTYPE cookie [{ents}]><cookie><cpu>&a9;</cpu></cookie>'
    stream = real_image.read_bytes()[_stream_offset(real_image):]
    img = tmp_path / "lol.save"
    img.write_bytes(saveimage.encode_header("<domain type='qemu'><name>c</name></domain>", cookie,
                                            partial=False) + stream)
    proc = cli("inspect", str(img), timeout=60)
    assert "LOLLOLLOL" not in proc.stdout
    if proc.returncode != 0:
        assert_clean_error(proc)
