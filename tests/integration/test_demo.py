"""`virtsave demo` on the built-in guest ends with a verdict (issues 6, 18): on both paths the guest keeps
its memory (its tick counter goes on across save and restore, no restart), the direct replay is
equivalent to libvirt's trace (issue 11: on any stack, no expected differences), and nothing is left
behind — unless --keep, which leaves the artefacts in one private directory.
"""

from __future__ import annotations

import glob
import json
import re
import shutil
import stat
from pathlib import Path

import pytest

from virtsave.image import saveimage
from virtsave.trace import model as tr

pytestmark = pytest.mark.integration

KEPT = {"libvirt.trace.json", "direct.trace.json", "diff.json", "direct.save", "direct-serial.log",
        "libvirt-serial.log"}


def _leftovers(conn, domain: str) -> list[str]:  # type: ignore[no-untyped-def]
    """What one demo run left: its guest, its work directory, its libvirt logs (other demos may be
    running on the shared daemon at the same time: only ours must be gone)."""
    assert re.fullmatch(r"vs-demo-\d+-[0-9a-f]+", domain), domain
    doms = [d.name() for d in conn.listAllDomains() if d.name() == domain]
    return doms + glob.glob(f"/var/tmp/{domain}-*") + glob.glob(f"/var/log/libvirt/qemu/{domain}*")


def _check_kept(kept_dir: Path, result: dict) -> None:  # type: ignore[type-arg]
    assert stat.S_IMODE(kept_dir.stat().st_mode) == 0o700
    assert {p.name for p in kept_dir.iterdir()} == KEPT == set(result["kept"])
    for p in kept_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for source in ("libvirt", "direct"):
        trace = tr.load(kept_dir / f"{source}.trace.json")
        assert trace["source"] == source and not tr.validate(trace)
    diff = json.loads((kept_dir / "diff.json").read_text())
    assert diff["summary"] == result["diff_summary"] and len(diff["differences"]) == result["difference_count"]
    assert saveimage.read_header_path(kept_dir / "direct.save").magic == "LibvirtQemudSave"
    assert re.search(rb"^tick \d+", (kept_dir / "direct-serial.log").read_bytes(), re.M)


def test_demo_json_result_and_kept_artefacts(cli, conn):
    proc = cli("--json", "demo", "--keep", timeout=300)
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout)
    kept_dir = Path(result["kept_dir"])
    try:
        assert result["verdict"] == "equivalent" and proc.returncode == 0, (proc.returncode, result["diff_summary"])
        assert result["equivalent"] and result["diff_summary"] == {} and result["difference_count"] == 0
        for path in ("libvirt", "direct"):
            ticks = result["paths"][path]
            assert ticks["survived"] and not ticks["restarted"], (path, ticks)
            assert ticks["tick_after_restore"] > ticks["tick_before_save"] >= 1, (path, ticks)
        for step in ("save", "restore"):
            assert result["timings"][step]["libvirt"] > 0 and result["timings"][step]["direct"] > 0
        assert kept_dir.parent == Path("/var/tmp") and kept_dir.name.startswith(f"{result['domain']}-")
        _check_kept(kept_dir, result)
    finally:
        shutil.rmtree(kept_dir, ignore_errors=True)
    assert not _leftovers(conn, result["domain"]), "demo left a domain or file behind"


def test_demo_report_ends_with_the_verdict(cli, conn):
    proc = cli("demo", timeout=300)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1] == "verdict: equivalent — direct replay vs libvirt: no difference after normalization", lines[-1]
    for path in ("libvirt", "direct"):
        line = next(x for x in lines if x.startswith(f"{path} path:"))
        t = re.search(r"guest memory kept — its tick counter went on from (\d+) to (\d+), no restart$", line)
        assert t and int(t.group(2)) > int(t.group(1)), line
    assert re.search(r"│ save +│ +\d+\.\d\d │ +\d+\.\d\d │", proc.stdout), proc.stdout
    assert re.search(r"│ restore +│ +\d+\.\d\d │ +\d+\.\d\d │", proc.stdout), proc.stdout
    assert "kept in" not in proc.stdout
    assert "removed" in proc.stderr
    domain = re.search(r"save/restore of (vs-demo-\S+)", proc.stdout)
    assert domain, proc.stdout
    assert not _leftovers(conn, domain.group(1)), "demo left a domain or file behind"
