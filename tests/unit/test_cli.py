"""The ``virtsave`` command itself: one-line usage errors, offline commands that never touch the
daemon, help texts in plain words, shell completion, and a few subprocess smoke tests of exit codes
(everything else runs the CLI in-process, see tests/unit/conftest.py)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer.main
from badinput import synthetic_trace, write_trace
from typer.testing import CliRunner

from tests.conftest import run_cli
from tests.unit.test_saveimage import make_image
from virtsave import __version__
from virtsave.cli import DAEMON_COMMANDS, app
from virtsave.libvirtd import logcapture

#: A domain the in-process ``test:///default`` driver always has.
TEST_URI = "test:///default"
ONE_LINE_USAGE = re.compile(r"^virtsave: error: (?P<msg>.+) \(see '(?P<cmd>virtsave[a-z -]*) --help'\)$")


def usage_error(res, command: str) -> str:  # type: ignore[no-untyped-def]
    """Exit 2 and exactly one stderr line ``virtsave: error: MSG (see 'COMMAND --help')``; returns MSG."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, f"usage error on {len(lines)} lines: {res.stderr!r}"
    m = ONE_LINE_USAGE.match(lines[0])
    assert m, lines[0]
    assert m["cmd"] == command, lines[0]
    assert res.stdout == ""
    return m["msg"]


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("args, command, words", [
    (["inspect"], "virtsave inspect", ["missing argument", "IMAGE"]),
    (["--bogus"], "virtsave", ["no such option", "--bogus"]),
    (["nocmd"], "virtsave", ["no such command", "nocmd"]),
    (["diff", "a.json"], "virtsave diff", ["missing argument", "B"]),
    (["save", "d", "f", "--parallel-channels", "many"], "virtsave save", ["invalid value", "--parallel-channels"]),
    (["managed-save", "--all", "--parallel", "0"], "virtsave managed-save", ["invalid value", "--parallel"]),
    (["export", "t.json", "--format"], "virtsave export", ["--format", "requires an argument"]),
    (["direct", "save"], "virtsave direct save", ["missing argument", "IMAGE"]),
    (["direct", "nocmd"], "virtsave direct", ["no such command", "nocmd"]),
    (["direct", "save", "i.img", "--qmp"], "virtsave direct save", ["--qmp", "requires an argument"]),
    (["-c"], "virtsave", ["-c", "requires an argument"]),
])
def test_usage_errors_are_one_line(cli, args: list[str], command: str, words: list[str]) -> None:
    msg = usage_error(cli(*args), command)
    for w in words:
        assert w in msg, (w, msg)


def test_usage_error_from_the_console_script() -> None:
    """The same line from a real process (the entry point, not only the in-process runner)."""
    usage_error(run_cli("inspect"), "virtsave inspect")


def test_bare_command_shows_help(cli) -> None:
    res = cli()
    assert "Usage: virtsave" in res.stdout + res.stderr and "Commands:" in res.stdout + res.stderr


# --------------------------------------------------------------------------- offline commands


@pytest.fixture
def repair_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str | None]]:
    """Every call of the log-settings repair (the only daemon access a command makes before its own)."""
    calls: list[str | None] = []

    def spy(uri: str | None = None, **_kw: object) -> None:
        calls.append(uri)

    monkeypatch.setattr(logcapture, "repair_if_stale", spy)
    yield calls


@pytest.fixture
def offline_inputs(tmp_path: Path) -> dict[str, Path]:
    trace = write_trace(tmp_path / "t.json", synthetic_trace())
    image = tmp_path / "i.img"
    make_image(image)
    return {"trace": trace, "image": image}


def _offline_runs(inputs: dict[str, Path]) -> list[list[str]]:
    t, i = str(inputs["trace"]), str(inputs["image"])
    return [["validate", t], ["diff", t, t], ["diff", i, i], ["inspect", i], ["export", t],
            ["--json", "inspect", i], ["--version"], ["--help"], ["list", "--help"], ["trace", "--help"]]


def test_offline_commands_never_run_the_daemon_repair(cli, repair_calls, offline_inputs) -> None:
    for args in _offline_runs(offline_inputs):
        res = cli("-c", TEST_URI, *args)
        assert res.returncode == 0, (args, res.stderr)
        assert repair_calls == [], f"virtsave {' '.join(args)} ran the libvirtd log-settings repair"
    # control: a command that talks to libvirtd does run it, with the URI given
    assert cli("-c", TEST_URI, "list").returncode == 0
    assert repair_calls == [TEST_URI]


