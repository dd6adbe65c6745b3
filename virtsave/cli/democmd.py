"""``virtsave demo``: trace → replay → diff on a throwaway built-in guest, reported as a result.

Stdout: the trace diff, then the result — timing table, one line per path on whether the guest
kept its memory, where the kept artefacts are (``--keep``), and last the verdict line. With
``--json`` the result is one object. Exit 0 equivalent, 1 differs, 2 error.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from .common import OPTIONS, emit_json, info

if TYPE_CHECKING:
    from virtsave.harness.demo import DemoResult, PathTicks

__all__ = ["register"]


def _seconds(x: float | None) -> str:
    return f"{x:.2f}" if x else "-"


def _timing_table(result: DemoResult) -> Table:
    table = Table(title=f"save/restore of {result.domain}")
    table.add_column("step")
    for col in ("libvirt (s)", "direct QMP (s)", "direct ÷ libvirt"):
        table.add_column(col, justify="right")
    for step, t in result.timings.items():
        lv, dr = t.get("libvirt"), t.get("direct")
        table.add_row(step, _seconds(lv), _seconds(dr), f"{dr / lv:.2f}" if lv and dr else "-")
    return table


def _memory_line(path: str, t: PathTicks) -> str:
    before, after = t.before_save, t.after_restore
    head = f"{path + ' path:':14}"
    if t.survived:
        return f"{head}guest memory kept — its tick counter went on from {before} to {after}, no restart"
    if t.restarted:
        return (f"{head}guest memory LOST — its tick counter started again "
                f"(last before the save {before}, first after the restore {after})")
    missing = "before the save" if before is None else "after the restore"
    return f"{head}guest memory unknown — the guest printed no tick {missing}"


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        memory: Annotated[int, typer.Option(help="guest RAM in MiB")] = 256,
        fill: Annotated[int, typer.Option(help="MiB of guest RAM filled with data")] = 64,
        keep: Annotated[bool, typer.Option("--keep", help="keep the traces, the diff, the direct image and "
                                           "both serial logs (the directory is printed)")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="the result as one JSON object on stdout")] = False,
    ) -> None:
        """Boot a throwaway guest, trace libvirt's managed-save cycle, replay it directly, diff, clean up.

        Ends with a verdict: exit 0 equivalent; 1 differs (the traces differ after normalization, or a
        guest did not keep its memory across save and restore); 2 error.
        """
        from virtsave.harness import demo

        result = demo.run(OPTIONS.uri, memory_mib=memory, fill_mib=fill, log=info, color=sys.stdout.isatty(),
                          keep=keep)
        if json_out or OPTIONS.json:
            emit_json(result.to_dict())
        else:
            out = Console(highlight=False)
            print(result.diff_text.rstrip(), end="\n\n", flush=True)
            out.print(_timing_table(result))
            for path in demo.PATHS:
                out.print(_memory_line(path, result.paths[path]), markup=False, soft_wrap=True)
            if result.kept_dir:
                out.print(f"kept in {result.kept_dir}: {', '.join(result.kept)}", markup=False, soft_wrap=True)
            out.print(result.verdict_line(), markup=False, soft_wrap=True)
        if not keep:
            info("guest, images and traces removed (--keep keeps them)")
        if result.verdict != "equivalent":
            raise typer.Exit(1)
