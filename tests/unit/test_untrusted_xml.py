"""The domain XML and the cookie of a save image are untrusted: an external entity never pulls a host
file in, through ``inspect`` or ``diff``, and each XML parser is checked on its own.

Two defences stand in front of a host file: the header reader refuses domain XML that does not start
with ``<domain`` (so a DOCTYPE, where an entity must be declared, cannot come first), and both parsers
(:func:`virtsave.image.saveimage._parse_xml` for ``inspect``, :func:`virtsave.image.diff.canonical_xml`
for ``diff``) leave entity references unresolved. The cookie has no ``<domain`` check, so its entities
reach the parsers through the CLI; for the domain XML the header check is bypassed in-process to show
the parsers alone hold. Two marker files: one with well-formed text (its content must never appear in
any output) and one that is not well-formed XML (a parser that loaded it would fail: ``inspect`` of a
cookie that only *declares and uses* it must still exit 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from badinput import assert_clean_error
from lxml import etree

from tests.unit.test_saveimage import XML, build_stream
from virtsave.core.errors import ImageError
from virtsave.image import diff as imagediff
from virtsave.image import saveimage

MARKER = "HOST-FILE-CONTENT-4242"


@pytest.fixture
def host_files(tmp_path: Path) -> dict[str, Path]:
    """A host file with well-formed text (``text``) and one no XML parser could include (``broken``)."""
    text, broken = tmp_path / "host-secret.txt", tmp_path / "host-broken.txt"
    text.write_text(f"{MARKER}\n")
    broken.write_text(f"{MARKER} <unclosed\n")
    return {"text": text, "broken": broken}


def _entity_xml(root: str, file: Path, inner: str = "") -> str:
    """*root* declaring entity ``x`` as *file* and using it (in its ``<name>`` when *inner* is empty)."""
    body = inner or "<name>&x;</name>"
    return (f'<?xml version="1.0"?><!DOCTYPE {root} [<!ENTITY x SYSTEM "file://{file}">]>'
            f"<{root} type='qemu'>{body}</{root}>")


def _image(path: Path, xml: str, cookie: str | None) -> Path:
    path.write_bytes(saveimage.encode_header(xml, cookie, partial=False) + build_stream()[0])
    return path


def _lenient_decode(data: bytes, cookie_offset: int) -> tuple[str, str | None]:
    """The header's XML and cookie without the ``<domain`` start check (the parsers' defence alone)."""
    xml = data[:data.find(b"\0")].decode()
    cookie = data[cookie_offset:data.find(b"\0", cookie_offset)].decode() if cookie_offset else None
    return xml, cookie


def _no_marker(*outputs: str) -> None:
    for out in outputs:
        assert MARKER not in out, f"a host file's content reached the output: {out[:400]!r}"


# --------------------------------------------------------------------------- the parsers themselves


@pytest.mark.parametrize("root", ["domain", "cookie"])
def test_inspect_parser_leaves_external_entity_unresolved(host_files, root):
    node = saveimage._parse_xml(_entity_xml(root, host_files["text"]), saveimage.HEADER_SIZE, root)
    assert node.findtext("name") == ""                     # an unresolved reference, no text
    assert b"<name>&x;</name>" in etree.tostring(node)
    _no_marker(etree.tostring(node).decode())
    # a file that is not well-formed is never read either (loading it would be a syntax error)
    saveimage._parse_xml(_entity_xml(root, host_files["broken"]), saveimage.HEADER_SIZE, root)


@pytest.mark.parametrize("root", ["domain", "cookie"])
def test_diff_canonicalizer_leaves_external_entity_unresolved(host_files, root):
    lines = imagediff.canonical_xml(_entity_xml(root, host_files["text"]), [])
    assert "  <name>&x;</name>" in lines, lines
    _no_marker(*lines)
    lines = imagediff.canonical_xml(_entity_xml(root, host_files["broken"]), [])
    assert "  <name>&x;</name>" in lines, lines            # parsed, not "(unparsable XML: …)"


# --------------------------------------------------------------------------- the domain XML


def test_domain_xml_with_doctype_refused_by_the_header_reader(host_files, tmp_path, cli):
    """First defence: a DOCTYPE before ``<domain`` is not a libvirt domain XML: refused at offset 92."""
    img = _image(tmp_path / "xxe.save", _entity_xml("domain", host_files["text"]), None)
    with pytest.raises(ImageError, match=r"does not start with a <domain> element \(at offset 92\)"):
        saveimage.read_header_path(img)
    good = _image(tmp_path / "good.save", XML, None)
    for args in (("inspect", str(img)), ("--json", "inspect", str(img)), ("diff", str(good), str(img))):
        proc = cli(*args)
        line = assert_clean_error(proc)
        assert "does not start with a <domain> element" in line, (args, line)
        _no_marker(proc.stdout, proc.stderr)


def test_domain_xml_entity_not_resolved_by_inspect_or_diff(host_files, tmp_path, cli, monkeypatch):
    """Second defence, with the header check out of the way: ``inspect`` and ``diff`` read the image,
    the entity stays a reference (the domain's name is empty, ``&x;`` is shown), no host file is read."""
    monkeypatch.setattr(saveimage, "_decode_data", _lenient_decode)
    good = _image(tmp_path / "good.save", XML, None)
    img = _image(tmp_path / "xxe.save", _entity_xml("domain", host_files["text"]), None)
    broken = _image(tmp_path / "xxe-broken.save", _entity_xml("domain", host_files["broken"]), None)
    proc = cli("--json", "inspect", str(img))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["domain"]["name"] == ""
    human = cli("inspect", str(img))
    assert human.returncode == 0, human.stderr
    assert cli("inspect", str(broken)).returncode == 0       # the broken file was never loaded
    d = cli("diff", str(good), str(img))
    assert d.returncode == 1, d.stderr
    assert "+   <name>&x;</name>" in d.stdout, d.stdout
    assert cli("diff", str(good), str(broken)).returncode == 1
    _no_marker(proc.stdout, proc.stderr, human.stdout, human.stderr, d.stdout, d.stderr)


# --------------------------------------------------------------------------- the cookie


def test_cookie_entity_not_resolved_by_inspect_or_diff(host_files, tmp_path, cli):
    """The cookie has no ``<domain`` check: its DOCTYPE reaches both parsers through the CLI."""
    good = _image(tmp_path / "good.save", XML, "<cookie><cpu>host</cpu></cookie>")
    cookie = _entity_xml("cookie", host_files["text"], "<cpu>&x;</cpu>")
    img = _image(tmp_path / "xxe-cookie.save", XML, cookie)
    broken = _image(tmp_path / "xxe-cookie-broken.save", XML,
                    _entity_xml("cookie", host_files["broken"], "<cpu>&x;</cpu>"))
    proc = cli("--json", "inspect", str(img))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cookie"] == cookie       # shown as stored, never expanded
    human = cli("inspect", str(img))
    assert human.returncode == 0, human.stderr
    b = cli("inspect", str(broken))
    assert b.returncode == 0, f"inspect loaded the entity's file: {b.stderr}"
    d = cli("diff", str(good), str(img))
    assert d.returncode == 1, d.stderr
    assert "+   <cpu>&x;</cpu>" in d.stdout, d.stdout
    db = cli("diff", str(good), str(broken))
    assert db.returncode == 1 and "+   <cpu>&x;</cpu>" in db.stdout, (db.stdout, db.stderr)
    _no_marker(proc.stdout, proc.stderr, human.stdout, human.stderr, d.stdout, d.stderr, db.stdout)


def test_cookie_entity_expansion_bomb_refused(tmp_path, cli):
    """A 'billion laughs' cookie is refused with one line by libxml2's amplification limit (whether
    or not entities are substituted), not expanded."""
    ents = '<!ENTITY a0 "LOLLOLLOLLOL">' + "".join(
        f'<!ENTITY a{i} "' + f"&a{i - 1};" * 10 + '">' for i in range(1, 10))
    cookie = f'<?xml version="1.0"?><!DOCTYPE cookie [{ents}]><cookie><cpu>&a9;</cpu></cookie>'
    img = _image(tmp_path / "lol.save", XML, cookie)
    proc = cli("inspect", str(img))
    line = assert_clean_error(proc)
    assert "cookie is not well-formed XML" in line and "amplification" in line, line
    assert "LOLLOLLOL" not in proc.stdout
