"""virtsave.qemu.safety rule by rule: for each kind of command-line option and QMP command, exactly what
is refused (the reason word for word) and what, right next to it, is allowed. These pin every branch of
the untrusted-trace check, so that a changed condition, value or message fails a test (scripts/mutation
measures it)."""

from __future__ import annotations

import pytest

from virtsave.core.errors import UnsafeTraceError
from virtsave.qemu import safety
from virtsave.trace import model as trace

MINI = ["/usr/bin/qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "64", "-nodefaults", "-display", "none"]
AT = f"argv[{len(MINI)}]"
OUTSIDE = "outside the expected places (/var/lib/libvirt, /var/lib/virtsave, /var/cache/libvirt, /usr/share, …)"
CONN = "(only fd: and file:/dev/fdset/N are replayable)"
NOT_NAMED = "only file:/dev/fdset/N is replayable"


def reasons(*words: str, fdsets: tuple[str, ...] = ()) -> list[str]:
    """The reasons found in MINI + *words*, each checked to be about the first added option."""
    found = safety.check_argv([*MINI, *words], set(fdsets))
    return [f.reason for f in found]


def test_the_base_command_line_is_clean():
    assert safety.check_argv(MINI) == []
    assert safety.check_argv([]) == [] and safety.check_argv(["qemu-system-x86_64"]) == []


def test_binary_must_be_qemu():
    assert safety.check_argv(["/bin/sh", "-c", "x"]) == [
        safety.Finding("/bin/sh", "argv[0]", "not a QEMU system emulator (qemu-system-*), would be executed")]


# --------------------------------------------------------------------------- chardev-like options

CHAR_OK = ["none", "null", "pty", "vc", "stdio", "mon:stdio", "chardev:c0", "vc:80Cx24C"]


@pytest.mark.parametrize("option", ["-serial", "-parallel", "-virtioconsole", "-debugcon"])
@pytest.mark.parametrize("value", CHAR_OK)
def test_char_options_to_the_console_are_fine(option, value):
    assert reasons(option, value) == []


@pytest.mark.parametrize("option", ["-serial", "-parallel", "-virtioconsole", "-debugcon"])
@pytest.mark.parametrize("value", ["file:/tmp/x", "/dev/ttyS0", "", "pipe:/tmp/p", "tcp::4444,server", "nonee",
                                   "xchardev:c0", "mon:stdioo"])
def test_char_options_to_anything_else_are_refused(option, value):
    assert reasons(option, value) == [f"{option} to a host file, pipe, socket or device"]


@pytest.mark.parametrize(("value", "expected"), [
    ("socket,id=s,path=/var/lib/libvirt/qemu/ch.sock,server=on", []),
    ("socket,id=s,path=/var/lib/libvirt/qemu/../x.sock",
     ["extra socket /var/lib/libvirt/qemu/../x.sock outside libvirt's channel directory"]),
    ("socket,id=s,path=/tmp/x.sock", ["extra socket /tmp/x.sock outside libvirt's channel directory"]),
    ("socket,id=s,host=1.2.3.4,port=5", ["network socket chardev"]),
    ("socket,id=s,fd=3", ["socket chardev on an inherited fd the launcher cannot rewrite"]),
    ("socket,id=s,path=/var/lib/libvirt/qemu/x.sock,logfile=/tmp/l", ["chardev logfile writes host file /tmp/l"]),
    ("file,id=f,path=/tmp/x", ["file chardev writes host file /tmp/x"]),
    ("file,id=f", ["file chardev writes host file "]),
    ("pipe,id=p,path=/tmp/p", ["pipe chardev reaches a host file, device or network"]),
    ("serial,id=p,path=/dev/ttyS0", ["serial chardev reaches a host file, device or network"]),
    ("tty,id=p,path=/dev/tty1", ["tty chardev reaches a host file, device or network"]),
    ("parallel,id=p,path=/dev/parport0", ["parallel chardev reaches a host file, device or network"]),
    ("parport,id=p,path=/dev/parport0", ["parport chardev reaches a host file, device or network"]),
    ("udp,id=u,host=1.2.3.4,port=5", ["udp chardev reaches a host file, device or network"]),
    ("weird,id=w", ["unknown chardev backend 'weird'"]),
    ("pty,id=n,logfile=/tmp/l", ["chardev logfile writes host file /tmp/l"]),
    ("ringbuf,id=r,fd=4", ["fd= passes an inherited fd the launcher cannot rewrite"]),
    ("null,id=n,path=/dev/fdset/3", ["/dev/fdset/3 is not declared by an -add-fd"]),
    *[(f"{kind},id=c", []) for kind in sorted(safety._SAFE_CHARDEVS)],
])
def test_chardev_backends(value, expected):
    assert reasons("-chardev", value) == expected


def test_chardev_on_a_declared_fdset():
    """A file chardev or a log on libvirt's fdset is libvirt's plumbing (the launcher drops the fdset);
    a log on an fdset for a backend the launcher does not replace is refused as such."""
    assert reasons("-add-fd", "set=4,fd=40", "-chardev", "file,id=c,path=/dev/fdset/4") == []
    found = safety.check_argv([*MINI, "-add-fd", "set=4,fd=40", "-chardev", "udp,id=u,logfile=/dev/fdset/4"])
    assert [(f.where, f.reason) for f in found] == [
        (AT, "fdset 4 is used by -chardev (argv[10]), which the launcher cannot rewrite"),
        ("argv[10]", "chardev logfile on libvirt's fdset, which the launcher cannot rewrite for 'udp'"),
        ("argv[10]", "udp chardev reaches a host file, device or network")]
    assert reasons("-chardev", "null,id=n,path=/dev/fdset/3", fdsets=("3",)) == [
        "/dev/fdset/3 used by -chardev, which the launcher cannot rewrite"]


def test_monitors():
    mon = ["-chardev", "socket,id=charmonitor,fd=29,server=on,wait=off", "-mon", "chardev=charmonitor,mode=control"]
    assert reasons(*mon) == []
    found = safety.check_argv([*MINI, *mon, "-mon", "chardev=charmonitor,mode=control"])
    assert [(f.where, f.reason) for f in found] == [("argv[12]", "extra monitor")]


@pytest.mark.parametrize(("option", "value", "reason"), [
    ("-monitor", "stdio", "opens an extra monitor/debug channel"),
    ("-qmp", "unix:/x", "opens an extra monitor/debug channel"),
    ("-qmp-pretty", "unix:/x", "opens an extra monitor/debug channel"),
    ("-gdb", "tcp::1234", "opens an extra monitor/debug channel"),
    ("-s", None, "opens an extra monitor/debug channel"),
    ("-qtest", "unix:/x", "opens an extra monitor/debug channel"),
    ("-plugin", "/x.so", "loads a host shared object into QEMU"),
    ("-loadvm", "s", "loads an internal snapshot instead of the traced state"),
    ("-fsdev", "local,id=f,path=/srv", "shares a host directory with the guest"),
    ("-virtfs", "local,path=/srv,mount_tag=t", "shares a host directory"),
    ("-D", "/tmp/log", "writes a host log file"),
    ("-readconfig", "/x", "reads a host config file"),
    ("-writeconfig", "/x", "writes a host file"),
    ("-trace", "file=/tmp/t", "writes a host trace file"),
])
def test_refused_options(option, value, reason):
    words = [option] if value is None else [option, value]
    found = safety.check_argv([*MINI, *words])
    assert [(f.item, f.where, f.reason) for f in found] == [(" ".join(words), AT, reason)]


@pytest.mark.parametrize("value", ["events=/var/tmp/ev", "enable=migration*"])
def test_trace_without_a_file_is_fine(value):
    assert reasons("-trace", value) == []


# --------------------------------------------------------------------------- fds and fdsets


def test_add_fd():
    assert reasons("-add-fd", "set=3,fd=40") == ["fdset 3 passes an fd nothing rewritable uses"]
    assert reasons("-add-fd", "set=3,fd=40", "-drive", "file=/dev/fdset/3,if=none,id=d") == [
        "fdset 3 is used by -drive (argv[10]), which the launcher cannot rewrite",
        "/dev/fdset/3 used by -drive, which the launcher cannot rewrite"]
    assert reasons("-add-fd", "set=0,fd=40", fdsets=("0",)) == []       # the restore's migrate-incoming reads it
    assert reasons("-drive", "file=/dev/fdset/2,if=none,id=d") == ["/dev/fdset/2 is not declared by an -add-fd"]


@pytest.mark.parametrize(("words", "reason"), [
    (["-device", "virtio-net,netdev=n,fd=3"], "fd= passes an inherited fd the launcher cannot rewrite"),
    (["-device", "virtio-net,vhostfds=3:4"], "vhostfds= passes an inherited fd the launcher cannot rewrite"),
    (["-device", "x,fds=3"], "fds= passes an inherited fd the launcher cannot rewrite"),
    (["-netdev", "tap,id=n,vhostfd=5"], "vhostfd= passes an inherited fd the launcher cannot rewrite"),
])
def test_inherited_fds(words, reason):
    assert reasons(*words) == [reason]


# --------------------------------------------------------------------------- objects and netdevs


@pytest.mark.parametrize(("value", "expected"), [
    ("secret,id=s,data=abc", []),
    ("secret,id=s,file=/tmp/k", ["secret object reads host file /tmp/k"]),
    ("filter-dump,id=f,netdev=n,file=/tmp/d", ["filter-dump writes network traffic to a host file"]),
    ("input-linux,id=i,evdev=/dev/input/event0", ["input-linux grabs a host input device"]),
    ("rng-random,id=r,filename=/dev/urandom", []),
    ("rng-random,id=r,filename=/dev/random", []),
    ("rng-random,id=r", []),
    ("rng-random,id=r,filename=/dev/sda", ["rng-random reads /dev/sda"]),
    ("memory-backend-file,id=m,mem-path=/dev/hugepages,size=1G", []),
    ("memory-backend-file,id=m,mem-path=/dev/hugepages1G/x,size=1G", []),
    ("memory-backend-file,id=m,mem-path=/dev/shm/x,size=1G", []),
    ("memory-backend-file,id=m,mem-path=/var/lib/libvirt/qemu/ram/x,size=1G", []),
    ("memory-backend-file,id=m,mem-path=/tmp/x,size=1G", ["memory backend file /tmp/x outside hugepage/shm places"]),
    ("memory-backend-file,id=m,mem-path=/dev/shm/../x,size=1G",
     ["memory backend file /dev/shm/../x outside hugepage/shm places"]),
    ("memory-backend-file,id=m,size=1G", ["memory backend file  outside hugepage/shm places"]),
    ("memory-backend-ram,id=m,size=1G", []),
])
def test_objects(value, expected):
    assert reasons("-object", value) == expected


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("-netdev", "tap,id=n,script=no,downscript=no", []),
    ("-netdev", "tap,id=n,script=,downscript=", []),
    ("-netdev", "tap,id=n,script=/x,downscript=/y", ["script= runs a host program", "downscript= runs a host program"]),
    ("-netdev", "tap,id=n,downscript=/y", ["downscript= runs a host program"]),
    ("-netdev", "bridge,id=n,helper=/usr/lib/qemu/qemu-bridge-helper", ["helper= runs a host program"]),
    ("-netdev", "user,id=n,guestfwd=tcp:10.0.2.100:1-cmd:/bin/sh", ["guestfwd= reaches host files, commands or ports"]),
    ("-netdev", "user,id=n,hostfwd=tcp::22-:22,smb=/srv",
     ["hostfwd= reaches host files, commands or ports", "smb= reaches host files, commands or ports"]),
    ("-netdev", "user,id=n", []),
    ("-netdev", "tap,id=n", []),
    ("-net", "nic", []),
    ("-nic", "user,hostfwd=tcp::1-:2", ["hostfwd= reaches host files, commands or ports"]),
    ("-net", "user,smb=/srv", ["smb= reaches host files, commands or ports"]),
])
def test_netdevs(option, value, expected):
    assert reasons(option, value) == expected


