"""Property-based fuzzing of every virtsave reader of untrusted input (issue 15, item 1).

Shared by ``tests/unit/test_fuzz.py`` (a bounded budget in the default test command) and
``scripts/fuzz`` (``--minutes N``: longer runs that print cases tried and failures per target).
``tests/`` is on ``sys.path`` (pytest puts it there; ``scripts/fuzz`` too), so both import this
module as ``fuzzing``.

The guarantee every target checks: on any input a reader returns a result or raises virtsave's
one-line error (a :class:`~virtsave.core.errors.VirtsaveError`); any other exception, a run past
:data:`HANG_SECONDS`, or the process's peak memory growing by more than :data:`MEMORY_MIB` during one
example is a failure. Some targets also check a property of the result (a log's import is a valid
trace; an export reads back).

Inputs are the recorded fixtures (libvirtd logs of both stacks, QEMU domain logs, traces) and
synthetic save images built like QEMU writes them (``tests/unit/test_saveimage.py``), mutated:
truncated, bits flipped, bytes set, chunks deleted, repeated or spliced in from another seed, numbers
made huge (or negative, or fractional), odd encodings (Latin-1, invalid UTF-8, NUL, CR, BOM,
UTF-16, overlong sequences, lone surrogates); traces also structurally (a value replaced by another
JSON value — huge integers, deep nesting, odd strings —, keys dropped, list items repeated);
images also field-wise (a 32- or 64-bit big- or little-endian integer set to an edge value).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import gzip
import io
import json
import os
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from virtsave.core.errors import VirtsaveError

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"
DATA = REPO / "tests" / "unit" / "data"

#: An example running longer than this is a hang (the inputs are at most a few MB).
HANG_SECONDS = 20.0
#: An example raising the process's peak memory (ru_maxrss) by more than this is a failure.
MEMORY_MIB = 256
#: Mutated inputs are cut to this size (repeats and splices could grow them without end).
MAX_INPUT = 4 * 1024 * 1024

settings.register_profile(
    "virtsave-fuzz",
    deadline=None,                 # time is bounded by HANG_SECONDS (a hard alarm), not per-example timing
    derandomize=True,              # the default test command explores the same examples every run
    database=None,                 # nothing written into the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
#: scripts/fuzz: random exploration, one budget per target.
settings.register_profile("virtsave-fuzz-long", parent=settings.get_profile("virtsave-fuzz"), derandomize=False)


# --------------------------------------------------------------------------- bounds


class Unacceptable(AssertionError):
    """A reader broke the guarantee (other exception, hang, memory)."""


class _Hang(BaseException):
    """Raised by the alarm inside the reader (a BaseException: ``except Exception`` cannot swallow it)."""


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _on_alarm(_signum: int, _frame: Any) -> None:
    raise _Hang


@contextlib.contextmanager
def bounded(what: str) -> Iterator[None]:
    """Run the block under the time and memory bounds; a VirtsaveError is an acceptable outcome."""
    old = signal.signal(signal.SIGALRM, _on_alarm)
    before = _maxrss_mib()
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    try:
        yield
    except VirtsaveError as exc:
        if not str(exc).strip():
            raise Unacceptable(f"{what}: {type(exc).__name__} without a message") from exc
    except _Hang:
        raise Unacceptable(f"{what}: no answer within {HANG_SECONDS:.0f} s (hang)") from None
    except Unacceptable:
        raise
    except Exception as exc:
        raise Unacceptable(f"{what}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    grown = _maxrss_mib() - before
    if grown > MEMORY_MIB:
        raise Unacceptable(f"{what}: peak memory grew by {grown:.0f} MiB (bound {MEMORY_MIB} MiB)")


#: Scratch files of the examples (one directory per process, removed at exit).
_SCRATCH = Path(tempfile.mkdtemp(prefix="virtsave-fuzz-"))


def scratch(name: str, data: bytes) -> Path:
    p = _SCRATCH / name
    p.write_bytes(data)
    return p


def cleanup() -> None:
    shutil.rmtree(_SCRATCH, ignore_errors=True)


atexit.register(cleanup)


# --------------------------------------------------------------------------- seeds


@cache
def log_seeds() -> dict[str, bytes]:
    """libvirtd debug logs of both stacks (monitor-only and attributed), whole."""
    out = {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(FIX.glob("libvirt-*/*.log"))}
    out["unit/failed-save-enospc"] = (DATA / "libvirt-11.3-failed-save-enospc.log").read_bytes()
    with gzip.open(DATA / "libvirt-11.3-five-saves.log.gz") as f:
        out["unit/five-saves(first 400 KB)"] = f.read(400_000)
    return out


@cache
def small_log_seeds() -> dict[str, bytes]:
    """The save logs (16–35 KB: one save each), for the targets that parse several times per example."""
    return {k: v for k, v in log_seeds().items() if len(v) < 64_000}


@cache
def domain_log_seeds() -> dict[str, bytes]:
    out = {p.name: p.read_bytes() for p in sorted(FIX.glob("qemu-domain-logs/*.log"))}
    # A domain log of the current stack, as virtlogd writes it: made from a live trace's argv.
    t = json.loads((DATA / "trace-v1-live-cycle.json").read_text())
    argv = t["domain"]["argv"]
    head = ("2026-11-30 10:35:31.254+0000: starting up libvirt version: 11.3.0, package: 11.3.0-2 (Debian), "
            "qemu version: 10.0.2Debian 1:10.0.2+ds-1, kernel: 6.18.44, hostname: vm\n")
    body = "LC_ALL=C \\\nPATH=/usr/bin \\\n" + " \\\n".join(_shell_quote(a) for a in argv) + "\n"
    tail = ("char device redirected to /dev/pts/3 (label charserial0)\n"
            "2026-11-30 10:36:00.001+0000: shutting down, reason=saved\n")
    out["live-11.3(made)"] = (head + body + tail).encode()
    return out


def _shell_quote(s: str) -> str:
    return s if re.fullmatch(r"[\w@%+=:,./-]+", s) else "'" + s.replace("'", "'\\''") + "'"


@cache
def trace_seeds() -> dict[str, dict[str, Any]]:
    """Recorded traces (live, imported, replays) and one synthetic trace (tests/badinput.py)."""
    from badinput import synthetic_trace

    out = {p.name: json.loads(p.read_text()) for p in sorted(DATA.glob("trace-v1-*.json"))}
    out["synthetic"] = synthetic_trace()
    return out


@cache
def image_seeds() -> dict[str, bytes]:
    """Synthetic save images following QEMU's stream format (raw with and without vmstate description
    and section footers, sparse/mapped-ram, gzip), built by tests/unit/test_saveimage.py's builders."""
    from unit import test_saveimage as ts

    out = {}
    for name, kw in (("raw", {}), ("raw-no-vmdesc", {"vmdesc": False}), ("raw-no-footers", {"footers": False}),
                     ("sparse", {"fmt": "sparse"}), ("gzip", {"fmt": "gzip"})):
        p = _SCRATCH / f"seed-{name}.save"
        ts.make_image(p, **kw)
        out[name] = p.read_bytes()
        p.unlink()
    return out


