"""Upgrade-check matrix without QEMU: build probing parsers, the restore check's command-line
rewriting, the shipped corpus, diff preparation, baseline logic, reports and bad CLI input."""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from virtsave.core.errors import VirtsaveError
from virtsave.harness import matrix, matrixreport
from virtsave.harness.matrix import Cell, Matrix, Row
from virtsave.image import saveimage
from virtsave.qemu import builds, restorecheck, safety
from virtsave.trace import model as tr

REPO = Path(__file__).resolve().parent.parent.parent

MACHINE_HELP_72 = """Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
pc-i440fx-7.1        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-1.4        Standard PC (i440FX + PIIX, 1996) (deprecated)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
isapc                ISA-only PC
none                 empty machine
"""


def _build(version: str = "7.2.22", help_text: str = MACHINE_HELP_72) -> builds.QemuBuild:
    return builds.QemuBuild("b", "/x/qemu-system-x86_64", "prefix", version, None, ["tcg"],
                            builds.parse_machine_help(help_text))


# -- builds ------------------------------------------------------------------------------------------
def test_machine_help_parsed_with_aliases_default_and_deprecation():
    m = builds.parse_machine_help(MACHINE_HELP_72)
    assert m["pc"].alias_of == "pc-i440fx-7.2" and m["q35"].alias_of == "pc-q35-7.2"
    assert m["pc-i440fx-7.2"].default and not m["pc-i440fx-7.1"].default
    assert m["pc-i440fx-1.4"].deprecated and m["pc-i440fx-1.4"].description == "Standard PC (i440FX + PIIX, 1996)"
    assert "isapc" in m and "none" in m and len(m) == 9


def test_machine_support_ok_deprecated_missing():
    b = _build()
    assert builds.machine_support(b, "pc-i440fx-7.2") == "ok"
    assert builds.machine_support(b, "pc") == "ok"
    assert builds.machine_support(b, "pc-i440fx-1.4") == "deprecated"
    assert builds.machine_support(b, "pc-i440fx-10.0") == "missing"


def test_version_and_accelerators_parsed():
    assert builds.parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)") == \
        ("7.2.22", "Debian 1:7.2+dfsg-7+deb12u18+b3")
    assert builds.parse_version("QEMU emulator version 9.1.0\n") == ("9.1.0", None)
    assert builds.parse_version("nonsense") == (None, None)
    assert builds.parse_accel_help("Accelerators supported in QEMU binary:\ntcg\nkvm\nxen\n") == ["tcg", "kvm", "xen"]


def test_probe_refuses_what_is_no_qemu(tmp_path):
    fake = tmp_path / "sh"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert "not a QEMU" in (builds.probe(str(fake), "x").error or "")
    assert "not found" in (builds.probe(str(tmp_path / "qemu-system-x86_64"), "x").error or "")


def test_probe_reports_a_build_that_fails(tmp_path):
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'cannot open shared object libfoo.so.1' >&2\nexit 127\n")
    fake.chmod(0o755)
    b = builds.probe(str(fake), "broken")
    assert b.error and "libfoo.so.1" in b.error


def test_discover_lists_prefixes_and_skips_work_in_progress(tmp_path):
    for d in ("debian12", ".debian12.abc", "debian12.old", "empty"):
        (tmp_path / d).mkdir()
    for d in ("debian12", ".debian12.abc", "debian12.old"):
        (tmp_path / d / "bin").mkdir()
        q = tmp_path / d / "bin" / "qemu-system-x86_64"
        q.write_text("#!/bin/sh\nexit 1\n")
        q.chmod(0o755)
    found = builds.discover(base=tmp_path, system=None)
    assert [b.name for b in found] == ["debian12"] and found[0].origin == "prefix"


def test_resolve_named_and_unknown():
    b = _build()
    assert builds.resolve("b", [b]) is b
    with pytest.raises(VirtsaveError, match="no build of that name"):
        builds.resolve("no-such-build-xyz", [b])