def test_offline_commands_never_run_virt_admin(tmp_path: Path, offline_inputs) -> None:
    """End to end, in real processes: a stale capture state that only virt-admin can repair, and a
    virt-admin that records being run. Offline commands leave both alone; ``list`` (control) uses it."""
    state_dir, stubs = tmp_path / "state", tmp_path / "bin"
    state_dir.mkdir()
    stubs.mkdir()
    called = tmp_path / "virt-admin-called"
    stub = stubs / "virt-admin"
    stub.write_text(f"#!/bin/sh\necho \"$*\" >> {called}\necho 'error: no daemon here' >&2\nexit 1\n")
    stub.chmod(0o755)
    dead_pid = 2 ** 22 + 1  # above pid_max's default: no such process
    state = logcapture.State("libvirtd:///system", "3:remote", "1:file:/nonexistent/l", "1:monitor 3:remote",
                             "1:file:/nonexistent/l 1:file:/nonexistent/c", "/nonexistent/c",
                             owners=[logcapture.Owner(dead_pid, None, "dead-session")])
    (state_dir / logcapture.STATE_NAME).write_text(state.to_json())
    env = {"VIRTSAVE_STATE_DIR": str(state_dir), "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    t, i = str(offline_inputs["trace"]), str(offline_inputs["image"])
    for args in (["validate", t], ["diff", i, i], ["inspect", i], ["export", t], ["--version"]):
        res = run_cli("-c", TEST_URI, *args, env=env)
        assert res.returncode == 0, (args, res.stderr)
        assert not called.exists(), f"virtsave {' '.join(args)} ran virt-admin: {called.read_text()}"
        assert "log settings" not in res.stderr
    assert (state_dir / logcapture.STATE_NAME).exists()
    res = run_cli("-c", TEST_URI, "list", env=env)  # control: the daemon command repairs (and says so)
    assert called.exists() and "log settings" in res.stderr, res.stderr


def test_daemon_commands_are_known_commands() -> None:
    names = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert names >= DAEMON_COMMANDS
    assert not DAEMON_COMMANDS & {"diff", "inspect", "validate", "export", "replay", "direct"}


def test_unit_tests_cannot_reach_the_daemon(cli) -> None:
    """The isolation of tests/unit/conftest.py: the default URI is the in-process test driver, and
    opening the system daemon fails the test instead of touching the shared libvirtd."""
    import libvirt

    assert os.environ["LIBVIRT_DEFAULT_URI"] == TEST_URI
    with pytest.raises(pytest.fail.Exception, match="integration test"):
        libvirt.open("qemu:///system")
    with pytest.raises(pytest.fail.Exception, match="integration test"):
        cli("-c", "qemu:///system", "list")
    res = cli("--json", "list")  # default URI: the test driver's one domain
    assert res.returncode == 0 and [d["name"] for d in json.loads(res.stdout)] == ["test"], res.stderr


# --------------------------------------------------------------------------- help and completion


def _command_paths() -> list[list[str]]:
    def walk(cmd, path: list[str]) -> Iterator[list[str]]:  # type: ignore[no-untyped-def]
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])
    return list(walk(typer.main.get_command(app), []))


#: reST/Sphinx markup that must not reach a terminal: ``literal``, :role:`target`, `link`_, .. directive::
REST_MARKUP = re.compile(r"``|:[a-z]+:`|`_\b|^\s*\.\. [a-z]+::", re.MULTILINE)


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p) or "virtsave")
def test_help_is_plain_text(cli, path: list[str]) -> None:
    res = cli(*path, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"Usage: {' '.join(['virtsave', *path])}"), res.stdout[:200]
    found = REST_MARKUP.findall(res.stdout)
    assert not found, f"reST markup in 'virtsave {' '.join(path)} --help': {found}\n{res.stdout}"


def test_direct_restore_help_names_every_format(cli) -> None:
    """``direct restore`` restores every format libvirt writes (compressed ones through the decompressor):
    its help says so, and names no narrower set."""
    from virtsave.image import saveimage

    text = " ".join(cli("direct", "restore", "--help").stdout.split())
    assert all(f in text for f in saveimage.FORMATS.values()), text
    assert set(saveimage.DECOMPRESSORS) == set(saveimage.FORMATS.values()) - {"raw", "sparse"}
    assert "raw or sparse)" not in text


def test_help_check_sees_markup() -> None:
    """Control for the check above: it does catch the markup docstrings used to carry."""
    assert REST_MARKUP.search("Export (``--format replies``)") and REST_MARKUP.search("see :func:`diff`")
    assert not REST_MARKUP.search("Export a trace (--format replies: libvirt's harness); 'quoted' ok")


def test_version_in_one_place(cli) -> None:
    res = cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == __version__
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert 'dynamic = ["version"]' in project and not re.search(r"^version\s*=", project, re.MULTILINE)


def test_shell_completion_completes_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("_VIRTSAVE_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "virtsave ins")
    monkeypatch.setenv("COMP_CWORD", "1")
    res = CliRunner().invoke(app, [], prog_name="virtsave")
    assert res.exit_code == 0 and res.stdout.split() == ["inspect"], (res.exit_code, res.output)


def test_install_completion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")  # typer's switch: name the shell
    res = CliRunner().invoke(app, ["--install-completion", "bash"], prog_name="virtsave")
    assert res.exit_code == 0, res.output
    script = tmp_path / ".bash_completions" / "virtsave.sh"
    assert "_VIRTSAVE_COMPLETE=complete_bash" in script.read_text()
    assert str(script) in (tmp_path / ".bashrc").read_text()


# --------------------------------------------------------------------------- subprocess smoke tests


def test_exit_codes_of_the_real_process(tmp_path: Path) -> None:
    """0 ok, 1 differences found, 2 bad input — from the console-script entry point."""
    a = write_trace(tmp_path / "a.json", synthetic_trace())
    other = synthetic_trace()
    del other["phases"][0]["messages"][0:2]
    b = write_trace(tmp_path / "b.json", other)
    assert run_cli("--version").stdout.strip() == __version__
    assert run_cli("diff", str(a), str(a)).returncode == 0
    res = run_cli("--json", "diff", str(a), str(b))
    assert res.returncode == 1 and json.loads(res.stdout)["equivalent"] is False
    res = run_cli("validate", str(tmp_path / "missing.json"))
    assert res.returncode == 2 and res.stderr.startswith("virtsave: error: ") and len(res.stderr.splitlines()) == 1
