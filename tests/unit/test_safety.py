"""virtsave.qemu.safety: hostile traces are refused and each item is named; real traces pass."""

from __future__ import annotations

import copy
import json
import shutil
import stat
import subprocess
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
NIC = ["-device", '{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:30:f7:2a"}']
AGENT = ["-device", '{"driver":"virtserialport","bus":"virtio-serial0.0","nr":1,"chardev":"charchannel0",'
                    '"id":"channel0","name":"org.qemu.guest_agent.0"}']
#: libvirt's qcow2 disk: protocol node, format node, device.
DISK = ["-blockdev", '{"driver":"file","filename":"/var/lib/libvirt/images/g.qcow2","node-name":"libvirt-1-storage",'
                     '"auto-read-only":true,"discard":"unmap"}',
        "-blockdev", '{"node-name":"libvirt-1-format","read-only":false,"discard":"unmap","driver":"qcow2",'
                     '"file":"libvirt-1-storage","backing":null}',
        "-device", '{"driver":"virtio-blk-pci","drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}']
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
    # -- what libvirt generates for real guests (issue 16); the first option named is the one rewritten
    "disk-overlay": ([(["-blockdev", '{"driver":"file","filename":"/var/lib/libvirt/qemu/nvram/g_VARS.fd",'
                                     '"node-name":"libvirt-pflash1-storage","read-only":false}'], "-blockdev", set()),
                      (["-blockdev", "driver=file,filename=/var/lib/libvirt/images/d.img,node-name=d",
                        "-device", "virtio-blk-pci,drive=d,id=virtio-disk0"], "-blockdev", set())],
                     ["-blockdev", '{"driver":"file","filename":"/dev/fdset/7","node-name":"d"}']),
    "disk-read-only": ([(DISK, "-blockdev", set()),
                        (["-blockdev", '{"driver":"file","filename":"/usr/share/OVMF/OVMF_CODE_4M.fd","node-name":'
                                       '"libvirt-pflash0-storage","auto-read-only":true,"discard":"unmap"}',
                          "-blockdev", '{"node-name":"libvirt-pflash0-format","read-only":true,"driver":"raw",'
                                       '"file":"libvirt-pflash0-storage"}'], "-blockdev", set())],
                       ["-blockdev", '{"driver":"file","filename":"/dev/fdset/7","node-name":"s"}',
                        "-blockdev", '{"driver":"qcow2","node-name":"f","file":"s"}']),
    "legacy-drive": ([(["-drive", "file=/var/lib/libvirt/images/d.qcow2,format=qcow2,if=virtio"], "-drive", set()),
                      (["-hda", "/var/tmp/d.img"], "-hda", set())],
                     ["-drive", "file=/dev/fdset/3,format=raw,if=virtio"]),
    "nic-tap": ([(["-netdev", '{"type":"tap","fd":"33","id":"hostnet0"}', *NIC], "-netdev", set()),
                 (["-netdev", "tap,id=hostnet0,fds=33:34,vhost=on,vhostfds=35:36", *NIC], "-netdev", set()),
                 (["-netdev", "bridge,id=hostnet0,br=virbr0,helper=/usr/lib/qemu/qemu-bridge-helper", *NIC],
                  "-netdev", set())],
                ["-netdev", "tap,id=n0,fd=41"]),                                  # no NIC uses it
    "nic-user": ([(["-netdev", '{"type":"user","id":"hostnet0"}', *NIC], "-netdev", set()),
                  (["-netdev", "user,id=hostnet0,hostfwd=tcp::2222-:22,smb=/srv", *NIC], "-netdev", set())],
                 ["-netdev", "user,id=n2,guestfwd=tcp:10.0.2.100:1-cmd:/bin/sh"]),
    "nic-socket": ([(["-netdev", '{"type":"stream","addr":{"type":"unix","path":"/run/libvirt/qemu/passt/3-g-net0.'
                                 'socket"},"server":false,"reconnect-ms":5000,"id":"hostnet0"}', *NIC],
                     "-netdev", set()),
                    (["-netdev", "socket,id=hostnet0,mcast=230.0.0.1:5558", *NIC], "-netdev", set())],
                   ["-netdev", '{"type":"stream","addr":{"type":"unix","path":"/run/x.socket"},"id":"n7"}']),
    "channel-socket": ([(["-chardev", "socket,id=charchannel0,fd=41,server=on,wait=off", *AGENT], "-chardev", set()),
                        (["-chardev", "socket,id=charchannel0,path=/var/lib/libvirt/qemu/channel/target/domain-1-g/"
                                      "org.qemu.guest_agent.0,server=on,wait=off", *AGENT], "-chardev", set()),
                        (["-chardev", "socket,id=charchannel0,host=127.0.0.1,port=4555,server=on,wait=off", *AGENT],
                         "-chardev", set())],
                       ["-chardev", "socket,id=other,fd=42,server=on,wait=off"]),   # no device reads it
    "vnc": ([(["-vnc", "127.0.0.1:0,audiodev=audio1"], "-vnc", set()),
             (["-vnc", "0.0.0.0:0,websocket=5700,password=on,tls-creds=vnc-tls-creds0"], "-vnc", set())], None),
    "spice": ([(["-spice", "port=5900,addr=127.0.0.1,disable-ticketing=on,seamless-migration=on"], "-spice",
                set())], None),
}
_TARGET = qemu_launch.Target(Path("/run/virtsave/rule-walk"), paused=False, allow_spawn=True)


