"""virtsave works outside the repository: build the wheel, install it (not editable) into a fresh venv,
run the offline commands from there on fixture data.

The venv borrows the third-party dependencies of the interpreter running the tests (a ``.pth`` line
naming its site-packages, as ``--system-site-packages`` would for a system install; libvirt-python
would otherwise be compiled from source). That directory's own ``.pth`` hooks, such as an editable
install of this checkout, are not run from there, so ``import virtsave`` can only find the wheel's
copy — the test checks it does. Building uses pip's isolated build (setuptools from PyPI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.unit.test_saveimage import make_image
from virtsave import __version__
from virtsave.trace import export
from virtsave.trace import model as tr

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures"
#: Data files the package reads through importlib.resources.
DATA_FILES = {"virtsave/trace/normalize.json", "virtsave/harness/guest.xml"}


def _run(*args: str | Path, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env={**env, "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (the build leaves build/ and *.egg-info behind)."""
    d = tmp_path_factory.mktemp("wheel")
    src = d / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "virtsave", src / "virtsave", ignore=shutil.ignore_patterns("__pycache__"))
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", d / "dist", src, cwd=d)
    (whl,) = (d / "dist").glob("virtsave-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; returns its bin directory."""
    d = tmp_path_factory.mktemp("venv")
    _run(sys.executable, "-m", "venv", "--without-pip", d / "venv", cwd=d)
    py = d / "venv" / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", py, "install", "--quiet", "--no-deps", "--no-index", wheel, cwd=d)
    site = Path(_run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=d).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "virtsave-test-deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return d / "venv" / "bin"


def test_wheel_holds_the_data_files_and_the_version(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert names >= DATA_FILES, DATA_FILES - names
    assert any(n.startswith("virtsave/trace/schema/trace-v") and n.endswith(".json") for n in names), names
    assert wheel.name == f"virtsave-{__version__}-py3-none-any.whl"
    meta = zipfile.ZipFile(wheel).read(f"virtsave-{__version__}.dist-info/METADATA").decode()
    assert f"\nVersion: {__version__}\n" in meta
    entry = zipfile.ZipFile(wheel).read(f"virtsave-{__version__}.dist-info/entry_points.txt").decode()
    assert "virtsave = virtsave.cli:main" in entry


def test_installed_package_is_the_wheel(venv: Path, tmp_path: Path) -> None:
    out = _run(venv / "python", "-c", "import virtsave, importlib.metadata as m; "
               "print(virtsave.__file__); print(m.version('virtsave'))", cwd=tmp_path).stdout.split()
    assert out[0].startswith(str(venv.parent)), f"virtsave imported from {out[0]}, not from the venv"
    assert out[1] == __version__
    assert _run(venv / "virtsave", "--version", cwd=tmp_path).stdout.strip() == __version__


def test_offline_commands_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    vs = venv / "virtsave"
    # trace --from-log (log parser + schema) on recorded logs, then validate
    t11, t9 = tmp_path / "t11.json", tmp_path / "t9.json"
    _run(vs, "trace", "fxa", "--from-log", FIX / "libvirt-11.3-attributed" / "managedsave-running.log", "-o", t11,
         cwd=tmp_path)
    _run(vs, "trace", "fxa", "--from-log", FIX / "libvirt-9.0-attributed" / "managedsave-running.log", "-o", t9,
         cwd=tmp_path)
    res = _run(vs, "validate", t11, cwd=tmp_path)
    assert "valid" in res.stderr and "10 commands" in res.stderr, res.stderr
    assert [p["name"] for p in tr.load(t11)["phases"]] == ["save"]
    # diff (the normalization table is a data file): itself equivalent, 9.0 vs 11.3 different
    assert _run(vs, "diff", t11, t11, cwd=tmp_path).returncode == 0
    res = _run(vs, "--json", "diff", t11, t9, cwd=tmp_path, check=False)
    assert res.returncode == 1, res.stderr
    report = json.loads(res.stdout)
    assert report["equivalent"] is False and report["differences"]
    assert any("migrate-set-capabilities" in json.dumps(d) for d in report["differences"])
    # export: the same text the library in this checkout gives
    res = _run(vs, "export", t11, "--format", "replies", cwd=tmp_path)
    assert res.stdout == export.to_replies(tr.load(t11)) and '"execute": "query-migrate"' in res.stdout
    # inspect and diff of a save image (header codec + stream reader)
    img = tmp_path / "s.img"
    make_image(img)
    res = _run(vs, "--json", "inspect", img, cwd=tmp_path)
    facts = json.loads(res.stdout)
    assert facts["header"]["magic"] == "LibvirtQemudSave" and facts["stream"]["ram"]["pages"] == 4
    assert facts["domain"]["name"] == "synth"
    assert _run(vs, "diff", img, img, cwd=tmp_path).returncode == 0
    # a bad input is still one line from the installed command
    res = _run(vs, "inspect", tmp_path / "missing.img", cwd=tmp_path, check=False)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and res.stderr.startswith("virtsave: error:")
