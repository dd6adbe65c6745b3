"""Where virtsave's own commands run and its files live: this machine, or the daemon's host over ssh.

libvirt's admin API is local only, and the capture log is a file on the daemon's host, so tracing a
remote daemon means running ``virt-admin`` and reading files *there*. A :class:`Host` does exactly
that and nothing more: run a program, read/write/remove a file, take a lock, name the process that
stands for this virtsave on that host. :class:`LocalHost` does it with the OS; :class:`SshHost` with
the ``ssh`` program, logged in the way libvirt's ``qemu+ssh://`` transport logs in
(``virNetSocketNewConnectSSH``: ``ssh [-p PORT] [-l USER] [-i KEYFILE] -T -e none [-o BatchMode=yes]
[-o StrictHostKeyChecking=no] -- HOST COMMAND``, the program from the URI's ``command=``), so it works
wherever libvirt's own connection works.

On the far side only a POSIX shell, coreutils, ``flock`` and ``virt-admin`` are needed. While a
capture runs, one ssh connection stays open (the **anchor**): a shell on the daemon's host that holds
the capture lock when asked and stands for this virtsave as the owner of the capture (its pid is in
the state file there). It is also the connection the other commands share (OpenSSH's
``ControlMaster``), so each costs a round trip, not a login. It ends when virtsave closes it, when
its connection drops, or when virtsave stops sending its heartbeat for :data:`ANCHOR_TIMEOUT`
seconds (a cut network): then the next virtsave command sees an owner that no longer runs and
puts the daemon's log settings back.

Example::

    >>> h = LocalHost()
    >>> h.run(["sh", "-c", "echo hi"]).stdout
    b'hi\\n'
    >>> ssh_argv(uri.parse("qemu+ssh://u@h:2222/system?keyfile=/k&no_verify=1"), "id")
    ['ssh', '-p', '2222', '-l', 'u', '-i', '/k', '-T', '-e', 'none', '-o', 'StrictHostKeyChecking=no', '--', 'h', 'id']
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from virtsave.core import paths as config
from virtsave.core.errors import ConnectionFailed, UnsupportedError
from virtsave.libvirtd import uri

__all__ = [
    "ANCHOR_TIMEOUT",
    "HEARTBEAT",
    "Completed",
    "Host",
    "HostInfo",
    "HostUnreachable",
    "LocalHost",
    "SshHost",
    "host_for",
    "proc_starttime",
    "ssh_argv",
    "starttime_from_stat",
]

Completed = subprocess.CompletedProcess[bytes]


class HostUnreachable(ConnectionFailed):
    """ssh could not reach or log in to the daemon's host, or its connection was lost."""


#: Seconds without a heartbeat after which the anchor on the daemon's host gives up.
ANCHOR_TIMEOUT = 60
#: Seconds between heartbeats.
HEARTBEAT = 10
_SSH_FAILED = 255  # ssh's own exit status: connection or login failed


