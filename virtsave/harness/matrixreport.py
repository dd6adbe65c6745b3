"""Render an upgrade-check matrix (:mod:`virtsave.harness.matrix`): terminal table, JUnit XML, HTML.

* :func:`table` — a rich table: one line per input, one column per QEMU build, each cell the
  status per mode (``faithful``/``essential`` for traces, ``restore`` for images);
* :func:`junit` — JUnit XML, one ``<testsuite>`` per build and one ``<testcase>`` per cell, so
  Jenkins/GitLab list every cell; non-best statuses are ``<failure>`` with the reason and details;
* :func:`html` — one self-contained HTML file (inline CSS, no script, nothing fetched): the table,
  each cell linked to its details (reason, diff, command line, rewrites, warnings).

Everything from the inputs (trace text, QEMU messages, paths) is escaped: a trace is untrusted.

Example::

    >>> from virtsave.harness.matrix import Cell, Matrix, Row
    >>> m = Matrix([Row("r", "image", "/x.save", "user", "x.save", "pc-i440fx-7.2")], [],
    ...            [Cell("r", "b", "restore", "refuses", "qemu: unsupported machine type")])
    >>> "<failure" in junit(m) and 'type="refuses"' in junit(m)
    True
"""

from __future__ import annotations

import html as _html
import json
import re
from typing import Any
from xml.etree import ElementTree as ET

from rich.table import Table
from rich.text import Text

from virtsave.harness.matrix import RANK, Cell, Matrix, Row, machine_notes

__all__ = ["html", "junit", "table"]

STYLE = {"equivalent": "green", "loads": "green", "differs": "yellow", "fails": "red", "refuses": "red"}
_BEST = {"equivalent", "loads"}


def _cells_of(m: Matrix, row: Row, build: str) -> list[Cell]:
    return [c for c in m.cells if c.row == row.id and c.build == build]


def _regressed(m: Matrix) -> set[str]:
    return {r["key"] for r in (m.regressions or [])}


def _machine_mark(c: Cell) -> str:
    return {"deprecated": " (machine deprecated)", "missing": " (no such machine)"}.get(c.machine_support or "", "")


def _short(reason: str, width: int = 70) -> str:
    """A reason as a table cell shows it (the launcher's "QEMU exited with status N:" left out).

    >>> _short("QEMU exited with status 1: qemu-system-x86_64: unsupported machine type")
    'qemu-system-x86_64: unsupported machine type'
    """
    text = re.sub(r"^(?:(?:save|restore) phase failed: )?QEMU exited with status \d+: ", "", reason)
    return text if len(text) <= width else text[:width - 1] + "…"


def _row_label(row: Row) -> str:
    what = row.machine or "?"
    if row.kind == "trace":
        lv = row.info.get("libvirt")
        return f"{row.label}\ntrace, libvirt {lv or '?'}, {what}"
    return f"{row.label}\nimage ({row.info.get('format')}), {what}"


def table(m: Matrix) -> Table:
    """The matrix as a rich table (statuses coloured, regressions marked ``!``)."""
    t = Table(title="virtsave upgrade check", show_lines=True)
    t.add_column("input", overflow="fold")
    names = [b.name for b in m.builds if not b.error]
    for b in m.builds:
        if not b.error:
            t.add_column(f"{b.name}\nQEMU {b.version}", overflow="fold")
    bad = _regressed(m)
    for row in m.rows:
        cols: list[Text | str] = [_row_label(row)]
        for name in names:
            text = Text()
            for c in _cells_of(m, row, name):
                if text:
                    text.append("\n")
                mark = "! " if c.key in bad else ""
                text.append(f"{mark}{c.mode if row.kind == 'trace' else ''}{': ' if row.kind == 'trace' else ''}")
                text.append(c.status, style=STYLE.get(c.status, ""))
                extra = _machine_mark(c)
                if c.status in ("fails", "refuses") and c.reason:
                    extra += f" — {_short(c.reason, 90)}"
                elif c.status == "differs" and c.reason:
                    extra += f" ({c.reason})"
                text.append(extra, style="dim")
            cols.append(text)
        t.add_row(*cols)
    return t


