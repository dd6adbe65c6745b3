"""The side-by-side benchmark (issues 6 and 14): direct-QMP path vs libvirt, and the disk's own limits, in one run.

All figures are measured in the same run on the same guest size, so the ratios are honest; nothing
here asserts a time. ``scripts/bench`` is the command-line front.

Per repetition (guest RAM ``ram_mib``, ``fill_mib`` of it filled with non-zero data):

- libvirt: managed save + start (restore), ``save --image-format sparse --parallel-channels 2``
  (± ``--bypass-cache``) + restore, ``save --image-format zstd`` + restore (P8), and a *traced*
  managed save against an untraced one (P4);
- direct: a QEMU launched from the libvirt domain's own command line, saved with mapped-ram +
  multifd straight into the image (O_DIRECT, QEMU's ``direct-io``) and ``quit``, restored to
  running (pages read with O_DIRECT); then saved as zstd through ``zstd`` (threads by CPU count), written with
  O_DIRECT (P8; libvirt's zstd save is measured plain, as the issue defines P8, and with
  ``--bypass-cache`` for context);
- the disk's limits (:mod:`virtsave.harness.benchlimits`: the faster of ``dd`` O_DIRECT and buffered,
  write and cold read, into the image directory) — P2 and P3b divide by them;
- the log parser on a generated log (P5);
- bulk: 4 test guests on a private libvirtd (:mod:`virtsave.harness.bulkbench`): ``virtsave
  managed-save --all`` / ``start --all`` against ``libvirt-guests.sh stop`` / ``start`` (P7, P7b).

:func:`run_scale` (``scripts/bench --scale``) saves and restores guests of 256 MiB … 4 GiB on both
paths and plots seconds against guest size.

Both paths go through the one backend interface (:mod:`virtsave.core.operation`), with the
same options.

Example::

    from virtsave.harness import bench
    result = bench.run(bench.Config(ram_mib=512, fill_mib=384, repeats=2))
    print(result.table)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtsave.core.errors import OperationFailed
from virtsave.core.operation import SaveOptions
from virtsave.harness import benchlimits, bulkbench, guest, logsynth
from virtsave.harness.benchreport import Figure, OpPair, Samples, render_table, write_results, write_scale
from virtsave.image import saveimage
from virtsave.libvirtd import capture, domainlog, host, logparse
from virtsave.libvirtd.backend import LibvirtBackend
from virtsave.qemu import migration
from virtsave.qemu.backend import DirectBackend

__all__ = ["GOALS", "SAMPLES", "SCALE_SIZES", "Config", "Result", "figures", "machine_description", "run",
           "run_scale", "scale_fill"]

GOALS = {  # key: (title, op, goal)
    "P1": ("direct save ÷ libvirt managedsave (wall)", "<=", 0.66),
    "P1b": ("direct save ÷ libvirt's fastest (sparse, 2 channels, ± bypass-cache)", "<=", 0.8),
    "P2": ("direct save rate ÷ write limit (faster of dd O_DIRECT, dd+fsync)", ">=", 0.9),
    "P3": ("direct restore-to-running ÷ libvirt restore", "<=", 0.5),
    "P3b": ("direct restore: image bytes ÷ time-to-running ÷ cold read limit", ">=", 0.7),
    "P4": ("traced managed save ÷ untraced managed save", "<=", 1.05),
    "P4b": ("tracing's fixed cost outside libvirt's call (s)", "<=", 0.05),
    "P5": ("log import (trace --from-log) ÷ grep -c, same log, CPU", "<=", 10.0),
    "P5b": ("log summary (list_monitors) ÷ grep -c, same log, CPU", "<=", 5.0),
    "P7": ("virtsave managed-save --all ÷ libvirt-guests.sh stop (4 guests)", "<=", 0.6),
    "P7b": ("virtsave start --all ÷ libvirt-guests.sh start (4 guests)", "<=", 0.6),
    "P8": ("direct zstd save (O_DIRECT) ÷ libvirt zstd save", "<=", 0.5),
    "P8b": ("|direct zstd image size ÷ libvirt's − 1|", "<=", 0.1),
}
#: ``--scale`` guest sizes (MiB); each is filled to 3/4, leaving at least 128 MiB to the guest's kernel.
SCALE_SIZES = (256, 1024, 2048, 4096)


def scale_fill(ram_mib: int) -> int:
    """MiB filled in a ``--scale`` guest of *ram_mib*.

    >>> [scale_fill(r) for r in SCALE_SIZES]
    [128, 768, 1536, 3072]
    """
    return min(ram_mib * 3 // 4, ram_mib - 128)


@dataclass
class Config:
    """What to measure. Defaults are the issue's 2 GiB / 1.5 GiB guest and 4 bulk guests of 512 MiB."""

    ram_mib: int = 2048
    fill_mib: int = 1536
    repeats: int = 3
    channels: int = 2
    parse_log_mb: int = 300
    workdir: str = "/var/tmp"
    outdir: str = "results"
    uri: str | None = None
    preset: str = "default"
    log: Callable[[str], None] = print
    #: P7: guests, their size, rounds, and virtsave's --parallel (see the README for why 4).
    bulk: bulkbench.BulkConfig = field(default_factory=bulkbench.BulkConfig)
    scale_sizes: tuple[int, ...] = SCALE_SIZES


