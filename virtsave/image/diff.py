"""Compare two save images: header, domain XML and cookie, stream configuration, sections, RAM.

The XML and cookie are canonicalized with lxml, dropping what libvirt regenerates (the ``image`` part
of the one normalization table, :data:`virtsave.trace.diff.NORMALIZE_TABLE`).

Example::

    >>> ImageDifference("header", "format", ["raw → zstd"]).to_json()["area"]
    'header'
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from virtsave.trace.diff import Hunk, Row, align, image_rules, render_hunks, short

__all__ = ["ImageDiff", "ImageDifference", "canonical_xml", "diff_images"]


# ---------------------------------------------------------------------------------------------
# Image diff
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageDifference:
    """One difference between two images (``area``: header, xml, cookie, stream, sections, ram)."""

    area: str
    name: str
    details: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.area

    def to_json(self) -> dict[str, Any]:
        return {"area": self.area, "name": self.name, "details": self.details}


@dataclass
class ImageDiff:
    """Result of :func:`diff_images`; ``info`` lists differences expected between any two saves."""

    a_label: str
    b_label: str
    differences: list[ImageDifference]
    hunks: list[Hunk]
    info: list[str]

    @property
    def equivalent(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        return {"format": "virtsave-diff", "kind": "image", "equivalent": self.equivalent,
                "a": {"label": self.a_label}, "b": {"label": self.b_label},
                "summary": dict(Counter(d.area for d in self.differences)),
                "differences": [d.to_json() for d in self.differences], "info": self.info}

    def render(self, color: bool = False, context: int = 2) -> str:
        return render_hunks(f"--- {self.a_label}", f"+++ {self.b_label}", self.hunks, self.differences, color, context,
                       self.info)


def canonical_xml(text: str | None, ignore: list[str]) -> list[str]:
    """Pretty, canonical lines of *text* without the nodes the XPaths in *ignore* select."""
    if not text:
        return []
    from lxml import etree

    try:
        root = etree.fromstring(text.encode(), etree.XMLParser(remove_blank_text=True, remove_comments=True,
                                                              resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as exc:
        return [f"(unparsable XML: {exc})"]
    for xp in ignore:
        try:
            hits = root.xpath(xp)
        except etree.XPathError:
            continue
        for node in hits if isinstance(hits, list) else []:
            if isinstance(node, str):   # attribute or text result (lxml "smart strings")
                parent = getattr(node, "getparent", lambda: None)()
                if getattr(node, "is_attribute", False) and parent is not None:
                    del parent.attrib[cast(Any, node).attrname]  # lxml "smart string": knows its attribute
            elif isinstance(node, etree._Element) and node.getparent() is not None:
                node.getparent().remove(node)
    for el in root.iter():
        if isinstance(el.tag, str) and len(el.attrib) > 1:
            items = sorted(el.attrib.items())
            el.attrib.clear()
            el.attrib.update(items)
    text_out: str = etree.tostring(root, pretty_print=True, encoding="unicode")
    return text_out.splitlines()


def _xml_hunk(title: str, area: str, a: str | None, b: str | None, ignore: list[str],
              diffs: list[ImageDifference]) -> Hunk:
    la, lb = canonical_xml(a, ignore), canonical_xml(b, ignore)
    rows: list[Row] = []
    changed: list[str] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, la, lb, autojunk=False).get_opcodes():
        if op == "equal":
            rows += [Row(" ", x.rstrip()) for x in la[i1:i2]]
            continue
        rows += [Row("-", x.rstrip()) for x in la[i1:i2]]
        rows += [Row("+", x.rstrip()) for x in lb[j1:j2]]
        changed += [f"- {x.strip()}" for x in la[i1:i2]] + [f"+ {x.strip()}" for x in lb[j1:j2]]
    if changed:
        diffs.append(ImageDifference(area, title, changed))
    return Hunk(title, rows)


def diff_images(a: str | Path, b: str | Path, *, rules_path: str | Path | None = None,
                inspect_a: dict[str, Any] | None = None, inspect_b: dict[str, Any] | None = None) -> ImageDiff:
    """Compare two save images (header, XML, cookie, stream configuration, sections, RAM sizes).

    Partial (``LibvirtQemudPart``) and corrupt images raise :class:`~virtsave.core.errors.ImageError`.
    """
    from virtsave.image.saveimage import inspect_image

    # A partial image is not a save image yet: refused with the offset, like everywhere else.
    ia = inspect_a or inspect_image(a)
    ib = inspect_b or inspect_image(b)
    conf = image_rules(rules_path)
    diffs: list[ImageDifference] = []
    info: list[str] = []
    sa, sb = ia["stream"], ib["stream"]
    hunks = [
        _header_hunk(ia["header"], ib["header"], set(conf.get("header_layout_fields", [])), diffs, info),
        _xml_hunk("domain XML", "xml", ia["xml"], ib["xml"], conf.get("xml_ignore", []), diffs),
        _xml_hunk("cookie", "cookie", ia["cookie"], ib["cookie"], conf.get("cookie_ignore", []), diffs),
        _configuration_hunk(sa, sb, diffs),
        _sections_hunk(sa["sections"], sb["sections"], diffs),
        _ram_hunk(sa["ram"], sb["ram"], diffs, info),
    ]
    return ImageDiff(str(a), str(b), diffs, hunks, info)


def _header_hunk(ha: dict[str, Any], hb: dict[str, Any], layout: set[str], diffs: list[ImageDifference],
                 info: list[str]) -> Hunk:
    """Header fields; those in *layout* follow the XML length and only inform."""
    rows = []
    for k in ("magic", "version", "format", "was_running", "data_len", "cookie_offset", "stream_offset"):
        if ha.get(k) == hb.get(k):
            rows.append(Row(" ", f"{k}: {ha.get(k)}"))
        elif k in layout:
            info.append(f"header {k}: {ha.get(k)} → {hb.get(k)} (follows the XML length)")
            rows.append(Row(" ", f"{k}: {ha.get(k)} → {hb.get(k)} (layout, follows the XML length)"))
        else:
            diffs.append(ImageDifference("header", k, [f"{k}: {ha.get(k)} → {hb.get(k)}"]))
            rows += [Row("-", f"{k}: {ha.get(k)}"), Row("+", f"{k}: {hb.get(k)}")]
    return Hunk("header", rows)


def _configuration_hunk(sa: dict[str, Any], sb: dict[str, Any], diffs: list[ImageDifference]) -> Hunk:
    """The stream's configuration section and whether it carries a vmstate description."""
    rows = []
    ca, cb = sa.get("configuration") or {}, sb.get("configuration") or {}
    for k in ("machine", "capabilities", "target_page_bits"):
        if ca.get(k) != cb.get(k):
            diffs.append(ImageDifference("stream", f"configuration.{k}", [f"{k}: {short(ca.get(k))} → "
                                                                          f"{short(cb.get(k))}"]))
            rows += [Row("-", f"{k}: {short(ca.get(k))}"), Row("+", f"{k}: {short(cb.get(k))}")]
        else:
            rows.append(Row(" ", f"{k}: {short(ca.get(k))}"))
    va, vb = sa["vmdesc"].get("present"), sb["vmdesc"].get("present")
    if va != vb:
        diffs.append(ImageDifference("stream", "vmdesc", [f"vmstate description present: {va} → {vb}"]))
        rows += [Row("-", f"vmstate description: {va}"), Row("+", f"vmstate description: {vb}")]
    return Hunk("stream configuration", rows)


