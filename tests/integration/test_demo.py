"""`virtsave demo` on the built-in guest: exit 0, both paths keep the guest's memory, the direct replay is
equivalent to libvirt's trace (issue 11: on any stack, no expected differences), and nothing left behind
(issue 6)."""

from __future__ import annotations

import glob
import json

import pytest

pytestmark = pytest.mark.integration


def _leftovers(conn) -> list[str]:  # type: ignore[no-untyped-def]
    doms = [d.name() for d in conn.listAllDomains() if d.name().startswith("vs-demo-")]
    files = glob.glob("/var/tmp/vs-demo-*") + glob.glob("/var/log/libvirt/qemu/vs-demo-*")
    return doms + files


def test_demo_runs_and_cleans_up(cli, conn):
    before = set(_leftovers(conn))
    proc = cli("--json", "demo", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout)
    ticks = result["ticks"]
    assert ticks["libvirt_after_restore"] > ticks["libvirt_before_save"]
    assert ticks["direct_ticks"] >= 2
    assert result["equivalent"] is True and result["diff_summary"] == {}, result["diff_summary"]
    for step in ("save", "restore"):
        assert result["timings"][step]["libvirt"] > 0 and result["timings"][step]["direct"] > 0
    # Other demos may run at the same time on a shared daemon: only ours must be gone.
    assert not set(_leftovers(conn)) - before, "demo left a domain or file behind"
    assert result["domain"] not in [d.name() for d in conn.listAllDomains()]


def test_demo_report_ends_equivalent(cli, conn):
    before = set(_leftovers(conn))
    proc = cli("demo", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().splitlines()[-1] == "equivalent", proc.stdout
    assert not set(_leftovers(conn)) - before, "demo left a domain or file behind"
