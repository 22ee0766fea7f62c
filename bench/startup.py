#!/usr/bin/env python3
"""Start-up cost of gpl's commands beside `python -c "import torch"`, measured side by side.

Each command runs in a fresh process; the commands alternate within each round (the order
rotated), and the table gives the median of the rounds and each command's ratio to `import torch`
measured in the same rounds. The plan cache is warmed first (one `gpl embed` of the image), as every
run after a machine's first finds it.

With --cutover it measures instead what loader workers cost or gain by the size of the run:
`gpl embed` of N photos in-process (--workers 0) beside the same with one worker per core, for
several N, which is how settings.IN_PROCESS_BELOW was chosen.

  python bench/startup.py                 # 5 rounds
  python bench/startup.py --rounds 9
  python bench/startup.py --cutover       # workers or not, by run size
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(REPO, "sample_images", "coffee.png")
CUTOVER_SIZES = (1, 8, 32, 64, 128, 194, 388, 776)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def commands(tmp: str) -> dict[str, list[str]]:
    py, gpl = sys.executable, [sys.executable, "-m", "gpl_cli"]
    emb = os.path.join(tmp, "base.h5")
    return {
        "import torch": [py, "-c", "import torch"],
        "import torch, torchvision": [py, "-c", "import torch, torchvision"],
        "import torch, torchvision, timm": [py, "-c", "import torch, torchvision, timm"],
        "gpl --help": [*gpl, "--help"],
        "gpl pools": [*gpl, "pools"],
        "gpl info FILE": [*gpl, "info", emb],
        "gpl neighbors FILE PATH": [*gpl, "neighbors", emb, "coffee.png", "-k", "3"],
        "gpl neighbors FILE NEW.jpg": [*gpl, "neighbors", emb, os.path.join(tmp, "new.png"), "-k", "3"],
        "gpl embed ONE.png": [*gpl, "embed", IMAGE, "-o", os.path.join(tmp, "one.h5"), "--overwrite", "-q"],
    }


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-400:]}")
    return elapsed


def photo_folder(root: str, n: int) -> str:
    """A folder of n labeled photos, repeated (as hard links or copies) when n exceeds them."""
    from memory import build, photos_in  # bench/memory.py, beside this script
    from photos import find_photos

    folder = os.path.join(root, f"photos-{n}")
    build(folder, photos_in(find_photos(None, "startup")), n)
    return folder


def cutover(rounds: int, tmp: str) -> None:
    """Seconds of `gpl embed` on N photos with and without loader workers, alternating, per N."""
    gpl = [sys.executable, "-m", "gpl_cli", "embed"]
    default_workers = min(os.cpu_count() or 1, 8)  # settings.default_workers on a CPU, without importing torch
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; gpl embed of N photos, median of {rounds} alternating rounds")
    print(f"{'N':>5s} {'in-process s':>13s} {f'{default_workers} workers s':>12s} {'workers / in-process':>21s}")
    for n in CUTOVER_SIZES:
        folder = photo_folder(tmp, n)
        out = os.path.join(tmp, "cut.h5")
        runs = {w: [*gpl, folder, "-o", out, "--overwrite", "-q", "--workers", str(w)] for w in (0, default_workers)}
        times: dict[int, list[float]] = {w: [] for w in runs}
        for r in range(rounds):
            for w in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                times[w].append(timed(runs[w]))
        a, b = (statistics.median(times[w]) for w in runs)
        print(f"{n:5d} {a:13.2f} {b:12.2f} {b / a:21.2f}", flush=True)
        shutil.rmtree(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cutover", action="store_true", help="workers or not, by the number of images")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gpl-startup-")
    try:
        if args.cutover:
            cutover(args.rounds, tmp)
            return 0
        shutil.copy(IMAGE, os.path.join(tmp, "new.png"))
        warm = [sys.executable, "-m", "gpl_cli", "embed", os.path.join(REPO, "sample_images"), "-o",
                os.path.join(tmp, "base.h5"), "-q"]
        subprocess.run(warm, check=True, stderr=subprocess.DEVNULL)  # the file the commands read; plan cached
        cmds = commands(tmp)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        ratios: dict[str, list[float]] = {name: [] for name in cmds}
        names = list(cmds)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            got = {name: timed(cmds[name]) for name in order}
            for name, seconds in got.items():
                times[name].append(seconds)
                ratios[name].append(seconds / got["import torch"])
        print(f"{cpu_name()}, {os.cpu_count()} CPUs; median of {args.rounds} alternating rounds")
        print(f"{'command':30s} {'seconds':>8s} {'x import torch':>15s} {'- import torch':>15s}")
        base = statistics.median(times["import torch"])
        for name in names:
            med = statistics.median(times[name])
            print(f"{name:30s} {med:8.2f} {statistics.median(ratios[name]):15.2f} {med - base:+15.2f}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
