"""libvirtd's log filters and outputs as strings: what ``virt-admin`` shows, what it accepts back,
and the capture settings virtsave derives from the operator's.

**Shown is not accepted.** libvirt stores a filter's match wrapped in ``*…*`` (``virLogFilterNew``:
"treat 'foo' as equiv to '*foo*'" for its glob match) and ``daemon-log-filters`` shows the stored
form, so ``3:remote`` is shown ``3:*remote*`` — and writing ``3:*remote*`` back stores
``3:**remote**``. The input form of a shown filter is therefore the shown match with one ``*``
taken off each end (:func:`unwrap_filter`); a daemon that does not wrap takes the shown form as it
is. Which one the daemon does is learned at run time (:func:`detect_wrapping`) and every restore is
read back and compared (the caller's job), never assumed. Outputs are shown as given (file paths
canonicalised, duplicates of one destination collapsed), so the shown form is the input form.

**Nothing the operator did not ask for.** Filters are daemon-wide and an output has only a level,
so opening ``1:monitor`` sends every monitor line to every output at info or debug level. For the
capture window, :func:`quiet_level` finds the level the operator's own settings give the capture's
sources, and :func:`capture_outputs` raises the operator's outputs below it to it.

Example::

    >>> unwrap_filter("3:*remote*"), unwrap_filter("2:*qemu**")
    ('3:remote', '2:qemu*')
    >>> capture_filters("3:*remote* ", wrapped=True)
    '1:monitor 1:job 1:qemu.qemu_process 3:remote'
    >>> capture_outputs("3:file:/var/log/libvirt/libvirtd.log 2:file:/var/log/op.log", "/c.log", raise_to=3)
    '3:file:/var/log/libvirt/libvirtd.log 3:file:/var/log/op.log 1:file:/c.log'
    >>> quiet_level("")
    3
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "CAPTURE_FILTERS",
    "CAPTURE_SOURCES",
    "WARNING",
    "capture_filters",
    "capture_output_spec",
    "capture_outputs",
    "config_file",
    "configured_log_level",
    "detect_wrapping",
    "filter_input_forms",
    "glob_match",
    "log_level_setting",
    "output_level",
    "quiet_level",
    "raised_outputs",
    "same",
    "strip_ours",
    "tokens",
    "unwrap_filter",
    "wrap_filter",
]

# Filters that make the log name the domain (DESIGN.md §3): monitor I/O, the job lines
# ("Starting job: API=… vm=0x… name=NAME") and qemuProcessStart ("vm=0x… name=NAME").
CAPTURE_FILTERS = ("1:monitor", "1:job", "1:qemu.qemu_process")

# libvirt log sources (VIR_LOG_INIT names, libvirt 9.0 and 11.x) that CAPTURE_FILTERS open, plus
# each filter's bare match as a stand-in for a source not listed here: a shown filter is a glob
# that starts and ends with '*', and such a glob that matches "monitor" matches every name that
# contains "monitor".
CAPTURE_SOURCES = (
    "qemu.qemu_monitor", "qemu.qemu_monitor_json", "qemu.qemu_monitor_text", "qemu.qemu_process",
    "qemu.qemu_domainjob", "qemu.qemu_blockjob", "conf.virdomainjob", "util.threadjob",
    "monitor", "job", "qemu.qemu_process",
)

WARNING = 3  # libvirt's default log level (VIR_LOG_DEFAULT) and the level outputs are raised to
_LEVEL_LINE = re.compile(r"^\s*log_level\s*=\s*([1-4])\s*(?:#.*)?$", re.MULTILINE)


def tokens(value: str) -> list[str]:
    """The items of a filters/outputs string (libvirt splits on spaces and skips empty ones).

    >>> tokens(" 3:*remote*  4:*event* ")
    ['3:*remote*', '4:*event*']
    """
    return [t for t in value.split(" ") if t]


def same(a: str, b: str) -> bool:
    """Two shown settings are the same list. libvirt's shown string is a function of the list
    (filters ``"L:M "`` each, outputs joined by one space), so this is the byte comparison of what
    ``virt-admin`` prints, tolerant of a value stored without its trailing blank.

    >>> same("3:*remote* ", "3:*remote*"), same("3:*remote*", "3:**remote**")
    (True, False)
    """
    return tokens(a) == tokens(b)


def wrap_filter(token: str) -> str:
    """How a wrapping daemon shows filter *token* (``1:monitor`` → ``1:*monitor*``).

    >>> wrap_filter("2:+util.json")
    '2:*util.json*'
    """
    level, _, match = token.partition(":")
    match = match.split(":", 1)[0]  # libvirt keeps the text between the first two colons
    match = match.removeprefix("+")  # the old "+" (stack trace) prefix is dropped
    return f"{level}:*{match}*"


def unwrap_filter(token: str) -> str:
    """The input that a wrapping daemon shows as *token*: one ``*`` off each end of the match (after
    a ``+``, which libvirts that still had the stack-trace flag showed in front of the match).

    >>> unwrap_filter("1:***"), unwrap_filter("3:remote"), unwrap_filter("4:+*object*")
    ('1:*', '3:remote', '4:+object')
    """
    level, sep, match = token.partition(":")
    plus = "+" if match.startswith("+") else ""
    match = match[len(plus):]
    if sep and len(match) >= 2 and match.startswith("*") and match.endswith("*"):
        match = match[1:-1]
    return f"{level}{sep}{plus}{match}"


def _looks_wrapped(shown: str) -> bool:
    return all(unwrap_filter(t) != t for t in tokens(shown))


def filter_input_forms(shown: str, wrapped: bool | None) -> list[str]:
    """Inputs to try, best first, to make the daemon show *shown* again.

    *wrapped*: whether this daemon wraps matches (None: not known yet, so guess from *shown* and
    keep the other form as a fallback).

    >>> filter_input_forms("3:*remote* ", True)
    ['3:remote']
    >>> filter_input_forms("3:*remote*", None)
    ['3:remote', '3:*remote*']
    >>> filter_input_forms("3:remote", None)
    ['3:remote']
    """
    plain = " ".join(tokens(shown))
    unwrapped = " ".join(unwrap_filter(t) for t in tokens(shown))
    if wrapped is True:
        return [unwrapped]
    if wrapped is False:
        return [plain]
    forms = [unwrapped, plain] if _looks_wrapped(shown) else [plain]
    return list(dict.fromkeys(forms))


def detect_wrapping(shown_after: str, given: str) -> bool | None:
    """Whether the daemon wrapped the first filter of *given* (read back as *shown_after*).

    >>> detect_wrapping("1:*monitor* 3:*remote* ", "1:monitor 3:remote")
    True
    >>> detect_wrapping("1:monitor", "1:monitor"), detect_wrapping("", "")
    (False, None)
    """
    got, sent = tokens(shown_after), tokens(given)
    if not got or not sent:
        return None
    if got[0] == wrap_filter(sent[0]) and got[0] != sent[0]:
        return True
    return False if got[0] == sent[0] else None


def capture_filters(operator_shown: str, wrapped: bool | None,
                    ours: tuple[str, ...] = CAPTURE_FILTERS) -> str:
    """Our filters first (libvirt takes the first filter that matches a source), then the
    operator's in their input form, so the daemon shows theirs exactly as before."""
    theirs = filter_input_forms(operator_shown, wrapped)[0]
    return " ".join([*ours, *tokens(theirs)])


