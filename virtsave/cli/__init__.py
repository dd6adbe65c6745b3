"""The ``virtsave`` command. Each area registers its commands from its own module."""

from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer

from virtsave import __version__

from .common import OPTIONS, handle_errors, info

app = typer.Typer(
    name="virtsave",
    help="libvirt/QEMU save & restore: reference path, QMP trace, direct replay, diff.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Areas of the CLI; each module has register(app). Missing ones are skipped so that
# the package stays usable while an area is being built.
AREAS = ("ref", "tracecmd", "imagecmd", "replaycmd", "democmd", "matrixcmd")


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _global(
    connect: Annotated[str | None, typer.Option("-c", "--connect", help="libvirt URI "
                       "(default: $LIBVIRT_DEFAULT_URI, else qemu:///system)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable result on stdout")] = False,
    version: Annotated[bool, typer.Option("--version", help="print the version and exit",
                       is_eager=True, callback=_print_version)] = False,
) -> None:
    if connect:
        OPTIONS.uri = connect
    OPTIONS.json = json_out
    _repair_log_settings()


def _repair_log_settings() -> None:
    """A ``virtsave trace`` killed with SIGKILL leaves libvirtd logging into our capture file;
    every command puts the operator's settings back (one ``stat`` when nothing is stale)."""
    from virtsave.core.errors import VirtsaveError
    from virtsave.libvirtd.logcapture import repair_if_stale

    try:
        msg = repair_if_stale(OPTIONS.uri)
    except VirtsaveError as exc:
        info(f"warning: could not check libvirtd's log settings: {exc}")
        return
    if msg:
        info(f"warning: {msg}")


for _area in AREAS:
    try:
        _mod = importlib.import_module(f"{__name__}.{_area}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__name__}.{_area}":
            raise
        continue
    _mod.register(app)


def main() -> None:
    """Console-script entry point."""
    with handle_errors():
        try:
            app(prog_name="virtsave")
        except SystemExit as exc:
            if exc.code == 130:  # typer turns Ctrl-C into a silent exit 130: say it, once
                sys.stderr.write("virtsave: interrupted\n")
            raise


if __name__ == "__main__":
    sys.exit(main())
