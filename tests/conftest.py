"""Shared test fixtures.

Unit tests (tests/unit) use recorded real libvirtd logs in tests/fixtures/.
Integration tests (tests/integration) use the real libvirtd on this machine and real
QEMU guests built by scripts/setup. Test domains are named ``vs-test-<pid>-<hex>``;
tests only ever touch domains they created, and remove them also on failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
VIRTSAVE = [sys.executable, "-m", "virtsave.cli"]
URI = os.environ.get("VIRTSAVE_TEST_URI", "qemu:///system")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def run_cli(*args: str, input: str | None = None, timeout: float = 600,
            env: dict[str, str] | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real ``virtsave`` CLI in a subprocess; returns the completed process."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([*VIRTSAVE, *args], input=input, capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"virtsave {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli


@pytest.fixture(scope="session")
def conn():  # type: ignore[no-untyped-def]
    """A connection to the real libvirtd (integration tests only)."""
    import libvirt

    try:
        c = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        pytest.fail(f"libvirtd not reachable at {URI} ({exc}); run scripts/setup or scripts/daemons start")
    yield c
    c.close()


@pytest.fixture
def make_guest(conn) -> Iterator[Callable[..., str]]:  # type: ignore[no-untyped-def]
    """Factory: ``name = make_guest(memory_mib=256, fill_mib=32)`` boots a test guest and
    waits for its first tick. Every guest made is removed at teardown, pass or fail."""
    from virtsave.harness import guest

    made: list[str] = []

    def make(memory_mib: int = 256, fill_mib: int = 32, start: bool = True, wait: bool = True,
             prefix: str = "vs-test") -> str:
        name = guest.unique_name(prefix)
        made.append(name)
        guest.create(conn, name, memory_mib=memory_mib, fill_mib=fill_mib, start=start)
        if start and wait:
            guest.wait_tick(name, 1, timeout=120)
        return name

    yield make
    for name in made:
        guest.remove(conn, name)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory libvirt (root) and QEMU can both use; removed afterwards."""
    d = Path("/var/tmp") / f"vs-test-{os.getpid()}-{tmp_path.name}"
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _qemu_version() -> tuple[int, int, int]:
    from virtsave.qemu import launch as qemu_launch

    try:
        return qemu_launch.binary_version("qemu-system-x86_64")
    except Exception:  # no QEMU at all: integration tests fail loudly elsewhere
        return (0, 0, 0)


QEMU_VERSION = _qemu_version()
#: Sparse images are QEMU's mapped-ram (QEMU >= 9.0); the debian12 stack's QEMU 7.2 has none.
needs_mapped_ram = pytest.mark.skipif(
    QEMU_VERSION < (9, 0, 0),
    reason=f"needs QEMU >= 9.0 for mapped-ram (sparse images); this QEMU is {'.'.join(map(str, QEMU_VERSION))}")
