"""Property-based fuzzing of every reader of untrusted input (issue 15, item 1), bounded budget.

Each test feeds one reader (see ``tests/fuzzing.py`` for the targets, seeds and mutations) and
checks the guarantee: a result or virtsave's one-line error (``VirtsaveError``), never another
exception, a hang past ``fuzzing.HANG_SECONDS`` or a peak-memory growth past ``fuzzing.MEMORY_MIB``.
The budget (``Target.examples``, derandomized: the same examples every run) keeps the whole module
at about two minutes on this machine kind; ``scripts/fuzz --minutes N`` explores at random for longer.

Every failure fuzzing found is fixed and kept here as an ``@example`` (regression), smallest first.
"""

from __future__ import annotations

import os
from typing import Any

import fuzzing as fz
from hypothesis import example, given, settings


def budget(name: str) -> settings:
    """The target's share of the bounded budget (``$VIRTSAVE_FUZZ_SCALE`` scales it, e.g. 0.1 while developing)."""
    scale = float(os.environ.get("VIRTSAVE_FUZZ_SCALE") or 1)
    return settings(settings.get_profile("virtsave-fuzz"), max_examples=max(1, int(fz.BY_NAME[name].examples * scale)))


def strategy(name: str) -> Any:
    return fz.BY_NAME[name].strategy


@budget("log-import")
@given(strategy("log-import"))
@example(fz.regression("log-deep-payload"))
@example(fz.regression("log-list-id"))
@example(fz.regression("log-event-data-list"))
@example(fz.regression("log-arguments-list"))
@example(fz.regression("log-time-backwards"))
@example(fz.regression("log-huge-numbers"))
def test_fuzz_libvirtd_log_import(inp: tuple[str, bytes]) -> None:
    fz.check_log_import(inp)


@budget("log-scan")
@given(strategy("log-scan"))
@example(fz.regression("log-deep-payload"))
@example(fz.regression("log-list-id"))
@example(fz.regression("log-event-data-list"))
@example(fz.regression("log-arguments-list"))
@example(fz.regression("log-time-backwards"))
@example(fz.regression("log-huge-numbers"))
def test_fuzz_libvirtd_log_scan(inp: tuple[str, bytes]) -> None:
    fz.check_log_scan(inp)


@budget("domain-log")
@given(strategy("domain-log"))
def test_fuzz_qemu_domain_log(inp: tuple[str, bytes]) -> None:
    fz.check_domain_log(inp)


@budget("trace-load")
@given(strategy("trace-load"))
@example(fz.regression("trace-huge-int"))
@example(fz.regression("trace-deep-nesting"))
def test_fuzz_trace_load(inp: tuple[str, bytes]) -> None:
    fz.check_trace_load(inp)


@budget("trace-replay-plan")
@given(strategy("trace-replay-plan"))
@example(fz.regression("trace-huge-int"))
@example(fz.regression("trace-deep-nesting"))
def test_fuzz_trace_replay_plan(inp: tuple[str, bytes]) -> None:
    fz.check_trace_replay_plan(inp)


@budget("trace-export")
@given(strategy("trace-export"))
@example(fz.regression("trace-huge-int"))
@example(fz.regression("trace-deep-nesting"))
def test_fuzz_trace_export(inp: tuple[str, bytes]) -> None:
    fz.check_trace_export(inp)


@budget("trace-diff")
@given(strategy("trace-diff"))
@example(fz.regression("trace-huge-int"))
@example(fz.regression("trace-deep-nesting"))
def test_fuzz_trace_diff(inp: tuple[str, bytes]) -> None:
    fz.check_trace_diff(inp)


@budget("image-inspect")
@given(strategy("image-inspect"))
@example(fz.regression("image-zero-page-size"))
def test_fuzz_image_inspect(inp: tuple[str, bytes]) -> None:
    fz.check_image_inspect(inp)


@budget("image-diff")
@given(strategy("image-diff"))
@example(fz.regression("image-zero-page-size"))
def test_fuzz_image_diff(inp: tuple[str, bytes]) -> None:
    fz.check_image_diff(inp)


def test_every_target_has_a_test() -> None:
    """A target added to tests/fuzzing.py without a test here would never run in the default command."""
    names = {n.removeprefix("test_fuzz_") for n in globals() if n.startswith("test_fuzz_")}
    assert len(names) == len(fz.TARGETS), (sorted(names), [t.name for t in fz.TARGETS])
