"""Throwaway disk overlays: a replayed QEMU writes into qcow2 files of its own, never into the original's.

A libvirt disk is a ``-blockdev`` graph: a protocol node naming the host file
(``{"driver":"file","filename":…,"node-name":"libvirt-1-storage"}``), a format node on it
(``{"driver":"qcow2","node-name":"libvirt-1-format","file":"libvirt-1-storage"}``) and, for UEFI
variables, the protocol node alone (``-machine …,pflash1=libvirt-pflash1-storage``). What the guest
uses is a *top*: a node no other node references. For each writable top (``read-only`` not true):

* the traced top is opened read-only and renamed ``vs-ro-N``, every node below it read-only too, all
  with ``force-share`` (QEMU's image lock: the original QEMU may hold the write lock while it runs);
* a new qcow2 file node ``vs-ovl-N`` on ``<dir>/<top>.qcow2`` (created by ``qemu-img``, of the
  top's virtual size) and a qcow2 node carrying the traced top's name, backed by ``vs-ro-N``.

Devices and the machine keep naming the node they named (``drive=``, ``pflash1=``), in the traced
order; the guest sees the same disk. Read-only tops (firmware code, CD-ROMs) keep their graph; their
protocol nodes are made read-only as well, so no original file is ever opened for writing.

Example::

    >>> from virtsave.trace import argv as qargv
    >>> cl = qargv.parse(["qemu",
    ...     "-blockdev", '{"driver":"file","filename":"/d.qcow2","node-name":"s","auto-read-only":true}',
    ...     "-blockdev", '{"node-name":"f","read-only":false,"driver":"qcow2","file":"s","backing":null}'])
    >>> s, f = cl.options
    >>> read_only(s.parsed).text
    '{"driver":"file","filename":"/d.qcow2","node-name":"s","read-only":true,"force-share":true}'
    >>> ov = Overlay("f", 1, Path("/run/virtsave/q1/f.qcow2"), size_query(cl.block_graph(), "f"))
    >>> [w[:60] for w in overlay_words(f.parsed, ov)]   # doctest: +NORMALIZE_WHITESPACE
    ['{"node-name":"vs-ro-1","read-only":true,"driver":"qcow2","fi',
     '{"driver":"file","filename":"/run/virtsave/q1/f.qcow2","node',
     '{"driver":"qcow2","node-name":"f","file":"vs-ovl-1","backing']
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtsave.core.errors import LaunchError
from virtsave.trace import argv as qargv
from virtsave.trace.argv import BlockGraph, OptionValue

__all__ = ["BASE_PREFIX", "FILE_PREFIX", "NETWORK", "Overlay", "create", "file_name", "local_chain", "overlay_words",
           "qemu_img", "read_only", "size_query"]

#: Node names of the read-only traced top and of the overlay's file node (QEMU node names: ≤ 31 chars).
BASE_PREFIX = "vs-ro-"
FILE_PREFIX = "vs-ovl-"
#: Drivers that reach a remote server (never overlaid: the safety check refuses them).
NETWORK = frozenset({"nbd", "iscsi", "rbd", "gluster", "ssh", "http", "https", "ftp", "ftps", "nfs", "curl",
                      "nvme", "virtio-blk-vhost-vdpa", "virtio-blk-vhost-user", "libblkio"})


@dataclass(frozen=True)
class Overlay:
    """One overlay to create: the traced top *node* it replaces (its N-th writable top), its *path*,
    and *query*, the top's chain inline (read-only, force-share) for ``qemu-img info``."""

    node: str
    n: int
    path: Path
    query: dict[str, Any]

    @property
    def base(self) -> str:
        return f"{BASE_PREFIX}{self.n}"

    @property
    def file_node(self) -> str:
        return f"{FILE_PREFIX}{self.n}"


def file_name(node: str) -> str:
    """The overlay file name for *node* (a safe file name).

    >>> file_name("libvirt-1-format")
    'libvirt-1-format.qcow2'
    """
    return re.sub(r"[^A-Za-z0-9_.-]", "_", node) + ".qcow2"


