"""The ``virtsave`` command. Each area registers its commands from its own module.

Commands that talk to libvirtd first put back libvirtd's log settings if a killed ``virtsave
trace`` left them switched on (:data:`DAEMON_COMMANDS`); the offline ones (``diff``, ``inspect``,
``validate``, ``export``, ``replay`` …) never touch the daemon.

Example::

    >>> from typer.testing import CliRunner
    >>> CliRunner().invoke(app, ["--version"]).output.strip() == __version__
    True
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from virtsave import __version__

from .common import OPTIONS, VirtsaveGroup, default_uri, handle_errors, info

__all__ = ["DAEMON_COMMANDS", "app", "main"]

app = typer.Typer(
    name="virtsave",
    cls=VirtsaveGroup,
    help="libvirt/QEMU save & restore: reference path, QMP trace, direct replay, diff.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Areas of the CLI; each module has register(app).
AREAS = ("ref", "tracecmd", "imagecmd", "replaycmd", "democmd", "matrixcmd")

#: The commands that connect to libvirtd (and so first repair log settings a killed trace left).
DAEMON_COMMANDS = frozenset({"managed-save", "save", "restore", "start", "managed-save-remove", "list",
                             "trace", "demo"})


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


def _hosts_file(path: Path) -> list[str]:
    from virtsave.libvirtd.fleet import read_hosts_file

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                                 param_hint="--hosts") from None
    uris = read_hosts_file(text)
    if not uris:
        raise typer.BadParameter(f"{path} names no host (one libvirt URI a line)", param_hint="--hosts")
    return uris


@app.callback()
def _global(
    connect: Annotated[list[str] | None, typer.Option("-c", "--connect", metavar="URI", help="libvirt URI "
                       "(default: $LIBVIRT_DEFAULT_URI, else qemu:///system); repeat it for several hosts: "
                       "list, managed-save --all and start --all then run on each")] = None,
    hosts: Annotated[Path | None, typer.Option("--hosts", metavar="FILE", help="more hosts: one libvirt URI "
                     "a line (# comments)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable result on stdout")] = False,
    version: Annotated[bool, typer.Option("--version", help="print the version and exit",
                       is_eager=True, callback=_print_version)] = False,
) -> None:
    uris = [*(connect or []), *(_hosts_file(hosts) if hosts is not None else [])]
    OPTIONS.uris = list(dict.fromkeys(uris)) or [default_uri()]
    OPTIONS.fan_out = len(OPTIONS.uris) > 1 or hosts is not None
    OPTIONS.json = json_out


def _repair_log_settings() -> None:
    """A ``virtsave trace`` killed with SIGKILL leaves libvirtd logging into our capture file;
    every command that talks to libvirtd puts the operator's settings back first (one ``stat``
    when nothing is stale)."""
    from virtsave.core.errors import VirtsaveError
    from virtsave.libvirtd.logcapture import repair_if_stale
    from virtsave.libvirtd.transport import HostUnreachable

    if OPTIONS.fan_out:
        return  # each host is repaired by the fan-out itself (an unreachable host is one failed row)
    try:
        msg = repair_if_stale(OPTIONS.uri)
    except HostUnreachable:
        return  # libvirt's own login fails the same way: the command says so in its one line
    except VirtsaveError as exc:
        info(f"warning: could not check libvirtd's log settings: {exc}")
        return
    if msg:
        info(f"warning: {msg}")


def _after_repair(command: Callable[..., Any]) -> Callable[..., Any]:
    """*command*, running the log-settings repair first (after parsing: ``--help`` never runs it)."""
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        _repair_log_settings()
        return command(*args, **kwargs)
    return run


def _register_areas() -> None:
    for area in AREAS:
        importlib.import_module(f"{__name__}.{area}").register(app)
    found = set()
    for cmd in app.registered_commands:
        name = cmd.name or (cmd.callback.__name__.replace("_", "-") if cmd.callback else "")
        if name in DAEMON_COMMANDS and cmd.callback is not None:
            cmd.callback = _after_repair(cmd.callback)
            found.add(name)
    if found != DAEMON_COMMANDS:
        raise RuntimeError(f"DAEMON_COMMANDS names unknown commands: {sorted(DAEMON_COMMANDS - found)}")


_register_areas()


def main() -> None:
    """Console-script entry point."""
    with handle_errors():
        app(prog_name="virtsave")


if __name__ == "__main__":
    main()