def starttime_from_stat(data: bytes) -> int | None:
    """Start time (clock ticks since boot) from a ``/proc/PID/stat`` line: (pid, start) names one
    process, a recycled pid has another start time.

    >>> starttime_from_stat(b"42 (a b) S " + b" ".join(b"1" for _ in range(18)) + b" 777 9")
    777
    """
    fields = data[data.rfind(b")") + 2:].split()  # comm may contain spaces and parentheses
    try:
        return int(fields[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


def proc_starttime(pid: int) -> int | None:
    """Start time of local process *pid*, or None when no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return starttime_from_stat(f.read())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


@dataclass(frozen=True)
class HostInfo:
    """What virtsave needs to know about the account it uses on a host."""

    uid: int
    home: str
    runtime_dir: str
    state_dir: str
    #: Whether virtsave's capture state file was there when the host was first asked (the cheap
    #: first check of a repair; a local host does not fill it in).
    capture_state: bool = False

    @property
    def user_runtime_dir(self) -> str:
        """libvirt's per-user runtime directory (``virGetUserRuntimeDirectory``)."""
        return f"{self.runtime_dir}/libvirt" if self.runtime_dir else f"{self.home}/.cache/libvirt"


class Host(abc.ABC):
    """A machine virtsave runs commands on and keeps files on (see the module docstring)."""

    label: str = "local"
    remote: bool = False

    @abc.abstractmethod
    def run(self, argv: Sequence[str], *, input: bytes | None = None, env: Mapping[str, str] | None = None,
            timeout: float = 60) -> Completed:
        """Run *argv* there; the exit status is the caller's to judge (127: no such program)."""

    def sh(self, script: str, *args: str, input: bytes | None = None, timeout: float = 60) -> Completed:
        """Run a POSIX shell *script* there with positional parameters *args*."""
        return self.run(["sh", "-c", script, "sh", *args], input=input, timeout=timeout)

    @property
    @abc.abstractmethod
    def info(self) -> HostInfo:
        """The account's uid, home, runtime and state directories there."""

    @abc.abstractmethod
    def read_bytes(self, path: str, offset: int = 0, length: int | None = None) -> bytes | None:
        """*length* bytes (None: to the end) of *path* from *offset*; None when there is no such file."""

    @abc.abstractmethod
    def write_private(self, path: str, data: bytes) -> None:
        """Replace *path* with *data* atomically, mode 0600 (its directory made if missing), through a
        temporary ``PATH.tmp-PID`` next to it. No fsync: atomic for every later reader, which is
        what a file guarding against a *process* dying needs (see ``logcapture._save_state``)."""

    @abc.abstractmethod
    def new_private_file(self, path: str) -> None:
        """Create (or empty) *path* with mode 0600 in a directory made mode 0700."""

    @abc.abstractmethod
    def make_private_dir(self, path: str) -> None:
        """Create directory *path* (and its parents), mode 0700."""

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Names in directory *path* (empty when it does not exist)."""

    @abc.abstractmethod
    def size(self, path: str) -> int:
        """Size of *path* in bytes (0 when missing)."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether *path* exists."""

    @abc.abstractmethod
    def remove(self, path: str, *, tree: bool = False) -> None:
        """Remove a file (or with *tree* a directory and everything in it); quiet when missing."""

    @abc.abstractmethod
    def proc_starttime(self, pid: int) -> int | None:
        """Start time of process *pid* there, or None when it does not run."""

    def clock_offset(self) -> tuple[float, float]:
        """(seconds the host's clock is ahead of ours, uncertainty): the daemon stamps its log with
        its own clock. This machine: (0, 0)."""
        return 0.0, 0.0

    @abc.abstractmethod
    def owner(self) -> tuple[int, int | None]:
        """(pid, start time) of the process that stands for this virtsave there."""

    @abc.abstractmethod
    def locked(self, path: str) -> contextlib.AbstractContextManager[None]:
        """An exclusive ``flock`` on *path* there for the ``with`` block."""

    def close(self) -> None:  # noqa: B027 - a local host has nothing to close
        """Release what the host holds open (the anchor of an ssh host)."""

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- this machine


class LocalHost(Host):
    """This machine, through the OS."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        self._state_dir = os.fspath(state_dir) if state_dir is not None else os.fspath(config.STATE_DIR)

    def run(self, argv: Sequence[str], *, input: bytes | None = None, env: Mapping[str, str] | None = None,
            timeout: float = 60) -> Completed:
        # start_new_session: a Ctrl-C on the terminal must not kill a command half-way through
        # putting the daemon's settings back.
        try:
            return subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout, check=False,
                                  start_new_session=True, env={**os.environ, **(env or {})})
        except FileNotFoundError:
            return subprocess.CompletedProcess(list(argv), 127, b"", f"{argv[0]}: not found".encode())
        except subprocess.TimeoutExpired:
            raise ConnectionFailed(f"{argv[0]} timed out after {timeout:.0f} s") from None

    @property
    def info(self) -> HostInfo:
        return HostInfo(os.getuid(), os.path.expanduser("~"), os.environ.get("XDG_RUNTIME_DIR", ""),
                        self._state_dir)

    def read_bytes(self, path: str, offset: int = 0, length: int | None = None) -> bytes | None:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            return None

    def write_private(self, path: str, data: bytes) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)

    def new_private_file(self, path: str) -> None:
        d = Path(path).parent
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        os.close(fd)

    def make_private_dir(self, path: str) -> None:
        Path(path).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def size(self, path: str) -> int:
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return 0

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def remove(self, path: str, *, tree: bool = False) -> None:
        if tree:
            shutil.rmtree(path, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def proc_starttime(self, pid: int) -> int | None:
        return proc_starttime(pid)

    def owner(self) -> tuple[int, int | None]:
        return os.getpid(), proc_starttime(os.getpid())

    @contextlib.contextmanager
    def locked(self, path: str) -> Iterator[None]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock


# --------------------------------------------------------------------------- over ssh


def ssh_argv(target: uri.ConnURI, command: str, extra: Sequence[str] = ()) -> list[str]:
    """The ssh command line libvirt's ssh transport would use for *target*, running *command* there.

    ``qemu+ssh``: the program is ``command=`` (default ``ssh``); ``no_tty=1`` adds
    ``BatchMode=yes``, ``no_verify=1`` ``StrictHostKeyChecking=no``. ``qemu+libssh``/``libssh2``
    (libvirt logs in with its own ssh library there) map ``known_hosts`` and
    ``known_hosts_verify`` (normal | auto | ignore) to OpenSSH's options. *extra* are more options.

    >>> ssh_argv(uri.parse("qemu+libssh2://h/system?known_hosts=/kh&known_hosts_verify=auto"), "id")[4:8]
    ['-o', 'UserKnownHostsFile=/kh', '-o', 'StrictHostKeyChecking=accept-new']
    """
    p = target.params
    argv = [p.get("command") or "ssh"] if target.transport == "ssh" else ["ssh"]
    if target.port:
        argv += ["-p", str(target.port)]
    if target.user:
        argv += ["-l", target.user]
    if p.get("keyfile"):
        argv += ["-i", p["keyfile"]]
    argv += ["-T", "-e", "none"]
    if target.transport == "ssh":
        if target.flag("no_tty"):
            argv += ["-o", "BatchMode=yes"]
        if target.flag("no_verify"):
            argv += ["-o", "StrictHostKeyChecking=no"]
    else:
        if p.get("known_hosts"):
            argv += ["-o", f"UserKnownHostsFile={p['known_hosts']}"]
        verify = (p.get("known_hosts_verify") or "normal").lower()
        policy = {"normal": "yes", "auto": "accept-new", "ignore": "no"}.get(verify)
        if policy is None:
            raise UnsupportedError(f"{target.uri}: known_hosts_verify must be normal, auto or ignore")
        argv += ["-o", f"StrictHostKeyChecking={policy}"]
    return [*argv, *extra, "--", target.host or "localhost", command]


# The account's directories (libvirt's rules: XDG_RUNTIME_DIR, else ~/.cache; virtsave's state dir as
# on this machine: $VIRTSAVE_STATE_DIR when the login sets it, /var/lib/virtsave for root, else the XDG
# state directory).
_INFO_SCRIPT = r"""
u=$(id -u) || exit 1
if [ -n "${VIRTSAVE_STATE_DIR:-}" ]; then s=$VIRTSAVE_STATE_DIR
elif [ "$u" = 0 ]; then s=/var/lib/virtsave; else s=${XDG_STATE_HOME:-$HOME/.local/state}/virtsave; fi
if [ -e "$s/logcapture.json" ]; then c=1; else c=0; fi
printf '%s\n' "$u" "$HOME" "${XDG_RUNTIME_DIR:-}" "$s" "$c"
"""

# The anchor: prints its pid and /proc stat line, then serves "lock"/"unlock" on the lock file ($1)
# and lives as long as lines (heartbeats) keep coming; fd 9 (the lock) is kept from its children.
_ANCHOR_SCRIPT = r"""
umask 077
mkdir -p -- "$(dirname -- "$1")" && exec 9>>"$1" || exit 1
echo "anchor $$"
cat "/proc/$$/stat" || exit 1
while line=$(timeout "$2" sh -c 'IFS= read -r l || exit 1; printf "%s" "$l"' 9>&-); do
  case $line in
    lock) if flock 9; then echo locked; else echo failed; fi ;;
    unlock) flock -u 9; echo unlocked ;;
  esac
