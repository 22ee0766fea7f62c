#!/usr/bin/env python3
"""The duplicate threshold calibrated on labelled photos: recall per kind of edit at the calibrated threshold
(target precision 0.99) and at the uncalibrated default 0.95, from the same edited copies (bench/RESULTS.md,
'Duplicate threshold calibration'; the table in the README).

  python bench/bench_calibration.py [PHOTOS] [--sample N] [--target-precision P] [--pool avg,gem,max]

Embeds PHOTOS (default: the shared labeled_photos, else the bundled ones) with the default backbone and the
poolings given (the first is calibrated; the others are measured from the same forward pass), calibrates
(gpl_cli.analysis.duplicates.calibrate) on a sample of N photos (default: all of them, one copy of each kind
of edit per photo) and prints a Markdown table, the pooling advice and the time taken, with the CPU named.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from photos import find_photos  # noqa: E402

DEFAULT = 0.95


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        model = None
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="?")
    parser.add_argument("--sample", type=int, default=None, help="photos edited (default: all)")
    parser.add_argument("--target-precision", type=float, default=0.99)
    parser.add_argument("--pool", default="avg,gem,max")
    args = parser.parse_args()
    photos = find_photos(args.photos, "bench_calibration")

    from gpl_cli.analysis.duplicates.calibrate import calibrate, precision_recall
    from gpl_cli.embedding.runtime import tune_process

    tune_process()
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "photos.h5")
        subprocess.run([sys.executable, "-m", "gpl_cli", "embed", photos, "-o", file, "--pool", args.pool],
                       check=True, stderr=subprocess.DEVNULL)
        count = int(subprocess.run([sys.executable, "-c", "import sys; from gpl_cli.store.formats import "
                                    "read_metadata; print(read_metadata(sys.argv[1])['count'])", file],
                                   check=True, capture_output=True, text=True).stdout)
        start = time.perf_counter()
        cal = calibrate(file, target_precision=args.target_precision, sample=args.sample or count, save=False)
        seconds = time.perf_counter() - start

    negatives = np.array(cal.negative_scores)
    every = np.concatenate([k["scores"] for k in cal.per_kind.values()])
    precision, recall, false = precision_recall(every, negatives, np.array([cal.threshold, DEFAULT]))
    print(f"{cal.images} photos of {photos}, {len(every)} edited copies, {cal.negatives} nearest-distinct scores; "
          f"{cal.key} of efficientnet_lite0; {cpu_name()}; calibration {seconds:.0f} s\n")
    print(f"| kind of edit | recall at {cal.threshold:.3f} (calibrated, precision {args.target_precision:g}) "
          f"| recall at {DEFAULT} (default) |")
    print("|---|---|---|")
    for kind, k in cal.per_kind.items():
        scores = np.array(k["scores"])
        print(f"| {kind} | {(scores >= cal.threshold).mean():.2f} | {(scores >= DEFAULT).mean():.2f} |")
    print(f"| **all** | **{recall[0]:.2f}** | **{recall[1]:.2f}** |")
    print(f"| estimated precision | {precision[0]:.3f} | {precision[1]:.3f} |")
    print(f"| images whose nearest distinct image reaches it | {round(false[0] * len(negatives))} of {len(negatives)} "
          f"| {round(false[1] * len(negatives))} of {len(negatives)} |")
    print(f"\nlowest score of an unedited photo re-embedded against its own row: {cal.reproduced:.6f}")
    print(cal.advice)


if __name__ == "__main__":
    main()
