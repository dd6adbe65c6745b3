"""Unit tests of virtsave.trace.diff: trace normalization and alignment, image comparison, the diff CLI."""

from __future__ import annotations

import copy
import json

from tests.unit.test_saveimage import make_image
from virtsave.image import diff as imagediff
from virtsave.libvirtd import logparse
from virtsave.trace import diff
from virtsave.trace import model as trace


def _save_trace(ids: str = "libvirt") -> trace.Trace:
    """A realistic managed-save conversation (libvirt 11.3 shape)."""
    n = iter(range(100, 200))

    def nid() -> object:
        return f"libvirt-{next(n)}" if ids == "libvirt" else next(n)

    tr = trace.new_trace("libvirt", host={"libvirt": "11.3.0", "qemu": "10.0.2"}, domain={"name": "g"})
    ph = trace.add_phase(tr, "save", "managed-save", ok=True,
                         image={"path": "/var/lib/libvirt/qemu/save/g.save", "size": 1, "header": None})
    m = ph["messages"]

    def cmd(execute, arguments=None, ret=None, fds=0, t=0.0):
        i = nid()
        m.append(trace.command(execute, arguments, id=i, fds=fds, t=t))
        m.append(trace.reply(i, ret=ret, t=t + 0.001))

    cmd("query-migrate", t=0.0)
    cmd("stop", t=0.01)
    m.append(trace.event("STOP", timestamp={"seconds": 1, "microseconds": 5}, t=0.011))
    cmd("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": False}]}, t=0.02)
    cmd("migrate-set-parameters", {"max-bandwidth": 9223372036853727232}, t=0.03)
    cmd("getfd", {"fdname": "migrate"}, fds=1, t=0.04)
    cmd("migrate", {"detach": True, "resume": False, "uri": "fd:migrate"}, t=0.05)
    for status in ("setup", "active"):
        m.append(trace.event("MIGRATION", {"status": status}, {"seconds": 2, "microseconds": 1}, t=0.06))
    m.append(trace.event("MIGRATION_PASS", {"pass": 1}, {"seconds": 2, "microseconds": 2}, t=0.07))
    m.append(trace.event("MIGRATION", {"status": "completed"}, {"seconds": 3, "microseconds": 0}, t=0.9))
    cmd("query-migrate", ret={"status": "completed", "total-time": 163, "downtime": 59,
                              "ram": {"total": 268828672, "transferred": 137217851, "mbps": 6776.19}}, t=0.91)
    cmd("query-fdsets", ret=[], t=0.92)
    return tr


def test_identical_and_renumbered_traces_are_equivalent():
    a = _save_trace()
    assert diff.diff_traces(a, a).equivalent
    b = _save_trace(ids="qmp")          # qemu.qmp-style integer ids, everything else equal
    for ph in b["phases"]:
        for msg in ph["messages"]:
            msg["t"] = msg["t"] * 3 + 1
            if msg["kind"] == "event":
                msg["timestamp"] = {"seconds": 99, "microseconds": 1}
    d = diff.diff_traces(a, b)
    assert d.equivalent, d.render()
    assert d.render().rstrip().endswith("equivalent")


def test_acceptance_removed_changed_event_missing_each_once_in_place():
    a = _save_trace()
    b = copy.deepcopy(a)
    msgs = b["phases"][0]["messages"]
    i = next(k for k, x in enumerate(msgs) if x.get("execute") == "migrate-set-parameters")
    del msgs[i:i + 2]                                            # command + its reply removed
    next(x for x in msgs if x.get("execute") == "migrate")["arguments"]["resume"] = True
    j = next(k for k, x in enumerate(msgs) if x.get("event") == "MIGRATION" and x["data"]["status"] == "active")
    del msgs[j]
    d = diff.diff_traces(a, b)
    assert not d.equivalent
    assert sorted((x.kind, x.name) for x in d.differences) == [
        ("changed", "migrate"), ("event-missing", "MIGRATION"), ("missing", "migrate-set-parameters")]
    changed = next(x for x in d.differences if x.kind == "changed")
    assert changed.details == ["arguments.resume: false → true"]
    lines = d.render().splitlines()
    # in place: the removed command sits between its neighbours, the event between its own
    k = next(n for n, ln in enumerate(lines) if ln.startswith("- migrate-set-parameters"))
    assert lines[k - 1].startswith("  migrate-set-capabilities") and lines[k + 1].startswith("  getfd")
    e = next(n for n, ln in enumerate(lines) if ln.startswith("- MIGRATION"))
    assert '"active"' in lines[e] and '"setup"' in lines[e - 1] and '"completed"' in lines[e + 1]
    assert sum(ln.startswith(("- ", "+ ", "~ ", "> ")) for ln in lines) == 3
    assert lines[-1] == "3 differences: changed 1, event-missing 1, missing 1"
    js = d.to_json()
    assert js["equivalent"] is False and js["summary"] == {"missing": 1, "changed": 1, "event-missing": 1}
    json.dumps(js)


