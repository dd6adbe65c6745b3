"""Shared CLI plumbing: global options, error-to-exit-code mapping, output.

Each area of the CLI lives in its own module (``cli/ref.py``, ``cli/tracecmd.py`` …)
with a ``register(app)`` function; this module holds what they share. The CLI is
thin: it parses, calls a library function, renders.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from virtsave.core.errors import VirtsaveError

__all__ = ["DEFAULT_URI", "OPTIONS", "SeveralHosts", "VirtsaveGroup", "default_uri", "emit_json", "err_console",
           "fail", "handle_errors", "info"]

DEFAULT_URI = "qemu:///system"

err_console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


class SeveralHosts(VirtsaveError):
    """A one-host command was given several hosts (exit 2, one line)."""


@dataclass
class Options:
    """Global options (``virtsave -c URI [-c URI…] [--hosts FILE] --json …``).

    ``uris``: every host given; ``fan_out``: several hosts, or ``--hosts`` (then ``list``,
    ``managed-save --all`` and ``start --all`` run on each with a host column). :attr:`uri` is the one
    host of every other command: asking for it when several were given is the one-line error.
    """

    uris: list[str] = field(default_factory=lambda: [DEFAULT_URI])
    json: bool = False
    fan_out: bool = False

    @property
    def uri(self) -> str:
        """The single host (``-c``, else ``$LIBVIRT_DEFAULT_URI``, else ``qemu:///system``)."""
        if len(self.uris) != 1 or self.fan_out:
            raise SeveralHosts(f"this command works on one host, and {len(self.uris)} were given with "
                               "-c/--hosts (list, managed-save --all and start --all run on several)")
        return self.uris[0]

    @uri.setter
    def uri(self, value: str) -> None:
        self.uris, self.fan_out = [value], False

    @property
    def progress(self) -> bool:
        """Live progress only on a terminal and never in JSON mode."""
        return not self.json and sys.stderr.isatty()


def default_uri() -> str:
    """``$LIBVIRT_DEFAULT_URI``, else ``qemu:///system`` (read at each run: tests move it)."""
    return os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


OPTIONS = Options(uris=[default_uri()])


def info(message: str) -> None:
    """A progress/status line on stderr (never on stdout: stdout is for data)."""
    err_console.print(message, markup=False, soft_wrap=True)  # one line, whatever the width


def emit_json(data: Any) -> None:
    """Write a machine-readable result on stdout."""
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit with *code*."""
    sys.stderr.write(f"virtsave: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Map every expected failure to one stderr line and exit code 2 (no traceback)."""
    try:
        yield
    except VirtsaveError as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the final flush
        raise SystemExit(2) from None
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        fail(f"{exc.strerror or exc}{':' if where else ''}{where}")


# typer vendors click since 0.26 (before, it used the click package): its usage-error class is reached
# through the public BadParameter, which derives from it in both.
_USAGE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _usage_error_line(exc: Exception, where: str) -> str:
    """``<message> (see 'virtsave COMMAND --help')`` from a click usage error.

    *where* is the command being parsed when the error does not carry its own context."""
    message = str(getattr(exc, "format_message", exc.__str__)()).strip().rstrip(".")
    if message[:1].isupper() and message[1:2].islower():  # "No such option" → "no such option"
        message = message[0].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    return f"{message} (see '{ctx.command_path if ctx is not None else where} --help')"


@contextlib.contextmanager
def _one_line_errors(where: Callable[[], str]) -> Iterator[None]:
    with handle_errors():
        try:
            yield
        except _USAGE_ERROR as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare ``virtsave``: show the help
                raise
            fail(_usage_error_line(exc, where()), 2)


class VirtsaveGroup(TyperGroup):
    """A ``virtsave`` command group: every failure, a usage error included, is one stderr line
    ``virtsave: error: …`` with its exit code (2), in-process (``CliRunner``) as from the console script.

    Sub-apps (``virtsave direct``) use it too, so that an error names the exact command."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        def where() -> str:
            return " ".join(x for x in (parent.command_path if parent else "", info_name or "virtsave") if x)
        with _one_line_errors(where):
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        def where() -> str:  # a subcommand's own parse error (e.g. an option without its value)
            return " ".join(x for x in (ctx.command_path, ctx.invoked_subcommand) if x)
        with _one_line_errors(where):
            return super().invoke(ctx)
