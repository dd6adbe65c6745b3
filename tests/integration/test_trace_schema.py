"""Traces the live code paths write fit the closed trace schema: a live libvirt trace (save to a file with
options, restore), its replay through the direct backend (with the diff and a QEMU left running), and a
replay that fails (the evidence trace). Every object virtsave defines must be declared, or validation fails.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from pathlib import Path

import pytest

from virtsave.libvirtd import capture
from virtsave.qemu import launch as qemu_launch
from virtsave.qemu import replay
from virtsave.trace import model as tr

pytestmark = pytest.mark.integration


def _roundtrip(trace: tr.Trace, path: Path) -> tr.Trace:
    assert tr.validate(trace) == []
    tr.dump(trace, path)
    back = tr.load(path)  # validates again, from the file
    assert back == trace
    return back


def test_live_trace_and_replays_validate(conn, make_guest, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    name = make_guest(memory_mib=256, fill_mib=32)
    live = capture.trace_domain(conn, name, op="cycle", file=str(workdir / "live.save"), bypass_cache=True,
                                state="running")
    _roundtrip(live, workdir / "live.json")
    save, restore = live["phases"]
    assert save["options"] == {"bypass_cache": True, "file": str(workdir / "live.save")}
    assert {"window", "seconds", "monitor"} <= set(save) and save["image"] and save["image"]["header"]
    assert restore["options"].get("state") == "running"

    run_dir = None
    try:
        out = replay.replay(live, image=str(workdir / "replay.save"), diff=True, keep_running=True, run_for=1.0,
                            input_name="live.json")
        run_dir = out["replay"]["qemu"]["run_dir"]
        info = out["replay"]
        assert {"argv_rewrites", "timings", "diff"} <= set(info) and info["timings"]["save"]["seconds"] > 0
        assert any(p.get("substitutions") for p in out["phases"])
        _roundtrip(out, workdir / "replay.json")
    finally:
        qemu_launch.stop_all()
        if run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)

    bad = copy.deepcopy(live)
    for m in tr.iter_commands(bad["phases"][0]):
        if m["execute"] == "migrate-set-parameters":
            m["arguments"] = {"max-bandwidth": "not a number"}  # QEMU refuses: a critical command fails
    with pytest.raises(replay.ReplayFailed) as failed:
        try:
            replay.replay(bad, image=str(workdir / "failed.save"), run_for=0.5)
        finally:
            qemu_launch.stop_all()
    evidence = failed.value.trace
    assert evidence["phases"][0]["ok"] is False and evidence["phases"][0]["error"]
    _roundtrip(evidence, workdir / "failed.json")
    with contextlib.suppress(FileNotFoundError):
        (workdir / "failed.save").unlink()
