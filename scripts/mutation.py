"""Mutation testing of the modules that guard safety and data (run by ``scripts/mutation``).

For each module below, mutmut (``pip install -e '.[mutation]'``) changes the named functions one small
edit at a time (an operator, a constant, a comparison, a string) and runs the module's UNIT tests
against each change; a change no test notices "survives". The report gives, per module, the mutants,
how many the tests killed, the kill rate, and every survivor with its diff — marked when it is in the
reviewed list of equivalent mutants (:data:`EQUIVALENT`: changes that cannot alter behaviour, each with
the reason). Exit 0 when every module's kill rate is at least ``--min`` (default 90 %), else 1.

The work happens in a scratch copy of the repository (``--workdir``, default a new directory under
/var/tmp, removed unless ``--keep``), so the checkout never sees mutmut's ``mutants/`` tree.

    scripts/mutation                    # all modules (about 25 minutes on 2 cores)
    scripts/mutation safety --keep      # one module, keep the scratch copy (mutmut browse there)
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEP = "ǁ"   # mutmut's separator in the names of methods' mutants: xǁClassǁmethod__mutmut_N


@dataclass(frozen=True)
class Module:
    """One module under mutation: its file, the functions mutated, and the unit tests run against them."""

    name: str
    path: str
    tests: tuple[str, ...]
    functions: tuple[str, ...]          # "func", "Class.method" or "Class.*"
    note: str = ""

    @property
    def dotted(self) -> str:
        return self.path.removesuffix(".py").replace("/", ".")

    def globs(self) -> list[str]:
        out = []
        for f in self.functions:
            if "." in f:
                cls, meth = f.split(".", 1)
                out.append(f"{self.dotted}.x{SEP}{cls}{SEP}{meth}__mutmut_*")
            else:
                out.append(f"{self.dotted}.x_{f}__mutmut_*")
        return out


MODULES = (
    Module("safety", "virtsave/qemu/safety.py",
           ("tests/unit/test_safety.py", "tests/unit/test_safety_rules.py"),
           ("*",), "the untrusted-trace check: every function"),
    Module("saveimage", "virtsave/image/saveimage.py",
           ("tests/unit/test_saveimage.py", "tests/unit/test_saveimage_bounds.py", "tests/unit/test_untrusted_xml.py"),
           ("read_header", "_check_fields", "_decode_data", "encode_header", "write_header", "finalize",
            "_Stream.*", "_Walker.*", "_find_vmdesc", "_vmsd_skip", "_plausible_header", "_read_vmdesc_from_end",
            "_parse_xml"),
           "the header codec and the stream reader's bounds checks (header, _Stream, _Walker, vmdesc)"),
    Module("diff", "virtsave/trace/diff.py",
           ("tests/unit/test_diff.py", "tests/unit/test_diff_normalize.py"),
           ("load_rules", "_type_of", "_walk", "_map_strings", "_map_fields", "_image_path_sub", "_edit", "_apply",
            "_undo_substitutions", "_rule_matches", "_normalize_message", "_message_name", "_normalize_phase",
            "_moves", "align"),
           "trace normalization and alignment"),
)

#: Survivors reviewed and judged equivalent: (module, function, mutated line as mutmut writes it) → why.
#: Keyed by the changed line, not by mutmut's number (numbers shift whenever a function changes).
_INCOMING = ("the only value the URI check accepts for incoming alone is 'defer', which the launcher's incoming "
             "rule always rewrites whole: the flag never matters here")
_BIG = "int.from_bytes defaults to big-endian (Python >= 3.11, which virtsave requires)"
_EOF = ("eof None is falsy like False: the next read asks the source once more and gets b'' again (at its end) "
        "or the data (after a seek)")
_TAIL = ("loading the tail again finds it already buffered (read_rest at the end returns the same bytes) and the "
         "same description")
_FIRST = ("index 0 then falls back to the first command, which is msgs[0] itself when msgs[0] is a command (and "
          "the fallback already when it is not)")
_COOKIE = "the cookie's NUL is searched from cookie_offset, which is at least 1: the result is never 0"
_FAST = ("the buffered fast path then takes fewer (or no) records: the general RAM loop reads the same records "
         "with the same checks and counts")
_PEEKED = "this read takes bytes peek() has just seen: it cannot run short, so its name is never shown"
_SPLIT = "only the part before the first colon is used, whatever the split limit"
_WHOLE = ("after the last non-zero byte there are only zeros: no other 0x06 can be found there, and 0x06 at index 0 "
          "has no EOF byte before it anyway")
_XMLOPT = ("with resolve_entities false (None is false too) no entity and no external DTD is loaded, so no_network "
           "has nothing to refuse")
_WINDOW = ("the description ends the stream, so a wider window, or one of 0–1 bytes read anyway, finds the same "
           "(or no) description")
_NO_QUEUE = "a missing entry gives None instead of []: both are falsy, and the next line only pops a non-empty list"
_PLACEHOLDER = ("the placeholder of a dropped command only absorbs its reply: its key, name and body are never "
                "read")
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("diff", "_message_name", 'queue = names_by_id.get(_dumps(m.get("id")), None)'): _NO_QUEUE,
    ("diff", "_message_name", 'queue = names_by_id.get(_dumps(m.get("id")), )'): _NO_QUEUE,
    ("diff", "_normalize_phase", "pending = open_by_id.get(mid, None)"): _NO_QUEUE,
    ("diff", "_normalize_phase", "pending = open_by_id.get(mid, )"): _NO_QUEUE,
    ("diff", "_normalize_phase", 'msgs = cast(None, copy.deepcopy(phase.get("messages") or []))'):
        "typing.cast does nothing at run time",
    ("diff", "_normalize_phase", "open_by_id.setdefault(mid, []).append(_Cmd(None, name, {}, None))"): _PLACEHOLDER,
    ("diff", "_normalize_phase", 'open_by_id.setdefault(mid, []).append(_Cmd("", None, {}, None))'): _PLACEHOLDER,
    ("diff", "_normalize_phase", 'open_by_id.setdefault(mid, []).append(_Cmd("", name, None, None))'): _PLACEHOLDER,
    ("diff", "_normalize_phase", 'open_by_id.setdefault(mid, []).append(_Cmd("XXXX", name, {}, None))'): _PLACEHOLDER,
    ("diff", "_undo_substitutions",
     'target = msgs[idx] if 1 <= idx < len(msgs) and msgs[idx].get("kind") == "command" else ('): _FIRST,
    ("diff", "_undo_substitutions",
     'target = msgs[idx] if 0 < idx < len(msgs) and msgs[idx].get("kind") == "command" else ('): _FIRST,
    ("diff", "align", "ops = difflib.SequenceMatcher(None, ka, kb, autojunk=None).get_opcodes()"):
        "None is falsy like False: difflib only junks popular items when autojunk is true",
    # safety
    ("safety", "_check_char_option", 'val = o.value or "XXXX"'):
        "an option without value is refused either way: neither '' nor 'XXXX' is a console target",
    ("safety", "_check_incoming", "why = _uri_problem(o.value, None)"): _INCOMING,
    ("safety", "_check_incoming", "why = _uri_problem(o.value, False)"): _INCOMING,
    ("safety", "check_trace", "out = check_argv([str(a) for a in argv], _incoming_fdsets(phases), prefixes)"):
        "the first addition to an empty list: = and += give the same list",
    ("safety", "check_trace", "if isinstance(p, str) or p:"):
        "a truthy non-string path reaches path_problem, which returns None for non-strings: no finding either way",
    ("safety", "check_trace", "why = path_problem(p, None, deny_only=True)"):
        "with deny_only the prefixes are never consulted",
    **{("safety", "_migrate_problems",
        'elif t == "file" and isinstance(addr, dict) and not _FDSET.fullmatch(str(addr.get("filename", '
        + d + '))):'):
       "a file channel without filename is refused whatever the default: no default is an fdset path"
       for d in ("None", '"XXXX"')},
    ("safety", "_uri_problem", 'scheme = uri.split(":", )[0] if ":" in uri else uri'): _SPLIT,
    **{("safety", "path_problem",
        "return f\"network storage {path.split(':', " + n + ")[0]}: reaches outside this host's files\""): _SPLIT
       for n in ("", "2")},
    ("safety", "_fdset_use_problems", 'for s in dict.fromkeys(qargv.fdset_references(o.value or "XXXX")):'):
        "an option without value names no fdset, and neither does 'XXXX'",
    ("safety", "_generic_problems", "fds = qargv.fd_references(v) if (o.value is not None) or True else []"):
        "an option without value has no fd= to find",
    # saveimage
    ("saveimage", "_plausible_header", 'return int.from_bytes(data[i + 1:i + 5], ) in known_ids'): _BIG,
    ("saveimage", "_plausible_header", 'and int.from_bytes(data[i + 6 + n:i + 10 + n], ) < 1 << 16)'): _BIG,
    ("saveimage", "_Stream.be16", "return int.from_bytes(self.read(2, what), )"): _BIG,
    ("saveimage", "_Stream.be32", "return int.from_bytes(self.read(4, what), )"): _BIG,
    ("saveimage", "_Stream.be64", "return int.from_bytes(self.read(8, what), )"): _BIG,
    ("saveimage", "_plausible_header", "n = data[i + 5] if i + 6 < len(data) else 0"):
        "when the length byte is the last one, the name after it is empty: n = 0 and n = that byte both fail "
        "the 'len(name) == n > 0' check",
    ("saveimage", "_plausible_header", "n = data[i + 5] if i + 5 < len(data) else 1"):
        "without a length byte the name is empty, so n = 1 fails 'len(name) == n' just as n = 0 fails 'n > 0'",
    ("saveimage", "_Stream.read_rest", "self.eof = None"): _EOF,
    ("saveimage", "_Stream.seek", "self.eof = None"): _EOF,
    ("saveimage", "_Walker._load_tail", "self._tail_loaded = None"): _TAIL,
    ("saveimage", "_Walker._load_tail", "self._tail_loaded = False"): _TAIL,
    ("saveimage", "_Walker._load_tail", 'self.layout = None'):
        "a stream without description is then walked by footer scan, which sets the same layout itself",
    ("saveimage", "_Walker._mapped_ram_block", 'present += int.from_bytes(chunk, ).bit_count()'):
        "the number of bits set does not depend on the byte order",
    ("saveimage", "_Walker._device", 'pat = bytes([SEC_FOOTER]) + section_id.to_bytes(4, )'): _BIG,
    ("saveimage", "_Walker._device", "self._tail_loaded = None"): _TAIL,
    ("saveimage", "_Walker._device", "self._tail_loaded = False"): _TAIL,
    ("saveimage", "_Walker._device", "i = data.find(pat, i + 2)"):
        "the footer pattern 0x7e 00 … cannot start again one byte later (its second byte is the id's high byte, 0)",
    ("saveimage", "_decode_data", "if c_end <= 0:"): _COOKIE,
    ("saveimage", "_decode_data", "if c_end < 1:"): _COOKIE,
    ("saveimage", "_Stream.read_rest", "self.eof = False"): _EOF,
    **{("saveimage", "_Walker._configuration", f"s.u8({w})"): _PEEKED for w in ('None', '"XXsubsectionXX"',
                                                                                 '"SUBSECTION"')},
    **{("saveimage", "_Walker._after_eof", f"s.u8({w})"): _PEEKED
       for w in ('None', '"XXvmstate descriptionXX"', '"VMSTATE DESCRIPTION"')},
    **{("saveimage", "_Walker._after_eof", f"s.skip(len(chunk), {w})"): _PEEKED
       for w in ('None', '"XXpaddingXX"', '"PADDING"')},
    ("saveimage", "_Walker._configuration",
     'cfg: dict[str, Any] = {"offset": at, "machine": raw.decode("ASCII", "replace"), "capabilities": [],'):
        "codec names are case-insensitive",
    ("saveimage", "_check_fields", 'raise ImageError(f"not a libvirt save image: magic {magic[:17]!r}", offset=0)'):
        "the magic field is 16 bytes long: [:16] and [:17] are the same",
    **{("saveimage", "_Walker._device", f"self.layout = self.layout or {v}"):
       "the fallback never applies: by then the layout is set (vmdesc, or footer-scan by _load_tail)"
       for v in ('"XXfooter-scanXX"', '"FOOTER-SCAN"')},
    **{("saveimage", "_find_vmdesc", line): _WHOLE for line in (
        "p = data.rfind(bytes([SEC_VMDESC]), None, end)", "p = data.rfind(bytes([SEC_VMDESC]), 0, None)",
        "p = data.rfind(bytes([SEC_VMDESC]), 0, )", "p = data.rfind(bytes([SEC_VMDESC]), 1, end)",
        "p = data.rfind(bytes([SEC_VMDESC]), None, p)", "p = data.rfind(bytes([SEC_VMDESC]), 1, p)",
        "if p - 5 <= end:", "if p + 6 <= end:", "if p + 5 < end:")},
    ("saveimage", "_find_vmdesc", 'n = int.from_bytes(data[p + 1:p + 5], )'): _BIG,
    ("saveimage", "_find_vmdesc", 'n = int.from_bytes(data[p + 2:p + 5], "big")'):
        "the same for a description under 16 MiB (the length's high byte is 0); QEMU's are a few KiB",
    **{("saveimage", "_parse_xml", line): _XMLOPT for line in (
        "return etree.fromstring(text.encode(), etree.XMLParser(resolve_entities=None, no_network=True))",
        "return etree.fromstring(text.encode(), etree.XMLParser(resolve_entities=False, no_network=None))",
        "return etree.fromstring(text.encode(), etree.XMLParser(resolve_entities=False, ))",
        "return etree.fromstring(text.encode(), etree.XMLParser(resolve_entities=False, no_network=False))")},
    **{("saveimage", "_parse_xml", line): "lxml always reports a position for a syntax error: the fallback is unused"
       for line in ("line, col = exc.position if (exc.position) or True else (1, 1)",
                    "line, col = exc.position if exc.position else (2, 1)",
                    "line, col = exc.position if exc.position else (1, 2)")},
    **{("saveimage", "_read_vmdesc_from_end", line): _WINDOW for line in (
        "window = min(size - stream_offset, 17 * 1024 * 1024)", "window = min(size - stream_offset, 16 * 1025 * 1024)",
        "window = min(size - stream_offset, 16 * 1024 * 1025)", "if window < 0:", "if window <= 1:")},
    ("saveimage", "_Stream.skip", "if n < avail:"):
        "skipping exactly what is buffered takes the other branch, which seeks by 0 (or reads nothing) to the "
        "same place",
    ("saveimage", "_Stream.string", 'return raw.decode("ASCII")'): "codec names are case-insensitive",
    **{("saveimage", "_Walker._skip_continued_pages", line): _FAST for line in (
        "page, mask, end = self.page_size, self.page_size + 1, len(s._buf)",
        "while end - pos > 8 + page:", "while end - pos >= 9 + page:", "flags = None",
        'flags = int.from_bytes(buf[pos:pos + 8], "big") | mask', "flags = int.from_bytes(buf[pos:pos + 8], ) & mask",
        'flags = int.from_bytes(buf[pos:pos - 8], "big") & mask', "if flags == RAM_PAGE & RAM_CONTINUE:",
        "elif flags == RAM_ZERO & RAM_CONTINUE:")},
    ("saveimage", "_Walker._skip_continued_pages", 'flags = int.from_bytes(buf[pos:pos + 9], "big") & mask'):
        "nine bytes shift the record's own flags into the mask (0x28 becomes 0x8__): the fast path then matches "
        "no valid record and the general RAM loop reads each one as before",

}


@dataclass
class Result:
    module: Module
    seconds: float
    status: dict[str, str] = field(default_factory=dict)      # mutant → killed/survived/…
    diffs: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # survivor → (function, -line, +line)

    def counts(self) -> tuple[int, int, int]:
        total = len(self.status)
        killed = sum(1 for s in self.status.values() if s == "killed")
        equivalent = sum(1 for m, s in self.status.items() if s != "killed" and self.equivalent(m))
        return total, killed, equivalent

    def equivalent(self, mutant: str) -> str | None:
        fn, _old, new = self.diffs.get(mutant, ("", "", ""))
        return EQUIVALENT.get((self.module.name, fn, new.strip()))


def _copy_repo(dst: Path) -> None:
    """The files of the checkout (tracked and new, not ignored) that the unit tests need."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "virtsave", "tests", "pyproject.toml",
                            "README.md", "LICENSE"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for rel in files.splitlines():
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _configure(work: Path, m: Module) -> None:
    pyproject = work / "pyproject.toml"
    text = pyproject.read_text()
    text += ("\n[tool.mutmut]\n"
             'source_paths = ["virtsave"]\n'
             f'only_mutate = ["{m.path}"]\n'
             f"pytest_add_cli_args_test_selection = {json.dumps(list(m.tests))}\n"
             'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]\n'
             "use_git_change_detection = false\n"
             # a mutant that loops forever is a kill (timeout); do not wait 15 times the tests' time for it
             "timeout_multiplier = 4.0\n")
    pyproject.write_text(text)


_STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
           36: "killed", -24: "killed", 24: "killed", 152: "killed", 255: "killed"}  # timeouts: noticed


def _functions(source: str) -> dict[str, str]:
    """Every function (module level or in a class) of a mutated file, by name, as source lines."""
    tree = ast.parse(source)
    lines = source.splitlines()
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and "__mutmut_" in node.name:
            src = lines[node.lineno - 1:node.end_lineno]    # with the signature: defaults are mutated too
            src[0] = src[0].replace(node.name, "f", 1)
            out[node.name] = "\n".join(src)
    return out


def _diffs(work: Path, m: Module, survivors: list[str]) -> dict[str, tuple[str, str, str]]:
    funcs = _functions((work / "mutants" / m.path).read_text())
    out = {}
    for name in survivors:
        short = name.rsplit(".", 1)[1]
        base = short.rsplit("__mutmut_", 1)[0]
        orig, mut = funcs.get(f"{base}__mutmut_orig", ""), funcs.get(short, "")
        minus = [ln[1:] for ln in difflib.ndiff(orig.splitlines(), mut.splitlines()) if ln.startswith("- ")]
        plus = [ln[1:] for ln in difflib.ndiff(orig.splitlines(), mut.splitlines()) if ln.startswith("+ ")]
        fn = base.removeprefix("x_").removeprefix("x" + SEP).replace(SEP, ".")
        out[name] = (fn, " / ".join(x.strip() for x in minus), " / ".join(x.strip() for x in plus))
    return out


