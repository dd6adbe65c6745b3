"""The QEMU command line libvirt would run for a domain XML (``virsh domxml-to-native qemu-argv``).

Used where a save image carries only its domain XML: libvirt turns it into the exact command line
(devices, addresses, machine options) whose migration stream the image holds. Nothing is started
and no domain is defined. The daemon answers for *its* QEMU; a machine type that QEMU lacks makes
libvirt refuse, and the caller then falls back to a minimal command line of its own.

Example (needs a running libvirtd)::

    from virtsave.libvirtd import native
    argv = native.argv_from_xml(open("vm1.xml").read())   # ['/usr/bin/qemu-system-x86_64', '-name', …]
"""

from __future__ import annotations

import re
import shlex

import libvirt

from virtsave.core.errors import ConnectionFailed, OperationFailed
from virtsave.libvirtd import reference

__all__ = ["argv_from_xml", "split_native"]

_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def split_native(text: str) -> list[str]:
    """libvirt's shell-quoted ``qemu-argv`` text → argv (the leading ``VAR=value`` words dropped).

    >>> split_native("LC_ALL=C PATH=/bin /usr/bin/qemu-system-x86_64 -name guest=a -append 'a b'")
    ['/usr/bin/qemu-system-x86_64', '-name', 'guest=a', '-append', 'a b']
    """
    words = shlex.split(text)
    while words and _ENV.match(words[0]):
        words.pop(0)
    return words


def argv_from_xml(xml: str, uri: str | None = None) -> list[str]:
    """libvirt's QEMU command line for *xml*; :class:`OperationFailed` with libvirt's reason when
    it cannot make one, :class:`ConnectionFailed` when no daemon answers."""
    conn = reference.connect(uri)
    try:
        text = conn.domainXMLToNative("qemu-argv", xml, 0)
    except libvirt.libvirtError as exc:
        msg = (exc.get_error_message() or str(exc)).splitlines()[0]
        raise OperationFailed(f"libvirt cannot make a command line for this domain XML: {msg}") from None
    finally:
        conn.close()
    argv = split_native(text or "")
    if not argv:
        raise ConnectionFailed("libvirt returned an empty command line")
    return argv
