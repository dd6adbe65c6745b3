"""A live progress bar on stderr, fed by libvirt job stats.

:func:`job_progress` returns a context manager yielding a callable for the
``progress=`` argument of :mod:`virtsave.libvirtd.reference`; it draws one bar per domain
(bytes done/total, rate, ETA). It is a no-op when stderr is not a terminal or with
``--json`` (``OPTIONS.progress``), so scripted use never sees control characters.

Example::

    >>> with job_progress("save", enabled=False) as cb:
    ...     cb({"domain": "vm1", "operation": "save", "data_processed": 1, "data_total": 2})
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

Callback = Callable[[dict[str, Any]], None]


def _done_total(stats: dict[str, Any]) -> tuple[int | None, int | None]:
    """Bytes processed and expected, from the richest fields the job offers."""
    total = stats.get("data_total") or stats.get("memory_total")
    done = stats.get("data_processed")
    if done is None:
        done = stats.get("memory_processed")
    if total and done is None and stats.get("data_remaining") is not None:
        done = total - stats["data_remaining"]
    return done, total


@contextlib.contextmanager
def job_progress(label: str, enabled: bool | None = None) -> Iterator[Callback]:
    """A callback drawing per-domain bars while the ``with`` block runs.

    *enabled* defaults to ``OPTIONS.progress`` (terminal and not ``--json``).
    """
    if enabled is None:
        from .common import OPTIONS

        enabled = OPTIONS.progress
    if not enabled:
        yield lambda _stats: None
        return
    from .common import err_console

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
    tasks: dict[str, TaskID] = {}
    lock = threading.Lock()  # several bulk workers report at once

    def update(stats: dict[str, Any]) -> None:
        dom = str(stats.get("domain", "?"))
        with lock:
            if dom not in tasks:
                tasks[dom] = bar.add_task(f"{label} {dom}", total=None)
            task = tasks[dom]
            if stats.get("done"):
                t = bar.tasks[[x.id for x in bar.tasks].index(task)]
                if t.total:
                    bar.update(task, completed=t.total)
                return
            done, total = _done_total(stats)
            bar.update(task, completed=done or 0, total=total or None)

    with bar:
        yield update
