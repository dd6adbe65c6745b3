"""Replay and direct commands: libvirt's save/restore done straight against QEMU.

Example::

    virtsave replay t.json -o r.json                       # save + restore, every traced command
    virtsave replay t.json --mode essential --transport tcp --image /var/tmp/g.save
    virtsave replay t.json --phases restore --image /var/tmp/g.save --diff
    virtsave replay t.json --qemu debian12 --diff          # on another QEMU build (virtsave qemus)
    virtsave direct save --qmp unix:/tmp/q/qmp.sock /var/tmp/g.save --xml g.xml
    virtsave direct restore /var/tmp/g.save -- qemu-system-x86_64 -m 256 ...

Exit codes: 0 ok (with --diff: equivalent); 1 with --diff: differences remain; 2 bad input, unsafe
trace (nothing launched), a feature the trace needs and this QEMU lacks, or a failed phase.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from virtsave.core.errors import VirtsaveError
from virtsave.trace import model as tr

from .common import OPTIONS, VirtsaveGroup, emit_json, info


class ArgumentError(VirtsaveError):
    """Invalid command-line arguments (exit 2, one line)."""


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Any]:
    """A progress callback on a terminal, else None (so no extra polling is recorded)."""
    if not OPTIONS.progress:
        yield None
        return
    from virtsave.cli.progress import job_progress

    with job_progress(label) as cb:
        def relabel(stats: dict[str, Any]) -> None:
            cb({**stats, "domain": stats.get("operation", label)})
        yield relabel


def replay_cmd(
    path: Annotated[Path, typer.Argument(metavar="TRACE", help="trace JSON recorded by 'virtsave trace'")],
    out: Annotated[Path | None, typer.Option("-o", "--output", metavar="OUT",
                   help="write the direct trace here (0600; default stdout)")] = None,
    transport: Annotated[str, typer.Option("--transport", help="unix (fd passing) | tcp (file:/exec: URIs)")]
    = "unix",
    image: Annotated[Path | None, typer.Option("--image", metavar="PATH",
                     help="image to write (save) / read (restore-only)")] = None,
    phases: Annotated[str | None, typer.Option("--phases", help="comma-separated: save,restore "
                      "(default: the phases the trace has)")] = None,
    mode: Annotated[str, typer.Option("--mode", help="faithful (every command) | essential (state changes)")]
    = "faithful",
    allow_unsafe: Annotated[bool, typer.Option("--allow-unsafe", help="replay traces that fail the safety check")]
    = False,
    diff: Annotated[bool, typer.Option("--diff", help="print the diff input ↔ replay")] = False,
    run_for: Annotated[float, typer.Option("--run-for", metavar="S", help="run the guest S seconds before saving")]
    = 3.0,
    wait_serial: Annotated[str | None, typer.Option("--wait-serial", metavar="REGEX",
                           help="save once the guest's serial output matches REGEX")] = None,
    serial_log: Annotated[Path | None, typer.Option("--serial-log", metavar="PATH",
                          help="append the guest's serial output here")] = None,
    run_after: Annotated[float, typer.Option("--run-after", metavar="S",
                         help="let the restored guest run S seconds before quitting it")] = 0.0,
    qemu: Annotated[str | None, typer.Option("--qemu", metavar="NAME|PATH",
                    help="run another QEMU build than the traced one: a name from 'virtsave qemus' "
                         "(e.g. debian12) or a qemu-system-* path")] = None,
    end: Annotated[str | None, typer.Option("--end", metavar="sigterm|quit",
                   help="how the saved QEMU is ended: sigterm as libvirt does (faithful default) | "
                        "quit (QMP; essential default)")] = None,
) -> None:
    """Replay a traced save/restore through the direct QMP backend (no libvirt).

    With --diff: exit 0 when the replay is equivalent to the trace, 1 when differences remain.
    """
    from virtsave.qemu import replay

    trace = tr.load(path)
    if phases is None:
        wanted = tuple(p for p in tr.PHASE_NAMES if tr.find_phase(trace, p) is not None)
    else:
        wanted = tuple(p.strip() for p in phases.split(",") if p.strip())
    if not wanted:
        raise ArgumentError("nothing to replay: give --phases save,restore (or a trace with phases)")
    # Refuse before saying (or starting) anything; with --allow-unsafe still say what was found.
    for finding in replay.check_safety(trace, allow_unsafe):
        info(f"warning: unsafe trace item allowed by --allow-unsafe: {finding}")
    if image is not None and "save" not in wanted:
        from virtsave.image import saveimage

        saveimage.read_header_path(image, allow_partial=False)  # a bad image: one line, nothing started
    binary = None
    if qemu is not None:
        from virtsave.qemu import builds

        build = builds.resolve(qemu, builds.discover())
        binary = build.path
        info(f"on QEMU {build.version} ({build.name}: {build.path})")
    info(f"replaying {'+'.join(wanted)} of {trace['domain'].get('name')} ({mode}, {transport})")
    with _progress("replay") as cb:
        try:
            result = replay.replay(trace, image=image, transport=transport, mode=mode, phases=wanted,
                                   allow_unsafe=allow_unsafe, progress=cb, run_for=run_for,
                                   serial_pattern=wait_serial, serial_log=str(serial_log) if serial_log else None,
                                   run_after=run_after, input_name=str(path), end=end, qemu_binary=binary)
        except replay.ReplayFailed as exc:
            if out is not None:
                tr.dump(exc.trace, out)  # the evidence of the failure, then exit 2
            raise
    tr.dump(result, out)
    timings = result["replay"]["timings"]
    info("  ".join(f"{p}: {t['seconds']:.3f} s" for p, t in timings.items())
         + f"  image: {result['replay']['image']}")
    if diff:
        from virtsave.trace import diff as _diff

        d = _diff.diff_traces(trace, result)
        text = d.render()
        if out is None or str(out) == "-":
            info(text.rstrip("\n"))  # stdout carries the trace
        else:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
        if not d.equivalent:
            raise typer.Exit(1)


#: Multifd channels ``direct restore`` loads a sparse image with.
DIRECT_RESTORE_CHANNELS = 2

direct_app = typer.Typer(help="Save/restore a QEMU not run by libvirt, in libvirt's image format.",
                         no_args_is_help=True, cls=VirtsaveGroup)


@direct_app.command("save")
def direct_save_cmd(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="image to write (0600)")],
    qmp: Annotated[str, typer.Option("--qmp", metavar="unix:PATH|tcp:HOST:PORT", help="the QEMU's QMP socket")],
    xml: Annotated[Path | None, typer.Option("--xml", metavar="FILE",
                   help="domain XML for the header (needed for 'virsh restore'; else a minimal one)")] = None,
    no_quit: Annotated[bool, typer.Option("--no-quit", help="leave QEMU paused instead of quitting it")] = False,
    image_format: Annotated[str, typer.Option(
        "--image-format", help="raw | sparse (mapped-ram, QEMU ≥ 9) | gzip | bzip2 | xz | lzop | zstd")] = "raw",
    parallel_channels: Annotated[int, typer.Option("--parallel-channels", metavar="N",
                                 help="multifd channels for --image-format sparse")] = 1,
    bypass_cache: Annotated[bool, typer.Option("--bypass-cache",
                            help="write the image with O_DIRECT, past the page cache (sparse: QEMU's "
                                 "direct-io; compressed: dd oflag=direct; not on tmpfs)")] = False,
) -> None:
    """Save a running QEMU through its QMP socket (stop, migrate into the image, quit)."""
    from virtsave.core.operation import SaveOptions
    from virtsave.qemu import direct

    xml_text = None
    if xml is not None:
        try:
            xml_text = xml.read_text()
        except OSError as exc:
            raise ArgumentError(f"cannot read --xml {xml}: {exc.strerror}") from None
    options = SaveOptions(bypass_cache=bypass_cache, image_format=image_format, parallel_channels=parallel_channels,
                          xml=xml_text)
    with _progress("save") as cb:
        res = direct.save(qmp, image, options, quit=not no_quit, progress=cb)
    if OPTIONS.json:
        emit_json(res.to_dict())
    else:
        info(f"saved to {image}: {res.image_size} bytes in {res.seconds:.3f} s")


@direct_app.command("restore", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def direct_restore_cmd(
    ctx: typer.Context,
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="libvirt save image, any format libvirt writes: raw, "
                                          "sparse, or gzip, bzip2, xz, lzop, zstd (through the decompressor)")],
    transport: Annotated[str, typer.Option("--transport", help="unix | tcp (QMP socket kind)")] = "unix",
    paused: Annotated[bool, typer.Option("--paused", help="leave the guest paused")] = False,
    serial_log: Annotated[Path | None, typer.Option("--serial-log", metavar="PATH",
                          help="append the guest's serial output here")] = None,
) -> None:
    """Launch QEMU from the argv after '--' with -incoming defer, load IMAGE, continue.

    Compressed images are streamed through their decompressor into QEMU, as libvirt does. QEMU keeps
    running after this command returns; its pid and QMP address are printed.
    """
    from virtsave.core.operation import SaveOptions
    from virtsave.qemu import direct

    argv = list(ctx.args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ArgumentError("give the QEMU command line after '--'")
    # A sparse image loads with 2 multifd channels, as this command always did (it has no option for it).
    options = SaveOptions(state="paused" if paused else None, parallel_channels=DIRECT_RESTORE_CHANNELS)
    with _progress("restore") as cb:
        proc, res = direct.restore(image, argv, options, transport=transport,
                                   serial_log=str(serial_log) if serial_log else None, progress=cb)
    data = {**res.to_dict(), "pid": proc.pid, "qmp": proc.qmp_address,
            "serial_log": str(proc.serial_log) if proc.serial_log else None, "run_dir": str(proc.plan.run_dir)}
    if OPTIONS.json:
        emit_json(data)
    else:
        info(f"restored {image} in {res.seconds:.3f} s: QEMU pid {proc.pid} ({res.state}), QMP {proc.qmp_address}, "
             f"serial {data['serial_log']}")


def register(app: typer.Typer) -> None:
    app.command("replay")(replay_cmd)
    app.add_typer(direct_app, name="direct")
