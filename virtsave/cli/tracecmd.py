"""Trace commands: record libvirt's QMP conversation, import a log, validate, export.

Example::

    virtsave trace vm1 > vm1.trace.json                    # managed save + start, traced
    virtsave trace vm1 --image-format sparse --parallel-channels 2 -o sparse.json
    virtsave trace vm1 --op save --file /var/tmp/vm1.img -o save.json
    virtsave trace vm1 --keep-log-outputs                  # libvirtd's own logs get the traffic too
    virtsave trace vm1 --from-log /var/log/libvirt/libvirtd.log --monitor 0x7f2c3c00a010
    virtsave validate vm1.trace.json
    virtsave export vm1.trace.json --format replies -o vm1.replies

Exit codes: 0 ok; 2 for bad input and for a traced operation that failed (the trace is
still written first: it is the evidence of the failure); 130 after Ctrl-C.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from virtsave.core import jsonload
from virtsave.core.errors import AmbiguousMonitor, VirtsaveError
from virtsave.core.files import private_writer
from virtsave.libvirtd import capture
from virtsave.trace import model as tr

from .common import OPTIONS, emit_json, fail, info


class ArgumentError(VirtsaveError):
    """Contradictory or invalid command-line arguments (exit 2, one line)."""


def _write_text(text: str, out: Path | None) -> None:
    if out is None or str(out) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with private_writer(out) as f:
        f.write(text.encode())


def _summary(trace: tr.Trace) -> str:
    parts = []
    for ph in trace["phases"]:
        n = sum(1 for m in ph["messages"] if m["kind"] == "command")
        status = "ok" if ph["ok"] else "FAILED" if ph["ok"] is False else "?"
        parts.append(f"{ph['name']} ({ph['operation']}): {status}, {n} commands, {len(ph['messages'])} messages")
    return "; ".join(parts) or "no phases"


def render_monitors(monitors: list[dict[str, Any]]) -> list[str]:
    """One line per monitor found in a log (``logparse.list_monitors`` dicts): key and what it did."""
    lines = []
    for m in monitors:
        key = m.get("key") or m.get("pointer") or "?"
        bits = [f"vm {m['vm']}" if m.get("vm") else "vm ?", str(m.get("role") or "other")]
        if m.get("domain"):
            bits.insert(0, f"domain {m['domain']}")
        first, last = (m.get("first_iso") or "")[11:23], (m.get("last_iso") or "")[11:23]
        if first:
            bits.append(f"{first}–{last}")
        did = f"{m.get('commands', 0)} commands"
        if m.get("notable"):
            did += ": " + ", ".join(map(str, m["notable"][:10])) + (" …" if len(m["notable"]) > 10 else "")
        bits.append(did)
        if m.get("migrate_uris"):
            bits.append("uri " + ", ".join(map(str, m["migrate_uris"])))
        if m.get("migration_status"):
            bits.append(f"migration {m['migration_status']}")
        if m.get("operations"):
            bits.append("by " + ", ".join(map(str, m["operations"])))
        lines.append(f"  {key}  " + "; ".join(bits))
    return lines


def _notice(message: str) -> None:
    """One stderr line, never wrapped (the operator's log levels changed for the window)."""
    sys.stderr.write(f"virtsave: {message}\n")
    sys.stderr.flush()


def _failed_phase(trace: tr.Trace) -> tr.Phase | None:
    return next((p for p in trace["phases"] if p["ok"] is False), None)


OpOpt = Annotated[str, typer.Option("--op", help="cycle (save then restore) | managed-save | save | restore")]
FileOpt = Annotated[Path | None, typer.Option("--file", metavar="IMAGE",
                                              help="image for --op save/restore (cycle: save to, restore from)")]
OutOpt = Annotated[Path | None, typer.Option("-o", "--output", metavar="OUT", help="write the trace here (0600)")]
DomainLogOpt = Annotated[Path | None, typer.Option("--domain-log", metavar="QEMU_LOG",
                                                   help="with --from-log: the domain's QEMU log (command line)")]
KeepOutputsOpt = Annotated[bool, typer.Option(
    "--keep-log-outputs", help="leave libvirtd's own log outputs at their levels while tracing: they then also "
    "receive the monitor traffic (every domain's QMP commands and replies); by default outputs below the "
    "monitor's level are raised to it for the window")]


def trace_cmd(
    domain: Annotated[str, typer.Argument(metavar="DOMAIN", help="domain name or UUID")],
    op: OpOpt = "cycle",
    file: FileOpt = None,
    out: OutOpt = None,
    bypass_cache: Annotated[bool, typer.Option("--bypass-cache", help="O_DIRECT image I/O")] = False,
    image_format: Annotated[str | None, typer.Option("--image-format", metavar="F",
                                                     help="raw|zstd|sparse|… (libvirt ≥ 11.2)")] = None,
    parallel_channels: Annotated[int | None, typer.Option("--parallel-channels", metavar="N",
                                                          help="multifd channels (sparse format)")] = None,
    running: Annotated[bool, typer.Option("--running", help="running after restore")] = False,
    paused: Annotated[bool, typer.Option("--paused", help="paused after restore")] = False,
    from_log: Annotated[Path | None, typer.Option("--from-log", metavar="LOG",
                                                  help="import an existing libvirtd debug log instead")] = None,
    monitor: Annotated[str | None, typer.Option("--monitor", metavar="0x…",
                                                help="with --from-log: the domain's monitor pointer")] = None,
    domain_log: DomainLogOpt = None,
    keep_log_outputs: KeepOutputsOpt = False,
) -> None:
    """Trace the QMP conversation libvirt has with QEMU during save/restore (JSON on stdout or -o)."""
    if running and paused:
        raise ArgumentError("--running and --paused exclude each other")
    if from_log is not None:
        if (op != "cycle" or file or bypass_cache or image_format or parallel_channels or running or paused
                or keep_log_outputs):
            raise ArgumentError("--from-log imports a log: it takes only --monitor, --domain-log and -o")
        try:
            trace = capture.import_log(from_log, domain, monitor=monitor, domain_log=domain_log)
        except AmbiguousMonitor as exc:
            sys.stderr.write(f"virtsave: error: {from_log} does not say which of its {len(exc.monitors)} "
                             f"monitors is {domain}'s; monitors found:\n")
            sys.stderr.write("\n".join(render_monitors(exc.monitors)) + "\n")
            first = next((m["key"] for m in exc.monitors if m.get("key")), "0x…")
            sys.stderr.write(f"pick one with --monitor, e.g.: virtsave trace {domain} --from-log {from_log} "
                             f"--monitor {first}\n")
            raise SystemExit(2) from None
        if not trace["phases"]:
            raise ArgumentError(f"no monitor traffic of {domain} found in {from_log}")
        tr.dump(trace, out)
        info(f"imported {from_log}: {_summary(trace)}")
        return
    if monitor or domain_log:
        raise ArgumentError("--monitor and --domain-log go with --from-log")
    if parallel_channels is not None and parallel_channels < 1:
        raise ArgumentError(f"--parallel-channels must be ≥ 1, not {parallel_channels}")
    from virtsave.libvirtd import logcapture
    from virtsave.libvirtd import reference as lp

    state = "running" if running else "paused" if paused else None
    capture.require_traceable(OPTIONS.uri)  # tls/tcp: say so before connecting
    conn = lp.connect(OPTIONS.uri)
    # No live progress bar here: polling libvirt's job stats sends query-migrate to QEMU, which
    # would put our own commands into the conversation being traced.
    with logcapture.output_policy(keep=keep_log_outputs, announce=_notice):
        trace = capture.trace_domain(conn, domain, op, file, uri=OPTIONS.uri, bypass_cache=bypass_cache,
                                     image_format=image_format, parallel_channels=parallel_channels, state=state,
                                     progress=None, on_warning=lambda m: info(f"warning: {m}"),
                                     on_start=lambda: info(f"tracing {op} of {domain} (libvirtd monitor logging "
                                                           "on for the duration)"))
    tr.dump(trace, out)
    info(_summary(trace))
    bad = _failed_phase(trace)
    if bad is not None:
        where = f" (trace written to {out})" if out else " (trace written to stdout)"
        fail(f"{bad['operation']} failed: {bad['error']}{where}")


def validate_cmd(
    path: Annotated[Path, typer.Argument(metavar="TRACE", help="trace JSON file ('-' for stdin)")],
) -> None:
    """Check a trace file against the trace JSON Schema (exit 0 valid, 2 invalid)."""
    raw = tr.read_bytes(path)  # size-capped: a trace is untrusted input
    try:
        data = jsonload.loads(raw)
    except ValueError as exc:  # malformed, undecodable, nested too deeply, an integer past the digit limit
        problems = [f"(top): not valid JSON: {exc}"]
    else:
        problems = tr.validate(data)
    if OPTIONS.json:
        emit_json({"path": str(path), "valid": not problems, "problems": problems})
    else:
        for p in problems:
            sys.stdout.write(f"{path}: {p}\n")
    if problems:
        fail(f"{path}: invalid trace ({len(problems)} problem{'s' if len(problems) > 1 else ''})")
    if not OPTIONS.json:
        info(f"{path}: valid ({_summary(data)})")


def export_cmd(
    path: Annotated[Path, typer.Argument(metavar="TRACE", help="trace JSON file")],
    fmt: Annotated[str, typer.Option("--format", help="replies: libvirt's qemumonitorjson .replies")] = "replies",
    out: Annotated[Path | None, typer.Option("-o", "--output", metavar="OUT", help="write here (0600)")] = None,
    phase: Annotated[str | None, typer.Option("--phase", metavar="PHASE",
                                              help="only this phase: save or restore")] = None,
) -> None:
    """Export a trace for other tools (--format replies: libvirt's monitor test harness)."""
    if fmt != "replies":
        raise ArgumentError(f"--format must be 'replies', not {fmt!r}")
    from virtsave.trace import export

    trace = tr.load(path)
    _write_text(export.to_replies(trace, phase), out)
    if out is not None and os.fspath(out) != "-":
        info(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("trace")(trace_cmd)
    app.command("validate")(validate_cmd)
    app.command("export")(export_cmd)