def test_normalization_table_rules():
    a = _save_trace()
    b = copy.deepcopy(a)
    msgs = b["phases"][0]["messages"]
    getfd = next(x for x in msgs if x.get("execute") == "getfd")
    getfd["arguments"]["fdname"] = "incoming"
    next(x for x in msgs if x.get("execute") == "migrate")["arguments"]["uri"] = "fd:incoming"
    qm = next(x for x in msgs if x["kind"] == "reply" and isinstance(x.get("return"), dict) and "ram" in x["return"])
    qm["return"].update({"total-time": 1, "downtime": 2})
    qm["return"]["ram"].update({"transferred": 5, "mbps": 1.5})
    next(x for x in msgs if x.get("event") == "MIGRATION_PASS")["data"]["pass"] = 3
    b["phases"][0]["image"]["path"] = "/var/tmp/other.img"
    # qemu.qmp's capability negotiation
    for tr, enable in ((a, None), (b, ["oob"])):
        tr["phases"][0]["messages"][:0] = [trace.command("qmp_capabilities", {"enable": enable} if enable else None,
                                                         id="c0"), trace.reply("c0")]
    d = diff.diff_traces(a, b)
    assert d.equivalent, d.render()
    strict = diff.diff_traces(a, b, strict=True)
    kinds = sorted((x.kind, x.name) for x in strict.differences)
    assert ("changed", "getfd") in kinds and ("changed", "migrate") in kinds
    assert ("changed", "qmp_capabilities") in kinds and ("reply", "query-migrate") in kinds
    assert ("event-changed", "MIGRATION_PASS") in kinds
    # shape still counts: a status that is not volatile
    qm["return"]["status"] = "failed"
    d = diff.diff_traces(a, b)
    assert [(x.kind, x.details) for x in d.differences] == [
        ("reply", ['reply return.status: "completed" → "failed"'])]


def test_substitutions_compare_the_original():
    a = _save_trace()
    b = copy.deepcopy(a)
    msgs = b["phases"][0]["messages"]
    idx = next(k for k, x in enumerate(msgs) if x.get("execute") == "migrate")
    msgs[idx]["arguments"]["uri"] = "exec:cat > /var/tmp/x.img"
    b["phases"][0]["substitutions"] = [{"index": idx, "field": "uri", "original": "fd:migrate",
                                        "replacement": "exec:cat > /var/tmp/x.img", "reason": "tcp"}]
    assert diff.diff_traces(a, b).equivalent
    strict = diff.diff_traces(a, b, strict=True)
    assert [(x.kind, x.name) for x in strict.differences] == [("changed", "migrate")]


def test_replay_shaped_substitutions_and_id_less_negotiation():
    """As `virtsave replay` records them: top-level fields, arguments.* paths, qmp_capabilities without id."""
    a = trace.new_trace("libvirt")
    pa = trace.add_phase(a, "restore", "restore", ok=True)
    pa["messages"] += [trace.command("qmp_capabilities", id="libvirt-1"), trace.reply("libvirt-1"),
                       trace.command("getfd", {"fdname": "incoming"}, id="libvirt-2", fds=1), trace.reply("libvirt-2"),
                       trace.command("migrate-incoming", {"uri": "fd:28"}, id="libvirt-3"), trace.reply("libvirt-3")]
    b = trace.new_trace("direct")
    pb = trace.add_phase(b, "restore", "restore", ok=True)
    pb["messages"] += [trace.command("qmp_capabilities", {"enable": ["oob"]}), trace.reply(None),
                       trace.command("getfd", {"fdname": "incoming"}, id="__qmp#1", fds=1), trace.reply("__qmp#1"),
                       trace.command("migrate-incoming", {"uri": "exec:cat img"}, id="__qmp#2"), trace.reply("__qmp#2")]
    pb["substitutions"] = [
        {"index": 0, "field": "execute", "original": "qmp_capabilities", "replacement": None, "reason": "qemu.qmp"},
        {"index": 2, "field": "fds", "original": 1, "replacement": 1, "reason": "our fd"},
        {"index": 4, "field": "arguments.uri", "original": "fd:28", "replacement": "exec:cat img", "reason": "tcp"}]
    d = diff.diff_traces(a, b)
    assert d.equivalent, d.render()
    assert "fds" not in pb["messages"][2]["arguments"]          # the input trace is never modified
    pb["messages"][1] = {"kind": "reply", "id": None, "error": {"class": "GenericError", "desc": "x"}, "t": 0}
    assert [x.kind for x in diff.diff_traces(a, b).differences] == ["reply"]