done
"""

_READ_SCRIPT = r"""
[ -e "$1" ] || exit 3
if [ -n "$3" ]; then tail -c "+$2" -- "$1" | head -c "$3"; else tail -c "+$2" -- "$1"; fi
"""
_WRITE_SCRIPT = r"""
umask 077
mkdir -p -- "$(dirname -- "$1")" && cat > "$1.tmp-$$" && mv -f -- "$1.tmp-$$" "$1"
"""
_NEW_FILE_SCRIPT = r"""
umask 077
d=$(dirname -- "$1")
mkdir -p -m 700 -- "$d" && chmod 700 -- "$d" && : > "$1" && chmod 600 -- "$1"
"""


class _Anchor:
    """The long-lived shell on the daemon's host (see the module docstring)."""

    def __init__(self, argv: list[str], label: str) -> None:
        self.label = label
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self._write = threading.Lock()
        self._stop = threading.Event()
        self._err: list[bytes] = []
        threading.Thread(target=self._drain_stderr, name="virtsave-anchor-err", daemon=True).start()
        head = self._line()
        stat = self._line()
        if not head.startswith("anchor ") or not stat:
            self.close()
            raise HostUnreachable(f"ssh to {label}: {self.error() or 'the remote shell did not start'}")
        self.pid = int(head.split()[1])
        self.start = starttime_from_stat(stat.encode())
        threading.Thread(target=self._heartbeat, name="virtsave-anchor-beat", daemon=True).start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err = [*self._err[-20:], line]

    def error(self) -> str:
        lines = [x.decode(errors="replace").strip() for x in self._err if x.strip()]
        return lines[-1] if lines else ""

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().decode(errors="replace").rstrip("\n")

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        with self._write:
            try:
                self.proc.stdin.write(f"{word}\n".encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                raise HostUnreachable(f"ssh to {self.label}: connection lost "
                                       f"({self.error() or 'the remote shell ended'})") from None

    def ask(self, word: str, want: str) -> None:
        self.send(word)
        got = self._line()
        if got != want:
            raise HostUnreachable(f"ssh to {self.label}: {word} failed ({got or self.error() or 'connection lost'})")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            with contextlib.suppress(ConnectionFailed):
                self.send("")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self._stop.set()
        with self._write, contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError, ValueError):
                if f is not None:
                    f.close()


