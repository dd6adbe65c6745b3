"""P7 / P7b: virtsave's bulk managed save and start against libvirt's own ``libvirt-guests.sh``.

``libvirt-guests.sh stop`` with ``ON_SHUTDOWN=suspend`` managed-saves every running guest, one
after the other (``virsh managedsave`` in the background, polled once a second); ``start`` starts
them again (``virsh start`` each). virtsave's peers are ``managed-save --all --parallel N`` and
``start --all --parallel N``. Both act on **every** guest of the daemon, so the comparison runs on a
private libvirtd in a mount namespace of its own (:mod:`virtsave.harness.privdaemon`), on which
only the measured test guests exist — the shared daemon and its guests are out of reach.

:func:`run` (in the bench's process) starts this module's :func:`main` under ``unshare --mount
--propagation private`` and reads its JSON; whatever the child leaves running is killed by pid
afterwards. Each round times, in ABBA order, the script's stop + start and virtsave's, and checks
after every start that each guest's tick counter went on (memory survived) — not timed.

Example::

    res = run(BulkConfig(guests=4, ram_mib=256, fill_mib=64, repeats=2, parallel=4), workdir="/var/tmp")
    res["libvirt-guests stop"], res["virtsave managed-save --all"]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import libvirt

import virtsave
from virtsave.core.errors import OperationFailed, VirtsaveError
from virtsave.harness import guest
from virtsave.harness.privdaemon import PrivateDaemon, guests_config, kill_leftovers, mount_namespace, remove_base

__all__ = ["GUESTS_SCRIPT", "KEYS", "BulkConfig", "main", "run"]

GUESTS_SCRIPT = "/usr/lib/libvirt/libvirt-guests.sh"
URI = "qemu:///system"  # inside the namespace: the private daemon
PREFIX = "vs-bulk-"
KEYS = ("libvirt-guests stop", "libvirt-guests start", "virtsave managed-save --all", "virtsave start --all")


@dataclass
class BulkConfig:
    """How many guests, how big, how many rounds, and virtsave's ``--parallel``.

    The default guests are the test guest's defaults (256 MiB, 64 MiB filled). *parallel* 4 = all
    at once: a managed save is partly waiting (libvirt's 200 ms polls while QEMU is killed, the
    client's round trips), which overlaps; the copying is bound by the disk either way (measured
    with 4 × 512 MiB: N=2 and N=4 saved alike, N=4 started faster, N=1 was slowest).
    """

    guests: int = 4
    ram_mib: int = 256
    fill_mib: int = 64
    repeats: int = 2
    parallel: int = 4
    #: Both sides alike: libvirt-guests' BYPASS_CACHE=1 and virtsave's --bypass-cache (O_DIRECT images).
    bypass_cache: bool = False


def _timed(argv: list[str], env: dict[str, str]) -> float:
    os.sync()
    time.sleep(0.3)
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip()[-400:]
        raise OperationFailed(f"{' '.join(argv)} exited {proc.returncode}: {why}")
    return seconds


def _all_state(conn: libvirt.virConnect, names: list[str], active: bool) -> None:
    for n in names:
        dom = conn.lookupByName(n)
        if bool(dom.isActive()) != active or (not active and not dom.hasManagedSaveImage(0)):
            raise OperationFailed(f"{n} is {'not ' if active else ''}running after the bulk operation")


def _survived(marks: list[guest.TickMark]) -> None:
    for m in marks:
        c = guest.wait_ticks_continue(m, timeout=60)
        if not c.survived:
            raise OperationFailed(f"{m.name}: memory did not survive the bulk save/start ({c})")


def _env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LIBVIRT_DEFAULT_URI"}
    # virtsave's own state (log-capture repair) must not touch the shared state directory.
    env["VIRTSAVE_STATE_DIR"] = str(state_dir)
    env["PYTHONPATH"] = str(Path(virtsave.__file__).resolve().parent.parent)
    env["LC_ALL"] = "C"
    return env


def _round(conn: libvirt.virConnect, names: list[str], cfg: BulkConfig, env: dict[str, str],
           script_first: bool, out: dict[str, list[float]], log: Callable[[str], None]) -> None:
    vs = [sys.executable, "-m", "virtsave.cli", "-c", URI]
    bypass = ["--bypass-cache"] if cfg.bypass_cache else []
    pairs = {"libvirt-guests": ([GUESTS_SCRIPT, "stop"], [GUESTS_SCRIPT, "start"]),
             "virtsave": ([*vs, "managed-save", "--all", "--parallel", str(cfg.parallel), *bypass],
                          [*vs, "start", "--all", "--parallel", str(cfg.parallel), *bypass])}
    order = ["libvirt-guests", "virtsave"] if script_first else ["virtsave", "libvirt-guests"]
    for who in order:
        stop, start = pairs[who]
        PrivateDaemon.only_domains(conn, names)  # the guard, before anything acts on "all guests"
        marks = [guest.tick_mark(n) for n in names]
        log(f"bulk: {who} stop/save of {len(names)} guests")
        out[f"{who} stop" if who == "libvirt-guests" else "virtsave managed-save --all"].append(_timed(stop, env))
        _all_state(conn, names, active=False)
        log(f"bulk: {who} start of {len(names)} guests")
        out[f"{who} start" if who == "libvirt-guests" else "virtsave start --all"].append(_timed(start, env))
        _all_state(conn, names, active=True)
        _survived(marks)


def measure(cfg: BulkConfig, base: Path, host_ns: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Inside the namespace: private daemon, guests, rounds; the samples per command."""
    out: dict[str, list[float]] = {k: [] for k in KEYS}
    with PrivateDaemon(base, host_ns, guests_conf=guests_config(bypass_cache=cfg.bypass_cache),
                       prefix=PREFIX) as daemon:
        conn = libvirt.open(URI)
        try:
            daemon.only_domains(conn, [])  # a fresh daemon: nothing of anyone's
            names = [guest.unique_name(PREFIX.rstrip("-")) for _ in range(cfg.guests)]
            log(f"bulk: booting {cfg.guests} guests of {cfg.ram_mib} MiB ({cfg.fill_mib} MiB filled) "
                "on a private libvirtd")
            for n in names:
                guest.create(conn, n, memory_mib=cfg.ram_mib, fill_mib=cfg.fill_mib)
            for n in names:
                _wait_filled(n)
            env = _env(base / "state")
            for r in range(cfg.repeats):
                _round(conn, names, cfg, env, script_first=r % 2 == 0, out=out, log=log)
        finally:
            conn.close()
    return {"config": asdict(cfg), "samples": out}