# -- restore check: command lines --------------------------------------------------------------------
def test_prepare_argv_opens_nothing_for_writing(tmp_path):
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(b"QFI\xfb" + b"\0" * 20 + struct.pack(">Q", 8 << 30) + b"\0" * 100)
    argv = ["/usr/bin/qemu-system-x86_64", "-machine", "pc-i440fx-7.2,usb=off",
            "-chardev", "socket,id=charmonitor,path=/var/lib/libvirt/qemu/d/monitor.sock,server=on,wait=off",
            "-mon", "chardev=charmonitor,id=monitor,mode=control",
            "-blockdev", json.dumps({"driver": "file", "filename": str(disk), "node-name": "libvirt-1-storage"}),
            "-blockdev", json.dumps({"node-name": "libvirt-1-format", "read-only": False, "driver": "qcow2",
                                     "file": "libvirt-1-storage"}),
            "-drive", f"file={disk},format=qcow2,if=none,id=drive0",
            "-object", json.dumps({"qom-type": "memory-backend-file", "id": "pc.ram", "mem-path": "/dev/shm/x",
                                   "share": True, "size": 268435456}),
            "-netdev", json.dumps({"type": "tap", "fd": "33", "id": "hostnet0"}),
            "-netdev", "tap,id=hostnet1,ifname=vnet3"]
    new, notes = restorecheck.prepare_argv(argv, machine="pc-i440fx-7.2")
    joined = " ".join(new)
    assert "monitor.sock" not in joined and "-mon" not in new
    bd = [json.loads(new[i + 1]) for i, a in enumerate(new) if a == "-blockdev"]
    assert bd == [{"driver": "null-co", "node-name": "libvirt-1-storage", "size": disk.stat().st_size},
                  {"driver": "null-co", "node-name": "libvirt-1-format", "size": 8 << 30}]
    assert f"file={disk},format=qcow2,if=none,id=drive0,snapshot=on" in new
    assert json.loads(new[new.index("-object") + 1]) == {"qom-type": "memory-backend-ram", "id": "pc.ram",
                                                          "size": 268435456}
    nets = [new[i + 1] for i, a in enumerate(new) if a == "-netdev"]
    assert json.loads(nets[0]) == {"type": "user", "id": "hostnet0", "restrict": True}
    assert nets[1] == "user,id=hostnet1,restrict=on"
    assert "-machine" in new and new[new.index("-machine") + 1] == "pc-i440fx-7.2,usb=off"
    assert len(notes) == 8 and all(n["reason"] for n in notes)
    assert safety.check_argv(new) == []


def test_prepare_argv_silences_character_devices_and_the_check_refuses_what_stays_unsafe(tmp_path):
    argv = ["qemu-system-x86_64", "-chardev", "pty,id=charserial0,logfile=/var/log/libvirt/qemu/g.log,logappend=on",
            "-chardev", "socket,id=charchannel0,path=/var/lib/libvirt/qemu/channel/target/x.sock,server=on,wait=off",
            "-device", "isa-serial,chardev=charserial0,id=serial0"]
    new, _ = restorecheck.prepare_argv(argv)
    assert new[1:5] == ["-chardev", "null,id=charserial0", "-chardev", "null,id=charchannel0"]
    assert safety.check_argv(new) == []
    img = tmp_path / "i.save"
    _fake_image(img, b"pc-i440fx-7.2")
    r = restorecheck.check_image(img, [*argv, "-plugin", "file=/tmp/evil.so"], binary="/nonexistent/qemu-system-x86_64")
    assert r.status == "refuses" and r.reason.startswith("not launched: unsafe command line: -plugin")


