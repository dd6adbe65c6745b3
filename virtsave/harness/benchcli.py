"""``scripts/bench`` front end (argparse: it is a script, not part of the virtsave CLI)."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys

from virtsave.core.errors import VirtsaveError
from virtsave.harness import bench


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="512 MiB guest, 384 MiB filled, 2 repeats, 200 MB log; bulk: 1 round")
    p.add_argument("--scale", action="store_true",
                   help="save/restore guests of 256 MiB, 1, 2 and 4 GiB on both paths; plot seconds against size")
    p.add_argument("--ram", type=int, help="guest RAM in MiB (default 2048)")
    p.add_argument("--fill", type=int, help="MiB of guest RAM to fill (default 1536)")
    p.add_argument("--repeats", type=int, help="runs per measurement (default 3; --scale: 2)")
    p.add_argument("--channels", type=int, default=2, help="parallel channels for sparse saves (default 2)")
    p.add_argument("--bulk-parallel", type=int, help="virtsave's --parallel for P7/P7b (default 4)")
    p.add_argument("--bulk-ram", type=int, help="RAM of each of the 4 bulk guests in MiB (default 256; 1/4 filled)")
    p.add_argument("--bulk-bypass-cache", action="store_true",
                   help="P7/P7b with O_DIRECT images on both sides (BYPASS_CACHE=1, --bypass-cache)")
    p.add_argument("--out", default="results", help="results directory (default results/)")
    p.add_argument("--workdir", default="/var/tmp", help="where images are written (default /var/tmp)")
    return p


def config(argv: list[str] | None = None) -> tuple[bench.Config, bool]:
    """The bench configuration the arguments ask for, and whether it is a ``--scale`` run."""
    a = _parser().parse_args(argv)
    cfg = bench.Config(outdir=a.out, workdir=a.workdir, channels=a.channels)
    if a.quick:
        cfg.ram_mib, cfg.fill_mib, cfg.repeats, cfg.parse_log_mb, cfg.preset = 512, 384, 2, 200, "quick"
        cfg.bulk = dataclasses.replace(cfg.bulk, repeats=1)
        cfg.scale_sizes = bench.SCALE_SIZES[:2]
    if a.scale:
        cfg.preset, cfg.repeats = f"scale{'-quick' if a.quick else ''}", 2
    cfg.ram_mib = a.ram or cfg.ram_mib
    cfg.fill_mib = a.fill or cfg.fill_mib
    cfg.repeats = a.repeats or cfg.repeats
    if a.bulk_parallel:
        cfg.bulk = dataclasses.replace(cfg.bulk, parallel=a.bulk_parallel)
    if a.bulk_ram:
        cfg.bulk = dataclasses.replace(cfg.bulk, ram_mib=a.bulk_ram, fill_mib=a.bulk_ram // 4)
    if a.bulk_bypass_cache:
        cfg.bulk = dataclasses.replace(cfg.bulk, bypass_cache=True)
    cfg.log = lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)
    return cfg, a.scale


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    cfg, scale = config(argv)
    # Ctrl-C, and SIGTERM (or SIGINT to a background run, which starts ignoring it): clean up first.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        if scale:
            paths = bench.run_scale(cfg)
            print("written: " + ", ".join(str(p) for p in paths.values()))
            return 0
        result = bench.run(cfg)
    except VirtsaveError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted (guests and files cleaned up)", file=sys.stderr)
        return 130
    print(result.table)
    print("\nwritten: " + ", ".join(str(p) for p in result.paths.values()))
    return 0 if all(f.passed for f in result.figures) else 1


if __name__ == "__main__":
    sys.exit(main())
