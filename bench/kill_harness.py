#!/usr/bin/env python3
"""kill -9 `gpl embed` at many moments, resume at once each time, and check that nothing is lost.

One folder of real photos (hard links to labeled_photos, several copies each, plus one corrupt
file) is embedded once without interruption (the reference). Then the same command with
--resume is started, killed with SIGKILL after a random delay (from start-up to assembly; some
kills wait for the output's .partial file, i.e. during assembly), and started again AT ONCE,
until a run is left to finish. Checked on every kill:

- no process of the killed run (its loader workers) is alive 1 s after the kill;
- the immediate resume is accepted (never "another gpl run is writing ...");

and at the end that the output equals the reference: same paths, order and failures, vectors
within 1e-5 of each row's largest value. `--load N` runs N busy processes beside it.

  python bench/kill_harness.py                      # 388 photos, 30 kills
  python bench/kill_harness.py --kills 60 --load 2
  python bench/kill_harness.py --tiny               # what the test suite runs
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gpl_cli.store.formats import read_embeddings  # noqa: E402


def build_corpus(folder: str, photos: str, copies: int, tiny: bool) -> int:
    """Hard links to the photos, `copies` times over (generated images with --tiny), plus one corrupt file."""
    os.makedirs(folder)
    if tiny:
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(48):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"g{i:03d}.png"))
        count = 48
    else:
        sources = sorted(os.path.join(d, f) for d, _, fs in os.walk(photos) for f in fs if not f.endswith(".md"))
        count = 0
        for c in range(copies):
            for src in sources:
                dst = os.path.join(folder, f"c{c}", os.path.relpath(src, photos))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy(src, dst)
                count += 1
    with open(os.path.join(folder, "corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not a jpeg")
    return count + 1


def gpl_command(corpus: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gpl_cli", "embed", corpus, "-o", out, "-p", "avg,max", "-q", *extra]


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.add(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def has_chunk(out: str) -> bool:
    journal = out + ".gpl-journal"
    return os.path.isdir(journal) and any(n.endswith(".npz") for n in os.listdir(journal))


def busy() -> None:
    while True:
        pass


class Round:
    """One `gpl embed --resume` process, its workers recorded as they appear."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.workers: set[int] = set()
        self.err = b""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        self.err = self.proc.stderr.read()

    def watch(self, seconds: float, until=None) -> bool:
        """Record workers for up to `seconds` (or until `until()`); False if the process ended."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            self.workers |= children_of(self.proc.pid)
            if until and until():
                return True
            time.sleep(0.02)
        return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", help="folder of real photos (default: labeled_photos in ../shared/data, else the "
                    "photos bundled in tests/data)")
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--load", type=int, default=0, help="busy processes beside the runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="48 generated images, 4 kills (the test suite's run)")
    args = ap.parse_args()
    if args.tiny:
        args.kills = min(args.kills, 4)
    else:
        from photos import find_photos  # bench/photos.py; here, not above, so tests can load this file alone

        args.photos = find_photos(args.photos, "kill_harness")
    rng = random.Random(args.seed)
    hogs = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.load)]
    for h in hogs:
        h.start()
    tmp = tempfile.mkdtemp(prefix="gpl-kill-")
    try:
        corpus = os.path.join(tmp, "photos")
        count = build_corpus(corpus, args.photos, args.copies, args.tiny)
        extra = ["--checkpoint-rows", "16", "--batch-size", "4"]
        ref_out = os.path.join(tmp, "reference.h5")
        start = time.monotonic()
        ref = subprocess.run(gpl_command(corpus, ref_out, *extra), capture_output=True)
        span = time.monotonic() - start
        if ref.returncode != 3:
            print(f"reference run failed ({ref.returncode}): {ref.stderr.decode()}", file=sys.stderr)
            return 1
        print(f"{count} inputs; uninterrupted run {span:.1f} s; load {args.load}; {os.cpu_count()} CPUs", flush=True)

        out = os.path.join(tmp, "out.h5")
        refused, orphans, phases = [], [], {"start-up": 0, "embedding": 0, "assembly": 0}
        kills = 0
        run = Round(gpl_command(corpus, out, "--resume", *extra))
        while kills < args.kills:
            target = rng.choice(["start-up", "embedding", "assembly"])  # the moment this kill aims at
            if target == "embedding":
                ok = run.watch(span * 1.5, lambda: has_chunk(out)) and run.watch(rng.uniform(0.0, span / 2))
            elif target == "assembly":
                ok = run.watch(span * 1.5, lambda: os.path.exists(out + ".partial"))
            else:
                ok = run.watch(rng.uniform(0.0, 4.0))
            if not ok:  # the process ended before the kill
                if b"another gpl run" in run.err:
                    refused.append(run.err.decode().strip())
                elif run.proc.returncode != 3:
                    print(f"a resume failed ({run.proc.returncode}): {run.err.decode().strip()}", file=sys.stderr)
                    return 1
                os.remove(out)  # finished: start over from scratch
                run = Round(gpl_command(corpus, out, "--resume", *extra))
                continue
            phase = ("assembly" if os.path.exists(out + ".partial") else
                     "embedding" if os.path.isdir(out + ".gpl-journal") else "start-up")
            run.proc.send_signal(signal.SIGKILL)
            run.proc.wait()
            killed = run
            run = Round(gpl_command(corpus, out, "--resume", *extra))  # at once
            kills += 1
            phases[phase] += 1
            time.sleep(1.0)
            left = [w for w in killed.workers if alive(w)]
            if left:
                orphans.append(left)
                for w in left:
                    os.kill(w, signal.SIGKILL)
        run.proc.wait()
        if b"another gpl run" in run.err:
            refused.append(run.err.decode().strip())
        final_ok = run.proc.returncode == 3
        equal = final_ok and same_output(read_embeddings(out), read_embeddings(ref_out))
        print(f"kills: {kills} ({', '.join(f'{k} {v}' for k, v in phases.items())})")
        print(f"resumes refused: {len(refused)}" + (f" (first: {refused[0]})" if refused else ""))
        print(f"kills that left a process alive 1 s later: {len(orphans)}")
        print(f"final run exit status {run.proc.returncode}; output equals the uninterrupted run: {equal}")
        if not final_ok:
            print(run.err.decode(errors="replace").strip(), file=sys.stderr)
        return 0 if equal and not refused and not orphans else 1
    finally:
        for h in hogs:
            h.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


def same_output(got, want) -> bool:
    if got.paths != want.paths or got.failures != want.failures:
        return False
    for key, rows in want.vectors.items():
        scale = np.abs(rows).max(axis=1, keepdims=True)
        if (np.abs(got.vectors[key] - rows) / np.maximum(scale, 1e-12)).max() > 1e-5:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