def test_prepare_argv_takes_the_streams_machine_type():
    new, notes = restorecheck.prepare_argv(["qemu-system-x86_64", "-machine", "pc,usb=off,acpi=off"],
                                           machine="pc-i440fx-10.0")
    assert new == ["qemu-system-x86_64", "-machine", "pc-i440fx-10.0,usb=off,acpi=off"]
    assert notes[0]["reason"].startswith("the machine type the image's stream")
    new, _ = restorecheck.prepare_argv(["qemu-system-x86_64", "-machine", "type=pc,usb=off"], machine="pc-q35-7.2")
    assert new[2] == "type=pc-q35-7.2,usb=off"


def test_argv_from_xml_models_what_the_stream_needs(tmp_path):
    xml = ("<domain type='kvm'><name>g</name><memory unit='GiB'>1</memory><vcpu>2</vcpu>"
           "<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><kernel>/k</kernel><initrd>/i</initrd>"
           "<cmdline>console=ttyS0</cmdline></os><features><acpi/></features>"
           "<cpu mode='custom'><model>qemu64</model></cpu>"
           "<devices><serial type='pty'><target port='0'/></serial><serial type='pty'><target port='1'/></serial>"
           "</devices></domain>")
    argv = restorecheck.argv_from_xml(xml)
    assert argv[argv.index("-machine") + 1] == "pc-i440fx-7.2,usb=off"   # ACPI on: no acpi=off
    assert argv[argv.index("-accel") + 1] == "kvm" and argv[argv.index("-m") + 1] == "1024"
    assert argv[argv.index("-smp") + 1] == "2" and argv[argv.index("-cpu") + 1] == "qemu64"
    assert argv[argv.index("-kernel") + 1] == "/k" and argv[argv.index("-append") + 1] == "console=ttyS0"
    assert "piix3-usb-uhci,id=usb,bus=pci.0,addr=0x1.0x2" in argv
    assert [a for a in argv if a.startswith("isa-serial")] == [
        "isa-serial,chardev=charserial0,id=serial0,index=0", "isa-serial,chardev=charserial1,id=serial1,index=1"]


def test_argv_from_xml_refuses_bad_xml():
    with pytest.raises(VirtsaveError, match="not well-formed"):
        restorecheck.argv_from_xml("<domain><name>x</name")
    with pytest.raises(VirtsaveError, match="no <memory>"):
        restorecheck.argv_from_xml("<domain><name>x</name></domain>")
    # No entity expansion from an untrusted image header.
    evil = ("<!DOCTYPE d [<!ENTITY x SYSTEM 'file:///etc/passwd'>]><domain><name>&x;</name>"
            "<memory>1024</memory></domain>")
    assert "root:" not in " ".join(restorecheck.argv_from_xml(evil))


def _fake_image(path: Path, machine: bytes, fmt: str = "raw") -> None:
    xml = "<domain type='qemu'><name>f</name><memory unit='MiB'>64</memory></domain>"
    hdr = saveimage.encode_header(xml, None, was_running=True, image_format=fmt)
    hdr = hdr.replace(b"LibvirtQemudPart", b"LibvirtQemudSave", 1)   # a complete image
    stream = b"QEVM" + struct.pack(">I", 3) + bytes([0x07]) + struct.pack(">I", len(machine)) + machine
    path.write_bytes(hdr + stream + b"\0" * 64)


def test_stream_machine_read_from_the_configuration_section(tmp_path):
    img = tmp_path / "i.save"
    _fake_image(img, b"pc-i440fx-7.2")
    hdr = saveimage.read_header_path(img)
    assert restorecheck.stream_machine(img, hdr) == "pc-i440fx-7.2"
    _fake_image(img, b"x" * 300)                      # implausible length: no machine
    assert restorecheck.stream_machine(img, saveimage.read_header_path(img, allow_partial=True)) is None


def test_clean_reason_drops_timestamps_and_help_hint():
    assert restorecheck.clean_reason("2026-11-30T09:41:53.272146Z qemu-system-x86_64: unsupported machine type"
                                     " | Use -machine help to list supported machines") == \
        "qemu-system-x86_64: unsupported machine type"