@dataclass
class _Section:
    key: str                # name, instance and version: what is aligned
    name: str               # name and instance: what a difference is reported under
    sec: dict[str, Any]

    @classmethod
    def of(cls, s: dict[str, Any]) -> _Section:
        name = f"{s['name']} (instance {s['instance_id']})"
        return cls(f"{name} v{s['version_id']}", name, s)


def _sections_hunk(secs_a: list[dict[str, Any]], secs_b: list[dict[str, Any]],
                   diffs: list[ImageDifference]) -> Hunk:
    """Device sections aligned by name, instance and version (missing, added, changed, moved)."""
    la, lb = [_Section.of(s) for s in secs_a], [_Section.of(s) for s in secs_b]
    rows = []
    for op, i, j in align(la, lb):
        x = la[i] if i is not None else None
        y = lb[j] if j is not None else None
        if op == "delete" and x is not None:
            diffs.append(ImageDifference("sections", x.name, [f"section {x.key} only in A"]))
            rows.append(Row("-", x.key))
        elif op == "insert" and y is not None:
            diffs.append(ImageDifference("sections", y.name, [f"section {y.key} only in B"]))
            rows.append(Row("+", y.key))
        elif op == "change" and x is not None and y is not None:
            d = [f"version_id: {x.sec['version_id']} → {y.sec['version_id']}"]
            diffs.append(ImageDifference("sections", y.name, d))
            rows.append(Row("~", y.name, d))
        elif op == "moved" and y is not None:
            d = [f"section order: #{i} in A, #{j} in B"]
            diffs.append(ImageDifference("sections", y.name, d))
            rows.append(Row(">", y.key, d))
        elif y is not None:
            rows.append(Row(" ", y.key))
    return Hunk(f"sections (A {len(la)}, B {len(lb)})", rows)


def _ram_hunk(ra: dict[str, Any], rb: dict[str, Any], diffs: list[ImageDifference], info: list[str]) -> Hunk:
    """RAM sizes and blocks differ; page counts depend on the guest's memory and only inform."""
    # mapped_ram follows the stream capabilities (reported there), so it is context only here.
    rows = [Row(" ", f"mapped_ram: {ra.get('mapped_ram')} / {rb.get('mapped_ram')}")]
    for k in ("page_size", "total_bytes"):
        if ra.get(k) != rb.get(k):
            diffs.append(ImageDifference("ram", k, [f"{k}: {ra.get(k)} → {rb.get(k)}"]))
            rows += [Row("-", f"{k}: {ra.get(k)}"), Row("+", f"{k}: {rb.get(k)}")]
        else:
            rows.append(Row(" ", f"{k}: {ra.get(k)}"))
    ba = {x["name"]: x for x in ra["blocks"]}
    bb = {x["name"]: x for x in rb["blocks"]}
    for name in list(ba) + [n for n in bb if n not in ba]:
        x, y = ba.get(name), bb.get(name)
        if x is None or y is None or x.get("length") != y.get("length"):
            la_, lb_ = (x or {}).get("length"), (y or {}).get("length")
            diffs.append(ImageDifference("ram", f"block {name}", [f"length: {la_} → {lb_}"]))
            rows += [Row("-", f"block {name}: {la_}"), Row("+", f"block {name}: {lb_}")]
        else:
            rows.append(Row(" ", f"block {name}: {x['length']}"))
    info += [f"ram {k}: {ra.get(k)} → {rb.get(k)} (depends on guest memory contents)"
             for k in ("pages", "zero_pages", "bytes") if ra.get(k) != rb.get(k)]
    return Hunk("ram", rows)
