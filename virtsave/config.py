"""Where virtsave finds its configuration (``conf/``) and the built guest.

Example::

    >>> conf_path("normalize.json").name
    'normalize.json'
"""

from __future__ import annotations

import os
from pathlib import Path

GUEST_DIR = Path(os.environ.get("VIRTSAVE_GUEST_DIR", "/var/lib/virtsave/guest"))
STATE_DIR = Path(os.environ.get("VIRTSAVE_STATE_DIR", "/var/lib/virtsave"))


def conf_dir() -> Path:
    """``$VIRTSAVE_CONF_DIR``, else the repo's ``conf/`` next to the package."""
    env = os.environ.get("VIRTSAVE_CONF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "conf"


def conf_path(name: str) -> Path:
    """Path of a file in the configuration directory."""
    return conf_dir() / name
