"""Upgrade checks: traces and save images against several QEMU builds, as a matrix.

Rows are inputs, columns are QEMU builds (:mod:`virtsave.qemu.builds`), a cell is one check:

* **trace × build**, per mode (``faithful``, ``essential``): the trace is replayed on the build
  (:func:`virtsave.qemu.replay.replay` with ``qemu_binary=``) and the direct trace is diffed
  against it (:func:`virtsave.trace.diff.diff_traces`). ``equivalent`` / ``differs`` (the diff) /
  ``fails`` (one-line reason). A ``faithful`` replay ends its QEMU as libvirt does (SIGTERM) and hands
  it libvirt's log fdsets, so both traces are compared whole. In ``essential`` mode the trace's
  commands the replay skips by design (probes, post-save resets), the replay's closing ``quit`` and
  the ``SHUTDOWN`` events of either ending are left out of both sides. An fdset the launcher had to
  drop (no file to put in it) is left out of ``query-fdsets`` replies in both modes.
* **image × build** (mode ``restore``): the non-destructive restore check
  (:func:`virtsave.qemu.restorecheck.check_image`) with the command line libvirt makes from the
  image's domain XML (``domxml-to-native``), or a minimal one when libvirt cannot. ``loads`` /
  ``refuses`` (QEMU's reason). The image is opened read-only and never changed.

Each cell also says how the build knows the row's machine type (``ok``, ``deprecated``,
``missing``); :func:`machine_notes` lists the lacking and deprecating builds.

A matrix serializes to JSON (``format: "virtsave-matrix"``); :func:`regressions` compares it with
an older one: a cell is worse when its status ranks lower than the baseline's (equivalent > differs
> fails; loads > refuses).

The corpus (``virtsave/harness/corpus/*.json``) ships libvirt 9.0's and 11.3's recorded
save/restore sequences (see ``scripts/make_corpus.py``), so a bare ``virtsave matrix`` checks
every installed build against both libvirt generations.

Example::

    from virtsave.harness import matrix
    from virtsave.qemu import builds
    rows, skipped = matrix.collect_rows(images=["/var/lib/libvirt/qemu/save"])
    m = matrix.run(rows, builds.discover())
    for cell in m.cells:
        print(cell.row, cell.build, cell.mode, cell.status, cell.reason)
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, cast

from virtsave import __version__
from virtsave.core import paths
from virtsave.core.errors import ImageError, TraceError, VirtsaveError
from virtsave.image import saveimage
from virtsave.qemu import builds as qbuilds
from virtsave.qemu import replay as qreplay
from virtsave.qemu import restorecheck
from virtsave.trace import diff as tdiff
from virtsave.trace import model as tr

__all__ = ["FORMAT", "MODES", "RANK", "Cell", "Matrix", "Row", "collect_rows", "corpus_paths", "load",
           "machine_notes", "regressions", "run"]

FORMAT = "virtsave-matrix"
VERSION = 1
MODES = ("faithful", "essential")
#: Higher is better; a cell ranking lower than in the baseline is a regression.
RANK = {"equivalent": 2, "differs": 1, "fails": 0, "loads": 1, "refuses": 0}
MAX_DIFF_LINES = 1500
Progress = Callable[[str], None]


@dataclass
class Row:
    """One input: a trace or a save image."""

    id: str
    kind: str                                  # trace | image
    path: str
    origin: str                                # corpus | user
    label: str
    machine: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cell:
    """One check: row × build (× mode for traces)."""

    row: str
    build: str
    mode: str                                  # faithful | essential | restore
    status: str
    reason: str | None = None
    machine_support: str | None = None         # ok | deprecated | missing | None (unknown machine)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.row} | {self.build} | {self.mode}"


@dataclass
class Matrix:
    """The whole result (rows, builds, cells) and what was left out."""

    rows: list[Row]
    builds: list[qbuilds.QemuBuild]
    cells: list[Cell]
    created: str = ""
    skipped: list[dict[str, str]] = field(default_factory=list)
    regressions: list[dict[str, Any]] | None = None
    baseline: str | None = None

    def cell(self, row: str, build: str, mode: str) -> Cell | None:
        return next((c for c in self.cells if c.row == row and c.build == build and c.mode == mode), None)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "created": self.created, "virtsave": __version__,
                "builds": [b.to_dict(machines=False) for b in self.builds],
                "rows": [asdict(r) for r in self.rows], "cells": [{**asdict(c), "key": c.key} for c in self.cells],
                "notes": machine_notes(self), "skipped": self.skipped, "baseline": self.baseline,
                "regressions": self.regressions}


# -- inputs ------------------------------------------------------------------------------------
def corpus_paths() -> list[Path]:
    """The traces shipped with virtsave."""
    d = resources.files("virtsave.harness") / "corpus"
    return sorted(Path(str(p)) for p in d.iterdir() if p.name.endswith(".json"))


def _files(spec: str | os.PathLike[str], suffixes: tuple[str, ...] | None) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file() and (suffixes is None or f.name.endswith(suffixes)))
    if p.is_file():
        return [p]
    raise VirtsaveError(f"{p}: no such file or directory")


def _trace_row(path: Path, origin: str) -> Row:
    t = tr.load(path)
    argv = (t.get("domain") or {}).get("argv") or []
    rid = f"corpus/{path.stem}" if origin == "corpus" else str(path.resolve())
    host = t.get("host") or {}
    label = path.stem if origin == "corpus" else path.name
    return Row(rid, "trace", str(path), origin, label, restorecheck.machine_of_argv(argv) if argv else None,
               {"libvirt": host.get("libvirt"), "qemu": host.get("qemu"),
                "phases": [p.get("name") for p in t.get("phases", [])],
                "scenario": corpus["scenario"] if (corpus := t.get("corpus")) else None})


def _image_row(path: Path) -> Row:
    hdr = saveimage.read_header_path(path, allow_partial=False)
    machine = restorecheck.stream_machine(path, hdr)
    return Row(str(path.resolve()), "image", str(path), "user", path.name, machine,
               {"format": hdr.format, "domain": restorecheck.domain_name(hdr.xml), "size": path.stat().st_size,
                "was_running": hdr.was_running})


def collect_rows(traces: Iterable[str | os.PathLike[str]] = (), images: Iterable[str | os.PathLike[str]] = (),
                 *, corpus: bool = True) -> tuple[list[Row], list[dict[str, str]]]:
    """Rows for the corpus and the user's *traces* / *images* (files or directories).

    A named file that is no trace / complete save image raises; in a directory such files are
    skipped and listed (second value) with the reason.
    """
    rows: list[Row] = []
    skipped: list[dict[str, str]] = []
    if corpus:
        rows += [_trace_row(p, "corpus") for p in corpus_paths()]
    for kind, specs, suffixes in (("trace", traces, (".json",)), ("image", images, None)):
        for spec in specs:
            named = not Path(spec).is_dir()
            for f in _files(spec, suffixes):
                try:
                    rows.append(_trace_row(f, "user") if kind == "trace" else _image_row(f))
                except (TraceError, ImageError) as exc:
                    if named:
                        raise
                    skipped.append({"path": str(f), "kind": kind, "reason": str(exc).splitlines()[0]})
    seen: set[str] = set()
    unique = [r for r in rows if not (r.id in seen or seen.add(r.id))]  # type: ignore[func-returns-value]
    return unique, skipped


# -- trace cells ---------------------------------------------------------------------------------
def _replaced_fdsets(out: tr.Trace) -> set[str]:
    """Opaque names of the fdsets the launcher dropped (a libvirt fdset it had no file for)."""
    names = set()
    for rewrites in ((out.get("replay") or {}).get("argv_rewrites") or {}).values():
        for r in rewrites:
            if r.get("option") == "-add-fd" and not r.get("replacement"):
                for part in str(r.get("original", "")).split(","):
                    if part.startswith("opaque="):
                        names.add(part[len("opaque="):])
    return names


def _strip_fdsets(reply: Any, opaque: set[str]) -> Any:
    if not isinstance(reply, list):
        return reply
    kept = []
    for fs in reply:
        fds = [f for f in (fs.get("fds") or []) if f.get("opaque") not in opaque] if isinstance(fs, dict) else None
        if fds is None:
            kept.append(fs)
        elif fds:
            kept.append({**fs, "fds": fds})
    return kept


def _dropped_ids(ph: tr.Phase, *, ours: bool, essential: bool) -> set[Any]:
    """Ids of the commands (with their replies) left out of *ph* in essential mode: the trace's commands
    the replay skips by design, and the replay's closing ``quit``."""
    drop: set[Any] = set()
    if not essential:
        return drop
    seen_migrate = False
    for m in tr.iter_commands(ph):
        ex = m["execute"]
        skipped = not ours and (qreplay.is_probe(ex) or (ph.get("name") == "save" and seen_migrate))
        if skipped or (ours and ex == "quit"):
            drop.add(m.get("id"))
        seen_migrate = seen_migrate or ex == "migrate"
    return drop