class SshHost(Host):
    """The daemon's host of a ``qemu+ssh://`` (or ``+libssh``/``+libssh2``) URI, over ``ssh``."""

    remote = True

    def __init__(self, target: uri.ConnURI, *, timeout: float = 60) -> None:
        if not target.is_ssh:
            raise UnsupportedError(f"{target.uri} is not reached over ssh")
        self.target = target
        self.label = target.label
        self.timeout = timeout
        self._info: HostInfo | None = None
        self._anchor: _Anchor | None = None
        self._lock_path: str | None = None
        self._mux_dir: str | None = None

    # -- running commands

    def _mux_options(self, master: bool) -> list[str]:
        if self._mux_dir is None:
            return []
        path = f"{self._mux_dir}/c"
        if master:
            return ["-o", "ControlMaster=yes", "-o", f"ControlPath={path}", "-o", "ControlPersist=no"]
        if self._anchor is None or not self._anchor.alive():
            return []
        return ["-o", "ControlMaster=no", "-o", f"ControlPath={path}"]

    def run(self, argv: Sequence[str], *, input: bytes | None = None, env: Mapping[str, str] | None = None,
            timeout: float | None = None) -> Completed:
        if env:
            argv = ["env", *(f"{k}={v}" for k, v in env.items()), *argv]
        cmd = ssh_argv(self.target, shlex.join(argv), self._mux_options(False))
        limit = timeout or self.timeout
        try:
            proc = subprocess.run(cmd, input=input, capture_output=True, timeout=limit, check=False,
                                  start_new_session=True)
        except FileNotFoundError:
            raise UnsupportedError(f"{cmd[0]} not found: it is needed to reach {self.label}") from None
        except subprocess.TimeoutExpired:
            raise HostUnreachable(f"ssh to {self.label}: {argv[0]} timed out after {limit:.0f} s") from None
        if proc.returncode == _SSH_FAILED:
            why = _last_line(proc.stderr) or "exit 255 without a message: the connection was cut"
            raise HostUnreachable(f"ssh to {self.label} failed: {why}")
        return proc

    def _checked(self, script: str, *args: str, input: bytes | None = None, what: str) -> Completed:
        proc = self.sh(script, *args, input=input)
        if proc.returncode != 0:
            raise OSError(f"{what} on {self.label}: {_last_line(proc.stderr) or f'exit {proc.returncode}'}")
        return proc

    @property
    def info(self) -> HostInfo:
        if self._info is None:
            out = self._checked(_INFO_SCRIPT, what="reading the account's directories").stdout
            lines = out.decode(errors="replace").split("\n")
            if len(lines) < 5 or not lines[0].isdigit():
                raise HostUnreachable(f"ssh to {self.label}: unexpected answer {out[:200]!r}")
            self._info = HostInfo(int(lines[0]), lines[1], lines[2], lines[3], lines[4] == "1")
        return self._info

    # -- files

    def read_bytes(self, path: str, offset: int = 0, length: int | None = None) -> bytes | None:
        if length == 0:
            return b""
        proc = self.sh(_READ_SCRIPT, path, str(offset + 1), "" if length is None else str(length))
        if proc.returncode == 3:
            return None
        if proc.returncode != 0:
            raise OSError(f"cannot read {path} on {self.label}: {_last_line(proc.stderr)}")
        return proc.stdout

    def write_private(self, path: str, data: bytes) -> None:
        self._checked(_WRITE_SCRIPT, path, input=data, what=f"cannot write {path}")

    def new_private_file(self, path: str) -> None:
        self._checked(_NEW_FILE_SCRIPT, path, what=f"cannot create {path}")

    def make_private_dir(self, path: str) -> None:
        self._checked('umask 077; mkdir -p -- "$1" && chmod 700 -- "$1"', path, what=f"cannot create {path}")

    def listdir(self, path: str) -> list[str]:
        proc = self.sh('[ -d "$1" ] || exit 0; cd -- "$1" && for f in * .[!.]*; do [ -e "$f" ] && '
                       'printf "%s\\0" "$f"; done; exit 0', path)
        if proc.returncode != 0:
            raise OSError(f"cannot list {path} on {self.label}: {_last_line(proc.stderr)}")
        return sorted(x.decode(errors="surrogateescape") for x in proc.stdout.split(b"\0") if x)

    def size(self, path: str) -> int:
        out = self.sh('stat -c %s -- "$1" 2>/dev/null || echo 0', path).stdout.strip()
        return int(out) if out.isdigit() else 0

    def clock_offset(self) -> tuple[float, float]:
        before = time.time()
        out = self.run(["date", "+%s.%N"]).stdout.strip()
        after = time.time()
        try:
            there = float(out)
        except ValueError:
            return 0.0, (after - before) / 2
        return there - (before + after) / 2, (after - before) / 2 + 0.001

    def exists(self, path: str) -> bool:
        return self.sh('[ -e "$1" ]', path).returncode == 0

    def remove(self, path: str, *, tree: bool = False) -> None:
        self._checked('rm -rf -- "$1"' if tree else 'rm -f -- "$1"', path, what=f"cannot remove {path}")

    def proc_starttime(self, pid: int) -> int | None:
        proc = self.sh('cat "/proc/$1/stat" 2>/dev/null', str(pid))
        return starttime_from_stat(proc.stdout) if proc.returncode == 0 and proc.stdout else None

    # -- the anchor: owner and lock

    def anchor(self, lock_path: str) -> _Anchor:
        """Start (once) the shell that holds *lock_path* on request and stands for this virtsave."""
        if self._anchor is not None:
            if lock_path != self._lock_path:
                raise ValueError(f"anchor of {self.label} serves {self._lock_path}, not {lock_path}")
            if not self._anchor.alive():
                raise HostUnreachable(f"ssh to {self.label}: connection lost ({self._anchor.error()})")
            return self._anchor
        self._mux_dir = _new_mux_dir()
        command = shlex.join(["sh", "-c", _ANCHOR_SCRIPT, "sh", lock_path, str(ANCHOR_TIMEOUT)])
        try:
            self._anchor = _Anchor(ssh_argv(self.target, command, self._mux_options(True)), self.label)
        except BaseException:
            shutil.rmtree(self._mux_dir, ignore_errors=True)
            self._mux_dir = None
            raise
        self._lock_path = lock_path
        return self._anchor

    def owner(self) -> tuple[int, int | None]:
        a = self.anchor(self._lock_path or f"{self.info.state_dir}/logcapture.lock")
        return a.pid, a.start

    @contextlib.contextmanager
    def locked(self, path: str) -> Iterator[None]:
        a = self.anchor(path)
        a.ask("lock", "locked")
        try:
            yield
        finally:
            with contextlib.suppress(ConnectionFailed):  # a lost connection drops the lock there
                a.ask("unlock", "unlocked")

    def close(self) -> None:
        if self._anchor is not None:
            self._anchor.close()
            self._anchor = None
        if self._mux_dir is not None:
            shutil.rmtree(self._mux_dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # the per-user parent, when no other virtsave uses it
                os.rmdir(os.path.dirname(self._mux_dir))
            self._mux_dir = None


def _new_mux_dir() -> str:
    """A private directory for the ssh control socket, under ``$TMPDIR/virtsave-ssh-UID`` (0700, ours)
    as ``PID-…``; directories of processes that no longer run (killed) are removed on the way."""
    parent = Path(tempfile.gettempdir()) / f"virtsave-ssh-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        parent.mkdir(mode=0o700)
    st = os.lstat(parent)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return tempfile.mkdtemp(prefix="virtsave-ssh-")  # not ours to trust: a private one of its own
    for d in parent.iterdir():
        pid = d.name.partition("-")[0]
        if pid.isdigit() and proc_starttime(int(pid)) is None:
            shutil.rmtree(d, ignore_errors=True)
    try:
        return tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent)
    except FileNotFoundError:  # another virtsave removed the empty parent just now
        return _new_mux_dir()


def _last_line(data: bytes) -> str:
    lines = [x.strip() for x in data.decode(errors="replace").splitlines() if x.strip()]
    return lines[-1] if lines else ""


def host_for(conn_uri: str | None, *, state_dir: str | os.PathLike[str] | None = None) -> Host:
    """The host where the daemon behind *conn_uri* runs, as a :class:`Host`.

    Local URIs give :class:`LocalHost`; ``qemu+ssh``/``libssh``/``libssh2`` an :class:`SshHost`;
    other transports (tls, tcp, ext) :class:`UnsupportedError`: virtsave needs a shell there.

    >>> host_for("qemu:///system").remote, host_for("qemu+ssh://h/system").remote
    (False, True)
    """
    target = uri.parse(conn_uri or os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system")
    if target.is_local:
        return LocalHost(state_dir)
    if target.is_ssh:
        return SshHost(target)
    raise UnsupportedError(f"{target.uri}: the {target.transport} transport gives no shell on the daemon's "
                           "host, which tracing needs (use qemu+ssh://, or trace --from-log with the daemon's log)")