@pytest.mark.parametrize("kind", sorted(safety._HOST_NETDEVS))
def test_host_netdevs_are_refused(kind):
    """Every netdev kind that reaches host sockets or devices is refused (some also named as a device a
    replay cannot share with the original)."""
    found = reasons("-netdev", f"{kind},id=n")
    assert f"{kind} netdev reaches host sockets or devices" in found, found


# --------------------------------------------------------------------------- migration URIs


@pytest.mark.parametrize(("uri", "incoming_ok", "reason"), [
    ("defer", True, "defer: migration URI opens a connection " + CONN),
    ("fd:x", True, None),
    ("fd:29", True, None),
    ("file:/dev/fdset/3", True, None),
    ("file:/dev/fdset/3,offset=0x1F", True, None),
    ("file:/dev/fdset/3,offset=12", True, None),
    ("file:/dev/fdset/3,offset=zz", False, f"file: migration URI names a host file ({NOT_NAMED})"),
    ("file:/dev/fdset/x", False, f"file: migration URI names a host file ({NOT_NAMED})"),
    ("file:/dev/fdset/3,x", False, f"file: migration URI names a host file ({NOT_NAMED})"),
    ("xfile:/dev/fdset/3", False, "xfile: migration URI opens a connection " + CONN),
    ("file:/tmp/x", False, f"file: migration URI names a host file ({NOT_NAMED})"),
    ("exec:cat x", False, "exec: migration URI runs a host command"),
    ("tcp:0:4444", False, "tcp: migration URI opens a connection " + CONN),
    ("unix:/x", False, "unix: migration URI opens a connection " + CONN),
    ("rdma", False, "rdma: migration URI opens a connection " + CONN),
])
def test_migration_uris(uri, incoming_ok, reason):
    """The same rule for ``migrate``, ``migrate-incoming`` and ``-incoming``; ``defer`` only for incoming."""
    out_msg = {"kind": "command", "execute": "migrate", "arguments": {"uri": uri}}
    in_msg = {"kind": "command", "execute": "migrate-incoming", "arguments": {"uri": uri}}
    assert [f.reason for f in safety.check_command(out_msg, "w")] == ([reason] if reason else [])
    in_reason = None if incoming_ok and (reason is None or uri == "defer") else reason
    assert [f.reason for f in safety.check_command(in_msg, "w")] == ([in_reason] if in_reason else [])
    if uri.startswith(("fd:", "file:/dev/fdset/3,", "xfile:")):
        return      # libvirt's own -incoming forms (rewritten by the launcher), or an undeclared fdset too
    assert reasons("-incoming", uri) == ([in_reason] if in_reason else [])


