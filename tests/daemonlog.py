"""libvirtd's log settings as ``virt-admin`` shows them, and a moment of the daemon's log capture to
oneself on a shared daemon (integration tests of a killed ``virtsave trace``).

Every virtsave that talks to libvirtd repairs a capture left by a killed trace, under the capture lock
of its state directory. A test that must see *its* next command do the repair holds the default state
directory's lock while nothing is captured (:func:`capture_idle`) and runs its own trace with a private
state directory: nobody else can start, join or repair a capture meanwhile, and nobody else sees its
state. ``tests/`` is on ``sys.path``, so test modules import this one as ``daemonlog``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

ADMIN_URI = "libvirtd:///system"
STATE_DIR = Path(os.environ.get("VIRTSAVE_STATE_DIR", "/var/lib/virtsave"))


def log_settings() -> tuple[str, str]:
    """libvirtd's current log filters and outputs, as ``virt-admin`` prints them (blanks squeezed)."""
    vals = []
    for kind in ("filters", "outputs"):
        out = subprocess.run(["virt-admin", "-c", ADMIN_URI, f"daemon-log-{kind}"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        m = re.search(rf"Logging {kind}:(.*)", out)
        vals.append(" ".join((m.group(1) if m else "").split()))
    return vals[0], vals[1]


@contextlib.contextmanager
def capture_lock(state_dir: Path = STATE_DIR) -> Iterator[None]:
    """Hold the capture lock of *state_dir* (what virtsave's own sessions and repairs take)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "logcapture.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def capture_on(settings: tuple[str, str]) -> bool:
    """A virtsave capture (any state directory's) is on: its private output is among the outputs."""
    return (STATE_DIR / "logcapture.json").exists() or "/logcapture/" in settings[1]


@contextlib.contextmanager
def capture_idle(timeout: float = 600) -> Iterator[tuple[str, str]]:
    """Hold the default state directory's capture lock at a moment no capture is on; yields the
    operator's settings then. Colleagues' virtsave commands wait for the lock meanwhile (keep it short)."""
    deadline = time.monotonic() + timeout
    while True:
        with capture_lock():
            now = log_settings()
            if not capture_on(now):
                yield now
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"a virtsave capture stayed on for {timeout:.0f} s: {now}")
        time.sleep(0.5)

