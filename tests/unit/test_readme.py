"""The README's library examples and module table name modules that exist (they once named a flat layout
long gone: ``from virtsave import libvirt_path`` failed)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_python_imports_work():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    imports = [ln for b in blocks for ln in b.splitlines()
               if re.match(r"(from virtsave\S* import |import virtsave)", ln)]
    assert len(imports) >= 5, imports
    for line in imports:
        exec(line, {})      # the import statement as written, nothing else


def test_readme_module_table_names_real_modules():
    table = README.split("| module (under `virtsave/`) | concept |", 1)[1].split("\n\n", 1)[0]
    names = [n for cell in re.findall(r"^\| (.*?) \|", table, re.M) for n in re.findall(r"`([^`]+)`", cell)]
    dotted = [n for n in names if "/" not in n]
    assert len(dotted) >= 20, dotted
    for n in dotted:
        importlib.import_module(f"virtsave.{n}")
    for path in (n for n in names if "/" in n):
        assert (Path(__file__).resolve().parents[2] / "virtsave" / path).exists(), path
