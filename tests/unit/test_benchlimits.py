"""The bench's limit measurement (dd, parsed) and the figures computed from it; no daemon, no guest."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

from virtsave.core.errors import OperationFailed
from virtsave.harness import bench, benchcli, benchlimits
from virtsave.harness.benchlimits import Limit, parse_dd


def test_dd_summary_is_parsed_from_its_last_line() -> None:
    err = ("64+0 records in\n64+0 records out\n"
           "1073741824 bytes (1.1 GB, 1.0 GiB) copied, 1.23403 s, 870 MB/s\n")
    assert parse_dd(err) == (1073741824, 1.23403)
    assert parse_dd("1 bytes copied, 2e-05 s, 50 kB/s\n3 bytes (3 B) copied, 0.5 s, 6 B/s") == (3, 0.5)
    with pytest.raises(OperationFailed, match="no summary"):
        parse_dd("dd: failed to open 'x': Permission denied")


def test_the_limit_is_the_faster_methods_median() -> None:
    w = Limit("write", {"O_DIRECT": [9e8, 1.1e9, 1e9], "buffered+fsync": [2e8, 3e8, 2.5e8]})
    assert w.best == ("O_DIRECT", 1e9) and w.value == 1e9
    r = Limit("read", {"O_DIRECT": [5e8], "buffered": [7e8, 8e8]})  # buffered may win elsewhere
    assert r.best == ("buffered", 7.5e8)
    assert math.isnan(Limit("read").value)


def test_real_dd_into_a_directory_measures_and_cleans_up(tmp_path: Path) -> None:
    dropped = []
    try:
        write, read = benchlimits.measure_limits(tmp_path, 16, 2, drop_caches=lambda: dropped.append(1))
    except OperationFailed as exc:
        if "Invalid argument" in str(exc):  # O_DIRECT refused (tmpfs)
            pytest.skip(f"the test's temporary directory has no O_DIRECT: {exc}")
        raise
    assert sorted(write.rates) == ["O_DIRECT", "buffered+fsync"] and sorted(read.rates) == ["O_DIRECT", "buffered"]
    assert all(len(v) == 2 and all(x > 1e5 for x in v) for v in [*write.rates.values(), *read.rates.values()])
    assert len(dropped) == 4  # before each cold read
    assert list(tmp_path.iterdir()) == []
    assert not list(Path("/dev/shm").glob(f"vs-bench-src-{__import__('os').getpid()}"))


def test_dd_itself_prints_what_parse_dd_reads(tmp_path: Path) -> None:
    proc = subprocess.run(["dd", "if=/dev/zero", f"of={tmp_path / 'z'}", "bs=1M", "count=3"],
                          capture_output=True, text=True, check=True, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    assert parse_dd(proc.stderr)[0] == 3 * 1024 * 1024


def _samples(**medians: float) -> dict[str, bench.Samples]:
    s = bench._new_samples()
    for k, v in medians.items():
        s[k].values.append(v)
    return s


def test_figures_divide_by_the_measured_limits_and_peers() -> None:
    s = _samples(**{"direct save rate": 9.5e8, "direct restore read rate": 7.2e8,
                    "virtsave managed-save --all": 3.0, "libvirt-guests stop": 12.0,
                    "virtsave start --all": 4.0, "libvirt-guests start": 5.0,
                    "direct zstd save": 2.0, "libvirt zstd save": 5.0,
                    "direct zstd image size": 1.08e9, "libvirt zstd image size": 1.0e9,
                    "P4 tracing overhead outside libvirt's call": 0.03})
    limits = {"write": {"bytes_per_s": 1e9}, "read": {"bytes_per_s": 9e8}}
    f = {x.key: x for x in bench.figures(s, limits)}
    assert f["P2"].value == pytest.approx(0.95) and f["P2"].passed
    assert f["P3b"].value == pytest.approx(0.8) and f["P3b"].passed
    assert f["P7"].value == pytest.approx(0.25) and f["P7"].passed
    assert f["P7b"].value == pytest.approx(0.8) and not f["P7b"].passed
    assert f["P8"].value == pytest.approx(0.4) and f["P8"].passed
    assert f["P8b"].value == pytest.approx(0.08) and f["P8b"].passed
    assert f["P4b"].value == pytest.approx(0.03) and f["P4b"].passed
    assert math.isnan(f["P1"].value) and not f["P1"].passed  # not measured: never a pass
    assert [x.key for x in bench.figures(s, limits)] == list(bench.GOALS)


def test_image_smaller_than_libvirts_by_more_than_a_tenth_misses_too() -> None:
    s = _samples(**{"direct zstd image size": 0.85e9, "libvirt zstd image size": 1.0e9})
    f = {x.key: x for x in bench.figures(s, {"write": {"bytes_per_s": 1}, "read": {"bytes_per_s": 1}})}
    assert f["P8b"].value == pytest.approx(0.15) and not f["P8b"].passed


def test_cli_presets() -> None:
    cfg, scale = benchcli.config(["--quick", "--bulk-parallel", "2", "--out", "/x"])
    assert (cfg.ram_mib, cfg.fill_mib, cfg.repeats, cfg.preset, scale) == (512, 384, 2, "quick", False)
    assert (cfg.bulk.guests, cfg.bulk.ram_mib, cfg.bulk.parallel, cfg.bulk.repeats, cfg.outdir) == (4, 256, 2, 1, "/x")
    cfg, scale = benchcli.config(["--scale"])
    assert scale and cfg.scale_sizes == (256, 1024, 2048, 4096) and cfg.repeats == 2
    cfg, _ = benchcli.config([])
    assert (cfg.ram_mib, cfg.fill_mib, cfg.bulk.parallel, cfg.bulk.ram_mib, cfg.bulk.bypass_cache) == (
        2048, 1536, 4, 256, False)
    cfg, _ = benchcli.config(["--bulk-ram", "512", "--bulk-bypass-cache"])
    assert (cfg.bulk.ram_mib, cfg.bulk.fill_mib, cfg.bulk.bypass_cache) == (512, 128, True)
