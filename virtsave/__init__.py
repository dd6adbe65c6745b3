"""virtsave — libvirt/QEMU save and restore, traced, replayed and compared.

Layers (transport / encoding / policy, as in libvirt):

- ``errors``        one exception root, :class:`~virtsave.core.errors.VirtsaveError`
- ``trace``         the trace model (JSON), schema, load/dump/validate
- ``logparse``      libvirtd debug log -> monitor messages (encoding)
- ``logcapture``    switch libvirtd's log filters on and off (policy)
- ``libvirt_path``  libvirt's own save/restore through libvirt-python
- ``qmp``/``qemu_launch``/``replay``  the direct-QMP backend
- ``saveimage``     libvirt save-image header and QEMU stream reader/writer
- ``diff``          trace and image comparison
"""

__version__ = "0.1.0"
