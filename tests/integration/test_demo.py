"""`virtsave demo` on the built-in guest: exit 0, both paths keep the guest's memory, only the
differences normalization cannot know about, and nothing left behind (issue 6)."""

from __future__ import annotations

import glob
import json

import pytest

pytestmark = pytest.mark.integration

# What a libvirt trace and its direct replay legitimately differ in (explained in README).
EXPECTED_KINDS = {"reply", "extra", "event-changed", "missing"}


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
    assert set(result["diff_summary"]) <= EXPECTED_KINDS, result["diff_summary"]
    assert sum(result["diff_summary"].values()) <= 6
    for step in ("save", "restore"):
        assert result["timings"][step]["libvirt"] > 0 and result["timings"][step]["direct"] > 0
    # Other demos may run at the same time on a shared daemon: only ours must be gone.
    assert not set(_leftovers(conn)) - before, "demo left a domain or file behind"
    assert result["domain"] not in [d.name() for d in conn.listAllDomains()]
