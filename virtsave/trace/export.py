"""Export a trace as libvirt's ``.replies`` file, the input of libvirt's QEMU monitor test harness.

Format (as in libvirt's ``tests/qemucapabilitiesdata/*.replies``, read by
``qemuMonitorTestProcessFileEntries`` in ``tests/qemumonitortestutils.c`` and checked by libvirt's
``scripts/qemu-replies-tool.py``): JSON objects separated by one empty line, strictly alternating command,
reply, command, reply … Each object is pretty-printed with a 2-space indent and ASCII escapes (Python's
``json.dumps(obj, indent=2)``, as the tool writes them), keys in wire order: a command is
``{"execute", "arguments"?, "id"}`` and a reply ``{"return" | "error", "id"}``. The file ends with a newline.

Ids are renumbered the way libvirt's test monitor numbers them: ``libvirt-1``, ``libvirt-2`` … restarting
at every ``qmp_capabilities``. A phase that starts mid-conversation (a save phase: libvirt's monitor was
opened when the guest started) gets a leading ``qmp_capabilities`` pair, so that numbering starts where the
tool expects it; a direct trace's qemu.qmp ids (``__qmp#00002``) are renumbered the same way.

Events are omitted: the format has no place for them (every object after a command is taken as its
reply) and libvirt's test monitor emits events itself. A command without a reply in the trace (cut
log, QEMU killed) is omitted too, because the harness rejects a command without a response; both
counts are returned by :func:`replies_stats`.

Example::

    >>> from virtsave.trace import model as t
    >>> tr = t.new_trace("libvirt")
    >>> ph = t.add_phase(tr, "save", "save")
    >>> ph["messages"] += [t.command("stop", id="libvirt-477"), t.reply("libvirt-477")]
    >>> print(to_replies(tr), end="")
    {
      "execute": "qmp_capabilities",
      "id": "libvirt-1"
    }
    <BLANKLINE>
    {
      "return": {},
      "id": "libvirt-1"
    }
    <BLANKLINE>
    {
      "execute": "stop",
      "id": "libvirt-2"
    }
    <BLANKLINE>
    {
      "return": {},
      "id": "libvirt-2"
    }
"""

from __future__ import annotations

import json
from typing import Any

from virtsave.core import jsonload
from virtsave.core.errors import TraceError
from virtsave.trace import model as tr
from virtsave.trace.redact import redact_trace

__all__ = ["INDENT", "pairs", "parse_replies", "replies_stats", "to_replies"]

INDENT = 2


def _phases(trace: tr.Trace, phase: str | int | None) -> list[tr.Phase]:
    phases = list(trace.get("phases") or [])
    if phase is None:
        return phases
    if isinstance(phase, int):
        if not -len(phases) <= phase < len(phases):
            raise TraceError(f"trace has no phase #{phase} ({len(phases)} phases)")
        return [phases[phase]]
    picked = [p for p in phases if p.get("name") == phase]
    if not picked:
        raise TraceError(f"trace has no {phase} phase (phases: {', '.join(p.get('name', '?') for p in phases)})")
    return picked


Pair = tuple[tr.CommandMessage, tr.ReplyMessage]
ObjPair = tuple[dict[str, Any], dict[str, Any]]


def pairs(trace: tr.Trace, phase: str | int | None = None) -> tuple[list[Pair], int, int]:
    """(command, reply) pairs in wire order, plus the number of events and unanswered commands skipped."""
    per_phase, events, unanswered = phase_pairs(trace, phase)
    return [p for items in per_phase for p in items], events, unanswered


