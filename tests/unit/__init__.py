"""Unit tests (no daemon, no QEMU machine); a package so that its conftest does not shadow tests/conftest.py."""