def _comparable(trace: tr.Trace, *, ours: bool, essential: bool, opaque: set[str]) -> tr.Trace:
    """*trace* without what differs by construction (see the module docstring); the replay's
    substitutions still point at the commands they were made on."""
    t = copy.deepcopy(trace)
    for ph in t.get("phases", []):
        msgs = cast(list[dict[str, Any]], ph.get("messages", []))
        drop = _dropped_ids(ph, ours=ours, essential=essential)
        fdset_ids = {m.get("id") for m in msgs if m.get("kind") == "command" and m.get("execute") == "query-fdsets"}
        kept: list[dict[str, Any]] = []
        where: dict[int, int] = {}
        for i, m in enumerate(msgs):
            if m.get("kind") in ("command", "reply") and m.get("id") in drop:
                continue
            if essential and m.get("kind") == "event" and m.get("event") == "SHUTDOWN":
                continue  # quit (the replay's) and SIGTERM (libvirt's) say different reasons
            if m.get("kind") == "reply" and m.get("id") in fdset_ids and "return" in m:
                m = {**m, "return": _strip_fdsets(m["return"], opaque)}
            where[i] = len(kept)
            kept.append(m)
        ph["messages"] = cast(list[tr.Message], kept)
        for sub in ph.get("substitutions") or []:
            sent = sub.get("sent")
            if isinstance(sent, int):
                sub["sent"] = where.get(sent)
    return t


