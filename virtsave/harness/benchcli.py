"""``scripts/bench`` front end (argparse: it is a script, not part of the virtsave CLI)."""

from __future__ import annotations

import argparse
import sys

from virtsave.core.errors import VirtsaveError
from virtsave.harness import bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="512 MiB guest, 384 MiB filled, 2 repeats, 200 MB log")
    p.add_argument("--ram", type=int, help="guest RAM in MiB (default 2048)")
    p.add_argument("--fill", type=int, help="MiB of guest RAM to fill (default 1536)")
    p.add_argument("--repeats", type=int, help="runs per measurement (default 3)")
    p.add_argument("--channels", type=int, default=2, help="parallel channels for sparse saves (default 2)")
    p.add_argument("--out", default="results", help="results directory (default results/)")
    p.add_argument("--workdir", default="/var/tmp", help="where images are written (default /var/tmp)")
    a = p.parse_args(argv)
    cfg = bench.Config(outdir=a.out, workdir=a.workdir, channels=a.channels)
    if a.quick:
        cfg.ram_mib, cfg.fill_mib, cfg.repeats, cfg.parse_log_mb, cfg.preset = 512, 384, 2, 200, "quick"
    cfg.ram_mib = a.ram or cfg.ram_mib
    cfg.fill_mib = a.fill or cfg.fill_mib
    cfg.repeats = a.repeats or cfg.repeats
    cfg.log = lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)
    try:
        result = bench.run(cfg)
    except VirtsaveError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted (guest and files cleaned up)", file=sys.stderr)
        return 130
    print(result.table)
    print("\nwritten: " + ", ".join(str(p) for p in result.paths.values()))
    return 0 if all(f.passed for f in result.figures) else 1


if __name__ == "__main__":
    sys.exit(main())
