"""A private libvirtd + virtlogd for tests that kill or restart the daemons (issue 15, item 2).

The machine's libvirtd serves every engineer's tests at once, so these tests never touch it. Instead
they start their own pair as root in a **private mount namespace** (``unshare --mount``): libvirt's
fixed system paths — ``/run/libvirt`` (sockets, QEMU driver state), ``/var/lib/libvirt`` (managed-save
images), ``/etc/libvirt`` (configuration, persistent domains: none), ``/var/cache/libvirt``
(capabilities) — are bind mounts of directories under one scratch directory there, so this libvirtd
sees no other domain, no network, and nobody else sees it. ``/var/log/libvirt`` stays shared (the
guests' serial logs, read by :mod:`virtsave.harness.guest`; every file there is named after a unique
test domain). libvirt 11.3's ``qemu:///embed`` mode was no alternative: it runs the QEMU driver inside
the client, with no daemon to restart and no admin socket for the log capture.

- the test process talks to it from outside through the bind-mounted socket
  (:attr:`PrivateDaemons.uri`, ``qemu+unix:///system?socket=…``) and reads its files directly
  (:attr:`PrivateDaemons.save_dir`);
- ``virtsave`` runs *inside* the namespace (:meth:`PrivateDaemons.virtsave`), so it finds the daemon
  exactly where an operator's would be (``qemu:///system``, ``libvirtd:///system``,
  ``/var/lib/libvirt/qemu/save``), with its own state directory (:attr:`PrivateDaemons.state_dir`);
- the daemons run in the foreground as children of the test, so they are killed and restarted by
  pid, never by name; they (and the namespace's anchor) get ``PR_SET_PDEATHSIG``, so a test run that
  is itself killed does not leave them behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid as _uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: System path inside the namespace → scratch subdirectory (outside).
MOUNTS = {"/run/libvirt": "run", "/var/lib/libvirt": "lib", "/etc/libvirt": "etc", "/var/cache/libvirt": "cache"}


def _die_with_parent() -> None:
    """preexec: SIGKILL this child when the test process dies (kept across nsenter's exec)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class DaemonError(RuntimeError):
    """The private daemons could not be set up (the test fails, naming why)."""


class PrivateDaemons:
    """libvirtd and virtlogd of our own (see the module docstring). Use as a context manager."""

    def __init__(self, prefix: str = "vs-test-privd") -> None:
        self.base = Path("/var/tmp") / f"{prefix}-{os.getpid()}-{_uuid.uuid4().hex[:6]}"
        self.anchor: subprocess.Popen[bytes] | None = None
        self.libvirtd: subprocess.Popen[bytes] | None = None
        self.virtlogd: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ paths
    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.base / 'run' / 'libvirt-sock'}"

    @property
    def admin_uri(self) -> str:
        return f"libvirtd:///system?socket={self.base / 'run' / 'libvirt-admin-sock'}"

    @property
    def save_dir(self) -> Path:
        """Where this libvirtd keeps managed-save images (its /var/lib/libvirt/qemu/save)."""
        return self.base / "lib" / "qemu" / "save"

    @property
    def state_dir(self) -> Path:
        """virtsave's state directory for commands against this daemon."""
        return self.base / "state"

    # ------------------------------------------------------------------ setup
    def __enter__(self) -> PrivateDaemons:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _setup(self) -> None:
        for sub in (*MOUNTS.values(), "state"):
            (self.base / sub).mkdir(parents=True, mode=0o755)
        for conf in Path("/etc/libvirt").glob("*.conf"):  # the machine's daemon configuration, no domains
            shutil.copy2(conf, self.base / "etc" / conf.name)
        with contextlib.suppress(OSError):
            shutil.copytree("/var/cache/libvirt", self.base / "cache", dirs_exist_ok=True)  # skip re-probing QEMU
        binds = "".join(f"mount --bind {self.base / sub} {path}\n" for path, sub in MOUNTS.items())
        script = f"set -e\n{binds}echo ready\nexec sleep infinity\n"
        self.anchor = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
                                       preexec_fn=_die_with_parent)
        assert self.anchor.stdout is not None
        line = self.anchor.stdout.readline().strip()
        if line != b"ready":
            raise DaemonError(f"private mount namespace: {self.anchor.stderr.read().decode()[-500:]}"  # type: ignore[union-attr]
                              if self.anchor.poll() is not None else f"private mount namespace said {line!r}")
        self.start_virtlogd()
        self.start_libvirtd()

    def _enter(self, *options: str) -> list[str]:
        assert self.anchor is not None
        return ["nsenter", "-t", str(self.anchor.pid), "-m", *options, "--"]

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.base / f"{name}.out", "ab")  # noqa: SIM115 - the daemon's stderr, closed with it
        # nsenter execs the daemon (no fork for a mount namespace): the child's pid is the daemon's.
        return subprocess.Popen([*self._enter(), *argv], stdout=log, stderr=subprocess.STDOUT, cwd="/",
                                start_new_session=True, preexec_fn=_die_with_parent)

    def _wait_socket(self, name: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
        sock = self.base / "run" / name
        deadline = time.monotonic() + timeout
        while not sock.is_socket():
            if proc.poll() is not None:
                raise DaemonError(f"{proc.args[-1]} exited ({proc.returncode}): {self.tail(proc)}")
            if time.monotonic() > deadline:
                raise DaemonError(f"{sock} did not appear within {timeout:.0f} s")
            time.sleep(0.05)

    def tail(self, proc: subprocess.Popen[bytes], n: int = 5) -> str:
        name = "libvirtd" if proc is self.libvirtd else "virtlogd"
        with contextlib.suppress(OSError):
            return " | ".join((self.base / f"{name}.out").read_text(errors="replace").splitlines()[-n:])
        return ""

    def start_virtlogd(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.base / "run" / "virtlogd-sock").unlink()
        self.virtlogd = self._spawn("virtlogd", ["virtlogd", "-p", str(self.base / "virtlogd.pid")])
        self._wait_socket("virtlogd-sock", self.virtlogd)

    def start_libvirtd(self) -> None:
        """Start (or start again) libvirtd; returns once it answers on its socket."""
        for sock in ("libvirt-sock", "libvirt-sock-ro", "libvirt-admin-sock"):
            with contextlib.suppress(FileNotFoundError):
                (self.base / "run" / sock).unlink()
        self.libvirtd = self._spawn("libvirtd", ["libvirtd", "-p", str(self.base / "libvirtd.pid")])
        self._wait_socket("libvirt-sock", self.libvirtd)
        deadline = time.monotonic() + 60
        while subprocess.run(["virsh", "-q", "-c", self.uri, "version"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise DaemonError(f"libvirtd does not answer on {self.uri}: {self.tail(self.libvirtd)}")
            time.sleep(0.1)

    def stop(self, which: str, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        """Send *sig* to our libvirtd or virtlogd and wait until it is gone."""
        proc = self.libvirtd if which == "libvirtd" else self.virtlogd
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # ------------------------------------------------------------------ running virtsave inside
    def virtsave(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """``virtsave ARGS`` inside the namespace (its pid is virtsave's own: nsenter execs)."""
        full = {**os.environ, "VIRTSAVE_STATE_DIR": str(self.state_dir), "COLUMNS": "200", **(env or {})}
        full.pop("LIBVIRT_DEFAULT_URI", None)
        full.pop("VIRTSAVE_ADMIN_URI", None)
        return subprocess.Popen([*self._enter(f"--wd={REPO}"), sys.executable, "-m", "virtsave.cli", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full)

    def run(self, *args: str, timeout: float = 600, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        p = self.virtsave(*args, env=env)
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def admin(self, *args: str) -> str:
        """``virt-admin`` on this libvirtd (as an operator would type it)."""
        return subprocess.run(["virt-admin", "-c", self.admin_uri, *args], capture_output=True, text=True,
                              timeout=60, check=True).stdout

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Destroy every domain of this daemon (all are the tests'), stop both daemons, leave nothing."""
        if self.libvirtd is not None and self.libvirtd.poll() is None:
            with contextlib.suppress(Exception):
                import libvirt

                conn = libvirt.open(self.uri)
                for dom in conn.listAllDomains():
                    with contextlib.suppress(libvirt.libvirtError):
                        if dom.isActive():
                            dom.destroy()
                    with contextlib.suppress(libvirt.libvirtError):
                        if dom.isPersistent():
                            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
                    with contextlib.suppress(OSError):
                        (Path("/var/log/libvirt/qemu") / f"{dom.name()}-serial.log").unlink()
                    with contextlib.suppress(OSError):
                        (Path("/var/log/libvirt/qemu") / f"{dom.name()}.log").unlink()
                conn.close()
        for which in ("libvirtd", "virtlogd"):
            self.stop(which, signal.SIGTERM, timeout=30)
        if self.anchor is not None and self.anchor.poll() is None:
            self.anchor.kill()   # the namespace and its mounts go with its last process
            self.anchor.wait()
        shutil.rmtree(self.base, ignore_errors=True)
