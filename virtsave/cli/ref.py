"""Reference-path commands: libvirt's own save/restore/managed save, with a report.

Example::

    virtsave managed-save vm1 --bypass-cache
    virtsave start vm1                       # says: from the managed-save image, or cold boot
    virtsave save vm1 /var/tmp/vm1.img --image-format sparse --parallel-channels 2
    virtsave restore /var/tmp/vm1.img --paused
    virtsave managed-save --all --match 'web-*' --parallel 2   # summary table; exit 2 if any failed
    virtsave --json list
    virtsave -c qemu:///system -c qemu+ssh://root@db2/system managed-save --all   # host column
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from virtsave.cli.progress import job_progress
from virtsave.core.errors import OperationFailed, VirtsaveError
from virtsave.core.operation import OpResult
from virtsave.image.saveimage import Header, read_header_path
from virtsave.libvirtd import host
from virtsave.libvirtd import reference as lp

from .common import OPTIONS, emit_json, info


class ArgumentError(VirtsaveError):
    """Contradictory or invalid command-line arguments (exit 2, one line)."""


# --------------------------------------------------------------------------- helpers

BypassCache = Annotated[bool, typer.Option("--bypass-cache", help="O_DIRECT: keep the image out of the page cache")]
Running = Annotated[bool, typer.Option("--running", help="domain runs after restore, whatever the image says")]
Paused = Annotated[bool, typer.Option("--paused", help="domain stays paused after restore")]
Parallel = Annotated[int, typer.Option("--parallel", min=1, help="with --all: domains handled at once")]
All = Annotated[bool, typer.Option("--all", help="every matching domain (see --match); summary table")]
Match = Annotated[str | None, typer.Option("--match", metavar="GLOB",
                                           help="with --all: only domains whose name matches GLOB")]
XmlFile = Annotated[Path | None, typer.Option("--xml", metavar="FILE",
                                              help="replacement domain XML stored in / used from the image")]
Channels = Annotated[int | None, typer.Option("--parallel-channels", metavar="N",
                                              help="QEMU multifd channels (sparse format, libvirt ≥ 11.2)")]


def _state(running: bool, paused: bool) -> str | None:
    if running and paused:
        raise ArgumentError("--running and --paused exclude each other")
    return "running" if running else "paused" if paused else None


def _read_xml(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text()
    except OSError as exc:
        raise ArgumentError(f"cannot read --xml {path}: {exc.strerror}") from None


def _check_channels(n: int | None) -> None:
    if n is not None and n < 1:
        raise ArgumentError(f"--parallel-channels must be ≥ 1, not {n}")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _emit(res: OpResult, text: str) -> None:
    if res.detail.get("interrupted"):
        info(f"{res.domain}: Ctrl-C came too late to cancel the {res.operation}: it completed")
    if OPTIONS.json:
        emit_json(res.to_dict())
    else:
        _out().print(text, markup=False)


def _bulk_report(results: list[OpResult], operation: str, seconds: float) -> None:
    failed = [r for r in results if not r.ok]
    if OPTIONS.json:
        emit_json({"operation": operation, "ok": not failed, "seconds": round(seconds, 3),
                   "results": [r.to_dict() for r in results]})
    else:
        table = Table(title=f"{operation}: {len(results) - len(failed)} of {len(results)} ok in {seconds:.2f} s",
                      title_justify="left")
        for col in ("domain", "result", "seconds", "image size", "detail"):
            table.add_column(col, justify="right" if col in ("seconds", "image size") else "left",
                             no_wrap=col != "detail")
        for r in results:
            if r.ok:
                detail = ""
                if operation == "start":
                    detail = "from managed-save image" if r.detail.get("from_managed_save") else "cold boot"
                detail = ", ".join(x for x in (detail, r.state or "") if x)
            else:
                detail = (r.error or "").removeprefix(f"{operation} of {r.domain} failed: ")
            table.add_row(r.domain, "ok" if r.ok else "FAILED", f"{r.seconds:.2f}", _size(r.image_size), detail)
        _out().print(table)
    if failed:
        raise OperationFailed(f"{len(failed)} of {len(results)} {operation} operations failed: "
                              + ", ".join(str(r.domain) for r in failed))


def _image_header(uri: str, file: Path) -> Header:
    """The header of save image *file* on the daemon's host (this machine for a local URI)."""
    from virtsave.libvirtd import capture, transport
    from virtsave.libvirtd import uri as liburi

    target = liburi.parse(uri)
    if not target.is_ssh:
        return read_header_path(file, allow_partial=False)
    if not file.is_absolute():
        raise ArgumentError(f"{file}: give an absolute path on the daemon's host {target.label}")
    with transport.host_for(uri) as host:
        return capture.read_header(host, str(file), allow_partial=False)


