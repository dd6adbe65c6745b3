"""The benchmark's figures and report files (the measurements themselves run in scripts/bench)."""

from __future__ import annotations

import json
import math

from virtsave.harness.benchreport import Figure, OpPair, Samples, margin, render_table, write_results, write_scale


def test_figure_goals():
    assert Figure("P1", "x", 0.5, "<=", 0.66).passed
    assert not Figure("P1", "x", 0.7, "<=", 0.66).passed
    assert Figure("P5", "x", 120, ">=", 100).passed
    assert not Figure("P5", "x", 99.9, ">=", 100).passed
    assert not Figure("P3", "x", math.nan, "<=", 0.5).passed


def test_samples_median_spread():
    s = Samples("a", [3.0, 1.0, 2.0, 10.0])
    assert s.median == 2.5
    assert s.spread == 9.0
    assert math.isnan(Samples("empty").median)


def test_report_files(tmp_path):
    figs = [Figure("P1", "direct ÷ libvirt", 0.2, "<=", 0.66), Figure("P4", "traced ÷ untraced", 1.2, "<=", 1.05)]
    samples = [Samples("save", [1.0, 1.2]), Samples("rate", [1e9, 1.1e9], unit="B/s")]
    paths = write_results(tmp_path, figs, samples, {"machine": "test", "preset": "quick"})
    data = json.loads(paths["json"].read_text())
    assert [f["passed"] for f in data["figures"]] == [True, False]
    table = render_table(figs, samples, "test")
    assert "pass" in table and "MISS" in table and "1050.0MB/s" in table
    assert paths["png"].stat().st_size > 1000 and paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_report_plots_operations_side_by_side(tmp_path):
    figs = [Figure("P7", "bulk", 0.3, "<=", 0.6), Figure("P2", "rate", 0.45, ">=", 0.9)]
    ops = [OpPair("save", 5.0, 1.0), OpPair("bulk start ×4", 7.0, float("nan"))]
    samples = [Samples("zstd image", [1e9, 1.1e9], unit="B")]
    paths = write_results(tmp_path, figs, samples, {"machine": "m"}, ops)
    data = json.loads(paths["json"].read_text())
    assert data["operations"][0] == {"operation": "save", "libvirt": 5.0, "direct": 1.0}
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "1050.0MB " in paths["txt"].read_text()
    assert [margin(f) for f in figs] == [2.0, 0.5]


def test_scale_report_has_one_line_per_path_and_operation(tmp_path):
    points = [{"ram_mib": ram, "fill_mib": ram * 3 // 4, "path": p, "operation": op, "values": [ram / 512, ram / 400]}
              for ram in (256, 1024) for p in ("libvirt", "direct") for op in ("save", "restore")]
    paths = write_scale(tmp_path, points, {"machine": "m"})
    data = json.loads(paths["json"].read_text())
    assert len(data["points"]) == 8 and data["points"][0]["median"] == (0.5 + 0.64) / 2
    assert paths["png"].stat().st_size > 1000
