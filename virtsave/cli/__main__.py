"""``python -m virtsave.cli`` (what tests/conftest.py's ``cli`` fixture runs)."""

from . import main

main()