def capture_output_spec(log_path: str | os.PathLike[str]) -> str:
    """The output we add: every message that passes the filters goes to *log_path*.

    >>> capture_output_spec("/var/lib/virtsave/logcapture/capture.log")
    '1:file:/var/lib/virtsave/logcapture/capture.log'
    """
    return f"1:file:{os.fspath(log_path)}"


def output_level(token: str) -> int | None:
    """The level of output *token* (``2:file:/x`` → 2), None when it has none.

    >>> output_level("2:file:/x"), output_level("journald")
    (2, None)
    """
    head = token.split(":", 1)[0]
    return int(head) if head.isdigit() else None


def raised_outputs(operator_shown: str, raise_to: int | None) -> tuple[list[str], list[str]]:
    """(the operator's outputs with every level below *raise_to* raised to it, the ones raised).

    >>> raised_outputs("3:file:/a 2:file:/b 1:stderr", 3)
    (['3:file:/a', '3:file:/b', '3:stderr'], ['2:file:/b', '1:stderr'])
    """
    out: list[str] = []
    raised: list[str] = []
    for tok in tokens(operator_shown):
        level = output_level(tok)
        if raise_to is not None and level is not None and level < raise_to:
            out.append(f"{raise_to}{tok[len(str(level)):]}")
            raised.append(tok)
        else:
            out.append(tok)
    return out, raised