# --------------------------------------------------------------------------- byte mutations

#: Replacements for a decimal number found in the input ("huge numbers" and edge values).
NUMBERS = [b"0", b"-1", b"1" + b"0" * 40, b"9" * 5000, b"-" + b"9" * 30, b"4294967296", b"18446744073709551616",
           b"9223372036854775808", b"1e999", b"-1e999", b"0.5", b"NaN", b"Infinity", b"00000000001", b"0x7fffffff"]
#: Odd encodings spliced into text.
ENCODINGS = [b"\xe9t\xe9", b"\xff\xfe", b"\x00", b"\r", b"\xef\xbb\xbf", "zée".encode("utf-16"), b"\xc0\xaf",
             b"\xed\xa0\x80", b"\x80\x80\x80", b"\n", b"\\", b'"', b"\t\x0b\x0c", b"\xf4\x90\x80\x80", b"\x1b[31m"]
_NUM_RE = re.compile(rb"\d+")

Mutation = tuple[str, float, int, int]
mutation_st = st.tuples(
    st.sampled_from(["truncate", "flip", "byte", "delete", "repeat", "splice", "number", "encoding",
                     "line-delete", "line-repeat", "line-swap"]),
    st.floats(0, 1, exclude_max=True, allow_nan=False),
    st.integers(0, 4096),
    st.integers(0, 255),
)
mutations_st = st.lists(mutation_st, min_size=1, max_size=6)


