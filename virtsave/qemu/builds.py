"""The QEMU builds this host can run side by side: the system's, private prefixes, named binaries.

A *build* is one ``qemu-system-x86_64`` executable with what it says of itself: version (and the
distribution package in brackets), accelerators (``-accel help``) and machine types
(``-machine help``, with aliases such as ``pc``, the default and the ones marked deprecated).

Where builds come from (:func:`discover`):

* ``system``: ``qemu-system-x86_64`` on ``PATH`` (the distribution's, what libvirt runs);
* private prefixes: ``<PREFIX_BASE>/<name>/bin/qemu-system-x86_64`` — made by
  ``scripts/setup --extra-qemu NAME`` (e.g. ``debian12``: Debian 12's QEMU 7.2 unpacked with
  ``apt-get download`` + ``dpkg -x``; its ``bin/qemu-system-x86_64`` is a wrapper that points
  QEMU at the prefix's modules, firmware and, when needed, libraries);
* named: any binary given as ``PATH`` or ``NAME=PATH`` (``virtsave matrix --qemu``).

Example::

    >>> parse_accel_help("Accelerators supported in QEMU binary:\\ntcg\\nkvm\\n")
    ['tcg', 'kvm']
    >>> m = parse_machine_help("Supported machines are:\\n"
    ...     "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\\n"
    ...     "pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\\n"
    ...     "pc-i440fx-2.4        Standard PC (i440FX + PIIX, 1996) (deprecated)\\n")
    >>> m["pc"].alias_of, m["pc-i440fx-7.2"].default, m["pc-i440fx-2.4"].deprecated
    ('pc-i440fx-7.2', True, True)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from virtsave.core.errors import LaunchError
from virtsave.qemu import launch as qemu_launch

__all__ = ["BINARY", "PREFIX_BASE", "Machine", "QemuBuild", "discover", "machine_support", "parse_accel_help",
           "parse_machine_help", "parse_version", "probe", "resolve"]

#: Where ``scripts/setup --extra-qemu NAME`` puts private QEMU builds (one directory per name).
PREFIX_BASE = Path(os.environ.get("VIRTSAVE_QEMU_DIR", "/var/lib/virtsave/qemu"))
BINARY = "qemu-system-x86_64"
_TIMEOUT = 30.0
_VERSION = re.compile(r"version (\d+\.\d+(?:\.\d+)?)\s*(?:\((.*)\))?")
_MACHINE = re.compile(r"^(\S+)\s+(.*?)\s*$")


@dataclass
class Machine:
    """One line of ``-machine help``."""

    name: str
    description: str
    alias_of: str | None = None
    default: bool = False
    deprecated: bool = False


@dataclass
class QemuBuild:
    """One QEMU binary and what it supports; *error* is set when it could not be probed."""

    name: str
    path: str
    origin: str                                   # system | prefix | named
    version: str | None = None                    # "7.2.22"
    package: str | None = None                    # "Debian 1:7.2+dfsg-7+deb12u18+b3"
    accelerators: list[str] = field(default_factory=list)
    machines: dict[str, Machine] = field(default_factory=dict)
    error: str | None = None

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(x) for x in (self.version or "0").split("."))

    def to_dict(self, *, machines: bool = True) -> dict[str, Any]:
        d = asdict(self)
        d["machines"] = [asdict(m) for m in self.machines.values()] if machines else len(self.machines)
        return d


def parse_version(text: str) -> tuple[str | None, str | None]:
    """``--version`` output → (version, package).

    >>> parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\\nCopyright")
    ('10.0.2', 'Debian 1:10.0.2+ds-2+deb13u1~bpo12+1')
    """
    m = _VERSION.search(text)
    if not m:
        return None, None
    return m.group(1), (m.group(2) or None)


def parse_accel_help(text: str) -> list[str]:
    """``-accel help`` output → accelerator names, in QEMU's order."""
    return [ln.strip() for ln in text.splitlines()[1:] if ln.strip() and " " not in ln.strip()]