@pytest.mark.parametrize(("channels", "expected"), [
    ([{"addr": {"transport": "exec", "args": ["sh"]}}], ["exec migration channel runs a host command"]),
    ([{"addr": {"transport": "file", "filename": "/dev/fdset/1"}}], []),
    ([{"addr": {"transport": "file", "filename": "/tmp/x"}}], ["file migration channel writes /tmp/x"]),
    ([{"addr": {"transport": "file", "filename": "/dev/fdset/1,offset=2"}}],
     ["file migration channel writes /dev/fdset/1,offset=2"]),
    ([{"addr": {"transport": "file"}}], ["file migration channel writes None"]),
    ([{"addr": {"transport": "socket"}}], ["socket migration channel opens a connection"]),
    ([{"addr": {"transport": "rdma"}}], ["rdma migration channel opens a connection"]),
    (["x", {"addr": "y"}, {"addr": {"transport": "fd"}}, {"other": 1}], []),
    ([{"addr": {"transport": "socket"}}, {"addr": {"transport": "exec"}}],
     ["socket migration channel opens a connection", "exec migration channel runs a host command"]),
])
def test_migration_channels(channels, expected):
    for ex in ("migrate", "migrate-incoming"):
        msg = {"kind": "command", "execute": ex, "arguments": {"channels": channels}}
        assert [f.reason for f in safety.check_command(msg, "w")] == expected