def _at(data: bytes, where: float) -> int:
    return min(int(where * len(data)), max(len(data) - 1, 0))


def _line_bounds(data: bytes, where: float) -> tuple[int, int]:
    i = _at(data, where)
    start = data.rfind(b"\n", 0, i) + 1
    end = data.find(b"\n", i)
    return start, (len(data) if end < 0 else end + 1)


def _mutate_lines(data: bytes, op: str, where: float, n: int) -> bytes:
    s, e = _line_bounds(data, where)
    line = data[s:e]
    if op == "line-delete":
        return data[:s] + data[e:]
    if op == "line-repeat":
        return data[:e] + line * (1 + n % 50) + data[e:]
    s2, e2 = _line_bounds(data, (where + (n + 1) / 4097) % 1.0)   # line-swap with a later line
    if s2 <= s:
        return data
    return data[:s] + data[s2:e2] + data[e:s2] + line + data[e2:]


def mutate(data: bytes, ops: list[Mutation], donors: list[bytes]) -> bytes:
    """Apply the byte-level mutations *ops* to *data* (donors feed splices)."""
    for op, where, n, v in ops:
        if not data and op != "splice":
            break
        i = _at(data, where)
        if op == "truncate":
            data = data[:i]
        elif op == "flip":
            data = data[:i] + bytes([data[i] ^ (1 << (v % 8))]) + data[i + 1:]
        elif op == "byte":
            data = data[:i] + bytes([v]) + data[i + 1:]
        elif op == "delete":
            data = data[:i] + data[i + 1 + n:]
        elif op == "repeat":
            chunk = data[i:i + 1 + n % 512]
            data = data[:i] + chunk * (2 + v) + data[i:]
        elif op == "splice":
            donor = donors[v % len(donors)] if donors else data
            j = _at(donor, (where * 7.31) % 1.0)
            data = data[:i] + donor[j:j + 1 + n] + data[i:]
        elif op == "number":
            nums = list(_NUM_RE.finditer(data, i)) or list(_NUM_RE.finditer(data))
            if nums:
                m = nums[n % len(nums)]
                data = data[:m.start()] + NUMBERS[v % len(NUMBERS)] + data[m.end():]
        elif op == "encoding":
            data = data[:i] + ENCODINGS[v % len(ENCODINGS)] + data[i + n % 4:]
        else:
            data = _mutate_lines(data, op, where, n)
        data = data[:MAX_INPUT]
    return data


# --------------------------------------------------------------------------- structural (JSON) mutations

_edge_ints = st.sampled_from([0, -1, 2**31, 2**32, 2**63, 2**64, -(2**63) - 1, 10**30, 10**4000])
json_scalar_st = st.one_of(
    st.none(), st.booleans(), _edge_ints, st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.sampled_from(["", "..", "../../etc/shadow", "\x00", "\udcff", "fd:migrate", "exec:id",
                                           "file:/dev/fdset/1,offset=0x400", "/dev/fdset/0", "libvirt-1", "☃" * 50,
                                           "x" * 100_000]),
)
json_value_st = st.recursive(json_scalar_st, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)

Edit = tuple[str, int, Any]
edit_st = st.tuples(st.sampled_from(["replace", "replace", "delete", "repeat", "nest", "retype"]),
                    st.integers(0, 1 << 20), json_value_st)
edits_st = st.lists(edit_st, min_size=1, max_size=4)


