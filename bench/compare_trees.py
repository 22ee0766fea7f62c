#!/usr/bin/env python3
"""`gpl embed` from two source trees, side by side in one run: did a change cost speed?

Each round runs `python -m gpl_cli embed DATA` once from each tree (the order alternating), each in a
fresh process with that tree first on PYTHONPATH, from spawn to exit, with a warm plan cache. It prints
each tree's median images/s and the ratio of this checkout to the other tree, round by round, and the CPU.

  git worktree add /tmp/before HEAD~3
  python bench/compare_trees.py /tmp/before                  # labeled_photos, 5 rounds
  python bench/compare_trees.py /tmp/before --rounds 9 --data sample_images
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from photos import find_photos
from startup import REPO, cpu_name


def count_images(folder: str) -> int:
    extensions = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
    return sum(name.lower().endswith(extensions) for _, _, files in os.walk(folder) for name in files)


def embed_seconds(tree: str, data: str, out: str) -> float:
    env = {**os.environ, "PYTHONPATH": tree}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gpl_cli", "embed", data, "-o", out, "--overwrite", "-q"], env=env,
                   cwd=tempfile.gettempdir(), check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", help="the other source tree (a git worktree of the commit to compare with)")
    parser.add_argument("--data", help="image folder (default: labeled_photos in ../shared/data, else the photos "
                        "bundled in tests/data)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    args.data = find_photos(args.data, "compare_trees")
    images = count_images(args.data)
    trees = {"this checkout": REPO, "other": os.path.abspath(args.other)}
    times: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "out.h5")
        embed_seconds(REPO, args.data, out)  # the plan cache and the page cache, warm for both
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                times[name].append(embed_seconds(trees[name], args.data, out))
            ratio = times["other"][-1] / times["this checkout"][-1]
            print(f"round {r + 1}: this checkout {images / times['this checkout'][-1]:.1f} images/s, "
                  f"other {images / times['other'][-1]:.1f} images/s, ratio {ratio:.3f}", file=sys.stderr)
    ratios = [o / t for o, t in zip(times["other"], times["this checkout"])]
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {images} images from {args.data}; {args.rounds} rounds")
    for name, seconds in times.items():
        print(f"{name:<14} {images / statistics.median(seconds):7.1f} images/s (median, spawn to exit)")
    print(f"this checkout / other: {statistics.median(ratios):.3f}x (median of per-round ratios; "
          f"range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