# -- corpus ------------------------------------------------------------------------------------------
def test_corpus_ships_both_libvirt_generations():
    paths = matrix.corpus_paths()
    names = {p.stem for p in paths}
    assert {"libvirt-9.0-managedsave", "libvirt-9.0-save-bypass-cache", "libvirt-11.3-managedsave",
            "libvirt-11.3-save-bypass-cache", "libvirt-11.3-sparse-parallel2"} <= names
    for p in paths:
        t = tr.load(p)                                # validates
        assert p.stat().st_size < 256 * 1024, p
        lv = p.stem.split("-")[1]
        assert t["host"]["libvirt"].startswith(lv + "."), (p, t["host"])
        assert t["host"]["qemu"].startswith("7.2." if lv == "9.0" else "10.0."), (p, t["host"])
        assert [ph["name"] for ph in t["phases"]] == ["save", "restore"] and all(ph["ok"] for ph in t["phases"])
        argv = t["domain"]["argv"]
        assert "-incoming" not in argv
        assert restorecheck.machine_of_argv(argv) == ("pc-i440fx-7.2" if lv == "9.0" else "pc-i440fx-10.0")
        assert t["corpus"]["scenario"] and all((REPO / f.split("@")[0]).is_file() for f in t["corpus"]["from"])


def test_corpus_is_what_make_corpus_makes(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_corpus
    finally:
        sys.path.pop(0)
    for sc in make_corpus.SCENARIOS:
        made = json.loads(json.dumps(make_corpus.build(*sc)))
        shipped = json.loads((REPO / "virtsave" / "harness" / "corpus" / f"{sc[0]}.json").read_text())
        assert made == shipped, sc[0]


def test_corpus_rows():
    rows, skipped = matrix.collect_rows()
    assert not skipped and all(r.kind == "trace" and r.origin == "corpus" for r in rows)
    by = {r.id: r for r in rows}
    assert by["corpus/libvirt-9.0-managedsave"].info["libvirt"] == "9.0.0"
    assert by["corpus/libvirt-11.3-sparse-parallel2"].machine == "pc-i440fx-10.0"


def test_collect_rows_named_bad_file_raises_directory_skips(tmp_path):
    bad = tmp_path / "notes.json"
    bad.write_text('{"hello": 1}')
    (tmp_path / "junk.save").write_bytes(b"nothing here")
    with pytest.raises(VirtsaveError):
        matrix.collect_rows([bad], corpus=False)
    rows, skipped = matrix.collect_rows([tmp_path], [tmp_path], corpus=False)
    assert rows == [] and {s["kind"] for s in skipped} == {"trace", "image"} and len(skipped) == 3
    with pytest.raises(VirtsaveError, match="no such file"):
        matrix.collect_rows([tmp_path / "missing"], corpus=False)


# -- what a trace cell compares -------------------------------------------------------------------------
def _pair() -> tuple[tr.Trace, tr.Trace]:
    a = tr.new_trace("libvirt")
    ph = tr.add_phase(a, "save", "save", ok=True)
    ph["messages"] += [tr.command("query-migrate", id="l1"), tr.reply("l1", ret={}),
                       tr.command("stop", id="l2"), tr.reply("l2", ret={}),
                       tr.command("getfd", {"fdname": "migrate"}, id="l3", fds=1), tr.reply("l3", ret={}),
                       tr.command("migrate", {"uri": "fd:migrate"}, id="l4"), tr.reply("l4", ret={}),
                       tr.command("query-fdsets", id="l5"),
                       tr.reply("l5", ret=[{"fdset-id": 0, "fds": [{"fd": 30, "opaque": "serial0-source"}]}]),
                       tr.command("migrate-set-parameters", {"max-bandwidth": 1}, id="l6"), tr.reply("l6", ret={}),
                       tr.event("SHUTDOWN", {"guest": False, "reason": "host-signal"})]
    b = copy.deepcopy(a)
    b["source"] = "direct"
    bp = b["phases"][0]
    bp["messages"][9] = tr.reply("l5", ret=[])
    bp["messages"][-1] = tr.event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    bp["messages"] += [tr.command("quit", id="q"), tr.reply("q", ret={})]
    b["replay"] = {"argv_rewrites": {"save": [{"option": "-add-fd", "original": "set=0,fd=30,opaque=serial0-source",
                                               "replacement": "", "reason": "x"}]}}
    return a, b


def test_faithful_comparison_is_whole_but_for_a_dropped_fdset():
    """A faithful replay ends QEMU as libvirt does: its quit (or another SHUTDOWN reason) is a difference;
    only an fdset the launcher had to drop is left out of the query-fdsets replies of both sides."""
    from virtsave.trace import diff as tdiff

    a, b = _pair()
    opaque = matrix._replaced_fdsets(b)
    assert opaque == {"serial0-source"}
    ca = matrix._comparable(a, ours=False, essential=False, opaque=opaque)
    cb = matrix._comparable(b, ours=True, essential=False, opaque=opaque)
    assert {d.kind for d in tdiff.diff_traces(ca, cb).differences} == {"extra", "event-changed"}
    bp = b["phases"][0]
    bp["messages"] = bp["messages"][:-2]
    bp["messages"][-1] = tr.event("SHUTDOWN", {"guest": False, "reason": "host-signal"})
    assert tdiff.diff_traces(ca, matrix._comparable(b, ours=True, essential=False, opaque=opaque)).equivalent
    assert not tdiff.diff_traces(a, b).equivalent  # the query-fdsets reply, without the matrix's rule
    # A fdset the launcher kept (replaced by our fd) is compared.
    b["replay"]["argv_rewrites"]["save"][0]["replacement"] = "set=0,fd=3,opaque=serial0-source"
    assert matrix._replaced_fdsets(b) == set()


def test_essential_comparison_skips_what_the_replay_skips():
    from virtsave.trace import diff as tdiff

    a, _ = _pair()
    ca = matrix._comparable(a, ours=False, essential=True, opaque=set())
    assert [m["execute"] for m in tr.iter_commands(ca["phases"][0])] == ["stop", "getfd", "migrate"]
    b = tr.new_trace("direct")
    tr.add_phase(b, "save", "save", ok=True)["messages"] += [
        tr.command("stop", id="d1"), tr.reply("d1", ret={}),
        tr.command("getfd", {"fdname": "migrate"}, id="d2", fds=1), tr.reply("d2", ret={}),
        tr.command("migrate", {"uri": "fd:migrate"}, id="d3"), tr.reply("d3", ret={}),
        tr.command("quit", id="d4"), tr.reply("d4", ret={}),
        tr.event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]
    assert tdiff.diff_traces(ca, matrix._comparable(b, ours=True, essential=True, opaque=set())).equivalent
    assert not tdiff.diff_traces(ca, matrix._comparable(b, ours=True, essential=False, opaque=set())).equivalent


def test_substitutions_follow_their_command_after_filtering():
    _, b = _pair()
    bp = b["phases"][0]
    bp["messages"].insert(2, tr.event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}))
    sent = next(i for i, m in enumerate(bp["messages"]) if m.get("execute") == "getfd")
    bp["substitutions"] = [{"index": 4, "sent": sent, "field": "fds", "original": 1, "replacement": 1,
                            "reason": "scm"}]
    cb = matrix._comparable(b, ours=True, essential=True, opaque=set())
    sub = cb["phases"][0]["substitutions"][0]
    assert sub["sent"] == sent - 1 and cb["phases"][0]["messages"][sub["sent"]]["execute"] == "getfd"