def capture_outputs(operator_shown: str, log_path: str | os.PathLike[str], raise_to: int | None = None) -> str:
    """The operator's outputs (raised to *raise_to* where below it; None: as they are) plus ours."""
    spec = capture_output_spec(log_path)
    theirs, _ = raised_outputs(operator_shown, raise_to)
    return " ".join([*(t for t in theirs if t != spec), spec])


def strip_ours(filters: str, outputs: str, log_path: str | os.PathLike[str]) -> tuple[str, str]:
    """Undo :func:`capture_filters`/:func:`capture_outputs` on settings found live without a state
    file (lost after a crash): our output is recognisable by its path, and then the leading filters
    are ours too. Raised output levels cannot be told from the operator's own: they stay.

    >>> strip_ours("1:*monitor* 1:*job* 1:*qemu.qemu_process* 3:*util* ", "3:file:/l 1:file:/c", "/c")
    ('3:*util* ', '3:file:/l')
    """
    spec = capture_output_spec(log_path)
    outs = tokens(outputs)
    if spec not in outs:
        return filters, outputs
    flt = tokens(filters)
    n = len(CAPTURE_FILTERS)
    if [unwrap_filter(f) for f in flt[:n]] == list(CAPTURE_FILTERS):
        flt = flt[n:]
    wrapped_display = "".join(f"{f} " for f in flt)  # libvirt's own shape: "L:M " per filter
    return wrapped_display, " ".join(o for o in outs if o != spec)


def glob_match(pattern: str, name: str) -> bool:
    """libvirt's filter match (``g_pattern_match_simple``: ``*`` and ``?`` only).

    >>> glob_match("*qemu*", "qemu.qemu_monitor"), glob_match("*q?mu[*", "qemu[")
    (True, True)
    """
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name, re.DOTALL) is not None


def _source_level(operator_shown: str, source: str, default: int) -> int:
    """The level the operator's filters give *source*: the first filter that matches, else *default*.
    A shown match is wrapped again for the test: ``**x**`` matches as ``*x*`` does, and a daemon
    that does not wrap matches substrings, which is ``*x*`` too."""
    for tok in tokens(operator_shown):
        level, sep, match = tok.partition(":")
        if sep and level.isdigit() and glob_match(f"*{match.removeprefix('+')}*", source):
            return int(level)
    return default


def quiet_level(operator_shown: str, default_level: int | None = None) -> int:
    """The lowest output level at which no capture message reaches an operator output that would
    not reach it without the capture: the highest level the operator's own filters give any of
    :data:`CAPTURE_SOURCES` (sources no filter of theirs names get the daemon's log level, taken as
    at least warning: the admin API does not show it).

    >>> quiet_level("1:*qemu* "), quiet_level("4:*monitor* 1:*qemu*"), quiet_level("", 4)
    (3, 4, 4)
    >>> quiet_level("1:** "), quiet_level("4:+*monitor* ")
    (1, 4)
    """
    default = max(WARNING, default_level or WARNING)
    return max(_source_level(operator_shown, s, default) for s in CAPTURE_SOURCES)


def config_file(admin_uri: str, home: str, etc: str = "/etc/libvirt") -> str:
    """The configuration file of the daemon behind *admin_uri* (``libvirtd.conf``/``virtqemud.conf``;
    a session daemon's in *home*'s ``.config/libvirt``).

    >>> config_file("libvirtd:///system", "/root"), config_file("virtqemud:///session", "/home/u")
    ('/etc/libvirt/libvirtd.conf', '/home/u/.config/libvirt/virtqemud.conf')
    """
    daemon = admin_uri.split(":", 1)[0] or "libvirtd"
    session = admin_uri.split("?", 1)[0].endswith("/session")
    return f"{home}/.config/libvirt/{daemon}.conf" if session else f"{etc}/{daemon}.conf"


def log_level_setting(text: str) -> int | None:
    """The last ``log_level`` set in a daemon configuration file's *text*, None when unset.

    >>> log_level_setting("#log_level = 1\\nlog_level = 4  # errors only\\n"), log_level_setting("")
    (4, None)
    """
    found = _LEVEL_LINE.findall(text)
    return int(found[-1]) if found else None


def configured_log_level(admin_uri: str, etc: str | os.PathLike[str] = "/etc/libvirt") -> int | None:
    """``log_level`` from the daemon's configuration file (``libvirtd.conf``/``virtqemud.conf``),
    if set there: the admin API does not show the daemon's log level.

    >>> configured_log_level("libvirtd:///system", "/nonexistent") is None
    True
    """
    path = config_file(admin_uri, os.path.expanduser("~"), os.fspath(etc))
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    return log_level_setting(text)
