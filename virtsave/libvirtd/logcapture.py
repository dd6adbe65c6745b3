"""Switch libvirtd's QMP monitor logging on for the length of an operation, then put it back.

libvirt-python has no admin API binding, so the daemon's log settings are read and changed
with ``virt-admin daemon-log-filters`` / ``daemon-log-outputs``. Several virtsave processes may
trace at the same time on one daemon, so logging is a **refcounted shared session**:

- the first session (under an ``fcntl.flock`` lock) reads the operator's filters and outputs
  exactly as ``virt-admin`` shows them, writes them into a state file
  (``STATE_DIR/logcapture.json``) together with its pid, then puts our filters in front of the
  operator's and adds one private output file (``STATE_DIR/logcapture/capture.log``, directory
  0700, file 0600) to the operator's outputs — so an existing log keeps working;
- by default the operator's outputs below the level their own filters give the monitor are
  raised to it for the window (:func:`virtsave.libvirtd.logsettings.quiet_level`, warning
  unless their filters say otherwise), so their logs receive none of the monitor traffic they
  did not ask for; the session says so in one notice. ``OutputPolicy(keep=True)`` (the CLI's
  ``--keep-log-outputs``) leaves them as they are. Once one session of a shared capture raised
  them they stay raised until the last session ends;
- each session records its own window of the capture file (byte offsets and UTC timestamps at
  its start and end) and copies only that slice into a private per-session file;
- the last session out restores the original filters and outputs in the form that makes
  ``virt-admin`` show them byte for byte as before (libvirt shows ``3:remote`` as ``3:*remote*``
  and stores ``3:*remote*`` as ``3:**remote**``: see :mod:`virtsave.libvirtd.logsettings`),
  reads them back, and deletes the capture log;
- owners whose pid is gone (SIGKILL) are dropped whenever the state is touched; when none are
  left the originals are restored the same way. :func:`repair_if_stale` does only that and costs
  one ``stat`` when there is nothing to repair, so every command talking to the daemon can call it.

The originals are restored only when the daemon still holds what we applied; if someone changed
the settings meanwhile (or libvirtd restarted), they are left alone and a warning is returned.

Example (needs a running libvirtd, as root)::

    from virtsave.libvirtd import logcapture
    with logcapture.capture("qemu:///system") as cap:
        dom.managedSave()
        text = cap.window_text()      # only this session's slice of the log
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from virtsave.core import paths as config
from virtsave.core.errors import ConnectionFailed, LogError, UnsupportedError
from virtsave.core.signals import Terminated, deferred_signals
from virtsave.libvirtd import adminrpc
from virtsave.libvirtd import logsettings as ls
from virtsave.libvirtd.logsettings import CAPTURE_FILTERS

__all__ = [
    "CAPTURE_FILTERS",
    "AdminRunner",
    "CaptureSession",
    "OutputPolicy",
    "Owner",
    "Paths",
    "State",
    "admin_socket",
    "admin_uri_for",
    "capture",
    "daemon_identity",
    "get_settings",
    "output_policy",
    "parse_admin_output",
    "proc_starttime",
    "repair_if_stale",
    "set_settings",
]

STATE_VERSION = 1  # fields added since are optional: older virtsave processes sharing the file drop them
STATE_NAME = "logcapture.json"
LOCK_NAME = "logcapture.lock"
DIR_NAME = "logcapture"
LOG_NAME = "capture.log"


# --------------------------------------------------------------------------- admin runner


class AdminRunner:
    """Reads and sets the daemon's log filters/outputs.

    Over the daemon's admin socket (:mod:`virtsave.libvirtd.adminrpc`, what ``virt-admin`` itself
    speaks, without a process per call) when the admin URI names a local socket; through
    ``virt-admin`` otherwise, or when ``$VIRTSAVE_ADMIN_CLIENT`` is ``virt-admin``. Values are
    returned exactly as ``virt-admin`` shows them (see :func:`parse_admin_output`).
    """

    def __init__(self, admin_uri: str) -> None:
        self.admin_uri = admin_uri
        self._holding = False
        self._held: adminrpc.AdminClient | None = None

    @property
    def socket(self) -> str | None:
        """The admin socket spoken to directly, or None: ``virt-admin`` is run."""
        if os.environ.get("VIRTSAVE_ADMIN_CLIENT") == "virt-admin":
            return None
        return adminrpc.socket_for(self.admin_uri)

    @contextlib.contextmanager
    def _rpc(self) -> Iterator[adminrpc.AdminClient]:
        assert self.socket is not None
        if self._holding:  # inside held(): the first call opens the connection the others share
            if self._held is None:
                self._held = adminrpc.AdminClient(self.socket, timeout=60).open()
            yield self._held
            return
        with adminrpc.AdminClient(self.socket, timeout=60) as adm:
            yield adm

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Every call in the block shares one admin connection, opened by the first (a session's
        start or stop makes two or three calls; each connection costs round trips to the daemon)."""
        if self._holding:
            yield
            return
        self._holding = True
        try:
            yield
        finally:
            client, self._held, self._holding = self._held, None, False
            if client is not None:
                client.close()

    def _run(self, *args: str) -> str:
        # start_new_session: a Ctrl-C on the terminal must not kill virt-admin half-way
        # through putting the settings back. LC_ALL=C: the answer's labels are translated.
        try:
            proc = subprocess.run(["virt-admin", "-c", self.admin_uri, *args], capture_output=True,
                                  text=True, timeout=60, start_new_session=True, check=False,
                                  env={**os.environ, "LC_ALL": "C"})
        except FileNotFoundError:
            raise UnsupportedError("virt-admin not found: it is needed to switch libvirtd's logging on") from None
        except subprocess.TimeoutExpired:
            raise ConnectionFailed(f"virt-admin -c {self.admin_uri} {args[0]} timed out") from None
        if proc.returncode != 0:
            msg = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            raise ConnectionFailed(f"virt-admin -c {self.admin_uri} {args[0]}: {msg}")
        return proc.stdout

    def daemon_identity(self) -> list[int] | None:
        """``[pid, start time]`` of the daemon (see :func:`daemon_identity`)."""
        return daemon_identity(self.admin_uri)

    def get_filters(self) -> str:
        return self.get_settings()[0]

    def get_outputs(self) -> str:
        return self.get_settings()[1]

    def set_filters(self, value: str) -> None:
        self.set_settings(value, None, outputs_first=False)

    def set_outputs(self, value: str) -> None:
        self.set_settings(None, value, outputs_first=False)

    def get_settings(self) -> tuple[str, str]:
        """(filters, outputs) as shown, in one connection (or one virt-admin process)."""
        if self.socket is not None:
            with self._rpc() as adm:
                return adm.get_filters(), adm.get_outputs()
        # One virt-admin process for both (vsh's "a; b" syntax): each process costs 15-60 ms.
        out = self._run("daemon-log-filters; daemon-log-outputs")
        return parse_admin_output(out, "filters"), parse_admin_output(out, "outputs")

    def set_settings(self, filters: str | None, outputs: str | None, *, outputs_first: bool) -> tuple[str, str]:
        """Set both (None: leave that one), in the given order; read both back as shown."""
        if self.socket is not None:
            with self._rpc() as adm:
                steps = [(adm.set_filters, filters), (adm.set_outputs, outputs)]
                for setter, value in reversed(steps) if outputs_first else steps:
                    if value is not None:
                        setter(value)
                return adm.get_filters(), adm.get_outputs()
        sets = []
        if filters is not None:
            sets.append(f"daemon-log-filters --filters {_vsh_quote(filters)}")
        if outputs is not None:
            sets.append(f"daemon-log-outputs --outputs {_vsh_quote(outputs)}")
        if outputs_first:
            sets.reverse()
        out = self._run("; ".join([*sets, "daemon-log-filters", "daemon-log-outputs"]))
        return parse_admin_output(out, "filters"), parse_admin_output(out, "outputs")