def test_migrate_without_uri_or_with_odd_arguments():
    for args in ({"detach": True}, {"uri": 5}, {"uri": "fd:x", "x": "exec:y"}, {"channels": None}):
        assert safety.check_command({"kind": "command", "execute": "migrate", "arguments": args}, "w") == []
    # arguments that are not an object (validate() refuses such traces) are still searched for exec:
    (f,) = safety.check_command({"kind": "command", "execute": "migrate", "arguments": "exec:x"}, "w")
    assert (f.item, f.reason) == ('migrate "exec:x"', "exec: runs a host command")


# --------------------------------------------------------------------------- QMP commands


@pytest.mark.parametrize("execute", sorted(safety.HOST_COMMANDS - {"human-monitor-command", "netdev_add",
                                                                    "chardev-add"}))
def test_host_commands(execute):
    (f,) = safety.check_command({"kind": "command", "execute": execute}, "save.messages[4]")
    assert (f.item, f.where, f.reason) == (execute, "save.messages[4]",
                                          f"{execute} reads/writes host files or opens connections")


def test_hmp_and_labels():
    (f,) = safety.check_command({"kind": "command", "execute": "human-monitor-command",
                                 "arguments": {"command-line": "info status"}}, "w")
    assert (f.item, f.reason) == ('human-monitor-command {"command-line":"info status"}',
                                  "human monitor passthrough: arbitrary HMP commands")
    assert str(f) == 'human-monitor-command {"command-line":"info status"} (w): human monitor passthrough: ' \
                     "arbitrary HMP commands"


