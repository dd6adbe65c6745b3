"""libvirt connection URIs read the way libvirt's remote driver reads them.

``driver[+transport]://[user@][host][:port]/path[?param=value&…]`` — ``qemu:///system`` and
``qemu+unix:///session`` are local; ``qemu+ssh://root@db1/system`` reaches the daemon on ``db1``
through the ``ssh`` program; ``qemu://host/system`` (no transport) is TLS. The query parameters the
remote driver takes for itself (``remote_driver.c`` ``doRemoteOpen``: ``name``, ``command``,
``socket``, ``keyfile``, ``no_verify``, ``no_tty``, ``known_hosts`` …) are kept in
:attr:`ConnURI.params`; a later one of the same name wins, as in libvirt.

virtsave uses this to run its own commands (``virt-admin``, reading the capture log) over the same
ssh that libvirt uses: same program, user, host, port, key and host-key checking.

Example::

    >>> u = parse("qemu+ssh://vstest@127.0.0.1:2222/session?keyfile=/k&no_verify=1")
    >>> u.transport, u.user, u.host, u.port, u.path, u.is_local
    ('ssh', 'vstest', '127.0.0.1', 2222, '/session', False)
    >>> u.flag("no_verify"), u.flag("no_tty"), u.remote_uri
    (True, False, 'qemu:///session')
    >>> parse("qemu:///system").is_local, parse("qemu://db1/system").transport
    (True, 'tls')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from virtsave.core.errors import UnsupportedError

__all__ = ["SSH_TRANSPORTS", "TRANSPORTS", "ConnURI", "parse"]

#: libvirt's transports (``remoteDriverTransport``).
TRANSPORTS = ("tls", "unix", "ssh", "libssh2", "ext", "tcp", "libssh")
#: Transports that reach the daemon through an ssh login on its host.
SSH_TRANSPORTS = ("ssh", "libssh", "libssh2")


@dataclass(frozen=True)
class ConnURI:
    """One libvirt connection URI, split as the remote driver does."""

    uri: str
    driver: str
    transport: str | None
    user: str | None
    host: str | None
    port: int | None
    path: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        """The daemon is on this machine, reached through its Unix socket."""
        return self.transport in (None, "unix") and not self.host

    @property
    def is_ssh(self) -> bool:
        """Reached through an ssh login on the daemon's host."""
        return self.transport in SSH_TRANSPORTS

    def flag(self, name: str) -> bool:
        """A boolean parameter (``no_verify=1``): libvirt reads it as an integer, non-zero is true."""
        value = self.params.get(name)
        if value is None:
            return False
        try:
            return int(value) != 0
        except ValueError:
            raise UnsupportedError(f"{self.uri}: parameter {name}={value!r} is not an integer") from None

    @property
    def remote_uri(self) -> str:
        """The URI the daemon's end opens: ``name=`` when given, else ``driver:///path``."""
        return self.params.get("name") or f"{self.driver}://{self.path}"

    @property
    def remote_path(self) -> str:
        """``/system`` or ``/session`` of :attr:`remote_uri`."""
        return urlsplit(self.remote_uri).path or "/system"

    @property
    def label(self) -> str:
        """A short name for messages and tables: ``user@host:port/path`` or the URI when local."""
        if self.is_local:
            return self.uri
        who = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{who}{self.host or 'localhost'}{port}{self.path}"


def parse(uri: str) -> ConnURI:
    """Split *uri*; :class:`UnsupportedError` for a URI libvirt would refuse too.

    >>> parse("qemu+ssh://h/system?command=/opt/ssh&command=/usr/bin/ssh").params["command"]
    '/usr/bin/ssh'
    >>> parse("qemu+ssh:///system").host is None
    True
    """
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise UnsupportedError(f"not a libvirt URI: {uri} ({exc})") from None
    if not parts.scheme:
        raise UnsupportedError(f"not a libvirt URI: {uri!r} (expected e.g. qemu:///system)")
    driver, plus, given = parts.scheme.partition("+")
    transport = given.lower() if plus else None
    if transport is not None and transport not in TRANSPORTS:
        raise UnsupportedError(f"{uri}: transport {transport!r} not recognised "
                               f"(should be {'|'.join(TRANSPORTS)})")
    host = parts.hostname or None
    if transport is None and host:
        transport = "tls"  # libvirt: a server without a transport means TLS
    if transport == "unix" and host:
        raise UnsupportedError(f"{uri}: a unix socket cannot reach server {host}")
    params: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        params[key.lower()] = value  # libvirt matches names case-insensitively; the last one wins
    return ConnURI(uri=uri, driver=driver, transport=transport, user=parts.username or None, host=host,
                   port=port, path=parts.path or "/", params=params)