def _select_args(doms: list[str] | None, all_: bool, match: str | None, command: str) -> str | None:
    """The single domain name, or None for a bulk run (--all)."""
    if match and not all_:
        raise ArgumentError("--match only goes with --all")
    if all_:
        return None
    if not doms:
        raise ArgumentError(f"{command}: name a domain, or use --all")
    if len(doms) > 1:
        raise ArgumentError(f"{command}: one domain at a time (use --all with names or --match for several)")
    return doms[0]


def _one_or_all(operation: str, one: str | None, nothing: str, single: Callable[..., OpResult],
                bulk: Callable[..., list[OpResult]], domains: list[str] | None, *, match: str | None,
                parallel: int, **options: Any) -> OpResult | None:
    """*single* on domain *one*, or *bulk* on *domains* when *one* is None (reported here: None
    returned); both with the same *options* and a progress display while they run."""
    conn = lp.connect(OPTIONS.uri)
    with job_progress(operation) as cb:
        # Neither a display nor --json (which reports the job stats): no polling — job stats every
        # 0.2 s per domain load libvirtd and QEMU (a query-migrate each) for nothing.
        progress = cb if OPTIONS.progress or OPTIONS.json else None
        if one is not None:
            return single(conn, one, progress=progress, **options)
        t0 = time.monotonic()
        results = bulk(conn, domains or None, parallel, match=match, progress=progress, **options)
        seconds = time.monotonic() - t0
    # report after the progress display is gone
    if not results and not OPTIONS.json:
        info(f"{operation} --all: {nothing}; nothing to do")
    _bulk_report(results, operation, seconds)
    return None


# --------------------------------------------------------------------------- commands


def managed_save_cmd(
    domains: Annotated[list[str] | None, typer.Argument(metavar="[DOM]...", help="domain name or UUID")] = None,
    bypass_cache: BypassCache = False,
    running: Running = False,
    paused: Paused = False,
    all_: All = False,
    match: Match = None,
    parallel: Parallel = 2,
) -> None:
    """Save a running domain's memory to its managed-save image and stop it (virsh managedsave).

    With --all: every running or paused domain (restricted to the DOMs named and/or --match),
    --parallel at a time, then a summary table; exit 2 if any failed. With several hosts (-c
    repeated, --hosts FILE) on every host at once, with a host column.
    """
    state = _state(running, paused)
    one = _select_args(domains, all_, match, "managed-save")
    if OPTIONS.fan_out and one is None:
        from virtsave.libvirtd import fleet

        from . import hostsview
        with job_progress("managed-save") as cb:
            out = fleet.managed_save_hosts(OPTIONS.uris, domains or None, parallel, match=match,
                                           bypass_cache=bypass_cache, state=state,
                                           progress=cb if OPTIONS.progress or OPTIONS.json else None)
        hostsview.bulk_report(out, "managed-save")
        return
    res = _one_or_all("managed-save", one, "no running domain matched", lp.managed_save, lp.managed_save_all,
                      domains, match=match, parallel=parallel, bypass_cache=bypass_cache, state=state)
    if res is None:
        return
    _emit(res, f"{res.domain}: saved to managed-save image {res.image or '(daemon side)'} "
               f"({_size(res.image_size)}, {res.seconds:.2f} s); domain {res.state}")


def save_cmd(
    domain: Annotated[str, typer.Argument(metavar="DOM", help="domain name or UUID")],
    file: Annotated[Path, typer.Argument(metavar="FILE", help="image to write (on the daemon's host)")],
    bypass_cache: BypassCache = False,
    running: Running = False,
    paused: Paused = False,
    xml: XmlFile = None,
    image_format: Annotated[str | None, typer.Option("--image-format", metavar="F", help=(
        "raw, gzip, bzip2, xz, lzop, zstd or sparse (libvirt ≥ 11.2; default: qemu.conf save_image_format)"))] = None,
    parallel_channels: Channels = None,
) -> None:
    """Save a running domain to FILE and stop it (virsh save)."""
    state = _state(running, paused)
    if image_format is not None and image_format not in host.IMAGE_FORMATS:
        raise ArgumentError(f"unknown image format {image_format!r} (choose from {', '.join(host.IMAGE_FORMATS)})")
    _check_channels(parallel_channels)
    if parallel_channels is not None and image_format != "sparse":
        raise ArgumentError("--parallel-channels needs --image-format sparse")
    dxml = _read_xml(xml)
    conn = lp.connect(OPTIONS.uri)
    with job_progress("save") as cb:
        res = lp.save(conn, domain, file, bypass_cache=bypass_cache, state=state, xml=dxml,
                      image_format=image_format, parallel_channels=parallel_channels, progress=cb)
    fmt = f"format {image_format}, " if image_format else ""
    _emit(res, f"{res.domain}: saved to {res.image} ({fmt}{_size(res.image_size)}, {res.seconds:.2f} s); "
               f"domain {res.state}")