@pytest.mark.parametrize(("execute", "args", "expected"), [
    ("cont", {"a": ["exec:x"]}, ["exec: runs a host command"]),
    ("x", {"a": {"b": "exec:q"}}, ["exec: runs a host command"]),
    ("x", {"a": "no exec:q"}, []),
    ("query-status", None, []),
    ("query-status", {}, []),
    ("x", {"file": "/opt/x"}, []),
    ("object-add", {"qom-type": "secret", "id": "s", "file": "/var/lib/libvirt/qemu/domain-3-g/master-key.aes"}, []),
    # libvirt's master key under /run: no secret finding, but /run is no place for guest files
    ("object-add", {"qom-type": "secret", "id": "s", "file": "/run/libvirt/qemu/g/master-key.aes"},
     [f"file /run/libvirt/qemu/g/master-key.aes: {OUTSIDE}"]),
    ("object-add", {"qom-type": "secret", "id": "s", "file": "/tmp/k"}, ["secret object reads host file /tmp/k"]),
    ("object-add", {"qom-type": "secret", "id": "s", "file": "/opt/k"},
     ["secret object reads host file /opt/k", f"file /opt/k: {OUTSIDE}"]),
    ("object-add", {"qom-type": "secret", "id": "s", "props": {"file": "/var/tmp/k"}},
     ["secret object reads host file /var/tmp/k"]),
    ("object-add", {"qom-type": "secret", "id": "s", "data": "x"}, []),
    ("object-add", {"qom-type": "memory-backend-file", "id": "m", "file": "/var/tmp/k"}, []),
    ("object-add", {"qom-type": "memory-backend-file", "id": "m", "mem-path": "/opt/m"},
     [f"mem-path /opt/m: {OUTSIDE}"]),
    ("object-add", {"qom-type": "rng-random", "filename": "/dev/fdset/2"}, []),
    ("blockdev-add", {"driver": "file", "filename": "/var/tmp/x", "node-name": "n"}, []),
    ("blockdev-add", {"driver": "file", "filename": "", "node-name": "n"}, []),
    ("blockdev-add", {"driver": "file", "filename": "/var/../etc/x", "node-name": "n"},
     ["filename /var/../etc/x: path traversal ('..')"]),
    ("device_add", {"driver": "e1000", "romfile": "/usr/share/x"}, []),
    ("device_add", {"driver": "e1000", "romfile": "/opt/x"}, ["romfile /opt/x: outside /usr/share/"]),
    ("device_add", {"driver": "e1000", "romfile": "/usr/share/../x"}, ["romfile /usr/share/../x: outside /usr/share/"]),
    ("device_add", {"driver": "x", "path": "/opt/p"}, [f"path /opt/p: {OUTSIDE}"]),
    ("device_add", {"driver": "x", "path": 5}, []),
    ("netdev_add", {"type": "tap", "id": "n", "script": "/x", "downscript": "no"},
     ["netdev_add reads/writes host files or opens connections", "script runs a host program"]),
    ("netdev_add", {"type": "tap", "id": "n", "downscript": "/y", "script": ""},
     ["netdev_add reads/writes host files or opens connections", "downscript runs a host program"]),
    ("chardev-add", {"id": "c", "backend": {"type": "file", "data": {"out": "/etc/x", "path": "/opt/y"}}},
     ["chardev-add reads/writes host files or opens connections"]),
    ("object-add", [1], []),
    ("qom-set", {"path": "/opt/x"}, []),
])
def test_commands(execute, args, expected):
    msg = {"kind": "command", "execute": execute} | ({"arguments": args} if args is not None else {})
    assert [f.reason for f in safety.check_command(msg, "w")] == expected


def test_command_paths_follow_the_prefixes():
    msg = {"kind": "command", "execute": "blockdev-add", "arguments": {"driver": "file", "filename": "/var/tmp/x"}}
    assert [f.reason for f in safety.check_command(msg, "w", prefixes=("/srv/",))] == [
        "filename /var/tmp/x: outside the expected places (/srv, …)"]


# --------------------------------------------------------------------------- guest files and values


PATH_OPTIONS = ["-kernel", "-initrd", "-dtb", "-bios", "-L", "-pflash", "-hda", "-hdb", "-hdc", "-hdd", "-cdrom",
                "-fda", "-fdb", "-mtdblock", "-sd", "-mem-path"]


@pytest.mark.parametrize("option", PATH_OPTIONS)
def test_guest_file_options(option):
    assert reasons(option, "/opt/x") == [f"/opt/x: {OUTSIDE}"]
    assert reasons(option, "/var/lib/virtsave/guest/x") == []
    assert reasons(option, "rel/x") == ["rel/x: relative path (resolved against an unknown directory)"]


