"""The demo's result: the verdict, the memory check per path, and the tick bookkeeping behind it."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtsave.core.errors import OperationFailed
from virtsave.harness import demo
from virtsave.trace import model as tr


def _result(summary: dict[str, int], **paths: demo.PathTicks) -> demo.DemoResult:
    r = demo.DemoResult("vs-demo-x", diff_summary=summary, equivalent=not summary,
                        differences=[{"phase": "save", "kind": k, "name": "x"} for k, n in summary.items()
                                     for _ in range(n)])
    r.paths = paths or {"libvirt": demo.PathTicks(4, 5), "direct": demo.PathTicks(2, 3)}
    return r


def test_equivalent_only_when_no_difference_and_every_guest_kept_its_memory():
    assert _result({}).verdict == "equivalent"
    assert _result({}).verdict_line() == ("verdict: equivalent — direct replay vs libvirt: "
                                          "no difference after normalization")
    assert _result({"reply": 1}).verdict == "differs"
    lost = _result({}, libvirt=demo.PathTicks(4, 5), direct=demo.PathTicks(3, 1, restarted=True))
    assert lost.verdict == "differs"
    assert lost.verdict_line().endswith("guest memory NOT kept on the direct path")


def test_verdict_line_counts_differences_by_kind():
    line = _result({"reply": 1, "extra": 1, "event-changed": 1}).verdict_line()
    assert line == ("verdict: differs — direct replay vs libvirt: 3 differences after normalization "
                    "(event-changed 1, extra 1, reply 1)")


def test_json_result_holds_the_same_as_the_text():
    d = _result({"extra": 2}).to_dict()
    assert d["verdict"] == "differs" and d["difference_count"] == 2 and d["diff_summary"] == {"extra": 2}
    assert d["summary"] == _result({"extra": 2}).verdict_line()
    assert d["paths"]["libvirt"] == {"survived": True, "tick_before_save": 4, "tick_after_restore": 5,
                                     "restarted": False}
    assert d["kept_dir"] is None and d["kept"] == {}


@pytest.mark.parametrize(("seen", "expected"), [
    ([(1.0, 1), (2.0, 2), (9.0, 3), (10.0, 4)], (2, 3, False, True)),
    ([(1.0, 5), (2.0, 6), (9.0, 1), (10.0, 2)], (6, 1, True, False)),     # rebooted
    ([(1.0, 5), (2.0, 6)], (6, None, False, False)),                      # nothing after the restore
    ([(9.0, 7)], (None, 7, False, False)),                                # nothing before the save
])
def test_split_ticks_at_the_restore(seen, expected):
    t = demo.split_ticks(seen, boundary=5.0)
    assert (t.before_save, t.after_restore, t.restarted, t.survived) == expected


def _trace_with_restore_events(*events: tuple[str, dict | None, float]) -> tr.Trace:
    t = tr.new_trace("direct")
    ph = tr.add_phase(t, "restore", "restore")
    ph["messages"] += [tr.event(name, data, {"seconds": int(ts), "microseconds": round(ts % 1 * 1e6)})
                       for name, data, ts in events]
    return t


def test_restore_instant_is_the_incoming_migration_completing():
    t = _trace_with_restore_events(("MIGRATION", {"status": "active"}, 100.25),
                                   ("MIGRATION", {"status": "completed"}, 101.5), ("RESUME", None, 101.75))
    assert demo.restore_instant(t) == 101.5
    assert demo.restore_instant(_trace_with_restore_events(("RESUME", None, 7.0))) == 7.0
    with pytest.raises(OperationFailed, match="cannot tell"):
        demo.restore_instant(_trace_with_restore_events(("MIGRATION", {"status": "active"}, 1.0)))


def test_tick_watch_notes_each_tick_once_even_split_across_reads(tmp_path: Path):
    log = tmp_path / "serial.log"
    watch = demo.TickWatch(log, interval=60)   # no polling thread reads here: only our read() calls
    watch.read()                               # no file yet
    log.write_bytes(b"filled 64 MiB\ntick 1\r\ntick 2\nti")
    watch.read()
    with log.open("ab") as f:
        f.write(b"ck 3\ntick 4\n")
    watch.read()
    assert [n for _, n in watch.ticks] == [1, 2, 3, 4]
    times = [t for t, _ in watch.ticks]
    assert times == sorted(times)
