"""What the libvirt daemon and QEMU on the other end of a connection can do.

virtsave supports libvirt 9.0 + QEMU 7.2 and libvirt 11.x + QEMU 10, so every
feature newer than 9.0 is checked here at run time, never assumed.

Facts used (libvirt sources/NEWS, checked on this machine):

- ``virDomainSaveParams``/``virDomainRestoreParams`` exist since libvirt 8.4 (file, dxml);
- the per-call ``image_format`` and ``parallel.channels`` parameters since 11.2
  (``VIR_DOMAIN_SAVE_PARAM_IMAGE_FORMAT``); before that the format only comes from
  ``save_image_format`` in ``qemu.conf``;
- format ids: raw 0, gzip 1, bzip2 2, xz 3, lzop 4, zstd 5, sparse 6 (sparse new in 11.2);
- ``sparse`` is QEMU's ``mapped-ram`` (+ ``multifd`` for parallel channels), QEMU ≥ 9.0.

Example (needs a running libvirtd)::

    import libvirt
    from virtsave.libvirtd import host
    conn = libvirt.open("qemu:///system")
    print(host.versions(conn))          # HostVersions(libvirt='11.3.0', qemu='10.0.2', ...)
    host.require_format(conn, "sparse")  # raises UnsupportedError on libvirt 9.0
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

import libvirt

from virtsave.core.errors import LaunchError, UnsupportedError

#: Formats libvirt knows for save images (``--image-format``).
IMAGE_FORMATS = ("raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse")

SAVE_PARAMS_MIN = 11_002_000  # per-call image_format / parallel.channels
SAVE_PARAMS_API_MIN = 8_004_000  # virDomainSaveParams / virDomainRestoreParams themselves
ZSTD_MIN = 10_004_000
SPARSE_MIN = 11_002_000
SPARSE_QEMU_MIN = 9_000_000  # mapped-ram


def version_str(n: int) -> str:
    """libvirt's integer encoding (major*1e6 + minor*1e3 + micro) as ``"11.3.0"``."""
    return f"{n // 1_000_000}.{n // 1000 % 1000}.{n % 1000}"


def version_int(s: str) -> int:
    """``"10.0.2"`` → 10000002 (extra parts and suffixes ignored)."""
    parts = [int(p) for p in re.findall(r"\d+", s)[:3]]
    parts += [0] * (3 - len(parts))
    return parts[0] * 1_000_000 + parts[1] * 1000 + parts[2]


@dataclass(frozen=True)
class HostVersions:
    """Versions of the libvirt daemon and of the hypervisor (QEMU) it drives."""

    libvirt: str
    qemu: str
    libvirt_int: int
    qemu_int: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def versions(conn: libvirt.virConnect) -> HostVersions:
    """The daemon's libvirt version and its QEMU version (as libvirt probed it)."""
    lib = conn.getLibVersion()
    try:
        hv = conn.getVersion()
    except libvirt.libvirtError:  # e.g. test:/// driver
        hv = 0
    return HostVersions(version_str(lib), version_str(hv), lib, hv)


def qemu_binary_version(path: str = "qemu-system-x86_64") -> str:
    """``"10.0.2"`` from ``qemu-system-x86_64 --version`` (a local binary, not the daemon's)."""
    exe = shutil.which(path)
    if exe is None:
        raise LaunchError(f"QEMU binary {path} not found")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    if not m:
        raise LaunchError(f"cannot read the version of {exe}: {out.strip()[:80]!r}")
    return m.group(1)


def client_version() -> int:
    """The libvirt client library this Python binding runs against."""
    return int(libvirt.getVersion())


def supports_save_params(conn: libvirt.virConnect) -> bool:
    """True when per-call image format and parallel channels can be asked for."""
    return _save_params_problem(conn) is None


def _save_params_problem(conn: libvirt.virConnect) -> str | None:
    if not hasattr(libvirt, "VIR_DOMAIN_SAVE_PARAM_IMAGE_FORMAT"):
        return f"this libvirt-python binding is older than 11.2 (client library {version_str(client_version())})"
    v = versions(conn)
    if v.libvirt_int < SAVE_PARAMS_MIN:
        return f"daemon is {v.libvirt}"
    if client_version() < SAVE_PARAMS_MIN:
        return f"client library is {version_str(client_version())}"
    return None


def require_save_params(conn: libvirt.virConnect, what: str) -> None:
    """Raise :class:`UnsupportedError` naming the version when *what* needs libvirt ≥ 11.2."""
    problem = _save_params_problem(conn)
    if problem:
        raise UnsupportedError(f"{what} needs libvirt ≥ {version_str(SAVE_PARAMS_MIN)} ({problem})")


def format_problem(conn: libvirt.virConnect, fmt: str) -> str | None:
    """Why *fmt* cannot be asked for per call on this daemon, or None when it can."""
    if fmt not in IMAGE_FORMATS:
        return f"unknown image format {fmt!r} (choose from {', '.join(IMAGE_FORMATS)})"
    problem = _save_params_problem(conn)
    if problem:
        return f"image format {fmt} per call needs libvirt ≥ {version_str(SAVE_PARAMS_MIN)} ({problem})"
    v = versions(conn)
    if fmt == "zstd" and v.libvirt_int < ZSTD_MIN:
        return f"image format zstd needs libvirt ≥ {version_str(ZSTD_MIN)} (daemon is {v.libvirt})"
    if fmt == "sparse":
        if v.libvirt_int < SPARSE_MIN:
            return f"image format sparse needs libvirt ≥ {version_str(SPARSE_MIN)} (daemon is {v.libvirt})"
        if v.qemu_int and v.qemu_int < SPARSE_QEMU_MIN:
            return f"image format sparse needs QEMU ≥ {version_str(SPARSE_QEMU_MIN)} (mapped-ram; QEMU is {v.qemu})"
    return None


def supports_format(conn: libvirt.virConnect, fmt: str) -> bool:
    """True when ``save --image-format fmt`` can be done on this daemon."""
    return format_problem(conn, fmt) is None


def require_format(conn: libvirt.virConnect, fmt: str) -> None:
    """Raise :class:`UnsupportedError` naming the versions when *fmt* is not available."""
    problem = format_problem(conn, fmt)
    if problem:
        raise UnsupportedError(problem)