# -- JUnit ------------------------------------------------------------------------------------------
def _detail_text(c: Cell) -> str:
    d = dict(c.details)
    diff = d.pop("diff", None)
    parts = [f"status: {c.status}", f"reason: {c.reason or '-'}", f"machine type: {c.machine_support or '?'}"]
    if diff:
        parts.append(diff)
    parts.append(json.dumps(d, indent=1, default=str))
    return "\n".join(parts)


def junit(m: Matrix) -> str:
    """JUnit XML: a testsuite per build, a testcase per cell (classname = input, name = mode)."""
    root = ET.Element("testsuites", name="virtsave matrix")
    bad = {r["key"]: r for r in (m.regressions or [])}
    rows = {r.id: r for r in m.rows}
    total = failures = 0
    versions = {b.name: b.version for b in m.builds}
    names = list(dict.fromkeys([*versions, *(c.build for c in m.cells)]))
    for name in names:
        cells = [c for c in m.cells if c.build == name]
        suite = ET.SubElement(root, "testsuite", name=f"{name} (QEMU {versions.get(name) or '?'})")
        nfail = 0
        for c in cells:
            row = rows.get(c.row)
            case = ET.SubElement(suite, "testcase", classname=f"virtsave.matrix.{row.label if row else c.row}",
                                 name=f"{c.mode} on {name}", time=f"{c.seconds:.3f}")
            if c.status not in _BEST:
                nfail += 1
                msg = f"{c.status}: {c.reason or ''}".strip()
                if c.key in bad:
                    msg = f"REGRESSION (baseline: {bad[c.key]['was']}) {msg}"
                fail = ET.SubElement(case, "failure", message=msg[:500], type=c.status)
                fail.text = _detail_text(c)
            else:
                ET.SubElement(case, "system-out").text = _detail_text(c)
        suite.set("tests", str(len(cells)))
        suite.set("failures", str(nfail))
        suite.set("errors", "0")
        suite.set("time", f"{sum(c.seconds for c in cells):.3f}")
        total += len(cells)
        failures += nfail
    root.set("tests", str(total))
    root.set("failures", str(failures))
    root.set("errors", "0")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# -- HTML -------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table.matrix{border-collapse:collapse}