@dataclass
class Result:
    """Figures, raw samples, where the report went, and the table text."""

    figures: list[Figure]
    samples: list[Samples]
    paths: dict[str, Path] = field(default_factory=dict)
    table: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def _timed(call: Callable[[], Any], cold: bool = False) -> tuple[float, Any]:
    """Time *call* on a quiet disk; *cold*: with the page cache dropped (restores read the disk).

    Without the sync, the previous save's gigabytes still being written back land on whichever
    operation comes next. Restores are compared cold on both paths: an image written with
    O_DIRECT is not in the cache, one written through the cache is — that is not the restore's merit.
    """
    os.sync()
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    time.sleep(0.3)
    t0 = time.monotonic()
    out = call()
    return time.monotonic() - t0, out


def _allocated(path: str) -> int:
    """Bytes actually written (sparse images have holes)."""
    return os.stat(path).st_blocks * 512


def _wait_filled(serial: Path, timeout: float = 900) -> None:
    """The guest prints ``filled N MiB`` then ``tick 1`` once its memory is written; a guest that
    ran out of memory panics (and reboots, again and again): that is an error at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            out = serial.read_bytes()
            if b"tick 1" in out:
                return
            if b"Kernel panic" in out:
                raise OperationFailed(f"the guest panicked while filling its memory (too much to fill for its "
                                      f"RAM? see {serial})")
        time.sleep(0.2)
    raise TimeoutError(f"guest did not finish filling memory within {timeout:.0f} s ({serial})")


# --------------------------------------------------------------------------- P5: the log parser


#: The floors of P5 and P5b: the parser's own regex passes with nothing done per line
#: (:func:`logparse.scan_floor`), timed on the same log in the same repetition.
FLOORS = {"P5": "log import floor: its regex passes alone (CPU)",
          "P5b": "log summary floor: its regex passes alone (CPU)"}


def parser_samples() -> dict[str, Samples]:
    """The P5 sample series (CPU seconds and MB/s; wall seconds beside them, for the record)."""
    names = ("grep -c QEMU_MONITOR (CPU)", "log summary (CPU)", "log import (CPU)",
             "grep -c QEMU_MONITOR (wall)", "log summary (wall)", "log import (wall)", *FLOORS.values())
    out = {n: Samples(n) for n in names}
    out.update({n: Samples(n, unit="B/s") for n in ("log summary rate (CPU)", "log import rate (CPU)")})
    return out


def _cpu_timed(call: Callable[[], Any], child: bool = False) -> tuple[float, float]:
    """(wall, CPU) seconds of *call*; *child*: the CPU of the processes it ran, else this process's."""
    who = resource.RUSAGE_CHILDREN if child else resource.RUSAGE_SELF
    r0, t0 = resource.getrusage(who), time.perf_counter()
    call()
    r1, wall = resource.getrusage(who), time.perf_counter() - t0
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def measure_parser(path: Path, size_mb: float, repeats: int, s: dict[str, Samples]) -> None:
    """P5: generate a libvirtd log of *size_mb* MB at *path*, then per repetition time, warm and back to
    back, ``grep -c QEMU_MONITOR`` on it, the summary pass (:func:`logparse.list_monitors`) and a whole
    ``trace --from-log`` import (:func:`capture.import_log`, one save/restore monitor picked before
    the clock starts), and the floor of each (:data:`FLOORS`). CPU time is the measure: on a shared
    machine a 0.1 s grep's wall time varies several-fold with the load, what each costs does not. The
    file is removed afterwards.
    """
    logsynth.generate_log(path, size_mb)
    try:
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)      # warm the page cache
        mons = [m for m in logparse.list_monitors(path) if m["role"] != "other"]
        pick = mons[len(mons) // 2]["key"]
        size = path.stat().st_size
        for _ in range(repeats):
            grep = _cpu_timed(lambda: subprocess.run(["grep", "-c", "QEMU_MONITOR", str(path)],
                                                     stdout=subprocess.PIPE, check=True), child=True)
            summary = _cpu_timed(lambda: logparse.list_monitors(path))
            full = _cpu_timed(lambda: capture.import_log(path, monitor=pick))
            for what, (wall, cpu) in (("grep -c QEMU_MONITOR", grep), ("log summary", summary), ("log import", full)):
                s[f"{what} (wall)"].values.append(wall)
                s[f"{what} (CPU)"].values.append(cpu)
            s[FLOORS["P5b"]].values.append(_cpu_timed(lambda: logparse.scan_floor(path))[1])
            s[FLOORS["P5"]].values.append(_cpu_timed(lambda: logparse.scan_floor(path, whole=True))[1])
            s["log summary rate (CPU)"].values.append(size / max(summary[1], 1e-9))
            s["log import rate (CPU)"].values.append(size / max(full[1], 1e-9))
    finally:
        path.unlink(missing_ok=True)


def _per_grep(s: dict[str, Samples], name: str) -> float:
    """Median of *name* ÷ grep per repetition (each ran back to back with its grep)."""
    grep = s["grep -c QEMU_MONITOR (CPU)"].values
    pairs = [a / g for a, g in zip(s[name].values, grep, strict=True) if g > 0]
    return statistics.median(pairs) if pairs else float("nan")


def parser_ratios(s: dict[str, Samples]) -> dict[str, float]:
    """P5 and P5b: median of the per-repetition ratios (each pair ran back to back with its grep)."""
    return {"P5": _per_grep(s, "log import (CPU)"), "P5b": _per_grep(s, "log summary (CPU)")}


def parser_floors(s: dict[str, Samples]) -> dict[str, float]:
    """The floors of P5 and P5b, in the same unit (÷ grep): what the parser's regex passes alone cost."""
    return {k: _per_grep(s, name) for k, name in FLOORS.items()}


def floor_notes(floors: dict[str, float]) -> list[str]:
    """The report's lines on the P5/P5b floors (what the goal is up against).

    >>> floor_notes({"P5": 8.8, "P5b": 5.2})[1]
    '  P5  8.8 × grep (goal <= 10), P5b 5.2 × grep (goal <= 5)'
    """
    return ["floor of P5/P5b: the parser's own regex passes with nothing done per line, same log and run:",
            f"  P5 {floors['P5']:4.1f} × grep (goal {GOALS['P5'][1]} {GOALS['P5'][2]:g}), "
            f"P5b {floors['P5b']:.1f} × grep (goal {GOALS['P5b'][1]} {GOALS['P5b'][2]:g})"]


def machine_description() -> str:
    """One line: CPU count, memory, kernel, accel, and the load when the run ended (shared machines)."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}, "
            f"accel {guest.accel()}, load {load}")


SAMPLES = ("libvirt managedsave", "libvirt restore (start)", "libvirt sparse-p2 save", "libvirt sparse-p2 restore",
           "libvirt sparse-p2 --bypass-cache save", "libvirt zstd save", "libvirt zstd restore",
           "libvirt zstd --bypass-cache save",
           "P4 untraced managedsave", "P4 traced managedsave", "P4 tracing overhead outside libvirt's call",
           "direct save (mapped-ram+multifd)", "direct restore to running", "direct zstd save",
           "direct zstd restore to running", *bulkbench.KEYS)
RATES = ("direct save rate", "direct restore read rate", "write limit O_DIRECT", "write limit buffered+fsync",
         "read limit O_DIRECT (cold)", "read limit buffered (cold)")
SIZES = ("libvirt zstd image size", "direct zstd image size")


def _libvirt_rounds(cfg: Config, lv: LibvirtBackend, name: str, work: Path, s: dict[str, Samples]) -> None:
    """libvirt's managed save + start, its sparse saves with and without --bypass-cache, its zstd save."""
    sparse_img, zstd_img = str(work / "libvirt-sparse.img"), str(work / "libvirt-zstd.img")
    sparse = SaveOptions(image_format="sparse", parallel_channels=cfg.channels)
    channels = SaveOptions(parallel_channels=cfg.channels)
    # libvirt's fastest save may be the O_DIRECT one: measure it too, compare with the faster.
    bypass = dataclasses.replace(sparse, bypass_cache=True)
    zbypass = SaveOptions(image_format="zstd", bypass_cache=True)
    for r in range(cfg.repeats):
        cfg.log(f"[{r + 1}/{cfg.repeats}] libvirt managedsave / start")
        s["libvirt managedsave"].values.append(_timed(lambda: lv.managed_save(name))[0])
        s["libvirt restore (start)"].values.append(_timed(lambda: lv.start(name), cold=True)[0])
        cfg.log(f"[{r + 1}/{cfg.repeats}] libvirt save --image-format sparse --parallel-channels {cfg.channels}")
        s["libvirt sparse-p2 save"].values.append(_timed(lambda: lv.save(name, sparse_img, sparse))[0])
        s["libvirt sparse-p2 restore"].values.append(_timed(lambda: lv.restore(sparse_img, channels), cold=True)[0])
        os.unlink(sparse_img)
        s["libvirt sparse-p2 --bypass-cache save"].values.append(_timed(lambda: lv.save(name, sparse_img, bypass))[0])
        lv.restore(sparse_img, channels)
        os.unlink(sparse_img)
        cfg.log(f"[{r + 1}/{cfg.repeats}] libvirt save --image-format zstd / restore")
        s["libvirt zstd save"].values.append(_timed(lambda: lv.save(name, zstd_img,
                                                                    SaveOptions(image_format="zstd")))[0])
        s["libvirt zstd image size"].values.append(os.stat(zstd_img).st_size)
        s["libvirt zstd restore"].values.append(_timed(lambda: lv.restore(zstd_img), cold=True)[0])
        os.unlink(zstd_img)
        # Context for P8 (the direct zstd save writes with O_DIRECT): libvirt's own O_DIRECT variant.
        s["libvirt zstd --bypass-cache save"].values.append(_timed(lambda: lv.save(name, zstd_img, zbypass))[0])
        lv.restore(zstd_img)
        os.unlink(zstd_img)


def _p4_rounds(cfg: Config, lv: LibvirtBackend, name: str, s: dict[str, Samples]) -> None:
    """P4 in ABBA order (untraced/traced, then traced/untraced): libvirt's save time drifts and
    jumps in 200 ms steps (its SIGTERM polling), so pairs must alternate to compare fairly."""
    pairs = max(6, cfg.repeats)
    for i in range(pairs):
        cfg.log(f"[P4 {i + 1}/{pairs}] managed save untraced and traced (virtsave trace --op managed-save)")
        for traced in ((False, True) if i % 2 == 0 else (True, False)):
            if traced:
                t, trace_out = _timed(lambda: capture.trace_domain(lv.conn, name, op="managed-save"))
                s["P4 traced managedsave"].values.append(t)
                inside = trace_out["phases"][0].get("seconds") or 0.0
                s["P4 tracing overhead outside libvirt's call"].values.append(t - inside)
            else:
                s["P4 untraced managedsave"].values.append(_timed(lambda: lv.managed_save(name))[0])
            lv.start(name)


def _direct_rounds(cfg: Config, dq: DirectBackend, xml: str, work: Path, s: dict[str, Samples],
                   zstd: bool = True) -> dict[str, Any]:
    """The direct path: mapped-ram + multifd with O_DIRECT, restore to running reading with O_DIRECT;
    then (*zstd*) a zstd save and its restore. Returns the last sparse image's header."""
    log = cfg.log
    log("direct: launching QEMU from the domain's own command line")
    _wait_filled(dq.launch().serial_log or work / "direct-serial.log")
    img, zimg = str(work / "direct.img"), str(work / "direct-zstd.img")
    save = SaveOptions(image_format="sparse", parallel_channels=cfg.channels, bypass_cache=True, xml=xml)
    load = SaveOptions(parallel_channels=cfg.channels, bypass_cache=True)
    header: dict[str, Any] = {}
    for r in range(cfg.repeats):
        log(f"[{r + 1}/{cfg.repeats}] direct save (mapped-ram, {cfg.channels} channels, O_DIRECT) / restore")
        target = dq.target
        t, _ = _timed(lambda: dq.save(target, img, save))  # noqa: B023 - called now
        s["direct save (mapped-ram+multifd)"].values.append(t)
        size = _allocated(img)
        s["direct save rate"].values.append(benchlimits.rate(size, t))
        header = dict(saveimage.read_header_path(img).to_dict())
        dq.close()  # collect the QEMU that quit, outside the timings
        t, _ = _timed(lambda: dq.restore(img, load), cold=True)
        s["direct restore to running"].values.append(t)
        s["direct restore read rate"].values.append(benchlimits.rate(size, t))
        os.unlink(img)
        if not zstd:
            continue
        log(f"[{r + 1}/{cfg.repeats}] direct save --image-format zstd --bypass-cache "
            f"(zstd {migration.zstd_threads()}, dd O_DIRECT) / restore")
        target = dq.target
        zsave = SaveOptions(image_format="zstd", bypass_cache=True, xml=xml)
        s["direct zstd save"].values.append(_timed(lambda: dq.save(target, zimg, zsave))[0])  # noqa: B023
        s["direct zstd image size"].values.append(os.stat(zimg).st_size)
        dq.close()
        s["direct zstd restore to running"].values.append(_timed(lambda: dq.restore(zimg), cold=True)[0])
        os.unlink(zimg)
    return header


def _limits(cfg: Config, work: Path, s: dict[str, Samples]) -> dict[str, Any]:
    """The disk's write and cold read limits into the image directory (nothing else of ours running)."""
    size = max(256, min(2048, cfg.fill_mib))
    write, read = benchlimits.measure_limits(work, size, cfg.repeats, log=cfg.log)
    s["write limit O_DIRECT"].values.extend(write.rates.get("O_DIRECT", []))
    s["write limit buffered+fsync"].values.extend(write.rates.get("buffered+fsync", []))
    s["read limit O_DIRECT (cold)"].values.extend(read.rates.get("O_DIRECT", []))
    s["read limit buffered (cold)"].values.extend(read.rates.get("buffered", []))
    return {"write": {"method": write.best[0], "bytes_per_s": write.value, "dd_mib": size},
            "read": {"method": read.best[0], "bytes_per_s": read.value, "dd_mib": size}}


def _parser(cfg: Config, work: Path, s: dict[str, Samples]) -> None:
    """P5: the log parser on a generated log, against ``grep -c`` on it (nothing else running)."""
    cfg.log(f"log parser on a generated {cfg.parse_log_mb} MB libvirtd log, against grep -c on it")
    measure_parser(work / "big.log", cfg.parse_log_mb, cfg.repeats, s)


def _bulk(cfg: Config, s: dict[str, Samples]) -> None:
    """P7/P7b on a private daemon (libvirt-guests.sh acts on every guest of its URIs)."""
    b = cfg.bulk
    cfg.log(f"bulk: {b.guests} guests on a private libvirtd; virtsave --parallel {b.parallel} "
            "against libvirt-guests.sh (ON_SHUTDOWN=suspend)")
    res = bulkbench.run(b, cfg.workdir)
    for k, v in res["samples"].items():
        s[k].values.extend(v)


def figures(s: dict[str, Samples], limits: dict[str, Any]) -> list[Figure]:
    """The figures from the samples (NaN where something was not measured)."""
    def med(k: str) -> float:
        return s[k].median

    def ratio(a: str, b: str) -> float:
        return med(a) / med(b)

    write, read = limits["write"]["bytes_per_s"], limits["read"]["bytes_per_s"]
    size_ratio = ratio("direct zstd image size", "libvirt zstd image size")
    pairs = list(zip(s["P4 traced managedsave"].values, s["P4 untraced managedsave"].values, strict=True))
    values = {
        "P1": ratio("direct save (mapped-ram+multifd)", "libvirt managedsave"),
        "P1b": med("direct save (mapped-ram+multifd)") / min(med("libvirt sparse-p2 save"),
                                                            med("libvirt sparse-p2 --bypass-cache save")),
        "P2": med("direct save rate") / write,
        "P3": ratio("direct restore to running", "libvirt restore (start)"),
        "P3b": med("direct restore read rate") / read,
        # Median of per-pair ratios: each ABBA pair ran back to back, so host drift cancels out.
        "P4": statistics.median(t / u for t, u in pairs) if pairs else float("nan"),
        "P4b": med("P4 tracing overhead outside libvirt's call"),
        **parser_ratios(s),
        "P7": ratio("virtsave managed-save --all", "libvirt-guests stop"),
        "P7b": ratio("virtsave start --all", "libvirt-guests start"),
        "P8": ratio("direct zstd save", "libvirt zstd save"),
        "P8b": abs(size_ratio - 1),
    }
    return [Figure(k, GOALS[k][0], v, GOALS[k][1], GOALS[k][2]) for k, v in values.items()]


def _operations(s: dict[str, Samples]) -> list[OpPair]:
    """Seconds per operation on both paths, for the side-by-side plot."""
    return [OpPair("save", s["libvirt managedsave"].median, s["direct save (mapped-ram+multifd)"].median),
            OpPair("restore", s["libvirt restore (start)"].median, s["direct restore to running"].median),
            OpPair("zstd save", s["libvirt zstd save"].median, s["direct zstd save"].median),
            OpPair("zstd restore", s["libvirt zstd restore"].median, s["direct zstd restore to running"].median),
            OpPair("bulk save ×4", s["libvirt-guests stop"].median, s["virtsave managed-save --all"].median),
            OpPair("bulk start ×4", s["libvirt-guests start"].median, s["virtsave start --all"].median)]


def _new_samples() -> dict[str, Samples]:
    return ({k: Samples(k) for k in SAMPLES} | {k: Samples(k, unit="B/s") for k in RATES}
            | {k: Samples(k, unit="B") for k in SIZES} | parser_samples())


def _on_both_paths(cfg: Config, lv: LibvirtBackend, name: str, work: Path, s: dict[str, Samples]) -> dict[str, Any]:
    """Boot the guest, run libvirt's rounds, P4, then the direct path; the direct image's header."""
    cfg.log(f"booting {name}: {cfg.ram_mib} MiB RAM, filling {cfg.fill_mib} MiB (TCG fill takes a while)")
    guest.create(lv.conn, name, memory_mib=cfg.ram_mib, fill_mib=cfg.fill_mib)
    _wait_filled(guest.serial_log(name))
    xml = lv.conn.lookupByName(name).XMLDesc(0)
    argv = domainlog.argv_from_domain_log(f"/var/log/libvirt/qemu/{name}.log")
    _libvirt_rounds(cfg, lv, name, work, s)
    _p4_rounds(cfg, lv, name, s)
    # The direct path needs the libvirt guest's CPU out of the way: save it while we measure.
    lv.managed_save(name)
    with DirectBackend(argv, serial_log=work / "direct-serial.log") as dq:
        return _direct_rounds(cfg, dq, xml, work, s)


def run(cfg: Config) -> Result:
    """Run every measurement and write the report into ``cfg.outdir``.

    Both paths go through the same :class:`~virtsave.core.operation.Backend` interface:
    libvirt's (:class:`~virtsave.libvirtd.backend.LibvirtBackend`) and the direct one
    (:class:`~virtsave.qemu.backend.DirectBackend`), with the same :class:`SaveOptions`.
    """
    lv = LibvirtBackend.connect(cfg.uri)
    vers = host.versions(lv.conn)
    work = Path(tempfile.mkdtemp(prefix="vs-bench-", dir=cfg.workdir))
    os.chmod(work, 0o755)
    name = guest.unique_name("vs-bench")
    s = _new_samples()
    try:
        header = _on_both_paths(cfg, lv, name, work, s)
        guest.remove(lv.conn, name)  # nothing of ours may compete for the CPU or disk from here on
        limits = _limits(cfg, work, s)
        _parser(cfg, work, s)
        _bulk(cfg, s)
    finally:
        guest.remove(lv.conn, name)
        shutil.rmtree(work, ignore_errors=True)
        lv.close()

    figs = figures(s, limits)
    samples = list(s.values())
    machine = machine_description()
    floors = parser_floors(s)
    notes = floor_notes(floors)
    meta = {"machine": machine, "preset": cfg.preset, "ram_mib": cfg.ram_mib,
            "fill_mib": cfg.fill_mib, "repeats": cfg.repeats, "channels": cfg.channels,
            "libvirt": vers.libvirt, "qemu": vers.qemu, "direct_image_header": header, "limits": limits,
            "bulk": dataclasses.asdict(cfg.bulk), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "parser_floors": floors, "notes": notes}
    paths = write_results(cfg.outdir, figs, samples, meta, _operations(s))
    return Result(figs, samples, paths, render_table(figs, samples, machine, notes), meta)


def _scale_point(cfg: Config, lv: LibvirtBackend, ram: int, work: Path) -> list[dict[str, Any]]:
    """One guest size: libvirt managed save + start, direct save + restore, ``cfg.repeats`` each."""
    fill = scale_fill(ram)
    name = guest.unique_name("vs-scale")
    s = _new_samples()
    try:
        cfg.log(f"scale: {ram} MiB guest ({fill} MiB filled)")
        guest.create(lv.conn, name, memory_mib=ram, fill_mib=fill)
        _wait_filled(guest.serial_log(name))
        xml = lv.conn.lookupByName(name).XMLDesc(0)
        argv = domainlog.argv_from_domain_log(f"/var/log/libvirt/qemu/{name}.log")
        for r in range(cfg.repeats):
            cfg.log(f"[{r + 1}/{cfg.repeats}] {ram} MiB: libvirt managedsave / start")
            s["libvirt managedsave"].values.append(_timed(lambda: lv.managed_save(name))[0])
            s["libvirt restore (start)"].values.append(_timed(lambda: lv.start(name), cold=True)[0])
        lv.managed_save(name)
        with DirectBackend(argv, serial_log=work / f"scale-{ram}.log") as dq:
            _direct_rounds(dataclasses.replace(cfg, fill_mib=fill), dq, xml, work, s, zstd=False)
    finally:
        guest.remove(lv.conn, name)
    rows = (("libvirt", "save", "libvirt managedsave"), ("libvirt", "restore", "libvirt restore (start)"),
            ("direct", "save", "direct save (mapped-ram+multifd)"), ("direct", "restore", "direct restore to running"))
    return [{"ram_mib": ram, "fill_mib": fill, "path": p, "operation": op, "values": s[k].values}
            for p, op, k in rows]


def run_scale(cfg: Config) -> dict[str, Path]:
    """``--scale``: seconds of save and restore on both paths against guest size; JSON and plot."""
    lv = LibvirtBackend.connect(cfg.uri)
    vers = host.versions(lv.conn)
    work = Path(tempfile.mkdtemp(prefix="vs-scale-", dir=cfg.workdir))
    os.chmod(work, 0o755)
    points: list[dict[str, Any]] = []
    try:
        for ram in cfg.scale_sizes:
            points.extend(_scale_point(cfg, lv, ram, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        lv.close()
    meta = {"machine": machine_description(), "repeats": cfg.repeats, "channels": cfg.channels,
            "libvirt": vers.libvirt, "qemu": vers.qemu, "sizes_mib": list(cfg.scale_sizes),
            "fill": "3/4 of RAM, at most RAM - 128 MiB", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return write_scale(cfg.outdir, points, meta)
