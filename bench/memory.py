#!/usr/bin/env python3
"""Peak memory of `gpl embed` for a small and a ten times larger run: does it stay bounded?

Builds folders of N hard links (copies where links fail) to real photos, runs the real CLI on
each, and samples the resident memory of the gpl process and of its whole process tree
(decoding workers included) every 0.2 s. Also reports the kernel's peak for the largest
single process (wait4's ru_maxrss).

  python bench/memory.py                        # 2,000 and 20,000 images of labeled_photos
  python bench/memory.py --counts 200 2000 --photos sample_images
  python bench/memory.py -- --batch-size 8       # extra options for gpl embed after --
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from photos import find_photos

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def photos_in(folder: str) -> list[str]:
    from gpl_cli.embedding.inputs import collect_inputs

    return [it.path for it in collect_inputs([folder]).items]


def build(folder: str, sources: list[str], count: int) -> None:
    """`count` files in subfolders of 1000, cycling over `sources`."""
    for i in range(count):
        sub = os.path.join(folder, f"{i // 1000:03d}")
        os.makedirs(sub, exist_ok=True)
        src = sources[i % len(sources)]
        dst = os.path.join(sub, f"{i:06d}{os.path.splitext(src)[1]}")
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree(pid: int) -> list[int]:
    """pid and all its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children", encoding="ascii") as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def measure(folder: str, out: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "gpl_cli", "embed", folder, "-o", out, "-q", "--overwrite", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE)
    peaks = {"main": 0, "tree": 0}

    def sample() -> None:
        while proc.poll() is None:
            peaks["main"] = max(peaks["main"], rss_kib(proc.pid))
            peaks["tree"] = max(peaks["tree"], sum(rss_kib(p) for p in tree(proc.pid)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"gpl embed failed ({proc.returncode}): {err[-2000:]}")
    return {"seconds": time.perf_counter() - start, "main_mib": peaks["main"] / 1024, "tree_mib": peaks["tree"] / 1024,
            "largest_process_mib": usage.ru_maxrss / 1024, "output_mib": os.path.getsize(out) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", help="folder of real photos to link to (default: labeled_photos in "
                        "../shared/data, else the photos bundled in tests/data)")
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("extra", nargs="*", help="options passed to gpl embed (after --)")
    args = parser.parse_args()
    sources = photos_in(find_photos(args.photos, "memory"))
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpl-memory-") as tmp:
        # Both runs start from the same cached plan (measured here first), as every run after a machine's first does.
        os.environ["XDG_CACHE_HOME"] = os.path.join(tmp, "cache")
        subprocess.run([sys.executable, "-m", "gpl_cli", "tune", "--json"], cwd=REPO, check=True, capture_output=True)
        for count in args.counts:
            folder = os.path.join(tmp, f"n{count}")
            build(folder, sources, count)
            results[count] = r = measure(folder, os.path.join(tmp, f"n{count}.h5"), args.extra)
            print(f"{count:>7} images: {r['seconds']:7.1f} s, {count / r['seconds']:6.1f} images/s; peak RSS: gpl process "
                  f"{r['main_mib']:6.0f} MiB, process tree {r['tree_mib']:6.0f} MiB, largest process (kernel) "
                  f"{r['largest_process_mib']:6.0f} MiB; output {r['output_mib']:.0f} MiB", flush=True)
            shutil.rmtree(folder)
    first, last = args.counts[0], args.counts[-1]
    for k in ("main_mib", "tree_mib", "largest_process_mib"):
        print(f"{k}: {last} vs {first} images: {results[last][k] / results[first][k]:.3f}x")


if __name__ == "__main__":
    main()
