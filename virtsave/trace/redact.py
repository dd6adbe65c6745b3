"""Remove secret values from traces, domain XML and QEMU command lines.

What is a secret (replaced by ``"<redacted>"``; in XML ``&lt;redacted&gt;``):

* XML: ``passwd``/``password``/``passphrase`` attributes (``<graphics passwd=…>``, ``<auth …>``),
  the text of ``<secret>``, ``<password>``, ``<passwd>``, ``<passphrase>`` elements, and ``value``
  attributes of ``<secret>`` elements. References (``<secret type='…' uuid='…'/>``, ``usage=``) stay.
* argv: ``data=`` of ``secret`` objects (``-object '{"qom-type":"secret",…,"data":…}'`` or the keyval
  form ``secret,id=…,data=…``), JSON keys ``password``/``passwd``/``passphrase`` in any JSON option, and
  ``password=``/``passwd=`` values in option strings unless they are booleans (``password=on`` only says
  a password is required). File paths stay: the master key's ``file=`` names a file, not its content.
* QMP: ``object-add`` of a ``secret`` (``data``, flat or under ``props``), ``set_password`` and
  ``change-vnc-password`` (``password``), legacy ``change`` to ``vnc password`` (``arg``), the argument of
  an HMP ``set_password``/``change vnc password`` inside ``human-monitor-command``, and JSON keys
  ``password``/``passwd``/``passphrase`` in any command or reply.

Example::

    >>> redact_argv(["-object", '{"qom-type":"secret","id":"s0","data":"c2VjcmV0"}'])
    ['-object', '{"qom-type":"secret","id":"s0","data":"<redacted>"}']
    >>> redact_xml("<graphics type='vnc' passwd='hunter2'/>")
    "<graphics type='vnc' passwd='&lt;redacted&gt;'/>"
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from virtsave.trace import argv as qargv

#: A trace (:class:`virtsave.trace.model.Trace`) or any JSON object shaped like one.
_T = TypeVar("_T", bound=Mapping[str, Any])

__all__ = ["REDACTED", "SECRET_KEYS", "redact_argv", "redact_message", "redact_option", "redact_trace",
           "redact_xml"]

REDACTED = "<redacted>"
_XML_REDACTED = "&lt;redacted&gt;"
SECRET_KEYS = frozenset({"password", "passwd", "passphrase"})
_BOOL = frozenset({"on", "off", "yes", "no", "true", "false", "y", "n", ""})

_XML_ATTR = re.compile(r"""(\s(?:passwd|password|passphrase)\s*=\s*)(['"])(.*?)\2""", re.S | re.I)
_XML_ELEM = re.compile(r"""(<(secret|password|passwd|passphrase)\b[^>]*(?<!/)>)([^<]+)(</\2\s*>)""", re.S | re.I)
_XML_SECRET_VALUE = re.compile(r"""(<secret\b[^>]*\svalue\s*=\s*)(['"])(.*?)\2""", re.S | re.I)
_HMP_PASSWORD = re.compile(r"^(\s*(?:set_password\s+\S+\s+|change\s+vnc\s+password\s+))(\S+)(.*)$", re.S)


def redact_xml(xml: str | None) -> str | None:
    """*xml* with secret values replaced (formatting kept: textual substitution, no re-serialization)."""
    if not xml:
        return xml
    out = _XML_ATTR.sub(lambda m: f"{m.group(1)}{m.group(2)}{_XML_REDACTED}{m.group(2)}", xml)
    out = _XML_SECRET_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}{_XML_REDACTED}{m.group(2)}", out)
    return _XML_ELEM.sub(lambda m: m.group(1) + (_XML_REDACTED if m.group(3).strip() else m.group(3)) + m.group(4),
                         out)


def _redact_obj(v: Any, *, secret_object: bool = False) -> Any:
    """Redact secret keys recursively; ``data`` too when *v* describes a ``secret`` object."""
    if isinstance(v, dict):
        is_secret = secret_object or v.get("qom-type") == "secret"
        out = {}
        for k, x in v.items():
            plain_secret = k in SECRET_KEYS and isinstance(x, str | int | float) and not isinstance(x, bool)
            if plain_secret or (is_secret and k == "data"):
                out[k] = REDACTED
            elif is_secret and k == "props" and isinstance(x, dict):
                out[k] = _redact_obj(x, secret_object=True)
            else:
                out[k] = _redact_obj(x)
        return out
    if isinstance(v, list):
        return [_redact_obj(x) for x in v]
    return v


def redact_option(value: str, option: str | None = None) -> str:
    """Redact one option value of a QEMU command line (JSON or keyval), as parsed by the
    command-line model; unchanged text when nothing in it is secret.

    >>> redact_option("secret,id=s1,data=luks-pass,format=raw", "-object")
    'secret,id=s1,data=<redacted>,format=raw'
    >>> redact_option("127.0.0.1:0,password=on", "-vnc")
    '127.0.0.1:0,password=on'
    """
    v = qargv.parse_value(value, option)
    if v.syntax == "json":
        red = _redact_obj(v.props)
        return qargv.format_json(red) if red != v.props else value
    is_secret = v.kind == "secret"
    changed = False
    parts: list[tuple[str | None, str]] = []
    for k, x in v.parts:
        if k is not None and ((k in SECRET_KEYS and x.lower() not in _BOOL) or (is_secret and k == "data")):
            x, changed = REDACTED, True
        parts.append((k, x))
    return qargv.join_keyval(parts) if changed else value


def redact_argv(argv: list[str] | None) -> list[str]:
    """A copy of *argv* with secret values replaced (see the module docstring): every option value
    and positional word goes through :func:`redact_option`."""
    cl = qargv.parse(argv or [])
    out = [redact_option(f"{k}={v}") for k, v in cl.env] + ([cl.binary] if cl.binary is not None else [])
    for o in cl.options:
        if o.positional:
            out.append(redact_option(o.word))
        else:
            out += [o.word] if o.value is None else [o.word, redact_option(o.value, o.name)]
    return out


def _redact_arguments(ex: Any, args: dict[str, Any]) -> dict[str, Any]:
    """The arguments of command *ex* with its password/secret arguments redacted."""
    if ex == "object-add":
        args = _redact_obj(args, secret_object=args.get("qom-type") == "secret")
    elif ex in ("set_password", "change-vnc-password") and "password" in args:
        args = {**args, "password": REDACTED}
    elif ex == "change" and args.get("device") == "vnc" and args.get("target") == "password":
        args = {**args, "arg": REDACTED}
    elif ex == "human-monitor-command" and isinstance(args.get("command-line"), str):
        hm = _HMP_PASSWORD.match(args["command-line"])
        if hm:
            args = {**args, "command-line": hm.group(1) + REDACTED + hm.group(3)}
    return _redact_obj(args)  # type: ignore[no-any-return]


def redact_message(msg: dict[str, Any]) -> dict[str, Any]:
    """A redacted copy of one trace message (command, reply or event)."""
    m = copy.deepcopy(msg)
    if m.get("kind") == "command":
        if isinstance(m.get("arguments"), dict):
            m["arguments"] = _redact_arguments(m.get("execute"), m["arguments"])
    elif m.get("kind") == "reply":
        if "return" in m:
            m["return"] = _redact_obj(m["return"])
    elif m.get("kind") == "event":
        m["data"] = _redact_obj(m.get("data"))
    return m


def _redact_phase(ph: dict[str, Any]) -> None:
    """Redact one phase in place: messages, image header XML, substitution values, options XML."""
    ph["messages"] = [redact_message(m) for m in ph.get("messages") or []]
    header = (ph.get("image") or {}).get("header")
    if isinstance(header, dict):
        for k in ("xml", "domain_xml", "cookie"):
            if isinstance(header.get(k), str):
                header[k] = redact_xml(header[k])
    for sub in ph.get("substitutions") or []:
        for k in ("original", "replacement"):
            if isinstance(sub.get(k), dict | list):
                sub[k] = _redact_obj(sub[k])
    opts = ph.get("options")
    if isinstance(opts, dict) and isinstance(opts.get("xml"), str):
        opts["xml"] = redact_xml(opts["xml"])


def redact_trace(trace: _T) -> _T:
    """A deep copy of *trace* with every secret value replaced; the input is not modified.

    Covers ``domain.xml``, ``domain.argv``, every phase's messages, ``image.header`` XML fields
    (``xml``/``domain_xml``/``cookie``) and substitution values. Idempotent.
    """
    tr = copy.deepcopy(trace)
    dom = tr.get("domain") or {}
    if isinstance(dom.get("xml"), str):
        dom["xml"] = redact_xml(dom["xml"])
    if isinstance(dom.get("argv"), list):
        dom["argv"] = redact_argv(dom["argv"])
    for ph in tr.get("phases") or []:
        _redact_phase(ph)
    return tr
