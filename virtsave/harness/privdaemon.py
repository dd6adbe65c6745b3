"""A libvirtd of the measurement's own, for tools that act on EVERY guest of a daemon.

``libvirt-guests.sh stop`` suspends every running domain of each URI it is configured with; on the
shared daemon of this machine kind that would be other people's guests. So the bulk comparison (P7)
runs on a private libvirtd + virtlogd, started inside a private **mount namespace** (``unshare
--mount --propagation private``) over which fresh directories are bind-mounted:

=========================== ================================================================
``/etc/libvirt``            a minimal ``libvirtd.conf`` and ``qemu.conf`` (no domains, networks,
                            pools: nothing of the shared daemon's configuration is seen)
``/run/libvirt``            the private daemons' sockets and runtime state (the shared daemon's
                            sockets are not reachable from inside)
``/var/lib/libvirt``        managed-save images, ``libvirt-guests``'s list file
``/var/cache/libvirt``      QEMU capability cache
``/var/log/libvirt``        daemon, domain and serial logs
``/run/lock``               ``libvirt-guests``'s lock file
``/etc/default/libvirt-guests`` the script's configuration (the shared file is untouched)
=========================== ================================================================

Inside, ``qemu:///system`` IS the private daemon, for virsh, libvirt-guests.sh and virtsave alike.
:func:`check_private_namespace` refuses to run in the caller's mount namespace, and
:meth:`PrivateDaemon.only_domains` is the guard before anything acts on "all guests": the daemon
must list exactly the given domains. The daemons run without cgroups (``cgroup_controllers = []``)
so nothing is created in the host's cgroup tree; processes are ended by pid on exit.

Example (as root, inside ``unshare --mount --propagation private``)::

    with PrivateDaemon("/var/tmp/vs-bulk-1", host_ns=parents_namespace) as d:
        conn = libvirt.open("qemu:///system")
        ...
        d.only_domains(conn, names)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import libvirt

from virtsave.core.errors import OperationFailed, UnsupportedError

__all__ = ["BINDS", "PrivateDaemon", "check_private_namespace", "guests_config", "kill_leftovers",
           "mount_namespace", "remove_base"]

#: (host path, directory name under the private base); ``/etc/default/libvirt-guests`` is a file.
BINDS = (("/etc/libvirt", "etc"), ("/run/libvirt", "run"), ("/var/lib/libvirt", "lib"),
         ("/var/cache/libvirt", "cache"), ("/var/log/libvirt", "log"), ("/run/lock", "lock"))
GUESTS_CONF = "/etc/default/libvirt-guests"
LIBVIRTD_CONF = 'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
QEMU_CONF = "cgroup_controllers = [ ]\n"


def guests_config(uri: str = "qemu:///system", bypass_cache: bool = False) -> str:
    """``libvirt-guests`` settings for the comparison: suspend (managed save) on stop, start on start.

    >>> print(guests_config().splitlines()[:3])
    ['URIS=qemu:///system', 'ON_BOOT=start', 'ON_SHUTDOWN=suspend']
    """
    return "\n".join([f"URIS={uri}", "ON_BOOT=start", "ON_SHUTDOWN=suspend", "PARALLEL_SHUTDOWN=0",
                      "START_DELAY=0", f"BYPASS_CACHE={int(bypass_cache)}", "SYNC_TIME=0",
                      "PERSISTENT_ONLY=default", ""])


def mount_namespace(pid: int | str = "self") -> str:
    """The mount namespace of *pid* (``mnt:[…]``)."""
    return os.readlink(f"/proc/{pid}/ns/mnt")


def check_private_namespace(host_ns: str) -> None:
    """Refuse to go on in the mount namespace *host_ns* (the one the caller came from, where the
    shared daemon lives): the binds would replace the shared daemon's directories."""
    if mount_namespace() == host_ns:
        raise UnsupportedError("the private daemon must run in a mount namespace of its own "
                               "(unshare --mount --propagation private)")


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def kill_leftovers(base: str | os.PathLike[str]) -> list[int]:
    """Kill what a private daemon under *base* left running (its QEMUs, libvirtd, virtlogd): by the pid
    files in *base*, and only processes outside the caller's mount namespace (the shared daemon's).
    Returns the pids killed."""
    b = Path(base)
    host_ns = mount_namespace()
    killed = []
    for pidfile in [*sorted((b / "run" / "qemu").glob("*.pid")), b / "libvirtd.pid", b / "virtlogd.pid"]:
        pid = _pid(pidfile)
        if pid is None:
            continue
        with contextlib.suppress(OSError):
            if mount_namespace(pid) == host_ns:
                continue  # a recycled pid in the host's namespace is not ours
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


