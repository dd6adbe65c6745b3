"""Benchmark figures: repeated samples, medians, spread, goals, and the report.

A :class:`Figure` is one ratio with its goal (``<=`` or ``>=``). The report is a
table for the terminal, a JSON file and a PNG bar chart (matplotlib, optional).

Example::

    >>> s = Samples("x", [1.0, 3.0, 2.0])
    >>> s.median, s.spread
    (2.0, 2.0)
    >>> f = Figure("P1", "direct ÷ libvirt", 0.5, "<=", 0.66)
    >>> f.passed
    True
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Samples:
    """Repeated measurements of one quantity (seconds or bytes/s)."""

    name: str
    values: list[float] = field(default_factory=list)
    unit: str = "s"

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def spread(self) -> float:
        """max - min: an honest, simple dispersion for a handful of runs."""
        return (max(self.values) - min(self.values)) if self.values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "values": self.values,
                "median": self.median, "spread": self.spread}


@dataclass
class Figure:
    """A ratio compared with its goal."""

    key: str
    title: str
    value: float
    op: str  # "<=" or ">="
    goal: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        if self.value != self.value:  # NaN: not measured
            return False
        return self.value <= self.goal if self.op == "<=" else self.value >= self.goal

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def dd_write_rate(directory: str | os.PathLike[str], size_mib: int = 1024) -> float:
    """Sequential write rate (bytes/s) of ``dd`` to *directory*, synced, file removed after."""
    path = Path(directory) / f".vs-dd-{os.getpid()}"
    try:
        t0 = time.monotonic()
        subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={size_mib}", "conv=fsync"],
                       check=True, capture_output=True)
        elapsed = time.monotonic() - t0
    finally:
        path.unlink(missing_ok=True)
    return size_mib * 1024 * 1024 / elapsed


def render_table(figures: list[Figure], samples: list[Samples], machine: str) -> str:
    """Plain-text table (also pasted into the README)."""
    lines = [f"machine: {machine}", "",
             f"{'':4} {'figure':58} {'value':>8} {'goal':>9}  result",
             f"{'':4} {'-' * 58} {'-' * 8} {'-' * 9}  ------"]
    for f in figures:
        mark = "pass" if f.passed else "MISS"
        lines.append(f"{f.key:4} {f.title[:58]:58} {f.value:8.3f} {f.op + ' ' + format(f.goal, 'g'):>9}  {mark}")
    lines += ["", f"{'samples':44} {'median':>10} {'spread':>10}  n"]
    for s in samples:
        if s.unit == "B/s":
            lines.append(f"{s.name[:44]:44} {s.median / 1e6:8.1f}MB/s {s.spread / 1e6:8.1f}MB/s  {len(s.values)}")
        else:
            lines.append(f"{s.name[:44]:44} {s.median:9.3f}s {s.spread:9.3f}s  {len(s.values)}")
    return "\n".join(lines)


def write_results(outdir: str | os.PathLike[str], figures: list[Figure], samples: list[Samples],
                  meta: dict[str, Any]) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.txt`` and (when matplotlib is there) ``bench.png``."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    table = render_table(figures, samples, meta.get("machine", "?"))
    paths = {"json": out / "bench.json", "txt": out / "bench.txt", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "figures": [f.to_dict() for f in figures],
                                         "samples": [s.to_dict() for s in samples]}, indent=1) + "\n")
    paths["txt"].write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        paths.pop("png")
        return paths
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [f"{f.key}" for f in figures]
    # Plot each figure as "fraction of goal" so <= and >= goals share one axis: 1.0 = exactly at goal.
    scores = [(f.goal / f.value if f.op == "<=" else f.value / f.goal) if f.value == f.value and f.value else 0
              for f in figures]
    ax.bar(names, scores, color=["tab:green" if f.passed else "tab:red" for f in figures])
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    for i, f in enumerate(figures):
        ax.text(i, scores[i], f"{f.value:.2f}\n({f.op}{f.goal:g})", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("goal margin (>1 = goal met)")
    ax.set_title(f"virtsave bench — {meta.get('preset', '')} {meta.get('machine', '')}"[:90], fontsize=9)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return paths
