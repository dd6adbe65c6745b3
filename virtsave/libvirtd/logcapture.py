"""Switch libvirtd's QMP monitor logging on for the length of an operation, then put it back.

libvirt-python has no admin API binding, so the daemon's log settings are read and changed
with ``virt-admin daemon-log-filters`` / ``daemon-log-outputs``. Several virtsave processes may
trace at the same time on one daemon, so logging is a **refcounted shared session**:

- the first session (under an ``fcntl.flock`` lock) reads the operator's filters and outputs,
  writes them into a state file (``STATE_DIR/logcapture.json``) together with its pid, then
  puts our filters in front of the operator's and adds one private output file
  (``STATE_DIR/logcapture/capture.log``, directory 0700, file 0600) to the operator's outputs —
  so an existing log keeps working;
- each session records its own window of that file (byte offsets and UTC timestamps at its
  start and end) and copies only that slice into a private per-session file;
- the last session out restores the original filters and outputs and deletes the capture log;
- owners whose pid is gone (SIGKILL) are dropped whenever the state is touched; when none are
  left the originals are restored. :func:`repair_if_stale` does only that and costs one
  ``stat`` when there is nothing to repair, so every command talking to the daemon can call it.

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
import datetime as _dt
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from virtsave.core import paths as config
from virtsave.core.errors import ConnectionFailed, LogError, UnsupportedError
from virtsave.core.signals import Terminated, deferred_signals

# Filters that make the log name the domain (DESIGN.md §3): monitor I/O, the job lines
# ("Starting job: API=… vm=0x… name=NAME") and qemuProcessStart ("vm=0x… name=NAME").
CAPTURE_FILTERS = ("1:monitor", "1:job", "1:qemu.qemu_process")
STATE_VERSION = 1
STATE_NAME = "logcapture.json"
LOCK_NAME = "logcapture.lock"
DIR_NAME = "logcapture"
LOG_NAME = "capture.log"


# --------------------------------------------------------------------------- admin runner


class AdminRunner:
    """Reads and sets the daemon's log filters/outputs through ``virt-admin``."""

    def __init__(self, admin_uri: str) -> None:
        self.admin_uri = admin_uri

    def _run(self, *args: str) -> str:
        # start_new_session: a Ctrl-C on the terminal must not kill virt-admin half-way
        # through putting the settings back.
        try:
            proc = subprocess.run(["virt-admin", "-c", self.admin_uri, *args], capture_output=True,
                                  text=True, timeout=60, start_new_session=True, check=False)
        except FileNotFoundError:
            raise UnsupportedError("virt-admin not found: it is needed to switch libvirtd's logging on") from None
        except subprocess.TimeoutExpired:
            raise ConnectionFailed(f"virt-admin -c {self.admin_uri} {args[0]} timed out") from None
        if proc.returncode != 0:
            msg = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            raise ConnectionFailed(f"virt-admin -c {self.admin_uri} {args[0]}: {msg}")
        return proc.stdout

    def get_filters(self) -> str:
        return parse_admin_output(self._run("daemon-log-filters"), "filters")

    def get_outputs(self) -> str:
        return parse_admin_output(self._run("daemon-log-outputs"), "outputs")

    def set_filters(self, value: str) -> None:
        self._run("daemon-log-filters", "--filters", value)

    def set_outputs(self, value: str) -> None:
        self._run("daemon-log-outputs", "--outputs", value)

    # One virt-admin process for several commands (vsh's "a; b" syntax): each process start
    # costs ~15-60 ms, and a traced save would otherwise pay for ten of them.
    def get_settings(self) -> tuple[str, str]:
        out = self._run("daemon-log-filters; daemon-log-outputs")
        return parse_admin_output(out, "filters"), parse_admin_output(out, "outputs")

    def set_settings(self, filters: str, outputs: str, *, outputs_first: bool) -> tuple[str, str]:
        """Set both, in the given order, and read them back in libvirt's own spelling."""
        set_f = f"daemon-log-filters --filters {_vsh_quote(filters)}"
        set_o = f"daemon-log-outputs --outputs {_vsh_quote(outputs)}"
        first, second = (set_o, set_f) if outputs_first else (set_f, set_o)
        out = self._run(f"{first}; {second}; daemon-log-filters; daemon-log-outputs")
        return parse_admin_output(out, "filters"), parse_admin_output(out, "outputs")


def _vsh_quote(value: str) -> str:
    if "'" in value:
        raise LogError(f"log setting contains a quote, refusing: {value!r}")
    return f"'{value}'"


