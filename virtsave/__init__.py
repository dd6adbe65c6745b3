"""virtsave — libvirt/QEMU save and restore, traced, replayed and compared.

Layers, top to bottom (imports point down only; ``scripts/test`` checks it):

- ``virtsave.cli``       the ``virtsave`` command: parse, call, render
- ``virtsave.harness``   the test guest, demo and benchmark
- ``virtsave.libvirtd``  the libvirt side: reference save/restore, log capture and parsing
- ``virtsave.qemu``      the QEMU side: QMP session, launcher, safety check, direct backend, replay
- ``virtsave.image``     libvirt save-image header, QEMU stream reader, image diff
- ``virtsave.trace``     the trace model, schema, redaction, export, trace diff
- ``virtsave.core``      errors, private files, signals, paths

The version below is the only place it is written (``pyproject.toml`` reads it).

Example::

    >>> import virtsave
    >>> virtsave.__version__.count(".")
    2
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