def parse_machine_help(text: str) -> dict[str, Machine]:
    """``-machine help`` output → machine types by name (aliases are entries of their own)."""
    out: dict[str, Machine] = {}
    for line in text.splitlines()[1:]:
        m = _MACHINE.match(line)
        if not m:
            continue
        desc = m.group(2)
        alias = re.search(r"\(alias of ([^)]+)\)", desc)
        mach = Machine(m.group(1), re.sub(r"\s*\((?:alias of [^)]+|default|deprecated)\)", "", desc),
                       alias_of=alias.group(1) if alias else None, default="(default)" in desc,
                       deprecated="(deprecated)" in desc)
        out[mach.name] = mach
    return out


def machine_support(build: QemuBuild, machine: str) -> str:
    """How *build* knows *machine*: ``ok``, ``deprecated`` or ``missing`` (aliases resolved)."""
    m = build.machines.get(machine)
    if m is None:
        return "missing"
    if m.alias_of and m.alias_of in build.machines:
        m = build.machines[m.alias_of]
    return "deprecated" if m.deprecated else "ok"


def _run(path: str, *args: str) -> str:
    try:
        p = subprocess.run([path, *args], capture_output=True, text=True, timeout=_TIMEOUT,
                           stdin=subprocess.DEVNULL, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                                          "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{path} {' '.join(args)} did not answer within {_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise LaunchError(f"cannot execute {path}: {exc.strerror}") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        raise LaunchError(f"{path} {' '.join(args)} failed: {last}")
    return p.stdout


def probe(path: str, name: str, origin: str = "named") -> QemuBuild:
    """Ask the binary at *path* what it is; a build that cannot run gets :attr:`QemuBuild.error`."""
    build = QemuBuild(name, path, origin)
    if not qemu_launch.is_qemu_binary(path):
        build.error = f"not a QEMU system emulator (qemu-system-*): {path}"
        return build
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        build.error = f"not found or not executable: {path}"
        return build
    try:
        build.version, build.package = parse_version(_run(path, "--version"))
        build.accelerators = parse_accel_help(_run(path, "-accel", "help"))
        build.machines = parse_machine_help(_run(path, "-machine", "help"))
    except LaunchError as exc:
        build.error = str(exc)
    return build


def _prefix_builds(base: Path) -> list[tuple[str, str]]:
    if not base.is_dir():
        return []
    # ".NAME.*" and "NAME.old" are scripts/extra-qemu's work in progress.
    return [(d.name, str(d / "bin" / BINARY)) for d in sorted(base.iterdir())
            if not d.name.startswith(".") and not d.name.endswith(".old") and (d / "bin" / BINARY).is_file()]


def resolve(spec: str, known: list[QemuBuild]) -> QemuBuild:
    """A ``--qemu`` value: a known build's name, ``NAME=PATH`` or a ``PATH``."""
    for b in known:
        if spec == b.name:
            return b
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = ""
    if "/" not in path:
        found = shutil.which(path)
        if found is None:
            raise LaunchError(f"--qemu {spec}: no build of that name ({', '.join(b.name for b in known) or 'none'}) "
                              "and no such program on PATH")
        path = found
    build = probe(path, name or path, "named")
    if not name and build.version:
        build.name = f"qemu-{build.version}"
    if build.error:
        raise LaunchError(f"--qemu {spec}: {build.error}")
    return build


def discover(*, base: Path | None = None, system: str | None = BINARY) -> list[QemuBuild]:
    """The system build and every private prefix under *base* (default :data:`PREFIX_BASE`).

    Two entries for the same executable (same real path) are listed once.
    """
    found: list[QemuBuild] = []
    seen: set[str] = set()
    sys_path = shutil.which(system) if system else None
    candidates = ([("system", sys_path, "system")] if sys_path else []) + \
        [(n, p, "prefix") for n, p in _prefix_builds(base or PREFIX_BASE)]
    for name, path, origin in candidates:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        found.append(probe(path, name, origin))
    return found