class PrivateDaemon:
    """Bind the private directories, start virtlogd + libvirtd there; stop and clean up on exit."""

    def __init__(self, base: str | os.PathLike[str], host_ns: str, *, guests_conf: str | None = None,
                 prefix: str = "vs-", timeout: float = 180.0) -> None:
        self.base = Path(base)
        self.host_ns = host_ns
        self.prefix = prefix
        #: True once /run/libvirt here is the private directory: only then is qemu:///system ours.
        self.private_run = False
        self.guests_conf = guests_conf if guests_conf is not None else guests_config()
        self.timeout = timeout

    def __enter__(self) -> PrivateDaemon:
        check_private_namespace(self.host_ns)
        try:
            self._bind()
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _bind(self) -> None:
        self.base.mkdir(mode=0o755, parents=True, exist_ok=True)
        for host, name in BINDS:
            d = self.base / name
            d.mkdir(mode=0o755, exist_ok=True)
            _mount_bind(d, host)
            if host == "/run/libvirt":
                self.private_run = os.path.samefile(d, host) and mount_namespace() != self.host_ns
        Path("/etc/libvirt/libvirtd.conf").write_text(LIBVIRTD_CONF)
        Path("/etc/libvirt/qemu.conf").write_text(QEMU_CONF)
        Path("/var/log/libvirt/qemu").mkdir(mode=0o755, exist_ok=True)
        conf = self.base / "libvirt-guests"
        conf.write_text(self.guests_conf)
        if Path(GUESTS_CONF).exists():
            _mount_bind(conf, GUESTS_CONF)
        elif Path(GUESTS_CONF).parent.is_dir():  # no host file to cover: the script reads none
            raise UnsupportedError(f"{GUESTS_CONF} does not exist: cannot give libvirt-guests.sh a private config")

    def _start(self) -> None:
        if not self.private_run:
            raise OperationFailed("/run/libvirt is not the private directory: refusing to start a daemon")
        subprocess.run(["virtlogd", "--daemon", "--pid-file", str(self.base / "virtlogd.pid")], check=True)
        _wait_socket("/run/libvirt/virtlogd-sock", self.timeout)
        subprocess.run(["libvirtd", "--daemon", "--pid-file", str(self.base / "libvirtd.pid")], check=True)
        _wait_socket("/run/libvirt/libvirt-sock", self.timeout)
        deadline = time.monotonic() + self.timeout
        while True:  # the first connection waits for the QEMU capability probe
            try:
                libvirt.open("qemu:///system").close()
                return
            except libvirt.libvirtError as exc:
                if time.monotonic() > deadline:
                    raise OperationFailed(f"the private libvirtd does not answer: {exc}") from None
                time.sleep(0.2)

    @staticmethod
    def only_domains(conn: libvirt.virConnect, names: list[str]) -> None:
        """The guard before acting on all guests: the daemon holds exactly *names*, nothing else."""
        have = sorted(d.name() for d in conn.listAllDomains(0))
        if have != sorted(names):
            raise OperationFailed(f"the private daemon lists {have}, expected exactly {sorted(names)}: refusing")

    def stop(self) -> None:
        """Destroy and undefine the measurement's domains (named *prefix*…) on the private daemon, end
        both daemons by pid. Nothing is touched through qemu:///system unless /run/libvirt here is
        the private directory (a failed bind must never reach the shared daemon)."""
        if self.private_run:
            self._remove_domains()
        for name in ("libvirtd.pid", "virtlogd.pid"):
            pid = _pid(self.base / name)
            with contextlib.suppress(OSError):  # gone already, or a recycled pid of the host's: not ours
                if pid is not None and mount_namespace(pid) != self.host_ns:
                    os.kill(pid, signal.SIGTERM)
                    _wait_gone(pid, 10.0)
        kill_leftovers(self.base)

    def _remove_domains(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conn = libvirt.open("qemu:///system")
            try:
                for dom in conn.listAllDomains(0):
                    if not dom.name().startswith(self.prefix):
                        continue
                    with contextlib.suppress(libvirt.libvirtError):
                        if dom.isActive():
                            dom.destroy()
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
            finally:
                conn.close()


def _mount_bind(src: Path, dst: str) -> None:
    proc = subprocess.run(["mount", "--bind", str(src), dst], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OperationFailed(f"mount --bind {src} {dst}: {proc.stderr.strip()}")


def _wait_socket(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise OperationFailed(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if os.path.exists(f"/proc/{pid}"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def remove_base(base: str | os.PathLike[str]) -> None:
    """Remove the private directories (after the namespace is gone)."""
    shutil.rmtree(base, ignore_errors=True)
