"""The shared options, result and backend interface (virtsave.core.operation), no daemon.

The libvirt backend runs on libvirt's in-process ``test:///default`` driver (real libvirt
code, no daemon); the direct backend is only constructed here (launching QEMU is for
tests/integration).
"""

from __future__ import annotations

import dataclasses

import pytest

from virtsave.core.errors import UnsupportedError
from virtsave.core.operation import Backend, ManagedSaveBackend, OpResult, SaveOptions, domain_name
from virtsave.harness import demo
from virtsave.libvirtd.backend import LibvirtBackend
from virtsave.qemu.backend import DirectBackend
from virtsave.trace import model as trace

#: The keys ``virtsave --json`` printed for each path before the two result types became one.
LIBVIRT_KEYS = ["domain", "operation", "ok", "seconds", "image", "image_size", "error", "detail"]
DIRECT_KEYS = ["operation", "image", "ok", "seconds", "image_size", "status", "stats"]


@pytest.fixture
def lv():  # type: ignore[no-untyped-def]
    b = LibvirtBackend.connect("test:///default")  # one running domain "test"; state dies with it
    yield b
    b.close()


def test_options_have_one_meaning_of_channels_and_state() -> None:
    assert SaveOptions().channels == 1 and SaveOptions(parallel_channels=1).channels == 1
    assert SaveOptions(parallel_channels=3).channels == 3
    with pytest.raises(UnsupportedError, match="≥ 1"):
        SaveOptions(parallel_channels=0)
    with pytest.raises(UnsupportedError, match="running or paused"):
        SaveOptions(state="stopped")  # type: ignore[arg-type]


def test_options_not_taken_are_refused_by_name() -> None:
    opts = SaveOptions(bypass_cache=True, image_format="zstd")
    assert opts.only("bypass_cache", "image_format", what="save") == {"bypass_cache": True, "image_format": "zstd"}
    with pytest.raises(UnsupportedError, match="restore does not take image_format"):
        opts.only("bypass_cache", what="restore")
    # an option left at its default is not "given"
    assert SaveOptions().only(what="anything") == {}


def test_result_json_keeps_each_paths_keys() -> None:
    lib = OpResult("vm", "save", True, 1.0, "/x", 10, detail={"flags": 0}, state="shut off", stats={"type": 3})
    d = lib.to_dict()
    assert list(d) == LIBVIRT_KEYS
    assert d["detail"] == {"flags": 0, "state_after": "shut off", "job": {"type": 3}}
    # no state known, no stats: the keys stay out of detail, as before
    assert OpResult("vm", "managed-save-remove", True, 0.1, detail={"removed": True}).to_dict()["detail"] == \
        {"removed": True}
    save = OpResult("vm", "save", True, 1.0, "/x", 10, state="shut off", migration="completed",
                    stats={"total-time": 5, "ram": {}}, backend="direct")
    assert list(save.to_dict()) == DIRECT_KEYS and save.to_dict()["status"] == "completed"
    restore = OpResult("vm", "restore", True, 0.5, "/x", 10, state="paused", migration="completed", backend="direct")
    assert restore.to_dict()["status"] == "paused" and restore.to_dict()["stats"] == {}


def test_domain_name() -> None:
    assert domain_name("<domain type='kvm'><name>a b</name><uuid>u</uuid></domain>") == "a b"
    assert domain_name("<domain/>") is None and domain_name(None) is None


def test_both_paths_implement_the_interface(lv) -> None:  # type: ignore[no-untyped-def]
    direct = DirectBackend(["qemu-system-x86_64", "-m", "64"])
    backends: list[Backend] = [lv, direct]
    assert all(isinstance(b, Backend) for b in backends)
    assert isinstance(lv, ManagedSaveBackend) and not isinstance(direct, ManagedSaveBackend)
    assert {b.name for b in backends} == {"libvirt", "direct"}
    with pytest.raises(Exception, match="no QEMU running"):
        _ = direct.target


def test_libvirt_backend_managed_save_cycle(lv) -> None:  # type: ignore[no-untyped-def]
    res = lv.managed_save("test")
    assert res.ok and res.backend == "libvirt" and res.state == "shut off" and res.stats is not None
    res = lv.start("test", SaveOptions(bypass_cache=False))
    assert res.ok and res.detail["from_managed_save"] is True and res.state == "running"


def test_libvirt_backend_refuses_before_acting(lv) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedError, match="libvirt managed save does not take image_format"):
        lv.managed_save("test", SaveOptions(image_format="raw"))
    assert lv.conn.lookupByName("test").isActive()  # nothing was done
    with pytest.raises(UnsupportedError, match="libvirt restore does not take image_format"):
        lv.restore("/nonexistent.save", SaveOptions(image_format="raw"))


def test_direct_restore_refuses_what_it_cannot_do() -> None:
    b = DirectBackend(["qemu-system-x86_64"])
    with pytest.raises(UnsupportedError, match="direct restore does not take xml"):
        b.restore("/nonexistent.save", SaveOptions(xml="<domain/>"))
    assert b.qemu is None


def test_demo_compares_both_paths_as_results() -> None:
    lib = trace.new_trace("libvirt", domain={"name": "g"})
    trace.add_phase(lib, "save", "managed-save")["seconds"] = 2.5
    rep = trace.new_trace("direct", domain={"name": "g"})
    rep["replay"] = {"timings": {"save": {"seconds": 0.5}}}
    ph = trace.add_phase(rep, "save", "managed-save")
    ph["ok"], ph["image"] = True, {"path": "/x.save", "size": 7}
    [lr], [dr] = demo.phase_results(lib, "libvirt").values(), demo.phase_results(rep, "direct").values()
    assert (lr.seconds, dr.seconds) == (2.5, 0.5)
    assert dataclasses.astuple(dr)[:7] == ("g", "managed-save", True, 0.5, "/x.save", 7, None)
