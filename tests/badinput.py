"""Bad and hostile inputs shared by tests/unit/test_bad_inputs.py (traces, logs, hostile traces) and
tests/integration/test_bad_images.py (images cut from a real QEMU stream): the one-line error check,
a valid synthetic trace of a tiny machine, and a QEMU wrapper that records every launch.

``tests/`` is on ``sys.path`` (pytest puts the directory of tests/conftest.py there), so test
modules import this one as ``badinput``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from virtsave.trace import model as tr

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"
#: Commands that talk to libvirtd first repair log settings left by a killed ``virtsave trace`` (anyone's)
#: and say so: that note is not part of the command's own error.
REPAIR_NOTE = "warning: restored libvirtd's log settings"
VIRTSAVE = [sys.executable, "-m", "virtsave.cli"]
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
#: The tiny machine both the session image and the synthetic traces use.
MACHINE = ["-machine", "pc,accel=tcg", "-m", "32", "-nodefaults", "-display", "none", "-no-user-config"]


# --------------------------------------------------------------------------- helpers


def assert_clean_error(proc: Any, *, allow_info: tuple[str, ...] = ()) -> str:
    """Exit 2, exactly one stderr line (the error), no traceback; returns that line.

    *allow_info*: prefixes of progress lines a command prints before it fails (reported as a
    finding in docs/reliability.md when used)."""
    err = proc.stderr
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith((*allow_info, REPAIR_NOTE))]
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr: {err!r}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err!r}"
    assert lines[0].startswith("virtsave: error: "), lines[0]
    return lines[0]


def synthetic_trace(name: str = "vs-test-bad-input", argv0: str = QEMU) -> dict:
    """A valid trace of the tiny machine: libvirt's raw save and restore sequence (11.3 shape)."""
    t = tr.new_trace("libvirt", host={"libvirt": "11.3.0", "qemu": "10.0.2"},
                     domain={"name": name, "uuid": "8d7d5b3c-6b8e-4d8a-9d61-3f1f6f0c0a01",
                             "xml": f"<domain type='qemu'><name>{name}</name></domain>",
                             "argv": [argv0, *MACHINE]})
    save = tr.add_phase(t, "save", "managed-save")
    i = 0

    def cmd(execute: str, args: dict | None = None, fds: int | None = None) -> None:
        nonlocal i
        i += 1
        m = tr.command(execute, args, id=f"libvirt-{i}", fds=fds or 0, t=i * 0.001)
        save_or_restore["messages"].append(m)
        save_or_restore["messages"].append(tr.reply(f"libvirt-{i}", ret={}, t=i * 0.001))

    save_or_restore = save
    cmd("stop")
    cmd("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    cmd("getfd", {"fdname": "migrate"}, fds=1)
    cmd("migrate", {"uri": "fd:migrate", "detach": True, "resume": False})
    save["messages"].append(tr.event("MIGRATION", {"status": "completed"}, t=0.5))
    save["ok"] = True
    restore = tr.add_phase(t, "restore", "start")
    save_or_restore = restore
    cmd("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    cmd("migrate-incoming", {"uri": "fd:25", "exit-on-error": False})
    restore["messages"].append(tr.event("MIGRATION", {"status": "completed"}, t=0.6))
    cmd("cont")
    restore["ok"] = True
    assert tr.validate(t) == [], tr.validate(t)
    return t


def write_trace(path: Path, t: dict) -> Path:
    path.write_text(json.dumps(t, indent=1))
    return path


def make_qemu_wrapper(d: Path) -> tuple[Path, Path]:
    """A QEMU 'binary' in *d* that records every invocation (except ``--version``) and then runs QEMU.

    Used as a trace's argv[0]: if replay launches anything, the record shows it (one line per
    launch: the pid, then the arguments; ``exec`` keeps the pid, so it is QEMU's)."""
    record = d / "launches.txt"
    wrapper = d / "qemu-system-x86_64"
    wrapper.write_text(f"""#!/bin/sh
if [ "$1" != "--version" ]; then echo "$$ $*" >> {record}; fi
exec {QEMU} "$@"
""")
    wrapper.chmod(0o755)
    return wrapper, record


def recorded_pids(record: Path) -> list[int]:
    """The pids of the QEMUs a wrapper launched (none when it never ran)."""
    if not record.exists():
        return []
    return [int(line.split()[0]) for line in record.read_text().splitlines() if line.split()]


def kill_recorded(record: Path) -> list[int]:
    """Kill the QEMUs a wrapper launched (only those: never scan the host's processes); their pids."""
    pids = recorded_pids(record)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pids