#: Rules without a near miss: they take every use of their option (flags; -pidfile whatever its path;
#: a display's listening address) …
TAKES_EVERY_USE = {"pidfile", "daemonize", "freeze", "no-acpi", "vnc", "spice"}
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
        target = ctx.cmdline.find(option)[0]
        assert qemu_launch.rule_for(target, ctx) is rule
        res = qemu_launch.rewrite_argv(argv, _TARGET, qmp_fdsets=qmp)
        assert rule.name in res.applied
        if rule.whole:
            assert target.words()[-1] not in res.argv, (name, res.argv)
        else:   # a rule that changes only a replay's copy (or the launcher's own sandbox) changes it
            plain = qemu_launch.Target(_TARGET.run_dir, paused=False, isolated=False)
            assert res.argv != qemu_launch.rewrite_argv(argv, plain, qmp_fdsets=qmp).argv
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


# ------------------------------------------------------------------ devices no replay runs (issue 16)

#: REFUSALS entry → the lines libvirt writes for such a device (the last option is the refused one).
REFUSAL_CASES: dict[str, list[list[str]]] = {
    "host-pci": [["-device", '{"driver":"vfio-pci","host":"0000:01:00.0","id":"hostdev0","bus":"pci.5","addr":"0x0"}']],
    "host-usb": [["-device", '{"driver":"usb-host","hostdevice":"/dev/bus/usb/001/002","id":"hostdev1",'
                             '"bus":"usb.0","port":"2"}']],
    "virtiofs": [["-chardev", "socket,id=chr-vu-fs0,path=/var/lib/libvirt/qemu/domain-1-g/fs0-fs.sock",
                  "-device", '{"driver":"vhost-user-fs-pci","id":"fs0","chardev":"chr-vu-fs0","tag":"share"}']],
    "vhost-user": [["-chardev", "socket,id=charnet1,path=/var/lib/libvirt/qemu/vhost-user1",
                    "-netdev", '{"type":"vhost-user","chardev":"charnet1","id":"hostnet1"}'],
                   ["-chardev", "socket,id=chr-vu-blk0,path=/var/lib/libvirt/qemu/vhost-blk.sock",
                    "-device", '{"driver":"vhost-user-blk-pci","chardev":"chr-vu-blk0","id":"virtio-disk1"}']],
    "vhost-vdpa": [["-netdev", '{"type":"vhost-vdpa","vhostdev":"/dev/vhost-vdpa-0","id":"hostnet2"}'],
                   ["-device", '{"driver":"vhost-vdpa-device-pci","vhostdev":"/dev/vhost-vdpa-1","id":"vdpa0"}']],
    "host-scsi": [["-device", '{"driver":"vhost-scsi-pci","wwpn":"naa.5001405df3e54061","vhostfd":"31",'
                              '"id":"hostdev2"}']],
    "vsock": [["-device", '{"driver":"vhost-vsock-pci","id":"vsock0","guest-cid":3,"vhostfd":"28"}']],
    "tpm": [["-chardev", "socket,id=chrtpm,path=/run/libvirt/qemu/swtpm/1-g-swtpm.sock",
             "-tpmdev", "emulator,id=tpm-tpm0,chardev=chrtpm"],
            ["-tpmdev", "passthrough,id=tpm-tpm1,path=/dev/tpm0,cancel-path=/sys/class/tpm/tpm0/device/cancel"]],
    "shared-memory": [["-object", '{"qom-type":"memory-backend-file","id":"pc.ram","mem-path":"/dev/shm/g",'
                                  '"share":true,"size":268435456}'],
                      ["-device", '{"driver":"ivshmem-plain","id":"shmem0","memdev":"shmmem-shmem0"}']],
    "network-block": [["-blockdev", '{"driver":"nbd","server":{"type":"inet","host":"10.0.0.1","port":"10809"},'
                                    '"export":"d","node-name":"libvirt-2-storage"}'],
                      ["-drive", "file=nbd:10.0.0.1:10809,format=raw,if=virtio"]],
    "host-nic": [["-netdev", "af-xdp,id=hostnet3,ifname=eth0"]],
    "dbus": [["-display", "dbus,p2p=no,addr=unix:path=/run/libvirt/qemu/dbus/1-g-dbus.sock"],
             ["-object", '{"qom-type":"dbus-vmstate","id":"dbus-vmstate0","addr":"unix:path=/run/x.sock"}']],
}
_REFUSAL_PARAMS = [(name, i, words) for name, cases in REFUSAL_CASES.items() for i, words in enumerate(cases)]


