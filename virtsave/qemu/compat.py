"""What a QEMU knows of migration, and a traced command fitted to it (replays across QEMU versions).

A trace records what libvirt sent to *its* QEMU; another QEMU may lack some of it. libvirt sets every
migration capability it knows of, mostly off (``switchover-ack``, ``mapped-ram`` … are unknown to
QEMU 7.2), and newer QEMUs take arguments older ones refuse (``migrate-incoming``'s ``exit-on-error``,
QEMU 9.1). :class:`Known` is what this QEMU accepts, read once over QMP (``query-migrate-capabilities``
and ``query-qmp-schema``, unrecorded); :func:`check` refuses — one line naming each — a traced phase
that needs what this QEMU lacks (a capability on, a parameter off its default); :func:`fit` leaves out
of a command what this QEMU lacks and the trace had off or at QEMU's default (:func:`droppable`).

Example::

    known = compat.Known.read(session)
    compat.check(known, [trace_phase], qemu="7.2.22")      # UnsupportedError: … mapped-ram on …
    args, dropped = compat.fit(known, "migrate-incoming", {"uri": "fd:3", "exit-on-error": False})
    # args == {"uri": "fd:3"}, dropped == ["exit-on-error"] on QEMU 7.2

    >>> k = Known(frozenset({"events", "xbzrle"}), {"migrate-incoming": frozenset({"uri"})})
    >>> fit(k, "migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": False},
    ...                                                      {"capability": "mapped-ram", "state": False}]})
    ({'capabilities': [{'capability': 'xbzrle', 'state': False}]}, ['mapped-ram'])
    >>> fit(k, "migrate-incoming", {"uri": "fd:3", "exit-on-error": False})
    ({'uri': 'fd:3'}, ['exit-on-error'])
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from virtsave.core.errors import UnsupportedError
from virtsave.qemu.qmp import QMPSession
from virtsave.trace import model as _trace

__all__ = ["CAPABILITIES", "FEATURE_HINTS", "FITTED", "SETTING_DEFAULTS", "Known", "check", "droppable", "fit"]

#: QEMU's defaults (``migration/options.c``, ``migration/migration.c``) of migration parameters and
#: arguments newer than a QEMU a trace may be replayed on.
SETTING_DEFAULTS: dict[str, Any] = {
    "vcpu-dirty-limit": 1, "x-vcpu-dirty-limit-period": 1000,      # QEMU 8.1
    "avail-switchover-bandwidth": 0,                                # QEMU 8.2
    "mode": "normal", "zero-page-detection": "multifd",             # QEMU 9.0
    "direct-io": False,                                             # QEMU 9.1
    "exit-on-error": True,                                          # QEMU 9.1 (migrate-incoming)
    "multifd-qatzip-level": 1,                                      # QEMU 9.2
}
#: What a missing feature is for, in the line that names it.
FEATURE_HINTS = {
    "mapped-ram": "libvirt's sparse image format, QEMU >= 9.0",
    "multifd": "parallel save channels",
    "direct-io": "--bypass-cache of a sparse image, QEMU >= 9.1",
}
#: Commands whose arguments are fitted to this QEMU's schema.
FITTED = ("migrate-set-parameters", "migrate", "migrate-incoming")
CAPABILITIES = "migrate-set-capabilities"


def droppable(name: str, value: Any) -> bool:
    """Whether a traced setting this QEMU lacks may be left out: it was off, or at QEMU's default.

    >>> droppable("switchover-ack", False), droppable("exit-on-error", True), droppable("direct-io", True)
    (True, True, False)
    """
    return value is False or value is None or (name in SETTING_DEFAULTS and SETTING_DEFAULTS[name] == value)


@dataclass(frozen=True)
class Known:
    """The migration capabilities a QEMU knows and the arguments its :data:`FITTED` commands take."""

    capabilities: frozenset[str]
    arguments: dict[str, frozenset[str]]

    @classmethod
    def read(cls, session: QMPSession) -> Known:
        """Ask *session*'s QEMU (unrecorded: not part of the phase being replayed)."""
        with session.unrecorded():
            caps = session.execute("query-migrate-capabilities") or []
            schema = session.execute("query-qmp-schema") or []
        return cls(frozenset(str(c["capability"]) for c in caps), _arguments(schema, FITTED))


def _arguments(schema: list[dict[str, Any]], commands: Iterable[str]) -> dict[str, frozenset[str]]:
    """The argument names of *commands* in a ``query-qmp-schema`` answer."""
    by_name = {e.get("name"): e for e in schema}
    out = {}
    for cmd in commands:
        entry = by_name.get(cmd) or {}
        members = (by_name.get(entry.get("arg-type")) or {}).get("members") or []
        if entry:
            out[cmd] = frozenset(str(m["name"]) for m in members)
    return out


def _lacking(known: Known, execute: str, args: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, traced value) of what *execute* with *args* names and this QEMU lacks."""
    if execute == CAPABILITIES:
        return [(str(c.get("capability")), c.get("state")) for c in args.get("capabilities", [])
                if c.get("capability") not in known.capabilities]
    members = known.arguments.get(execute)
    return [] if members is None else [(k, v) for k, v in args.items() if k not in members]


def check(known: Known, traced: Iterable[_trace.Phase], qemu: str) -> None:
    """Raise :class:`UnsupportedError` — one line naming each — when the *traced* phases need what this
    QEMU (version *qemu*) lacks: a capability on, a parameter or argument off its default."""
    missing: list[str] = []
    for ph in traced:
        for m in _trace.iter_commands(ph):
            for name, value in _lacking(known, m["execute"], m.get("arguments") or {}):
                if not droppable(name, value):
                    what = f"capability {name} on" if m["execute"] == CAPABILITIES else \
                        f"{m['execute']} {name}={value!r}"
                    missing.append(what + (f" ({FEATURE_HINTS[name]})" if name in FEATURE_HINTS else ""))
    if missing:
        raise UnsupportedError(f"QEMU {qemu} lacks what the trace needs: {', '.join(dict.fromkeys(missing))}")


def fit(known: Known, execute: str, args: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """*args* of *execute* without what this QEMU lacks, and the names left out. Raises
    :class:`UnsupportedError` for one that was on or off its default (:func:`check` says it first)."""
    lacking = _lacking(known, execute, args)
    if not lacking:
        return args, []
    bad = [n for n, v in lacking if not droppable(n, v)]
    if bad:
        raise UnsupportedError(f"{execute}: this QEMU lacks {', '.join(bad)}, which the trace needs")
    names = [n for n, _ in lacking]
    if execute == CAPABILITIES:
        return {**args, "capabilities": [c for c in args.get("capabilities", [])
                                         if c.get("capability") not in names]}, names
    return {k: v for k, v in args.items() if k not in names}, names
