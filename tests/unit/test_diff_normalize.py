"""Trace normalization and alignment of virtsave.trace.diff, rule by rule and case by case: what each
action does to a message, which rules a diff reports as applied (the ones that changed a message, not
every rule in force), how replies find their commands, and how commands are aligned."""

from __future__ import annotations

import copy
import difflib
import json
import random
import re
from typing import Any

import pytest

from tests.unit.test_diff import _save_trace
from virtsave.core.errors import VirtsaveError
from virtsave.trace import diff
from virtsave.trace import model as trace

TABLE_IDS = [r.id for r in diff.load_rules()]


# --------------------------------------------------------------------------- the rules that fired


#: What _save_trace's messages give the rules to do: ids and times everywhere, the fd name of getfd and
#: migrate's fd: URI, query-migrate's volatile statistics, MIGRATION_PASS. Nothing else matches.
SAVE_TRACE_FIRES = ["message-id", "relative-time", "event-timestamp", "getfd-name", "fd-uri",
                    "query-migrate-times", "query-migrate-downtime", "query-migrate-ram-counters", "migration-pass"]


def test_diff_lists_the_rules_that_fired_not_every_rule():
    a = _save_trace()
    d = diff.diff_traces(a, copy.deepcopy(a))
    assert d.rules == SAVE_TRACE_FIRES                     # table order, each once
    assert len(d.rules) < len(TABLE_IDS)
    assert d.to_json()["normalization"] == {"table": str(diff.NORMALIZE_TABLE), "rules": SAVE_TRACE_FIRES}
    strict = diff.diff_traces(a, a, strict=True)
    assert strict.rules == ["message-id", "relative-time", "event-timestamp"]


def test_a_rule_fires_when_one_side_needs_it():
    """Only B has a libvirt domain directory and an image path: those rules fired (for B)."""
    a = _save_trace()
    b = copy.deepcopy(a)
    msgs = b["phases"][0]["messages"]
    msgs[0:0] = [trace.command("query-chardev", id="x1"),
                 trace.reply("x1", ret=[{"label": "charmonitor", "filename": "/var/lib/libvirt/qemu/domain-7-g/m"}])]
    d = diff.diff_traces(a, b)
    assert "libvirt-domain-dir" in d.rules and "chardev-filenames" in d.rules and "image-path" not in d.rules
    b["phases"][0]["messages"].append(trace.command("x-dump", {"to": "/var/lib/libvirt/qemu/save/g.save"}, id="x2"))
    assert "image-path" in diff.diff_traces(a, b).rules


def test_no_messages_no_rules():
    a = trace.new_trace("libvirt")
    trace.add_phase(a, "save", "save", ok=True)
    assert diff.diff_traces(a, a).rules == []


def test_cli_json_lists_the_fired_rules(tmp_path, cli):
    a = _save_trace()
    pa = tmp_path / "a.json"
    trace.dump(a, pa)
    r = cli("diff", "--json", str(pa), str(pa))
    assert r.returncode == 0, r.stderr
    norm = json.loads(r.stdout)["normalization"]
    assert norm == {"table": str(diff.NORMALIZE_TABLE), "rules": SAVE_TRACE_FIRES}
    r = cli("diff", "--json", "--strict", str(pa), str(pa))
    assert json.loads(r.stdout)["normalization"]["rules"] == ["message-id", "relative-time", "event-timestamp"]


def test_own_table_is_named_and_only_its_rules_fire(tmp_path):
    table = json.loads(diff.NORMALIZE_TABLE.read_text())
    table["rules"] = [r for r in table["rules"] if r["id"] in ("message-id", "relative-time", "event-timestamp")]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(table))
    a = _save_trace()
    d = diff.diff_traces(a, a, rules_path=path)
    assert d.to_json()["normalization"] == {"table": str(path),
                                            "rules": ["message-id", "relative-time", "event-timestamp"]}


# --------------------------------------------------------------------------- loading the table