def _vsh_quote(value: str) -> str:
    if "'" in value:
        raise LogError(f"log setting contains a quote, refusing: {value!r}")
    return f"'{value}'"


def _one_connection(runner: Any) -> contextlib.AbstractContextManager[None]:
    """*runner*'s :meth:`AdminRunner.held` when it has one (test runners do not)."""
    held = getattr(runner, "held", None)
    return held() if held is not None else contextlib.nullcontext()


def get_settings(runner: Any) -> tuple[str, str]:
    """(filters, outputs) through *runner*, as shown, in one round trip when it can."""
    if hasattr(runner, "get_settings"):
        got: tuple[str, str] = runner.get_settings()
        return got
    return runner.get_filters(), runner.get_outputs()


def set_settings(runner: Any, filters: str | None, outputs: str | None, *,
                 outputs_first: bool) -> tuple[str, str]:
    """Set filters and outputs (None: leave that one; order matters: never log debug lines into
    an output that is not there yet, nor into the operator's before it is raised); read back."""
    if hasattr(runner, "set_settings"):
        done: tuple[str, str] = runner.set_settings(filters, outputs, outputs_first=outputs_first)
        return done
    steps = [(runner.set_filters, filters), (runner.set_outputs, outputs)]
    for setter, value in reversed(steps) if outputs_first else steps:
        if value is not None:
            setter(value)
    return runner.get_filters(), runner.get_outputs()


