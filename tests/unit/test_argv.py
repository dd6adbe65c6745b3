"""virtsave.trace.argv: the one model of a QEMU command line (words, options, values, round trip)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from virtsave.libvirtd import domainlog
from virtsave.qemu import launch, safety
from virtsave.trace import argv as qargv

FXA = Path(__file__).resolve().parent.parent / "fixtures" / "qemu-domain-logs" / "fxa.log"
QEMU = shutil.which("qemu-system-x86_64")


def test_libvirt_command_lines_round_trip_exactly():
    """Every start of the recorded domain log (libvirt 9.0 and 11.3): words and every value come back
    exactly as libvirt wrote them, JSON and keyval alike."""
    starts = domainlog.parse_domain_log(FXA)
    values = 0
    for st in starts:
        words = [f"{k}={v}" for k, v in st.env.items()] + st.argv
        cl = qargv.parse(words)
        assert cl.words() == words and cl.argv() == st.argv and dict(cl.env) == st.env
        for o in cl.options:
            v = o.parsed
            again = qargv.format_json(v.props) if v.syntax == "json" else qargv.join_keyval(v.parts)
            assert again == v.text, o
            values += o.value is not None
    assert values > 400
    syntaxes = {o.name: o.parsed.syntax for o in qargv.parse(starts[0].argv).options}
    assert syntaxes["-object"] == syntaxes["-device"] == syntaxes["-audiodev"] == "json"
    assert syntaxes["-chardev"] == syntaxes["-add-fd"] == syntaxes["-machine"] == "keyval"


@pytest.mark.parametrize("text", ["", ",", ",,", ",,,", "a,,b", "a=,b", "k,,ey=v,,al,", "=x", "a==b,c=d,,e",
                                  "path=/tmp/a,,b,append=on", "x,,=y"])
def test_keyval_split_and_join_are_inverse(text):
    v = qargv.parse_value(text, "-chardev")
    assert qargv.join_keyval(v.parts) == text


def test_keyval_escapes_implied_key_and_bare_words():
    v = qargv.parse_value("file,id=c,path=/var/tmp/a,,b,append=on,server", "-chardev")
    assert v.kind == "file" and v.props["backend"] == "file"
    assert v.get("path") == "/var/tmp/a,b" and v.get("server") == ""
    assert v.parts[0] == (None, "file")
    # without an implied key the kind is the bare word, else qom-type/driver/backend/type
    assert qargv.parse_value("secret,id=s").kind == "secret"
    assert qargv.parse_value("qom-type=secret,id=s", "-object").kind == "secret"
    assert qargv.parse_value("type=tap,id=n0", "-netdev").kind == "tap"
    # a value that only looks like JSON is keyval, as for QEMU it is an error, not an object
    assert qargv.parse_value('{"driver":', "-device").syntax == "keyval"
    assert qargv.parse_value("[1]", "-device").syntax == "keyval"


def test_updated_keeps_syntax_and_order():
    kv = qargv.parse_value("pty,id=charserial0,logfile=/dev/fdset/1,logappend=on", "-chardev")
    new = kv.updated({"backend": "file", "logfile": None, "logappend": None, "path": "/r/s.log,x"})
    assert str(new) == "file,id=charserial0,path=/r/s.log,,x" and new.get("path") == "/r/s.log,x"
    js = qargv.parse_value('{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/k","x":null}', "-object")
    assert str(js.updated({"file": "/run/q/k"})) == \
        '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/run/q/k","x":null}'
    assert str(js.updated({"format": None, "new": 1})) == '{"qom-type":"secret","id":"masterKey0","file":"/k",' \
        '"x":null,"new":1}'


def test_flags_take_no_value_and_everything_else_one():
    cl = qargv.parse(["/usr/bin/qemu-system-x86_64", "-S", "-no-acpi", "-name", "guest=g", "--nodefaults",
                      "-s", "-m", "64", "-display"])
    assert [(o.index, o.name, o.value) for o in cl.options] == [
        (1, "-S", None), (2, "-no-acpi", None), (3, "-name", "guest=g"), (5, "-nodefaults", None),
        (6, "-s", None), (7, "-m", "64"), (9, "-display", None)]
    assert cl.options[3].word == "--nodefaults"
    # an unknown option takes the next word, as QEMU's own options do (one value each)
    (o,) = qargv.parse(["qemu-system-x86_64", "-unknown-thing", "-S"]).options
    assert (o.name, o.value) == ("-unknown-thing", "-S")


def test_one_flag_table():
    """The flag table exists once: the launcher and the safety check read the model's."""
    for mod in (launch, safety):
        assert not hasattr(mod, "FLAG_OPTIONS"), mod.__name__
    assert {"-S", "-s", "-no-acpi", "-daemonize", "-no-user-config", "-nodefaults"} <= qargv.FLAG_OPTIONS
    assert "-qmp-pretty" not in qargv.FLAG_OPTIONS  # it takes a chardev, like -qmp


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
def test_flag_table_covers_this_qemu():
    """Every option the installed QEMU's -help shows without an argument is a flag of the model
    (a flag the model lacked would swallow the next option as its value)."""
    out = subprocess.run([QEMU, "-help"], capture_output=True, text=True, timeout=30).stdout
    flags = set()
    for line in out.splitlines():
        if not line.startswith("-") or line.startswith("-h or"):
            continue
        name = line.split()[0]
        if line.rstrip() == name or (len(name) < 16 and line[:16].split() == [name]):
            flags.add("-" + name.lstrip("-"))
    assert {"-S", "-nodefaults", "-daemonize"} <= flags   # the help was read
    assert flags <= qargv.FLAG_OPTIONS, flags - qargv.FLAG_OPTIONS