def _diff_text(d: tdiff.TraceDiff) -> str:
    lines = d.render().splitlines()
    if len(lines) > MAX_DIFF_LINES:
        lines = [*lines[:MAX_DIFF_LINES], f"… {len(lines) - MAX_DIFF_LINES} more lines (see virtsave diff)"]
    return "\n".join(lines)


def _trace_cell(row: Row, build: qbuilds.QemuBuild, mode: str, workdir: Path) -> Cell:
    cell = Cell(row.id, build.name, mode, "fails",
                machine_support=qbuilds.machine_support(build, row.machine) if row.machine else None)
    t0 = time.monotonic()
    image = workdir / "replay.save"
    try:
        trace = tr.load(row.path)
        wanted = tuple(p for p in tr.PHASE_NAMES if tr.find_phase(trace, p) is not None)
        out = qreplay.replay(trace, image=image, mode=mode, phases=wanted, qemu_binary=build.path, run_for=1.0,
                             input_name=row.path)
    except qreplay.ReplayFailed as exc:
        cell.reason = restorecheck.clean_reason(str(exc).splitlines()[0])
        cell.details["substitutions"] = [s for p in exc.trace.get("phases", []) for s in p.get("substitutions", [])]
    except VirtsaveError as exc:
        cell.reason = restorecheck.clean_reason(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
    else:
        opaque = _replaced_fdsets(out)
        d = tdiff.diff_traces(_comparable(trace, ours=False, essential=mode == "essential", opaque=opaque),
                              _comparable(out, ours=True, essential=mode == "essential", opaque=opaque),
                              a_label=row.label, b_label=f"{build.name} (QEMU {build.version})")
        cell.status = "equivalent" if d.equivalent else "differs"
        cell.details["summary"] = d.summary()
        if not d.equivalent:
            cell.reason = ", ".join(f"{k} {v}" for k, v in d.summary().items())
            cell.details["diff"] = _diff_text(d)
        cell.details["substitutions"] = [s for p in out.get("phases", []) for s in p.get("substitutions", [])]
        cell.details["timings"] = (out.get("replay") or {}).get("timings")
    finally:
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
    cell.seconds = round(time.monotonic() - t0, 3)
    return cell


# -- image cells -----------------------------------------------------------------------------------
def image_argv(path: str, uri: str | None = None) -> tuple[list[str], str]:
    """The command line for an image's restore check and where it came from."""
    hdr = saveimage.read_header_path(path, allow_partial=False)
    try:
        from virtsave.libvirtd import native

        return native.argv_from_xml(hdr.xml, uri), "libvirt domxml-to-native"
    except (ImportError, VirtsaveError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return restorecheck.argv_from_xml(hdr.xml), f"minimal, from the domain XML ({why})"


def _image_cell(row: Row, build: qbuilds.QemuBuild, argv: list[str], source: str) -> Cell:
    cell = Cell(row.id, build.name, "restore", "refuses",
                machine_support=qbuilds.machine_support(build, row.machine) if row.machine else None)
    try:
        r = restorecheck.check_image(row.path, argv, binary=build.path)
    except VirtsaveError as exc:
        cell.reason = str(exc).splitlines()[0]
        return cell
    cell.status, cell.reason, cell.seconds = r.status, r.reason, r.seconds
    cell.details = {"argv_source": source, "qemu_status": r.qemu_status, "argv": r.argv,
                    "rewrites": r.rewrites, "warnings": r.warnings}
    return cell


# -- the matrix -------------------------------------------------------------------------------------
def _row_cells(row: Row, usable: list[qbuilds.QemuBuild], modes: tuple[str, ...], workdir: Path,
               uri: str | None) -> Iterable[Cell]:
    if row.kind == "image":
        argv, source = image_argv(row.path, uri)
        for b in usable:
            yield _image_cell(row, b, argv, source)
        return
    for b in usable:
        for mode in modes:
            yield _trace_cell(row, b, mode, workdir)


def run(rows: list[Row], builds: list[qbuilds.QemuBuild], *, modes: Iterable[str] = MODES,
        uri: str | None = None, progress: Progress | None = None) -> Matrix:
    """Every row against every build that could be probed (see the module docstring)."""
    wanted = tuple(modes)
    for mode in wanted:
        if mode not in MODES:
            raise VirtsaveError(f"unknown mode {mode!r} ({', '.join(MODES)})")
    usable = [b for b in builds if not b.error]
    result = Matrix(rows, builds, [], created=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    base = paths.STATE_DIR / "matrix"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    try:
        for row in rows:
            for cell in _row_cells(row, usable, wanted, workdir, uri):
                result.cells.append(cell)
                if progress is not None:
                    progress(f"{row.label} × {cell.build} {cell.mode}: {cell.status}"
                             + (f" ({cell.reason})" if cell.reason and cell.status != "differs" else ""))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def machine_notes(m: Matrix) -> list[str]:
    """Where a build lacks or deprecates a row's machine type, one line each."""
    notes = []
    for row in m.rows:
        if not row.machine:
            continue
        for b in m.builds:
            if b.error:
                continue
            s = qbuilds.machine_support(b, row.machine)
            if s != "ok":
                verb = "lacks" if s == "missing" else "deprecates"
                notes.append(f"{b.name} (QEMU {b.version}) {verb} machine type {row.machine} of {row.label}")
    return notes


# -- baseline ---------------------------------------------------------------------------------------
def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A matrix JSON written before (``--json``); :class:`VirtsaveError` if it is not one."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(64 * 1024 * 1024))
    except OSError as exc:
        raise VirtsaveError(f"cannot read baseline {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise VirtsaveError(f"baseline {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("cells"), list):
        raise VirtsaveError(f"baseline {path} is not a virtsave matrix (format {FORMAT!r})")
    return data


def regressions(current: Matrix, baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """Cells that rank lower than the same cell (row, build, mode) in *baseline*."""
    before = {}
    for c in baseline["cells"]:
        if isinstance(c, dict) and c.get("status") in RANK:
            before[f"{c.get('row')} | {c.get('build')} | {c.get('mode')}"] = c
    worse = []
    for c in current.cells:
        old = before.get(c.key)
        if old is not None and RANK[c.status] < RANK[old["status"]]:
            worse.append({"key": c.key, "row": c.row, "build": c.build, "mode": c.mode,
                          "was": old["status"], "now": c.status, "reason": c.reason})
    return worse