def _nodes(obj: Any) -> list[tuple[tuple[Any, ...], Any]]:
    """Every node of *obj* with its path, depth first (iterative: mutated objects may nest deeply)."""
    out: list[tuple[tuple[Any, ...], Any]] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), obj)]
    while stack:
        path, node = stack.pop()
        out.append((path, node))
        if isinstance(node, dict):
            stack.extend(((*path, k), v) for k, v in reversed(list(node.items())))
        elif isinstance(node, list):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(node))))
    return out


def _set(root: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = root
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    return root


def _retype(v: Any) -> Any:
    if isinstance(v, str):
        return [v]
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, list):
        return {str(i): x for i, x in enumerate(v)}
    if isinstance(v, dict):
        return list(v.values())
    return 0


_DEEP = "\x00deep:"
_DEEP_RE = re.compile(r'"\\u0000deep:(\d+):((?:[^"\\]|\\.)*)"')


def dumps_edited(obj: Any) -> str:
    """JSON text of an edited object, its ``nest`` markers spelled out as N nested lists."""
    def deep(m: re.Match[str]) -> str:
        n = int(m.group(1))
        return "[" * n + json.loads(f'"{m.group(2)}"') + "]" * n
    return _DEEP_RE.sub(deep, json.dumps(obj))


def edit_json(obj: Any, edits: list[Edit]) -> Any:
    """Apply structural *edits* to a deep copy of *obj*."""
    obj = copy.deepcopy(obj)
    for op, index, value in edits:
        nodes = [(p, n) for p, n in _nodes(obj) if not (isinstance(n, str) and n.startswith(_DEEP))]
        if not nodes:
            break
        path, node = nodes[index % len(nodes)]
        if op == "replace":
            obj = _set(obj, path, value)
        elif op == "retype":
            obj = _set(obj, path, _retype(node))
        elif op == "nest":   # N brackets around the node, spelled out by dumps_edited (json.dumps would recurse)
            obj = _set(obj, path, f"{_DEEP}{1 + index % 3000}:{json.dumps(node)}")
        elif path:
            parent = obj
            for k in path[:-1]:
                parent = parent[k]
            if op == "delete":
                del parent[path[-1]]
            elif isinstance(parent, list):          # repeat a list item
                parent[path[-1]:path[-1]] = [copy.deepcopy(node)] * (1 + index % 200)
    return obj


# --------------------------------------------------------------------------- image field mutations

_FIELD_VALUES = [0, 1, 0x7F, 0xFF, 0x7E, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 2**63, 2**40,
                 92, 1024, 4096, 0x100000]
FieldEdit = tuple[float, int, int]
field_edit_st = st.tuples(st.floats(0, 1, exclude_max=True, allow_nan=False), st.integers(0, 4),
                          st.integers(0, len(_FIELD_VALUES) - 1))
field_edits_st = st.lists(field_edit_st, max_size=4)
_FMTS = ["B", ">H", ">I", "<I", ">Q"]


