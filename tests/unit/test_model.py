"""The trace model (TypedDicts in virtsave/trace/model.py) and the closed schema (trace-v1.json) say the
same thing; traces the current code writes validate; trace-v1 files written before the typed model still
load; parser scratch keys (``_t``, ``_job`` …) never reach a file."""

from __future__ import annotations

import copy
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest

from virtsave.core.errors import AmbiguousMonitor, TraceError
from virtsave.libvirtd import capture, logparse
from virtsave.trace import diff as tdiff
from virtsave.trace import model as tr

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE_LOGS = sorted(FIXTURES.glob("libvirt-*/*.log"))
DOMAIN_LOG = FIXTURES / "qemu-domain-logs" / "fxa.log"
#: trace-v1 files written by virtsave before the typed model (trimmed: fewer messages, host name hidden).
OLD_FILES = sorted(DATA.glob("trace-v1-*.json"))
#: Objects QEMU defines: described, but open in the schema.
OPEN = {tr.QMPErrorBody, tr.QMPTimestamp}

SCHEMA = tr.schema()
ANY = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})


# --------------------------------------------------------------------------------------------------
# model ↔ schema


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/$defs/"), ref
        node = SCHEMA["$defs"][ref.removeprefix("#/$defs/")]
    return node


def schema_types(node: dict[str, Any]) -> frozenset[str]:
    """The JSON types a schema node admits."""
    node = resolve(node)
    if "const" in node:
        return frozenset({_json_type(node["const"])})
    if "enum" in node:
        return frozenset(_json_type(v) for v in node["enum"])
    if "oneOf" in node and "type" not in node:
        return frozenset().union(*(schema_types(b) for b in node["oneOf"]))
    t = node.get("type")
    if t is None:
        return ANY
    return frozenset([t] if isinstance(t, str) else t)


def _json_type(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}[type(v)]


def _members(tp: Any) -> tuple[Any, ...]:
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)


def model_types(tp: Any) -> frozenset[str]:
    """The JSON types an annotation admits."""
    if tp is Any:
        return ANY
    out: set[str] = set()
    for m in _members(tp):
        origin = get_origin(m)
        if origin is Literal:
            out |= {_json_type(v) for v in get_args(m)}
        elif m is type(None):
            out.add("null")
        elif origin is list:
            out.add("array")
        elif origin is dict or typing.is_typeddict(m):
            out.add("object")
        else:
            out.add({str: "string", int: "integer", float: "number", bool: "boolean"}[m])
    return frozenset(out)


def object_branch(node: dict[str, Any]) -> dict[str, Any]:
    """The object-typed schema among a node's ``oneOf`` branches (or the node itself)."""
    node = resolve(node)
    if "oneOf" in node and "type" not in node:
        objs = [resolve(b) for b in node["oneOf"] if "object" in schema_types(b)]
        assert len(objs) == 1, node
        return objs[0]
    return node


def kind_branch(node: dict[str, Any], kind: str) -> dict[str, Any]:
    """The ``then`` schema of the message variant whose ``kind`` is *kind*."""
    node = resolve(node)
    hits = [resolve(rule["then"]) for rule in node.get("allOf", [])
            if rule["if"]["properties"]["kind"].get("const") == kind]
    assert len(hits) == 1, f"schema has no single variant for kind {kind}"
    return hits[0]


def pairs() -> list[tuple[str, type, dict[str, Any]]]:
    """Every (path, TypedDict, object schema) reachable from Trace, walking both side by side."""
    out: list[tuple[str, type, dict[str, Any]]] = []
    todo: list[tuple[str, Any, dict[str, Any]]] = [("trace", tr.Trace, SCHEMA)]
    while todo:
        path, td, node = todo.pop()
        out.append((path, td, node))
        hints = get_type_hints(td)
        props = node.get("properties", {})
        for key, ann in hints.items():
            if key not in props:
                continue  # reported by test_keys_agree
            todo += children(f"{path}.{key}", ann, props[key])
    return out