def restore_cmd(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="image written by save")],
    bypass_cache: BypassCache = False,
    running: Running = False,
    paused: Paused = False,
    xml: XmlFile = None,
    parallel_channels: Channels = None,
) -> None:
    """Start the domain saved in FILE (virsh restore). The image header is checked first."""
    state = _state(running, paused)
    _check_channels(parallel_channels)
    dxml = _read_xml(xml)
    # A missing, partial or corrupt image is reported (with its offset) before the daemon is asked;
    # FILE is on the daemon's host (read over ssh for a qemu+ssh:// daemon).
    header = _image_header(OPTIONS.uri, file)
    conn = lp.connect(OPTIONS.uri)
    with job_progress("restore") as cb:
        res = lp.restore(conn, file, bypass_cache=bypass_cache, state=state, xml=dxml,
                         parallel_channels=parallel_channels, progress=cb, header=header)
    _emit(res, f"{res.domain}: restored from {res.image} (format {res.detail.get('image_format')}, "
               f"{res.seconds:.2f} s); domain {res.state or '?'}")


def start_cmd(
    domains: Annotated[list[str] | None, typer.Argument(metavar="[DOM]...", help="domain name or UUID")] = None,
    bypass_cache: BypassCache = False,
    paused: Annotated[bool, typer.Option("--paused", help="leave the domain paused")] = False,
    all_: Annotated[bool, typer.Option("--all", help="every domain with a managed-save image (see --match)")] = False,
    match: Match = None,
    parallel: Parallel = 2,
) -> None:
    """Start a domain: from its managed-save image when it has one (says which happened).

    With --all: every shut-off domain that has a managed-save image (restricted to the DOMs
    named and/or --match), --parallel at a time; summary table; exit 2 if any failed. With several
    hosts (-c repeated, --hosts FILE) on every host at once, with a host column.
    """
    state = "paused" if paused else None
    one = _select_args(domains, all_, match, "start")
    if OPTIONS.fan_out and one is None:
        from virtsave.libvirtd import fleet

        from . import hostsview
        with job_progress("start") as cb:
            out = fleet.start_hosts(OPTIONS.uris, domains or None, parallel, match=match, bypass_cache=bypass_cache,
                             state=state, progress=cb if OPTIONS.progress or OPTIONS.json else None)
        hostsview.bulk_report(out, "start")
        return
    res = _one_or_all("start", one, "no domain with a managed-save image matched", lp.start, lp.start_all,
                      domains, match=match, parallel=parallel, bypass_cache=bypass_cache, state=state)
    if res is None:
        return
    how = (f"from its managed-save image ({_size(res.image_size)})" if res.detail.get("from_managed_save")
           else "with a cold boot (no managed-save image)")
    _emit(res, f"{res.domain}: started {how} in {res.seconds:.2f} s; domain {res.state}")


def managed_save_remove_cmd(
    domain: Annotated[str, typer.Argument(metavar="DOM", help="domain name or UUID")],
) -> None:
    """Delete a domain's managed-save image (its next start is a cold boot)."""
    conn = lp.connect(OPTIONS.uri)
    res = lp.managed_save_remove(conn, domain)
    text = (f"{res.domain}: managed-save image removed ({_size(res.image_size)})" if res.detail["removed"]
            else f"{res.domain}: has no managed-save image; nothing removed")
    _emit(res, text)


def list_cmd(
    match: Annotated[str | None, typer.Option("--match", metavar="GLOB", help="only names matching GLOB")] = None,
) -> None:
    """Domains with state and managed-save image (exists, size, age); on several hosts (-c repeated,
    --hosts) with a host column, an unreachable host as one failed row (exit 2)."""
    if OPTIONS.fan_out:
        from virtsave.libvirtd import fleet

        from . import hostsview
        hostsview.list_report(fleet.list_hosts(OPTIONS.uris, match))
        return
    conn = lp.connect(OPTIONS.uri)
    doms = lp.list_domains(conn, match)
    if OPTIONS.json:
        emit_json(doms)
        return
    table = Table()
    for col in ("name", "state", "managed save", "image size", "image age"):
        table.add_column(col, justify="right" if col.startswith("image") else "left")
    for d in doms:
        table.add_row(d["name"], d["state"], "yes" if d["managed_save"] else "no", _size(d["image_size"]),
                      _age(d["image_age"]))
    _out().print(table)


def register(app: typer.Typer) -> None:
    """Add the reference-path commands to the ``virtsave`` app."""
    app.command("managed-save")(managed_save_cmd)
    app.command("save")(save_cmd)
    app.command("restore")(restore_cmd)
    app.command("start")(start_cmd)
    app.command("managed-save-remove")(managed_save_remove_cmd)
    app.command("list")(list_cmd)


__all__: list[Any] = ["register"]
