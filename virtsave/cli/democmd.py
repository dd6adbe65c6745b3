"""``virtsave demo``: trace → replay → diff on a throwaway built-in guest."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Table

from .common import OPTIONS, emit_json, err_console, info


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        memory: Annotated[int, typer.Option(help="guest RAM in MiB")] = 256,
        fill: Annotated[int, typer.Option(help="MiB of guest RAM filled with data")] = 64,
    ) -> None:
        """Boot a throwaway guest, trace libvirt's managed-save cycle, replay it directly, diff, clean up.

        Exit 0 when the replay is equivalent to libvirt's trace, 1 when differences remain.
        """
        from virtsave.harness import demo

        result = demo.run(OPTIONS.uri, memory_mib=memory, fill_mib=fill, log=info, color=sys.stdout.isatty())
        if OPTIONS.json:
            emit_json(result.to_dict())
            if not result.equivalent:
                raise typer.Exit(1)
            return
        table = Table(title=f"save/restore of {result.domain}")
        table.add_column("step")
        table.add_column("libvirt (s)", justify="right")
        table.add_column("direct QMP (s)", justify="right")
        table.add_column("direct ÷ libvirt", justify="right")
        for step, t in result.timings.items():
            lv, dr = t.get("libvirt"), t.get("direct")
            ratio = f"{dr / lv:.2f}" if lv and dr else "-"
            table.add_row(step, f"{lv:.2f}" if lv else "-", f"{dr:.2f}" if dr else "-", ratio)
        print(result.diff_text.rstrip() or "(traces equivalent after normalization)")
        err_console.print(table)
        info(f"ticks: {result.ticks}; traces {'equivalent' if result.equivalent else 'differ (see above)'}; "
             "guest, images and traces removed")
        if not result.equivalent:
            raise typer.Exit(1)
