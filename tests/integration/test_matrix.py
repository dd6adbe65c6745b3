"""Upgrade checks on real QEMU builds side by side: the system's QEMU 10 and Debian 12's QEMU 7.2
(``scripts/setup --extra-qemu debian12``, a private prefix).

One full ``virtsave matrix`` run (module scope) covers the shipped corpus (libvirt 9.0 and 11.3
sequences), a fresh ``virtsave trace`` of a libvirt guest, that guest's fresh managed-save image
(libvirt 11.3 + QEMU 10) and a fresh image from each build saved with ``virtsave direct save``
(QEMU 7.2 and QEMU 10 started by hand with the test guest's kernel). Guests are 128 MiB; every
QEMU and domain made here is removed, also on failure.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import tempfile
import uuid as _uuid
from pathlib import Path
from xml.etree import ElementTree as ET

import libvirt
import pytest
from conftest import QEMU_VERSION, URI, run_cli

from virtsave.harness import guest
from virtsave.image import saveimage
from virtsave.qemu import builds

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parent.parent.parent / "virtsave" / "harness" / "corpus"


def _debian12() -> builds.QemuBuild | None:
    return next((b for b in builds.discover(system=None) if b.name == "debian12" and not b.error), None)


DEBIAN12 = _debian12()
SYSTEM = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"


def _two_generations_missing() -> str | None:
    """Why this host lacks the two QEMU generations these tests compare (the system's QEMU 10, Debian 12's
    7.2 beside it), or None."""
    if DEBIAN12 is None:
        return "needs the debian12 QEMU build beside the system's (scripts/setup --extra-qemu debian12)"
    if QEMU_VERSION is None or QEMU_VERSION < (9, 0, 0):
        return (f"needs a QEMU >= 9 as the system's build to compare with 7.2; this stack's system QEMU is "
                f"{'.'.join(map(str, QEMU_VERSION or ()))} (the debian12 stack: run on the current stack)")
    return None


needs_debian12 = pytest.mark.skipif(_two_generations_missing() is not None,
                                    reason=_two_generations_missing() or "")


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _zstd_copy(src: Path, dst: Path) -> None:
    """*src* as libvirt writes a ``--image-format zstd`` image: same header, the stream through zstd."""
    hdr = saveimage.read_header_path(src)
    with open(dst, "wb") as out:
        out.write(saveimage.encode_header(hdr.xml, hdr.cookie, was_running=hdr.was_running, image_format="zstd",
                                          partial=False))
        out.flush()
        with open(src, "rb") as f:
            f.seek(hdr.stream_offset)
            subprocess.run(["zstd", "-q", "-1", "-c"], stdin=f, stdout=out, check=True)


def _direct_image(binary: str, machine: str, out: Path, work: Path, *extra: str) -> None:
    """Start *binary* by hand with the test guest (machine *machine*), let it tick, direct-save it."""
    name = guest.unique_name("vs-test-mx")
    uid = str(_uuid.uuid4())
    xml = guest.guest_xml(name, 128, 8, domain_uuid=uid).replace("machine='pc'", f"machine='{machine}'")
    (work / f"{name}.xml").write_text(xml)
    serial, sock = work / f"{name}.serial", work / f"{name}.qmp"
    g = guest.GUEST_DIR
    argv = [binary, "-name", f"guest={name}", "-machine", f"{machine},usb=off,acpi=off", "-accel", guest.accel(),
            "-cpu", "qemu64", "-m", "128", "-smp", "1", "-uuid", uid, "-display", "none", "-no-user-config",
            "-nodefaults", "-no-shutdown", "-kernel", f"{g}/vmlinuz", "-initrd", f"{g}/initrd.gz",
            "-append", "console=ttyS0 quiet panic=-1 virtsave.fill=8",
            "-device", "piix3-usb-uhci,id=usb,bus=pci.0,addr=0x1.0x2",
            "-chardev", f"file,id=charserial0,path={serial}", "-device", "isa-serial,chardev=charserial0,id=serial0",
            "-qmp", f"unix:{sock},server=on,wait=off"]
    q = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.monotonic() + 120
        while b"tick 2" not in (serial.read_bytes() if serial.exists() else b""):
            assert q.poll() is None, f"{binary} exited with {q.returncode}"
            assert time.monotonic() < deadline, f"guest on {binary} never ticked"
            time.sleep(0.2)
        p = run_cli("direct", "save", "--qmp", f"unix:{sock}", str(out), "--xml", str(work / f"{name}.xml"), *extra)
        assert p.returncode == 0, p.stderr
        assert q.wait(30) == 0
    finally:
        if q.poll() is None:
            q.send_signal(signal.SIGKILL)
            q.wait()


@pytest.fixture(scope="module")
def full_run():
    """Everything the acceptance asks for, in one ``virtsave matrix`` run."""
    if _two_generations_missing():
        pytest.skip(_two_generations_missing())
    work = Path(tempfile.mkdtemp(prefix="vs-test-matrix-", dir="/var/tmp"))
    work.chmod(0o755)
    conn = libvirt.open(URI)
    name = guest.unique_name("vs-test-mx")
    try:
        img72, img10 = work / "q72.save", work / "q10.save"
        _direct_image(DEBIAN12.path, "pc-i440fx-7.2", img72, work)
        _direct_image(SYSTEM, "pc-i440fx-10.0", img10, work)
        # QEMU 10 with the older machine type: raw (a downgrade that works) and sparse (mapped-ram).
        img10m72, sparse = work / "q10-m72.save", work / "q10-m72-sparse.save"
        _direct_image(SYSTEM, "pc-i440fx-7.2", img10m72, work)
        _direct_image(SYSTEM, "pc-i440fx-7.2", sparse, work, "--image-format", "sparse")
        zst = work / "q72.zst.save"
        _zstd_copy(img72, zst)
        guest.create(conn, name, memory_mib=128, fill_mib=8)
        guest.wait_tick(name, 2, timeout=120)
        traces = work / "traces"
        traces.mkdir()
        p = run_cli("trace", name, "-o", str(traces / "fresh-libvirt.json"))
        assert p.returncode == 0, p.stderr
        guest.wait_tick(name, guest.last_tick(name) + 1, timeout=60)
        conn.lookupByName(name).managedSave(0)
        managed = Path(f"/var/lib/libvirt/qemu/save/{name}.save")
        images = [img72, img10, managed, img10m72, sparse, zst]
        before = {str(i): _sha(i) for i in images}
        out = {k: work / f"m.{k}" for k in ("json", "xml", "html")}
        p = run_cli("matrix", "--traces", str(traces), *(a for i in images for a in ("--images", str(i))),
                    "-o", str(out["json"]), "--junit", str(out["xml"]), "--html", str(out["html"]))
        after = {str(i): _sha(i) for i in images}
        data = json.loads(out["json"].read_text())
        yield {"proc": p, "data": data, "out": out, "before": before, "after": after, "images": images,
               "img72": str(img72.resolve()), "img10": str(img10.resolve()), "managed": str(managed.resolve()),
               "img10m72": str(img10m72.resolve()), "sparse": str(sparse.resolve()), "zstd": str(zst.resolve()),
               "work": work}
    finally:
        guest.remove(conn, name)
        conn.close()
        shutil.rmtree(work, ignore_errors=True)


def _cell(data: dict, row: str, build: str, mode: str) -> dict:
    found = [c for c in data["cells"] if c["row"] == row and c["build"] == build and c["mode"] == mode]
    assert len(found) == 1, (row, build, mode, [c["key"] for c in data["cells"]])
    return found[0]


@needs_debian12
def test_qemus_lists_both_builds_with_their_machine_types(cli):
    p = cli("--json", "qemus")
    assert p.returncode == 0, p.stderr
    found = {b["name"]: b for b in json.loads(p.stdout)}
    assert found["system"]["version"].startswith("10.") and found["debian12"]["version"].startswith("7.2.")
    for b in found.values():
        assert "tcg" in b["accelerators"]
    m72 = {m["name"]: m for m in found["debian12"]["machines"]}
    m10 = {m["name"]: m for m in found["system"]["machines"]}
    assert "pc-i440fx-7.2" in m72 and "pc-i440fx-10.0" not in m72 and m72["pc"]["alias_of"] == "pc-i440fx-7.2"
    assert "pc-i440fx-7.2" in m10 and any(m["deprecated"] for m in m10.values())


@needs_debian12
def test_run_prints_the_table_and_writes_every_report(full_run):
    p = full_run["proc"]
    assert p.returncode == 0, p.stderr
    assert "virtsave upgrade check" in p.stdout and "debian12" in p.stdout and "QEMU 7.2" in p.stdout
    data = full_run["data"]
    assert {b["name"] for b in data["builds"]} >= {"system", "debian12"}
    assert all(full_run["out"][k].stat().st_size > 0 for k in ("json", "xml", "html"))
    assert oct(full_run["out"]["json"].stat().st_mode & 0o777) == "0o600"


@needs_debian12
def test_images_are_never_changed(full_run):
    assert full_run["before"] == full_run["after"]


@needs_debian12
def test_a_72_image_loads_on_10_and_on_72(full_run):
    data = full_run["data"]
    for build in ("system", "debian12"):
        c = _cell(data, full_run["img72"], build, "restore")
        assert c["status"] == "loads", c
        assert c["details"]["qemu_status"] == "paused" and c["machine_support"] == "ok"
    assert _cell(data, full_run["img72"], "system", "restore")["details"]["argv_source"] == "libvirt domxml-to-native"


@needs_debian12
def test_a_10_image_is_refused_by_72_with_qemus_reason(full_run):
    data = full_run["data"]
    for img in (full_run["img10"], full_run["managed"]):
        assert _cell(data, img, "system", "restore")["status"] == "loads"
        c = _cell(data, img, "debian12", "restore")
        assert c["status"] == "refuses" and "unsupported machine type" in c["reason"], c
        assert c["machine_support"] == "missing"
    assert any("debian12" in n and "lacks machine type pc-i440fx-10.0" in n for n in data["notes"])


@needs_debian12
def test_a_10_image_with_the_72_machine_type_loads_on_72_unless_sparse(full_run):
    data = full_run["data"]
    for build in ("system", "debian12"):
        assert _cell(data, full_run["img10m72"], build, "restore")["status"] == "loads"
    assert _cell(data, full_run["sparse"], "system", "restore")["status"] == "loads"
    c = _cell(data, full_run["sparse"], "debian12", "restore")
    assert c["status"] == "refuses" and "mapped-ram" in c["reason"] and c["machine_support"] == "ok", c


@needs_debian12
def test_a_zstd_image_goes_through_the_decompressor(full_run):
    row = next(r for r in full_run["data"]["rows"] if r["id"] == full_run["zstd"])
    assert row["info"]["format"] == "zstd" and row["machine"] == "pc-i440fx-7.2"
    for build in ("system", "debian12"):
        assert _cell(full_run["data"], full_run["zstd"], build, "restore")["status"] == "loads"


@needs_debian12
def test_a_libvirt_90_trace_replays_on_both_builds(full_run):
    data = full_run["data"]
    for row in ("corpus/libvirt-9.0-managedsave", "corpus/libvirt-9.0-save-bypass-cache"):
        for build in ("system", "debian12"):
            for mode in ("faithful", "essential"):
                c = _cell(data, row, build, mode)
                assert c["status"] in ("equivalent", "differs"), c
    # On the QEMU it was recorded with, the replay answers as the trace says.
    assert _cell(data, "corpus/libvirt-9.0-managedsave", "debian12", "faithful")["status"] == "equivalent"
    # On QEMU 10 it does not: 9.0 sets the 'compress' capability QEMU 10 no longer has.
    c = _cell(data, "corpus/libvirt-9.0-managedsave", "system", "faithful")
    assert c["status"] == "differs" and "compress" in c["details"]["diff"]


@needs_debian12
def test_libvirt_113_traces_fail_on_72_for_the_machine_type(full_run):
    data = full_run["data"]
    fresh = next(r["id"] for r in data["rows"] if r["label"] == "fresh-libvirt.json")
    for row in ("corpus/libvirt-11.3-managedsave", "corpus/libvirt-11.3-sparse-parallel2", fresh):
        c = _cell(data, row, "debian12", "faithful")
        assert c["status"] == "fails" and "unsupported machine type" in c["reason"], c
        assert _cell(data, row, "system", "faithful")["status"] in ("equivalent", "differs")


@needs_debian12
def test_junit_has_every_cell_as_a_testcase(full_run):
    root = ET.parse(full_run["out"]["xml"]).getroot()
    cases = root.findall(".//testcase")
    data = full_run["data"]
    assert len(cases) == len(data["cells"]) == int(root.get("tests"))
    failing = [c for c in cases if c.find("failure") is not None]
    assert len(failing) == sum(c["status"] not in ("equivalent", "loads") for c in data["cells"])
    refused = [c.find("failure").get("message") for c in failing if c.find("failure").get("type") == "refuses"]
    reasons = [c["reason"] for c in data["cells"] if c["status"] == "refuses"]
    assert len(refused) == len(reasons) == 3
    assert sorted(refused) == sorted(f"refuses: {r}" for r in reasons)
    assert sum("unsupported machine type" in m for m in refused) == 2 and sum("mapped-ram" in m for m in refused) == 1


@needs_debian12
def test_html_report_in_a_real_browser(full_run):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("needs Debian's chromium (scripts/setup installs it)")
    profile = Path(tempfile.mkdtemp(prefix="vs-test-chromium-"))
    try:
        p = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--disable-component-update", "--no-first-run", "--disable-sync",
                            f"--user-data-dir={profile}", "--dump-dom", full_run["out"]["html"].as_uri()],
                           capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert p.returncode == 0, p.stderr[-2000:]
    dom = p.stdout
    assert '<table class="matrix" id="matrix">' in dom
    data = full_run["data"]
    assert dom.count("<details") == len(data["cells"])
    # The refusing cell links to its details, which hold QEMU's reason.
    n = next(i for i, c in enumerate(data["cells"]) if c["row"] == full_run["img10"] and c["build"] == "debian12")
    assert f'href="#cell-{n}"' in dom
    start = dom.index(f'<details id="cell-{n}"')
    detail = dom[start:dom.index("</details>", start)]
    assert "refuses" in detail and "unsupported machine type" in detail and " open" in detail


@needs_debian12
def test_baseline_passes_an_unchanged_rerun_and_flags_a_regression(full_run, cli):
    work = full_run["work"]
    img = full_run["img10"]
    base, again, worse = work / "base.json", work / "again.json", work / "worse.json"
    p = cli("matrix", "--no-corpus", "--images", img, "--qemu", f"host={SYSTEM}", "-o", str(base))
    assert p.returncode == 0, p.stderr
    p = cli("matrix", "--no-corpus", "--images", img, "--qemu", f"host={SYSTEM}", "--baseline", str(base),
            "-o", str(again))
    assert p.returncode == 0, p.stderr
    assert "no cell got worse" in p.stderr and json.loads(again.read_text())["regressions"] == []
    # The injected regression: the build named "host" is now QEMU 7.2, which cannot load the image.
    p = cli("matrix", "--no-corpus", "--images", img, "--qemu", f"host={DEBIAN12.path}", "--baseline", str(base),
            "-o", str(worse))
    assert p.returncode == 1, p.stderr
    assert "worse than the baseline" in p.stderr and "loads → refuses" in p.stderr
    regs = json.loads(worse.read_text())["regressions"]
    assert [(r["row"], r["was"], r["now"]) for r in regs] == [(img, "loads", "refuses")]
    p = cli("matrix", "--no-corpus", "--images", img, "--baseline", str(full_run["out"]["xml"]))
    assert p.returncode == 2 and "not JSON" in p.stderr