def edit_fields(data: bytes, edits: list[FieldEdit], *, header_bias: bool = True) -> bytes:
    """Set integers in *data* (QEMU stream fields are big-endian, libvirt's header little-endian)."""
    buf = bytearray(data)
    for where, fmt_i, val_i in edits:
        fmt = _FMTS[fmt_i]
        size = struct.calcsize(fmt)
        # half of the edits land in the first 4 KiB: the libvirt header and the stream's start
        span = 4096 if header_bias and where < 0.5 else len(buf)
        at = min(int((where * 2 % 1.0) * span), max(len(buf) - size, 0))
        val = _FIELD_VALUES[val_i] & ((1 << (8 * size)) - 1)
        buf[at:at + size] = struct.pack(fmt, val)
    return bytes(buf)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One reader of untrusted input: a strategy for its input and a check run on each example."""

    name: str
    what: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]
    examples: int            # the default test command's budget for this target


TRIED: dict[str, int] = {}


def _count(name: str) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1


# libvirtd debug logs ----------------------------------------------------------------------------

def _mutated(seeds: Callable[[], dict[str, bytes]]) -> st.SearchStrategy[tuple[str, bytes]]:
    return st.tuples(st.sampled_from(sorted(seeds())), mutations_st).map(
        lambda t: (t[0], mutate(seeds()[t[0]], t[1], list(seeds().values()))))


def _json_line_mutated(seeds: Callable[[], dict[str, bytes]]) -> st.SearchStrategy[tuple[str, bytes]]:
    """A monitor line's JSON payload edited structurally, the rest of the log as recorded."""
    def apply(t: tuple[str, float, list[Edit]]) -> tuple[str, bytes]:
        name, where, edits = t
        data = seeds()[name]
        starts = [m.start() for m in re.finditer(rb"(?:msg|buf|reply|event)=\{", data)]
        if not starts:
            return name, data
        at = starts[int(where * len(starts)) % len(starts)]
        brace = data.index(b"{", at)
        end = data.find(b"\n", brace)
        end = len(data) if end < 0 else end
        raw = data[brace:end].rstrip(b"\r")
        try:
            obj = json.loads(raw)
        except ValueError:
            return name, data
        new = dumps_edited(edit_json(obj, edits)).encode()[:MAX_INPUT]
        return name, data[:brace] + new + (b"\r" if data[brace:end].endswith(b"\r") else b"") + data[end:]
    return st.tuples(st.sampled_from(sorted(seeds())), st.floats(0, 1, exclude_max=True, allow_nan=False),
                     edits_st).map(apply)


def log_input(seeds: Callable[[], dict[str, bytes]]) -> st.SearchStrategy[tuple[str, bytes]]:
    return st.one_of(_mutated(seeds), _json_line_mutated(seeds))


def check_log_import(inp: tuple[str, bytes]) -> None:
    """``virtsave trace DOM --from-log LOG``: the import, its rendering of ambiguous monitors; an
    imported trace must be valid (it is written and read back by every other command)."""
    from virtsave.cli.tracecmd import render_monitors
    from virtsave.core.errors import AmbiguousMonitor
    from virtsave.libvirtd import capture
    from virtsave.trace import model as tr

    _count("log-import")
    name, data = inp
    path = scratch("libvirtd.log", data)
    for domain in (None, "fx"):
        with bounded(f"import_log({name}, domain={domain})"):
            try:
                t = capture.import_log(path, domain)
            except AmbiguousMonitor as exc:
                render_monitors(exc.monitors)
                raise
            problems = tr.validate(json.loads(tr.dumps(t)))
            if problems:
                raise Unacceptable(f"import_log({name}) wrote an invalid trace: {problems[:3]}")


def check_log_scan(inp: tuple[str, bytes]) -> None:
    """The lower-level public readers: records, monitor list, the monitor-window import."""
    from virtsave.cli.tracecmd import render_monitors
    from virtsave.libvirtd import logparse

    _count("log-scan")
    name, data = inp
    path = scratch("libvirtd-scan.log", data)
    with bounded(f"iter_records({name})"):
        for _ in logparse.iter_records(path):
            pass
    with bounded(f"list_monitors({name})"):
        render_monitors(logparse.list_monitors(path))
    with bounded(f"trace_from_log({name}, window)"):
        logparse.trace_from_log(path, since="2026-11-25T18:58:12", until=1.0e10)


# QEMU domain logs -------------------------------------------------------------------------------

def check_domain_log(inp: tuple[str, bytes]) -> None:
    """``--domain-log``: every start, the argv of the last, and that argv through the command-line
    model and the safety check (it becomes a trace's ``domain.argv``)."""
    from virtsave.libvirtd import domainlog
    from virtsave.qemu import safety
    from virtsave.trace import argv as qargv

    _count("domain-log")
    name, data = inp
    path = scratch("domain.log", data)
    with bounded(f"parse_domain_log({name})"):
        starts = domainlog.parse_domain_log(path)
        for s in starts:
            json.dumps(s.to_dict())
        argv = domainlog.argv_from_domain_log(path)
        cl = qargv.parse(argv)
        if cl.argv() != argv:
            raise Unacceptable(f"{name}: the command-line model does not give the argv back")
        safety.check_argv(argv)


