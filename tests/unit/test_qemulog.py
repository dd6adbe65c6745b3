"""virtsave.libvirtd.domainlog on the recorded domain log (both stacks) and cut/odd variants."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtsave.core import errors
from virtsave.libvirtd import domainlog as qemulog

FXA = Path(__file__).resolve().parent.parent / "fixtures" / "qemu-domain-logs" / "fxa.log"


def test_all_starts_with_versions_env_argv():
    starts = qemulog.parse_domain_log(FXA)
    assert len(starts) == 15
    assert [s.libvirt_version for s in starts] == ["9.0.0"] * 10 + ["11.3.0"] * 5
    assert {s.qemu_version for s in starts} == {"7.2.22", "10.0.2"}
    first = starts[0]
    assert first.time_iso == "2026-11-25T18:58:10.516+0000"
    assert first.time == pytest.approx(1795633090.516)
    assert first.libvirt_package == "9.0.0-4+deb12u2 (Debian)"
    assert first.qemu_package == "Debian 1:7.2+dfsg-7+deb12u18+b3"
    assert first.kernel == "6.18.44-fc-v669" and first.hostname == "vm"
    assert list(first.env) == ["LC_ALL", "PATH", "HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"]
    assert first.env["HOME"] == "/var/lib/libvirt/qemu/domain-10-fxa"
    assert first.argv[0] == "/usr/bin/qemu-system-x86_64"
    assert first.argv[1:3] == ["-name", "guest=fxa,debug-threads=on"]
    assert first.argv[-2:] == ["-msg", "timestamp=on"]
    # shell quoting undone: JSON option values are single words
    i = first.argv.index("-object")
    assert first.argv[i + 1].startswith('{"qom-type":"secret"') and first.argv[i + 1].endswith("}")
    assert first.argv[first.argv.index("-append") + 1] == "console=ttyS0 quiet fill=64"
    assert first.complete and first.shutdown_reason == "saved"
    assert first.shutdown_time == pytest.approx(1795633092.965)
    # restores are started with -incoming defer, the first boot is not
    assert "-incoming" not in first.argv
    assert starts[1].argv[starts[1].argv.index("-incoming") + 1] == "defer"
    # the failed saves (broken pipe) end "destroyed" and keep QEMU's messages
    failed = [s for s in starts if s.shutdown_reason == "destroyed"]
    assert len(failed) == 3
    assert any("Broken pipe" in m for m in failed[0].messages)
    assert "warning: fd: migration to a file is deprecated. Use file: instead." in starts[11].messages


def test_start_at():
    starts = qemulog.parse_domain_log(FXA)
    assert qemulog.start_at(starts, starts[3].time + 1) is starts[3]
    assert qemulog.start_at(starts, 0) is None


def test_cut_and_unbalanced_blocks(tmp_path):
    lines = FXA.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.log"
    cut.write_text("noise before any start\n" + "".join(lines[:20]))      # ends inside the first command line
    starts = qemulog.parse_domain_log(cut)
    assert len(starts) == 1 and starts[0].complete is False
    assert starts[0].argv[0] == "/usr/bin/qemu-system-x86_64"
    bad = tmp_path / "bad.log"
    bad.write_text(lines[0] + "/usr/bin/qemu-system-x86_64 \\\n-append 'unterminated\n")
    (s,) = qemulog.parse_domain_log(bad)
    assert s.complete is False and s.argv[:2] == ["/usr/bin/qemu-system-x86_64", "-append"]
    nonutf = tmp_path / "bin.log"
    nonutf.write_bytes(lines[0].encode() + b"/usr/bin/qemu \\\n-name guest=\xff\n")
    (s,) = qemulog.parse_domain_log(nonutf)
    assert s.argv == ["/usr/bin/qemu", "-name", "guest=\ufffd"]


def test_missing_file(tmp_path):
    with pytest.raises(errors.LogError) as ei:
        qemulog.parse_domain_log(tmp_path / "nope.log")
    assert "nope.log" in str(ei.value) and "\n" not in str(ei.value)
    assert qemulog.parse_domain_log(_empty(tmp_path)) == []


def _empty(tmp_path: Path) -> Path:
    p = tmp_path / "empty.log"
    p.write_text("")
    return p


def test_last_start_is_the_newest_start_parsed_alone(tmp_path: Path) -> None:
    every = qemulog.parse_domain_log(FXA)
    last = qemulog.last_start(FXA)
    assert last is not None and last.to_dict() == every[-1].to_dict()
    text = FXA.read_text()
    cut = tmp_path / "cut.log"  # the newest block cut in its command line: what a start in progress leaves
    cut.write_text(text[: text.rindex("-msg timestamp=on")])
    c = qemulog.last_start(cut)
    assert c is not None and not c.complete and c.time_iso == every[-1].time_iso
    none = tmp_path / "none.log"
    none.write_text("no starts here\n")
    assert qemulog.last_start(none) is None
    with pytest.raises(errors.LogError):
        qemulog.argv_from_domain_log(none)
    assert qemulog.argv_from_domain_log(FXA) == every[-1].argv and qemulog.argv_from_domain_log(FXA, 0) == every[0].argv