# -- baseline -------------------------------------------------------------------------------------------
def _matrix(*statuses: str) -> Matrix:
    rows = [Row("r1", "trace", "/r1.json", "user", "r1.json", "pc-i440fx-7.2"),
            Row("r2", "image", "/r2.save", "user", "r2.save", "pc-i440fx-10.0")]
    cells = [Cell("r1", "system", "faithful", statuses[0]), Cell("r2", "system", "restore", statuses[1])]
    b = _build("10.0.2")
    b.name = "system"
    return Matrix(rows, [b], cells, created="now")


def test_regressions_only_when_a_cell_ranks_lower(tmp_path):
    base = _matrix("differs", "loads").to_json()
    assert matrix.regressions(_matrix("differs", "loads"), base) == []
    assert matrix.regressions(_matrix("equivalent", "loads"), base) == []
    worse = matrix.regressions(_matrix("fails", "refuses"), base)
    assert [(w["row"], w["was"], w["now"]) for w in worse] == [("r1", "differs", "fails"), ("r2", "loads", "refuses")]
    # A cell the baseline does not have is new, not worse.
    assert matrix.regressions(_matrix("fails", "refuses"), {"cells": []}) == []


def test_load_baseline_refuses_what_is_no_matrix(tmp_path):
    p = tmp_path / "b.json"
    p.write_text("[1, 2")
    with pytest.raises(VirtsaveError, match="not JSON"):
        matrix.load(p)
    p.write_text(json.dumps({"format": "virtsave-trace", "cells": []}))
    with pytest.raises(VirtsaveError, match="not a virtsave matrix"):
        matrix.load(p)
    p.write_text(json.dumps(_matrix("differs", "loads").to_json()))
    assert matrix.load(p)["format"] == "virtsave-matrix"


