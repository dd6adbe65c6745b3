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

**A daemon on another host** (``qemu+ssh://``): the same steps run there through a
:class:`~virtsave.libvirtd.transport.SshHost` — ``virt-admin``, the state and lock files and the
capture log live on the daemon's host, in the ssh account's state directory (``/var/lib/virtsave``
for root, else ``$XDG_STATE_HOME/virtsave``); the owner recorded there is the anchor shell of this
virtsave's ssh connection, so when that connection dies the next virtsave command against that host
finds a dead owner and restores. Only this session's window of the log is copied back.

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
import json
import os
import secrets
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from virtsave.core import paths as config
from virtsave.core.errors import ConnectionFailed, LogError, UnsupportedError
from virtsave.core.signals import Terminated, deferred_signals
from virtsave.libvirtd import adminrpc, transport
from virtsave.libvirtd import logsettings as ls
from virtsave.libvirtd import uri as liburi
from virtsave.libvirtd.logsettings import CAPTURE_FILTERS
from virtsave.libvirtd.transport import Host, LocalHost

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
    """Reads and sets the daemon's log filters/outputs, on *host* (this machine by default; the
    daemon's host over ssh for a remote daemon).

    Over the daemon's admin socket (:mod:`virtsave.libvirtd.adminrpc`, what ``virt-admin`` itself
    speaks, without a process per call) when the admin URI names a local socket; through
    ``virt-admin`` otherwise, or when ``$VIRTSAVE_ADMIN_CLIENT`` is ``virt-admin``. Values are
    returned exactly as ``virt-admin`` shows them (see :func:`parse_admin_output`).
    """

    def __init__(self, admin_uri: str, host: Host | None = None) -> None:
        self.admin_uri = admin_uri
        self.host = host or LocalHost()
        self._holding = False
        self._held: adminrpc.AdminClient | None = None

    @property
    def socket(self) -> str | None:
        """The admin socket spoken to directly, or None: ``virt-admin`` is run."""
        if self.host.remote or os.environ.get("VIRTSAVE_ADMIN_CLIENT") == "virt-admin":
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
        # The host starts it in its own session: a Ctrl-C on the terminal must not kill virt-admin
        # half-way through putting the settings back. LC_ALL=C: the answer's labels are translated.
        where = f" on {self.host.label}" if self.host.remote else ""
        proc = self.host.run(["virt-admin", "-c", self.admin_uri, *args], env={"LC_ALL": "C"})
        if proc.returncode == 127:
            raise UnsupportedError(f"virt-admin not found{where}: it is needed to switch libvirtd's logging on")
        if proc.returncode != 0:
            msg = (proc.stderr.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
            raise ConnectionFailed(f"virt-admin -c {self.admin_uri} {args[0]}{where}: {msg}")
        return proc.stdout.decode(errors="replace")

    def daemon_identity(self) -> list[int] | None:
        """``[pid, start time]`` of the daemon (see :func:`daemon_identity`; None for a remote one)."""
        return None if self.host.remote else daemon_identity(self.admin_uri)

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


def admin_uri_for(uri: str | None, host: Host | None = None) -> str:
    """The admin URI of the daemon behind libvirt URI *uri* (``qemu:///system`` → ``libvirtd:///system``,
    or ``virtqemud:///…`` where the modular daemons run), as ``virt-admin`` on the daemon's host
    (*host*; for an ssh URI made from it when not given) needs it.

    ``$VIRTSAVE_ADMIN_URI`` wins for a local daemon. A ``socket=`` parameter names the daemon's socket:
    its admin socket is the sibling ``…-admin-sock``. Transports without a shell on the daemon's host
    (tls, tcp, ext) are refused.
    """
    target = liburi.parse(uri or os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system")
    env = os.environ.get("VIRTSAVE_ADMIN_URI")
    if env and target.is_local:
        return env
    if not target.is_local and not target.is_ssh:
        raise UnsupportedError(f"log capture needs a shell on the daemon's host; {target.uri} uses the "
                               f"{target.transport} transport (use qemu+ssh://, or trace --from-log)")
    if target.driver not in ("qemu", "libvirtd", "virtqemud"):
        raise UnsupportedError(f"log capture supports qemu:// URIs only, not {target.uri}")
    path = target.path if target.is_local else target.remote_path
    if target.driver != "qemu":
        return f"{target.driver}://{path}"
    sock = target.params.get("socket")
    if sock:
        name = sock.rsplit("/", 1)[-1]
        daemon = "virtqemud" if name.startswith("virtqemud") else "libvirtd"
        admin = f"{sock[: -len('-sock')]}-admin-sock" if sock.endswith("-sock") else f"{sock}-admin"
        return f"{daemon}://{path}?socket={admin}"
    host = host or transport.host_for(target.uri)
    where = host.info.user_runtime_dir if path == "/session" else "/run/libvirt"
    modular, monolithic = f"{where}/virtqemud-admin-sock", f"{where}/libvirt-admin-sock"
    # libvirtd (monolithic, as on this machine) or virtqemud (modular daemons).
    if host.exists(modular) and not host.exists(monolithic):
        return f"virtqemud://{path}"
    return f"libvirtd://{path}"


def admin_socket(admin_uri: str) -> Path | None:
    """The Unix socket behind admin URI *admin_uri* (:func:`adminrpc.socket_for`), as a path, or None.

    >>> admin_socket("libvirtd:///system"), admin_socket("libvirtd:///system?socket=/tmp/a.sock")
    (PosixPath('/run/libvirt/libvirt-admin-sock'), PosixPath('/tmp/a.sock'))
    """
    path = adminrpc.socket_for(admin_uri)
    return None if path is None else Path(path)


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
    """Start time (clock ticks since boot) of local process *pid*, or None when no such process: a
    recycled pid has another start time, so (pid, start) names one process."""
    return transport.proc_starttime(pid)


@dataclass
class Owner:
    """One virtsave process holding the shared capture session."""

    pid: int
    start: int | None
    session: str
    since: str = ""

    def alive(self, host: Host | None = None) -> bool:
        """Whether this process still runs (on *host*: where the state file is; default this machine)."""
        now = host.proc_starttime(self.pid) if host is not None else proc_starttime(self.pid)
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
    """Where the state, lock and capture files live (under ``config.STATE_DIR``, or the state directory
    of the host the daemon runs on)."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        base = Path(state_dir) if state_dir is not None else Path(config.STATE_DIR)
        self.base = base
        self.state = base / STATE_NAME
        self.lock = base / LOCK_NAME
        self.dir = base / DIR_NAME
        self.log = self.dir / LOG_NAME


def _paths_for(host: Host, state_dir: str | os.PathLike[str] | None) -> Paths:
    return Paths(state_dir if state_dir is not None else host.info.state_dir)


def _locked(host: Host, paths: Paths) -> contextlib.AbstractContextManager[None]:
    return host.locked(str(paths.lock))


def _load_state(host: Host, paths: Paths) -> State | None:
    data = host.read_bytes(str(paths.state))
    if data is None:
        return None
    try:
        return State.from_json(data.decode())
    except (ValueError, TypeError, KeyError) as exc:
        where = f" on {host.label}" if host.remote else ""
        raise LogError(f"{paths.state}{where}: unreadable log-capture state ({exc}); inspect it, fix the "
                       "daemon's settings with virt-admin, then delete the file") from None


def _save_state(host: Host, paths: Paths, state: State) -> None:
    """Replace the state file atomically. No fsync: the file guards against a *process* dying
    (the rename is atomic for every later reader); a host crash restarts libvirtd with its
    configured log settings, which is all a repair would have put back — and an fsync right after
    a multi-GiB save waits for the disk's write-back (measured: 4-8 ms idle, far more then)."""
    host.write_private(str(paths.state), state.to_json().encode())


def _prune(state: State, host: Host) -> list[Owner]:
    return state.prune(lambda o: o.alive(host))


def _clear(host: Host, paths: Paths) -> None:
    """Remove the state file, the capture directory and temporary state files of writers that were
    killed (or cut off) half-way."""
    host.remove(str(paths.state))
    host.remove(str(paths.dir), tree=True)
    for name in host.listdir(str(paths.base)):
        if name.startswith(f"{STATE_NAME}.tmp-"):
            host.remove(str(paths.base / name))


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


def _still_ours(cur_f: str, cur_o: str, state: State) -> bool:
    """The daemon still shows what this capture applied. A session killed after applying its filters
    but before recording libvirt's spelling of them (``filters_wrapped`` still unknown) left them in
    its input form: a wrapping daemon shows each one wrapped."""
    if not ls.same(cur_o, state.applied_outputs):
        return False
    if ls.same(cur_f, state.applied_filters):
        return True
    shown = " ".join(ls.wrap_filter(t) for t in ls.tokens(state.applied_filters))
    return state.filters_wrapped is None and ls.same(cur_f, shown)


def _restore(runner: Any, state: State, paths: Paths, host: Host) -> str | None:
    """Put the original settings back (only if the daemon still has ours); clean files.

    Returns a warning when the settings were left alone or did not read back as before. A host that
    cannot be reached (:class:`~virtsave.libvirtd.transport.HostUnreachable`) raises: its state stays
    for the next try."""
    warning = None
    cur: tuple[str, str] | None = None
    try:
        cur = get_settings(runner)
    except transport.HostUnreachable:
        raise
    except ConnectionFailed as exc:
        # Daemon gone: its settings died with it. Nothing to restore.
        warning = f"daemon not reachable while restoring log settings ({exc}); state cleared"
    now = _identity(runner) if cur is not None and state.daemon else None
    if cur is not None and now is not None and now != state.daemon:
        warning = _restarted_note(state, now, cur)
    elif cur is not None:
        cur_f, cur_o = cur
        if _still_ours(cur_f, cur_o, state):
            warning = _put_back(runner, state)
        elif ls.same(cur_f, state.original_filters) and ls.same(cur_o, state.original_outputs):
            pass  # already back (e.g. libvirtd restarted with the same config)
        else:
            warning = (f"libvirtd's log settings were changed by someone else during capture "
                       f"(filters {cur_f!r}, outputs {cur_o!r}); left as they are")
    _clear(host, paths)
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


def _restore_force(runner: Any, state: State, paths: Paths, host: Host) -> None:
    """Best effort put-back after a failure while switching logging on."""
    with contextlib.suppress(Exception):
        _put_back(runner, state)
    with contextlib.suppress(Exception):
        _clear(host, paths)


def _maybe_stale(host: Host, paths: Paths, state_dir: str | os.PathLike[str] | None) -> bool:
    """Whether a state file may be there and is ours to repair (one ``stat``, or the ssh host's
    first answer)."""
    if host.remote:
        return host.info.capture_state if state_dir is None else host.exists(str(paths.state))
    return paths.state.exists() and os.access(paths.base, os.W_OK)  # a non-root user cannot repair


def repair_if_stale(uri: str | None = None, *, state_dir: str | os.PathLike[str] | None = None,
                    runner: Any = None, host: Host | None = None) -> str | None:
    """Restore the daemon's log settings if every virtsave that switched them on has died.

    Cheap when there is nothing to do (one ``stat``; for a daemon on another host one ssh command).
    Returns a one-line description of what was repaired (or a warning), else None. URIs whose
    transport gives no shell on the daemon's host have nothing virtsave could have left: None.
    """
    own = host is None
    if host is None:
        try:
            host = transport.host_for(uri, state_dir=state_dir)
        except UnsupportedError:
            return None
    try:
        return _repair(host, _paths_for(host, state_dir), _maybe_stale(host, _paths_for(host, state_dir),
                                                                        state_dir), runner)
    finally:
        if own:
            host.close()


def _repair(host: Host, paths: Paths, maybe: bool, runner: Any) -> str | None:
    if not maybe:
        return None
    with deferred_signals(), _locked(host, paths):
        state = _load_state(host, paths)
        if state is None:
            return None
        dead = _prune(state, host)
        if state.owners:
            if dead:
                _save_state(host, paths, state)
            return None
        runner = runner or AdminRunner(state.admin_uri, host)
        with _one_connection(runner):
            warning = _restore(runner, state, paths, host)
    pids = ", ".join(str(o.pid) for o in dead) or "none"
    where = f" on {host.label}" if host.remote else ""
    return warning or (f"restored libvirtd's log settings{where} left by an interrupted virtsave (pid {pids}): "
                       f"filters {state.original_filters!r}, outputs {state.original_outputs!r}")


# --------------------------------------------------------------------------- sessions


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _quiet_level(state: State, host: Host) -> int:
    """The quiet level for this daemon; its configured ``log_level`` is read from its configuration
    file on its host (``/etc/libvirt/libvirtd.conf``, ``~/.config/libvirt/…`` for a session daemon)."""
    if not host.remote:
        return ls.quiet_level(state.original_filters, ls.configured_log_level(state.admin_uri))
    try:
        conf = host.read_bytes(ls.config_file(state.admin_uri, host.info.home))
    except OSError:
        conf = None
    level = ls.log_level_setting(conf.decode(errors="replace")) if conf is not None else None
    return ls.quiet_level(state.original_filters, level)


def _raise_notice(state: State) -> str | None:
    if not state.raised:
        return None
    return (f"libvirtd log output{'s' if len(state.raised) > 1 else ''} {' '.join(state.raised)} raised to "
            f"level {state.raise_to} while tracing, so no monitor traffic reaches "
            f"{'them' if len(state.raised) > 1 else 'it'} (--keep-log-outputs leaves them as they are)")


class CaptureSession:
    """One process's share of the capture: its byte window of the shared log.

    *host*: where the daemon runs (default: from *uri*; a host made here is closed by :meth:`stop`).
    """

    def __init__(self, uri: str | None = None, *, state_dir: str | os.PathLike[str] | None = None,
                 runner: Any = None, settle: float = 0.0, policy: OutputPolicy | None = None,
                 host: Host | None = None) -> None:
        self._own_host = host is None
        if host is None:
            host = LocalHost(state_dir) if runner is not None else transport.host_for(uri, state_dir=state_dir)
        self.host = host
        try:
            self.admin_uri = runner.admin_uri if runner is not None and hasattr(runner, "admin_uri") \
                else admin_uri_for(uri, host)
            self.paths = _paths_for(host, state_dir)
        except BaseException:
            self._close_host()
            raise
        self.runner = runner or AdminRunner(self.admin_uri, host)
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
        self._touched = False  # this session may have changed the daemon's settings or the state file

    @property
    def log_path(self) -> Path:
        """The shared capture log (all concurrent sessions write into it)."""
        return self.paths.log

    def _close_host(self) -> None:
        if self._own_host:
            self.host.close()

    def start(self) -> CaptureSession:
        """Join (or open) the shared session and mark the start of this window."""
        try:
            self._start()
        except transport.HostUnreachable as exc:
            # Cut off half-way: whatever was switched on there stays until a virtsave that can
            # reach the host finds this session's owner gone (the state file says what to undo).
            if self._touched:
                self.warning = self._unreachable_warning(exc)
            self._close_host()
            raise
        except BaseException:
            self._close_host()
            raise
        return self

    def _unreachable_warning(self, exc: Exception) -> str:
        return (f"libvirtd's log settings on {self.host.label} could not be put back ({exc}); "
                "the next virtsave command against that host will")

    def _start(self) -> None:
        host = self.host
        pid, start = host.owner()
        me = Owner(pid=pid, start=start, session=self.session, since=_utcnow().isoformat())
        with deferred_signals(), _locked(host, self.paths), _one_connection(self.runner):
            state = _load_state(host, self.paths)
            if state is not None:
                _prune(state, host)
                restarted = state.daemon is not None and _identity(self.runner) not in (None, state.daemon)
                if not state.owners or restarted:  # every earlier owner died, or the daemon lost our settings:
                    self.warning = _restore(self.runner, state, self.paths, host)  # repair, then start afresh
                    state = None
            self._touched = True
            if state is None:
                state = self._open(me)
            else:
                self._join(state, me)
            _save_state(host, self.paths, state)
            self.notice = _raise_notice(state)
            if self.policy.keep and state.raised:
                self.notice = (f"{self.notice}; another virtsave trace shares this capture without "
                               "--keep-log-outputs, so they stay raised until it ends")
            self.start_offset = host.size(str(self.paths.log))
            self.since = _utcnow()
            self._active = True

    def _new_capture_log(self) -> None:
        self.host.new_private_file(str(self.paths.log))

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
            state.raise_to = _quiet_level(state, self.host)
            state.raised = ls.raised_outputs(orig_o, state.raise_to)[1]
        want_f = ls.capture_filters(orig_f, None)
        want_o = ls.capture_outputs(orig_o, self.paths.log, state.raise_to)
        state.applied_filters, state.applied_outputs = want_f, want_o
        # State first: if we die between here and the end, the next run knows what to restore.
        _save_state(self.host, self.paths, state)
        try:
            # Outputs first (ours there, theirs raised) before the filters let monitor lines through.
            got_f, got_o = set_settings(self.runner, want_f, want_o, outputs_first=True)
            state.filters_wrapped = ls.detect_wrapping(got_f, want_f)
            right_f = ls.capture_filters(orig_f, state.filters_wrapped)
            if right_f != want_f:  # the daemon does not wrap: the operator's part needs its shown form
                state.applied_filters = right_f
                _save_state(self.host, self.paths, state)
                got_f, got_o = set_settings(self.runner, right_f, None, outputs_first=False)
            # libvirt's own spelling, so the "still ours?" check at the end compares equal.
            state.applied_filters, state.applied_outputs = got_f, got_o
            state.daemon = _identity(self.runner)
        except BaseException:
            _restore_force(self.runner, state, self.paths, self.host)
            raise
        return state

    def _join(self, state: State, me: Owner) -> None:
        """A later session: count in; raise the operator's outputs if this one wants them quiet
        and the shared capture left them as they were."""
        state.owners.append(me)
        if self.policy.keep or state.raise_to is not None:
            return
        raise_to = _quiet_level(state, self.host)
        want_o = ls.capture_outputs(state.original_outputs, self.paths.log, raise_to)
        cur_f, cur_o = get_settings(self.runner)
        if not _still_ours(cur_f, cur_o, state):
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
        until the file stops growing for that long. The log is on the daemon's host.
        """
        log = str(self.paths.log)
        end = self.host.size(log)
        deadline = time.monotonic() + max(self.settle * 5, 0.05)
        while end and not self._ends_line(log, end) and time.monotonic() < deadline:
            time.sleep(0.002)
            end = self.host.size(log)
        if self.settle <= 0:
            return end
        while time.monotonic() < deadline:
            time.sleep(self.settle / 3)
            now = self.host.size(log)
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
        if self.host.remote:
            self._window = self._copy_remote_window(self.end_offset)
        else:
            self._window = self._copy_local_window(self.end_offset)
        return self._window

    def _ends_line(self, log: str, size: int) -> bool:
        """Whether the byte before offset *size* of *log* is a newline (a file gone: nothing more comes)."""
        last = self.host.read_bytes(log, size - 1, 1)
        return last is None or last == b"\n"

    def _copy_local_window(self, end: int) -> Path:
        path = self.paths.dir / f"window-{self.session}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out, open(self.paths.log, "rb") as src:
            src.seek(self.start_offset)
            left = end - self.start_offset
            while left > 0:
                chunk = src.read(min(left, 1 << 20))
                if not chunk:
                    break
                out.write(chunk)
                left -= len(chunk)
        return path

    def _copy_remote_window(self, end: int) -> Path:
        """Only this window's bytes come over the connection, into a private local file."""
        data = self.host.read_bytes(str(self.paths.log), self.start_offset, max(0, end - self.start_offset))
        fd, name = tempfile.mkstemp(prefix=f"virtsave-window-{self.session}-", suffix=".log")  # mode 0600
        with os.fdopen(fd, "wb") as out:
            out.write(data or b"")
        return Path(name)

    def window_path(self) -> Path:
        """Path of this session's log slice (valid until the session ends)."""
        return self.finish_window()

    def window_text(self) -> str:
        """This session's log slice as text."""
        return self.finish_window().read_text(errors="replace")

    def stop(self) -> str | None:
        """Leave the shared session; the last one out restores the settings. Returns a warning, if any."""
        if not self._active:
            self._close_host()
            return self.warning
        try:
            self._leave()
        except transport.HostUnreachable as exc:
            self.warning = self._unreachable_warning(exc)
        finally:
            self._close_host()
        return self.warning

    def _leave(self) -> None:
        host = self.host
        self._active = False
        if self._window is not None:
            with contextlib.suppress(FileNotFoundError):
                self._window.unlink()
        with deferred_signals(), _locked(host, self.paths), _one_connection(self.runner):
            state = _load_state(host, self.paths)
            if state is None:
                return
            state.owners = [o for o in state.owners if o.session != self.session]
            _prune(state, host)
            if state.owners:
                _save_state(host, self.paths, state)
            else:
                self.warning = _restore(self.runner, state, self.paths, host) or self.warning


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
            policy: OutputPolicy | None = None, host: Host | None = None) -> Iterator[CaptureSession]:
    """Monitor logging on for the ``with`` block; settings restored on exit, error, Ctrl-C or SIGTERM.

    *policy* (default: the one :func:`output_policy` set, else raise the operator's outputs)
    decides what happens to the operator's own log outputs; its notice goes to
    ``policy.announce``, else to *on_warning*. Read the window (``window_text()``/``window_path()``)
    inside the block: the per-session file is removed when the block ends. *host*: where the
    daemon runs (default: from *uri*, closed at the end).
    """
    own = host is None
    if host is None:
        host = LocalHost(state_dir) if runner is not None else transport.host_for(uri, state_dir=state_dir)
    try:
        repaired = repair_if_stale(uri, state_dir=state_dir, runner=runner, host=host)
        if repaired and on_warning:
            on_warning(repaired)
        sess = CaptureSession(uri, state_dir=state_dir, runner=runner, policy=policy, host=host)
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
    finally:
        if own:
            host.close()