def _recheck_survivors(m: Module, work: Path) -> list[str]:
    """In a kept copy: take the checkout's tests again and forget the verdicts on the mutants the earlier
    run left alive; returns their names, for mutmut to run those alone (the code is the same: a killed
    mutant stays killed whatever tests are added)."""
    for rel in m.tests:
        shutil.copy2(REPO / rel, work / rel)
        shutil.copy2(REPO / rel, work / "mutants" / rel)
    for cfg in (work / "pyproject.toml", work / "mutants" / "pyproject.toml"):
        if cfg.exists() and "timeout_multiplier" not in cfg.read_text():
            cfg.write_text(cfg.read_text() + "timeout_multiplier = 4.0\n")
    meta_path = work / "mutants" / f"{m.path}.meta"
    meta = json.loads(meta_path.read_text())
    alive = [k for k, v in meta["exit_code_by_key"].items()
             if _STATUS.get(v) != "killed" and any(fnmatch.fnmatch(k, g) for g in m.globs())]
    meta["exit_code_by_key"].update({k: None for k in alive})
    meta_path.write_text(json.dumps(meta))
    (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)   # new tests: which functions they reach
    return alive


def run_module(m: Module, work: Path, jobs: int, again: bool = False) -> Result:
    names = m.globs()
    if again:
        names = _recheck_survivors(m, work)
    else:
        _configure(work, m)
    log = work / f"mutmut-{m.name}{'-again' if again else ''}.log"
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with open(log, "w") as f:
        # (nothing to re-check: no run — mutmut without names would run every unchecked mutant of the file)
        cmd = [str(Path(sys.executable).with_name("mutmut")), "run", "--max-children", str(jobs), *names]
        proc = (subprocess.run(cmd, cwd=work, stdout=f, stderr=subprocess.STDOUT, env=env) if names
                else subprocess.CompletedProcess(cmd, 0))
    seconds = time.monotonic() - t0
    meta = work / "mutants" / f"{m.path}.meta"
    if proc.returncode != 0 or not meta.exists():
        raise SystemExit(f"mutation: mutmut failed on {m.name} (exit {proc.returncode}); see {log}")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    wanted = {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, g) for g in m.globs())}
    res = Result(m, seconds, {k: _STATUS.get(v, "suspicious" if v is not None else "not checked")
                              for k, v in wanted.items()})
    res.diffs = _diffs(work, m, [k for k, s in res.status.items() if s != "killed"])
    return res


