"""Hold termination signals while something must not be cut in half.

Used around changes of libvirtd's log settings and while libvirt cancels a job after
Ctrl-C: a second Ctrl-C (or SIGTERM/SIGHUP) is recorded, not acted on, and raised as
:class:`KeyboardInterrupt` when the block ends.

Example::

    >>> with deferred_signals() as got:
    ...     pass
    >>> got
    []
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP turned into an exception so ``finally`` blocks run."""


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM/SIGHUP while settings and the state file change; re-raise after.

    A signal arriving inside the block is recorded, not acted on; at the end of the block
    (if it ended normally) it becomes :class:`KeyboardInterrupt`. So a second Ctrl-C cannot cut
    a restore of the daemon's settings in half. Python runs signal handlers in the main thread
    only, so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    got: list[int] = []

    def hold(signum: int, _frame: Any) -> None:
        got.append(signum)

    old = {s: signal.signal(s, hold) for s in _HELD_SIGNALS}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
    if got:
        raise Terminated(f"signal {got[0]}") if got[0] != signal.SIGINT else KeyboardInterrupt()
