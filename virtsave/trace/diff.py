"""Compare two traces, or two save images, and say what differs — once, in place.

Traces: every message is normalized first by the rules in ``conf/normalize.json`` (the one table of
what must differ between runs: ids, time, fd numbers and names, image paths, qemu.qmp's ``oob``,
volatile ``query-migrate`` statistics; recorded transport substitutions are undone). Then, per phase,
commands are aligned as sequences (:class:`difflib.SequenceMatcher` on the normalized command keys,
replaced blocks paired by command name), and the result reports missing, extra, reordered and changed
commands, reply differences, event sequence differences and phase outcomes. A command missing in one
place and present in another is reported once, as reordered. ``strict=True`` keeps only the ids/time
rules.

Images: header fields, domain XML and cookie (canonicalized with lxml, dropping what libvirt
regenerates), stream configuration, section list and versions, RAM block sizes.

Example::

    >>> from virtsave.trace import model as trace
    >>> a = trace.new_trace("libvirt")
    >>> ph = trace.add_phase(a, "save", "managed-save", ok=True)
    >>> ph["messages"] += [trace.command("stop", id="libvirt-1"), trace.reply("libvirt-1")]
    >>> diff_traces(a, a).equivalent
    True
    >>> import copy
    >>> b = copy.deepcopy(a)
    >>> b["phases"][0]["messages"][0]["id"] = b["phases"][0]["messages"][1]["id"] = 7
    >>> diff_traces(a, b).equivalent
    True
    >>> del b["phases"][0]["messages"][:2]
    >>> print(diff_traces(a, b).render().splitlines()[3])
    - stop
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypedDict, cast

from virtsave.core.errors import VirtsaveError
from virtsave.trace import model as tr

# ---------------------------------------------------------------------------------------------
# The normalization table
# ---------------------------------------------------------------------------------------------


#: The one normalization table, shipped inside the package.
NORMALIZE_TABLE = Path(str(resources.files("virtsave.trace") / "normalize.json"))


@dataclass(frozen=True)
class Rule:
    """One row of ``conf/normalize.json``."""

    id: str
    category: str
    strict: bool
    kind: str
    execute: re.Pattern[str] | None
    path: tuple[str, ...]
    action: str
    params: dict[str, Any]


_ACTIONS = {"drop", "placeholder", "regex", "type", "remove-items", "remove-matching", "image-path",
            "drop-message"}


@functools.cache
def _load_table(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except OSError as exc:
        raise VirtsaveError(f"cannot read normalization table {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise VirtsaveError(f"normalization table {path} is not valid JSON: {exc}") from None
    if not isinstance(table, dict) or table.get("format") != "virtsave-normalize":
        raise VirtsaveError(f"{path}: not a virtsave normalization table")
    return table


def load_rules(path: str | Path | None = None) -> list[Rule]:
    """The trace rules of the table (default ``conf/normalize.json``)."""
    p = str(path or NORMALIZE_TABLE)
    rules = []
    for i, r in enumerate(_load_table(p).get("rules", [])):
        if r.get("action") not in _ACTIONS:
            raise VirtsaveError(f"{p}: rule {i} ({r.get('id')}): unknown action {r.get('action')!r}")
        params = {k: v for k, v in r.items()
                  if k not in ("id", "category", "strict", "kind", "execute", "path", "action", "why")}
        rules.append(Rule(r["id"], r.get("category", ""), bool(r.get("strict")), r.get("kind", "any"),
                          re.compile(r["execute"]) if r.get("execute") else None,
                          tuple(r["path"].split(".")), r["action"], params))
    return rules


def image_rules(path: str | Path | None = None) -> dict[str, Any]:
    """The ``image`` part of the table (XML/cookie XPaths to ignore)."""
    image: dict[str, Any] = _load_table(str(path or NORMALIZE_TABLE)).get("image", {})
    return image


def _type_of(v: Any) -> Any:
    """Replace leaves by their JSON type name, keeping dict/list shape."""
    if isinstance(v, dict):
        return {k: _type_of(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_type_of(x) for x in v]
    if isinstance(v, bool):
        return "<bool>"
    if isinstance(v, int | float):
        return "<number>"
    if v is None:
        return "<null>"
    return "<str>"


def _walk(obj: Any, segs: tuple[str, ...], fn: Any) -> None:
    if not segs:
        return
    seg, rest = segs[0], segs[1:]
    if isinstance(obj, dict):
        keys: list[Any] = [k for k in list(obj) if seg == "*" or re.fullmatch(seg, str(k))]
    elif isinstance(obj, list):
        keys = [i for i in range(len(obj)) if seg == "*" or seg == str(i)]
    else:
        return
    for k in reversed(keys) if isinstance(obj, list) else keys:
        if rest:
            _walk(obj[k], rest, fn)
        else:
            fn(obj, k)


def _map_strings(v: Any, fn: Any) -> Any:
    if isinstance(v, str):
        return fn(v)
    if isinstance(v, dict):
        return {k: _map_strings(x, fn) for k, x in v.items()}
    if isinstance(v, list):
        return [_map_strings(x, fn) for x in v]
    return v


def _map_fields(msg: dict[str, Any], fn: Callable[[str], str]) -> bool:
    """*fn* on every string of every field but the message's kind and name; True when one changed."""
    changed = False
    for k in list(msg):
        if k not in ("kind", "execute", "event"):
            new = _map_strings(msg[k], fn)
            changed = changed or new != msg[k]
            msg[k] = new
    return changed


