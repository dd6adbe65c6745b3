"""What the disk can do, measured in the bench's own run: the write and read limits P2 and P3b divide by.

Write limit: the faster of ``dd oflag=direct bs=16M`` (O_DIRECT, large blocks) and buffered
``dd bs=16M conv=fsync`` into the image directory; read limit: the faster of ``dd iflag=direct`` and
buffered ``dd`` of that file, each with the page cache dropped first (cold). Neither method is
assumed to be the fast one: on this machine kind O_DIRECT wins by 3–5× (fresh page-cache pages cost
a first-touch fault in the microVM), elsewhere buffered may. The data written is random (a source
file in ``/dev/shm``), like the guest memory the saves write: a disk or host that spots zeros must
not flatter the limit.

The pure parts (dd's summary line, rates, the best method) are plain functions with doctests; P2
and P3b themselves are :func:`virtsave.harness.bench.figures`.

Example::

    >>> parse_dd("134217728 bytes (134 MB, 128 MiB) copied, 0.5 s, 268 MB/s\\n")
    (134217728, 0.5)
    >>> Limit("write", {"O_DIRECT": [9e8, 1.1e9], "buffered+fsync": [2e8]}).best
    ('O_DIRECT', 1000000000.0)
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from virtsave.core.errors import OperationFailed

__all__ = ["BLOCK", "Limit", "drop_page_cache", "measure_limits", "parse_dd", "rate"]

BLOCK = 16 * 1024 * 1024
#: ``<bytes> bytes (…) copied, <seconds> s, <rate>`` — dd's last line (coreutils, LC_ALL=C).
_DD = re.compile(r"^(\d+) bytes .*copied, ([0-9.eE+-]+) s,", re.M)


def parse_dd(stderr: str) -> tuple[int, float]:
    """(bytes, seconds) from dd's summary on stderr; its own clock (it includes ``conv=fsync``).

    >>> parse_dd("16+0 records in\\n16+0 records out\\n268435456 bytes (268 MB, 256 MiB) copied, 1.25 s, 215 MB/s")
    (268435456, 1.25)
    >>> parse_dd("dd: error writing 'x': No space left on device")
    Traceback (most recent call last):
    ...
    virtsave.core.errors.OperationFailed: dd printed no summary: dd: error writing 'x': No space left on device
    """
    found = list(_DD.finditer(stderr))
    if not found:
        raise OperationFailed(f"dd printed no summary: {stderr.strip()[-200:]}")
    return int(found[-1].group(1)), float(found[-1].group(2))


def rate(nbytes: int, seconds: float) -> float:
    """Bytes per second (NaN when nothing was timed).

    >>> rate(1000, 0.5), rate(1, 0.0) != rate(1, 0.0)
    (2000.0, True)
    """
    return nbytes / seconds if seconds > 0 else float("nan")


@dataclass
class Limit:
    """Rates (B/s) per method for one direction; the limit is the best method's median."""

    direction: str
    rates: dict[str, list[float]] = field(default_factory=dict)

    @property
    def best(self) -> tuple[str, float]:
        """(method, median rate) of the fastest method."""
        medians = {k: statistics.median(v) for k, v in self.rates.items() if v}
        if not medians:
            return "none", float("nan")
        method = max(medians, key=lambda k: medians[k])
        return method, medians[method]

    @property
    def value(self) -> float:
        return self.best[1]


def _dd(*args: str) -> tuple[int, float]:
    proc = subprocess.run(["dd", *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "LC_ALL": "C"})
    if proc.returncode != 0:
        raise OperationFailed(f"dd {' '.join(args)} failed: {proc.stderr.strip()[-200:]}")
    return parse_dd(proc.stderr)


def _random_source(blocks: int) -> Path:
    """A file of random data in /dev/shm (memory: reading it costs no disk)."""
    src = Path("/dev/shm") / f"vs-bench-src-{os.getpid()}"
    with open(src, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        for _ in range(blocks):
            f.write(os.urandom(BLOCK))
    return src


def drop_page_cache() -> None:
    """Write back, then drop the page cache (root): the next read comes from the disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def measure_limits(directory: str | os.PathLike[str], size_mib: int, repeats: int = 3, *,
                   log: Callable[[str], None] = lambda _m: None,
                   drop_caches: Callable[[], None] = drop_page_cache) -> tuple[Limit, Limit]:
    """(write limit, read limit) of *directory*, each method *repeats* times, alternating.

    *size_mib* is rounded to whole 16 MiB blocks (at least 16). Each write starts after ``sync``,
    each read after *drop_caches*. The file is removed afterwards.
    """
    blocks = max(1, size_mib * 1024 * 1024 // BLOCK)
    target = Path(directory) / f".vs-limit-{os.getpid()}"
    write, read = Limit("write"), Limit("read")
    src = _random_source(blocks)
    try:
        for r in range(repeats):
            log(f"[{r + 1}/{repeats}] disk limits: dd {blocks * 16} MiB O_DIRECT and buffered, write and cold read")
            for method, flags in (("O_DIRECT", ["oflag=direct"]), ("buffered+fsync", ["conv=fsync"])):
                target.unlink(missing_ok=True)
                os.sync()
                n, t = _dd(f"if={src}", f"of={target}", "bs=16M", f"count={blocks}", *flags)
                write.rates.setdefault(method, []).append(rate(n, t))
            for method, flags in (("O_DIRECT", ["iflag=direct"]), ("buffered", [])):
                drop_caches()
                n, t = _dd(f"if={target}", "of=/dev/null", "bs=16M", *flags)
                read.rates.setdefault(method, []).append(rate(n, t))
    finally:
        src.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
    return write, read