def test_environment_binary_positional():
    cl = qargv.parse(["LC_ALL=C", "HOME=/var/lib/libvirt/qemu/domain-1-g", "/usr/bin/qemu-system-x86_64",
                      "-m", "64", "/var/tmp/disk.img"])
    assert cl.env == (("LC_ALL", "C"), ("HOME", "/var/lib/libvirt/qemu/domain-1-g"))
    assert cl.binary == "/usr/bin/qemu-system-x86_64"
    pos = cl.options[-1]
    assert pos.positional and pos.name == "" and pos.index == 3 and pos.value is None
    # words that start with an option have no binary (a fragment, as redaction sees it)
    frag = qargv.parse(["-object", "secret,id=s,data=x"])
    assert frag.binary is None and frag.options[0].index == 0 and frag.argv() == ["-object", "secret,id=s,data=x"]
    assert qargv.is_env_word("XDG_CONFIG_HOME=/x") and not qargv.is_env_word("-name=x")


def test_shell_text_as_domxml_to_native_prints_it():
    cl = qargv.parse_shell("LC_ALL=C PATH=/usr/bin /usr/bin/qemu-system-x86_64 -name guest=g "
                           "-object '{\"qom-type\":\"secret\",\"id\":\"masterKey0\"}' -append 'console=ttyS0 quiet'")
    assert dict(cl.env) == {"LC_ALL": "C", "PATH": "/usr/bin"}
    assert cl.argv()[-2:] == ["-append", "console=ttyS0 quiet"]
    assert cl.find("-object")[0].parsed.kind == "secret"
    words, ok = qargv.shell_words("/usr/bin/qemu -append 'unterminated")
    assert not ok and words == ["/usr/bin/qemu", "-append", "'unterminated"]


def test_fds_fdsets_and_block_node_references():
    cl = qargv.parse([
        "qemu-system-x86_64",
        "-netdev", '{"type":"tap","fd":"33","vhost":true,"vhostfd":"34","id":"hostnet0"}',
        "-chardev", "pty,id=charserial0,logfile=/dev/fdset/1,logappend=on",
        "-blockdev", '{"driver":"file","filename":"/var/lib/libvirt/images/g.qcow2",'
                     '"node-name":"libvirt-1-storage","read-only":false}',
        "-blockdev", '{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2",'
                     '"file":"libvirt-1-storage","backing":null}',
        "-blockdev", '{"driver":"qcow2","node-name":"inline","file":{"driver":"file","filename":"/x"}}',
    ])
    net, chardev, storage, fmt, inline = cl.options
    assert qargv.fd_references(net.parsed) == [("fd", "33"), ("vhostfd", "34")]
    assert qargv.fdset_references(chardev.value or "") == ["1"]
    assert set(cl.block_nodes()) == {"libvirt-1-storage", "libvirt-1-format", "inline"}
    assert qargv.blockdev_references(fmt.parsed) == {"file": "libvirt-1-storage"}
    assert qargv.blockdev_references(storage.parsed) == {} and qargv.blockdev_references(inline.parsed) == {}
