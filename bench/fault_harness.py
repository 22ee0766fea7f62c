#!/usr/bin/env python3
"""Make every write of every gpl writer fail, and check that nothing is lost.

A sibling of bench/kill_harness.py: instead of killing the process, strace's fault injection makes the
system refuse one write (ENOSPC, a full disk, or EIO, a failing one). Each case is a command that
replaces an earlier output (embed to h5, npy, jsonl, csv and parquet; export; whiten fit; classify;
explain's figure and --json; the HTML pages). A first run under strace lists every file and folder it
creates in its working folder (the output's temporaries, the journal and its chunks, the locks);
then, for each of them, one run fails its creation (openat, mkdir) with the first error, and one
run per error fails its writes (write, pwrite64, writev). Each such run must:

- exit with status 1 or 2, with one line and no traceback on stderr;
- leave the earlier output byte for byte as it was;
- leave no temporary (`*.partial`, `*.tmp`, `*.creating`, `*.replaced`, `*.removing`) and no journal
  without finished rows.

  python bench/fault_harness.py                 # every case, ENOSPC and EIO, a table of what held
  python bench/fault_harness.py --case embed-npy --errors ENOSPC
  python bench/fault_harness.py --list

Needs strace. Runs `--jobs` commands at a time (default 2).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "sample_images")
GPL = [sys.executable, "-m", "gpl_cli"]
LEFTOVERS = re.compile(r"\.(partial|tmp|creating|replaced|removing)$")
ERRORS = ("ENOSPC", "EIO")


@dataclass(frozen=True)
class Case:
    name: str
    command: tuple[str, ...]  # run in the case's folder, after `earlier`
    earlier: tuple[str, ...]  # what writes the earlier output (the same command on other images)
    needs: str = ""  # a module the case needs (pyarrow)


def _embed(out: str, *extra: str) -> Case:
    return Case(f"embed-{extra[1] if extra[:1] == ('--format',) else os.path.splitext(out)[1][1:]}",
                ("embed", "new", "-o", out, "-q", "--overwrite", *extra),
                ("embed", "old", "-o", out, "-q", *extra))


CASES = [
    _embed("o.h5", "-p", "avg,max"),
    _embed("o.npy", "-p", "avg,max"),
    _embed("o.jsonl"),
    _embed("o.csv"),
    _embed("shards", "--format", "parquet"),
    Case("export-npy", ("export", "e.h5", "-o", "x.npy", "--overwrite"), ("export", "e0.h5", "-o", "x.npy")),
    Case("export-h5", ("export", "e.h5", "-o", "x.h5", "--overwrite"), ("export", "e0.h5", "-o", "x.h5")),
    Case("export-csv", ("export", "e.h5", "-o", "x.csv", "--overwrite"), ("export", "e0.h5", "-o", "x.csv")),
    Case("export-parquet", ("export", "e.h5", "-o", "xs", "--format", "parquet", "--overwrite"),
         ("export", "e0.h5", "-o", "xs", "--format", "parquet"), needs="pyarrow"),
    Case("whiten-fit", ("whiten", "fit", "e.h5", "--pool", "avg", "-o", "w.npz", "--overwrite"),
         ("whiten", "fit", "e0.h5", "--pool", "avg", "-o", "w.npz")),
    Case("classify-csv", ("classify", "new", "-o", "c.csv", "-q", "--overwrite"), ("classify", "old", "-o", "c.csv", "-q")),
    Case("classify-jsonl", ("classify", "new", "-o", "c.jsonl", "-q", "--overwrite"),
         ("classify", "old", "-o", "c.jsonl", "-q")),
    Case("explain-png", ("explain", "new/a.png", "-o", "x.png", "--overwrite"), ("explain", "old/a.png", "-o", "x.png")),
    Case("explain-json", ("explain", "new/a.png", "-o", "y.png", "--json", "x.json", "--overwrite"),
         ("explain", "old/a.png", "-o", "y0.png", "--json", "x.json")),
    Case("page-outliers", ("neighbors", "e.h5", "--outliers", "-k", "2", "--top", "2", "--html", "p.html", "--overwrite"),
         ("neighbors", "e0.h5", "--outliers", "-k", "2", "--top", "2", "--html", "p.html")),
    Case("page-duplicates", ("neighbors", "e.h5", "--duplicates", "--html", "d.html", "--overwrite"),
         ("neighbors", "e0.h5", "--duplicates", "--html", "d.html")),
]


def gpl(folder: str, *args: str, strace: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*strace, *GPL, *args], cwd=folder, capture_output=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO})


def prepare(root: str) -> str:
    """The folder every case starts from: two image folders and two embeddings files made of them."""
    base = os.path.join(root, "base")
    names = sorted(n for n in os.listdir(SAMPLES) if n.lower().endswith((".png", ".jpg", ".jpeg")))
    for folder, chosen in (("old", names[:4]), ("new", names[4:8])):
        os.makedirs(os.path.join(base, folder))
        for i, name in enumerate(chosen):
            shutil.copy(os.path.join(SAMPLES, name), os.path.join(base, folder, "a.png" if i == 0 else name))
    for out, images in (("e0.h5", "old"), ("e.h5", "new")):
        proc = gpl(base, "embed", images, "-o", out, "-q", "-p", "avg,max")
        if proc.returncode != 0:
            raise SystemExit(f"preparing {out} failed: {proc.stderr.decode(errors='replace')}")
    return base


def snapshot(folder: str) -> dict[str, str]:
    """Every file under `folder` by its sha256."""
    out = {}
    for here, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(here, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def written_paths(trace: str, folder: str) -> dict[str, bool]:
    """The files and folders a traced run created or wrote in `folder`, relative to it, in order: whether
    each is a folder."""
    found: dict[str, bool] = {}
    for line in open(trace, encoding="utf-8", errors="replace"):
        m = re.search(r'(openat|open|mkdir|mkdirat)\((?:AT_FDCWD, )?"([^"]+)"(.*)', line)
        if not m or "= -1" in line:
            continue
        call, path, rest = m.groups()
        if call.startswith("open") and not re.search(r"O_WRONLY|O_RDWR|O_CREAT", rest):
            continue
        full = os.path.normpath(os.path.join(folder, path))
        if full.startswith(folder + os.sep):
            found.setdefault(os.path.relpath(full, folder), call.startswith("mkdir"))
    return found


@dataclass
class Result:
    case: str
    path: str
    fault: str
    held: bool
    why: str


def inject(case: Case, base: str, root: str, path: str, fault: str, error: str, n: int) -> Result:
    """One run of the case with `fault` (create: openat/mkdir; write: write/pwrite64/writev) failing with
    `error` on `path`, and its checks."""
    folder = os.path.join(root, f"{case.name}-{n}")
    shutil.copytree(base, folder, symlinks=True)
    syscalls = "openat,mkdir" if fault == "create" else "write,pwrite64,writev"
    # -P matches a name as given (openat) and an open descriptor by its absolute name (write)
    strace = ("strace", "-f", "--seccomp-bpf", "-qq", "-o", "/dev/null", "-P", path, "-P", os.path.join(folder, path),
              "-e", f"trace={syscalls}", "-e", f"inject={syscalls}:error={error}")
    before = snapshot(folder)
    proc = gpl(folder, *case.command, strace=strace)
    err = proc.stderr.decode(errors="replace")
    after = snapshot(folder)
    problems = []
    if proc.returncode not in (1, 2):
        problems.append(f"exit {proc.returncode}")
    if "Traceback" in err:
        problems.append("traceback")
    changed = sorted(p for p, digest in before.items() if after.get(p) != digest)
    if changed:
        problems.append(f"changed: {', '.join(changed)}")
    left = sorted(p for p in after if LEFTOVERS.search(p) or any(LEFTOVERS.search(d) for d in p.split(os.sep)[:-1]))
    left += sorted(d for d, _, fs in os.walk(folder) if d.endswith(".gpl-journal")
                   and not any(f.startswith("chunk-") for f in fs))
    if left:
        problems.append(f"left: {', '.join(os.path.relpath(p, folder) if os.path.isabs(p) else p for p in left)}")
    shutil.rmtree(folder, ignore_errors=True)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    return Result(case.name, path, f"{fault}:{error}", not problems, "; ".join(problems) or last)


def run_case(case: Case, base: str, root: str, errors: list[str], jobs: int) -> list[Result]:
    """The case's earlier output, its written paths (traced), then one failing run per path, fault and error."""
    start = os.path.join(root, f"{case.name}-start")
    shutil.copytree(base, start, symlinks=True)
    proc = gpl(start, *case.earlier)
    if proc.returncode != 0:
        raise SystemExit(f"{case.name}: the earlier output failed: {proc.stderr.decode(errors='replace')}")
    trace = os.path.join(root, f"{case.name}.trace")
    probe = os.path.join(root, f"{case.name}-probe")
    shutil.copytree(start, probe, symlinks=True)
    proc = gpl(probe, *case.command, strace=("strace", "-f", "-qq", "-o", trace, "-e", "trace=openat,open,mkdir,mkdirat"))
    if proc.returncode != 0:
        raise SystemExit(f"{case.name}: the command failed without a fault: {proc.stderr.decode(errors='replace')}")
    paths = {p: is_dir for p, is_dir in written_paths(trace, probe).items() if not p.startswith(("old", "new"))}
    shutil.rmtree(probe)
    # Creation fails alike for any error: ENOSPC alone there. A folder has no writes of its own.
    plan = [(p, "create", errors[0]) for p in paths] + [
        (p, "write", error) for p, is_dir in paths.items() if not is_dir for error in errors]
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda a: inject(case, start, root, *a[1], a[0]), enumerate(plan)))
    shutil.rmtree(start)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", help="only these cases (repeatable; default all)")
    ap.add_argument("--errors", default=",".join(ERRORS), help="errors to inject, comma-separated")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(f"{c.name}: gpl {' '.join(c.command)}" for c in CASES))
        return 0
    if shutil.which("strace") is None:
        print("needs strace", file=sys.stderr)
        return 2
    cases = [c for c in CASES if not args.case or c.name in args.case]
    unknown = set(args.case or ()) - {c.name for c in CASES}
    if unknown:
        print(f"unknown case(s): {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
        return 2
    root = tempfile.mkdtemp(prefix="gpl-fault-")
    results: list[Result] = []
    try:
        base = prepare(root)
        for case in cases:
            if case.needs:
                try:
                    __import__(case.needs)
                except ImportError:
                    print(f"{case.name}: skipped ({case.needs} is not installed)")
                    continue
            got = run_case(case, base, root, args.errors.split(","), args.jobs)
            results += got
            print(f"{case.name}: {sum(r.held for r in got)}/{len(got)} held", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'case':16} {'fault':14} {'path':38} result")
    for r in results:
        print(f"{r.case:16} {r.fault:14} {r.path:38} {'held' if r.held else 'FAILED'}: {r.why[:110]}")
    failed = [r for r in results if not r.held]
    print(f"\n{len(results) - len(failed)} of {len(results)} held")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