.matrix th,.matrix td{border:1px solid #bbb;padding:.35em .6em;vertical-align:top;text-align:left}
.matrix th{background:#eee}
.st-equivalent,.st-loads{background:#d9f2d9}.st-differs{background:#fff3c4}
.st-fails,.st-refuses{background:#f8d0d0}
.cell{display:block;margin:.1em 0}.mach{color:#7a4a00;font-size:.85em}.reg{font-weight:bold;color:#a00}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;white-space:pre-wrap;font-size:.85em}
details{margin:.6em 0;border:1px solid #ccc;padding:.4em .8em}summary{cursor:pointer}
.small{color:#555;font-size:.85em}
"""


def _e(v: Any) -> str:
    return _html.escape(str(v), quote=True)


def _html_cell(c: Cell, n: int, bad: set[str], trace: bool) -> str:
    label = f"{c.mode}: " if trace else ""
    reg = '<span class="reg">regression </span>' if c.key in bad else ""
    mach = f' <span class="mach">{_e(_machine_mark(c).strip())}</span>' if _machine_mark(c) else ""
    why = ""
    if c.status in ("fails", "refuses") and c.reason:
        why = f'<br><span class="small why">{_e(_short(c.reason, 90))}</span>'
    return (f'<a class="cell st-{_e(c.status)}" href="#cell-{n}" data-status="{_e(c.status)}">'
            f"{reg}{_e(label)}{_e(c.status)}</a>{mach}{why}")


def _html_details(c: Cell, n: int, row: Row | None, bad: dict[str, Any]) -> str:
    d = dict(c.details)
    diff = d.pop("diff", None)
    argv = d.pop("argv", None)
    head = f"{row.label if row else c.row} × {c.build} — {c.mode}: {c.status}"
    body = [f"<p><b>status</b>: {_e(c.status)}"
            + (f' <span class="reg">(regression; baseline: {_e(bad[c.key]["was"])})</span>' if c.key in bad else "")
            + f"</p><p><b>reason</b>: <span class=\"reason\">{_e(c.reason or '-')}</span></p>",
            f"<p><b>machine type</b>: {_e(row.machine if row else '?')} — "
            f"{_e(c.machine_support or 'unknown')} on this build; {c.seconds:.2f} s</p>"]
    if diff:
        body.append(f"<p><b>diff</b> (trace → replay on this build)</p><pre class=\"diff\">{_e(diff)}</pre>")
    if argv:
        body.append(f"<p><b>command line</b></p><pre>{_e(' '.join(argv))}</pre>")
    if d:
        body.append(f"<p><b>details</b></p><pre>{_e(json.dumps(d, indent=1, default=str))}</pre>")
    opened = " open" if c.status not in _BEST else ""
    return (f'<details id="cell-{n}" class="st-{_e(c.status)}"{opened}><summary>{_e(head)}</summary>'
            + "".join(body) + "</details>")


def _html_table(m: Matrix, index: dict[str, int], bad: set[str]) -> str:
    builds = [b for b in m.builds if not b.error]
    head = "<tr><th>input</th>" + "".join(f"<th>{_e(b.name)}<br><span class=small>QEMU {_e(b.version)}"
                                         f"</span></th>" for b in builds) + "</tr>"
    lines = [head]
    for row in m.rows:
        what = (f"trace · libvirt {row.info.get('libvirt') or '?'}" if row.kind == "trace"
                else f"image · {row.info.get('format')}")
        tds = [f"<td><b>{_e(row.label)}</b><br><span class=small>{_e(what)} · {_e(row.machine or '?')}</span></td>"]
        for b in builds:
            cells = _cells_of(m, row, b.name)
            worst = min((RANK[c.status] for c in cells), default=None)
            cls = next((f"st-{c.status}" for c in cells if RANK[c.status] == worst), "")
            tds.append(f'<td class="{cls}">' + "".join(_html_cell(c, index[c.key], bad, row.kind == "trace")
                                                       for c in cells) + "</td>")
        lines.append("<tr>" + "".join(tds) + "</tr>")
    return '<table class="matrix" id="matrix">' + "".join(lines) + "</table>"


def html(m: Matrix) -> str:
    """One self-contained HTML page with the table and every cell's details."""
    index = {c.key: i for i, c in enumerate(m.cells)}
    bad = {r["key"]: r for r in (m.regressions or [])}
    rows = {r.id: r for r in m.rows}
    notes = machine_notes(m)
    parts = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>virtsave upgrade check</title>",
             f"<style>{_CSS}</style></head><body><h1>virtsave upgrade check</h1>",
             f"<p class=small>{_e(m.created)} · {len(m.rows)} inputs × {len(m.builds)} QEMU builds · "
             f"{len(m.cells)} cells</p>", _html_table(m, index, set(bad))]
    if m.regressions is not None:
        parts.append(f"<h2>Against the baseline</h2><p>{_e(m.baseline or '')}: "
                     + (f"{len(m.regressions)} cell(s) got worse</p><ul id=regressions>"
                        + "".join(f"<li>{_e(r['key'])}: {_e(r['was'])} → {_e(r['now'])}</li>" for r in m.regressions)
                        + "</ul>" if m.regressions else "no cell got worse</p>"))
    if notes:
        parts.append("<h2>Machine types</h2><ul id=notes>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    errs = [b for b in m.builds if b.error]
    if errs or m.skipped:
        parts.append("<h2>Left out</h2><ul>" + "".join(f"<li>build {_e(b.name)}: {_e(b.error)}</li>" for b in errs)
                     + "".join(f"<li>{_e(s['path'])}: {_e(s['reason'])}</li>" for s in m.skipped) + "</ul>")
    parts.append("<h2>Cells</h2><div id=details>"
                 + "".join(_html_details(c, index[c.key], rows.get(c.row), bad) for c in m.cells) + "</div>")
    parts.append("</body></html>\n")
    return "".join(parts)
