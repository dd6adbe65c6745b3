"""Many hosts at once: ``list``, ``managed-save --all`` and ``start --all`` across several libvirt URIs.

Each host is worked on in its own thread (hosts concurrently), through the reference path's own bulk
functions (:func:`~virtsave.libvirtd.reference.managed_save_all` / ``start_all``: *parallel* domains
at a time on that host, one connection per worker). A host that cannot be reached, or refuses the
login, is one failed :class:`HostOutcome`; the others go on. Before its work, each host gets the
repair of log settings a killed ``virtsave trace`` may have left there
(:func:`~virtsave.libvirtd.logcapture.repair_if_stale`); what it says is in ``warnings``.

Named domains (*names*) are looked for on every host; a name found on none is reported as missing
(:attr:`Fanout.missing`), a host where none of them lives does nothing.

Example (needs the daemons)::

    from virtsave.libvirtd import fleet
    out = fleet.managed_save_hosts(["qemu:///system", "qemu+ssh://root@db2/system"], parallel=2)
    for host in out.hosts:
        print(host.label, host.ok, host.error, [r.domain for r in host.results])
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import libvirt

from virtsave.core.errors import UnsupportedError, VirtsaveError
from virtsave.libvirtd import logcapture, transport
from virtsave.libvirtd import reference as lp
from virtsave.libvirtd import uri as liburi

__all__ = ["MAX_HOSTS_AT_ONCE", "Fanout", "HostOutcome", "label", "list_hosts", "managed_save_hosts",
           "read_hosts_file", "start_hosts"]

#: Hosts worked on at the same time (each may run --parallel domains).
MAX_HOSTS_AT_ONCE = 16

Progress = Callable[[dict[str, Any]], None]


@dataclass
class HostOutcome:
    """What happened on one host: its results (bulk operations) or domains (``list``), or why not."""

    uri: str
    label: str
    ok: bool = True
    error: str | None = None
    seconds: float = 0.0
    results: list[lp.OpResult] = field(default_factory=list)
    domains: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    found: set[str] = field(default_factory=set)

    @property
    def failed(self) -> list[lp.OpResult]:
        """This host's failed operations."""
        return [r for r in self.results if not r.ok]


@dataclass
class Fanout:
    """Every host's outcome, in the order given, and the named domains no host has."""

    hosts: list[HostOutcome]
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every host answered, every operation succeeded, every named domain was found."""
        return not self.missing and all(h.ok and not h.failed for h in self.hosts)


def label(uri: str) -> str:
    """A short name of *uri* for tables (``user@host:port/path``; a local URI as it is).

    >>> label("qemu+ssh://root@db1:2222/system?keyfile=/k"), label("qemu:///system")
    ('root@db1:2222/system', 'qemu:///system')
    """
    try:
        return liburi.parse(uri).label
    except UnsupportedError:
        return uri


def read_hosts_file(text: str) -> list[str]:
    """The URIs of a ``--hosts`` file: one a line; blank lines and ``#`` comments skipped.

    >>> read_hosts_file("# lab\\nqemu:///system\\n\\n  qemu+ssh://root@db1/system  # db\\n")
    ['qemu:///system', 'qemu+ssh://root@db1/system']
    """
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            out.append(line)
    return out


def _on_host(uri: str, work: Callable[[libvirt.virConnect, HostOutcome], None]) -> HostOutcome:
    """Repair, connect, *work*, close; any VirtsaveError becomes this host's one failure."""
    out = HostOutcome(uri, label(uri))
    t0 = time.monotonic()
    try:
        try:
            repaired = logcapture.repair_if_stale(uri)
        except transport.HostUnreachable:
            raise  # the login libvirt would use fails too: that is this host's one failure
        except VirtsaveError as exc:
            out.warnings.append(f"could not check libvirtd's log settings: {exc}")
        else:
            if repaired:
                out.warnings.append(repaired)
        conn = lp.connect(uri)
        try:
            work(conn, out)
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
    except VirtsaveError as exc:
        out.ok, out.error = False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    except libvirt.libvirtError as exc:  # the connection died between two calls
        out.ok, out.error = False, str(lp.map_error(exc, f"{out.label}"))
    out.seconds = round(time.monotonic() - t0, 3)
    return out


def _fan_out(uris: Sequence[str], work: Callable[[libvirt.virConnect, HostOutcome], None],
             names: Iterable[str] | None = None) -> Fanout:
    if not uris:
        raise UnsupportedError("no hosts given")
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=min(len(uris), MAX_HOSTS_AT_ONCE), thread_name_prefix="virtsave-host") as pool:
        hosts = list(pool.map(lambda u: _on_host(u, work), uris))
    wanted = list(dict.fromkeys(names or ()))
    found = set().union(*(h.found for h in hosts))
    # A name no host has is missing only when every host answered (else it may be on the silent one).
    missing = [n for n in wanted if n not in found] if all(h.ok for h in hosts) else []
    return Fanout(hosts, missing, round(time.monotonic() - t0, 3))


def list_hosts(uris: Sequence[str], match: str | None = None) -> Fanout:
    """:func:`~virtsave.libvirtd.reference.list_domains` on every host."""
    def work(conn: libvirt.virConnect, out: HostOutcome) -> None:
        out.domains = lp.list_domains(conn, match)
    return _fan_out(uris, work)


def _per_host_progress(progress: Progress | None, host_label: str) -> Progress | None:
    if progress is None:
        return None
    cb = progress

    def tagged(stats: dict[str, Any]) -> None:
        cb({**stats, "domain": f"{host_label}: {stats.get('domain', '?')}"})
    return tagged


def _bulk(uris: Sequence[str], kind: str, run: Callable[..., list[lp.OpResult]], names: Iterable[str] | None,
          parallel: int, match: str | None, progress: Progress | None, **kw: Any) -> Fanout:
    if parallel < 1:
        raise UnsupportedError(f"--parallel must be ≥ 1, not {parallel}")
    wanted = set(names) if names else None

    def work(conn: libvirt.virConnect, out: HostOutcome) -> None:
        todo = lp.select_domains(conn, kind, None, match)
        if wanted is not None:
            out.found = {d.name() for d in conn.listAllDomains(0)} & wanted
            todo = [n for n in todo if n in wanted]
            if not todo:
                return  # none of the named domains (in that state) lives here: never "all of them"
        if todo:
            out.results = run(conn, todo, parallel, match=match,
                              progress=_per_host_progress(progress, out.label), **kw)
    return _fan_out(uris, work, names)


def managed_save_hosts(uris: Sequence[str], names: Iterable[str] | None = None, parallel: int = 2, *,
                       match: str | None = None, bypass_cache: bool = False, state: str | None = None,
                       progress: Progress | None = None) -> Fanout:
    """Managed-save every active domain on every host (restricted to *names* / glob *match*);
    hosts at once, *parallel* domains at a time on each."""
    return _bulk(uris, "active", lp.managed_save_all, names, parallel, match, progress,
                 bypass_cache=bypass_cache, state=state)


def start_hosts(uris: Sequence[str], names: Iterable[str] | None = None, parallel: int = 2, *,
                match: str | None = None, bypass_cache: bool = False, state: str | None = None,
                progress: Progress | None = None) -> Fanout:
    """Start every inactive domain with a managed-save image on every host (restricted likewise)."""
    return _bulk(uris, "managed-save", lp.start_all, names, parallel, match, progress,
                 bypass_cache=bypass_cache, state=state)
