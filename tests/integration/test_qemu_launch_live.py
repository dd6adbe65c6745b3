"""The QEMU launcher for real: libvirt's recorded command line, rewritten, starts on this QEMU.

Uses the real libvirt 9.0 domain log in tests/fixtures and the built test guest's kernel; no libvirtd
(moved from tests/unit/test_qemu_launch.py: it launches QEMU).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from virtsave.libvirtd import domainlog
from virtsave.qemu import launch as ql
from virtsave.trace import model as trace

pytestmark = pytest.mark.integration

FXA = Path(__file__).resolve().parent.parent / "fixtures" / "qemu-domain-logs" / "fxa.log"
QEMU = shutil.which("qemu-system-x86_64")


@pytest.fixture
def fxa_argv() -> list[str]:
    return domainlog.argv_from_domain_log(FXA, 0)


@pytest.mark.skipif(QEMU is None or not Path("/var/lib/virtsave/guest/vmlinuz").exists(),
                    reason="needs QEMU and the built test guest")
def test_rewritten_fxa_command_line_starts(fxa_argv):
    """The rewritten libvirt 9.0 command line (machine pc-i440fx-7.2) runs on this QEMU."""
    plan = ql.plan_launch(fxa_argv)
    tr = trace.new_trace("direct", domain={"name": "fxa"})
    ph = trace.add_phase(tr, "save", "save")
    with ql.start(plan) as proc:
        s = proc.connect(phase=ph)
        with s:
            assert s.execute("query-status")["status"] == "prelaunch"
            assert s.execute("query-name")["name"] == "fxa"
            s.quit()
        assert proc.wait(10) == 0
    cmds = [m["execute"] for m in trace.iter_commands(ph)]
    assert cmds == ["qmp_capabilities", "query-status", "query-name", "quit"]
    assert trace.validate(tr) == []
    assert not plan.run_dir.exists()