def test_every_refusal_has_a_case():
    assert set(REFUSAL_CASES) == {r.name for r in qemu_launch.REFUSALS}


@pytest.mark.parametrize(("name", "i", "words"), _REFUSAL_PARAMS, ids=[f"{n}-{i}" for n, i, _ in _REFUSAL_PARAMS])
def test_unreplayable_device_named_in_one_line_and_refused_by_the_launcher(name, i, words):
    argv = MINI + words
    ctx = qemu_launch.context(argv)
    device = ctx.cmdline.options[-1]
    refusal = qemu_launch.refusal_for(device, ctx)
    assert refusal is not None and refusal.name == name
    desc = refusal.describe(device)
    assert desc.startswith(f"{device.name} {device.parsed.kind}")
    found = [f for f in safety.check_argv(argv) if f.unreplayable]
    assert [(f.item, f.where) for f in found] == [(desc, f"argv[{device.index}]")]
    msg = safety.refusal_message(safety.check_argv(argv))
    assert "\n" not in msg and msg.startswith("cannot replay") and desc in msg and "nothing was started" in msg
    with pytest.raises(errors.LaunchError, match="cannot replay") as ei:
        qemu_launch.rewrite_argv(argv, _TARGET)
    assert desc in str(ei.value) and refusal.reason in str(ei.value)
    # A real restore (the QEMU *is* the guest, the original is gone) is not a replay: not refused as one.
    try:
        qemu_launch.rewrite_argv(argv, qemu_launch.Target(_TARGET.run_dir, isolated=False))
    except errors.LaunchError as exc:
        assert "cannot replay" not in str(exc)