def admin_uri_for(uri: str | None) -> str:
    """The admin URI of the daemon behind libvirt URI *uri* (``qemu:///system`` → ``libvirtd:///system``).

    ``$VIRTSAVE_ADMIN_URI`` wins. Remote URIs are refused: the capture file must be local.
    """
    env = os.environ.get("VIRTSAVE_ADMIN_URI")
    if env:
        return env
    uri = uri or os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"
    parts = urlsplit(uri)
    if parts.hostname or "+" in parts.scheme:
        raise UnsupportedError(f"log capture needs a local daemon; {uri} is remote (use --from-log)")
    if parts.scheme not in ("qemu", "libvirtd", "virtqemud"):
        raise UnsupportedError(f"log capture supports qemu:// URIs only, not {uri}")
    path = parts.path or "/system"
    if parts.scheme != "qemu":
        return f"{parts.scheme}://{path}"
    # libvirtd (monolithic, as on this machine) or virtqemud (modular daemons).
    if Path("/run/libvirt/virtqemud-admin-sock").exists() and not Path("/run/libvirt/libvirt-admin-sock").exists():
        return f"virtqemud://{path}"
    return f"libvirtd://{path}"


def admin_socket(admin_uri: str) -> Path | None:
    """The Unix socket behind admin URI *admin_uri* (its ``?socket=`` when given), or None.

    >>> admin_socket("libvirtd:///system"), admin_socket("libvirtd:///system?socket=/tmp/a.sock")
    (PosixPath('/run/libvirt/libvirt-admin-sock'), PosixPath('/tmp/a.sock'))
    """
    parts = urlsplit(admin_uri)
    sock = parse_qs(parts.query).get("socket")
    if sock:
        return Path(sock[0])
    name = {"libvirtd": "libvirt-admin-sock", "virtqemud": "virtqemud-admin-sock"}.get(parts.scheme)
    if name is None:
        return None
    if parts.path.startswith("/session"):
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        return Path(runtime) / "libvirt" / name if runtime else None
    return Path("/run/libvirt") / name


def daemon_identity(admin_uri: str) -> list[int] | None:
    """``[pid, start time]`` of the daemon listening on *admin_uri*'s socket (``SO_PEERCRED``), or None
    when it does not answer. A restarted daemon has another identity — and none of the log settings
    set at run time before (they live in its memory only)."""
    path = admin_socket(admin_uri)
    if path is None:
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(path))
            pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    except OSError:
        return None
    return [pid, proc_starttime(pid) or 0]


