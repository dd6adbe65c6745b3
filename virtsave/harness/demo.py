"""``virtsave demo``: the whole harness on the built-in guest, in one command.

Boots a throwaway guest, traces a managed-save cycle through libvirt, replays the trace
through the direct backend, diffs the two traces, times both paths' save and restore, and
checks on each path that the guest kept its memory: its ``tick`` counter went on across the
save and restore (a rebooted guest would count from 1 again). Everything it made (domain,
images, traces, logs) is removed at the end, also on Ctrl-C — unless *keep*: then the
traces, the diff, the direct path's image and both serial logs stay in one private directory.

The serial logs carry no timestamps, QEMU's events do: a thread notes when each tick line
shows up, and the restore phase's ``MIGRATION completed`` event (the guest is paused then,
as it has been since the save stopped it) splits the ticks into before-save and after-restore.

Example::

    from virtsave.harness import demo
    result = demo.run(log=print)
    print(result.verdict_line())

    >>> t = split_ticks([(10.0, 1), (11.0, 2), (15.0, 3)], boundary=14.0)
    >>> (t.before_save, t.after_restore, t.survived)
    (2, 3, True)
    >>> split_ticks([(10.0, 4), (15.0, 1)], boundary=14.0).survived   # a reboot counts from 1 again
    False
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from virtsave.core.errors import OperationFailed
from virtsave.core.files import private_writer
from virtsave.core.operation import OpResult
from virtsave.harness import guest
from virtsave.libvirtd import capture
from virtsave.libvirtd import reference as libvirt_path
from virtsave.qemu import launch as qemu_launch
from virtsave.qemu import replay
from virtsave.trace import model as tr

__all__ = ["DemoResult", "PathTicks", "TickWatch", "restore_instant", "run", "split_ticks"]

_TICK = re.compile(rb"^tick (\d+)\r?$", re.M)

#: The two paths, in the order the demo runs them.
PATHS = ("libvirt", "direct")


@dataclass
class PathTicks:
    """How one path's guest counted across its save and restore."""

    before_save: int | None = None     # the last tick printed before the save
    after_restore: int | None = None   # the first tick printed after the restore
    restarted: bool = False            # some tick was not larger than the one before it

    @property
    def survived(self) -> bool:
        """The counter went on: ticks on both sides, each larger than the one before."""
        return (self.before_save is not None and self.after_restore is not None and not self.restarted
                and self.after_restore > self.before_save)

    def to_dict(self) -> dict[str, Any]:
        return {"survived": self.survived, "tick_before_save": self.before_save,
                "tick_after_restore": self.after_restore, "restarted": self.restarted}


@dataclass
class DemoResult:
    """What the demo measured and found."""

    domain: str
    timings: dict[str, dict[str, float | None]] = field(default_factory=dict)
    paths: dict[str, PathTicks] = field(default_factory=dict)
    equivalent: bool = False           # the two traces, after normalization
    diff_text: str = ""
    diff_summary: dict[str, int] = field(default_factory=dict)
    differences: list[dict[str, Any]] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)   # artefact → path (only with keep)
    kept_dir: str | None = None

    @property
    def verdict(self) -> str:
        """``equivalent`` when the traces match after normalization and both guests kept their memory."""
        ok = self.equivalent and all(p.survived for p in self.paths.values())
        return "equivalent" if ok else "differs"

    def verdict_line(self) -> str:
        """One line: the verdict, how many differences of which kinds, any memory lost."""
        n = sum(self.diff_summary.values())
        if n:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.diff_summary.items()))
            what = f"{n} difference{'s' if n != 1 else ''} after normalization ({kinds})"
        else:
            what = "no difference after normalization"
        lost = [p for p, t in self.paths.items() if not t.survived]
        if lost:
            what += f"; guest memory NOT kept on the {' and '.join(lost)} path"
        return f"verdict: {self.verdict} — direct replay vs libvirt: {what}"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "summary": self.verdict_line(), "domain": self.domain,
                "equivalent": self.equivalent, "difference_count": len(self.differences),
                "diff_summary": self.diff_summary, "differences": self.differences, "timings": self.timings,
                "paths": {p: t.to_dict() for p, t in self.paths.items()},
                "kept_dir": self.kept_dir, "kept": self.kept}


