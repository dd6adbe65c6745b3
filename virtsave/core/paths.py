"""Where virtsave keeps its state and finds the built test guest on this host.

Both can be moved with environment variables (tests give each run its own state directory).

Example::

    >>> STATE_DIR.is_absolute()
    True
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["GUEST_DIR", "STATE_DIR"]

GUEST_DIR = Path(os.environ.get("VIRTSAVE_GUEST_DIR", "/var/lib/virtsave/guest"))
STATE_DIR = Path(os.environ.get("VIRTSAVE_STATE_DIR", "/var/lib/virtsave"))