def _identity(runner: Any) -> list[int] | None:
    """The daemon's identity through *runner* (None when the runner cannot tell, e.g. a test double)."""
    return runner.daemon_identity() if hasattr(runner, "daemon_identity") else None


def parse_admin_output(text: str, kind: str) -> str:
    """The value in virt-admin's `` Logging filters: …`` / `` Logging outputs: …`` answer, exactly
    as shown (libvirt ends each filter with a blank: ``"3:*remote* "``).

    >>> parse_admin_output(" Logging filters: 3:*remote* \\n\\n", "filters")
    '3:*remote* '
    """
    label = f"Logging {kind}:"
    for line in text.splitlines():
        head, sep, value = line.partition(label)
        if sep and not head.strip():
            return value.removeprefix(" ")
    raise LogError(f"unexpected virt-admin answer for daemon-log-{kind}: {text.strip()[:200]!r}")


# --------------------------------------------------------------------------- output policy


@dataclass(frozen=True)
class OutputPolicy:
    """What happens to the operator's own log outputs during a capture.

    *keep*: leave them at their levels (they then also receive the monitor traffic); default:
    raise those below the quiet level for the window. *announce* receives the one-line notice
    (default: the capture's ``on_warning``).
    """

    keep: bool = False
    announce: Callable[[str], None] | None = None


_POLICY: contextvars.ContextVar[OutputPolicy | None] = contextvars.ContextVar("virtsave_output_policy",
                                                                              default=None)


@contextlib.contextmanager
def output_policy(keep: bool = False, announce: Callable[[str], None] | None = None) -> Iterator[OutputPolicy]:
    """The :class:`OutputPolicy` of every :func:`capture` in the block that names none (the CLI sets
    it around ``capture.trace_domain``)."""
    policy = OutputPolicy(keep=keep, announce=announce)
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


# --------------------------------------------------------------------------- state file


def proc_starttime(pid: int) -> int | None:
    """Start time (clock ticks since boot) of *pid*, or None when no such process: a recycled pid
    has another start time, so (pid, start) names one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: fields start after the last ')'.
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


@dataclass
class Owner:
    """One virtsave process holding the shared capture session."""

    pid: int
    start: int | None
    session: str
    since: str = ""

    def alive(self) -> bool:
        now = proc_starttime(self.pid)
        return now is not None and (self.start is None or now == self.start)


@dataclass
class State:
    """What ``logcapture.json`` holds while logging is switched on.

    ``original_*`` are the operator's settings as ``virt-admin`` showed them; ``applied_*`` ours as
    it showed them back; ``daemon`` the daemon's ``[pid, start time]`` when they were applied (a
    restarted daemon has lost them: see :func:`daemon_identity`).
    ``filters_wrapped``: whether the daemon shows a filter's match wrapped in
    ``*…*`` (None: not known). ``raise_to``: the level the operator's outputs were raised to
    (None: not raised); ``raised``: those outputs as they were.
    """

    admin_uri: str
    original_filters: str
    original_outputs: str
    applied_filters: str
    applied_outputs: str
    log: str
    owners: list[Owner] = field(default_factory=list)
    version: int = STATE_VERSION
    filters_wrapped: bool | None = None
    raise_to: int | None = None
    raised: list[str] = field(default_factory=list)
    daemon: list[int] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> State:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError("unknown logcapture state version")
        owners = [Owner(**o) for o in data.pop("owners", [])]
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__}, owners=owners)

    def prune(self, alive: Callable[[Owner], bool] = Owner.alive) -> list[Owner]:
        """Drop owners that no longer run; return the dropped ones."""
        dead = [o for o in self.owners if not alive(o)]
        self.owners = [o for o in self.owners if alive(o)]
        return dead


class Paths:
    """Where the state, lock and capture files live (under ``config.STATE_DIR``)."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        base = Path(state_dir) if state_dir is not None else Path(config.STATE_DIR)
        self.base = base
        self.state = base / STATE_NAME
        self.lock = base / LOCK_NAME
        self.dir = base / DIR_NAME
        self.log = self.dir / LOG_NAME


