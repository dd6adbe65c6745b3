"""The ``virtsave`` CLI run in-process (typer's ``CliRunner``), with the result ``subprocess.run`` gives.

Used as the ``cli`` fixture of tests/unit (tests/unit/conftest.py) and of integration tests whose
commands need no separate process; ``run_cli`` in tests/conftest.py runs the real console script.
``tests/`` is on ``sys.path`` (pytest puts the directory of tests/conftest.py there).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from typer.testing import CliRunner


@dataclass
class CliResult:
    """What the ``cli`` fixture returns: the fields of ``subprocess.CompletedProcess`` tests use."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def run_cli_inprocess(*args: str, input: str | None = None, env: dict[str, str] | None = None,
                      check: bool = False, timeout: float | None = None) -> CliResult:
    """Run ``virtsave ARGS`` in this process (same options as tests/conftest.py's ``run_cli``).

    An exception escaping the CLI is a bug (every failure must be one ``virtsave: error:`` line):
    it is re-raised with its traceback instead of being turned into an exit code."""
    from virtsave.cli import app

    del timeout  # in-process: a hang shows as pytest-timeout's failure
    result = CliRunner().invoke(app, list(args), input=input, env={"COLUMNS": "200", **(env or {})},
                                prog_name="virtsave", catch_exceptions=False)
    res = CliResult(list(args), result.exit_code, result.stdout, result.stderr)
    if check and res.returncode != 0:
        raise AssertionError(f"virtsave {shlex.join(args)} exited {res.returncode}:\n{res.stderr}")
    return res