def test_libvirt_blockdev_graph_is_no_path_and_bad_references_are_named():
    assert safety.check_argv(MINI + DISK) == []
    bad = [*MINI, "-blockdev", '{"node-name":"f","driver":"qcow2","file":"no-such-node"}']
    (f,) = safety.check_argv(bad)
    assert "no-such-node" in f.reason and "names no -blockdev node" in f.reason
    dotted = [*MINI, "-blockdev", "driver=qcow2,node-name=f,file.driver=file,file.filename=/etc/shadow"]
    assert any("/etc/shadow" in f.reason and "outside" in f.reason for f in safety.check_argv(dotted))


def test_replay_copy_of_a_disk_keeps_node_names_devices_and_order():
    """The devices, the machine and the node names they use are as traced; every original file is
    opened read-only and shared; the writable tops are qcow2 overlays in the run dir."""
    nvram = ["-blockdev", '{"driver":"file","filename":"/var/lib/libvirt/qemu/nvram/g_VARS.fd",'
                          '"node-name":"libvirt-pflash1-storage","read-only":false}']
    code = RULE_CASES["disk-read-only"][0][1][0]
    machine = ["-machine", "pc-q35-10.0,pflash0=libvirt-pflash0-format,pflash1=libvirt-pflash1-storage"]
    argv = [*MINI[:1], *machine, *code, *nvram, *DISK, *MINI[3:]]
    res = qemu_launch.rewrite_argv(argv, _TARGET)
    out = qargv.parse(res.argv)
    traced = qargv.parse(argv)
    kept = ("-device", "-machine")
    assert [o.words() for o in out.find(*kept)] == [o.words() for o in traced.find(*kept)]
    nodes = out.block_nodes()
    names = list(nodes)
    for n in traced.block_nodes():        # every traced name is still there, in the traced order
        assert n in nodes
    assert [n for n in names if n in traced.block_nodes()] == list(traced.block_nodes())
    for n, o in nodes.items():
        v = o.parsed
        fn = v.get("filename")
        if isinstance(fn, str) and not fn.startswith(str(_TARGET.run_dir)):
            assert v.get("read-only") is True and v.get("force-share") is True and "auto-read-only" not in v, n
    for top in ("libvirt-pflash1-storage", "libvirt-1-format"):
        v = nodes[top].parsed
        assert v.kind == "qcow2" and nodes[v.get("file")].parsed.get("filename") == \
            str(_TARGET.run_dir / f"{top}.qcow2")
        base = nodes[v.get("backing")].parsed
        assert base.get("read-only") is True
    assert [ov.node for ov in res.overlays] == ["libvirt-pflash1-storage", "libvirt-1-format"]
    # A real restore keeps the disks as they are.
    plain = qemu_launch.rewrite_argv(argv, qemu_launch.Target(_TARGET.run_dir, paused=False, isolated=False))
    assert [o for o in qargv.parse(plain.argv).options if o.name == "-blockdev"] == traced.find("-blockdev")


def test_nic_keeps_model_and_mac_and_reaches_no_host_network():
    argv = [*MINI, "-netdev", '{"type":"tap","fd":"33","vhost":true,"vhostfd":"34","id":"hostnet0"}', *NIC]
    res = qemu_launch.rewrite_argv(argv, _TARGET)
    out = qargv.parse(res.argv)
    assert [o.words() for o in out.find("-device")] == [NIC]
    (nd,) = out.find("-netdev")
    assert nd.parsed.props == {"type": "tap", "id": "hostnet0", "ifname": _TARGET.tap_name(1), "script": "no",
                               "downscript": "no", "vhost": True}
    assert len(_TARGET.tap_name(99)) <= 15
    user = qemu_launch.rewrite_argv(argv, qemu_launch.Target(_TARGET.run_dir, nic="user"))
    assert qargv.parse(user.argv).find("-netdev")[0].parsed.props == {"type": "user", "id": "hostnet0",
                                                                       "restrict": True}
    assert {r["option"] for r in res.rewrites} >= {"-netdev"}