def _image_path_sub(images: list[str]) -> Callable[[str], str] | None:
    """Replaces every image path in a string by ``<image>`` (longest first); None without paths."""
    paths = sorted({i for i in images if i}, key=len, reverse=True)
    if not paths:
        return None

    def sub(s: str) -> str:
        for ip in paths:
            s = s.replace(ip, "<image>")
        return s
    return sub


def _edit(rule: Rule, obj: Any, k: Any) -> bool:
    """Apply *rule*'s action to ``obj[k]``; True when it changed something."""
    p, v = rule.params, obj[k]
    if rule.action == "drop":
        if isinstance(obj, dict):
            del obj[k]
            return True
        return False
    if rule.action == "placeholder":
        if "when" in p and v != p["when"]:
            return False
        new = p.get("value")
    elif rule.action == "regex":
        if not isinstance(v, str):
            return False
        new = re.sub(p["pattern"], p.get("replace", ""), v)
    elif rule.action == "type":
        new = _type_of(v)
    elif rule.action == "remove-matching" and isinstance(v, list):
        new = [x for x in v if not re.search(p["pattern"], _dumps(x))]
    elif rule.action == "remove-items" and isinstance(v, list):
        new = [x for x in v if x not in p.get("items", [])]
        if p.get("prune") and not new and isinstance(obj, dict):
            del obj[k]
            return True
    else:
        return False
    obj[k] = new
    return bool(new != v)


def _apply(rule: Rule, msg: dict[str, Any], images: list[str]) -> bool:
    """Apply one rule to one (copied) message; True when the message changed (the rule fired)."""
    if rule.path == ("**",) and rule.action == "regex":
        p = rule.params
        return _map_fields(msg, lambda v: re.sub(p["pattern"], p.get("replace", ""), v))
    if rule.action == "image-path":
        sub = _image_path_sub(images)
        return sub is not None and _map_fields(msg, sub)
    changed = False

    def fn(obj: Any, k: Any) -> None:
        nonlocal changed
        changed = _edit(rule, obj, k) or changed
    _walk(msg, rule.path, fn)
    # a prune that emptied the arguments takes them along (qmp_capabilities without "enable")
    if changed and rule.action == "remove-items" and rule.params.get("prune") and msg.get("arguments") == {}:
        del msg["arguments"]
    return changed


def _substituted(sub: tr.Substitution, msgs: list[dict[str, Any]],
                 other: tr.Phase | None) -> dict[str, Any] | None:
    """The command of *msgs* a substitution was made on: the one its ``sent`` index names (``sent`` null:
    nothing was sent in its place). A replay recorded before ``sent`` existed only has ``index``, the
    command's place in the *traced* phase: the k-th command of that name there is the k-th here, when
    *other* (the side compared with) is that traced phase."""
    if "sent" in sub:
        i = sub.get("sent")
        ok = isinstance(i, int) and 0 <= i < len(msgs) and msgs[i].get("kind") == "command"
        return msgs[i] if ok and isinstance(i, int) else None
    idx = sub.get("index")
    src = other.get("messages") or [] if other is not None else []
    if not isinstance(idx, int) or not 0 <= idx < len(src) or src[idx].get("kind") != "command":
        return None
    name = src[idx].get("execute")
    k = sum(1 for m in src[:idx] if m.get("kind") == "command" and m.get("execute") == name)
    ours = [m for m in msgs if m.get("kind") == "command" and m.get("execute") == name]
    return ours[k] if k < len(ours) else None


