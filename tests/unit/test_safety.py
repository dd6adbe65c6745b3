"""virtsave.qemu.safety: hostile traces are refused and each item is named; real traces pass."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from virtsave.core import errors
from virtsave.libvirtd import domainlog as qemulog
from virtsave.libvirtd import logparse
from virtsave.qemu import launch as qemu_launch
from virtsave.qemu import safety
from virtsave.trace import argv as qargv
from virtsave.trace import model as trace

FIX = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="module")
def base() -> dict:
    """A real cycle: 11.3 managed save + restore, with the real command line of the domain log."""
    save = logparse.trace_from_log(FIX / "libvirt-11.3-attributed/managedsave-running.log")
    restore = logparse.trace_from_log(FIX / "libvirt-11.3-attributed/managedsave-restore.log")
    tr = save
    tr["phases"] += restore["phases"]
    tr["domain"]["argv"] = qemulog.parse_domain_log(FIX / "qemu-domain-logs/fxa.log")[-2].argv
    assert trace.validate(tr) == []
    return tr


def test_real_traces_are_safe(base):
    assert safety.check_trace(base) == []
    assert safety.require_safe(base) == []
    for p in sorted(FIX.glob("libvirt-*/*.log")):
        assert safety.check_trace(logparse.trace_from_log(p)) == [], p
    for st in qemulog.parse_domain_log(FIX / "qemu-domain-logs/fxa.log"):
        assert safety.check_argv(st.argv) == []


def with_argv(tr: dict, *extra: str, replace: tuple[str, str] | None = None) -> dict:
    t = copy.deepcopy(tr)
    argv = t["domain"]["argv"]
    if replace:
        argv[:] = [replace[1] if a == replace[0] else a for a in argv]
    argv += list(extra)
    return t


def with_command(tr: dict, phase: int, execute: str, arguments: dict | None = None) -> dict:
    t = copy.deepcopy(tr)
    t["phases"][phase]["messages"].insert(3, trace.command(execute, arguments, id="evil-1"))
    return t


ARGV_CASES = [
    (["-incoming", "exec:cat /tmp/x"], "-incoming exec:cat /tmp/x", "exec"),
    (["-chardev", "file,id=c1,path=/etc/shadow"], "-chardev file,id=c1,path=/etc/shadow", "writes host file"),
    (["-serial", "file:/root/out"], "-serial file:/root/out", "host file"),
    (["-chardev", "pipe,id=p1,path=/tmp/fifo"], "-chardev pipe", "pipe chardev"),
    (["-add-fd", "set=7,fd=40", "-blockdev", '{"driver":"file","filename":"/dev/fdset/7","node-name":"x"}'],
     "-add-fd set=7,fd=40", "fdset 7 is used by -blockdev"),
    (["-netdev", "tap,id=n0,fd=41"], "-netdev tap,id=n0,fd=41", "fd= passes an inherited fd"),
    (["-chardev", "socket,id=other,fd=42,server=on,wait=off"], "-chardev socket,id=other,fd=42", "inherited fd"),
    (["-object", '{"qom-type":"secret","id":"s9","format":"raw","file":"/root/.ssh/id_rsa"}'],
     "-object {\"qom-type\":\"secret\"", "secret object reads host file /root/.ssh/id_rsa"),
    (["-netdev", "tap,id=n1,script=/tmp/evil.sh,downscript=no"], "-netdev tap,id=n1,script=/tmp/evil.sh",
     "script= runs a host program"),
    (["-netdev", "user,id=n2,guestfwd=tcp:10.0.2.100:1-cmd:/bin/sh"], "-netdev user,id=n2", "guestfwd="),
    (["-plugin", "/tmp/libevil.so"], "-plugin /tmp/libevil.so", "shared object"),
    (["-loadvm", "snap1"], "-loadvm snap1", "snapshot"),
    (["-monitor", "unix:/tmp/mon.sock,server,nowait"], "-monitor unix:/tmp/mon.sock", "extra monitor"),
    (["-qmp", "tcp:0.0.0.0:4444,server"], "-qmp tcp:0.0.0.0:4444", "extra monitor"),
    (["-chardev", "socket,id=m2,path=/run/libvirt/libvirt-sock", "-mon", "chardev=m2,mode=control"],
     "-chardev socket,id=m2,path=/run/libvirt/libvirt-sock", "extra socket"),
    (["-device", '{"driver":"e1000","romfile":"/etc/evil.rom","id":"net9"}'], "-device", "romfile /etc/evil.rom"),
    (["-blockdev", '{"driver":"file","filename":"/var/lib/libvirt/images/../../../etc/shadow","node-name":"d"}'],
     "-blockdev", "path traversal"),
    (["-drive", "file=/etc/passwd,format=raw,if=virtio"], "-drive file=/etc/passwd", "outside the expected places"),
    (["-fsdev", "local,id=f,path=/,security_model=none"], "-fsdev local", "shares a host directory"),
    (["-audiodev", '{"id":"a2","driver":"wav","path":"/etc/profile.d/x.sh"}'], "-audiodev", "outside the expected"),
    (["-object", "qom-type=secret,id=s3,file=/etc/shadow"], "-object qom-type=secret", "reads host file /etc/shadow"),
    (["/var/tmp/disk.img"], "/var/tmp/disk.img", "positional argument"),
    (["-some-future-flag", "-s"], "-some-future-flag -s", "value -s is an option"),
]


@pytest.mark.parametrize(("extra", "item", "reason"), ARGV_CASES, ids=[c[1][:40] for c in ARGV_CASES])
def test_hostile_argv_refused_and_named(base, extra, item, reason):
    tr = with_argv(base, *extra)
    found = safety.check_trace(tr)
    assert found, extra
    hit = [f for f in found if f.item.startswith(item) and reason in f.reason]
    assert hit, found
    assert hit[0].where.startswith("argv[")
    with pytest.raises(errors.UnsafeTraceError) as ei:
        safety.require_safe(tr)
    msg = str(ei.value)
    assert "\n" not in msg and item[:30] in msg and "--allow-unsafe" in msg
    assert safety.require_safe(tr, allow_unsafe=True) == found


def test_kernel_path_traversal_and_relative(base):
    tr = with_argv(base, replace=("/var/lib/virtsave/guest/vmlinuz", "/var/lib/virtsave/../../../etc/shadow"))
    (f,) = safety.check_trace(tr)
    assert f.item.startswith("-kernel /var/lib/virtsave/../") and "traversal" in f.reason
    tr = with_argv(base, replace=("/var/lib/virtsave/guest/initrd.gz", "initrd.gz"))
    (f,) = safety.check_trace(tr)
    assert f.item == "-initrd initrd.gz" and "relative" in f.reason


CMD_CASES = [
    (0, "migrate", {"uri": "exec:cat > /tmp/x"}, "exec: migration URI"),
    (1, "migrate-incoming", {"uri": "exec:cat /tmp/x"}, "exec: migration URI"),
    (0, "migrate", {"uri": "file:/etc/passwd"}, "names a host file"),
    (0, "migrate", {"uri": "tcp:10.0.0.1:4444"}, "opens a connection"),
    (0, "migrate", {"channels": [{"channel-type": "main", "addr": {"transport": "exec", "args": ["sh"]}}]},
     "exec migration channel"),
    (0, "human-monitor-command", {"command-line": "info registers"}, "HMP"),
    (0, "dump-guest-memory", {"paging": False, "protocol": "file:/tmp/mem"}, "host files"),
    (1, "object-add", {"qom-type": "secret", "id": "s", "file": "/etc/shadow"}, "secret object reads host file"),
    (1, "blockdev-add", {"driver": "file", "filename": "/etc/shadow", "node-name": "n"}, "outside the expected"),
    (1, "chardev-add", {"id": "c", "backend": {"type": "file", "data": {"out": "/etc/x"}}}, "host files"),
    (0, "set-action", {"shutdown": "exec:rm -rf /"}, "exec: runs a host command"),
]


@pytest.mark.parametrize(("phase", "execute", "args", "reason"), CMD_CASES, ids=[c[1] + str(i) for i, c in
                                                                                 enumerate(CMD_CASES)])
def test_hostile_commands_refused_and_named(base, phase, execute, args, reason):
    tr = with_command(base, phase, execute, args)
    found = safety.check_trace(tr)
    name = base["phases"][phase]["name"]
    hit = [f for f in found if f.where == f"{name}.messages[3]" and reason in f.reason]
    assert hit, found
    assert hit[0].item.startswith(execute)
    with pytest.raises(errors.UnsafeTraceError, match=execute):
        safety.require_safe(tr)


def test_image_paths(base):
    for bad, why in (("/etc/passwd", "system file"), ("../x.save", "traversal"), ("x.save", "relative"),
                     ("/var/lib/libvirt/qemu/save/../../../../etc/shadow", "traversal"), ("/dev/sda", "device")):
        t = copy.deepcopy(base)
        t["phases"][0]["image"] = {"path": bad, "size": None, "header": None}
        (f,) = safety.check_trace(t)
        assert f.where == "save.image.path" and f.item == bad
        assert why.split()[0] in f.reason or (why == "device" and "device" in f.reason), (bad, f)
    t = copy.deepcopy(base)
    t["phases"][0]["image"] = {"path": "/var/var/lib/libvirt/images/fx.img", "size": 1, "header": None}
    assert safety.check_trace(t) == []


def test_rewritable_fds_are_not_findings(base):
    argv = base["domain"]["argv"]
    assert "-add-fd" in argv and any("charmonitor,fd=" in a for a in argv)
    # a sparse restore: an extra fdset fed to migrate-incoming file:/dev/fdset/1
    t = with_argv(base, "-add-fd", "set=1,fd=44,opaque=libvirt-incoming-migrate-fd")
    t["phases"][1]["messages"].insert(3, trace.command("migrate-incoming",
                                                       {"uri": "file:/dev/fdset/1,offset=0x10650"}, id="x"))
    assert safety.check_trace(t) == []
    # the same fdset unused, or a file chardev on an undeclared fdset: refused
    t2 = with_argv(base, "-add-fd", "set=5,fd=45")
    assert [f.reason for f in safety.check_trace(t2)] == ["fdset 5 passes an fd nothing rewritable uses"]
    t3 = with_argv(base, "-chardev", "file,id=c9,path=/dev/fdset/9")
    assert any("writes host file /dev/fdset/9" in f.reason for f in safety.check_trace(t3))


def test_refusal_message_names_each_item(base):
    tr = with_argv(with_command(base, 0, "human-monitor-command", {"command-line": "x"}), "-plugin", "/p.so")
    found = safety.check_trace(tr)
    msg = safety.refusal_message(found)
    assert msg.startswith("unsafe trace, 2 items refused:")
    assert "human-monitor-command" in msg and "-plugin /p.so" in msg and "argv[" in msg
    assert str(found[0]) in msg
    json.dumps([f.__dict__ for f in found])     # findings are plain data


def test_libvirt_11_serial_log_and_incoming_fdsets(base):
    """libvirt 11.x: the serial log is -chardev pty,…,logfile=/dev/fdset/1 and a sparse restore passes
    -add-fd set=0,…,opaque=libvirt-incoming-migrate-buffered-fd for migrate-incoming file:/dev/fdset/0."""
    t = copy.deepcopy(base)
    argv = [a for a in t["domain"]["argv"]]
    i = argv.index("-add-fd")
    argv[i:i + 4] = ["-add-fd", "set=1,fd=38,opaque=serial0-log",
                     "-chardev", "pty,id=charserial0,logfile=/dev/fdset/1,logappend=on"]
    argv += ["-add-fd", "set=0,fd=29,opaque=libvirt-incoming-migrate-buffered-fd",
             "-add-fd", "set=0,fd=30,opaque=libvirt-incoming-migrate-direct-fd"]
    t["domain"]["argv"] = argv
    t["phases"][1]["messages"].insert(3, trace.command("migrate-incoming",
                                                       {"uri": "file:/dev/fdset/0,offset=0x10650"}, id="x"))
    assert safety.check_trace(t) == []
    # without the migrate-incoming that uses it, set 0 is an fd nothing rewritable uses
    t["phases"][1]["messages"].pop(3)
    assert {f.reason for f in safety.check_trace(t)} == {"fdset 0 passes an fd nothing rewritable uses"}
    # a chardev log written to a host path is refused
    t2 = with_argv(base, "-chardev", "pty,id=c2,logfile=/etc/cron.d/x,logappend=on")
    assert any("logfile writes host file /etc/cron.d/x" in f.reason for f in safety.check_trace(t2))


# ------------------------------------------------------------------ the launcher's rules, one by one

MINI = ["/usr/bin/qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "64", "-nodefaults", "-display", "none"]
SERIAL_DEV = ["-device", '{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}']
MON = ["-mon", "chardev=charmonitor,id=monitor,mode=control"]
#: rule → ([(words the rule rewrites, the option it rewrites, QMP fdsets)], near miss or None).
#: A near miss is the closest item no rule rewrites; None only where a rule takes every use of a
#: flag or option (nothing near it is left as traced) or only loosens the launcher's own sandbox.
RULE_CASES: dict[str, tuple[list[tuple[list[str], str, set[str]]], list[str] | None]] = {
    "monitor": ([(["-chardev", "socket,id=charmonitor,fd=29,server=on,wait=off", *MON], "-chardev", set())],
                ["-chardev", "socket,id=charmonitor,fd=29,server=on,wait=off"]),          # no -mon names it
    "master-key": ([(["-object", '{"qom-type":"secret","id":"masterKey0","format":"raw",'
                                 '"file":"/var/lib/libvirt/qemu/domain-3-g/master-key.aes"}'], "-object", set()),
                    (["-object", "secret,id=masterKey0,format=raw,"
                                 "file=/var/lib/libvirt/qemu/domain-3-g/master-key.aes"], "-object", set())],
                   ["-object", '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/root/.ssh/id_rsa"}']),
    "serial-output": ([(["-chardev", "pipe,id=charserial0,path=/var/lib/libvirt/qemu/g.pipe", *SERIAL_DEV],
                        "-chardev", set()),
                       (["-add-fd", "set=1,fd=38,opaque=serial0-log",
                         "-chardev", "pty,id=charserial0,logfile=/dev/fdset/1,logappend=on", *SERIAL_DEV],
                        "-chardev", set()),
                       (["-add-fd", "set=0,fd=30,opaque=serial0-source",
                         "-chardev", "file,id=charserial0,path=/dev/fdset/0,append=on", *SERIAL_DEV],
                        "-chardev", set())],
                      ["-chardev", "pipe,id=charserial0,path=/var/lib/libvirt/qemu/g.pipe"]),   # feeds no serial
    "chardev-log": ([(["-add-fd", "set=3,fd=40,opaque=console1-log",
                       "-chardev", "pty,id=charconsole1,logfile=/dev/fdset/3,logappend=on"], "-chardev", set())],
                    ["-chardev", "pty,id=charconsole1,logfile=/var/log/libvirt/c.log,logappend=on"]),
    "libvirt-fdset": ([(["-add-fd", "set=0,fd=30,opaque=serial0-source",
                         "-chardev", "file,id=charserial0,path=/dev/fdset/0,append=on", *SERIAL_DEV],
                        "-add-fd", set()),
                       (["-add-fd", "set=0,fd=29,opaque=libvirt-incoming-migrate-buffered-fd"], "-add-fd", {"0"})],
                      ["-add-fd", "set=7,fd=40",
                       "-blockdev", '{"driver":"file","filename":"/dev/fdset/7","node-name":"x"}']),
    "incoming": ([(["-incoming", "defer"], "-incoming", set()),
                  (["-incoming", "file:/dev/fdset/0,offset=0x10650"], "-incoming", set())],
                 ["-incoming", "tcp:0.0.0.0:4444"]),
    "pidfile": ([(["-pidfile", "/run/libvirt/qemu/g.pid"], "-pidfile", set()),
                 (["-pidfile", "/etc/passwd"], "-pidfile", set())], None),
    "daemonize": ([(["-daemonize"], "-daemonize", set())], None),
    "freeze": ([(["-S"], "-S", set())], None),
    "no-acpi": ([(["-no-acpi"], "-no-acpi", set())], None),
    "sandbox-spawn": ([(["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"],
                        "-sandbox", set())], None),
}
_TARGET = qemu_launch.Target(Path("/run/virtsave/rule-walk"), paused=False, allow_spawn=True)


#: Rules without a near miss: they take every use of their option (flags; -pidfile whatever its path) …
TAKES_EVERY_USE = {"pidfile", "daemonize", "freeze", "no-acpi"}
#: … or only loosen the launcher's own sandbox when virtsave needs an exec: helper (never unsafe as traced).
LOOSENS_ONLY = {"sandbox-spawn"}


def test_every_rule_has_a_case():
    assert set(RULE_CASES) == {r.name for r in qemu_launch.RULES}
    assert {n for n, (_, near) in RULE_CASES.items() if near is None} == TAKES_EVERY_USE | LOOSENS_ONLY
    ctx = qemu_launch.context(MINI)
    for rule in qemu_launch.RULES:
        if rule.name in TAKES_EVERY_USE:
            flag = rule.option in qargv.FLAG_OPTIONS
            odd = qargv.Option(rule.option, None if flag else "../odd,value", 9)
            assert rule.whole and qemu_launch.rule_for(odd, ctx) is rule, rule.name
        elif rule.name in LOOSENS_ONLY:
            assert not rule.whole


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_rule_rewrites_what_safety_accepts(name):
    """Walks the launcher's rule table: what a rule rewrites is no finding, and the pure rewrite
    really replaces it; the near miss is refused by the safety check and rewritten by no rule."""
    rule = next(r for r in qemu_launch.RULES if r.name == name)
    examples, near = RULE_CASES[name]
    for words, option, qmp in examples:
        argv = MINI + words
        assert safety.check_argv(argv, qmp) == [], (name, words)
        ctx = qemu_launch.context(argv, qmp)
        (target,) = [o for o in ctx.cmdline.find(option)]
        assert qemu_launch.rule_for(target, ctx) is rule
        res = qemu_launch.rewrite_argv(argv, _TARGET, qmp_fdsets=qmp)
        assert rule.name in res.applied
        if rule.whole:
            assert target.words()[-1] not in res.argv, (name, res.argv)
        else:
            assert res.argv != qemu_launch.rewrite_argv(argv, qemu_launch.Target(_TARGET.run_dir, paused=False),
                                                        qmp_fdsets=qmp).argv
    if near is None:
        return
    argv = MINI + near
    found = safety.check_argv(argv, set())
    at = len(MINI)   # the near miss's first option
    assert any(f.where == f"argv[{at}]" for f in found), (name, found)
    try:
        res = qemu_launch.rewrite_argv(argv, _TARGET, qmp_fdsets=set())
    except errors.LaunchError:
        return      # refused by the launcher too: not rewritten
    assert rule.name not in res.applied and near[1] in res.argv
