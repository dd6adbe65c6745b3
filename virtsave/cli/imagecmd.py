"""Image and diff commands: look inside a save image, compare two traces or two images.

Example::

    virtsave inspect /var/lib/libvirt/qemu/save/vm1.save          # header, XML, sections, RAM
    virtsave inspect vm1.img --json | jq .stream.ram
    virtsave diff before.json after.json                          # traces: exit 1 when they differ
    virtsave diff --strict a.json b.json                          # only ids and time normalized
    virtsave diff a.save b.save                                   # images (detected by magic)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from virtsave.core.errors import VirtsaveError
from virtsave.image import diff as imagediff
from virtsave.image import saveimage
from virtsave.trace import diff as diffmod
from virtsave.trace import model as trace

from .common import OPTIONS, emit_json, info

JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable result on stdout")]


class InputKindError(VirtsaveError):
    """A diff input is neither a trace nor a save image, or the two kinds are mixed."""


def _kind(path: Path) -> str:
    """``image`` (libvirt magic) or ``trace`` (JSON); anything else is an error."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise InputKindError(f"cannot read {path}: {exc.strerror}") from None
    if head.startswith(b"LibvirtQemud"):
        return "image"
    if head.lstrip()[:1] == b"{":
        return "trace"
    raise InputKindError(f"{path}: neither a virtsave trace (JSON) nor a libvirt save image "
                         f"(first bytes {head[:16]!r})")


def _human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _render_inspect(r: dict[str, Any], seconds: float) -> None:
    # Full width when piped: a pipe is read by programs and people's pagers, not wrapped at 80.
    con = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    h, s = r["header"], r["stream"]
    dom = r["domain"]
    con.print(f"[bold]{r['path']}[/bold]  {_human_size(r['size'])} ({r['size']} bytes)  "
              f"domain {dom.get('name')} {dom.get('uuid') or ''}")
    state = "partial: the save did not complete" if h["partial"] else "complete"
    con.print(f"header: magic {h['magic']} ({state}), version {h['version']}, data_len {h['data_len']}, "
              f"was_running {int(h['was_running'])}, format {h['format']} ({h['compressed']}), "
              f"cookie offset {h['cookie_offset']}, stream at {h['stream_offset']}")
    con.print(f"domain XML: {len(r['xml'])} chars; cookie: {len(r['cookie'] or '')} chars")
    cfg = s.get("configuration") or {}
    comp = f", {s['compression']}-compressed" if s["compression"] else ""
    con.print(f"stream: {s['magic']} v{s['version']}{comp}, {s['length']} bytes, machine {cfg.get('machine')}, "
              f"capabilities {cfg.get('capabilities') or []}"
              + (f", device sections delimited by {s['layout']}" if s["layout"] else ""))
    if not s["complete"]:
        con.print(f"[bold red]stream incomplete[/bold red]: {s['stopped']}")
    vd = s["vmdesc"]
    if vd.get("present"):
        con.print(f"vmstate description: present ({vd.get('length')} bytes, {vd.get('devices')} devices, "
                  f"matches the sections: {vd.get('matches_sections')})")
    else:
        con.print("vmstate description: absent")
    for c in s["commands"]:
        con.print(f"command: {c['name']} at {c['offset']} ({c['length']} bytes of data)")
    ram = s["ram"]
    con.print(f"RAM: {_human_size(ram['total_bytes'])} in {len(ram['blocks'])} blocks, page size {ram['page_size']}, "
              f"{ram['pages']} pages stored ({_human_size(ram['bytes'])}), {ram['zero_pages']} zero pages"
              + (", mapped-ram (sparse) layout" if ram["mapped_ram"] else ""))
    t = Table(title=None, show_edge=False, pad_edge=False)
    for col in ("block", "length", "pages", "zero pages", "bytes"):
        t.add_column(col, justify="left" if col == "block" else "right")
    if ram["mapped_ram"]:
        t.add_column("bitmap at", justify="right")
        t.add_column("pages at", justify="right")
    for b in ram["blocks"]:
        row = [b["name"], str(b["length"]), str(b["pages"]), str(b["zero_pages"]), str(b["bytes"])]
        if ram["mapped_ram"]:
            row += [hex(b.get("bitmap_offset") or 0), hex(b.get("pages_offset") or 0)]
        t.add_row(*row)
    con.print(t)
    t = Table(show_edge=False, pad_edge=False)
    for col in ("id", "section", "instance", "version", "kinds", "bytes", "offset"):
        t.add_column(col, justify="left" if col in ("section", "kinds") else "right")
    for sec in s["sections"]:
        kinds = " ".join(f"{k}×{v}" if v > 1 else k for k, v in sec["count"].items() if v)
        t.add_row(str(sec["id"]), sec["name"], str(sec["instance_id"]), str(sec["version_id"]), kinds,
                  str(sec["bytes"]), str(sec["offset"]))
    con.print(t)
    info(f"inspected in {seconds:.2f} s")


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        image: Annotated[Path, typer.Argument(metavar="IMAGE", help="libvirt save image (raw, compressed or sparse)")],
        json_out: JsonOpt = False,
        allow_partial: Annotated[bool, typer.Option("--allow-partial",
                                 help="read a LibvirtQemudPart image as far as it goes")] = False,
    ) -> None:
        """Show a save image: libvirt header, XML, cookie, QEMU stream sections, RAM totals."""
        t0 = time.monotonic()
        r = saveimage.inspect_image(image, allow_partial=allow_partial)
        if json_out or OPTIONS.json:
            emit_json(r)
        else:
            _render_inspect(r, time.monotonic() - t0)

    @app.command("diff")
    def diff_cmd(
        a: Annotated[Path, typer.Argument(metavar="A", help="trace (JSON) or save image")],
        b: Annotated[Path, typer.Argument(metavar="B", help="trace (JSON) or save image, same kind as A")],
        json_out: JsonOpt = False,
        strict: Annotated[bool, typer.Option("--strict", help="normalize only ids and time")] = False,
    ) -> None:
        """Compare two traces or two save images. Exit 0 equivalent, 1 different, 2 error."""
        ka, kb = _kind(a), _kind(b)
        if ka != kb:
            raise InputKindError(f"cannot compare a {ka} ({a}) with a {kb} ({b})")
        result: diffmod.TraceDiff | imagediff.ImageDiff
        if ka == "trace":
            result = diffmod.diff_traces(trace.load(a), trace.load(b), strict=strict,
                                         a_label=str(a), b_label=str(b))
        else:
            result = imagediff.diff_images(a, b)
        if json_out or OPTIONS.json:
            emit_json(result.to_json())
        else:
            sys.stdout.write(result.render(color=sys.stdout.isatty()))
            sys.stdout.flush()
        if not result.equivalent:
            raise typer.Exit(1)