@pytest.mark.parametrize(("words", "expected"), [
    (["-drive", "file=/opt/d,if=none,id=d"], [f"/opt/d: {OUTSIDE}"]),
    (["-drive", "file=/var/tmp/d,if=none,id=d"], []),
    (["-blockdev", '{"driver":"file","filename":"/opt/x","node-name":"n"}'], [f"/opt/x: {OUTSIDE}"]),
    (["-blockdev", '{"driver":"qcow2","file":{"driver":"file","filename":"/opt/y"},"node-name":"n"}'],
     [f"/opt/y: {OUTSIDE}"]),
    (["-fw_cfg", "name=opt/x,file=/opt/y"], [f"/opt/y: {OUTSIDE}"]),
    (["-device", '{"driver":"e1000","romfile":"/usr/share/qemu/x.rom"}'], []),
    (["-device", '{"driver":"e1000","romfile":"/usr/share/../etc/x"}'],
     ["romfile /usr/share/../etc/x outside /usr/share/"]),
    (["-device", '{"driver":"e1000","romfile":"/opt/x"}'], ["romfile /opt/x outside /usr/share/"]),
    (["-device", '{"driver":"e1000","romfile":""}'], []),
    (["-device", "virtio-blk,drive=d"], []),
    (["-option-rom", "/usr/share/x.rom"], []),
    (["-option-rom", "/opt/x.rom"], ["romfile /opt/x.rom outside /usr/share/"]),
    (["-option-rom", "/usr/share/../x.rom"], ["romfile /usr/share/../x.rom outside /usr/share/"]),
    (["-audiodev", '{"id":"a","driver":"wav","path":"/var/tmp/a.wav"}'], []),
    (["-audiodev", '{"id":"a","driver":"wav","path":"/opt/a.wav"}'], [f"/opt/a.wav: {OUTSIDE}"]),
    (["-audiodev", "none,id=a"], []),
    (["-name", "exec:x"], ["exec: runs a host command"]),
    (["-append", "console=ttyS0 exec:x -s"], []),
    (["-name", "-s"], ["value -s is an option: -name takes no value in QEMU (an unknown flag?), so the rest of the "
                       "command line would be misread"]),
    (["-name", "--foo"], ["value --foo is an option: -name takes no value in QEMU (an unknown flag?), so the rest "
                          "of the command line would be misread"]),
    (["-append", "-s"], []),
    (["-name", "-"], []),
    (["-name", "-9"], []),
    (["-name", "x-y"], []),
    (["/x.img"], ["positional argument: QEMU opens it as a disk image"]),
])
def test_paths_values_and_positionals(words, expected):
    assert reasons(*words) == expected


def test_argv_prefixes_can_be_narrowed():
    found = safety.check_argv([*MINI, "-drive", "file=/var/tmp/x,if=none"], prefixes=("/srv/",))
    assert [(f.item, f.reason) for f in found] == [("-drive file=/var/tmp/x,if=none",
                                                    "/var/tmp/x: outside the expected places (/srv, …)")]


# --------------------------------------------------------------------------- path_problem itself


@pytest.mark.parametrize(("path", "expected"), [
    ("", None),
    ("/var/tmp/x", None),
    ("/var//tmp/x", None),                     # normalized before the prefix check
    ("/var/tmp/./x", None),
    ("/var/tmp", None),                        # a prefix itself, without its slash
    ("/var/tmp/", None),
    ("/usr/share/qemu/bios.bin", None),
    ("/dev/fdset/3", None),
    ("/opt/x", OUTSIDE),
    ("/var/tmpx/y", OUTSIDE),
    ("/var/tmp/../etc/x", "path traversal ('..')"),
    ("/var/tmp\\..\\x", "path traversal ('..')"),
    ("../x", "path traversal ('..')"),
    ("x.img", "relative path (resolved against an unknown directory)"),
    ("./x.img", "relative path (resolved against an unknown directory)"),
    ("/var/tmp/a\x00b", "NUL byte in path"),
    *[(f"{s}:x", f"network storage {s}: reaches outside this host's files")
      for s in ("nbd", "iscsi", "rbd", "gluster", "http", "https", "ftp", "ssh")],
])
def test_path_problem(path, expected):
    assert safety.path_problem(path) == expected


@pytest.mark.parametrize(("path", "expected"), [
    ("/var/tmp/x.save", None),
    ("/opt/x.save", None),                      # save images may be anywhere …
    ("/dev/fdset/1", None),
    *[(p + "x", "a system file, device, log or runtime path") for p in safety.DENY_PREFIXES],   # … but not there
    ("/etc", None),                             # (a directory name, not a file under it)
    ("/var/tmp/../../etc/shadow", "path traversal ('..')"),
    ("x.save", "relative path (resolved against an unknown directory)"),
])
def test_path_problem_for_images(path, expected):
    assert safety.path_problem(path, deny_only=True) == expected


def test_path_problem_of_non_strings():
    assert safety.path_problem(None) is None  # type: ignore[arg-type]
    assert safety.path_problem(5) is None  # type: ignore[arg-type]