def test_reordered_command_reported_once():
    a = _save_trace()
    b = copy.deepcopy(a)
    msgs = b["phases"][0]["messages"]
    i = next(k for k, x in enumerate(msgs) if x.get("execute") == "query-fdsets")
    pair = msgs[i:i + 2]
    del msgs[i:i + 2]
    j = next(k for k, x in enumerate(msgs) if x.get("execute") == "getfd")
    msgs[j:j] = pair
    d = diff.diff_traces(a, b)
    assert [(x.kind, x.name) for x in d.differences] == [("reordered", "query-fdsets")]
    assert sum(ln.startswith("> query-fdsets") for ln in d.render().splitlines()) == 1


def test_phase_outcome_and_missing_phase():
    a = _save_trace()
    b = copy.deepcopy(a)
    b["phases"][0]["ok"] = False
    b["phases"][0]["error"] = "migration failed"
    trace.add_phase(b, "restore", "start", ok=True)
    d = diff.diff_traces(a, b)
    kinds = sorted((x.kind, x.name) for x in d.differences)
    assert kinds == [("outcome", "error"), ("outcome", "ok"), ("phase-extra", "restore")]


def test_real_logs_9_0_vs_11_3(fixtures_dir):
    for scen in ("managedsave-running.log", "managedsave-restore.log"):
        a = logparse.trace_from_log(fixtures_dir / "libvirt-9.0-attributed" / scen)
        b = logparse.trace_from_log(fixtures_dir / "libvirt-11.3-attributed" / scen)
        assert diff.diff_traces(a, a).equivalent and diff.diff_traces(b, b).equivalent
        d = diff.diff_traces(a, b)
        found = {(x.phase, x.kind, x.name) for x in d.differences}
        if scen.startswith("managedsave-running"):
            assert ("save", "extra", "query-fdsets") in found
            assert ("save", "changed", "migrate-set-capabilities") in found
        else:
            mi = [x for x in d.differences if x.name == "migrate-incoming" and x.kind == "changed"]
            assert len(mi) == 1 and mi[0].details == ["arguments.exit-on-error: (absent) → false"]
        # never the same difference twice
        keys = [(x.phase, x.kind, x.name, x.a, x.b) for x in d.differences]
        assert len(keys) == len(set(keys))


def test_image_diff(tmp_path):
    make_image(tmp_path / "a.img")
    make_image(tmp_path / "b.img")
    assert imagediff.diff_images(tmp_path / "a.img", tmp_path / "b.img").equivalent
    make_image(tmp_path / "c.img", capabilities=("x-extra",))
    d = imagediff.diff_images(tmp_path / "a.img", tmp_path / "c.img")
    assert [(x.area, x.name) for x in d.differences] == [("stream", "configuration.capabilities")]


def test_canonical_xml_ignores_regenerated():
    x1 = "<domain id='3' type='qemu'><name>g</name><seclabel><label>a:b:c0,c1</label></seclabel></domain>"
    x2 = "<domain type='qemu' id='9'><name>g</name><seclabel><label>a:b:c5,c7</label></seclabel></domain>"
    ign = diff.image_rules()["xml_ignore"]
    assert imagediff.canonical_xml(x1, ign) == imagediff.canonical_xml(x2, ign)


def test_cli_diff_exit_codes(tmp_path, cli):
    a = _save_trace()
    b = copy.deepcopy(a)
    del b["phases"][0]["messages"][0:2]
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    trace.dump(a, pa)
    trace.dump(b, pb)
    r = cli("diff", str(pa), str(pa))
    assert r.returncode == 0, r.stderr
    r = cli("diff", str(pa), str(pb))
    assert r.returncode == 1 and "- query-migrate" in r.stdout and "\x1b[" not in r.stdout
    r = cli("diff", "--json", str(pa), str(pb))
    assert r.returncode == 1 and json.loads(r.stdout)["summary"] == {"missing": 1}
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01garbage")
    r = cli("diff", str(pa), str(junk))
    assert r.returncode == 2 and "neither a virtsave trace" in r.stderr
    make_image(tmp_path / "i.img")
    r = cli("diff", str(pa), str(tmp_path / "i.img"))
    assert r.returncode == 2 and "cannot compare" in r.stderr
    r = cli("diff", str(tmp_path / "i.img"), str(tmp_path / "i.img"))
    assert r.returncode == 0, r.stdout + r.stderr