def get_settings(runner: Any) -> tuple[str, str]:
    """(filters, outputs) through *runner*, in one round trip when it can."""
    if hasattr(runner, "get_settings"):
        return runner.get_settings()
    return runner.get_filters(), runner.get_outputs()


def set_settings(runner: Any, filters: str, outputs: str, *, outputs_first: bool) -> tuple[str, str]:
    """Set filters and outputs (order matters: never log debug lines into nowhere); read back."""
    if hasattr(runner, "set_settings"):
        return runner.set_settings(filters, outputs, outputs_first=outputs_first)
    if outputs_first:
        runner.set_outputs(outputs)
        runner.set_filters(filters)
    else:
        runner.set_filters(filters)
        runner.set_outputs(outputs)
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


def parse_admin_output(text: str, kind: str) -> str:
    """The value in virt-admin's `` Logging filters: …`` / `` Logging outputs: …`` answer."""
    label = f"Logging {kind}:"
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(label):
            return " ".join(line[len(label):].split())
    raise LogError(f"unexpected virt-admin answer for daemon-log-{kind}: {text.strip()[:200]!r}")


# --------------------------------------------------------------------------- pure settings logic


def capture_output_spec(log_path: str | os.PathLike[str]) -> str:
    """The output we add: every message reaching level 1 (debug) goes to *log_path*."""
    return f"1:file:{os.fspath(log_path)}"


def norm_filter(token: str) -> str:
    """libvirt reads ``1:monitor`` back as ``1:*monitor*``: compare filters in the short spelling."""
    level, sep, match = token.partition(":")
    if sep and match.startswith("*") and match.endswith("*") and "*" not in match[1:-1] and len(match) > 2:
        match = match[1:-1]
    return f"{level}{sep}{match}"


def merge_filters(original: str, ours: tuple[str, ...] = CAPTURE_FILTERS) -> str:
    """Our filters first (libvirt uses the first filter that matches a source), then the operator's."""
    own = list(ours)
    rest = [f for f in original.split() if norm_filter(f) not in own]
    return " ".join(own + rest)


def merge_outputs(original: str, log_path: str | os.PathLike[str]) -> str:
    """The operator's outputs plus ours (theirs keep their own levels, so their logs are unchanged)."""
    spec = capture_output_spec(log_path)
    rest = [o for o in original.split() if o != spec]
    return " ".join([*rest, spec])


def strip_ours(filters: str, outputs: str, log_path: str | os.PathLike[str]) -> tuple[str, str]:
    """Undo :func:`merge_filters`/:func:`merge_outputs` on settings found live without a state file
    (state file lost after a crash): our output is recognisable by its path, and then the leading
    filters are ours too."""
    spec = capture_output_spec(log_path)
    outs = outputs.split()
    if spec not in outs:
        return filters, outputs
    outs = [o for o in outs if o != spec]
    flt = filters.split()
    n = len(CAPTURE_FILTERS)
    if tuple(norm_filter(f) for f in flt[:n]) == CAPTURE_FILTERS:
        flt = flt[n:]
    return " ".join(flt), " ".join(outs)


