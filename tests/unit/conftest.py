"""Unit tests are isolated from the machine.

- Each test has its own state directory (``VIRTSAVE_STATE_DIR``) and QEMU run directory, so it
  neither reads nor leaves anything in /var/lib/virtsave or /run/virtsave.
- No daemon: the default libvirt URI is libvirt's in-process ``test:///default`` driver; a test
  that opens any other URI whose socket exists fails (``qemu:///system`` belongs to integration
  tests), and ``virt-admin`` is a stub that fails the command loudly (``VIRTSAVE_ADMIN_CLIENT=virt-admin``:
  the log capture goes through it instead of the daemon's admin socket).
- The CLI runs in-process (typer's ``CliRunner``) through the ``cli`` fixture, which returns what
  ``subprocess.run`` would (``returncode``, ``stdout``, ``stderr``); ``run_cli`` in tests/conftest.py
  stays for the few subprocess smoke tests of exit codes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import libvirt
import pytest
from inprocess import CliResult, run_cli_inprocess

from virtsave.core import paths

TEST_URI = "test:///default"


@pytest.fixture(scope="session")
def cli() -> Callable[..., CliResult]:
    """The ``virtsave`` CLI, in-process (overrides the subprocess fixture of tests/conftest.py)."""
    return run_cli_inprocess


def _guard_uri(uri: str | None) -> None:
    """Fail a unit test that would reach a real libvirt daemon."""
    uri = uri or os.environ.get("LIBVIRT_DEFAULT_URI") or ""
    if uri.startswith("test://"):
        return
    socket = parse_qs(urlsplit(uri).query).get("socket", [""])[0]
    if socket and not Path(socket).exists():
        return  # a deliberately unreachable daemon: the test checks the error
    pytest.fail(f"a unit test tried to connect to libvirt at {uri!r}: that needs the daemon, so it is an "
                "integration test (tests/integration)", pytrace=True)


@pytest.fixture(autouse=True)
def isolated_from_machine(tmp_path_factory: pytest.TempPathFactory,
                          monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Own state and run directories, ``test:///default`` as the default URI, no daemon access."""
    base = tmp_path_factory.mktemp("machine")
    state, run, stubs = base / "state", base / "run", base / "bin"
    for d in (state, run, stubs):
        d.mkdir()
    monkeypatch.setenv("VIRTSAVE_STATE_DIR", str(state))  # subprocesses
    monkeypatch.setattr(paths, "STATE_DIR", state)         # this process (read at call time)
    monkeypatch.setenv("VIRTSAVE_RUN_DIR", str(run))
    monkeypatch.setattr("virtsave.qemu.launch.RUN_BASE", run, raising=False)
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", TEST_URI)
    monkeypatch.setenv("VIRTSAVE_TEST_URI", TEST_URI)
    stub = stubs / "virt-admin"
    stub.write_text("#!/bin/sh\necho \"virt-admin called by a unit test: $*\" >&2\nexit 97\n")
    stub.chmod(0o755)
    monkeypatch.setenv("VIRTSAVE_ADMIN_CLIENT", "virt-admin")  # never the real admin socket
    monkeypatch.setenv("PATH", f"{stubs}{os.pathsep}{os.environ.get('PATH', '')}")
    real_open, real_open_ro = libvirt.open, libvirt.openReadOnly

    def guarded_open(name: str | None = None) -> libvirt.virConnect:
        _guard_uri(name)
        return real_open(name)

    def guarded_open_ro(name: str | None = None) -> libvirt.virConnect:
        _guard_uri(name)
        return real_open_ro(name)

    monkeypatch.setattr(libvirt, "open", guarded_open)
    monkeypatch.setattr(libvirt, "openReadOnly", guarded_open_ro)
    yield base
