"""JSON from untrusted input (traces, QMP payloads in daemon logs, vmstate descriptions in images), bounded.

Python's ``json.loads`` accepts what later code cannot handle: nesting deep enough that ``copy.deepcopy``,
the schema validator or a recursive walk run out of stack (``RecursionError``, not a ``ValueError``), and
integers of thousands of digits that cannot be turned back into text. :func:`loads` refuses both with
:class:`JSONRefused`, a ``ValueError`` — what every caller already catches for malformed JSON — so that
such input becomes the caller's usual one-line error. Nothing QEMU or libvirt writes comes near the
limits: QMP payloads and vmstate descriptions nest a dozen levels.

Example::

    >>> loads('{"execute": "stop", "id": "libvirt-1"}')
    {'execute': 'stop', 'id': 'libvirt-1'}
    >>> loads("[" * 100 + "]" * 100)
    Traceback (most recent call last):
    ...
    virtsave.core.jsonload.JSONRefused: JSON nested deeper than 64 levels
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_DEPTH", "JSONRefused", "depth_exceeds", "loads"]

#: Deepest nesting accepted (QMP payloads and vmstate descriptions nest about a dozen levels).
MAX_DEPTH = 64


class JSONRefused(ValueError):
    """Valid JSON virtsave will not take: nested too deeply (or too deep to parse at all)."""


def depth_exceeds(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether *obj* (parsed JSON) nests deeper than *limit* containers (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node  # type: ignore[assignment]
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def loads(text: str | bytes | bytearray, *, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that raises :class:`JSONRefused` (a ``ValueError``) for nesting deeper than
    *max_depth*, besides ``json.JSONDecodeError`` for malformed text and ``ValueError`` for integers
    past Python's digit limit. ``UnicodeDecodeError`` (also a ``ValueError``) for undecodable bytes."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise JSONRefused(f"JSON nested deeper than {max_depth} levels") from None
    brackets = (text.count("[") + text.count("{")) if isinstance(text, str) else (text.count(b"[") + text.count(b"{"))
    if brackets > max_depth and depth_exceeds(obj, max_depth):
        raise JSONRefused(f"JSON nested deeper than {max_depth} levels")
    return obj
