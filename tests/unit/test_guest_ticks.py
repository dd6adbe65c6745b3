"""Memory survival is judged across the save point, so a reboot can never pass for a restore."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtsave.core.errors import VirtsaveError
from virtsave.harness import guest


@pytest.fixture
def serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "serial.log"
    log.write_text("".join(f"tick {i}\n" for i in range(1, 6)))
    monkeypatch.setattr(guest, "serial_log", lambda _name: log)
    return log


def _append(log: Path, *values: int) -> None:
    with log.open("a") as f:
        f.writelines(f"tick {v}\n" for v in values)


def test_counter_going_on_is_survival(serial: Path) -> None:
    mark = guest.tick_mark("g")
    assert (mark.count, mark.last) == (5, 5)
    _append(serial, 6, 7)
    c = guest.wait_ticks_continue(mark, timeout=1)
    assert (c.last_before, c.first_after, c.restarts) == (5, 6, 0) and c.survived


def test_reboot_printed_before_the_check_is_not_survival(serial: Path) -> None:
    """The old helper looked only at ticks printed after it was called: a guest that rebooted just
    before (ticks 1, 2 already printed) gave first tick 3 and no restart. Every tick after the mark counts."""
    mark = guest.tick_mark("g")
    _append(serial, 1, 2, 3)
    c = guest.wait_ticks_continue(mark, timeout=1)
    assert c.first_after == 1 and c.restarts == 1 and not c.survived


def test_a_counter_that_went_back_is_not_survival(serial: Path) -> None:
    mark = guest.tick_mark("g")
    _append(serial, 3, 4)          # an older image: memory from before the save point
    assert not guest.wait_ticks_continue(mark, timeout=1).survived


def test_floor_for_images_made_elsewhere(serial: Path) -> None:
    mark = guest.tick_mark("g", floor=2)
    assert (mark.count, mark.last) == (5, 2)
    _append(serial, 3, 4)
    assert guest.wait_ticks_continue(mark, timeout=1).survived


def test_no_tick_after_the_mark_is_an_error(serial: Path) -> None:
    with pytest.raises(VirtsaveError, match="printed no tick"):
        guest.wait_ticks_continue(guest.tick_mark("g"), timeout=0.3)
