"""docs/cli.md is the typer app's own description, regenerated — never a hand-kept copy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cli_reference_is_current(tmp_path: Path):
    fresh = tmp_path / "cli.md"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gen-cli-docs"), str(fresh)], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "## `virtsave demo`" in fresh.read_text(), "the generator no longer sees the commands"
    assert (REPO / "docs" / "cli.md").read_text() == fresh.read_text(), (
        "docs/cli.md is stale: run scripts/gen-cli-docs and commit docs/cli.md")