@contextlib.contextmanager
def _locked(paths: Paths) -> Iterator[None]:
    paths.base.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _load_state(paths: Paths) -> State | None:
    try:
        text = paths.state.read_text()
    except FileNotFoundError:
        return None
    try:
        return State.from_json(text)
    except (ValueError, TypeError, KeyError) as exc:
        raise LogError(f"{paths.state}: unreadable log-capture state ({exc}); inspect it, fix the "
                       "daemon's settings with virt-admin, then delete the file") from None


def _save_state(paths: Paths, state: State) -> None:
    """Replace the state file atomically. No fsync: the file guards against a *process* dying
    (the rename is atomic for every later reader); a host crash restarts libvirtd with its
    configured log settings, which is all a repair would have put back — and an fsync right after
    a multi-GiB save waits for the disk's write-back (measured: 4-8 ms idle, far more then)."""
    tmp = paths.state.with_name(f"{STATE_NAME}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(state.to_json())
    os.replace(tmp, paths.state)


# --------------------------------------------------------------------------- restoring


def _put_back(runner: Any, state: State) -> str | None:
    """Write the originals back in the form that reads back as they were shown; read back to check.

    Filters first: stop producing debug lines before the output goes away and before the
    operator's outputs come down to their own levels. Returns a warning when the daemon does not
    show the originals afterwards."""
    forms = ls.filter_input_forms(state.original_filters, state.filters_wrapped)
    got_f, got_o = set_settings(runner, forms[0], state.original_outputs, outputs_first=False)
    for other in forms[1:]:
        if ls.same(got_f, state.original_filters):
            break
        got_f, got_o = set_settings(runner, other, None, outputs_first=False)
    bad = [f"{kind} {got!r} (were {want!r})" for kind, got, want in
           (("filters", got_f, state.original_filters), ("outputs", got_o, state.original_outputs))
           if not ls.same(got, want)]
    if bad:
        return f"libvirtd shows other log settings than before after restoring them: {'; '.join(bad)}"
    return None


def _restore(runner: Any, state: State, paths: Paths) -> str | None:
    """Put the original settings back (only if the daemon still has ours); clean files.

    Returns a warning when the settings were left alone or did not read back as before."""
    warning = None
    cur: tuple[str, str] | None = None
    try:
        cur = get_settings(runner)
    except ConnectionFailed as exc:
        # Daemon gone: its settings died with it. Nothing to restore.
        warning = f"daemon not reachable while restoring log settings ({exc}); state cleared"
    now = _identity(runner) if cur is not None and state.daemon else None
    if cur is not None and now is not None and now != state.daemon:
        warning = _restarted_note(state, now, cur)
    elif cur is not None:
        cur_f, cur_o = cur
        if ls.same(cur_f, state.applied_filters) and ls.same(cur_o, state.applied_outputs):
            warning = _put_back(runner, state)
        elif ls.same(cur_f, state.original_filters) and ls.same(cur_o, state.original_outputs):
            pass  # already back (e.g. libvirtd restarted with the same config)
        else:
            warning = (f"libvirtd's log settings were changed by someone else during capture "
                       f"(filters {cur_f!r}, outputs {cur_o!r}); left as they are")
    with contextlib.suppress(FileNotFoundError):
        paths.state.unlink()
    shutil.rmtree(paths.dir, ignore_errors=True)
    return warning


def _restarted_note(state: State, now: list[int], cur: tuple[str, str]) -> str:
    """libvirtd restarted while capturing: our settings (and the operator's run-time ones) died with the
    old process; the new one shows its configured settings, which are left as they are."""
    old = state.daemon[0] if state.daemon else "?"
    lost = ("" if ls.same(cur[0], state.original_filters) and ls.same(cur[1], state.original_outputs) else
            f"; the settings it had before the capture (filters {state.original_filters!r}, outputs "
            f"{state.original_outputs!r}) were set at run time and went with the old process: not put back")
    return (f"libvirtd restarted during the capture (pid {old} → {now[0]}): the capture's log settings went "
            f"with it; it now shows its configured ones (filters {cur[0]!r}, outputs {cur[1]!r}){lost}; "
            "capture state cleared")


def _restore_force(runner: Any, state: State, paths: Paths) -> None:
    """Best effort put-back after a failure while switching logging on."""
    with contextlib.suppress(Exception):
        _put_back(runner, state)
    with contextlib.suppress(FileNotFoundError):
        paths.state.unlink()
    shutil.rmtree(paths.dir, ignore_errors=True)


def repair_if_stale(uri: str | None = None, *, state_dir: str | os.PathLike[str] | None = None,
                    runner: Any = None) -> str | None:
    """Restore the daemon's log settings if every virtsave that switched them on has died.

    Cheap when there is nothing to do (one ``stat``). Returns a one-line description of what was
    repaired (or a warning), else None.
    """
    paths = Paths(state_dir)
    if not paths.state.exists() or not os.access(paths.base, os.W_OK):
        return None  # nothing to repair, or not ours to repair (non-root user)
    with deferred_signals(), _locked(paths):
        state = _load_state(paths)
        if state is None:
            return None
        dead = state.prune()
        if state.owners:
            if dead:
                _save_state(paths, state)
            return None
        runner = runner or AdminRunner(state.admin_uri)
        with _one_connection(runner):
            warning = _restore(runner, state, paths)
    pids = ", ".join(str(o.pid) for o in dead) or "none"
    return warning or (f"restored libvirtd's log settings left by an interrupted virtsave (pid {pids}): "
                       f"filters {state.original_filters!r}, outputs {state.original_outputs!r}")


# --------------------------------------------------------------------------- sessions


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _ends_line(path: Path, size: int) -> bool:
    """Whether the byte before offset *size* of *path* is a newline."""
    try:
        with open(path, "rb") as f:
            f.seek(size - 1)
            return f.read(1) == b"\n"
    except OSError:
        return True  # gone: nothing more will come


def _quiet_level(state: State) -> int:
    return ls.quiet_level(state.original_filters, ls.configured_log_level(state.admin_uri))


def _raise_notice(state: State) -> str | None:
    if not state.raised:
        return None
    return (f"libvirtd log output{'s' if len(state.raised) > 1 else ''} {' '.join(state.raised)} raised to "
            f"level {state.raise_to} while tracing, so no monitor traffic reaches "
            f"{'them' if len(state.raised) > 1 else 'it'} (--keep-log-outputs leaves them as they are)")


class CaptureSession:
    """One process's share of the capture: its byte window of the shared log."""

    def __init__(self, uri: str | None = None, *, state_dir: str | os.PathLike[str] | None = None,
                 runner: Any = None, settle: float = 0.0, policy: OutputPolicy | None = None) -> None:
        self.admin_uri = runner.admin_uri if runner is not None and hasattr(runner, "admin_uri") \
            else admin_uri_for(uri)
        self.runner = runner or AdminRunner(self.admin_uri)
        self.paths = Paths(state_dir)
        self.session = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.settle = settle
        self.policy = policy or _POLICY.get() or OutputPolicy()
        self.start_offset = 0
        self.end_offset: int | None = None
        self.since: _dt.datetime | None = None
        self.until: _dt.datetime | None = None
        self.first = False
        self.warning: str | None = None
        self.notice: str | None = None
        self._window: Path | None = None
        self._active = False

    @property
    def log_path(self) -> Path:
        """The shared capture log (all concurrent sessions write into it)."""
        return self.paths.log

    def start(self) -> CaptureSession:
        """Join (or open) the shared session and mark the start of this window."""
        me = Owner(pid=os.getpid(), start=proc_starttime(os.getpid()), session=self.session,
                   since=_utcnow().isoformat())
        with deferred_signals(), _locked(self.paths), _one_connection(self.runner):
            state = _load_state(self.paths)
            if state is not None:
                state.prune()
                restarted = state.daemon is not None and _identity(self.runner) not in (None, state.daemon)
                if not state.owners or restarted:  # every earlier owner died, or the daemon lost our settings:
                    self.warning = _restore(self.runner, state, self.paths)   # repair, then start afresh
                    state = None
            if state is None:
                state = self._open(me)
            else:
                self._join(state, me)
            _save_state(self.paths, state)
            self.notice = _raise_notice(state)
            if self.policy.keep and state.raised:
                self.notice = (f"{self.notice}; another virtsave trace shares this capture without "
                               "--keep-log-outputs, so they stay raised until it ends")
            self.start_offset = _size(self.paths.log)
            self.since = _utcnow()
            self._active = True
        return self

    def _new_capture_log(self) -> None:
        self.paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.paths.dir, 0o700)
        fd = os.open(self.paths.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        os.close(fd)

    def _open(self, me: Owner) -> State:
        """First session: record the operator's settings, then switch ours on."""
        self.first = True
        live_f, live_o = get_settings(self.runner)
        orig_f, orig_o = ls.strip_ours(live_f, live_o, self.paths.log)
        if (orig_f, orig_o) != (live_f, live_o):
            self.warning = ("libvirtd had virtsave's capture settings without a state file (lost?): took the "
                            f"rest as the operator's (filters {orig_f!r}, outputs {orig_o!r}); output levels "
                            "that lost session raised cannot be told from the operator's own")
        self._new_capture_log()
        state = State(admin_uri=self.admin_uri, original_filters=orig_f, original_outputs=orig_o,
                      applied_filters="", applied_outputs="", log=str(self.paths.log), owners=[me])
        if not self.policy.keep:
            state.raise_to = _quiet_level(state)
            state.raised = ls.raised_outputs(orig_o, state.raise_to)[1]
        want_f = ls.capture_filters(orig_f, None)
        want_o = ls.capture_outputs(orig_o, self.paths.log, state.raise_to)
        state.applied_filters, state.applied_outputs = want_f, want_o
        # State first: if we die between here and the end, the next run knows what to restore.
        _save_state(self.paths, state)
        try:
            # Outputs first (ours there, theirs raised) before the filters let monitor lines through.
            got_f, got_o = set_settings(self.runner, want_f, want_o, outputs_first=True)
            state.filters_wrapped = ls.detect_wrapping(got_f, want_f)
            right_f = ls.capture_filters(orig_f, state.filters_wrapped)
            if right_f != want_f:  # the daemon does not wrap: the operator's part needs its shown form
                state.applied_filters = right_f
                _save_state(self.paths, state)
                got_f, got_o = set_settings(self.runner, right_f, None, outputs_first=False)
            # libvirt's own spelling, so the "still ours?" check at the end compares equal.
            state.applied_filters, state.applied_outputs = got_f, got_o
            state.daemon = _identity(self.runner)
        except BaseException:
            _restore_force(self.runner, state, self.paths)
            raise
        return state

    def _join(self, state: State, me: Owner) -> None:
        """A later session: count in; raise the operator's outputs if this one wants them quiet
        and the shared capture left them as they were."""
        state.owners.append(me)
        if self.policy.keep or state.raise_to is not None:
            return
        raise_to = _quiet_level(state)
        want_o = ls.capture_outputs(state.original_outputs, self.paths.log, raise_to)
        cur_f, cur_o = get_settings(self.runner)
        if not (ls.same(cur_f, state.applied_filters) and ls.same(cur_o, state.applied_outputs)):
            return  # changed by someone else: the end of the session will say so
        state.raise_to, state.raised = raise_to, ls.raised_outputs(state.original_outputs, raise_to)[1]
        _, state.applied_outputs = set_settings(self.runner, None, want_o, outputs_first=True)

    def _settle(self) -> int:
        """Where this window ends: the end of the capture log's last complete line.

        No waiting is needed for the operation's own lines: libvirt writes each log line with one
        ``write(2)`` (O_APPEND) in the thread that logs it before that thread goes on, and every
        monitor line an API call causes is logged before the daemon answers the call — the reply
        or event that lets the call finish is logged when it is read. So when the call returned,
        its lines are in the file. Lines logged later (events after the call) lie after the
        window's ``until`` and are cut off by time anyway. The marker read for is the newline that
        ends the last line (a line is never half-written with O_APPEND, but this does not assume
        it: bounded by *settle*). A positive *settle* (tests, other daemons) additionally waits
        until the file stops growing for that long.
        """
        end = _size(self.paths.log)
        deadline = time.monotonic() + max(self.settle * 5, 0.05)
        while end and not _ends_line(self.paths.log, end) and time.monotonic() < deadline:
            time.sleep(0.002)
            end = _size(self.paths.log)
        if self.settle <= 0:
            return end
        while time.monotonic() < deadline:
            time.sleep(self.settle / 3)
            now = _size(self.paths.log)
            if now == end:
                break
            end = now
        return end

    def finish_window(self) -> Path:
        """Close this session's window (idempotent) and copy the slice to a private file."""
        if self._window is not None:
            return self._window
        if not self._active:
            raise LogError("capture session not started")
        self.until = _utcnow()
        self.end_offset = self._settle()
        path = self.paths.dir / f"window-{self.session}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out, open(self.paths.log, "rb") as src:
            src.seek(self.start_offset)
            left = self.end_offset - self.start_offset
            while left > 0:
                chunk = src.read(min(left, 1 << 20))
                if not chunk:
                    break
                out.write(chunk)
                left -= len(chunk)
        self._window = path
        return path

    def window_path(self) -> Path:
        """Path of this session's log slice (valid until the session ends)."""
        return self.finish_window()

    def window_text(self) -> str:
        """This session's log slice as text."""
        return self.finish_window().read_text(errors="replace")

    def stop(self) -> str | None:
        """Leave the shared session; the last one out restores the settings. Returns a warning, if any."""
        if not self._active:
            return self.warning
        with deferred_signals(), _locked(self.paths), _one_connection(self.runner):
            self._active = False
            if self._window is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._window.unlink()
            state = _load_state(self.paths)
            if state is None:
                return self.warning
            state.owners = [o for o in state.owners if o.session != self.session]
            state.prune()
            if state.owners:
                _save_state(self.paths, state)
            else:
                self.warning = _restore(self.runner, state, self.paths) or self.warning
        return self.warning


@contextlib.contextmanager
def _term_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    old_int = signal.getsignal(signal.SIGINT)
    if old_int in (signal.SIG_IGN, signal.SIG_DFL, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if old_int in (signal.SIG_IGN, signal.SIG_DFL):
            signal.signal(signal.SIGINT, old_int)


@contextlib.contextmanager
def capture(uri: str | None = None, *, state_dir: str | os.PathLike[str] | None = None,
            runner: Any = None, on_warning: Callable[[str], None] | None = None,
            policy: OutputPolicy | None = None) -> Iterator[CaptureSession]:
    """Monitor logging on for the ``with`` block; settings restored on exit, error, Ctrl-C or SIGTERM.

    *policy* (default: the one :func:`output_policy` set, else raise the operator's outputs)
    decides what happens to the operator's own log outputs; its notice goes to
    ``policy.announce``, else to *on_warning*. Read the window (``window_text()``/``window_path()``)
    inside the block: the per-session file is removed when the block ends.
    """
    repaired = repair_if_stale(uri, state_dir=state_dir, runner=runner)
    if repaired and on_warning:
        on_warning(repaired)
    sess = CaptureSession(uri, state_dir=state_dir, runner=runner, policy=policy)
    announce = sess.policy.announce or on_warning
    with _term_as_interrupt():
        try:
            sess.start()  # a signal held during start() is raised after it: stop() still runs
            if sess.notice and announce:
                announce(sess.notice)
            yield sess
        finally:
            warning = sess.stop()
            if warning and on_warning:
                on_warning(warning)