def _undo_substitutions(phase: tr.Phase, msgs: list[dict[str, Any]], other: tr.Phase | None = None) -> None:
    """Put back what a replay replaced (e.g. an ``exec:`` URI for ``fd:``) so the meaning is compared."""
    for sub in phase.get("substitutions") or []:
        fld = sub.get("field")
        target = _substituted(sub, msgs, other)
        if target is None or not isinstance(fld, str) or "original" not in sub:
            continue
        segs = fld.split(".")
        # "arguments.uri" / "fds" / "execute" name the message's own keys; a bare "uri" an argument.
        obj: Any = target if segs[0] == "arguments" or segs[0] in target else target.setdefault("arguments", {})
        for seg in segs[:-1]:
            obj = obj.setdefault(seg, {}) if isinstance(obj, dict) else None
            if obj is None:
                break
        if isinstance(obj, dict):
            obj[segs[-1]] = sub["original"]


# ---------------------------------------------------------------------------------------------
# Normalized phases
# ---------------------------------------------------------------------------------------------


@dataclass
class _Cmd:
    key: str
    name: str
    body: dict[str, Any]            # normalized command (execute, arguments, fds)
    reply: dict[str, Any] | None    # normalized reply (return | error), None when none came


@dataclass
class _Evt:
    key: str
    name: str
    body: dict[str, Any]


