"""Benchmark figures: repeated samples, medians, spread, goals, and the report.

A :class:`Figure` is one ratio with its goal (``<=`` or ``>=``). The report is a table for the
terminal, a JSON file and a PNG (matplotlib, optional): the goal margins beside the seconds of each
operation on both paths (:class:`OpPair`). ``scripts/bench --scale`` writes its own JSON and a plot
of seconds against guest size (:func:`write_scale`).

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
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Figure", "OpPair", "Samples", "margin", "render_table", "write_results", "write_scale"]

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


def render_table(figures: list[Figure], samples: list[Samples], machine: str, notes: Iterable[str] = ()) -> str:
    """Plain-text table (also pasted into the README); *notes*: lines printed under the figures.

    >>> lines = render_table([Figure("P9", "x ÷ y", 0.5, "<=", 1.0)], [], "m", ["a note"]).splitlines()
    >>> lines[4].split()[-1], lines[5:7]
    ('pass', ['', 'a note'])
    """
    lines = [f"machine: {machine}", "",
             f"{'':4} {'figure':58} {'value':>8} {'goal':>9}  result",
             f"{'':4} {'-' * 58} {'-' * 8} {'-' * 9}  ------"]
    for f in figures:
        mark = "pass" if f.passed else "MISS"
        lines.append(f"{f.key:4} {f.title[:58]:58} {f.value:8.3f} {f.op + ' ' + format(f.goal, 'g'):>9}  {mark}")
    notes = list(notes)
    if notes:
        lines += ["", *notes]
    lines += ["", f"{'samples':44} {'median':>10} {'spread':>10}  n"]
    for s in samples:
        if s.unit == "B/s":
            lines.append(f"{s.name[:44]:44} {s.median / 1e6:8.1f}MB/s {s.spread / 1e6:8.1f}MB/s  {len(s.values)}")
        elif s.unit == "B":
            lines.append(f"{s.name[:44]:44} {s.median / 1e6:8.1f}MB   {s.spread / 1e6:8.1f}MB    {len(s.values)}")
        else:
            lines.append(f"{s.name[:44]:44} {s.median:9.3f}s {s.spread:9.3f}s  {len(s.values)}")
    return "\n".join(lines)


#: The goal-margin axis shows margins between these (log scale).
MARGIN_CLIP = (0.1, 10.0)


@dataclass
class OpPair:
    """One operation's median seconds on libvirt's path and on virtsave's (NaN: not measured)."""

    operation: str
    libvirt: float
    direct: float


def write_results(outdir: str | os.PathLike[str], figures: list[Figure], samples: list[Samples],
                  meta: dict[str, Any], ops: list[OpPair] | None = None) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.txt`` and (when matplotlib is there) ``bench.png``."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    table = render_table(figures, samples, meta.get("machine", "?"), meta.get("notes", ()))
    paths = {"json": out / "bench.json", "txt": out / "bench.txt", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "figures": [f.to_dict() for f in figures],
                                         "samples": [s.to_dict() for s in samples],
                                         "operations": [asdict(o) for o in ops or []]}, indent=1) + "\n")
    paths["txt"].write_text(table + "\n")
    plt = _pyplot()
    if plt is None:
        paths.pop("png")
        return paths
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 2]})
    _goal_margins(ax, figures)
    _seconds_side_by_side(ax2, ops or [])
    fig.suptitle(f"virtsave bench — {meta.get('preset', '')} {meta.get('machine', '')}"[:110], fontsize=9)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return paths


def margin(f: Figure) -> float:
    """How far *f* is from its goal on one axis for ``<=`` and ``>=``: > 1 met, 1 at the goal.

    >>> margin(Figure("P1", "", 0.33, "<=", 0.66)), margin(Figure("P2", "", 0.45, ">=", 0.9))
    (2.0, 0.5)
    """
    if f.value != f.value or not f.value:
        return 0.0
    return f.goal / f.value if f.op == "<=" else f.value / f.goal


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _goal_margins(ax: Any, figures: list[Figure]) -> None:
    # Log scale, clipped: a figure 80× inside its goal must not flatten the ones near 1.
    scores = [min(max(margin(f), MARGIN_CLIP[0]), MARGIN_CLIP[1]) for f in figures]
    ax.bar([f.key for f in figures], scores, color=["tab:green" if f.passed else "tab:red" for f in figures])
    ax.set_yscale("log")
    ax.set_ylim(MARGIN_CLIP[0], MARGIN_CLIP[1] * 3)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    for i, f in enumerate(figures):
        ax.text(i, scores[i], f"{f.value:.3g}\n({f.op}{f.goal:g})", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel(f"goal margin (>1 = met; log, clipped to {MARGIN_CLIP[1]:g})")
    ax.set_title("figures against their goals", fontsize=9)


def _seconds_side_by_side(ax: Any, ops: list[OpPair]) -> None:
    width = 0.38
    xs = range(len(ops))
    lib = [o.libvirt for o in ops]
    dq = [o.direct for o in ops]
    ax.bar([x - width / 2 for x in xs], lib, width, label="libvirt", color="tab:blue")
    ax.bar([x + width / 2 for x in xs], dq, width, label="virtsave / direct", color="tab:orange")
    for x, (a, b) in enumerate(zip(lib, dq, strict=True)):
        for dx, v in ((-width / 2, a), (width / 2, b)):
            if v == v:
                ax.text(x + dx, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [o.operation for o in ops], fontsize=7, rotation=15)
    ax.set_ylabel("seconds (median)")
    ax.set_title("per operation, libvirt and virtsave side by side", fontsize=9)
    ax.legend(fontsize=7)


#: The lines of the scale plot: (path, operation) → label.
SCALE_LINES = {("libvirt", "save"): "libvirt managed save", ("libvirt", "restore"): "libvirt start (restore)",
               ("direct", "save"): "direct save", ("direct", "restore"): "direct restore to running"}


def write_scale(outdir: str | os.PathLike[str], points: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Path]:
    """``bench-scale.json`` and ``bench-scale.png``: seconds against guest size, one line per path and
    operation. *points*: ``{"ram_mib", "fill_mib", "path", "operation", "values"}`` each."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench-scale.json", "png": out / "bench-scale.png"}
    for p in points:
        p["median"] = statistics.median(p["values"]) if p["values"] else float("nan")
    paths["json"].write_text(json.dumps({"meta": meta, "points": points}, indent=1) + "\n")
    plt = _pyplot()
    if plt is None:
        paths.pop("png")
        return paths
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (path, op), label in SCALE_LINES.items():
        line = sorted((p["ram_mib"], p["median"]) for p in points if p["path"] == path and p["operation"] == op)
        if line:
            ax.plot([x / 1024 for x, _ in line], [y for _, y in line], marker="o",
                    linestyle="-" if op == "save" else "--", color="tab:blue" if path == "libvirt" else "tab:orange",
                    label=label)
    ax.set_xlabel("guest RAM (GiB); 3/4 of it filled with random data, at most RAM − 128 MiB")
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"virtsave bench --scale — {meta.get('machine', '')}"[:120], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return paths