class TickWatch:
    """Note the wall-clock time at which each ``tick N`` line of a serial log shows up.

    A thread reads what the file gained every *interval* seconds; :meth:`stop` reads the rest.
    """

    def __init__(self, path: str | os.PathLike[str], interval: float = 0.05) -> None:
        self.path = Path(path)
        self.interval = interval
        self.ticks: list[tuple[float, int]] = []
        self._offset = 0
        self._partial = b""
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="virtsave-ticks", daemon=True)

    def __enter__(self) -> TickWatch:
        self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def read(self) -> None:
        """Take in whatever the log gained since the last read."""
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self._offset:   # truncated: start over
                    self._offset, self._partial = 0, b""
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        now = time.time()
        self._offset += len(data)
        data, _, self._partial = (self._partial + data).rpartition(b"\n")
        self.ticks += [(now, int(m)) for m in _TICK.findall(data + b"\n")]

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            self.read()

    def stop(self) -> list[tuple[float, int]]:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.read()
        return self.ticks

    def wait_after(self, boundary: float, timeout: float = 30.0) -> bool:
        """Wait until a tick showed up after *boundary* (a wall-clock time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(t >= boundary for t, _ in self.ticks):
                return True
            time.sleep(self.interval)
        return False


def restore_instant(trace: tr.Trace) -> float:
    """Wall-clock time of the restore's ``MIGRATION completed`` event (``RESUME`` if none)."""
    ph = tr.find_phase(trace, "restore") or {}
    events = [m for m in ph.get("messages", []) if m.get("kind") == "event" and m.get("timestamp")]
    for want in ("MIGRATION", "RESUME"):
        for m in events:
            if m["event"] == want and (want == "RESUME" or (m.get("data") or {}).get("status") == "completed"):
                ts = m["timestamp"]
                return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
    raise OperationFailed(f"{trace.get('source')} trace: no MIGRATION completed or RESUME event in its restore "
                          "phase, cannot tell which ticks came after the restore")


def split_ticks(seen: list[tuple[float, int]], boundary: float) -> PathTicks:
    """Split ``(time seen, tick)`` pairs at *boundary*: the guest printed nothing while it was saved."""
    before = [n for t, n in seen if t < boundary]
    after = [n for t, n in seen if t >= boundary]
    values = [n for _, n in seen]
    return PathTicks(before[-1] if before else None, after[0] if after else None,
                     any(b <= a for a, b in itertools.pairwise(values)))


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


def _write_json(path: Path, data: Any) -> None:
    with private_writer(path) as f:
        f.write((json.dumps(data, indent=1, default=str) + "\n").encode())


def _keep(work: Path, name: str, traces: dict[str, tr.Trace], diff_json: dict[str, Any] | None) -> dict[str, str]:
    """Leave the run's artefacts in *work* (0700 directory, 0600 files); return what is where."""
    for path, trace in traces.items():
        tr.dump(trace, work / f"{path}.trace.json")
    if diff_json is not None:
        _write_json(work / "diff.json", diff_json)
    with contextlib.suppress(OSError):
        shutil.copyfile(guest.serial_log(name), work / "libvirt-serial.log")
    kept = {}
    for f in sorted(work.iterdir()):
        if f.is_file():
            f.chmod(0o600)
            kept[f.name] = str(f)
    return kept


def run(uri: str | None = None, memory_mib: int = 256, fill_mib: int = 64,
        log: Callable[[str], None] = print, color: bool = False, keep: bool = False) -> DemoResult:
    """Run the demo; raise :class:`~virtsave.core.errors.VirtsaveError` on failure (after cleaning up)."""
    from virtsave.trace import diff as _diff

    conn = libvirt_path.connect(uri)
    name = guest.unique_name("vs-demo")
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/var/tmp"))   # named after the guest: findable
    result = DemoResult(name)
    traces: dict[str, tr.Trace] = {}
    diff_json: dict[str, Any] | None = None
    try:
        log(f"1/4 booting throwaway guest {name} ({memory_mib} MiB, {fill_mib} MiB filled, {guest.accel()})")
        guest.create(conn, name, memory_mib=memory_mib, fill_mib=fill_mib)
        guest.wait_tick(name, 2, timeout=120)
        log("2/4 tracing a managed-save cycle through libvirt (managed save, then start)")
        with TickWatch(guest.serial_log(name)) as watch:
            traces["libvirt"] = capture.trace_domain(conn, name, op="cycle")
            boundary = restore_instant(traces["libvirt"])
            watch.wait_after(boundary)
        result.paths["libvirt"] = split_ticks(watch.ticks, boundary)
        log("3/4 replaying the trace through the direct QMP backend (own QEMU, own QMP socket)")
        serial = work / "direct-serial.log"
        # One serial log spans the direct save and restore: a restored guest keeps counting.
        with TickWatch(serial) as watch:
            traces["direct"] = replay.replay(traces["libvirt"], image=work / "direct.save", serial_log=str(serial),
                                             input_name="libvirt trace", serial_pattern=r"tick [2-9]",
                                             run_after=2.5)
        result.paths["direct"] = split_ticks(watch.ticks, restore_instant(traces["direct"]))
        log("4/4 comparing the two traces")
        d = _diff.diff_traces(traces["libvirt"], traces["direct"], a_label="libvirt path", b_label="direct replay")
        diff_json = d.to_json()
        result.equivalent = d.equivalent
        result.diff_text = d.render(color=color)
        result.diff_summary = d.summary()
        result.differences = [{k: x[k] for k in ("phase", "kind", "name")} for x in diff_json["differences"]]
        paths = {p: phase_results(traces[p], p) for p in ("libvirt", "direct")}
        result.timings = {step: {path: (r[step].seconds if step in r else None) for path, r in paths.items()}
                          for step in ("save", "restore")}
        return result
    finally:
        qemu_launch.stop_all()
        try:
            if keep:
                result.kept, result.kept_dir = _keep(work, name, traces, diff_json), str(work)
        finally:
            guest.remove(conn, name)
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
            conn.close()
