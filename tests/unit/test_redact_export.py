"""virtsave.trace.redact and virtsave.trace.export: no secret survives; .replies matches libvirt's format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from virtsave.core import errors
from virtsave.libvirtd import domainlog as qemulog
from virtsave.libvirtd import logparse
from virtsave.trace import export, redact
from virtsave.trace import model as trace

FIX = Path(__file__).resolve().parent.parent / "fixtures"
SECRETS = ["hunter2", "c2VjcmV0LWRhdGE=", "spicepw", "qmp-pw", "vncpw2", "hmp-pw", "luks-pass", "rbd-key-xyz"]

XML = """<domain type='qemu'>
  <name>sec</name>
  <devices>
    <graphics type='vnc' port='-1' autoport='yes' passwd='hunter2' passwdValidTo='2030-01-01T00:00:00'/>
    <graphics type="spice" passwd="spicepw"/>
    <disk type='network'>
      <source protocol='rbd' name='pool/img'>
        <auth username='admin'><secret type='ceph' uuid='2ec115d7-3a88-3ceb-bc12-0ac909a6fd87'/></auth>
      </source>
    </disk>
    <secret>rbd-key-xyz</secret>
  </devices>
</domain>"""


def secret_trace() -> dict:
    tr = logparse.trace_from_log(FIX / "libvirt-11.3-attributed/save-bypass-cache.log")
    argv = qemulog.parse_domain_log(FIX / "qemu-domain-logs/fxa.log")[0].argv
    tr["domain"]["argv"] = [*argv,
                            "-object", '{"qom-type":"secret","id":"sec0","data":"c2VjcmV0LWRhdGE=","format":"base64"}',
                            "-object", "secret,id=sec1,data=luks-pass,format=raw",
                            "-vnc", "127.0.0.1:0,password=on",
                            "-spice", "port=5900,password=spicepw"]
    tr["domain"]["xml"] = XML
    ph = tr["phases"][0]
    extra = [
        trace.command("object-add", {"qom-type": "secret", "id": "s2", "data": "c2VjcmV0LWRhdGE="}, id="x-1"),
        trace.reply("x-1"),
        trace.command("object-add", {"qom-type": "secret", "id": "s3", "props": {"data": "luks-pass"}}, id="x-2"),
        trace.reply("x-2"),
        trace.command("set_password", {"protocol": "vnc", "password": "qmp-pw", "connected": "keep"}, id="x-3"),
        trace.reply("x-3"),
        trace.command("change-vnc-password", {"password": "vncpw2"}, id="x-4"),
        trace.reply("x-4"),
        trace.command("human-monitor-command", {"command-line": "set_password vnc hmp-pw"}, id="x-5"),
        trace.reply("x-5", ret=""),
        trace.command("blockdev-add", {"driver": "rbd", "node-name": "n", "password": "rbd-key-xyz"}, id="x-6"),
        trace.reply("x-6"),
    ]
    ph["messages"] = ph["messages"][:4] + extra + ph["messages"][4:]
    return tr


def test_redact_trace_removes_every_secret_keeps_paths():
    tr = secret_trace()
    before = json.dumps(tr)
    red = redact.redact_trace(tr)
    assert json.dumps(tr) == before                   # input untouched (a copy is returned)
    text = json.dumps(red)
    for s in SECRETS:
        assert s in before
        assert s not in text, s
    assert trace.validate(red) == []
    # file paths and references stay
    assert "/var/lib/libvirt/qemu/domain-10-fxa/master-key.aes" in text
    assert "2ec115d7-3a88-3ceb-bc12-0ac909a6fd87" in red["domain"]["xml"]
    assert "127.0.0.1:0,password=on" in red["domain"]["argv"]
    assert "passwd='&lt;redacted&gt;'" in red["domain"]["xml"]
    assert "<secret>&lt;redacted&gt;</secret>" in red["domain"]["xml"]
    cmds = {m["id"]: m for m in red["phases"][0]["messages"] if m["kind"] == "command"}
    assert cmds["x-1"]["arguments"] == {"qom-type": "secret", "id": "s2", "data": "<redacted>"}
    assert cmds["x-2"]["arguments"]["props"] == {"data": "<redacted>"}
    assert cmds["x-3"]["arguments"]["password"] == "<redacted>" and cmds["x-3"]["arguments"]["connected"] == "keep"
    assert cmds["x-5"]["arguments"]["command-line"] == "set_password vnc <redacted>"
    # unrelated content unchanged, idempotent
    assert [m["execute"] for m in red["phases"][0]["messages"] if m["kind"] == "command"] == \
        [m["execute"] for m in tr["phases"][0]["messages"] if m["kind"] == "command"]
    assert redact.redact_trace(red) == red


def test_redact_argv_forms():
    argv = ["-object", '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/k.aes"}',
            "-object", "secret,id=s,data=abc,,def,format=raw", "-drive", "file=/x,password=p1",
            "-vnc", ":0,password", "-name", "guest=g"]
    out = redact.redact_argv(argv)
    assert out[1] == argv[1]                                   # master key: file path, no data → unchanged
    assert out[3] == "secret,id=s,data=<redacted>,format=raw"
    assert out[5] == "file=/x,password=<redacted>"
    assert out[6:] == argv[6:]
    assert redact.redact_argv(None) == []


def test_redact_xml_none_and_plain():
    assert redact.redact_xml(None) is None
    plain = "<domain><name>x</name></domain>"
    assert redact.redact_xml(plain) == plain


def test_replies_format_matches_libvirt():
    tr = logparse.trace_from_log(FIX / "libvirt-9.0-attributed/managedsave-running.log")
    text = export.to_replies(tr)
    objs = export.parse_replies(text)
    cmds = [m for m in tr["phases"][0]["messages"] if m["kind"] == "command"]
    # a save phase starts mid-conversation: one qmp_capabilities pair is put first, ids renumbered from 1
    assert len(objs) == 2 * (len(cmds) + 1)
    assert [o["execute"] for o in objs[0::2]] == ["qmp_capabilities"] + [c["execute"] for c in cmds]
    assert [o["id"] for o in objs[0::2]] == [f"libvirt-{i}" for i in range(1, len(cmds) + 2)]
    assert [o["id"] for o in objs[1::2]] == [o["id"] for o in objs[0::2]]
    assert all("event" not in o for o in objs)
    assert text.startswith('{\n  "execute": "qmp_capabilities",\n  "id": "libvirt-1"\n}\n\n{\n  "return": {},\n'
                           '  "id": "libvirt-1"\n}\n\n{\n  "execute": "query-migrate",\n  "id": "libvirt-2"\n}')
    assert text.endswith("}\n") and "\n\n\n" not in text
    assert list(objs[12]) == ["execute", "arguments", "id"] and objs[12]["execute"] == "migrate"
    assert objs[10] == {"execute": "getfd", "arguments": {"fdname": "migrate"}, "id": "libvirt-6"}
    assert export.replies_stats(tr) == {"pairs": 9, "events_omitted": 6, "unanswered_omitted": 0}


def test_replies_restore_phase_select_and_errors():
    tr = logparse.trace_from_log(FIX / "libvirt-11.3-attributed/restore-sparse-parallel2.log")
    objs = export.parse_replies(export.to_replies(tr, "restore"))
    assert len(objs) == 2 * 479
    assert objs[0]["execute"] == "qmp_capabilities"
    assert objs[0]["id"] == "libvirt-1" and objs[2]["id"] == "libvirt-2"      # no extra pair: it starts there
    assert export.to_replies(tr, 0) == export.to_replies(tr)
    with pytest.raises(errors.TraceError, match="no save phase"):
        export.to_replies(tr, "save")
    with pytest.raises(errors.TraceError):
        export.to_replies(tr, 5)


def test_replies_error_reply_and_unanswered_and_redaction():
    tr = trace.new_trace("libvirt")
    ph = trace.add_phase(tr, "save", "save")
    ph["messages"] += [
        trace.command("set_password", {"protocol": "vnc", "password": "hunter2"}, id="libvirt-1"),
        trace.reply("libvirt-1", error={"class": "GenericError", "desc": "no vnc"}),
        trace.event("STOP"),
        trace.command("quit", id="libvirt-2"),
    ]
    text = export.to_replies(tr)
    assert "hunter2" not in text
    objs = export.parse_replies(text)
    assert objs == [{"execute": "qmp_capabilities", "id": "libvirt-1"}, {"return": {}, "id": "libvirt-1"},
                    {"execute": "set_password", "arguments": {"protocol": "vnc", "password": "<redacted>"},
                     "id": "libvirt-2"},
                    {"error": {"class": "GenericError", "desc": "no vnc"}, "id": "libvirt-2"}]
    assert export.replies_stats(tr) == {"pairs": 1, "events_omitted": 1, "unanswered_omitted": 1}
    empty = trace.new_trace("libvirt")
    assert export.to_replies(empty) == ""
    with pytest.raises(errors.TraceError):
        export.parse_replies("{not json")


def test_replies_ids_restart_at_each_qmp_capabilities_and_ascii():
    tr = trace.new_trace("direct")
    for name in ("save", "restore"):
        ph = trace.add_phase(tr, name, name)
        ph["messages"] += [trace.command("qmp_capabilities", id="__qmp#00001"), trace.reply("__qmp#00001"),
                           trace.command("qom-get", {"path": "/machine", "property": "été"},
                                         id="__qmp#00002"),
                           trace.reply("__qmp#00002", ret="déjà")]
    text = export.to_replies(tr)
    assert "\\u00e9t\\u00e9" in text and "é" not in text     # ASCII escapes, like json.dumps' default
    objs = export.parse_replies(text)
    assert [o["id"] for o in objs] == ["libvirt-1", "libvirt-1", "libvirt-2", "libvirt-2"] * 2
    assert export.parse_replies(export.to_replies(tr, "restore")) == objs[4:]
