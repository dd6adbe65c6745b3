"""The private daemon's safety guards (virtsave.harness.privdaemon), without a daemon or a namespace.

The real thing — libvirt-guests.sh against a private libvirtd in a mount namespace — runs in
``scripts/bench`` (P7); these are the checks that keep it away from the shared daemon.
"""

from __future__ import annotations

import os
from pathlib import Path

import libvirt
import pytest

from virtsave.core.errors import UnsupportedError
from virtsave.harness import privdaemon


def test_refuses_to_run_in_the_callers_mount_namespace(tmp_path: Path) -> None:
    here = privdaemon.mount_namespace()
    with pytest.raises(UnsupportedError, match="mount namespace of its own"):
        privdaemon.check_private_namespace(here)
    with pytest.raises(UnsupportedError):
        privdaemon.PrivateDaemon(tmp_path, here).__enter__()
    assert list(tmp_path.iterdir()) == []  # nothing bound, nothing written


def test_leftover_killer_spares_processes_of_our_namespace(tmp_path: Path) -> None:
    (tmp_path / "run" / "qemu").mkdir(parents=True)
    (tmp_path / "run" / "qemu" / "g.pid").write_text(f"{os.getpid()}\n")  # ourselves: must survive
    (tmp_path / "libvirtd.pid").write_text("garbage\n")
    (tmp_path / "virtlogd.pid").write_text(f"{2 ** 22 + 1}\n")  # no such process
    assert privdaemon.kill_leftovers(tmp_path) == []


def test_stop_never_connects_unless_run_dir_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no(*_a: object) -> None:
        raise AssertionError("stop() connected to qemu:///system without a private /run/libvirt")

    monkeypatch.setattr(libvirt, "open", no)
    d = privdaemon.PrivateDaemon(tmp_path, privdaemon.mount_namespace())
    assert not d.private_run
    d.stop()


def test_libvirt_guests_config_suspends_and_starts_on_the_given_uri() -> None:
    conf = dict(line.split("=", 1) for line in privdaemon.guests_config(bypass_cache=True).splitlines())
    assert conf["URIS"] == "qemu:///system" and conf["ON_SHUTDOWN"] == "suspend" and conf["ON_BOOT"] == "start"
    assert conf["PARALLEL_SHUTDOWN"] == "0" and conf["BYPASS_CACHE"] == "1" and conf["START_DELAY"] == "0"
