"""Upgrade checks: ``virtsave qemus`` (the QEMU builds known) and ``virtsave matrix``.

Example::

    virtsave qemus                                        # system + scripts/setup --extra-qemu builds
    virtsave matrix                                       # shipped corpus × every build
    virtsave matrix --images /var/lib/libvirt/qemu/save --html report.html --junit junit.xml
    virtsave matrix --qemu system --qemu old=/opt/qemu-8.2/bin/qemu-system-x86_64 --traces mytraces/
    virtsave --json matrix > before.json; …upgrade…; virtsave matrix --baseline before.json

Exit codes: 0 done (with ``--baseline``: no cell got worse); 1 a cell got worse than in the
baseline; 2 bad input or nothing to check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from virtsave.core.errors import VirtsaveError
from virtsave.core.files import private_writer

from .common import OPTIONS, emit_json, info

if TYPE_CHECKING:
    from virtsave.harness.matrix import Matrix
    from virtsave.qemu.builds import QemuBuild

QemuOpt = Annotated[list[str] | None, typer.Option(
    "--qemu", metavar="NAME|PATH|NAME=PATH", help="a build to use (repeatable; default: every build found)")]


def _builds(specs: list[str] | None, *, only: bool) -> list[QemuBuild]:
    """Every build found, or only the named ones (*only*), or both."""
    from virtsave.qemu import builds

    found = builds.discover()
    if not specs:
        return found
    named = [builds.resolve(s, found) for s in specs]
    if only:
        return named
    return found + [b for b in named if b.path not in {f.path for f in found}]


def qemus_cmd(qemu: QemuOpt = None) -> None:
    """List the QEMU builds virtsave can run: version, accelerators, machine types."""
    found = _builds(qemu, only=False)
    if OPTIONS.json:
        emit_json([b.to_dict() for b in found])
        return
    t = Table(title="QEMU builds")
    for col in ("name", "version", "path", "accelerators", "machine types", "default", "deprecated"):
        t.add_column(col, overflow="fold")
    for b in found:
        if b.error:
            t.add_row(b.name, "?", b.path, "", f"error: {b.error}", "", "")
            continue
        default = next((m.name for m in b.machines.values() if m.default), "")
        t.add_row(b.name, f"{b.version}\n{b.package or ''}".strip(), b.path, ", ".join(b.accelerators),
                  str(len(b.machines)), default, str(sum(m.deprecated for m in b.machines.values())))
    Console(width=max(Console().width, 120)).print(t)


def _write(path: Path, text: str) -> None:
    with private_writer(path) as f:
        f.write(text.encode())
    info(f"wrote {path}")


def matrix_cmd(
    traces: Annotated[list[Path] | None, typer.Option("--traces", metavar="PATH",
                      help="trace file or directory of *.json traces to add (repeatable)")] = None,
    images: Annotated[list[Path] | None, typer.Option("--images", metavar="PATH",
                      help="save image or directory of images to add, e.g. /var/lib/libvirt/qemu/save")] = None,
    qemu: QemuOpt = None,
    no_corpus: Annotated[bool, typer.Option("--no-corpus", help="leave out the traces shipped with virtsave")]
    = False,
    modes: Annotated[str, typer.Option("--modes", help="replay modes for traces: faithful,essential")]
    = "faithful,essential",
    output: Annotated[Path | None, typer.Option("-o", "--output", metavar="FILE",
                      help="write the matrix JSON here (a later --baseline)")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", metavar="FILE", help="write JUnit XML here")] = None,
    html: Annotated[Path | None, typer.Option("--html", metavar="FILE", help="write the HTML report here")] = None,
    baseline: Annotated[Path | None, typer.Option("--baseline", metavar="OLD.json",
                        help="exit 1 when a cell got worse than in this earlier matrix JSON")] = None,
) -> None:
    """Check traces and save images against several QEMU builds (rows × builds)."""
    from virtsave.harness import matrix

    old = matrix.load(baseline) if baseline is not None else None
    wanted = tuple(m.strip() for m in modes.split(",") if m.strip())
    rows, skipped = matrix.collect_rows(traces or (), images or (), corpus=not no_corpus)
    for s in skipped:
        info(f"skipped {s['path']}: {s['reason']}")
    builds = _builds(qemu, only=True)
    for b in builds:
        if b.error:
            info(f"warning: build {b.name} left out: {b.error}")
    if not rows:
        raise VirtsaveError("nothing to check: no traces or images (give --traces/--images, or drop --no-corpus)")
    if not any(not b.error for b in builds):
        raise VirtsaveError("no usable QEMU build (see 'virtsave qemus'; scripts/setup --extra-qemu NAME adds one)")
    info(f"checking {len(rows)} inputs against {', '.join(b.name for b in builds if not b.error)}")
    m = matrix.run(rows, builds, modes=wanted, uri=OPTIONS.uri, progress=lambda s: info(f"  {s}"))
    m.skipped = skipped
    if old is not None:
        m.baseline = str(baseline)
        m.regressions = matrix.regressions(m, old)
    data = m.to_json()
    _reports(m, data, output, junit, html)
    if OPTIONS.json:
        emit_json(data)
    else:
        from virtsave.harness import matrixreport

        Console(width=max(Console().width, 120)).print(matrixreport.table(m))
        for note in data["notes"]:
            info(f"note: {note}")
    _verdict(m.regressions, baseline)


def _reports(m: Matrix, data: dict[str, object], output: Path | None, junit: Path | None,
             html: Path | None) -> None:
    from virtsave.harness import matrixreport

    if output is not None:
        _write(output, _json_text(data))
    if junit is not None:
        _write(junit, matrixreport.junit(m))
    if html is not None:
        _write(html, matrixreport.html(m))


def _verdict(regressions: list[dict[str, object]] | None, baseline: Path | None) -> None:
    """Exit 1 naming each cell that got worse than in the baseline."""
    if regressions:
        for r in regressions:
            info(f"worse than the baseline: {r['key']}: {r['was']} → {r['now']}"
                 + (f" ({r['reason']})" if r.get("reason") else ""))
        sys.exit(1)
    if regressions is not None:
        info(f"no cell got worse than in {baseline}")


def _json_text(data: object) -> str:
    return json.dumps(data, indent=1, default=str) + "\n"


def register(app: typer.Typer) -> None:
    app.command("qemus")(qemus_cmd)
    app.command("matrix")(matrix_cmd)
