"""Shared test fixtures.

Unit tests (tests/unit) use recorded real libvirtd logs in tests/fixtures/.
Integration tests (tests/integration) use the real libvirtd on this machine and real
QEMU guests built by scripts/setup. Test domains are named ``vs-test-<pid>-<hex>``;
tests only ever touch domains they created, and remove them also on failure.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# A run started in the background by a non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored,
# and so would every virtsave the tests start: the Ctrl-C tests would then test nothing. Children get
# SIGINT's default back (Python then raises KeyboardInterrupt in them, as at a terminal).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
VIRTSAVE = [sys.executable, "-m", "virtsave.cli"]
URI = os.environ.get("VIRTSAVE_TEST_URI", "qemu:///system")


def kill_qemus(pids: list[int]) -> None:
    """End the QEMUs this process's launcher started, then the ones a test started by hand (*pids*)."""
    from virtsave.qemu import launch as qemu_launch

    qemu_launch.stop_all()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def our_qemus() -> Iterator[list[int]]:
    """Pids of QEMUs a test started or found; killed at teardown (only these, and the launcher's)."""
    pids: list[int] = []
    yield pids
    kill_qemus(pids)


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


# --------------------------------------------------------------------------- the stack, read independently
# Skip conditions are computed here from the tools' own words (``qemu-system-x86_64 --version``,
# ``virsh version --daemon``), never by asking virtsave: a broken virtsave helper must fail a test, not
# skip it. A prerequisite that is missing names itself in the skip reason; one that cannot be read fails.

_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def _version_after(label: str, text: str) -> tuple[int, int, int]:
    """The version following *label* in *text* (``QEMU emulator version``, ``Running against daemon:``)."""
    at = text.find(label)
    m = _VERSION.match(text[at + len(label):].strip()) if at >= 0 else None
    if m is None:
        raise RuntimeError(f"no version after {label!r} in {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _show(v: tuple[int, int, int] | None) -> str:
    return ".".join(map(str, v)) if v else "none"


@functools.cache
def qemu_version() -> tuple[int, int, int] | None:
    """``qemu-system-x86_64 --version`` (None when no such binary is installed)."""
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    return _version_after("QEMU emulator version", out)


@functools.cache
def daemon_versions() -> dict[str, tuple[int, int, int]]:
    """The libvirt daemon's version and the QEMU it drives, from ``virsh version --daemon``."""
    out = subprocess.run(["virsh", "-c", URI, "version", "--daemon"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return {"libvirt": _version_after("Running against daemon:", out),
            "qemu": _version_after("Running hypervisor: QEMU", out)}


#: libvirt's NEWS: per-call save image formats (virDomainSaveParams' image_format) from 11.2; the
#: sparse format (QEMU's mapped-ram) from 11.2 with QEMU 9.0; zstd as a format from 10.4.
_PER_CALL_FORMATS = (11, 2, 0)
_SPARSE_QEMU = (9, 0, 0)
_COMPRESSORS = {"gzip": "gzip", "bzip2": "bzip2", "xz": "xz", "lzop": "lzop", "zstd": "zstd"}
#: libvirt reads (restores) zstd save images from 10.4 on (its save-image format id 5).
_ZSTD_LIBVIRT = (10, 4, 0)


def restore_unavailable(fmt: str) -> str | None:
    """Why libvirt on this stack cannot restore an image in *fmt* (``virsh restore``), or None."""
    v = daemon_versions()
    if fmt == "zstd" and v["libvirt"] < _ZSTD_LIBVIRT:
        return f"libvirt restores zstd images from {_show(_ZSTD_LIBVIRT)} on; the daemon is {_show(v['libvirt'])}"
    return None


def binding_version() -> tuple[int, int, int]:
    """The installed libvirt-python distribution's version (pip's metadata, not the module)."""
    return _version_after("", importlib.metadata.version("libvirt-python"))


def format_unavailable(fmt: str) -> str | None:
    """Why ``save --image-format FMT`` cannot run on this stack, or None (for a test's skip reason)."""
    v = daemon_versions()
    if v["libvirt"] < _PER_CALL_FORMATS or binding_version() < _PER_CALL_FORMATS:
        return (f"--image-format needs libvirt >= {_show(_PER_CALL_FORMATS)} (daemon {_show(v['libvirt'])}, "
                f"libvirt-python {_show(binding_version())})")
    if fmt == "sparse" and v["qemu"] < _SPARSE_QEMU:
        return f"sparse needs QEMU >= {_show(_SPARSE_QEMU)} (mapped-ram); the daemon's QEMU is {_show(v['qemu'])}"
    tool = _COMPRESSORS.get(fmt)
    if tool and shutil.which(tool) is None:
        return f"{fmt} needs {tool} installed"
    return None


QEMU_VERSION = qemu_version()
#: Sparse images are QEMU's mapped-ram (QEMU >= 9.0); the debian12 stack's QEMU 7.2 has none.
needs_mapped_ram = pytest.mark.skipif(
    QEMU_VERSION is None or QEMU_VERSION < _SPARSE_QEMU,
    reason=f"needs QEMU >= 9.0 for mapped-ram (sparse images); this QEMU is {_show(QEMU_VERSION)}")


# --------------------------------------------------------------------------- QEMU builds side by side
#: Where ``scripts/extra-qemu NAME`` unpacks another QEMU build (``NAME/bin/qemu-system-x86_64``).
EXTRA_QEMU_BASE = Path("/var/lib/virtsave/qemu")


@functools.cache
def qemu_builds() -> dict[str, tuple[int, int, int]]:
    """Every QEMU on this host and its version, each asked itself (``--version``): the system's and the
    ones unpacked beside it."""
    paths = [shutil.which("qemu-system-x86_64"), *sorted(map(str, EXTRA_QEMU_BASE.glob("*/bin/qemu-system-x86_64")))]
    found = {}
    for path in filter(None, paths):
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
        found[path] = _version_after("QEMU emulator version", out)
    return found


def qemu_before(version: tuple[int, int, int]) -> str | None:
    """A QEMU build on this host older than *version* (e.g. Debian 12's 7.2 beside QEMU 10), or None."""
    return next((p for p, v in qemu_builds().items() if v < version), None)


def require_format(fmt: str | None) -> None:
    """Skip the calling test, naming what is missing, when ``--image-format FMT`` cannot run here."""
    missing = format_unavailable(fmt) if fmt else None
    if missing:
        pytest.skip(missing)