def children(path: str, ann: Any, node: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    found: list[tuple[str, Any, dict[str, Any]]] = []
    dicts = [m for m in _members(ann) if typing.is_typeddict(m)]
    if len(dicts) == 1:
        found.append((path, dicts[0], object_branch(node)))
    elif dicts:  # a tagged union (the messages): pair each variant by its kind
        for m in dicts:
            (kind,) = get_args(get_type_hints(m)["kind"])
            found.append((f"{path}<{kind}>", m, kind_branch(node, kind)))
    for m in _members(ann):
        if get_origin(m) is list:
            found += children(f"{path}[]", get_args(m)[0], resolve(node)["items"])
        elif get_origin(m) is dict and get_args(m)[1] is not Any:
            found += children(f"{path}{{}}", get_args(m)[1], resolve(node)["additionalProperties"])
    return found


PAIRS = pairs()


def _ids() -> list[str]:
    return [f"{p}:{td.__name__}" for p, td, _ in PAIRS]


@pytest.mark.parametrize("path, td, node", PAIRS, ids=_ids())
def test_keys_agree(path: str, td: type, node: dict[str, Any]) -> None:
    hints = get_type_hints(td)
    props = node.get("properties", {})
    assert set(hints) == set(props), \
        f"{path}: model only {set(hints) - set(props)}, schema only {set(props) - set(hints)}"
    assert set(td.__required_keys__) == set(node.get("required", [])), f"{path}: required-ness differs"  # type: ignore[attr-defined]


@pytest.mark.parametrize("path, td, node", PAIRS, ids=_ids())
def test_types_agree(path: str, td: type, node: dict[str, Any]) -> None:
    for key, ann in get_type_hints(td).items():
        if key not in node["properties"]:
            continue  # reported by test_keys_agree
        assert model_types(ann) == schema_types(node["properties"][key]), f"{path}.{key}"
        if get_origin(ann) is dict:  # a map: its key type and the schema's propertyNames agree
            keys, prop = get_args(ann)[0], resolve(node["properties"][key])
            if keys is str:
                assert "propertyNames" not in prop, f"{path}.{key}"
            else:
                assert set(get_args(keys)) == set(prop["propertyNames"]["enum"]), f"{path}.{key}"


@pytest.mark.parametrize("path, td, node", PAIRS, ids=_ids())
def test_virtsave_objects_closed_and_described(path: str, td: type, node: dict[str, Any]) -> None:
    if td in OPEN:
        assert node.get("additionalProperties", True) is not False, f"{path} is QEMU's: keep it open"
    else:
        assert node.get("additionalProperties") is False, f"{path} ({td.__name__}) must be closed"
    assert node.get("description"), f"{path} has no description"
    for key, prop in node["properties"].items():
        assert prop.get("description") or resolve(prop).get("description"), f"{path}.{key} has no description"


def test_every_schema_object_is_in_the_model() -> None:
    reached = {id(node) for _, _, node in PAIRS}
    dispatch = SCHEMA["$defs"]["message"]  # only routes to command / reply / event by "kind"
    defs = {name for name, node in SCHEMA["$defs"].items()
            if "object" in schema_types(node) and "properties" in node and id(node) not in reached
            and node is not dispatch}
    assert defs == set(), f"schema objects the model does not declare: {defs}"
    kinds = {get_args(get_type_hints(m)["kind"])[0] for m in get_args(tr.Message)}
    assert set(dispatch["properties"]["kind"]["enum"]) == kinds
    assert {td for _, td, _ in PAIRS} >= {tr.Trace, tr.Phase, tr.CommandMessage, tr.ReplyMessage, tr.EventMessage}


def test_no_private_keys_in_model_or_schema() -> None:
    for path, td, node in PAIRS:
        assert not [k for k in get_type_hints(td) if k.startswith("_")], path
        assert not [k for k in node.get("properties", {}) if k.startswith("_")], path


def test_schema_is_valid_draft_2020_12() -> None:
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(SCHEMA)


# --------------------------------------------------------------------------------------------------
# traces the code writes, and files written before


def _import(log: Path) -> tr.Trace:
    try:
        return capture.import_log(log, None, domain_log=DOMAIN_LOG)
    except AmbiguousMonitor as exc:
        return capture.import_log(log, None, monitor=exc.monitors[0]["key"], domain_log=DOMAIN_LOG)


@pytest.mark.parametrize("log", FIXTURE_LOGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fixture_imports_validate_and_roundtrip(log: Path) -> None:
    t = _import(log)
    assert tr.validate(t) == []
    assert tr.loads(tr.dumps(t)) == t
    assert t["phases"] and "log" in t


def test_fixture_imports_cover_the_parser_fields() -> None:
    """The import path writes what the schema describes for it (attribution, log, monitor, image path)."""
    t = _import(FIXTURES / "libvirt-11.3-attributed" / "managedsave-restore.log")
    (ph,) = t["phases"]
    assert set(ph) >= {"monitor", "attribution", "image"} and ph["attribution"]["job"]
    assert t["log"]["attribution"] == "log" and t["log"]["unphased"] == 0


@pytest.mark.parametrize("path", OLD_FILES, ids=lambda p: p.name)
def test_old_v1_files_still_load(path: Path) -> None:
    t = tr.load(path)
    assert t["version"] == 1


def test_old_v1_files_cover_every_writer() -> None:
    """The frozen files hold a live libvirt trace, an import, a replay with diff and a failed replay."""
    loaded = {p.name: tr.load(p) for p in OLD_FILES}
    live = loaded["trace-v1-live-cycle.json"]
    assert {"window", "seconds", "options", "monitor"} <= set(live["phases"][0])
    assert live["phases"][0]["image"]["header"]["magic"] == "LibvirtQemudSave"  # type: ignore[index]
    rep = loaded["trace-v1-replay.json"]["replay"]
    assert {"argv_rewrites", "timings", "qemu", "diff"} <= set(rep)
    assert any(p.get("substitutions") for p in loaded["trace-v1-replay.json"]["phases"])
    assert loaded["trace-v1-replay-failed.json"]["phases"][0]["ok"] is False
    assert "log" in loaded["trace-v1-import.json"]


def test_trace_diff_report_fits_the_replay_block() -> None:
    """``replay(diff=True)`` stores :meth:`TraceDiff.to_json` in the trace: it must validate there."""
    a = _import(FIXTURES / "libvirt-9.0-attributed" / "managedsave-running.log")
    b = _import(FIXTURES / "libvirt-11.3-attributed" / "managedsave-running.log")
    report = tdiff.diff_traces(a, b, a_label="9.0", b_label="11.3").to_json()
    assert report["differences"]
    out = tr.new_trace("direct", domain={"name": "g"})
    out["replay"] = {"mode": "faithful", "transport": "unix", "input": None, "image": "/x.save",
                     "argv_rewrites": {}, "timings": {}, "diff": report}
    assert tr.validate(out) == []


# --------------------------------------------------------------------------------------------------
# closed where virtsave defines, open where QEMU does


def _at(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _first(t: tr.Trace, kind: str) -> int:
    return next(i for i, m in enumerate(t["phases"][0]["messages"]) if m["kind"] == kind)


REPLAY = tr.load(DATA / "trace-v1-replay.json")
IMPORT = tr.load(DATA / "trace-v1-import.json")
CLOSED = [
    (REPLAY, ()), (REPLAY, ("host",)), (REPLAY, ("domain",)), (REPLAY, ("phases", 0)),
    (REPLAY, ("phases", 0, "image")), (REPLAY, ("phases", 0, "image", "header")),
    (REPLAY, ("phases", 0, "options")), (REPLAY, ("phases", 0, "substitutions", 0)),
    (REPLAY, ("phases", 0, "messages", _first(REPLAY, "command"))),
    (REPLAY, ("phases", 0, "messages", _first(REPLAY, "reply"))),
    (REPLAY, ("phases", 0, "messages", _first(REPLAY, "event"))),
    (REPLAY, ("replay",)), (REPLAY, ("replay", "timings")), (REPLAY, ("replay", "timings", "save")),
    (REPLAY, ("replay", "argv_rewrites")), (REPLAY, ("replay", "argv_rewrites", "save", 0)),
    (REPLAY, ("replay", "qemu")), (REPLAY, ("replay", "diff")), (REPLAY, ("replay", "diff", "a")),
    (REPLAY, ("replay", "diff", "differences", 0)), (REPLAY, ("replay", "diff", "normalization")),
    (IMPORT, ("log",)), (IMPORT, ("phases", 0, "attribution")),
]
OPEN_PAYLOADS = [
    ("command", "arguments"), ("reply", "return"), ("event", "data"), ("event", "timestamp"),
]


@pytest.mark.parametrize("base, path", CLOSED, ids=lambda x: "/".join(map(str, x)) if isinstance(x, tuple) else "")
def test_unknown_key_refused(base: tr.Trace, path: tuple[Any, ...]) -> None:
    t = copy.deepcopy(base)
    _at(t, path)["bogus"] = 1
    problems = tr.validate(t)
    assert problems and any("bogus" in p for p in problems), problems
    where = "/".join(map(str, path)) or "(top)"
    assert any(p.startswith(f"{where}: ") for p in problems), problems


@pytest.mark.parametrize("kind, key", OPEN_PAYLOADS)
def test_qemu_payloads_stay_open(kind: str, key: str) -> None:
    t: Any = copy.deepcopy(REPLAY)  # edited as plain JSON
    msg = next(m for m in t["phases"][0]["messages"] if m["kind"] == kind and isinstance(m.get(key), dict))
    msg[key]["some-future-qemu-field"] = {"x": [1]}
    assert tr.validate(t) == []


def test_reply_error_stays_open() -> None:
    t = tr.new_trace("direct")
    ph = tr.add_phase(t, "save", "save")
    ph["messages"] += [tr.command("x", id=1), tr.reply(1, error={"class": "GenericError", "desc": "no"})]
    raw: Any = ph["messages"][1]
    raw["error"]["data"] = {"errno": 5}
    assert tr.validate(t) == []


def test_reply_needs_exactly_one_of_return_and_error() -> None:
    t = tr.new_trace("direct")
    ph = tr.add_phase(t, "save", "save")
    ph["messages"] += [tr.reply(1), tr.reply(2, error={"class": "GenericError", "desc": "no"})]
    both: Any = ph["messages"][0]
    neither: Any = ph["messages"][1]
    both["error"] = {"desc": "both"}
    del neither["error"]
    problems = tr.validate(t)
    assert [p.split(":")[0] for p in problems] == ["phases/0/messages/0", "phases/0/messages/1"]


# --------------------------------------------------------------------------------------------------
# parser scratch state stays out of files


def _with_scratch() -> tr.Trace:
    t = tr.new_trace("libvirt", domain={"name": "g"})
    ph = tr.add_phase(t, "save", "managed-save", monitor="0x7f00", ok=True,
                      attribution={"job": None, "domain": "g", "vm": "0x7f01"})
    ph["messages"] += [tr.command("getfd", {"fdname": "migrate", "_keep": 1}, id="libvirt-1", fds=1),
                       tr.reply("libvirt-1", t=0.1), tr.event("STOP", {"_x": 2}, t=0.2)]
    raw: Any = t  # what a parser keeping its state in the same dicts leaves behind
    for m in raw["phases"][0]["messages"]:
        m.update({"_t": 1.5, "_job": 3, "_fdsent": 1, "_tid": 7, "_cmd": "getfd", "_errno": 0})
    raw["phases"][0]["_end"] = 9.0
    raw["phases"][0]["attribution"]["_mon"] = "0x7f00"
    raw["_scan"] = object()
    return t


def test_dump_strips_private_keys_but_not_qemu_payload_keys(tmp_path: Path) -> None:
    t = _with_scratch()
    path = tmp_path / "t.json"
    tr.dump(t, path)
    text = path.read_text()
    for k in ("_t", "_job", "_fdsent", "_tid", "_cmd", "_errno", "_end", "_mon", "_scan"):
        assert f'"{k}"' not in text
    assert '"_keep": 1' in text and '"_x": 2' in text  # QEMU's payloads are not virtsave's to edit
    back = tr.load(path)
    assert back["phases"][0]["messages"][0] == tr.command("getfd", {"fdname": "migrate", "_keep": 1},
                                                          id="libvirt-1", fds=1)
    assert "_t" in t["phases"][0]["messages"][0]  # the caller's trace is left alone


def test_private_keys_are_refused_when_loading() -> None:
    t: Any = _with_scratch()
    del t["_scan"]
    problems = tr.validate(json.loads(json.dumps(t)))
    assert any(p.startswith("phases/0/messages/0: ") and "'_t'" in p for p in problems), problems
    with pytest.raises(TraceError, match="invalid trace"):
        tr.loads(json.dumps(t))


def test_parser_output_has_no_private_keys() -> None:
    t = logparse.trace_from_log(FIXTURES / "libvirt-11.3-attributed" / "save-sparse-parallel2.log")
    assert tr.validate(t) == []
    assert tr.public(t) == t
