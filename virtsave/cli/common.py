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
from dataclasses import dataclass
from typing import Any, TypeVar

from rich.console import Console

from virtsave.core.errors import VirtsaveError

DEFAULT_URI = "qemu:///system"

err_console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Options:
    """Global options (``virtsave -c URI --json …``)."""

    uri: str = DEFAULT_URI
    json: bool = False

    @property
    def progress(self) -> bool:
        """Live progress only on a terminal and never in JSON mode."""
        return not self.json and sys.stderr.isatty()


OPTIONS = Options(uri=os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI)


def info(message: str) -> None:
    """A progress/status line on stderr (never on stdout: stdout is for data)."""
    err_console.print(message, markup=False)


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