def report(results: list[Result], minimum: float) -> bool:
    ok = True
    print(f"{'module':<10} {'mutants':>7} {'killed':>7} {'survived':>8} {'equiv.':>6} {'kill rate':>9} "
          f"{'w/o equiv.':>10} {'time':>7}")
    for r in results:
        total, killed, equivalent = r.counts()
        rate = killed / total if total else 1.0
        score = killed / (total - equivalent) if total - equivalent else 1.0
        ok &= rate >= minimum
        print(f"{r.module.name:<10} {total:>7} {killed:>7} {total - killed:>8} {equivalent:>6} {rate:>9.1%} "
              f"{score:>10.1%} {r.seconds:>6.0f}s")
    for r in results:
        surv = sorted((k for k, s in r.status.items() if s != "killed"),
                      key=lambda k: (r.diffs[k][0], int(k.rsplit("_", 1)[1])))
        if not surv:
            continue
        print(f"\n{r.module.name}: {len(surv)} not killed ({r.module.note})")
        for k in surv:
            _fn, old, new = r.diffs[k]
            why = r.equivalent(k)
            tag = f"equivalent: {why}" if why else r.status[k]
            print(f"  {k.rsplit('.', 1)[1]}  [{tag}]\n      - {old}\n      + {new}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", metavar="MODULE",
                    help=f"modules to mutate (default all: {', '.join(m.name for m in MODULES)})")
    ap.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    ap.add_argument("--min", type=float, default=0.90, help="lowest acceptable kill rate per module (0.90)")
    ap.add_argument("--workdir", type=Path, help="scratch directory (default: a new one under /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copies")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--again", action="store_true",
                    help="with --workdir of a kept run: re-check only its survivors against the checkout's tests")
    args = ap.parse_args()
    unknown = set(args.modules) - {m.name for m in MODULES}
    if unknown:
        ap.error(f"unknown module(s) {', '.join(sorted(unknown))}")
    chosen = [m for m in MODULES if not args.modules or m.name in args.modules]
    base = args.workdir or Path(tempfile.mkdtemp(prefix="virtsave-mutation-", dir="/var/tmp"))
    results = []
    t0 = time.monotonic()
    try:
        for m in chosen:
            work = base / m.name
            if not args.again:
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                _copy_repo(work)
            elif not (work / "mutants").is_dir():
                ap.error(f"--again needs the kept scratch copy of an earlier run in {work}")
            print(f"mutation: {m.name} ({m.path}) against {', '.join(m.tests)} …", file=sys.stderr, flush=True)
            results.append(run_module(m, work, args.jobs, args.again))
    finally:
        if not args.keep and not args.again:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"mutation: scratch copies kept in {base}", file=sys.stderr)
    ok = report(results, args.min)
    print(f"\nmutation: {time.monotonic() - t0:.0f} s in all; kill rate >= {args.min:.0%} per module: "
          f"{'yes' if ok else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({r.module.name: {"status": r.status, "seconds": r.seconds,
                                                         "counts": r.counts()} for r in results}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