def _wait_filled(name: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while guest.last_tick(name) < 1:
        if time.monotonic() > deadline:
            raise OperationFailed(f"guest {name} did not finish filling memory within {timeout:.0f} s")
        time.sleep(0.2)


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m virtsave.harness.bulkbench --base DIR --out FILE …`` in a private namespace."""
    p = argparse.ArgumentParser(prog="bulkbench")
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--host-ns", required=True, help="the caller's mount namespace (must differ from ours)")
    for f in ("guests", "ram_mib", "fill_mib", "repeats", "parallel"):
        p.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(BulkConfig(), f))
    p.add_argument("--bypass-cache", action="store_true")
    a = p.parse_args(argv)
    cfg = BulkConfig(a.guests, a.ram_mib, a.fill_mib, a.repeats, a.parallel, a.bypass_cache)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # leave through the daemon's clean-up
        signal.signal(sig, _interrupted)
    try:
        result = measure(cfg, Path(a.base), a.host_ns, lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
    except (VirtsaveError, libvirt.libvirtError) as exc:
        print(f"bulkbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bulkbench: interrupted (private daemon and guests cleaned up)", file=sys.stderr)
        return 130
    Path(a.out).write_text(json.dumps(result) + "\n")
    return 0


def run(cfg: BulkConfig, workdir: str) -> dict[str, Any]:
    """Run the comparison in a private mount namespace; the samples (seconds per command)."""
    base = Path(tempfile.mkdtemp(prefix="vs-bulk-", dir=workdir))
    os.chmod(base, 0o755)
    out = base / "result.json"
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "virtsave.harness.bulkbench",
            "--base", str(base), "--out", str(out), "--host-ns", mount_namespace(),
            "--guests", str(cfg.guests), "--ram-mib", str(cfg.ram_mib), "--fill-mib", str(cfg.fill_mib),
            "--repeats", str(cfg.repeats), "--parallel", str(cfg.parallel),
            *(["--bypass-cache"] if cfg.bypass_cache else [])]
    try:
        proc = subprocess.Popen(argv, env=_env(base / "state"))
        try:
            rc = proc.wait()
        except BaseException:
            proc.terminate()  # the child cleans up its daemon and guests on SIGTERM
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        if rc != 0 or not out.exists():
            raise OperationFailed(f"the bulk comparison failed (exit {rc}; see above)")
        return json.loads(out.read_text())  # type: ignore[no-any-return]
    finally:
        kill_leftovers(base)  # whatever a killed child left: by pid, never by name
        remove_base(base)


if __name__ == "__main__":
    sys.exit(main())