# traces -----------------------------------------------------------------------------------------

def trace_input() -> st.SearchStrategy[tuple[str, bytes]]:
    seeds = trace_seeds

    def structural(t: tuple[str, list[Edit], list[Mutation]]) -> tuple[str, bytes]:
        name, edits, ops = t
        text = dumps_edited(edit_json(seeds()[name], edits)).encode()
        return name, mutate(text, ops, []) if ops and ops[0][0] in ("truncate", "encoding", "number") else text

    def raw(t: tuple[str, list[Mutation]]) -> tuple[str, bytes]:
        name, ops = t
        return name, mutate(json.dumps(seeds()[name], indent=1).encode(), ops, [])

    names = st.sampled_from(sorted(seeds()))
    return st.one_of(st.tuples(names, edits_st, st.lists(mutation_st, max_size=1)).map(structural),
                     st.tuples(names, mutations_st).map(raw))


def check_trace_load(inp: tuple[str, bytes]) -> None:
    """``virtsave validate`` / every command's ``load``: parse, validate, summarize, write back, redact."""
    from virtsave.cli.tracecmd import _summary
    from virtsave.trace import model as tr
    from virtsave.trace import redact

    _count("trace-load")
    name, data = inp
    path = scratch("trace.json", data)
    with bounded(f"load({name})"):
        t = tr.load(path)
        _summary(t)
        tr.loads(tr.dumps(t))
        redact.redact_trace(t)


def _loaded(data: bytes) -> Any:
    """The trace *data* as ``load`` gives it, or None when load refuses it (the acceptable error)."""
    from virtsave.core.errors import TraceError
    from virtsave.trace import model as tr

    try:
        return tr.loads(data)
    except TraceError:
        return None


def check_trace_replay_plan(inp: tuple[str, bytes]) -> None:
    """``virtsave replay`` up to the launch: safety check, the launcher's rewrite and its plan (the run
    dir, the key file, the guest-file checks) — nothing is started."""
    from virtsave.qemu import launch, replay, safety

    _count("trace-replay-plan")
    name, data = inp
    with bounded(f"load({name})"):
        t = _loaded(data)
    if t is None:
        return
    with bounded(f"check_trace({name})"):
        findings = safety.check_trace(t)
        [str(f) for f in findings]
        if findings:
            safety.refusal_message(findings)
        replay.check_safety(t, allow_unsafe=True)
        replay.check_safety(t, allow_unsafe=False)
    argv = t.get("domain", {}).get("argv") or []
    run_dir = _SCRATCH / "run"
    run_dir.mkdir(exist_ok=True)
    for incoming in (None, "defer"):
        with bounded(f"rewrite_argv({name}, incoming={incoming})"):
            target = launch.Target(run_dir, "unix", None, True, False, 0)
            launch.rewrite_argv(argv, target, incoming=incoming)
    with bounded(f"plan_launch({name})"):
        qemu = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
        launch.plan_launch(argv, incoming="defer", run_dir=run_dir, binary=qemu if os.path.exists(qemu) else None)


def check_trace_export(inp: tuple[str, bytes]) -> None:
    """``virtsave export --format replies`` (every phase choice) and reading a ``.replies`` text back."""
    from virtsave.trace import export

    _count("trace-export")
    name, data = inp
    with bounded(f"load({name})"):
        t = _loaded(data)
    with bounded(f"parse_replies(mutated {name})"):
        export.parse_replies(data.decode("utf-8", "replace"))
    if t is None:
        return
    for phase in (None, "save", "restore", 0, 1, 7):
        with bounded(f"to_replies({name}, phase={phase})"):
            text = export.to_replies(t, phase)
            export.replies_stats(t, phase)
            back = export.parse_replies(text)
            if len(back) % 2:
                raise Unacceptable(f"{name}: .replies export has an unpaired command")