def _rule(**kw: Any) -> diff.Rule:
    base = {"id": "r", "category": "c", "strict": False, "kind": "any", "execute": None, "path": ("x",),
            "action": "drop", "params": {}}
    base.update(kw)
    if isinstance(base["execute"], str):
        base["execute"] = re.compile(base["execute"])
    return diff.Rule(**base)  # type: ignore[arg-type]


def test_load_rules_reads_every_field(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": "virtsave-normalize", "rules": [
        {"id": "a", "category": "fd", "strict": True, "kind": "command", "execute": "getfd|closefd",
         "path": "arguments.fdname", "action": "placeholder", "value": "<x>", "why": "because"},
        {"id": "b", "path": "**", "action": "regex", "pattern": "p", "replace": "q"}]}))
    a, b = diff.load_rules(path)
    assert (a.id, a.category, a.strict, a.kind, a.path, a.action, a.params) == (
        "a", "fd", True, "command", ("arguments", "fdname"), "placeholder", {"value": "<x>"})
    assert a.execute is not None and a.execute.pattern == "getfd|closefd"
    assert (b.category, b.strict, b.kind, b.execute, b.path, b.params) == ("", False, "any", None, ("**",),
                                                                           {"pattern": "p", "replace": "q"})


@pytest.mark.parametrize(("content", "message"), [
    ("{", "is not valid JSON"),
    ('{"format": "other"}', "not a virtsave normalization table"),
    ("[1]", "not a virtsave normalization table"),
    ('{"format": "virtsave-normalize", "rules": [{"id": "z", "path": "x", "action": "explode"}]}',
     "rule 0 (z): unknown action 'explode'"),
])
def test_bad_tables_are_one_error(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(VirtsaveError, match=re.escape(message)):
        diff.load_rules(path)


def test_missing_table(tmp_path):
    with pytest.raises(VirtsaveError, match=r"cannot read normalization table .*No such file"):
        diff.load_rules(tmp_path / "none.json")


def test_image_rules():
    assert diff.image_rules()["header_layout_fields"] == ["data_len", "cookie_offset", "stream_offset"]


# --------------------------------------------------------------------------- the pieces of a rule


def test_type_of_keeps_shape_and_names_leaf_types():
    v = {"a": [1, 2.5, True, None, "s"], "b": {"c": False}, "d": []}
    assert diff._type_of(v) == {"a": ["<number>", "<number>", "<bool>", "<null>", "<str>"], "b": {"c": "<bool>"},
                                "d": []}
    assert diff._type_of(0) == "<number>" and diff._type_of("") == "<str>"


def _visits(obj: Any, path: tuple[str, ...]) -> list[Any]:
    seen: list[Any] = []
    diff._walk(obj, path, lambda o, k: seen.append(k))
    return seen


def test_walk_follows_segments():
    doc = {"a": {"b": 1, "bb": 2, "c": [10, 20, 30]}, "x": 5}
    assert _visits(doc, ("a", "b")) == ["b"]                 # a full match, not a prefix
    assert _visits(doc, ("a", "b+")) == ["b", "bb"]          # each segment is a regular expression
    assert _visits(doc, ("a", "*")) == ["b", "bb", "c"]
    assert _visits(doc, ("a", "c", "1")) == [1]
    assert _visits(doc, ("a", "c", "*")) == [2, 1, 0]        # lists from the end (removals keep indices)
    assert _visits(doc, ("a", "c", "7")) == []
    assert _visits(doc, ("x", "y")) == []                    # no container there
    assert _visits(doc, ()) == []
    assert _visits([{"k": 1}, {"k": 2}], ("*", "k")) == ["k", "k"]


def test_map_strings():
    v = {"a": ["x", 1, {"b": "y"}], "c": None, "d": "z"}
    assert diff._map_strings(v, str.upper) == {"a": ["X", 1, {"b": "Y"}], "c": None, "d": "Z"}
    assert diff._map_strings(7, str.upper) == 7


@pytest.mark.parametrize(("action", "params", "obj", "key", "changed", "after"), [
    ("drop", {}, {"k": 1, "j": 2}, "k", True, {"j": 2}),
    ("drop", {}, [1, 2], 0, False, [1, 2]),
    ("placeholder", {"value": "<v>"}, {"k": 1}, "k", True, {"k": "<v>"}),
    ("placeholder", {"value": "<v>"}, {"k": "<v>"}, "k", False, {"k": "<v>"}),
    ("placeholder", {}, {"k": 1}, "k", True, {"k": None}),
    ("regex", {"pattern": "a+", "replace": "b"}, {"k": "caaat"}, "k", True, {"k": "cbt"}),
    ("regex", {"pattern": "a+"}, {"k": "caaat"}, "k", True, {"k": "ct"}),
    ("regex", {"pattern": "z"}, {"k": "caaat"}, "k", False, {"k": "caaat"}),
    ("regex", {"pattern": "a"}, {"k": 5}, "k", False, {"k": 5}),
    ("type", {}, {"k": {"n": 1}}, "k", True, {"k": {"n": "<number>"}}),
    ("type", {}, {"k": "<str>"}, "k", False, {"k": "<str>"}),
    ("remove-items", {"items": ["oob"]}, {"k": ["oob", "x"]}, "k", True, {"k": ["x"]}),
    ("remove-items", {"items": ["oob"]}, {"k": ["x"]}, "k", False, {"k": ["x"]}),
    ("remove-items", {}, {"k": ["x"]}, "k", False, {"k": ["x"]}),
    ("remove-items", {"items": ["oob"], "prune": True}, {"k": ["oob"]}, "k", True, {}),
    ("remove-items", {"items": ["oob"]}, {"k": ["oob"]}, "k", True, {"k": []}),
    ("remove-items", {"items": ["oob"], "prune": True}, {"k": ["oob", "y"]}, "k", True, {"k": ["y"]}),
    ("remove-items", {"items": ["oob"], "prune": True}, ["oob"], 0, False, ["oob"]),
    ("remove-items", {"items": ["oob"]}, {"k": "oob"}, "k", False, {"k": "oob"}),
    ("drop-message", {}, {"k": 1}, "k", False, {"k": 1}),
])
def test_edit_each_action(action, params, obj, key, changed, after):
    obj = copy.deepcopy(obj)        # the parameters are shared between runs of the test
    assert diff._edit(_rule(action=action, params=params), obj, key) is changed
    assert obj == after


def test_apply_everywhere_regex_spares_kind_and_name():
    m = {"kind": "command", "execute": "domain-1-x", "arguments": {"p": "/x/domain-1-y"}, "id": "domain-1-z"}
    r = _rule(path=("**",), action="regex", params={"pattern": "domain-[0-9]+-"})
    assert diff._apply(r, m, []) is True
    assert m == {"kind": "command", "execute": "domain-1-x", "arguments": {"p": "/x/y"}, "id": "z"}
    assert diff._apply(r, m, []) is False
    e = {"kind": "event", "event": "domain-1-E", "data": {"a": ["domain-2-q"]}}
    r2 = _rule(path=("**",), action="regex", params={"pattern": "domain-[0-9]+-", "replace": "D-"})
    assert diff._apply(r2, e, []) is True and e == {"kind": "event", "event": "domain-1-E", "data": {"a": ["D-q"]}}


def test_apply_image_path_longest_first():
    r = _rule(path=("**",), action="image-path")
    m = {"kind": "command", "execute": "/a/b", "arguments": {"x": "/a/b/c and /a/d"}}
    assert diff._apply(r, m, ["/a", "", "/a/b"]) is True
    assert m["arguments"] == {"x": "<image>/c and <image>/d"} and m["execute"] == "/a/b"
    assert diff._apply(r, m, []) is False and diff._apply(r, m, [""]) is False
    assert diff._apply(r, {"kind": "reply", "return": "/q"}, ["/a"]) is False


def test_apply_at_a_path_and_pruning_the_arguments():
    oob = _rule(kind="command", execute="qmp_capabilities", path=("arguments", "enable"), action="remove-items",
                params={"items": ["oob"], "prune": True})
    m = {"kind": "command", "execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}
    assert diff._apply(oob, m, []) is True and m == {"kind": "command", "execute": "qmp_capabilities"}
    m = {"kind": "command", "execute": "qmp_capabilities", "arguments": {"enable": ["oob", "x"]}}
    assert diff._apply(oob, m, []) is True and m["arguments"] == {"enable": ["x"]}
    m = {"kind": "command", "execute": "qmp_capabilities", "arguments": {}}
    assert diff._apply(oob, m, []) is False and m["arguments"] == {}        # nothing removed: left alone
    # a rule that is not remove-items never takes the arguments along, prune or not
    drop = _rule(path=("arguments", "x"), action="drop", params={"prune": True})
    m = {"kind": "command", "execute": "c", "arguments": {"x": 1}}
    assert diff._apply(drop, m, []) is True and m == {"kind": "command", "execute": "c", "arguments": {}}
    keep = _rule(path=("arguments", "enable"), action="remove-items", params={"items": ["oob"]})
    m = {"kind": "command", "execute": "c", "arguments": {"enable": ["oob"]}}
    assert diff._apply(keep, m, []) is True and m["arguments"] == {"enable": []}
    miss = _rule(path=("nothing",), action="drop")
    assert diff._apply(miss, {"kind": "reply"}, []) is False


def test_rule_matches_kind_and_name():
    any_kind = _rule()
    cmd = _rule(kind="command", execute="getfd|closefd")
    assert diff._rule_matches(any_kind, "event", "X") and diff._rule_matches(any_kind, "reply", "")
    assert diff._rule_matches(cmd, "command", "getfd") and diff._rule_matches(cmd, "command", "closefd")
    assert not diff._rule_matches(cmd, "command", "getfdx")               # a full match
    assert not diff._rule_matches(cmd, "reply", "getfd")
    assert diff._rule_matches(_rule(kind="reply", execute="q"), "reply", "q")


def test_normalize_message_collects_what_fired():
    rules = [_rule(id="drop-t", path=("t",)), _rule(id="drop-none", path=("none",)),
             _rule(id="pass", kind="event", execute="MIGRATION_PASS", action="drop-message"),
             _rule(id="after", path=("id",))]
    fired: set[str] = set()
    m = {"kind": "command", "execute": "stop", "t": 1.0, "id": "x"}
    assert diff._normalize_message(m, "command", "stop", rules, [], fired) is True
    assert m == {"kind": "command", "execute": "stop"} and fired == {"drop-t", "after"}
    e = {"kind": "event", "event": "MIGRATION_PASS", "id": "y"}
    assert diff._normalize_message(e, "event", "MIGRATION_PASS", rules, [], fired) is False
    assert fired == {"drop-t", "after", "pass"} and e["id"] == "y"         # dropped: later rules never ran


def test_message_names():
    names = {'"a"': ["stop", "cont"]}
    assert diff._message_name({"kind": "command", "execute": "x"}, names) == "x"
    assert diff._message_name({"kind": "command"}, names) == ""
    assert diff._message_name({"kind": "reply", "id": "a"}, names) == "stop"
    assert diff._message_name({"kind": "reply", "id": "a"}, names) == "cont"       # in order, each once
    assert diff._message_name({"kind": "reply", "id": "a"}, names) == ""
    assert diff._message_name({"kind": "reply", "id": "b"}, names) == ""
    assert diff._message_name({"kind": "event", "event": "STOP"}, names) == "STOP"
    assert diff._message_name({"kind": "event"}, names) == ""


# --------------------------------------------------------------------------- substitutions


def _cmd(execute: str, **args: Any) -> dict[str, Any]:
    return {"kind": "command", "execute": execute, "arguments": dict(args)}


def _undo(msgs: list[dict[str, Any]], *subs: dict[str, Any]) -> list[dict[str, Any]]:
    diff._undo_substitutions({"substitutions": list(subs)}, msgs)  # type: ignore[typeddict-item]
    return msgs


def test_substitution_targets():
    """``sent`` is the position, in the replay's own messages, of the command the substitution was made on;
    a position that holds no command (or none at all) undoes nothing."""
    reply = {"kind": "reply", "return": {}}
    event = {"kind": "event", "event": "E"}
    m = _undo([_cmd("a", uri="x"), reply, _cmd("b", uri="y")], {"sent": 0, "field": "uri", "original": "A"})
    assert m[0]["arguments"]["uri"] == "A"
    m = _undo([_cmd("a", uri="x"), reply, _cmd("b", uri="y")], {"sent": 2, "field": "uri", "original": "B"})
    assert m[2]["arguments"]["uri"] == "B" and m[0]["arguments"]["uri"] == "x"
    m = _undo([event, _cmd("a", uri="x"), reply], {"sent": 1, "field": "uri", "original": "A"})
    assert m[1]["arguments"]["uri"] == "A"
    msgs = [_cmd("a", uri="x"), reply, event, _cmd("b", uri="y"), reply]
    before = copy.deepcopy(msgs)
    for idx in (1, 2, 4, 5, 9, -1, None):              # a reply, an event, out of range, nothing sent
        assert _undo(copy.deepcopy(msgs), {"sent": idx, "field": "uri", "original": "Z"}) == before, idx


def test_substitution_fields():
    m = _undo([_cmd("migrate", uri="exec:x")], {"sent": 0, "field": "arguments.uri", "original": "fd:m"})
    assert m[0]["arguments"] == {"uri": "fd:m"}
    m = _undo([{"kind": "command", "execute": "q"}], {"sent": 0, "field": "execute", "original": "qmp_capabilities"})
    assert m[0] == {"kind": "command", "execute": "qmp_capabilities"}
    m = _undo([{"kind": "command", "execute": "getfd", "fds": 2}], {"sent": 0, "field": "fds", "original": 1})
    assert m[0]["fds"] == 1 and "arguments" not in m[0]
    m = _undo([{"kind": "command", "execute": "x"}], {"sent": 0, "field": "uri", "original": "u"})
    assert m[0]["arguments"] == {"uri": "u"}                  # a bare name is an argument
    m = _undo([_cmd("x")], {"sent": 0, "field": "arguments.a.b", "original": 1})
    assert m[0]["arguments"] == {"a": {"b": 1}}
    m = _undo([_cmd("x", a=5)], {"sent": 0, "field": "arguments.a.b", "original": 1})
    assert m[0]["arguments"] == {"a": 5}                      # not an object on the way: left alone


@pytest.mark.parametrize("bad", [
    {"sent": "0", "field": "uri", "original": "A"},
    {"sent": 0, "field": 3, "original": "A"},
    {"sent": 0, "field": "uri"},
    {"sent": None, "field": None},
])
def test_malformed_substitutions_are_skipped_and_the_rest_applied(bad):
    m = _undo([_cmd("a", uri="x"), _cmd("b", uri="y")], bad, {"sent": 1, "field": "uri", "original": "B"})
    assert [x["arguments"]["uri"] for x in m] == ["x", "B"]


def test_no_substitutions():
    msgs = [_cmd("a", uri="x")]
    diff._undo_substitutions({"substitutions": None}, msgs)  # type: ignore[typeddict-item]
    diff._undo_substitutions({}, msgs)  # type: ignore[typeddict-item]
    assert msgs == [_cmd("a", uri="x")]


# --------------------------------------------------------------------------- a phase, normalized


def _phase(*messages: dict[str, Any], **extra: Any) -> trace.Phase:
    return {"name": "save", "operation": "save", "ok": True, "messages": list(messages), **extra}  # type: ignore[typeddict-item]


def test_normalize_phase_pairs_replies_and_builds_keys():
    ph = _phase(trace.command("stop", id="libvirt-1", t=0.1), trace.command("cont", id="libvirt-1", t=0.2),
                trace.reply("libvirt-1", ret={"a": 1}, t=0.3), trace.reply("libvirt-1", ret={"b": 2}, t=0.4),
                trace.command("getfd", {"fdname": "migrate"}, id="libvirt-2", fds=1),
                trace.reply("libvirt-2", error={"class": "GenericError", "desc": "x"}),
                trace.reply("libvirt-9", ret={}),                               # answers nothing
                trace.event("STOP", {"x": 1}, {"seconds": 1, "microseconds": 2}, t=0.5),
                {"kind": "other", "x": 1})
    fired: set[str] = set()
    cmds, events = diff._normalize_phase(ph, diff.load_rules(), False, [], fired)
    assert [(c.name, c.body, c.reply) for c in cmds] == [
        ("stop", {"execute": "stop"}, {"return": {"a": 1}}),
        ("cont", {"execute": "cont"}, {"return": {"b": 2}}),
        ("getfd", {"execute": "getfd", "arguments": {"fdname": "<fdname>"}, "fds": 1},
         {"error": {"class": "GenericError", "desc": "x"}})]
    assert cmds[2].key == '{"arguments":{"fdname":"<fdname>"},"execute":"getfd","fds":1}'
    assert [(e.name, e.body, e.key) for e in events] == [("STOP", {"event": "STOP", "data": {"x": 1}},
                                                          '{"data":{"x":1},"event":"STOP"}')]
    assert fired == {"message-id", "relative-time", "event-timestamp", "getfd-name"}
    assert ph["messages"][0]["id"] == "libvirt-1"                # the input is never modified


def test_normalize_phase_empty_arguments_and_strict():
    ph = _phase(trace.command("stop", {}, id=1), trace.reply(1),
                trace.command("getfd", {"fdname": "m"}, id=2), trace.reply(2))
    cmds, _ = diff._normalize_phase(ph, diff.load_rules(), False, [])
    assert [c.body for c in cmds] == [{"execute": "stop"}, {"execute": "getfd", "arguments": {"fdname": "<fdname>"}}]
    assert [c.reply for c in cmds] == [{"return": {}}, {"return": {}}]
    cmds, _ = diff._normalize_phase(ph, diff.load_rules(), True, [])
    assert [c.body for c in cmds] == [{"execute": "stop", "arguments": {}},
                                      {"execute": "getfd", "arguments": {"fdname": "m"}}]


def test_dropped_messages_take_their_replies_along():
    table = [_rule(id="drop-q", kind="command", execute="query-x", action="drop-message"),
             _rule(id="drop-e", kind="event", execute="E", action="drop-message")]
    ph = _phase(trace.command("query-x", id=1), trace.command("stop", id=1), trace.reply(1, ret={"q": 1}),
                trace.reply(1, ret={"s": 1}), trace.event("E"), trace.event("F"))
    fired: set[str] = set()
    cmds, events = diff._normalize_phase(ph, table, False, [], fired)
    assert [(c.name, c.reply) for c in cmds] == [("stop", {"return": {"s": 1}})]
    assert [e.name for e in events] == ["F"] and fired == {"drop-q", "drop-e"}


def test_id_less_commands_are_answered_in_order():
    ph = _phase(trace.command("qmp_capabilities"), trace.command("query-version"), trace.reply(None, ret={"a": 1}),
                trace.reply(None, ret={"b": 2}))
    cmds, _ = diff._normalize_phase(ph, [], False, [])
    assert [(c.name, c.reply) for c in cmds] == [("qmp_capabilities", {"return": {"a": 1}}),
                                                 ("query-version", {"return": {"b": 2}})]


def test_substitutions_undone_only_when_not_strict():
    ph = _phase(trace.command("migrate", {"uri": "exec:cat"}, id=1),
                substitutions=[{"sent": 0, "field": "arguments.uri", "original": "fd:m", "replacement": "exec:cat",
                                "reason": "tcp"}])
    (c,), _ = diff._normalize_phase(ph, [], False, [])
    assert c.body["arguments"] == {"uri": "fd:m"}
    (c,), _ = diff._normalize_phase(ph, [], True, [])
    assert c.body["arguments"] == {"uri": "exec:cat"}


def test_image_paths_of_both_sides_unless_strict():
    a = trace.new_trace("libvirt")
    pa = trace.add_phase(a, "save", "save", ok=True, image={"path": "/var/a.img", "size": 1, "header": None})
    pa["messages"] += [trace.command("dump", {"to": "/var/a.img"}, id=1), trace.reply(1)]
    b = copy.deepcopy(a)
    b["phases"][0]["image"]["path"] = "/srv/b.img"  # type: ignore[index]
    b["phases"][0]["messages"][0]["arguments"] = {"to": "/srv/b.img"}  # type: ignore[typeddict-item]
    assert diff.diff_traces(a, b).equivalent
    assert [d.details for d in diff.diff_traces(a, b, strict=True).differences] == [
        ['arguments.to: "/var/a.img" → "/srv/b.img"']]


# --------------------------------------------------------------------------- alignment


class _I:
    def __init__(self, key: str, name: str | None = None) -> None:
        self.key, self.name = key, name or key.split(":")[0]


def _rows(a: str, b: str) -> list[tuple[str, int | None, int | None]]:
    return diff.align([_I(k) for k in a.split()], [_I(k) for k in b.split()])


@pytest.mark.parametrize(("a", "b", "rows"), [
    ("x y z", "x y z", [("equal", 0, 0), ("equal", 1, 1), ("equal", 2, 2)]),
    ("x y z", "x z", [("equal", 0, 0), ("delete", 1, None), ("equal", 2, 1)]),
    ("x z", "x y z", [("equal", 0, 0), ("insert", None, 1), ("equal", 1, 2)]),
    ("x y:1 z", "x y:2 z", [("equal", 0, 0), ("change", 1, 1), ("equal", 2, 2)]),
    ("a b c d", "b c d a", [("equal", 1, 0), ("equal", 2, 1), ("equal", 3, 2), ("moved", 0, 3)]),
    ("a b c d", "d a b c", [("moved", 3, 0), ("equal", 0, 1), ("equal", 1, 2), ("equal", 2, 3)]),
    # a removed and an added command of one name are not a change when the counts differ
    ("q:1 q:2 s", "q:3 s", [("delete", 0, None), ("delete", 1, None), ("insert", None, 0), ("equal", 2, 1)]),
    ("q:1 s", "q:2 q:3 s", [("delete", 0, None), ("insert", None, 0), ("insert", None, 1), ("equal", 1, 2)]),
    # same counts: paired in order, the others inserted before their partner
    ("q:1 r:1 s", "p q:2 r:2 s", [("insert", None, 0), ("change", 0, 1), ("change", 1, 2), ("equal", 2, 3)]),
    ("x q:1 y", "x q:2 t y", [("equal", 0, 0), ("change", 1, 1), ("insert", None, 2), ("equal", 2, 3)]),
    ("", "x", [("insert", None, 0)]),
    ("x", "", [("delete", 0, None)]),
    ("", "", []),
])
def test_align(a, b, rows):
    assert _rows(a, b) == rows


def test_moves():
    ka, kb = ["a", "b", "c", "a"], ["b", "c", "a", "a"]
    ops = difflib.SequenceMatcher(None, ka, kb, autojunk=False).get_opcodes()
    assert diff._moves(ka, kb, ops) == {3: 0}
    assert diff._moves(["x"], ["y"], [("replace", 0, 1, 0, 1)]) == {}
    assert diff._moves(["x", "y"], ["y", "x"], [("delete", 0, 1, 0, 0), ("equal", 1, 2, 0, 1),
                                                ("insert", 2, 2, 1, 2)]) == {1: 0}


def test_image_paths_longest_first_not_alphabetical():
    r = _rule(path=("**",), action="image-path")
    m = {"kind": "command", "execute": "x", "arguments": {"p": "/a/b/c"}}
    assert diff._apply(r, m, ["/b", "/a/b/c"]) is True and m["arguments"] == {"p": "<image>"}


def test_everywhere_rules_leave_kind_and_name_and_report_no_change_as_false():
    r = _rule(path=("**",), action="regex", params={"pattern": "mand|E$", "replace": "!"})
    m = {"kind": "command", "execute": "command"}
    assert diff._apply(r, m, []) is False and m == {"kind": "command", "execute": "command"}
    e = {"kind": "event", "event": "E"}
    assert diff._apply(r, e, []) is False and e == {"kind": "event", "event": "E"}
    assert diff._apply(_rule(path=("**",), action="image-path"), {"kind": "event", "event": "/i"}, ["/i"]) is False


def test_replies_find_their_commands_by_id_in_any_order():
    ph = _phase(trace.command("a", id=1), trace.command("b", id=2), trace.reply(2, ret={"for": "b"}),
                trace.reply(1, ret={"for": "a"}))
    cmds, _ = diff._normalize_phase(ph, [], False, [])
    assert [(c.name, c.reply) for c in cmds] == [("a", {"return": {"for": "a"}}), ("b", {"return": {"for": "b"}})]


def test_a_command_without_name_answers_as_empty_name():
    """A reply is matched to rules by the name of the command it answers: '' for a nameless one."""
    only_empty = _rule(id="empty-name", kind="reply", execute="q?", path=("t",))
    ph = _phase({"kind": "command", "id": 5}, trace.reply(5, t=0.1))
    fired: set[str] = set()
    diff._normalize_phase(ph, [only_empty], False, [], fired)
    assert fired == {"empty-name"}


def test_moves_inside_replaced_blocks_and_after_equal_ones():
    assert diff._moves(["a", "b"], ["b", "a"], [("replace", 0, 2, 0, 2)]) == {0: 1, 1: 0}
    ops = [("equal", 0, 1, 0, 1), ("delete", 1, 2, 1, 1), ("insert", 2, 2, 1, 2)]
    assert diff._moves(["k", "k"], ["k", "k"], ops) == {1: 1}      # the deleted one, not the equal one before


@pytest.mark.parametrize(("a", "b", "rows"), [
    ("q:0 q:1 s", "q:0 q:2 s", [("equal", 0, 0), ("change", 1, 1), ("equal", 2, 2)]),
    ("p:1 q:1", "q:2 p:2", [("insert", None, 0), ("change", 0, 1), ("delete", 1, None)]),
])
def test_align_pairs_within_the_replaced_block_only(a, b, rows):
    assert _rows(a, b) == rows


def test_align_never_treats_frequent_commands_as_junk():
    """Hundreds of qom-get probes: difflib's autojunk would ignore them and misalign the rest."""
    rng = random.Random(1)
    for _ in range(3):      # the third of these draws is one where autojunk changes the alignment
        n = rng.randint(200, 300)
        a = [rng.choice(["q", "q", "q", "r", "s"]) if rng.random() < 0.9 else f"u{i}" for i in range(n)]
        b = list(a)
        for _edit in range(3):
            k = rng.randrange(len(b))
            if rng.random() < 0.5:
                del b[k]
            else:
                b.insert(k, rng.choice(["q", "z"]))
        rows = diff.align([_I(k) for k in a], [_I(k) for k in b])
        assert len([r for r in rows if r[0] != "equal"]) <= 3, rows      # three edits, three rows


def test_substitution_edge_cases():
    m = _undo([{"kind": "command", "execute": "migrate"}], {"sent": 0, "field": "arguments.uri", "original": "fd:m"})
    assert m[0]["arguments"] == {"uri": "fd:m"}                  # arguments made where there were none
    m = _undo([_cmd("x", a=5), _cmd("y", u="v")], {"sent": 0, "field": "arguments.a.b.c", "original": 1},
              {"sent": 1, "field": "u", "original": "w"})
    assert m[0]["arguments"] == {"a": 5} and m[1]["arguments"] == {"u": "w"}   # a dead end does not stop the rest
    m = _undo([_cmd("x", u="v")], {"sent": 7, "field": "u", "original": "no"},
              {"sent": 0, "field": "u", "original": "w"})
    assert m[0]["arguments"] == {"u": "w"}                       # nor does a target that does not exist


def test_table_without_rules(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"format": "virtsave-normalize"}')
    assert diff.load_rules(path) == [] and diff.image_rules(path) == {}