def _dumps(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _rule_matches(rule: Rule, kind: Any, name: str) -> bool:
    """Does *rule* concern a message of *kind* named *name* (command, event, or the command a reply answers)?"""
    return rule.kind in ("any", kind) and (rule.execute is None or rule.execute.fullmatch(name) is not None)


def _normalize_message(m: dict[str, Any], kind: Any, name: str, active: list[Rule], images: list[str],
                       fired: set[str]) -> bool:
    """Apply the *active* rules to *m* in table order, adding the ids of those that changed it to *fired*.
    Returns False when a ``drop-message`` rule leaves the message out."""
    for r in active:
        if not _rule_matches(r, kind, name):
            continue
        if r.action == "drop-message":
            fired.add(r.id)
            return False
        if _apply(r, m, images):
            fired.add(r.id)
    return True


def _message_name(m: dict[str, Any], names_by_id: dict[str, list[str]]) -> str:
    """A command's or event's name; for a reply, the name of the command it answers (by id, in order)."""
    kind = m.get("kind")
    if kind == "command":
        return str(m.get("execute", ""))
    if kind == "reply":
        queue = names_by_id.get(_dumps(m.get("id")), [])
        return queue.pop(0) if queue else ""
    return str(m.get("event", ""))


def _normalize_phase(phase: tr.Phase, rules: list[Rule], strict: bool, images: list[str],
                     fired: set[str] | None = None, other: tr.Phase | None = None) -> tuple[list[_Cmd], list[_Evt]]:
    """The phase's commands (each with its reply) and events, normalized; *fired* collects the ids of
    the rules that changed at least one message."""
    fired = set() if fired is None else fired
    # Normalization rewrites the copies freely: from here on they are plain JSON objects.
    msgs = cast(list[dict[str, Any]], copy.deepcopy(phase.get("messages") or []))
    if not strict:
        _undo_substitutions(phase, msgs, other)
    active = [r for r in rules if r.strict or not strict]
    # Pair replies with commands by id first (ids are dropped by the rules afterwards).
    names_by_id: dict[str, list[str]] = {}
    for m in msgs:
        if m.get("kind") == "command":
            names_by_id.setdefault(_dumps(m.get("id")), []).append(m.get("execute", ""))
    cmds: list[_Cmd] = []
    open_by_id: dict[str, list[_Cmd]] = {}
    events: list[_Evt] = []
    for m in msgs:
        kind = m.get("kind")
        name = _message_name(m, names_by_id)
        # Commands without id (qemu.qmp's own qmp_capabilities) get their replies in order, like QMP does.
        mid = _dumps(m.get("id"))
        if not _normalize_message(m, kind, name, active, images, fired):
            if kind == "command":       # its reply goes with it (to a command nobody compares)
                open_by_id.setdefault(mid, []).append(_Cmd("", name, {}, None))
            continue
        if kind == "command":
            if not strict and m.get("arguments") == {}:
                del m["arguments"]
            body = {k: v for k, v in m.items() if k in ("execute", "arguments", "fds")}
            c = _Cmd(_dumps(body), name, body, None)
            cmds.append(c)
            open_by_id.setdefault(mid, []).append(c)
        elif kind == "reply":
            pending = open_by_id.get(mid, [])
            if pending:
                pending.pop(0).reply = {k: v for k, v in m.items() if k in ("return", "error")}
        elif kind == "event":
            body = {k: v for k, v in m.items() if k in ("event", "data")}
            events.append(_Evt(_dumps(body), name, body))
    return cmds, events


# ---------------------------------------------------------------------------------------------
# Value differences
# ---------------------------------------------------------------------------------------------

_ABSENT = object()
#: Keys that name the items of a list (QMP lists of properties, capabilities, devices...).
_IDENTITY_KEYS = ("name", "capability", "qom-path", "device", "node-name", "id", "path")


def _list_identity(a: list[Any], b: list[Any]) -> str | None:
    if not a or not b or not all(isinstance(x, dict) for x in a + b):
        return None
    for k in _IDENTITY_KEYS:
        if (all(k in x and isinstance(x[k], str | int) for x in a + b)
                and len({x[k] for x in a}) == len(a) and len({x[k] for x in b}) == len(b)):
            return k
    return None


def short(v: Any, width: int = 100) -> str:
    if v is _ABSENT:
        return "(absent)"
    s = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    return s if len(s) <= width else s[:width - 1] + "…"


def value_diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Human lines ``path: A → B`` for every leaf that differs (dicts by key, lists aligned)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in list(a) + [k for k in b if k not in a]:
            sub = f"{path}.{k}" if path else str(k)
            out += value_diff(a.get(k, _ABSENT), b.get(k, _ABSENT), sub)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if a == b:
            return []
        ident = _list_identity(a, b)
        if ident:
            # Lists of named things (properties, capabilities...) compare as sets keyed by name.
            ma, mb = {x[ident]: x for x in a}, {x[ident]: x for x in b}
            out = []
            for k in list(ma) + [k for k in mb if k not in ma]:
                out += value_diff(ma.get(k, _ABSENT), mb.get(k, _ABSENT), f"{path}[{ident}={k}]")
            return out
        out = []
        sm = difflib.SequenceMatcher(None, [_dumps(x) for x in a], [_dumps(x) for x in b], autojunk=False)
        for op, i1, i2, j1, j2 in sm.get_opcodes():
            if op == "equal":
                continue
            if op == "replace" and i2 - i1 == j2 - j1:
                for k in range(i2 - i1):
                    out += value_diff(a[i1 + k], b[j1 + k], f"{path}[{i1 + k}]")
                continue
            out += [f"{path}[{i}]: {short(a[i])} → (absent)" for i in range(i1, i2)]
            out += [f"{path}[{j}]: (absent) → {short(b[j])}" for j in range(j1, j2)]
        return out
    if a == b and type(a) is type(b):
        return []
    return [f"{path or '(value)'}: {short(a)} → {short(b)}"]


# ---------------------------------------------------------------------------------------------
# Trace diff
# ---------------------------------------------------------------------------------------------


@dataclass
class Difference:
    """One difference, reported once. ``a``/``b``: positions in the phase's command (or event) list."""

    phase: str
    kind: str        # missing extra reordered changed reply event-missing event-extra event-reordered
    #                  event-changed outcome phase-missing phase-extra
    name: str
    a: int | None = None
    b: int | None = None
    details: list[str] = field(default_factory=list)

    def to_json(self) -> tr.DiffDifference:
        return {"phase": self.phase, "kind": self.kind, "name": self.name, "a_index": self.a,
                "b_index": self.b, "details": self.details}


@dataclass
class Row:
    mark: str        # ' ' same, '-' only in A, '+' only in B, '~' changed, '>' moved here
    text: str
    details: list[str] = field(default_factory=list)


@dataclass
class Hunk:
    title: str
    rows: list[Row]


def _label(cmd: dict[str, Any]) -> str:
    args = cmd.get("arguments")
    fds = f" [fds={cmd['fds']}]" if cmd.get("fds") else ""
    return f"{cmd['execute']}{' ' + short(args, 90) if args is not None else ''}{fds}"


def _evt_label(e: dict[str, Any]) -> str:
    return f"{e['event']}{' ' + short(e['data'], 90) if e.get('data') is not None else ''}"


def _moves(ka: list[str], kb: list[str], ops: Sequence[tuple[str, int, int, int, int]]) -> dict[int, int]:
    """B index → A index of the items gone from one place in A and back (same key) at another in B."""
    gone: dict[str, list[int]] = {}
    for op, i1, i2, _j1, _j2 in ops:
        if op in ("delete", "replace"):
            for i in range(i1, i2):
                gone.setdefault(ka[i], []).append(i)
    moved_to: dict[int, int] = {}
    for op, _i1, _i2, j1, j2 in ops:
        if op in ("insert", "replace"):
            for j in range(j1, j2):
                if gone.get(kb[j]):
                    moved_to[j] = gone[kb[j]].pop(0)
    return moved_to


def align(a: list[Any], b: list[Any]) -> list[tuple[str, int | None, int | None]]:
    """Rows (op, i, j), op in equal/change/delete/insert/moved, in B's order.

    ``moved``: an item missing at one place and extra at another (same key) — one row, where B has it.
    ``change``: inside a replaced block, same-named items paired in order when the block holds as many
    of that name on both sides (so a removed and an added ``qom-get`` are not passed off as a change).
    """
    ka, kb = [x.key for x in a], [x.key for x in b]
    ops = difflib.SequenceMatcher(None, ka, kb, autojunk=False).get_opcodes()
    moved_to = _moves(ka, kb, ops)
    moved_from = set(moved_to.values())
    rows: list[tuple[str, int | None, int | None]] = []

    def extra(j: int) -> tuple[str, int | None, int | None]:
        return ("moved", moved_to[j], j) if j in moved_to else ("insert", None, j)

    for op, i1, i2, j1, j2 in ops:
        if op == "equal":
            rows += [("equal", i1 + k, j1 + k) for k in range(i2 - i1)]
            continue
        ia = [i for i in range(i1, i2) if i not in moved_from]
        jb = [j for j in range(j1, j2) if j not in moved_to]
        na, nb = Counter(a[i].name for i in ia), Counter(b[j].name for j in jb)
        jcur = j1
        for i in ia:
            jp = None
            if na[a[i].name] == nb[a[i].name]:
                jp = next((j for j in jb if j >= jcur and b[j].name == a[i].name), None)
            if jp is None:
                rows.append(("delete", i, None))
                continue
            rows += [extra(j) for j in range(jcur, jp)]
            rows.append(("change", i, jp))
            jcur = jp + 1
        rows += [extra(j) for j in range(jcur, j2)]
    return rows


class _SideInfo(TypedDict, total=False):
    """What a diff says about each trace besides its label (see :class:`virtsave.trace.model.DiffSide`)."""

    source: str | None
    host: tr.Host


@dataclass
class TraceDiff:
    """Result of :func:`diff_traces`."""

    a_label: str
    b_label: str
    strict: bool
    differences: list[Difference]
    hunks: list[Hunk]
    rules: list[str]        # ids of the rules that changed at least one message, in table order
    a_info: _SideInfo = field(default_factory=lambda: _SideInfo())
    b_info: _SideInfo = field(default_factory=lambda: _SideInfo())
    table: str = str(NORMALIZE_TABLE)   # the normalization table, with every rule in force

    @property
    def equivalent(self) -> bool:
        return not self.differences

    def summary(self) -> dict[str, int]:
        return dict(Counter(d.kind for d in self.differences))

    def to_json(self) -> tr.DiffReport:
        return {"format": "virtsave-diff", "kind": "trace", "equivalent": self.equivalent,
                "strict": self.strict, "a": {"label": self.a_label, **self.a_info},
                "b": {"label": self.b_label, **self.b_info}, "summary": self.summary(),
                "differences": [d.to_json() for d in self.differences],
                "normalization": {"table": self.table, "rules": self.rules}}

    def render(self, color: bool = False, context: int = 2) -> str:
        return render_hunks(f"--- {self.a_label}{_info(self.a_info)}", f"+++ {self.b_label}{_info(self.b_info)}",
                       self.hunks, self.differences, color, context)


def _info(info: _SideInfo) -> str:
    host = info.get("host") or {}
    parts = [info.get("source"), host.get("libvirt") and f"libvirt {host['libvirt']}",
             host.get("qemu") and f"QEMU {host['qemu']}"]
    shown = [p for p in parts if p]
    return f"  ({', '.join(shown)})" if shown else ""


_COLORS = {"-": "\x1b[31m", "+": "\x1b[32m", "~": "\x1b[33m", ">": "\x1b[36m", "@": "\x1b[1;35m", "h": "\x1b[1m"}
_RESET = "\x1b[0m"


def render_hunks(head_a: str, head_b: str, hunks: list[Hunk], diffs: list[Any], color: bool, context: int,
            notes: list[str] | None = None) -> str:
    def paint(mark: str, text: str) -> str:
        return f"{_COLORS[mark]}{text}{_RESET}" if color and mark in _COLORS else text

    out = [paint("h", head_a), paint("h", head_b)]
    for h in hunks:
        if all(r.mark == " " for r in h.rows):
            continue    # like a unified diff: only hunks that hold a difference
        out.append(paint("@", f"@@ {h.title} @@"))
        keep: set[int] = set()
        for n, r in enumerate(h.rows):
            if r.mark != " ":
                keep.update(range(n - context, n + context + 1))
        skipped = 0
        for n, r in enumerate(h.rows):
            if n not in keep:
                skipped += 1
                continue
            if skipped:
                out.append(f"  … {skipped} unchanged")
                skipped = 0
            out.append(paint(r.mark, f"{r.mark} {r.text}"))
            out += [paint(r.mark, f"      {d}") for d in r.details]
        if skipped:
            out.append(f"  … {skipped} unchanged")
    out += [f"note: {n}" for n in notes or []]
    kinds = Counter(getattr(d, "kind", "difference") for d in diffs)
    if diffs:
        out.append(f"{len(diffs)} difference{'s' if len(diffs) != 1 else ''}: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    else:
        out.append("equivalent")
    return "\n".join(out) + "\n"


def _phase_keys(trace: tr.Trace) -> list[tuple[str, tr.Phase]]:
    seen: Counter[str] = Counter()
    out = []
    for ph in trace.get("phases") or []:
        seen[ph.get("name", "?")] += 1
        n = seen[ph.get("name", "?")]
        out.append((ph.get("name", "?") + (f"#{n}" if n > 1 else ""), ph))
    return out


def _image_paths(*phases: tr.Phase | None) -> list[str]:
    out = []
    for ph in phases:
        img = ph.get("image") if ph else None
        path = img.get("path") if isinstance(img, dict) else None
        if isinstance(path, str):
            out.append(path)
    return out


def _command_row(label: str, op: str, i: int | None, j: int | None, a: _Cmd | None, b: _Cmd | None,
                 diffs: list[Difference]) -> Row:
    """One aligned command pair as a row, adding its differences to *diffs*."""
    if op == "delete" and a is not None:
        diffs.append(Difference(label, "missing", a.name, i, None))
        return Row("-", _label(a.body))
    if op == "insert" and b is not None:
        diffs.append(Difference(label, "extra", b.name, None, j))
        return Row("+", _label(b.body))
    assert a is not None and b is not None
    details: list[str] = []
    mark = " "
    if op == "moved":
        mark = ">"
        d = Difference(label, "reordered", b.name, i, j, [f"command #{i} in A is #{j} in B"])
        diffs.append(d)
        details += d.details
    if op == "change":
        mark = "~"
        lines = value_diff({k: v for k, v in a.body.items() if k != "execute"},
                           {k: v for k, v in b.body.items() if k != "execute"})
        diffs.append(Difference(label, "changed", b.name, i, j, lines))
        details += lines
    if a.reply != b.reply:
        lines = [f"reply {x}" for x in value_diff(a.reply if a.reply is not None else _ABSENT,
                                                  b.reply if b.reply is not None else _ABSENT)]
        diffs.append(Difference(label, "reply", b.name, i, j, lines))
        details += lines
        mark = "~" if mark == " " else mark
    return Row(mark, _label(b.body), details)


def _event_row(label: str, op: str, i: int | None, j: int | None, a: _Evt | None, b: _Evt | None,
               diffs: list[Difference]) -> Row | None:
    """One aligned event pair as a row (None for an event only in A that needs no row), adding its
    differences to *diffs*."""
    if op == "delete" and a is not None:
        diffs.append(Difference(label, "event-missing", a.name, i, None))
        return Row("-", _evt_label(a.body))
    if op == "insert" and b is not None:
        diffs.append(Difference(label, "event-extra", b.name, None, j))
        return Row("+", _evt_label(b.body))
    if op == "moved" and b is not None:
        d = Difference(label, "event-reordered", b.name, i, j, [f"event #{i} in A is #{j} in B"])
        diffs.append(d)
        return Row(">", _evt_label(b.body), d.details)
    if op == "change" and a is not None and b is not None:
        lines = value_diff(a.body.get("data"), b.body.get("data"), "data")
        diffs.append(Difference(label, "event-changed", b.name, i, j, lines))
        return Row("~", _evt_label(b.body), lines)
    return Row(" ", _evt_label(b.body)) if b is not None else None


def _outcome_rows(label: str, pa: tr.Phase, pb: tr.Phase, strict: bool, diffs: list[Difference]) -> list[Row]:
    """The phases' operation, ok and error (image paths in errors normalized unless *strict*)."""
    rows: list[Row] = []
    images = _image_paths(pa, pb)
    for key in ("operation", "ok", "error"):
        va, vb = pa.get(key), pb.get(key)
        if key == "error" and not strict:
            va, vb = (_map_strings(v, lambda s: functools.reduce(lambda x, p: x.replace(p, "<image>"), images, s))
                      for v in (va, vb))
        if va != vb:
            diffs.append(Difference(label, "outcome", key, details=[f"{key}: {short(va)} → {short(vb)}"]))
            rows += [Row("-", f"{key}: {short(va)}"), Row("+", f"{key}: {short(vb)}")]
        else:
            rows.append(Row(" ", f"{key}: {short(va)}"))
    return rows


def _diff_phase(label: str, pa: tr.Phase, pb: tr.Phase, rules: list[Rule],
                strict: bool, fired: set[str] | None = None) -> tuple[list[Difference], list[Hunk]]:
    diffs: list[Difference] = []
    ca, ea = _normalize_phase(pa, rules, strict, _image_paths(pa) if strict else _image_paths(pa, pb), fired, pb)
    cb, eb = _normalize_phase(pb, rules, strict, _image_paths(pb) if strict else _image_paths(pa, pb), fired, pa)
    rows = [_command_row(label, op, i, j, ca[i] if i is not None else None, cb[j] if j is not None else None, diffs)
            for op, i, j in align(ca, cb)]
    erows = [r for op, i, j in align(ea, eb)
             if (r := _event_row(label, op, i, j, ea[i] if i is not None else None,
                                 eb[j] if j is not None else None, diffs)) is not None]
    hunks = [Hunk(f"{label}: commands (A {len(ca)}, B {len(cb)})", rows),
             Hunk(f"{label}: events (A {len(ea)}, B {len(eb)})", erows),
             Hunk(f"{label}: outcome", _outcome_rows(label, pa, pb, strict, diffs))]
    return diffs, hunks


def diff_traces(a: tr.Trace, b: tr.Trace, *, strict: bool = False, a_label: str = "A",
                b_label: str = "B", rules_path: str | Path | None = None) -> TraceDiff:
    """Compare two traces phase by phase after normalization (see the module docstring)."""
    rules = load_rules(rules_path)
    fired: set[str] = set()
    pa, pb = _phase_keys(a), _phase_keys(b)
    bmap = dict(pb)
    diffs: list[Difference] = []
    hunks: list[Hunk] = []
    for label, ph in pa:
        other = bmap.get(label)
        if other is None:
            diffs.append(Difference(label, "phase-missing", label, details=[f"phase {label} only in A"]))
            hunks.append(Hunk(f"{label}: only in A", [Row("-", f"phase {label} ({ph.get('operation')})")]))
            continue
        d, h = _diff_phase(label, ph, other, rules, strict, fired)
        diffs += d
        hunks += h
    amap = dict(pa)
    for label, ph in pb:
        if label not in amap:
            diffs.append(Difference(label, "phase-extra", label, details=[f"phase {label} only in B"]))
            hunks.append(Hunk(f"{label}: only in B", [Row("+", f"phase {label} ({ph.get('operation')})")]))
    applied = [r.id for r in rules if r.id in fired]      # table order, each once
    ia, ib = (_SideInfo(source=t.get("source"), host={"libvirt": t["host"].get("libvirt"),
                                                      "qemu": t["host"].get("qemu")}) for t in (a, b))
    return TraceDiff(a_label, b_label, strict, diffs, hunks, applied, ia, ib, str(rules_path or NORMALIZE_TABLE))
