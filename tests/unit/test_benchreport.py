"""The benchmark's figures and report files (the measurements themselves run in scripts/bench)."""

from __future__ import annotations

import json
import math

from virtsave.harness.benchreport import Figure, Samples, dd_write_rate, render_table, write_results


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


def test_dd_rate_measures_and_cleans(tmp_path):
    rate = dd_write_rate(tmp_path, 8)
    assert rate > 1e6
    assert list(tmp_path.iterdir()) == []
