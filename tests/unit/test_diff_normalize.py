"""Trace normalization and alignment of virtsave.trace.diff, rule by rule and case by case: what each
action does to a message, which rules a diff reports as applied (the ones that changed a message, not
every rule in force), how replies find their commands, and how commands are aligned."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
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
    with pytest.raises(VirtsaveError, match="cannot read normalization table .*No such file"):
        diff.load_rules(tmp_path / "none.json")


def test_image_rules():
    assert diff.image_rules()["header_layout_fields"] == ["data_len", "cookie_offset", "stream_offset"]