def phase_pairs(trace: tr.Trace, phase: str | int | None = None) -> tuple[list[list[Pair]], int, int]:
    """Like :func:`pairs`, one list per phase."""
    per_phase: list[list[Pair]] = []
    events = unanswered = 0
    for ph in _phases(trace, phase):
        out: list[Pair] = []
        per_phase.append(out)
        pending: dict[int, tr.CommandMessage] = {}
        order: list[int] = []
        waiting: dict[str, list[int]] = {}      # id (as JSON text) → commands still without a reply
        replies: dict[int, tr.ReplyMessage] = {}
        for m in ph.get("messages") or []:
            if m["kind"] == "command":
                key = len(order)
                pending[key] = m
                order.append(key)
                waiting.setdefault(json.dumps(m.get("id")), []).append(key)
            elif m["kind"] == "reply":
                queue = waiting.get(json.dumps(m.get("id")))
                if queue:
                    replies[queue.pop(0)] = m
            else:
                events += 1
        for key in order:
            if key in replies:
                out.append((pending[key], replies[key]))
            else:
                unanswered += 1
    return per_phase, events, unanswered


def _command_obj(m: tr.CommandMessage) -> dict[str, Any]:
    obj: dict[str, Any] = {"execute": m["execute"]}
    if "arguments" in m and m["arguments"] is not None:
        obj["arguments"] = m["arguments"]
    if m.get("id") is not None:
        obj["id"] = m["id"]
    return obj


def _reply_obj(m: tr.ReplyMessage) -> dict[str, Any]:
    obj: dict[str, Any] = {"error": m["error"]} if "error" in m else {"return": m.get("return", {})}
    if m.get("id") is not None:
        obj["id"] = m["id"]
    return obj


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=INDENT)


def renumbered(items: list[Pair]) -> list[ObjPair]:
    """*items* as libvirt's test monitor numbers them: a leading ``qmp_capabilities`` pair when the
    conversation does not start with one, then ids ``libvirt-1`` … restarting at each ``qmp_capabilities``.

    >>> [c["id"] for c, _ in renumbered([(tr.command("stop", id=9), tr.reply(9))])]
    ['libvirt-1', 'libvirt-2']
    """
    objs = [(_command_obj(cmd), _reply_obj(rep)) for cmd, rep in items]
    if not objs or objs[0][0]["execute"] != "qmp_capabilities":
        objs.insert(0, ({"execute": "qmp_capabilities"}, {"return": {}}))
    seq = 1
    for cmd, rep in objs:
        if cmd["execute"] == "qmp_capabilities":
            seq = 1
        cmd["id"] = rep["id"] = f"libvirt-{seq}"
        seq += 1
    return objs


def to_replies(trace: tr.Trace, phase: str | int | None = None, *, redact: bool = True) -> str:
    """The ``.replies`` text of *trace* (all phases in order, or one: ``"save"``, ``"restore"`` or an index).

    The trace is redacted first (:func:`virtsave.trace.redact.redact_trace`) unless ``redact=False``, so an
    exported file never carries a secret even from an unredacted trace. Raises :class:`TraceError`
    when the requested phase does not exist.
    """
    tr = redact_trace(trace) if redact else trace
    per_phase, _, _ = phase_pairs(tr, phase)
    blocks = []
    for items in per_phase:
        if not items:
            continue
        for cmd, rep in renumbered(items):
            blocks.append(_dump(cmd))
            blocks.append(_dump(rep))
    return "\n\n".join(blocks) + "\n" if blocks else ""


def replies_stats(trace: tr.Trace, phase: str | int | None = None) -> dict[str, int]:
    """What :func:`to_replies` writes and leaves out: ``pairs``, ``events_omitted``, ``unanswered_omitted``."""
    items, events, unanswered = pairs(trace, phase)
    return {"pairs": len(items), "events_omitted": events, "unanswered_omitted": unanswered}


def parse_replies(text: str) -> list[dict[str, Any]]:
    """Read a ``.replies`` text back into its JSON objects (blank-line separated), for checks and tests."""
    out = []
    for block in text.split("\n\n"):
        if block.strip():
            try:
                out.append(jsonload.loads(block))
            except ValueError as exc:
                raise TraceError(f"not a .replies file: {exc}") from None
    return out