def same_setting(a: str, b: str) -> bool:
    """Filters/outputs compare as whitespace-separated lists (filters in their short spelling)."""
    return [norm_filter(x) for x in a.split()] == [norm_filter(x) for x in b.split()]


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
    """What ``logcapture.json`` holds while logging is switched on."""

    admin_uri: str
    original_filters: str
    original_outputs: str
    applied_filters: str
    applied_outputs: str
    log: str
    owners: list[Owner] = field(default_factory=list)
    version: int = STATE_VERSION

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
    tmp = paths.state.with_name(f"{STATE_NAME}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(state.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, paths.state)


def _restore(runner: Any, state: State, paths: Paths) -> str | None:
    """Put the original settings back (only if the daemon still has ours); clean files.

    Returns a warning when the settings were left alone."""
    warning = None
    try:
        cur_f, cur_o = get_settings(runner)
    except ConnectionFailed as exc:
        # Daemon gone: its settings died with it. Nothing to restore.
        cur_f = cur_o = None
        warning = f"daemon not reachable while restoring log settings ({exc}); state cleared"
    if cur_f is not None and cur_o is not None:
        if same_setting(cur_f, state.applied_filters) and same_setting(cur_o, state.applied_outputs):
            # Filters first: stop producing debug lines before the output goes away.
            set_settings(runner, state.original_filters, state.original_outputs, outputs_first=False)
        elif same_setting(cur_f, state.original_filters) and same_setting(cur_o, state.original_outputs):
            pass  # already back (e.g. libvirtd restarted with the same config)
        else:
            warning = (f"libvirtd's log settings were changed by someone else during capture "
                       f"(filters {cur_f!r}, outputs {cur_o!r}); left as they are")
    with contextlib.suppress(FileNotFoundError):
        paths.state.unlink()
    shutil.rmtree(paths.dir, ignore_errors=True)
    return warning


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


class CaptureSession:
    """One process's share of the capture: its byte window of the shared log."""

    def __init__(self, uri: str | None = None, *, state_dir: str | os.PathLike[str] | None = None,
                 runner: Any = None, settle: float = 0.15) -> None:
        self.admin_uri = runner.admin_uri if runner is not None and hasattr(runner, "admin_uri") \
            else admin_uri_for(uri)
        self.runner = runner or AdminRunner(self.admin_uri)
        self.paths = Paths(state_dir)
        self.session = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.settle = settle
        self.start_offset = 0
        self.end_offset: int | None = None
        self.since: _dt.datetime | None = None
        self.until: _dt.datetime | None = None
        self.first = False
        self.warning: str | None = None
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
        with deferred_signals(), _locked(self.paths):
            state = _load_state(self.paths)
            if state is not None:
                state.prune()
                if not state.owners:  # every earlier owner died: repair, then start afresh
                    self.warning = _restore(self.runner, state, self.paths)
                    state = None
            if state is None:
                self.first = True
                orig_f, orig_o = get_settings(self.runner)
                orig_f, orig_o = strip_ours(orig_f, orig_o, self.paths.log)
                self.paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(self.paths.dir, 0o700)
                fd = os.open(self.paths.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                os.fchmod(fd, 0o600)
                os.close(fd)
                state = State(admin_uri=self.admin_uri, original_filters=orig_f, original_outputs=orig_o,
                              applied_filters=merge_filters(orig_f),
                              applied_outputs=merge_outputs(orig_o, self.paths.log),
                              log=str(self.paths.log), owners=[me])
                # State first: if we die between here and the end, the next run knows what to restore.
                _save_state(self.paths, state)
                try:
                    # Stores libvirt's own spelling so the "still ours?" check at the end compares equal.
                    state.applied_filters, state.applied_outputs = set_settings(
                        self.runner, state.applied_filters, state.applied_outputs, outputs_first=True)
                except BaseException:
                    state.applied_filters = merge_filters(orig_f)
                    state.applied_outputs = merge_outputs(orig_o, self.paths.log)
                    _restore_force(self.runner, state, self.paths)
                    raise
            else:
                state.owners.append(me)
            _save_state(self.paths, state)
            self.start_offset = _size(self.paths.log)
            self.since = _utcnow()
            self._active = True
        return self

    def _settle(self) -> None:
        # The daemon may still be writing the last event lines of the operation: wait until the
        # file stops growing for a moment (bounded).
        deadline = time.monotonic() + max(self.settle * 5, 1.0)
        last = _size(self.paths.log)
        while time.monotonic() < deadline:
            time.sleep(self.settle / 3)
            now = _size(self.paths.log)
            if now == last:
                break
            last = now

    def finish_window(self) -> Path:
        """Close this session's window (idempotent) and copy the slice to a private file."""
        if self._window is not None:
            return self._window
        if not self._active:
            raise LogError("capture session not started")
        self._settle()
        self.until = _utcnow()
        self.end_offset = _size(self.paths.log)
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
        with deferred_signals(), _locked(self.paths):
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


def _restore_force(runner: Any, state: State, paths: Paths) -> None:
    """Best effort put-back after a failure while switching logging on."""
    with contextlib.suppress(Exception):
        runner.set_filters(state.original_filters)
    with contextlib.suppress(Exception):
        runner.set_outputs(state.original_outputs)
    with contextlib.suppress(FileNotFoundError):
        paths.state.unlink()
    shutil.rmtree(paths.dir, ignore_errors=True)


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
            runner: Any = None, on_warning: Callable[[str], None] | None = None) -> Iterator[CaptureSession]:
    """Monitor logging on for the ``with`` block; settings restored on exit, error, Ctrl-C or SIGTERM.

    Read the window (``window_text()``/``window_path()``) inside the block: the per-session file
    is removed when the block ends.
    """
    repaired = repair_if_stale(uri, state_dir=state_dir, runner=runner)
    if repaired and on_warning:
        on_warning(repaired)
    sess = CaptureSession(uri, state_dir=state_dir, runner=runner)
    with _term_as_interrupt():
        try:
            sess.start()  # a signal held during start() is raised after it: stop() still runs
            yield sess
        finally:
            warning = sess.stop()
            if warning and on_warning:
                on_warning(warning)