# -- reports ---------------------------------------------------------------------------------------------
def _report_matrix() -> Matrix:
    m = _matrix("differs", "refuses")
    m.cells[0].reason = "reply 1"
    m.cells[0].details = {"diff": "~ query-migrate\n      reply <script>alert(1)</script>"}
    m.cells[1].reason = "qemu-system-x86_64: unsupported machine type <b>"
    m.cells[1].machine_support = "missing"
    m.regressions = [{"key": m.cells[1].key, "row": "r2", "build": "system", "mode": "restore", "was": "loads",
                      "now": "refuses", "reason": m.cells[1].reason}]
    return m


def test_junit_has_a_testcase_per_cell():
    root = ET.fromstring(matrixreport.junit(_report_matrix()))
    cases = root.findall(".//testcase")
    assert len(cases) == 2 and root.get("tests") == "2" and root.get("failures") == "2"
    fails = {c.get("classname"): c.find("failure") for c in cases}
    assert fails["virtsave.matrix.r2.save"].get("type") == "refuses"
    assert fails["virtsave.matrix.r2.save"].get("message").startswith("REGRESSION (baseline: loads) refuses")
    assert "unsupported machine type" in fails["virtsave.matrix.r2.save"].text


def test_html_is_self_contained_and_escaped():
    page = matrixreport.html(_report_matrix())
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;" in page
    assert 'id="matrix"' in page and 'id="cell-0"' in page and 'id="cell-1"' in page
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "regression" in page and "lacks machine type pc-i440fx-10.0" in page


def test_table_renders():
    from rich.console import Console

    con = Console(width=200, record=True)
    con.print(matrixreport.table(_report_matrix()))
    text = con.export_text()
    assert "faithful: differs (reply 1)" in text and "! refuses (no such machine)" in text


# -- CLI bad input ----------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtsave.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, "VIRTSAVE_QEMU_DIR": "/nonexistent"})


@pytest.mark.parametrize("args, msg", [
    (("matrix", "--baseline", "/nonexistent/b.json"), "cannot read baseline"),
    (("matrix", "--traces", "/nonexistent/t.json"), "no such file"),
    (("matrix", "--qemu", "/bin/true"), "not a QEMU system emulator"),
    (("matrix", "--no-corpus"), "nothing to check"),
    (("matrix", "--qemu", "no-such-build"), "no build of that name"),
])
def test_matrix_bad_input_is_one_line_exit_2(args, msg):
    p = _cli(*args)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("virtsave: error: ") and msg in p.stderr and p.stderr.count("\n") == 1, p.stderr
