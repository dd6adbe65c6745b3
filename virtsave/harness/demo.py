"""``virtsave demo``: the whole harness on the built-in guest, in one command.

Boots a throwaway guest, traces a managed-save cycle through libvirt, replays the trace
through the direct backend, diffs the two traces and shows both paths' save/restore
timings side by side. Everything it made (domain, images, traces, logs) is removed at
the end, also on Ctrl-C.

Example::

    from virtsave.harness import demo
    result = demo.run(log=print)
    print(result.diff_text)
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from virtsave.core.errors import OperationFailed
from virtsave.core.operation import OpResult
from virtsave.harness import guest
from virtsave.libvirtd import capture
from virtsave.libvirtd import reference as libvirt_path
from virtsave.qemu import launch as qemu_launch
from virtsave.qemu import replay
from virtsave.trace import model as tr


@dataclass
class DemoResult:
    """What the demo measured and found."""

    domain: str
    timings: dict[str, dict[str, float | None]] = field(default_factory=dict)
    ticks: dict[str, int] = field(default_factory=dict)
    equivalent: bool = False
    diff_text: str = ""
    diff_summary: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "timings": self.timings, "ticks": self.ticks,
                "equivalent": self.equivalent, "diff_summary": self.diff_summary}


def phase_results(trace: tr.Trace, backend: Literal["libvirt", "direct"]) -> dict[str, OpResult]:
    """Each phase of a libvirt trace or of its replay as the :class:`OpResult` of its path, so
    both paths are compared alike (a replay's seconds are its own timings: launch to running)."""
    timings = (trace.get("replay") or {}).get("timings") or {}
    results = {}
    for ph in trace.get("phases", []):
        image = ph.get("image") or {}
        seconds = (timings.get(ph["name"]) or {}).get("seconds", ph.get("seconds"))
        results[ph["name"]] = OpResult(trace["domain"].get("name"), ph.get("operation") or ph["name"],
                                       bool(ph.get("ok")), float(seconds or 0.0), image.get("path"),
                                       image.get("size"), ph.get("error"), backend=backend)
    return results


def run(uri: str | None = None, memory_mib: int = 256, fill_mib: int = 64,
        log: Callable[[str], None] = print, color: bool = False) -> DemoResult:
    """Run the demo; raise :class:`~virtsave.core.errors.VirtsaveError` on failure (after cleaning up)."""
    from virtsave.trace import diff as _diff

    conn = libvirt_path.connect(uri)
    name = guest.unique_name("vs-demo")
    work = Path(tempfile.mkdtemp(prefix="vs-demo-", dir="/var/tmp"))
    result = DemoResult(name)
    try:
        log(f"1/4 booting throwaway guest {name} ({memory_mib} MiB, {fill_mib} MiB filled, {guest.accel()})")
        guest.create(conn, name, memory_mib=memory_mib, fill_mib=fill_mib)
        guest.wait_tick(name, 2, timeout=120)
        before = guest.tick_mark(name)
        log("2/4 tracing a managed-save cycle through libvirt (managed save, then start)")
        libvirt_trace = capture.trace_domain(conn, name, op="cycle")
        c = guest.wait_ticks_continue(before)
        result.ticks = {"libvirt_before_save": c.last_before, "libvirt_after_restore": c.first_after}
        if not c.survived:
            raise OperationFailed(f"guest memory did not survive libvirt's restore ({c})")
        log("3/4 replaying the trace through the direct QMP backend (own QEMU, own QMP socket)")
        serial = work / "direct-serial.log"
        direct_trace = replay.replay(libvirt_trace, image=work / "direct.save", serial_log=str(serial),
                                     input_name="libvirt trace", serial_pattern=r"tick [2-9]", run_after=2.5)
        ticks = [int(x.split()[1]) for x in serial.read_text(errors="replace").splitlines()
                 if x.startswith("tick ")]
        # One serial log spans the direct save and restore: a restored guest keeps counting, a
        # rebooted one would print "tick 1" again.
        if not ticks or any(b <= a for a, b in itertools.pairwise(ticks)):
            raise OperationFailed(f"direct path: guest tick counter did not continue across save/restore: {ticks}")
        result.ticks["direct_ticks"] = ticks[-1]
        log("4/4 comparing the two traces")
        d = _diff.diff_traces(libvirt_trace, direct_trace)
        result.equivalent = d.equivalent
        result.diff_text = d.render(color=color)
        result.diff_summary = d.summary()
        paths = {"libvirt": phase_results(libvirt_trace, "libvirt"), "direct": phase_results(direct_trace, "direct")}
        result.timings = {step: {path: (r[step].seconds if step in r else None) for path, r in paths.items()}
                          for step in ("save", "restore")}
        return result
    finally:
        qemu_launch.stop_all()
        guest.remove(conn, name)
        shutil.rmtree(work, ignore_errors=True)
        conn.close()
