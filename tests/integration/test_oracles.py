"""virtsave judged by libvirt's and QEMU's own tools, on live traces and real images.

- libvirt's ``scripts/qemu-replies-tool.py`` validates ``virtsave export --format replies`` of a live
  libvirt trace (whole, ``--phase save``, ``--phase restore``) and of its direct replay;
- QEMU's ``scripts/analyze-migration.py`` reads the stream of a libvirt managed-save image, a replay image
  and a ``direct save`` raw image; section names, order and ids, instance and version ids and RAM block
  sizes must agree with ``virtsave inspect --json``.

Both tools come from Debian's source packages into a cache outside the repo (``scripts/fetch-oracles``,
run by ``scripts/setup``); they are never part of the repo. The analyzer is taken from the source of the
QEMU generation that wrote the stream (QEMU 7.2's cannot read QEMU 10's streams and the reverse is not
promised either).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid as _uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import QEMU_VERSION

from virtsave.harness import guest
from virtsave.image import saveimage
from virtsave.libvirtd import reference
from virtsave.qemu import launch as qemu_launch

pytestmark = pytest.mark.integration

ORACLES = Path(os.environ.get("VIRTSAVE_ORACLES", "/var/cache/virtsave/oracles"))
REPLIES_TOOL = ORACLES / "libvirt" / "qemu-replies-tool.py"
ANALYZER = ORACLES / ("qemu-10" if QEMU_VERSION >= (10, 0, 0) else "qemu-7.2") / "analyze-migration.py"
PYTHON = shutil.which("python3") or "/usr/bin/python3"
WAIT = r"tick [2-9]"


def _tool(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"{path} missing: scripts/setup fetches it (scripts/fetch-oracles)")
    return path


def _replies_ok(path: Path) -> None:
    proc = subprocess.run([PYTHON, str(_tool(REPLIES_TOOL)), str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("... OK"), proc.stdout + proc.stderr


def _export_and_judge(cli, trace_file: Path, workdir: Path, phases: tuple[str | None, ...]) -> None:
    for phase in phases:
        out = workdir / f"{trace_file.stem}-{phase or 'all'}.replies"
        proc = cli("export", str(trace_file), "-o", str(out), *(["--phase", phase] if phase else []))
        assert proc.returncode == 0, proc.stderr
        text = out.read_text()
        first = json.loads(text.split("\n\n", 1)[0])
        assert first["execute"] == "qmp_capabilities" and first["id"] == "libvirt-1", first
        _replies_ok(out)


def test_replies_export_of_live_libvirt_and_replay_traces_pass_libvirts_tool(cli, make_guest, workdir):
    name = make_guest(256, 16)
    t, r = workdir / "t.json", workdir / "r.json"
    proc = cli("trace", name, "-o", str(t))
    assert proc.returncode == 0, proc.stderr
    _export_and_judge(cli, t, workdir, (None, "save", "restore"))
    proc = cli("replay", str(t), "-o", str(r), "--image", str(workdir / "r.save"), "--wait-serial", WAIT,
               "--serial-log", str(workdir / "serial.log"))
    assert proc.returncode == 0, proc.stderr
    _export_and_judge(cli, r, workdir, (None, "save", "restore"))


def _analyze(image: Path, workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """QEMU's analyzer on the stream of *image* (header stripped): (state dump, vmstate description)."""
    hdr = saveimage.read_header_path(image, allow_partial=False)
    stream = workdir / f"{image.stem}.stream"
    with open(image, "rb") as src, open(stream, "wb") as dst:
        src.seek(hdr.stream_offset)
        shutil.copyfileobj(src, dst, 16 << 20)
    out = []
    for extra in ([], ["-d", "desc"]):
        proc = subprocess.run([PYTHON, str(_tool(ANALYZER)), "-f", str(stream), *extra], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out.append(json.loads(proc.stdout))
    stream.unlink()
    return out[0], out[1]


def _agrees_with_analyzer(cli, image: Path, workdir: Path) -> None:
    proc = cli("--json", "inspect", str(image))
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(proc.stdout)["stream"]
    state, desc = _analyze(image, workdir)
    # section names, their order and section ids
    theirs = [(k.rsplit(" (", 1)[0], int(k.rsplit(" (", 1)[1].rstrip(")"))) for k in state]
    assert [(s["name"], s["id"]) for s in ours["sections"]] == theirs
    # instance and version ids of every device section the description lists
    devices = [(d["name"], d["instance_id"], d["version"]) for d in desc["devices"]]
    described = {d[0] for d in devices}
    assert [(s["name"], s["instance_id"], s["version_id"]) for s in ours["sections"]
            if s["name"] in described] == devices
    assert len(devices) >= 10
    # RAM block sizes
    ram_key = next(k for k in state if k.startswith("ram ("))
    sizes = {n: int(v, 16) for n, v in state[ram_key]["section sizes"].items()}
    assert {b["name"]: b["length"] for b in ours["ram"]["blocks"]} == sizes
    assert sizes.get("pc.ram") == 256 << 20


def test_inspect_agrees_with_qemus_analyzer_on_libvirt_and_replay_images(cli, conn, make_guest, workdir):
    name = make_guest(256, 16)
    t = workdir / "t.json"
    assert cli("trace", name, "-o", str(t)).returncode == 0
    replay_img = workdir / "replay.save"
    proc = cli("replay", str(t), "-o", str(workdir / "r.json"), "--image", str(replay_img), "--phases", "save",
               "--wait-serial", WAIT, "--serial-log", str(workdir / "serial.log"))
    assert proc.returncode == 0, proc.stderr
    _agrees_with_analyzer(cli, replay_img, workdir)
    proc = cli("managed-save", name)
    assert proc.returncode == 0, proc.stderr
    managed = reference.managed_save_path(conn, name)
    assert managed and os.path.exists(managed)
    _agrees_with_analyzer(cli, Path(managed), workdir)


def test_inspect_agrees_with_qemus_analyzer_on_a_direct_save_image(cli, workdir):
    name = guest.unique_name()
    uid = str(_uuid.uuid4())
    sock = workdir / "qmp.sock"
    g = "/var/lib/virtsave/guest"
    argv = ["qemu-system-x86_64", "-name", f"guest={name}", "-machine", "pc,usb=off,acpi=off",
            "-accel", guest.accel(), "-cpu", "qemu64", "-m", "256", "-smp", "1", "-uuid", uid,
            "-display", "none", "-no-user-config", "-nodefaults", "-kernel", f"{g}/vmlinuz",
            "-initrd", f"{g}/initrd.gz", "-append", "console=ttyS0 quiet panic=-1 virtsave.fill=16",
            "-chardev", f"file,id=s0,path={guest.serial_log(name)},append=on",
            "-device", "isa-serial,chardev=s0,id=serial0", "-qmp", f"unix:{sock},server=on,wait=off"]
    q = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        guest.wait_tick(name, 2, timeout=120)
        img = workdir / "direct.save"
        proc = cli("direct", "save", "--qmp", f"unix:{sock}", str(img))
        assert proc.returncode == 0, proc.stderr
        assert saveimage.read_header_path(img).format == "raw"
        _agrees_with_analyzer(cli, img, workdir)
    finally:
        q.kill()
        q.wait()
        qemu_launch.stop_all()
        with contextlib.suppress(OSError):
            os.unlink(guest.serial_log(name))