def test_path_problem_names_the_first_four_prefixes():
    assert safety.path_problem("/x", ("/a/", "/b/", "/c/", "/d/", "/e/")) == \
        "outside the expected places (/a, /b, /c, /d, …)"
    assert safety.path_problem("/a/x", ("/a/",)) is None


# --------------------------------------------------------------------------- whole traces


def _trace(argv: list[str] | None = None, **phase_images: str) -> trace.Trace:
    t = trace.new_trace("libvirt", domain={"argv": argv or list(MINI)})
    for name, path in phase_images.items():
        trace.add_phase(t, name, "save", image={"path": path, "size": None, "header": None})
    return t


def test_check_trace_image_paths_and_where():
    t = _trace(save="/etc/x.save", restore="/var/tmp/ok.save")
    assert safety.check_trace(t) == [safety.Finding("/etc/x.save", "save.image.path",
                                                    "a system file, device, log or runtime path")]
    t["phases"][1]["image"]["path"] = ""
    t["phases"][0]["image"] = None
    assert safety.check_trace(t) == []


def test_check_trace_messages_and_positions():
    t = _trace()
    ph = trace.add_phase(t, "restore", "start")
    ph["messages"] += [trace.command("query-status", id="1"), trace.reply("1"),
                       {"kind": "event", "event": "x", "data": {"uri": "exec:x"}},
                       trace.command("screendump", {"filename": "/tmp/s"}, id="2")]
    (f,) = safety.check_trace(t)
    assert (f.where, f.item) == ("restore.messages[3]", 'screendump {"filename":"/tmp/s"}')


def test_check_trace_tolerates_odd_content():
    t = _trace()
    t["phases"] = ["x", {"messages": ["y", {"kind": "command", "execute": "screendump"}]}]  # type: ignore[list-item]
    (f,) = safety.check_trace(t)
    assert f.where == "phase.messages[1]"
    t["domain"]["argv"] = "not a list"  # type: ignore[typeddict-item]
    assert len(safety.check_trace(t)) == 1
    assert safety.check_trace({}) == []


def test_incoming_fdsets_come_from_migrate_incoming():
    argv = [*MINI, "-add-fd", "set=0,fd=29,opaque=x"]
    t = _trace(argv)
    assert [f.reason for f in safety.check_trace(t)] == ["fdset 0 passes an fd nothing rewritable uses"]
    ph = trace.add_phase(t, "restore", "restore")
    ph["messages"].append(trace.command("migrate-incoming", {"uri": "file:/dev/fdset/0,offset=0x10"}, id="1"))
    assert safety.check_trace(t) == []
    ph["messages"][0] = trace.command("migrate", {"uri": "file:/dev/fdset/0,offset=0x10"}, id="1")
    assert [f.reason for f in safety.check_trace(t)] == ["fdset 0 passes an fd nothing rewritable uses"]
    ph["messages"][0] = trace.command("migrate-incoming", {"uri": 7}, id="1")
    assert [f.reason for f in safety.check_trace(t)] == ["fdset 0 passes an fd nothing rewritable uses"]


def test_check_trace_prefixes():
    t = _trace([*MINI, "-kernel", "/var/tmp/k"])
    assert safety.check_trace(t) == []
    assert [f.reason for f in safety.check_trace(t, prefixes=("/srv/",))] == [
        "/var/tmp/k: outside the expected places (/srv, …)"]


# --------------------------------------------------------------------------- messages


def test_refusal_message_and_require_safe():
    one = [safety.Finding("a", "argv[1]", "r")]
    two = [*one, safety.Finding("b", "save.messages[0]", "s")]
    assert safety.refusal_message(one) == ("unsafe trace, 1 item refused: a (argv[1]): r "
                                           "(replay only traces you trust, or pass --allow-unsafe)")
    assert safety.refusal_message(two) == ("unsafe trace, 2 items refused: a (argv[1]): r; b (save.messages[0]): s "
                                           "(replay only traces you trust, or pass --allow-unsafe)")
    t = _trace([*MINI, "-plugin", "/p.so"])
    with pytest.raises(UnsafeTraceError) as ei:
        safety.require_safe(t)
    assert str(ei.value) == safety.refusal_message(safety.check_trace(t))
    assert safety.require_safe(t, allow_unsafe=True) == safety.check_trace(t) != []
    assert safety.require_safe(_trace()) == []


def test_items_are_shortened_to_one_line():
    assert safety._short("a\nb") == "a b"
    assert safety._short("x" * 120) == "x" * 120
    assert safety._short("x" * 121) == "x" * 119 + "…"
    assert safety._short("abcdef", 4) == "abc…"
    (f,) = safety.check_argv([*MINI, "-plugin", "/" + "p" * 200])
    assert len(f.item) == 120 and f.item.endswith("…")