def check_trace_diff(inp: tuple[str, bytes]) -> None:
    """``virtsave diff A B`` of a recorded trace against a mutated one, both orders, both modes."""
    from virtsave.trace import diff

    _count("trace-diff")
    name, data = inp
    with bounded(f"load({name})"):
        t = _loaded(data)
    if t is None:
        return
    seed = trace_seeds()[name]
    for a, b in ((seed, t), (t, seed), (t, t)):
        for strict in (False, True):
            with bounded(f"diff_traces({name}, strict={strict})"):
                d = diff.diff_traces(a, b, strict=strict)
                d.render(color=True)
                json.dumps(d.to_json())


# save images -----------------------------------------------------------------------------------

def image_input() -> st.SearchStrategy[tuple[str, bytes]]:
    def apply(t: tuple[str, list[FieldEdit], list[Mutation]]) -> tuple[str, bytes]:
        name, fields, ops = t
        return name, mutate(edit_fields(image_seeds()[name], fields), ops, [])[:MAX_INPUT]
    return st.tuples(st.sampled_from(sorted(image_seeds())), field_edits_st,
                     st.lists(mutation_st.filter(lambda m: not m[0].startswith("line")), max_size=3)).map(apply)


def check_image_inspect(inp: tuple[str, bytes]) -> None:
    """``virtsave inspect [--allow-partial]``: header, XML, cookie, every stream section, RAM."""
    from virtsave.image import saveimage

    _count("image-inspect")
    name, data = inp
    path = scratch("image.save", data)
    with bounded(f"read_header({name})"):
        saveimage.read_header(io.BytesIO(data))
    for partial in (False, True):
        with bounded(f"inspect_image({name}, allow_partial={partial})"):
            json.dumps(saveimage.inspect_image(path, allow_partial=partial))
    with bounded(f"iter_sections({name})"):
        for _ in saveimage.iter_sections(path, allow_partial=True):
            pass


def check_image_diff(inp: tuple[str, bytes]) -> None:
    """``virtsave diff A.save B.save`` of a seed image against a mutated one, both orders."""
    from virtsave.image import diff as imagediff

    _count("image-diff")
    name, data = inp
    a = scratch("a.save", image_seeds()[name])
    b = scratch("b.save", data)
    for x, y in ((a, b), (b, a)):
        with bounded(f"diff_images({name})"):
            d = imagediff.diff_images(x, y)
            d.render(color=True)
            json.dumps(d.to_json())


# regressions ----------------------------------------------------------------------------------
# Failures fuzzing found (each fixed); tests/unit/test_fuzz.py runs them as @example before the budget.

_REGRESSION_LOG = "libvirt-11.3-attributed/save-bypass-cache.log"


def _line_span(data: bytes, needle: bytes) -> tuple[int, int]:
    i = data.index(needle)
    return data.rfind(b"\n", 0, i) + 1, data.index(b"\n", i)


