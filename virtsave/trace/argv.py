"""The QEMU command line as libvirt records it: environment, binary, options and their values.

libvirt writes a QEMU start into the domain log (and ``domxml-to-native qemu-argv`` prints it) as
shell words: leading ``VAR=value`` environment words, the binary, then options. An option is a
name (``-chardev``) with one value word, except the :data:`FLAG_OPTIONS`, which take none. A value
is either JSON (``-blockdev {...}``, ``-netdev {...}``, ``-device {...}``, ``-object {...}``) or
QEMU's ``key=val,key2=val2`` syntax, where ``,,`` stands for a literal comma and a leading bare word
is the value of an *implied* key (``socket`` in ``-chardev socket,id=x`` is its ``backend``).

Everything that reads a QEMU command line (the launcher, the safety check, redaction, the domain-log
parser, capture) reads it through this model, so they agree on what an option and a value are.
Parsing keeps the words as written: :meth:`CommandLine.words` gives them back exactly, and a value
changed through :meth:`OptionValue.updated` is written in its own syntax again.

Example::

    >>> cl = parse(["LC_ALL=C", "/usr/bin/qemu-system-x86_64", "-S", "-name", "guest=vm,debug-threads=on",
    ...             "-chardev", "socket,id=charmonitor,fd=29,server=on,wait=off"])
    >>> cl.env, cl.binary
    ((('LC_ALL', 'C'),), '/usr/bin/qemu-system-x86_64')
    >>> [(o.index, o.name, o.value) for o in cl.options[:2]]
    [(1, '-S', None), (2, '-name', 'guest=vm,debug-threads=on')]
    >>> mon = cl.options[2].parsed
    >>> mon.kind, mon.get("id"), fd_references(mon)
    ('socket', 'charmonitor', [('fd', '29')])
    >>> str(mon.updated({"fd": None, "path": "/run/q.sock"}))
    'socket,id=charmonitor,server=on,wait=off,path=/run/q.sock'
    >>> parse(cl.words()).words() == cl.words()
    True
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from virtsave.core import jsonload

__all__ = [
    "BLOCKDEV_REFERENCE_KEYS",
    "FD_KEYS",
    "FLAG_OPTIONS",
    "IMPLIED_KEYS",
    "BlockGraph",
    "CommandLine",
    "Option",
    "OptionValue",
    "block_children",
    "blockdev_references",
    "fd_references",
    "fdset_references",
    "format_json",
    "is_env_word",
    "join_keyval",
    "parse",
    "parse_shell",
    "parse_value",
    "shell_words",
    "split_keyval",
    "walk_items",
]

#: QEMU options that take no value — the one table (QEMU 7.2 … 10.x, including options removed
#: since, which older libvirt versions emit). Every other option takes exactly one value word.
#: A flag missing here would swallow the next option as its value, so the table errs on the side
#: of listing.
FLAG_OPTIONS: frozenset[str] = frozenset({
    "-S", "-s", "-h", "-help", "-version", "-snapshot", "-nographic", "-no-user-config", "-nodefaults",
    "-nodefconfig", "-no-shutdown", "-no-reboot", "-no-acpi", "-no-hpet", "-enable-kvm", "-no-kvm",
    "-daemonize", "-full-screen", "-enable-fips", "-no-fd-bootchk", "-no-quit", "-win2k-hack",
    "-old-param", "-only-migratable", "-preconfig", "-mem-prealloc", "-usb", "-xen-attach",
    "-xen-domid-restrict", "-enable-sync-profile", "-perfmap", "-jitdump", "-alt-grab", "-ctrl-grab",
    "-no-frame", "-sdl", "-curses", "-portrait", "-rtc-td-hack", "-singlestep", "-show-cursor",
    "-semihosting", "-no-kvm-irqchip", "-no-kvm-pit", "-no-kvm-pit-reinjection", "-tdf",
    "-async-teardown", "-audio-help",  # QEMU 7.2 (Debian 12); later: -run-with async-teardown=on
})

#: The implied key of an option's leading bare word (``-chardev socket,…`` is ``backend=socket``).
IMPLIED_KEYS: Mapping[str, str] = {
    "-chardev": "backend", "-netdev": "type", "-nic": "type", "-net": "type", "-device": "driver",
    "-object": "qom-type", "-machine": "type", "-M": "type", "-mon": "chardev", "-name": "guest",
    "-accel": "accel", "-audiodev": "driver", "-fsdev": "fsdriver", "-smp": "cpus", "-m": "size",
    "-boot": "order", "-numa": "type", "-display": "type", "-sandbox": "enable", "-tpmdev": "type",
    "-vnc": "vnc", "-cpu": "model", "-icount": "shift",
}

#: Keys whose value is a file descriptor number inherited from whoever started QEMU.
FD_KEYS: frozenset[str] = frozenset({"fd", "fds", "vhostfd", "vhostfds"})

#: ``-blockdev`` keys whose string value names another node (``"file":"libvirt-1-storage"``), an
#: object value defines the child inline. (A ``-drive file=`` is a path, not a node.)
BLOCKDEV_REFERENCE_KEYS: frozenset[str] = frozenset({
    "file", "backing", "data-file", "image", "test", "raw", "log", "children", "bottom", "target",
})

_ENV_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_FDSET = re.compile(r"/dev/fdset/(\d+)")
#: What names the kind of a JSON value (and of a keyval one without an implied key), first match wins.
_KIND_KEYS = ("qom-type", "driver", "backend", "type")


# ----------------------------------------------------------------------------------------- values


def split_keyval(text: str) -> list[str]:
    """*text* split on commas, ``,,`` being a literal comma (QEMU's keyval/QemuOpts syntax).

    >>> split_keyval("file,id=c,path=/tmp/a,,b,append=on")
    ['file', 'id=c', 'path=/tmp/a,b', 'append=on']
    """
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "," and text[i + 1:i + 2] == ",":
            cur.append(",")
            i += 2
            continue
        if c == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def join_keyval(parts: Iterable[tuple[str | None, str]]) -> str:
    """``(key, value)`` pairs (key None: a bare word) as QEMU keyval text; the inverse of parsing.

    >>> join_keyval([(None, "file"), ("path", "/tmp/a,b")])
    'file,path=/tmp/a,,b'
    """
    def esc(s: str) -> str:
        return s.replace(",", ",,")

    return ",".join(esc(v) if k is None else f"{esc(k)}={esc(v)}" for k, v in parts)


def format_json(obj: Any) -> str:
    """JSON as libvirt writes option values: compact, non-ASCII kept.

    >>> format_json({"driver": "file", "filename": "/x"})
    '{"driver":"file","filename":"/x"}'
    """
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _kind_of(props: Mapping[str, Any], implied: str | None, bare: str) -> str:
    if implied and isinstance(props.get(implied), str):
        return str(props[implied])
    if bare:
        return bare
    return next((str(props[k]) for k in _KIND_KEYS if isinstance(props.get(k), str)), "")


@dataclass(frozen=True)
class OptionValue:
    """One option value, parsed. *props*: the JSON object, or keyval key → value (a bare word after
    the first is a key with value ``""``; the first is the implied key's value when the option has
    one). *kind*: the implied key's value, else the leading bare word, else the first of
    ``qom-type``/``driver``/``backend``/``type``. *parts*: keyval pairs in written order.

    >>> v = parse_value('{"qom-type":"secret","id":"s0","file":"/k"}', "-object")
    >>> v.syntax, v.kind, v.get("file")
    ('json', 'secret', '/k')
    >>> v = parse_value("qom-type=secret,id=s1,data=x", "-object")
    >>> v.syntax, v.kind, v.props["data"]
    ('keyval', 'secret', 'x')
    """

    text: str
    syntax: Literal["json", "keyval"]
    kind: str
    props: Mapping[str, Any]
    parts: tuple[tuple[str | None, str], ...] = ()
    option: str | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.props.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.props

    def __str__(self) -> str:
        return self.text

    def updated(self, changes: Mapping[str, Any]) -> OptionValue:
        """A copy with *changes* applied (value None: remove the key), written in the same syntax;
        existing keys keep their place (the implied key its leading bare word), new ones go last.

        >>> str(parse_value("pty,id=c,logfile=/dev/fdset/1", "-chardev").updated({"backend": "file", "logfile": None}))
        'file,id=c'
        """
        if self.syntax == "json":
            obj = {k: v for k, v in self.props.items() if k not in changes or changes[k] is not None}
            obj.update({k: v for k, v in changes.items() if v is not None})
            return parse_value(format_json(obj), self.option)
        implied = IMPLIED_KEYS.get(self.option or "")
        parts: list[tuple[str | None, str]] = []
        done: set[str] = set()
        for n, (k, v) in enumerate(self.parts):
            key = implied if (k is None and n == 0 and implied) else k
            if key is None or key not in changes:
                parts.append((k, v))
                continue
            done.add(key)
            if changes[key] is not None:
                parts.append((k, str(changes[key])) if k is not None else (None, str(changes[key])))
        parts += [(k, str(v)) for k, v in changes.items() if k not in done and v is not None]
        return parse_value(join_keyval(parts), self.option)

    def with_parts(self, parts: Iterable[tuple[str | None, str]]) -> OptionValue:
        """A keyval value made of *parts* (the same option)."""
        return parse_value(join_keyval(parts), self.option)


def _parse_json(text: str) -> dict[str, Any] | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        obj = jsonload.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def parse_value(text: str, option: str | None = None) -> OptionValue:
    """The value *text* of *option* (``-chardev`` …; None when unknown): JSON when it is a JSON
    object, else keyval. Never raises: any text is keyval.

    >>> parse_value("socket,id=m,fd=3,server=on", "-chardev").props
    {'backend': 'socket', 'id': 'm', 'fd': '3', 'server': 'on'}
    """
    implied = IMPLIED_KEYS.get(option or "")
    obj = _parse_json(text)
    if obj is not None:
        return OptionValue(text, "json", _kind_of(obj, None, ""), obj, (), option)
    parts: list[tuple[str | None, str]] = []
    props: dict[str, Any] = {}
    bare = ""
    for n, word in enumerate(split_keyval(text)):
        key, eq, val = word.partition("=")
        if eq:
            parts.append((key, val))
            props[key] = val
            continue
        parts.append((None, word))
        if n == 0:
            bare = word
            if implied:
                props[implied] = word
        else:
            props[word] = ""
    return OptionValue(text, "keyval", _kind_of(props, implied, bare), props, tuple(parts), option)


def walk_items(v: Any) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of every mapping entry in *v*, nested ones too (JSON option values and QMP
    arguments alike).

    >>> list(walk_items({"a": {"fd": "3"}, "b": [{"c": 1}]}))
    [('a', {'fd': '3'}), ('fd', '3'), ('b', [{'c': 1}]), ('c', 1)]
    """
    if isinstance(v, Mapping):
        for k, x in v.items():
            yield str(k), x
            yield from walk_items(x)
    elif isinstance(v, list):
        for x in v:
            yield from walk_items(x)


def fd_references(value: OptionValue) -> list[tuple[str, str]]:
    """``(key, fds)`` for each inherited fd *value* names (``fd=``, ``fds=``, ``vhostfd=``,
    ``vhostfds=``, nested JSON too), as written.

    >>> fd_references(parse_value('{"type":"tap","id":"n","fds":"33:34","vhostfd":"35"}', "-netdev"))
    [('fds', '33:34'), ('vhostfd', '35')]
    """
    return [(k, str(x)) for k, x in walk_items(value.props) if k in FD_KEYS]


def fdset_references(text: str) -> list[str]:
    """The fdset numbers ``/dev/fdset/N`` that *text* names.

    >>> fdset_references("pty,id=c,logfile=/dev/fdset/1,logappend=on")
    ['1']
    """
    return _FDSET.findall(text)


def blockdev_references(value: OptionValue) -> dict[str, str]:
    """Child key → node name for the children of a ``-blockdev`` that name another node instead of
    defining it inline (``"file":"libvirt-1-storage"``: a node, not a path).

    >>> blockdev_references(parse_value('{"driver":"qcow2","node-name":"f","file":"s","backing":null}'))
    {'file': 's'}
    """
    return {k: x for k, x in value.props.items() if k in BLOCKDEV_REFERENCE_KEYS and isinstance(x, str)}


def block_children(value: OptionValue) -> list[tuple[str, str]]:
    """``(key, node name)`` for every child of a ``-blockdev`` named by reference, lists too (a
    quorum's ``children``), in written order.

    >>> block_children(parse_value('{"driver":"quorum","node-name":"q","children":["a","b"],"vote-threshold":1}'))
    [('children', 'a'), ('children', 'b')]
    """
    out: list[tuple[str, str]] = []
    for k, x in value.props.items():
        if k not in BLOCKDEV_REFERENCE_KEYS:
            continue
        if isinstance(x, str):
            out.append((k, x))
        elif isinstance(x, list):
            out += [(k, c) for c in x if isinstance(c, str)]
    return out


@dataclass(frozen=True)
class BlockGraph:
    """The ``-blockdev`` nodes of a command line: *nodes* (node name → option, in written order) and
    *children* (node name → the ``(key, node)`` references it makes). A *top* is a node no other
    node references: what a device, the machine (``pflash1=``) or nothing uses.

    >>> g = parse(["qemu", "-blockdev", '{"driver":"file","filename":"/d.qcow2","node-name":"s"}',
    ...            "-blockdev", '{"driver":"qcow2","node-name":"f","file":"s","backing":null}']).block_graph()
    >>> g.tops(), g.below("f"), g.read_only("f"), g.protocol("s")
    (['f'], ['s'], False, True)
    """

    nodes: Mapping[str, Option]
    children: Mapping[str, tuple[tuple[str, str], ...]]

    #: Drivers whose ``filename`` is a host file or device (the protocol layer of a local disk).
    LOCAL_PROTOCOLS = frozenset({"file", "host_device", "host_cdrom"})

    def tops(self) -> list[str]:
        """The nodes nothing else references, in written order."""
        referenced = {c for refs in self.children.values() for _, c in refs}
        return [n for n in self.nodes if n not in referenced]

    def below(self, node: str) -> list[str]:
        """Every node *node* reaches through its references (not itself), each once, depth first."""
        seen: list[str] = []
        stack = [c for _, c in reversed(self.children.get(node, ()))]
        while stack:
            n = stack.pop()
            if n in seen or n == node:
                continue
            seen.append(n)
            stack += [c for _, c in reversed(self.children.get(n, ()))]
        return seen

    def read_only(self, node: str) -> bool:
        """The node is opened read-only as written (``"read-only": true``)."""
        v = self.nodes[node].parsed.get("read-only")
        return v is True or v in ("on", "true", "yes")

    def protocol(self, node: str) -> bool:
        """The node reads a local host file or device by name (``file``/``host_device``/``host_cdrom``)."""
        return self.nodes[node].parsed.kind in self.LOCAL_PROTOCOLS


# ----------------------------------------------------------------------------------------- options


def _option_name(word: str) -> str:
    return "-" + word.lstrip("-") if word.startswith("-") and word.strip("-") else ""


@dataclass(frozen=True)
class Option:
    """One option as written: *word* (``-chardev``, ``--chardev``, or a positional word), its value
    word (None for flags and positionals) and *index*, the position of *word* in :meth:`CommandLine.argv`.

    >>> o = Option("--no-user-config", None, 3)
    >>> o.name, o.positional, o.words()
    ('-no-user-config', False, ['--no-user-config'])
    """

    word: str
    value: str | None
    index: int

    @property
    def name(self) -> str:
        """The option name with one leading dash; ``""`` for a positional word."""
        return _option_name(self.word)

    @property
    def positional(self) -> bool:
        """A word that is no option: QEMU takes it for a disk image (``-hda``)."""
        return not self.name

    @cached_property
    def parsed(self) -> OptionValue:
        """The value parsed (:func:`parse_value`); a positional word is parsed as a value too."""
        text = self.word if self.positional else (self.value or "")
        return parse_value(text, self.name or None)

    def words(self) -> list[str]:
        return [self.word] if self.value is None else [self.word, self.value]

    def text(self) -> str:
        """``-name value`` on one line, for messages."""
        return " ".join(self.words())


@dataclass(frozen=True)
class CommandLine:
    """A QEMU command line: *env* (``VAR=value`` words before the binary, in order), *binary*
    (None when the words start with an option) and *options*."""

    env: tuple[tuple[str, str], ...] = ()
    binary: str | None = None
    options: tuple[Option, ...] = field(default_factory=tuple)

    def argv(self) -> list[str]:
        """The binary and the options as words (no environment): what is executed."""
        return ([self.binary] if self.binary is not None else []) + \
            [w for o in self.options for w in o.words()]

    def words(self) -> list[str]:
        """Every word as parsed, environment first."""
        return [f"{k}={v}" for k, v in self.env] + self.argv()

    def find(self, *names: str) -> list[Option]:
        """The options named *names* (``-chardev`` …), in order."""
        return [o for o in self.options if o.name in names]

    def users(self, prop: str, ident: str, options: tuple[str, ...] = ("-device",)) -> list[Option]:
        """The *options* (``-device`` by default) whose property *prop* is *ident*: the devices
        fed by a ``-netdev`` (``netdev=``), a ``-chardev`` (``chardev=``) or a node (``drive=``)."""
        return [o for o in self.find(*options) if o.parsed.get(prop) == ident]

    def block_graph(self) -> BlockGraph:
        """The :class:`BlockGraph` of the ``-blockdev`` options."""
        nodes = self.block_nodes()
        return BlockGraph(nodes, {n: tuple(block_children(o.parsed)) for n, o in nodes.items()})

    def block_nodes(self) -> dict[str, Option]:
        """``-blockdev`` node name → its option (to tell a node reference from a path)."""
        out: dict[str, Option] = {}
        for o in self.find("-blockdev"):
            node = o.parsed.get("node-name")
            if isinstance(node, str):
                out[node] = o
        return out


def is_env_word(word: str) -> bool:
    """True for a ``NAME=value`` environment word (as libvirt puts before the binary)."""
    return bool(_ENV_WORD.match(word))


def _options(words: list[str], start: int, base: int) -> Iterator[Option]:
    i = start
    while i < len(words):
        word = words[i]
        name = _option_name(word)
        if not name or name in FLAG_OPTIONS or i + 1 >= len(words):
            yield Option(word, None, i - start + base)
            i += 1
        else:
            yield Option(word, words[i + 1], i - start + base)
            i += 2


def parse(words: Iterable[str]) -> CommandLine:
    """The command line of *words*: leading environment words, then the binary (unless the next word
    is an option), then options. ``parse(w).words() == w`` for any list of strings.

    >>> cl = parse(["qemu-system-x86_64", "-no-acpi", "-m", "256", "disk.img"])
    >>> [(o.index, o.name or o.word, o.value) for o in cl.options]
    [(1, '-no-acpi', None), (2, '-m', '256'), (4, 'disk.img', None)]
    """
    w = [str(x) for x in words]
    i = 0
    env: list[tuple[str, str]] = []
    while i < len(w) and is_env_word(w[i]):
        k, _, v = w[i].partition("=")
        env.append((k, v))
        i += 1
    binary = w[i] if i < len(w) and not w[i].startswith("-") else None
    start = i + (binary is not None)
    return CommandLine(tuple(env), binary, tuple(_options(w, start, int(binary is not None))))


def shell_words(text: str) -> tuple[list[str], bool]:
    """*text* split like a shell (libvirt quotes its logged command lines for one); ``(words, True)``,
    or a best-effort whitespace split and False when quoting is unbalanced (a cut log).

    >>> shell_words("LC_ALL=C /usr/bin/qemu -append 'console=ttyS0 quiet'")
    (['LC_ALL=C', '/usr/bin/qemu', '-append', 'console=ttyS0 quiet'], True)
    >>> shell_words("/usr/bin/qemu -append 'cut")
    (['/usr/bin/qemu', '-append', "'cut"], False)
    """
    try:
        return shlex.split(text), True
    except ValueError:
        return text.split(), False


def parse_shell(text: str) -> CommandLine:
    """:func:`parse` of the shell words of *text* (``domxml-to-native qemu-argv`` output).

    >>> parse_shell("LC_ALL=C PATH=/bin /usr/bin/qemu-system-x86_64 -name guest=g").argv()
    ['/usr/bin/qemu-system-x86_64', '-name', 'guest=g']
    """
    return parse(shell_words(text)[0])