def local_chain(graph: BlockGraph, top: str) -> bool:
    """True when *top* and every node below it are declared and read local files only (no network
    driver, no fdset)."""
    for n in [top, *graph.below(top)]:
        if n not in graph.nodes:
            return False        # a reference to no declared node: QEMU refuses it, nothing to overlay
        v = graph.nodes[n].parsed
        if v.kind in NETWORK:
            return False
        fn = v.get("filename")
        if graph.protocol(n) and not (isinstance(fn, str) and fn.startswith("/") and not fn.startswith("/dev/fdset/")):
            return False
    return True


def read_only(value: OptionValue) -> OptionValue:
    """*value* (a ``-blockdev``) opened read-only, sharing the image with a running original."""
    if value.syntax == "json":
        return value.updated({"auto-read-only": None, "read-only": True, "force-share": True})
    return value.updated({"auto-read-only": None, "read-only": "on", "force-share": "on"})


def _ro_props(props: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in props.items() if k not in ("node-name", "auto-read-only")}
    out.update({"read-only": True, "force-share": True})
    return out


def size_query(graph: BlockGraph, top: str) -> dict[str, Any]:
    """*top*'s chain written inline (children defined in place, read-only, backing files not opened),
    for ``qemu-img info json:…`` to read the virtual size the overlay must have."""
    def inline(node: str, depth: int) -> dict[str, Any]:
        v = graph.nodes[node].parsed
        props = _ro_props(dict(v.props))
        for key, child in graph.children.get(node, ()):
            if key == "backing":
                props["backing"] = None
            elif depth < 16 and isinstance(props.get(key), str):
                props[key] = inline(child, depth + 1)
        return props
    return inline(top, 0)


def overlay_words(top: OptionValue, ov: Overlay) -> list[str]:
    """The ``-blockdev`` values replacing the traced *top*: itself read-only as ``vs-ro-N``, the
    overlay's file node, the overlay named as the traced top."""
    base = read_only(top).updated({"node-name": ov.base})
    f = {"driver": "file", "filename": str(ov.path), "node-name": ov.file_node}
    q: dict[str, Any] = {"driver": "qcow2", "node-name": ov.node, "file": ov.file_node, "backing": ov.base}
    if "discard" in top:
        q["discard"] = top.get("discard")
    if top.syntax == "json":
        return [base.text, qargv.format_json(f), qargv.format_json(q)]
    return [base.text, qargv.join_keyval(list(f.items())),
            qargv.join_keyval([(k, str(v)) for k, v in q.items()])]


def qemu_img(binary: str) -> str:
    """``qemu-img`` next to the QEMU *binary*, else on PATH."""
    near = Path(binary).with_name("qemu-img")
    found = str(near) if near.is_file() and os.access(near, os.X_OK) else shutil.which("qemu-img")
    if not found:
        raise LaunchError("qemu-img not found (package qemu-utils): needed for the replay's disk overlays")
    return found


def _run(cmd: list[str], what: str) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                           env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"{what}: {exc}") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LaunchError(f"{what}: {last}")
    return p.stdout


def create(overlays: Iterable[Overlay], binary: str) -> list[Overlay]:
    """Create each overlay file (0600) that does not exist yet (an earlier phase of the same replay may
    have made it: its writes carry on); return those created."""
    made: list[Overlay] = []
    img = None
    for ov in overlays:
        if ov.path.exists():
            continue
        img = img or qemu_img(binary)
        info = _run([img, "info", "-U", "--output=json", "json:" + json.dumps(ov.query)],
                    f"cannot read the size of disk node {ov.node}")
        size = int(json.loads(info)["virtual-size"])
        _run([img, "create", "-q", "-f", "qcow2", str(ov.path), str(size)], f"cannot create overlay {ov.path}")
        os.chmod(ov.path, 0o600)
        made.append(ov)
    return made
