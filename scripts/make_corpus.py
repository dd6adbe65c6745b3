#!/usr/bin/env python3
"""Rebuild the trace corpus that ships with virtsave (``virtsave/harness/corpus/``).

Each corpus trace is one save + one restore of the recorded libvirt debug logs in
``tests/fixtures/libvirt-*-attributed/``, imported the way ``virtsave trace --from-log`` does
(:func:`virtsave.libvirtd.capture.import_log`: parsed, attributed to the domain, redacted). The QEMU
command line comes from the domain's QEMU log (``tests/fixtures/qemu-domain-logs/fxa.log``): the
fresh boot (no ``-incoming``) that was running when the save began. Host versions come from that
start's banner (the monitor-only logs of libvirt 9.0 carry none).

Run from the repository: ``.venv/bin/python scripts/make_corpus.py`` (writes compact JSON, 0644).
"""

from __future__ import annotations

import calendar
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from virtsave.libvirtd import capture, domainlog  # noqa: E402
from virtsave.trace import model as tr  # noqa: E402

FIX = REPO / "tests" / "fixtures"
OUT = REPO / "virtsave" / "harness" / "corpus"
DOMAIN_LOG = FIX / "qemu-domain-logs" / "fxa.log"
#: name, libvirt generation, domain, save log, restore log, what it is.
SCENARIOS = [
    ("libvirt-9.0-managedsave", "9.0", "fxa", "managedsave-running.log", "managedsave-restore.log",
     "virsh managedsave of a running guest, then virsh start"),
    ("libvirt-9.0-save-bypass-cache", "9.0", "fxa", "save-bypass-cache.log", "restore-bypass-cache-paused.log",
     "virsh save --bypass-cache, then virsh restore --bypass-cache --paused"),
    ("libvirt-11.3-managedsave", "11.3", "fxa", "managedsave-running.log", "managedsave-restore.log",
     "virsh managedsave of a running guest, then virsh start"),
    ("libvirt-11.3-save-bypass-cache", "11.3", "fxa", "save-bypass-cache.log", "restore-bypass-cache-paused.log",
     "virsh save --bypass-cache, then virsh restore --bypass-cache --paused"),
    ("libvirt-11.3-sparse-parallel2", "11.3", "fxc", "save-sparse-parallel2.log", "restore-sparse-parallel2.log",
     "virsh save --image-format sparse --parallel-channels 2, then virsh restore --parallel-channels 2"),
]


def _first_time(log: Path) -> float:
    stamp = log.open().readline()[:23]
    return calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + float(stamp[19:23])


def _boot_before(starts: list[domainlog.QemuStart], when: float, libvirt: str) -> domainlog.QemuStart:
    """The last fresh boot (no -incoming) of this libvirt generation begun before *when*."""
    boots = [s for s in starts if s.time <= when and "-incoming" not in s.argv
             and (s.libvirt_version or "").startswith(libvirt + ".")]
    if not boots:
        raise SystemExit(f"no libvirt {libvirt} boot before {when} in {DOMAIN_LOG}")
    return boots[-1]


def build(name: str, libvirt: str, domain: str, save_log: str, restore_log: str, what: str) -> tr.Trace:
    d = FIX / f"libvirt-{libvirt}-attributed"
    save = capture.import_log(d / save_log, domain)
    restore = capture.import_log(d / restore_log, domain)
    start = _boot_before(domainlog.parse_domain_log(DOMAIN_LOG), _first_time(d / save_log), libvirt)
    out = tr.new_trace("libvirt", host={"libvirt": start.libvirt_version, "qemu": start.qemu_version,
                                        "hostname": None},
                       domain={"name": domain, "uuid": None, "xml": None, "argv": list(start.argv)})
    out["created"] = start.time_iso[:19].replace(" ", "T") + "Z"
    out["phases"] = [next(p for p in save["phases"] if p["name"] == "save"),
                     next(p for p in restore["phases"] if p["name"] == "restore")]
    out["corpus"] = {"name": name, "scenario": what,
                     "from": [f"tests/fixtures/libvirt-{libvirt}-attributed/{save_log}",
                              f"tests/fixtures/libvirt-{libvirt}-attributed/{restore_log}",
                              f"tests/fixtures/qemu-domain-logs/fxa.log@{start.time_iso}"]}
    problems = tr.validate(out)
    if problems:
        raise SystemExit(f"{name}: invalid trace: {problems[0]}")
    return out


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for sc in SCENARIOS:
        t = build(*sc)
        path = OUT / f"{sc[0]}.json"
        path.write_text(json.dumps(t, separators=(",", ":"), sort_keys=False) + "\n")
        path.chmod(0o644)
        print(f"{path.relative_to(REPO)}: {path.stat().st_size} bytes, "
              + ", ".join(f"{p['name']} {len(p['messages'])} messages" for p in t["phases"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