@pytest.fixture
def qemu_wrapper(tmp_path):
    from badinput import kill_recorded, make_qemu_wrapper

    wrapper, record = make_qemu_wrapper(tmp_path)
    yield wrapper, record
    kill_recorded(record)


@pytest.mark.parametrize("allow", [False, True], ids=["checked", "allow-unsafe"])
def test_replay_of_unreplayable_device_exits_2_nothing_started(cli, tmp_path, qemu_wrapper, allow):
    from badinput import assert_clean_error, synthetic_trace, write_trace

    wrapper, record = qemu_wrapper
    t = synthetic_trace(argv0=str(wrapper))
    t["domain"]["argv"] += REFUSAL_CASES["host-pci"][0]
    path = write_trace(tmp_path / "vfio.json", t)
    image = tmp_path / "x.save"
    proc = cli("replay", str(path), "--image", str(image), "--run-for", "0", *(["--allow-unsafe"] if allow else []))
    line = assert_clean_error(proc, allow_info=("warning: unsafe trace item", "replaying "))
    assert "cannot replay" in line and "-device vfio-pci (hostdev0)" in line and "host PCI" in line, line
    assert not record.exists(), f"QEMU was launched: {record.read_text()}"
    assert not image.exists()


@pytest.mark.skipif(not (Path("/usr/bin/qemu-system-x86_64").exists() and shutil.which("qemu-img")),
                    reason="needs qemu-system-x86_64 and qemu-img (package qemu-utils) installed")
def test_plan_launch_makes_private_overlays_of_the_traced_size_and_the_next_phase_reuses_them(tmp_path):
    """No QEMU machine starts here: only ``qemu-img`` makes the overlay files."""
    disk, vars_fd = tmp_path / "d.raw", tmp_path / "VARS.fd"
    disk.write_bytes(b"\x11" * (3 << 20))
    vars_fd.write_bytes(b"\x22" * 540672)
    argv = ["/usr/bin/qemu-system-x86_64", "-machine", "q35,pflash1=libvirt-pflash1-storage",
            "-blockdev", json.dumps({"driver": "file", "filename": str(vars_fd),
                                     "node-name": "libvirt-pflash1-storage", "read-only": False}),
            "-blockdev", json.dumps({"driver": "file", "filename": str(disk), "node-name": "libvirt-1-storage"}),
            "-blockdev", json.dumps({"driver": "raw", "file": "libvirt-1-storage", "node-name": "libvirt-1-format"}),
            "-device", "virtio-blk-pci,drive=libvirt-1-format,id=virtio-disk0"]
    shared = tmp_path / "overlays"
    plans = [qemu_launch.plan_launch(argv, overlay_dir=shared)]
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shared.iterdir()}
    plans.append(qemu_launch.plan_launch(argv, overlay_dir=shared))     # the restore phase of the same replay
    try:
        made = sorted(shared.iterdir())
        assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in made} == first   # reused, not remade
        assert [p.name for p in made] == ["libvirt-1-format.qcow2", "libvirt-pflash1-storage.qcow2"]
        for p, size in zip(made, (3 << 20, 540672), strict=True):
            info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(p)], capture_output=True,
                                             text=True, check=True).stdout)
            assert info["format"] == "qcow2" and info["virtual-size"] == size and "backing-filename" not in info
            assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert [str(p) in " ".join(plans[0].argv) for p in made] == [True, True]
        assert plans[0].argv == [a.replace(str(plans[1].run_dir), str(plans[0].run_dir)) for a in plans[1].argv]
        assert disk.read_bytes() == b"\x11" * (3 << 20) and vars_fd.read_bytes() == b"\x22" * 540672
        assert plans[0].env["TMPDIR"] == str(plans[0].run_dir)
    finally:
        for p in plans:
            shutil.rmtree(p.run_dir, ignore_errors=True)
