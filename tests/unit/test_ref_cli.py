"""Reference-path CLI and library without a daemon.

The CLI checks run ``virtsave`` in-process (the ``cli`` fixture) and need no libvirtd: bad
arguments, bad images and an unreachable daemon must all end in one stderr line and
exit 2. The library checks use libvirt's in-process ``test:///default`` driver (real
libvirt code, no daemon; its state lives and dies with the connection).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import libvirt
import pytest

from virtsave.core.errors import DomainNotFound, DomainStateError, ImageError, UnsupportedError, VirtsaveError
from virtsave.image.saveimage import encode_header
from virtsave.libvirtd import host
from virtsave.libvirtd import reference as lp

NO_DAEMON = "qemu+unix:///system?socket=/nonexistent/virtsave-no-daemon.sock"


def assert_one_line_error(proc, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("virtsave: error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])


# --------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize("args", [
    ("save", "dom", "/var/tmp/x.img", "--running", "--paused"),
    ("restore", "/var/tmp/x.img", "--running", "--paused"),
    ("managed-save", "dom", "--running", "--paused"),
])
def test_running_and_paused_exclude_each_other(cli, args) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(cli("-c", NO_DAEMON, *args), "--running and --paused")


def test_unknown_image_format(cli) -> None:  # type: ignore[no-untyped-def]
    proc = cli("-c", NO_DAEMON, "save", "dom", "/var/tmp/x.img", "--image-format", "rar")
    assert_one_line_error(proc, "unknown image format 'rar'", "sparse")


def test_parallel_channels_need_sparse_and_positive(cli) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(cli("-c", NO_DAEMON, "save", "d", "/var/tmp/x", "--parallel-channels", "2"),
                          "--image-format sparse")
    assert_one_line_error(cli("-c", NO_DAEMON, "save", "d", "/var/tmp/x", "--image-format", "sparse",
                              "--parallel-channels", "0"), "≥ 1")


def test_all_and_match_rules(cli) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(cli("-c", NO_DAEMON, "managed-save", "dom", "--match", "vs-*"),
                          "--match only goes with --all")
    assert_one_line_error(cli("-c", NO_DAEMON, "managed-save"), "name a domain, or use --all")
    assert_one_line_error(cli("-c", NO_DAEMON, "start", "a", "b"), "one domain at a time")


def test_unreadable_xml_file(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc = cli("-c", NO_DAEMON, "save", "d", "/var/tmp/x", "--xml", str(tmp_path / "missing.xml"))
    assert_one_line_error(proc, "cannot read --xml", "missing.xml")


def test_daemon_not_reachable(cli) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(cli("-c", NO_DAEMON, "list"), "cannot connect to", "daemon is not running")
    assert_one_line_error(cli("-c", NO_DAEMON, "managed-save", "dom"), "cannot connect")


# --------------------------------------------------------------------------- image checked before the daemon


def test_restore_missing_image(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(cli("-c", NO_DAEMON, "restore", str(tmp_path / "nope.img")), "cannot read image",
                          "No such file")


def test_restore_foreign_file(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "foreign.img"
    p.write_bytes(b"QEVM" + b"\0" * 200)
    assert_one_line_error(cli("-c", NO_DAEMON, "restore", str(p)), "not a libvirt save image", "offset 0")


def test_restore_partial_image(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "partial.img"
    p.write_bytes(encode_header("<domain type='qemu'><name>x</name></domain>", partial=True) + b"QEVM")
    assert_one_line_error(cli("-c", NO_DAEMON, "restore", str(p)), "partial", "offset 0")


def test_restore_truncated_image(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "trunc.img"
    blob = encode_header("<domain type='qemu'><name>x</name></domain>", partial=False)
    p.write_bytes(blob[:500])
    assert_one_line_error(cli("-c", NO_DAEMON, "restore", str(p)), "truncated", "offset 500")


# --------------------------------------------------------------------------- versions and capabilities


def test_version_encoding() -> None:
    assert host.version_str(11_003_000) == "11.3.0"
    assert host.version_str(9_000_000) == "9.0.0"
    assert host.version_int("10.0.2") == 10_000_002
    assert host.version_int("7.2") == 7_002_000
    assert host.version_int("QEMU 9.2.0 (Debian 1:9.2.0+ds-1)") == 9_002_000


def test_qemu_binary_version_matches_parse() -> None:
    v = host.qemu_binary_version()
    assert host.version_int(v) >= 7_000_000


# --------------------------------------------------------------------------- library on libvirt's test driver


@pytest.fixture
def tconn():  # type: ignore[no-untyped-def]
    c = lp.connect("test:///default")  # in-process driver with one running domain "test"
    yield c
    c.close()


def test_test_driver_versions_and_formats(tconn) -> None:  # type: ignore[no-untyped-def]
    v = host.versions(tconn)
    assert v.libvirt == host.version_str(tconn.getLibVersion())
    assert not host.supports_format(tconn, "rar")
    # the test driver reports hypervisor version 0.0.2: too old for mapped-ram
    if v.libvirt_int >= host.SPARSE_MIN:
        with pytest.raises(UnsupportedError, match=r"needs QEMU ≥ 9\.0\.0 .*QEMU is 0\.0\.2"):
            host.require_format(tconn, "sparse")
        assert host.supports_format(tconn, "zstd")
    else:
        with pytest.raises(UnsupportedError, match=r"needs libvirt ≥ 11\.2\.0"):
            host.require_format(tconn, "sparse")


def test_lookup_by_name_uuid_and_missing(tconn) -> None:  # type: ignore[no-untyped-def]
    dom = lp.lookup(tconn, "test")
    assert lp.lookup(tconn, dom.UUIDString()).name() == "test"
    with pytest.raises(DomainNotFound, match="no-such-domain"):
        lp.lookup(tconn, "no-such-domain")


def test_managed_save_then_start_says_from_image(tconn) -> None:  # type: ignore[no-untyped-def]
    res = lp.managed_save(tconn, "test")
    assert res.ok and res.detail["has_managed_save"] and res.state == "shut off"
    assert res.to_dict()["detail"]["state_after"] == "shut off"  # the JSON keeps its key
    with pytest.raises(DomainStateError, match="not running"):
        lp.managed_save(tconn, "test")
    [info] = lp.list_domains(tconn, match="te*")
    assert info["managed_save"] is True and info["state"] == "shut off"
    res = lp.start(tconn, "test")
    assert res.ok and res.detail["from_managed_save"] is True and res.state == "running"
    lp.managed_save(tconn, "test")
    assert lp.managed_save_remove(tconn, "test").detail["removed"] is True
    assert lp.managed_save_remove(tconn, "test").detail["removed"] is False
    assert lp.start(tconn, "test").detail["from_managed_save"] is False


def test_failed_save_result_or_exception(tconn) -> None:  # type: ignore[no-untyped-def]
    bad = "/nonexistent-virtsave-dir/x.img"
    res = lp.save(tconn, "test", bad, raise_on_error=False)
    assert not res.ok and res.error and bad in res.error
    assert res.state == "running"  # a failed save leaves the domain running
    with pytest.raises(VirtsaveError) as exc_info:
        lp.save(tconn, "test", bad)
    assert exc_info.value.result.ok is False  # type: ignore[attr-defined]
    assert "is running" in str(exc_info.value)


def test_select_domains_respects_match_and_names(tconn) -> None:  # type: ignore[no-untyped-def]
    assert lp.select_domains(tconn, "active", match="test") == ["test"]
    assert lp.select_domains(tconn, "active", match="vs-nothing-*") == []
    assert lp.select_domains(tconn, "managed-save") == []
    with pytest.raises(DomainNotFound, match="ghost"):
        lp.select_domains(tconn, "active", names=["test", "ghost"])


def test_map_error_kinds() -> None:
    c = lp.connect("test:///default")
    try:
        c.lookupByName("nope")
    except libvirt.libvirtError as exc:
        assert isinstance(lp.map_error(exc, "x"), DomainNotFound)
    try:
        c.restoreFlags("/nonexistent/virtsave.img", None, 0)
    except libvirt.libvirtError as exc:
        err = lp.map_error(exc, "restore", image="/nonexistent/virtsave.img")
        assert isinstance(err, ImageError), err
    c.close()


def test_progress_fields() -> None:
    from virtsave.cli.progress import _done_total

    assert _done_total({"data_total": 10, "data_processed": 4}) == (4, 10)
    assert _done_total({"memory_total": 10, "memory_processed": 6}) == (6, 10)
    assert _done_total({"memory_total": 10, "data_remaining": 3}) == (7, 10)
    assert _done_total({"data_total": 10, "data_processed": 0, "memory_processed": 9}) == (0, 10)
    assert _done_total({}) == (None, None)


def test_progress_callback_draws_bars_only_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Disabled: no bar is made and nothing is written. Enabled: one bar per domain, fed with bytes
    done/total from the job statistics, full when the job says done; drawn on stderr's console."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    from virtsave.cli import common, progress

    made: list[Progress] = []

    class Recording(Progress):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            made.append(self)

    out = io.StringIO()
    monkeypatch.setattr(progress, "Progress", Recording)
    monkeypatch.setattr(common, "err_console", Console(file=out, force_terminal=True, width=120, color_system=None))
    with progress.job_progress("save", enabled=False) as cb:
        cb({"domain": "d", "data_total": 1, "data_processed": 1})
    assert made == [] and out.getvalue() == ""

    mib = 2**20
    with progress.job_progress("save", enabled=True) as cb:
        cb({"domain": "d1", "data_total": 100 * mib, "data_processed": 40 * mib})
        cb({"domain": "d2", "memory_total": 50 * mib, "memory_processed": 5 * mib})
        (bar,) = made
        t1, t2 = bar.tasks
        assert (t1.description, t1.completed, t1.total) == ("save d1", 40 * mib, 100 * mib)
        assert (t2.description, t2.completed, t2.total) == ("save d2", 5 * mib, 50 * mib)
        cb({"domain": "d1", "data_total": 100 * mib, "data_processed": 70 * mib})
        assert (t1.completed, len(bar.tasks)) == (70 * mib, 2)     # the same bar moves on
        cb({"domain": "d1", "done": True})
        assert t1.completed == t1.total == 100 * mib and t1.finished
        assert t2.completed == 5 * mib
    assert "save d1" in out.getvalue() and "104.9/104.9 MB" in out.getvalue()
