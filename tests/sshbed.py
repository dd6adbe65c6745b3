"""A second libvirt host on this machine: a test user's session daemon behind a private sshd.

:class:`SshBed` starts ``/usr/sbin/sshd`` on ``127.0.0.1`` only, on a free port, with a host key and a
client key generated into a temporary directory (nothing else of the machine's ssh setup is used or
changed: no ``/etc/ssh`` keys, no ``~/.ssh``), lets exactly one user in (:data:`USER`, created by
``scripts/setup``) with the client key, and stops it — with every process its connections started —
at :meth:`close`, which also removes the directory and stops the user's session daemons that the
tests' logins started (libvirt's autostart: ``libvirtd --timeout=120``, ``virtlogd``).

The URI (:meth:`SshBed.uri`) is what an operator would write: ``qemu+ssh://USER@127.0.0.1:PORT/session``
with ``keyfile=`` (the client key), ``no_tty=1`` (a failed login fails instead of prompting) and
``command=`` — libvirt's own parameter for the ssh program — naming a wrapper that pins the host key
to the generated one (``UserKnownHostsFile``, strict checking) and ignores root's ssh configuration.
libvirt's ssh transport has no known-hosts parameter (``known_hosts`` is for libssh/libssh2), and
``no_verify=1`` would write the throwaway host key into root's ``~/.ssh/known_hosts``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "vstest"
SSHD = "/usr/sbin/sshd"


def missing_prerequisite() -> str | None:
    """Why the bed cannot run here (for a skip that names it), or None."""
    if os.geteuid() != 0:
        return "the two-host bed needs root (it starts sshd and reads the test user's files)"
    if not Path(SSHD).is_file() or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        return "openssh-server/openssh-client not installed: run scripts/setup"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"test user {USER} missing: run scripts/setup"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _running(pid: int) -> bool:
    """*pid* exists and is not a zombie waiting to be reaped."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:].split()[0] != b"Z"


def _children(pid: int) -> list[int]:
    """Every descendant of *pid* (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            data = Path(f"/proc/{d}/stat").read_bytes()
        except OSError:
            continue
        ppid = int(data[data.rfind(b")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


class SshBed:
    """The private sshd and the test user's session daemon behind it (see the module docstring)."""

    def __init__(self) -> None:
        self.pw = pwd.getpwnam(USER)
        self.home = Path(self.pw.pw_dir)
        self.dir = Path(tempfile.mkdtemp(prefix="vs-sshbed-", dir="/tmp"))
        self.dir.chmod(0o755)  # sshd reads the authorized keys as the user
        self.serial_dir = self.dir / "serial"  # the session guests' serial logs (written as the user)
        self.serial_dir.mkdir()
        os.chown(self.serial_dir, self.pw.pw_uid, self.pw.pw_gid)
        self.key = self.dir / "client_key"
        for key in (self.dir / "host_key", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "virtsave-test", "-f", str(key)],
                           check=True)
        (self.dir / "authorized_keys").write_text((self.dir / "client_key.pub").read_text())
        (self.dir / "authorized_keys").chmod(0o644)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()
        self.stop_session_daemons()  # one left by an earlier run: the tests start from a fresh daemon
        self.start()

    def _write_config(self) -> None:
        d = self.dir
        (d / "sshd_config").write_text(f"""ListenAddress 127.0.0.1
Port {self.port}
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
AllowUsers {USER}
PermitRootLogin no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitTTY no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
PrintMotd no
""")
        host_pub = (d / "host_key.pub").read_text().split()
        (d / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        (d / "ssh").write_text(
            "#!/bin/sh\n# libvirt's command= for this bed: the generated host key only, no user config\n"
            f"exec ssh -F /dev/null -o UserKnownHostsFile={d}/known_hosts -o GlobalKnownHostsFile=/dev/null "
            "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o LogLevel=ERROR \"$@\"\n")
        (d / "ssh").chmod(0o755)

    # -- lifecycle

    def start(self) -> None:
        """Start the listener (again, on the same port after :meth:`stop`) and wait for it."""
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # OpenSSH's privilege-separation directory
        log = open(self.dir / "sshd.log", "ab")  # noqa: SIM115 - kept open by the daemon
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.dir / 'sshd.log').read_text()[-500:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)
        raise RuntimeError("sshd did not listen within 20 s")

    def stop(self) -> None:
        """Stop the listener and every process its connections started (their logins end: the ssh
        connections of clients drop)."""
        if self.proc is None:
            return
        kids = _children(self.proc.pid)
        for pid in [self.proc.pid, *kids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        self.stop_session_daemons()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _session_daemon(self, name: str) -> int | None:
        """The pid of the user's session *name* (``libvirtd``/``virtlogd``), if one runs."""
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.home / ".cache" / "libvirt" / f"{name}.pid").read_text().strip())
            st = os.stat(f"/proc/{pid}")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            if st.st_uid == self.pw.pw_uid and cmd.endswith(name.encode()):
                return pid
        return None

    def stop_session_daemons(self, grace: float = 15) -> None:
        """Stop the user's session libvirtd and virtlogd (autostarted by the tests' logins; they would
        exit by themselves after their idle timeout). A session libvirtd can hang in its shutdown
        here (its nodedev driver waits for a udev thread in this container): after *grace* seconds
        it is killed, else the next autostart finds its pidfile locked and fails."""
        for name in ("libvirtd", "virtlogd"):
            pid = self._session_daemon(name)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # -- for the tests

    def uri(self, path: str = "/session", user: str = USER, extra: str = "") -> str:
        """The libvirt URI of the session daemon through this sshd."""
        return (f"qemu+ssh://{user}@127.0.0.1:{self.port}{path}?keyfile={self.key}&no_tty=1"
                f"&command={self.dir}/ssh{extra}")

    @property
    def label(self) -> str:
        return f"{USER}@127.0.0.1:{self.port}/session"

    @property
    def state_dir(self) -> Path:
        """virtsave's state directory on the 'remote' host: the user's XDG state directory."""
        return self.home / ".local" / "state" / "virtsave"

    def as_user(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run *argv* locally as the test user, with a login's clean environment (no ssh involved)."""
        env = ["env", "-i", f"HOME={self.home}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"]
        return subprocess.run(["runuser", "-u", USER, "--", *env, *argv], capture_output=True, text=True,
                              timeout=60, check=False)

    def log_settings(self) -> tuple[str, str]:
        """The session daemon's (filters, outputs) exactly as ``virt-admin`` shows them."""
        out = self.as_user("virt-admin", "-c", "libvirtd:///session", "daemon-log-filters; daemon-log-outputs")
        if out.returncode != 0:
            raise RuntimeError(f"virt-admin as {USER}: {out.stderr.strip()}")
        vals = {}
        for line in out.stdout.splitlines():
            for kind in ("filters", "outputs"):
                head, sep, value = line.partition(f"Logging {kind}:")
                if sep and not head.strip():
                    vals[kind] = value.removeprefix(" ")
        return vals["filters"], vals["outputs"]

    def domain_log(self, name: str) -> Path:
        return self.home / ".cache" / "libvirt" / "qemu" / "log" / f"{name}.log"

    def managed_save_image(self, name: str) -> Path:
        return self.home / ".config" / "libvirt" / "qemu" / "save" / f"{name}.save"