def regression(name: str) -> tuple[str, bytes]:
    """The input of a fixed failure (what broke, and where it was fixed, in the comments)."""
    log = log_seeds()[_REGRESSION_LOG]
    trace = json.dumps(trace_seeds()["synthetic"]).encode()
    if name == "log-deep-payload":
        # The migrate command's arguments nested 500 levels: the import's redaction (copy.deepcopy) hit
        # RecursionError. Fixed: virtsave.core.jsonload refuses nesting past 64 levels (the line is
        # malformed, counted and skipped).
        s, e = _line_span(log, b'msg={"execute":"migrate"')
        line = log[s:e].replace(b'"arguments":{', b'"arguments":' + b"[" * 500 + b"{", 1)
        line = line.replace(b'},"id"', b"}" + b"]" * 500 + b',"id"', 1)
        return _REGRESSION_LOG, log[:s] + line + log[e:]
    if name == "log-list-id":
        # QMP ids that are JSON lists (QMP allows any value): TypeError unhashable type 'list' when
        # matching replies to commands. Fixed: logparse keys ids by their JSON text (_id_key).
        return _REGRESSION_LOG, re.sub(rb'"id":"(libvirt-\d+)"', rb'"id":["\1"]', log)
    if name == "trace-huge-int":
        # A 5000-digit integer: json.loads raised ValueError past Python's digit limit, outside the
        # JSONDecodeError the loader caught. Fixed: model.loads catches every ValueError.
        return "synthetic", trace.replace(b'"t": 0.001', b'"t": ' + b"9" * 5000, 1)
    if name == "trace-deep-nesting":
        # 3000 nested lists in a command's arguments: RecursionError in json.loads (trace load,
        # .replies reader). Fixed: virtsave.core.jsonload turns it into a one-line refusal.
        return "synthetic", trace.replace(b'"arguments": {"capabilities"',
                                          b'"arguments": {"x": ' + b"[" * 3000 + b"]" * 3000 + b', "capabilities"', 1)
    if name == "log-event-data-list":
        # MIGRATION events whose data is a list: AttributeError in the phase status. Fixed: logparse
        # looks at a status only in an object.
        return _REGRESSION_LOG, re.sub(rb'"event": "MIGRATION", "data": (\{[^}]*\})',
                                       rb'"event": "MIGRATION", "data": [\1]', log)
    if name == "log-arguments-list":
        # Commands whose arguments are a list: the import wrote a trace its own schema refuses.
        # Fixed: logparse counts payloads without the trace model's shape as malformed (_well_formed).
        return _REGRESSION_LOG, log.replace(b'{"execute":"stop","id"', b'{"execute":"stop","arguments":[],"id"')
    if name == "log-huge-numbers":
        # 5000-digit thread ids, return values, errnos and fds: int() raised ValueError past Python's
        # digit limit. Fixed: logparse reads at most 18 digits as a number (a longer run is garbage).
        big = b"9" * 5000
        return _REGRESSION_LOG, re.sub(rb"(with ret=|errno=|fd=|Thread )\d+", rb"\g<1>" + big, log)
    if name == "log-time-backwards":
        # The migrate command's line stamped a minute before the save began (threads' lines interleave;
        # here exaggerated): t = -60 s, refused by the schema. Fixed: t counts from the phase's earliest.
        s, e = _line_span(log, b'msg={"execute":"migrate"')
        line = log[s:e]
        minute = int(line[14:16])
        return _REGRESSION_LOG, log[:s] + line[:14] + b"%02d" % ((minute - 1) % 60) + line[16:] + log[e:]
    if name == "image-zero-page-size":
        # A sparse (mapped-ram) image whose RAM block says page size 0: ZeroDivisionError. Fixed: a page
        # size that is not a power of two from 512 B to 1 GiB is a one-line ImageError at its offset.
        img = image_seeds()["sparse"]
        at = img.index(struct.pack(">I", 1) + struct.pack(">Q", 4096))
        return "sparse", img[:at + 4] + struct.pack(">Q", 0) + img[at + 12:]
    raise KeyError(name)


TARGETS = [
    Target("log-import", "libvirtd debug log → trace (virtsave trace --from-log)", log_input(log_seeds),
           check_log_import, 130),
    Target("log-scan", "libvirtd debug log: records, monitor list, windowed import", log_input(small_log_seeds),
           check_log_scan, 280),
    Target("domain-log", "QEMU domain log → starts, argv, command-line model, safety check",
           log_input(domain_log_seeds), check_domain_log, 500),
    Target("trace-load", "trace JSON: read, validate, summarize, write back, redact", trace_input(),
           check_trace_load, 500),
    Target("trace-replay-plan", "trace: safety check, launcher rewrite and plan (nothing launched)", trace_input(),
           check_trace_replay_plan, 350),
    Target("trace-export", "trace → .replies export; .replies reader", trace_input(), check_trace_export, 350),
    Target("trace-diff", "trace diff against a mutated trace", trace_input(), check_trace_diff, 200),
    Target("image-inspect", "save image: header, XML, cookie, QEMU stream sections, RAM", image_input(),
           check_image_inspect, 500),
    Target("image-diff", "save image diff against a mutated image", image_input(), check_image_diff, 200),
]
BY_NAME = {t.name: t for t in TARGETS}


def sys_path() -> None:
    """Make ``badinput`` and ``unit.test_saveimage`` importable (scripts/fuzz; pytest does it itself)."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
