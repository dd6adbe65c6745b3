"""The CLI (in-process, the ``cli`` fixture) on the recorded logs in tests/fixtures: `trace --from-log`,
`validate`, `export --format replies`. No daemon needed."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from virtsave.trace import export
from virtsave.trace import model as tr

ATTR11 = "libvirt-11.3-attributed"
MONONLY = "libvirt-9.0"


def commands(phase: dict) -> list[str]:
    return [m["execute"] for m in phase["messages"] if m["kind"] == "command"]


@pytest.fixture
def two_domain_log(fixtures_dir: Path, tmp_path: Path) -> Path:
    """A monitor-only (1:monitor) log with two domains: the recorded save of one domain followed
    by the same conversation on another monitor/vm pair, as a second guest would produce."""
    text = (fixtures_dir / MONONLY / "managedsave-running.log").read_text()
    other = text.replace("0x7f06e4005180", "0x7f06e4aaaaa0").replace("0x7f06cc0346d0", "0x7f06ccbbbbb0")
    assert other != text
    path = tmp_path / "two.log"
    path.write_text(text + other)
    return path


def test_from_log_attributed_save_and_restore(cli, fixtures_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc = cli("trace", "fxa", "--from-log", str(fixtures_dir / ATTR11 / "managedsave-running.log"))
    assert proc.returncode == 0, proc.stderr
    trace = json.loads(proc.stdout)
    assert tr.validate(trace) == []
    assert trace["domain"]["name"] == "fxa"
    (save,) = trace["phases"]
    assert save["name"] == "save"
    cmds = commands(save)
    assert cmds[:2] == ["query-migrate", "stop"]
    getfd = [m for m in save["messages"] if m["kind"] == "command" and m["execute"] == "getfd"]
    assert [m.get("fds") for m in getfd] == [1]
    mig = [m for m in save["messages"] if m["kind"] == "command" and m["execute"] == "migrate"]
    assert [m["arguments"]["uri"] for m in mig] == ["fd:migrate"]

    out = tmp_path / "restore.json"
    proc = cli("trace", "fxa", "--from-log", str(fixtures_dir / ATTR11 / "managedsave-restore.log"),
               "--domain-log", str(fixtures_dir / "qemu-domain-logs" / "fxa.log"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    trace = json.loads(out.read_text())
    (restore,) = trace["phases"]
    assert restore["name"] == "restore"
    assert "migrate-incoming" in commands(restore) and commands(restore)[-1] == "cont"
    argv = trace["domain"]["argv"]
    assert argv and argv[0].endswith("qemu-system-x86_64") and "-incoming" in argv


def test_from_log_monitor_only_single_domain(cli, fixtures_dir: Path) -> None:  # type: ignore[no-untyped-def]
    proc = cli("trace", "fxa", "--from-log", str(fixtures_dir / MONONLY / "save-bypass-cache.log"))
    assert proc.returncode == 0, proc.stderr
    trace = json.loads(proc.stdout)
    assert [p["name"] for p in trace["phases"]] == ["save"]
    assert "migrate" in commands(trace["phases"][0])


def test_from_log_ambiguous_lists_monitors(cli, two_domain_log: Path) -> None:  # type: ignore[no-untyped-def]
    proc = cli("trace", "fxa", "--from-log", str(two_domain_log))
    assert proc.returncode == 2
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    err = proc.stderr
    assert "0x7f06e4005180" in err and "0x7f06e4aaaaa0" in err
    assert "--monitor" in err
    # what each monitor did is shown (its notable commands)
    assert err.count("migrate") >= 2


def test_from_log_monitor_picks_one(cli, two_domain_log: Path) -> None:  # type: ignore[no-untyped-def]
    proc = cli("trace", "fxa", "--from-log", str(two_domain_log), "--monitor", "0x7f06e4aaaaa0")
    assert proc.returncode == 0, proc.stderr
    trace = json.loads(proc.stdout)
    (save,) = trace["phases"]
    assert save["monitor"] == "0x7f06e4aaaaa0"
    assert commands(save).count("migrate") == 1
    proc = cli("trace", "fxa", "--from-log", str(two_domain_log), "--monitor", "0xdeadbeef")
    assert proc.returncode == 2 and "0xdeadbeef" in proc.stderr and "Traceback" not in proc.stderr


def test_from_log_bad_inputs(cli, tmp_path: Path, fixtures_dir: Path) -> None:  # type: ignore[no-untyped-def]
    proc = cli("trace", "fxa", "--from-log", str(tmp_path / "missing.log"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    garbage = tmp_path / "garbage.log"
    garbage.write_bytes(b"\x00\xffnot a log\n" * 100)
    proc = cli("trace", "fxa", "--from-log", str(garbage))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = cli("trace", "fxa", "--from-log", str(fixtures_dir / MONONLY / "save-bypass-cache.log"),
               "--op", "save")
    assert proc.returncode == 2 and "--from-log" in proc.stderr


def test_validate_good_and_bad(cli, fixtures_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good = tmp_path / "good.json"
    proc = cli("trace", "fxc", "--from-log", str(fixtures_dir / ATTR11 / "save-sparse-parallel2.log"),
               "-o", str(good))
    assert proc.returncode == 0, proc.stderr
    assert cli("validate", str(good)).returncode == 0

    data = json.loads(good.read_text())
    data["phases"][0]["messages"][0]["t"] = -1
    del data["domain"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    proc = cli("validate", str(bad))
    assert proc.returncode == 2
    assert "domain" in proc.stdout and "phases/0/messages/0" in proc.stdout
    assert "invalid trace (2 problems)" in proc.stderr

    future = dict(json.loads(good.read_text()), version=99)
    (tmp_path / "future.json").write_text(json.dumps(future))
    proc = cli("validate", str(tmp_path / "future.json"))
    assert proc.returncode == 2 and "newer" in proc.stdout

    (tmp_path / "notjson.json").write_text("{nope")
    proc = cli("validate", str(tmp_path / "notjson.json"))
    assert proc.returncode == 2 and "not valid JSON" in proc.stdout and "Traceback" not in proc.stderr
    proc = cli("--json", "validate", str(good))
    assert proc.returncode == 0 and json.loads(proc.stdout)["valid"] is True


def test_export_replies(cli, fixtures_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    t = tmp_path / "t.json"
    assert cli("trace", "fxa", "--from-log", str(fixtures_dir / ATTR11 / "managedsave-running.log"),
               "-o", str(t)).returncode == 0
    proc = cli("export", str(t), "--format", "replies")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == export.to_replies(tr.load(t))
    blocks = [b for b in proc.stdout.split("\n\n") if b.strip()]
    first, second = json.loads(blocks[0]), json.loads(blocks[2])
    assert first == {"execute": "qmp_capabilities", "id": "libvirt-1"}   # the save phase starts mid-conversation
    assert second["execute"] == "query-migrate" and second["id"] == "libvirt-2"
    assert any(json.loads(b).get("execute") == "migrate" for b in blocks)
    out = tmp_path / "t.replies"
    assert cli("export", str(t), "--format", "replies", "-o", str(out)).returncode == 0
    assert out.read_text() == proc.stdout and stat.S_IMODE(out.stat().st_mode) == 0o600
    proc = cli("export", str(t), "--format", "xml")
    assert proc.returncode == 2 and "--format" in proc.stderr
