"""Reliability scenarios 4 and 6 on real images: corrupt, partial and hostile save images through the
real CLI, and files written 0600 whatever the umask.

A real QEMU migration stream is produced once per session by a tiny QEMU (TCG, 32 MiB, no devices)
started here and saved with ``virtsave direct save``; the corrupt variants are cut and flipped from
that real image. Each bad input must give one clear line on stderr (``virtsave: error: …``), exit 2,
and never a traceback — from ``inspect``, ``diff``, ``restore`` (checked before the daemon is asked)
and ``replay --phases restore`` (which launches QEMU), run in-process. No libvirtd is needed; these tests live here
because they launch QEMU (moved from tests/unit/test_bad_inputs.py, whose trace, log and hostile-trace
cases stay unit tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from badinput import (
    MACHINE,
    QEMU,
    REPO,
    VIRTSAVE,
    assert_clean_error,
    kill_recorded,
    make_qemu_wrapper,
    synthetic_trace,
    write_trace,
)
from inprocess import CliResult, run_cli_inprocess

from virtsave.image import saveimage
from virtsave.trace import model as tr

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def cli() -> Callable[..., CliResult]:
    """In-process: these commands need no process of their own (the umask test below runs the
    real console script; test_cli.py's smoke tests cover the entry point)."""
    return run_cli_inprocess


@pytest.fixture
def qemu_wrapper(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    wrapper, record = make_qemu_wrapper(tmp_path)
    yield wrapper, record
    kill_recorded(record)


# --------------------------------------------------------------------------- a real image


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

def test_good_image_passes_every_command(cli, tmp_path, real_image):
    """Control: the untouched image is accepted, so every failure below is caused by the damage."""
    assert cli("inspect", str(real_image)).returncode == 0
    assert cli("diff", str(real_image), str(real_image)).returncode == 0
    t = write_trace(tmp_path / "t.json", synthetic_trace())
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
    kind, bad = _bad_image(tmp_path, real_image, image_facts, name)
    t = write_trace(tmp_path / "t.json", synthetic_trace())
    out = tmp_path / "r.json"
    proc = cli("replay", str(t), "--phases", "restore", "--image", str(bad), "-o", str(out), timeout=120)
    if kind == "header":    # refused before anything started: no "replaying" line, no trace written
        assert_clean_error(proc)
        assert not out.exists(), "a trace was written for a replay refused before it started"
    else:                   # QEMU ran and refused the stream: the trace is the evidence, and it says so
        assert_clean_error(proc, allow_info=("replaying ",))
        assert [(p["name"], p["ok"]) for p in tr.load(out)["phases"]] == [("restore", False)]


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
    for a, b in ((real_image, part), (part, real_image)):   # diff refuses it too, whichever side it is on
        line = assert_clean_error(cli("diff", str(a), str(b)))
        assert "partial" in line.lower(), line
    assert_clean_error(cli("-c", "qemu+unix:///system?socket=/nonexistent/sock", "restore", str(part)))
    t = write_trace(tmp_path / "t.json", synthetic_trace())
    line = assert_clean_error(cli("replay", str(t), "--phases", "restore", "--image", str(part)),
                              allow_info=("replaying ",))
    assert "partial" in line.lower(), line
    # ...but it can be looked at on purpose, and then it says it is partial.
    proc = cli("--json", "inspect", "--allow-partial", str(part))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["header"]["partial"] is True and info["stream"]["complete"] is True


@pytest.mark.parametrize("content", [b"", b"hello, I am not an image\n", os.urandom(4096),
                                     b'{"format": "virtsave-trace"}', b"\x7fELF" + b"\0" * 200, b"QEVM\0\0\0\3"])
def test_non_image_file(cli, tmp_path, real_image, content):
    f = tmp_path / "not-an-image"
    f.write_bytes(content)
    assert_clean_error(cli("inspect", str(f)))
    assert_clean_error(cli("-c", "qemu+unix:///system?socket=/nonexistent/sock", "restore", str(f)))
    t = write_trace(tmp_path / "t.json", synthetic_trace())
    assert_clean_error(cli("replay", str(t), "--phases", "restore", "--image", str(f)), allow_info=("replaying ",))
    proc = cli("diff", str(real_image), str(f))
    assert_clean_error(proc)

def _entity_xml(root: str, file: Path, inner: str) -> str:
    return (f'<?xml version="1.0"?><!DOCTYPE {root} [<!ENTITY x SYSTEM "file://{file}">]>'
            f"<{root}>{inner}</{root}>")


def _with_header(real_image: Path, dst: Path, xml: str, cookie: str | None) -> Path:
    """The real image's QEMU stream behind a new header holding *xml* and *cookie*."""
    stream = real_image.read_bytes()[_stream_offset(real_image):]
    dst.write_bytes(saveimage.encode_header(xml, cookie, partial=False) + stream)
    return dst


@pytest.fixture
def host_files(tmp_path: Path) -> tuple[Path, Path]:
    """A host file of well-formed text (its content must never show) and one no parser could include."""
    text, broken = tmp_path / "host-secret.txt", tmp_path / "host-broken.txt"
    text.write_text("HOST-FILE-CONTENT-4242\n")
    broken.write_text("HOST-FILE-CONTENT-4242 <unclosed\n")
    return text, broken


def test_xml_external_entity_not_resolved(cli, tmp_path, real_image, host_files, monkeypatch):
    """The domain XML of an image is untrusted. A DOCTYPE (where an entity is declared) cannot come
    before ``<domain``: the header reader refuses it, exit 2, one line. With that check bypassed, the
    parsers of ``inspect`` and ``diff`` leave the entity a reference: no host file is read, exit 0/1."""
    text, broken = host_files
    img = _with_header(real_image, tmp_path / "xxe.save",
                       _entity_xml("domain", text, "<name>&x;</name><description>&x;</description>"), None)
    for args in (("inspect", str(img)), ("--json", "inspect", str(img)), ("diff", str(real_image), str(img))):
        proc = cli(*args)
        line = assert_clean_error(proc)
        assert "does not start with a <domain> element" in line and "offset 92" in line, (args, line)
        assert "HOST-FILE-CONTENT" not in proc.stdout + proc.stderr, args

    def lenient(data: bytes, cookie_offset: int) -> tuple[str, str | None]:
        return data[:data.find(b"\0")].decode(), None

    monkeypatch.setattr(saveimage, "_decode_data", lenient)
    bad = _with_header(real_image, tmp_path / "xxe-broken.save", _entity_xml("domain", broken, "<name>&x;</name>"),
                       None)
    out = []
    for args, rc in ((("inspect", str(img)), 0), (("--json", "inspect", str(img)), 0), (("inspect", str(bad)), 0),
                     (("diff", str(real_image), str(img)), 1)):
        proc = cli(*args)
        assert proc.returncode == rc, (args, proc.returncode, proc.stderr)
        out.append(proc.stdout + proc.stderr)
    assert json.loads(cli("--json", "inspect", str(img)).stdout)["domain"]["name"] == ""
    assert "<name>&x;</name>" in out[-1], out[-1]
    assert not any("HOST-FILE-CONTENT" in o for o in out)


def test_cookie_external_entity_not_resolved(cli, tmp_path, real_image, host_files):
    """The cookie XML (unlike the domain XML) need not start with '<domain': its DOCTYPE reaches the
    parsers of ``inspect`` and ``diff`` through the CLI. The entity is never resolved: ``inspect`` exits 0
    even when the entity's file is not well-formed, and ``diff`` shows the reference itself."""
    text, broken = host_files
    xml = "<domain type='qemu'><name>c</name></domain>"
    img = _with_header(real_image, tmp_path / "xxe-cookie.save", xml, _entity_xml("cookie", text, "<cpu>&x;</cpu>"))
    bad = _with_header(real_image, tmp_path / "xxe-cookie-broken.save", xml,
                       _entity_xml("cookie", broken, "<cpu>&x;</cpu>"))
    out = []
    for args, rc in ((("inspect", str(img)), 0), (("--json", "inspect", str(img)), 0), (("inspect", str(bad)), 0),
                     (("diff", str(real_image), str(img)), 1), (("diff", str(real_image), str(bad)), 1)):
        proc = cli(*args)
        assert proc.returncode == rc, (args, proc.returncode, proc.stderr)
        out.append(proc.stdout + proc.stderr)
    assert "+   <cpu>&x;</cpu>" in out[3], out[3]
    assert not any("HOST-FILE-CONTENT" in o for o in out)


def test_cookie_entity_expansion_bomb(cli, tmp_path, real_image):
    """A 'billion laughs' cookie is refused quickly with one line (libxml2's amplification limit),
    not expanded into gigabytes."""
    ents = '<!ENTITY a0 "LOLLOLLOLLOL">' + "".join(
        f'<!ENTITY a{i} "' + f"&a{i - 1};" * 10 + '">' for i in range(1, 10))
    cookie = f'<?xml version="1.0"?><!DOCTYPE cookie [{ents}]><cookie><cpu>&a9;</cpu></cookie>'
    img = _with_header(real_image, tmp_path / "lol.save", "<domain type='qemu'><name>c</name></domain>", cookie)
    proc = cli("inspect", str(img), timeout=60)
    line = assert_clean_error(proc)
    assert "cookie is not well-formed XML" in line and "amplification" in line, line
    assert "LOLLOLLOL" not in proc.stdout


# --------------------------------------------------------------------------- scenario 6 (no daemon part)


def test_private_files_even_with_umask_000(tmp_path, real_image):
    """Traces and images virtsave writes are 0600 whatever the umask (direct save, replay -o, export -o)."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VIRTSAVE, *args], capture_output=True, text=True, cwd=REPO, umask=0, timeout=300)

    img = tmp_path / "umask.save"
    with tiny_qemu(tmp_path) as qmp:
        proc = run("direct", "save", "--qmp", qmp, str(img))
    assert proc.returncode == 0, proc.stderr
    t = write_trace(tmp_path / "t.json", synthetic_trace())
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
    t = synthetic_trace(argv0=str(wrapper))
    t["phases"][0]["messages"].insert(0, tr.command("human-monitor-command", {"command-line": "info status"},
                                                    id="x-1"))
    path = write_trace(tmp_path / "hmp.json", t)
    img = tmp_path / "x.save"
    proc = cli("replay", str(path), "--allow-unsafe", "--phases", "save", "--run-for", "0", "--image", str(img),
               "-o", str(tmp_path / "r.json"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert record.exists()  # it did run
    assert saveimage.read_header_path(img).partial is False
    assert "human-monitor-command" in proc.stderr and "warn" in proc.stderr.lower(), \
        f"--allow-unsafe replayed silently, no warning naming the finding: {proc.stderr!r}"