def test_walk_strings():
    assert list(safety._walk_strings({"a": ["x", {"b": "y"}, 3], "c": "z"})) == ["x", "y", "z"]
    assert list(safety._walk_strings(None)) == []


def test_add_fd_edges():
    assert reasons("-add-fd", "fd=40") == ["fdset  passes an fd nothing rewritable uses"]     # no set=
    serial = ["-add-fd", "set=0,fd=30,opaque=serial0-source",
              "-chardev", "file,id=charserial0,path=/dev/fdset/0,append=on",
              "-device", '{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}']
    # the serial chardev is the launcher's to rewrite: the -add-fd names the user it cannot rewrite
    found = safety.check_argv([*MINI, *serial, "-drive", "file=/dev/fdset/0,if=none,id=d"])
    assert [(f.where, f.reason) for f in found] == [
        (AT, "fdset 0 is used by -drive (argv[14]), which the launcher cannot rewrite"),
        ("argv[14]", "/dev/fdset/0 used by -drive, which the launcher cannot rewrite")]
    found = safety.check_argv([*MINI, "-add-fd", "set=4,fd=40", "-chardev", "file,id=c,path=/dev/fdset/4",
                               "-drive", "file=/dev/fdset/4,if=none,id=d"])
    assert [(f.where, f.reason) for f in found] == [
        (AT, "fdset 4 is used by -drive (argv[12]), which the launcher cannot rewrite"),
        ("argv[12]", "/dev/fdset/4 used by -drive, which the launcher cannot rewrite")]


def test_check_trace_odd_images():
    t = _trace()
    for odd in ("a string", ["/etc/x"], {"path": 5}, {"path": None}):
        ph = trace.add_phase(t, "save", "save")
        ph["image"] = odd  # type: ignore[typeddict-item]
    assert safety.check_trace(t) == []


def test_more_exact_items_and_edges():
    (f,) = safety.check_command({"kind": "command", "arguments": {"a": "exec:x"}}, "w")
    assert f.item == ' {"a":"exec:x"}'                            # no name: an empty one, not "None"
    (f,) = safety.check_command({"kind": "command", "execute": "screendump", "arguments": {"a": 1, "b": [2, 3]}}, "w")
    assert f.item == 'screendump {"a":1,"b":[2,3]}'
    msg = {"kind": "command", "execute": "chardev-add", "arguments": {"id": "c", "script": "/x"}}
    assert [f.reason for f in safety.check_command(msg, "w")] == [
        "chardev-add reads/writes host files or opens connections", "script runs a host program"]
    assert safety.path_problem("nbd:host:10809") == "network storage nbd: reaches outside this host's files"
    assert safety.path_problem("/etc/", deny_only=True) == "a system file, device, log or runtime path"


def test_a_path_option_without_value_and_prefixes_shown_as_given():
    assert reasons("-kernel") == []                     # nothing named: no path to judge
    assert safety.path_problem("/y", ("/opt/X/",)) == "outside the expected places (/opt/X, …)"


def test_every_path_of_an_option_is_judged():
    blk = ('{"driver":"qcow2","file":{"driver":"file","filename":"/dev/fdset/1"},'
           '"backing":{"file":"","filename":"/opt/b"}}')
    assert reasons("-blockdev", blk) == ["/dev/fdset/1 is not declared by an -add-fd", f"/opt/b: {OUTSIDE}"]
    dev = '{"driver":"x","romfile":"/usr/share/a","x":{"romfile":"/opt/b"}}'
    assert reasons("-device", dev) == ["romfile /opt/b outside /usr/share/"]


def test_an_option_keeps_every_finding():
    assert reasons("-serial", "exec:x") == ["exec: runs a host command",
                                            "-serial to a host file, pipe, socket or device"]


def test_file_chardev_on_a_declared_fdset_with_a_host_logfile():
    """Not the launcher's to rewrite (its log goes to a host file): the log is the finding, the fdset path is not."""
    assert reasons("-add-fd", "set=4,fd=40", "-chardev", "file,id=c,path=/dev/fdset/4,logfile=/tmp/l") == [
        "fdset 4 is used by -chardev (argv[10]), which the launcher cannot rewrite",
        "chardev logfile writes host file /tmp/l"]


def test_an_accepted_incoming_uri_the_launcher_keeps():
    assert reasons("-incoming", "fd:a b") == []        # fd: with a blank: no libvirt form, yet no finding
