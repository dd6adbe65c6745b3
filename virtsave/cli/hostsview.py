"""Rendering of commands run on several hosts (``-c`` repeated, ``--hosts FILE``): a host column in
the table and in ``--json``; an unreachable host is one failed row; exit 2 when anything failed.

Example::

    >>> from virtsave.libvirtd.fleet import Fanout, HostOutcome
    >>> _failures(Fanout([HostOutcome("qemu+ssh://h/system", "h/system", ok=False, error="no route")]))
    ['h/system (no route)']
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from virtsave.core.errors import OperationFailed
from virtsave.libvirtd import fleet

from .common import OPTIONS, emit_json, info
from .ref import _age, _out, _size

__all__ = ["bulk_report", "list_report"]


def _warnings(out: fleet.Fanout) -> None:
    for h in out.hosts:
        for w in h.warnings:
            info(f"warning: {h.label}: {w}")


def _failures(out: fleet.Fanout) -> list[str]:
    bad = [f"{h.label} ({h.error})" for h in out.hosts if not h.ok]
    bad += [f"{h.label}: {r.domain}" for h in out.hosts for r in h.failed]
    bad += [f"{n} (not found on any host)" for n in out.missing]
    return bad


def _raise_if_failed(out: fleet.Fanout, what: str, total: int) -> None:
    bad = _failures(out)
    if bad:
        raise OperationFailed(f"{len(bad)} of {total} {what} failed: {', '.join(bad)}")


def _host_json(h: fleet.HostOutcome) -> dict[str, Any]:
    return {"host": h.uri, "label": h.label, "ok": h.ok, "error": h.error, "seconds": h.seconds,
            "warnings": h.warnings}


def list_report(out: fleet.Fanout) -> None:
    """``list`` on several hosts: one row per domain with its host; a failed host is one row."""
    _warnings(out)
    if OPTIONS.json:
        rows: list[dict[str, Any]] = []
        for h in out.hosts:
            rows += [{"host": h.uri, **d} for d in h.domains] if h.ok else [
                {"host": h.uri, "name": None, "error": h.error}]
        emit_json(rows)
    else:
        n = sum(len(h.domains) for h in out.hosts)
        failed = sum(1 for h in out.hosts if not h.ok)
        table = Table(title=f"{n} domain{'s' if n != 1 else ''} on {len(out.hosts)} hosts"
                      + (f" ({failed} not reachable)" if failed else ""), title_justify="left")
        for col in ("host", "name", "state", "managed save", "image size", "image age"):
            table.add_column(col, justify="right" if col.startswith("image") else "left")
        for h in out.hosts:
            if not h.ok:
                table.add_row(h.label, "-", f"FAILED: {h.error}", "", "", "")
            for d in h.domains:
                table.add_row(h.label, d["name"], d["state"], "yes" if d["managed_save"] else "no",
                              _size(d["image_size"]), _age(d["image_age"]))
        _out().print(table)
    _raise_if_failed(out, "hosts", len(out.hosts))


def _bulk_rows(out: fleet.Fanout, operation: str) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for h in out.hosts:
        if not h.ok:
            rows.append((h.label, "-", "FAILED", f"{h.seconds:.2f}", "-", h.error or ""))
        for r in h.results:
            if r.ok:
                how = ""
                if operation == "start":
                    how = "from managed-save image" if r.detail.get("from_managed_save") else "cold boot"
                state = getattr(r, "state", None) or r.detail.get("state_after") or ""  # OpResult old and new
                detail = ", ".join(x for x in (how, state) if x)
            else:
                detail = (r.error or "").removeprefix(f"{operation} of {r.domain} failed: ")
            rows.append((h.label, r.domain or "-", "ok" if r.ok else "FAILED", f"{r.seconds:.2f}",
                         _size(r.image_size), detail))
    rows += [("-", n, "FAILED", "", "-", "domain not found on any host") for n in out.missing]
    return rows


def bulk_report(out: fleet.Fanout, operation: str) -> None:
    """``managed-save --all`` / ``start --all`` on several hosts: summary with a host column."""
    _warnings(out)
    results = [r for h in out.hosts for r in h.results]
    total = len(results) + sum(1 for h in out.hosts if not h.ok) + len(out.missing)
    if OPTIONS.json:
        rows = [{"host": h.uri, **r.to_dict()} for h in out.hosts for r in h.results]
        rows += [{"host": h.uri, "domain": None, "operation": operation, "ok": False, "seconds": h.seconds,
                  "error": h.error} for h in out.hosts if not h.ok]
        emit_json({"operation": operation, "ok": out.ok, "seconds": out.seconds,
                   "hosts": [_host_json(h) for h in out.hosts], "missing": out.missing, "results": rows})
    else:
        if not results and out.ok:
            info(f"{operation} --all: no domain matched on any of {len(out.hosts)} hosts; nothing to do")
        good = sum(1 for r in results if r.ok)
        table = Table(title=f"{operation}: {good} of {total} ok on {len(out.hosts)} hosts in {out.seconds:.2f} s",
                      title_justify="left")
        for col in ("host", "domain", "result", "seconds", "image size", "detail"):
            table.add_column(col, justify="right" if col in ("seconds", "image size") else "left",
                             no_wrap=col != "detail")
        for row in _bulk_rows(out, operation):
            table.add_row(*row)
        _out().print(table)
    _raise_if_failed(out, f"{operation} operations", total)
