#!/usr/bin/env python3
"""Duplicate search over many vectors: exact all-pairs against the approximate IVF index, on synthetic data.

The vectors stand in for a pooled embedding after reduction to 256 dimensions: rows gathered around
N/500 class centres (cosine to their centre drawn from 0.3-0.97, so some distinct rows of a class come
close to the threshold), scaled by a random length (gpl normalises), and a share of rows (--dup-rate)
replaced by an edited copy of another row at a cosine drawn from 0.905-0.995. Reported:

- the IVF search over all N rows (gpl_cli.analysis.duplicates.pairs, index="ivf"): time, peak resident
  memory during the search (VmHWM, reset just before), pairs found;
- recall of the planted pairs, and recall against exact search for --sample random rows (each compared
  exactly with all N rows);
- exact and IVF search side by side on the first 10k, 30k, 100k rows, exact's time extrapolated to N
  (it grows with N^2), and where `index="auto"` switches.

  python bench/bench_duplicates.py                       # 1,000,000 x 256: ~300 CPU s (12 min on a loaded 2-core box)
  python bench/bench_duplicates.py --n 200000 --nprobe 8 16 --sizes 10000 30000
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from startup import cpu_name  # noqa: E402

from gpl_cli.analysis import metrics  # noqa: E402
from gpl_cli.analysis.duplicates import pairs as pairs_mod  # noqa: E402

BLOCK = 1 << 16


def toward(u: np.ndarray, cos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit rows at exactly cosine `cos` to the unit rows `u`, in a random direction otherwise."""
    w = rng.standard_normal(u.shape, dtype=np.float32)
    w -= np.einsum("ij,ij->i", w, u)[:, None] * u
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    return cos[:, None] * u + np.sqrt(1 - cos**2)[:, None] * w


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_vectors(n: int, dim: int, dup_rate: float, seed: int, clustered: bool = True) -> tuple[np.ndarray, ...]:
    """(vectors, planted original rows, planted copy rows), built a block at a time. Unclustered rows are
    random directions: no structure for k-means to find, the hardest case for an IVF index."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((max(1, n // 500), dim), dtype=np.float32))
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        if clustered:
            c = centres[rng.integers(len(centres), size=m)]
            x[start : start + m] = toward(c, rng.uniform(0.3, 0.97, m).astype(np.float32), rng)
        else:
            x[start : start + m] = unit(rng.standard_normal((m, dim), dtype=np.float32))
    copies = rng.choice(n, size=int(n * dup_rate), replace=False)
    is_copy = np.zeros(n, bool)
    is_copy[copies] = True
    originals = rng.choice(np.flatnonzero(~is_copy), size=len(copies))
    for start in range(0, len(copies), BLOCK):
        o, c = originals[start : start + BLOCK], copies[start : start + BLOCK]
        x[c] = toward(x[o], rng.uniform(0.905, 0.995, len(c)).astype(np.float32), rng)
    for start in range(0, n, BLOCK):  # lengths vary like pooled features; every search normalises
        x[start : start + BLOCK] *= rng.uniform(0.5, 20, (min(BLOCK, n - start), 1)).astype(np.float32)
    return x, originals, copies


def keys(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    return np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b)


def exact_for_rows(x: np.ndarray, rows: np.ndarray, threshold: float) -> np.ndarray:
    """Keys of every pair (row, any other row) at or above the threshold, by brute force over all N."""
    q = metrics.unit_rows(x[rows], norm_dtype=np.float32)
    found = []
    for start in range(0, len(x), BLOCK // 4):
        sims = q @ metrics.unit_rows(x[start : start + BLOCK // 4], norm_dtype=np.float32).T
        i, j = np.nonzero(sims >= threshold)
        j = j + start
        other = rows[i] != j
        found.append(keys(rows[i][other], j[other], len(x)))
    return np.unique(np.concatenate(found))


def peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident size (VmHWM)
        f.write("5")


def memory_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def timed_cpu(fn):
    """(result, wall seconds, CPU seconds of this process): on a shared machine the CPU time is the fairer figure."""
    cpu = time.process_time()
    out, wall = timed(fn)
    return out, wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="rows (default 1,000,000)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--dup-rate", type=float, default=0.02, help="share of rows that are planted copies")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[pairs_mod.NPROBE], help="IVF cells scanned per query")
    ap.add_argument("--sample", type=int, default=2000, help="rows checked against exact search over all N")
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 30_000, 100_000],
                    help="first rows for the exact / IVF side by side")
    ap.add_argument("--unclustered", action="store_true", help="random directions instead of classes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import faiss

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; numpy {np.__version__}, faiss {faiss.__version__}, "
          f"FAISS threads {faiss.omp_get_max_threads()}; load average {os.getloadavg()[0]:.1f}")
    (x, originals, copies), t_make = timed(lambda: make_vectors(args.n, args.dim, args.dup_rate, args.seed,
                                                                not args.unclustered))
    n, t = args.n, args.threshold
    print(f"{n:,} x {args.dim} float32 ({x.nbytes / 2**20:,.0f} MiB, {'random directions' if args.unclustered else 'classes'}), {len(copies):,} planted copies, "
          f"threshold {t}; made in {t_make:.1f} s")
    planted = np.unique(keys(originals, copies, n))
    sample = np.sort(np.random.default_rng(args.seed + 1).choice(n, size=min(args.sample, n), replace=False))
    truth, t_truth = timed(lambda: exact_for_rows(x, sample, t))
    print(f"exact pairs of {len(sample):,} sampled rows against all {n:,}: {len(truth):,} ({t_truth:.1f} s)")

    print("\n| N | index | nprobe | wall s | CPU s | peak RSS MiB | RSS above vectors MiB | pairs | planted recall "
          "| recall vs exact (sample) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ivf_cpu = {}
    for nprobe in args.nprobe:
        rss_before = memory_mib("VmRSS")
        peak_reset()
        found, secs, cpu = timed_cpu(lambda nprobe=nprobe: pairs_mod.similar_pairs(x, t, index="ivf", nprobe=nprobe))
        peak = memory_mib("VmHWM")
        ivf_cpu[nprobe] = cpu
        got = keys(found.a, found.b, n)
        in_sample = np.isin(found.a, sample) | np.isin(found.b, sample)
        recall_exact = np.isin(truth, got[in_sample]).mean() if len(truth) else float("nan")
        print(f"| {n:,} | ivf | {nprobe} | {secs:.1f} | {cpu:.1f} | {peak:,.0f} | {peak - rss_before:,.0f} | {len(found):,} | "
              f"{np.isin(planted, got).mean():.4f} | {recall_exact:.4f} |")
        del found, got

    print("\nexact and IVF side by side on the first rows (planted copies among them count too):")
    print(f"| N | exact wall s | exact CPU s | CPU ns per row pair | ivf wall s (nprobe {args.nprobe[0]}) | ivf CPU s "
          "| exact / ivf (CPU) | exact pairs | ivf recall | auto picks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fitted = []
    for m in [s for s in args.sizes if s <= n]:
        part = x[:m]
        exact, t_exact, c_exact = timed_cpu(lambda part=part: pairs_mod.similar_pairs(part, t, index="exact"))
        ivf, t_ivf, c_ivf = timed_cpu(lambda part=part: pairs_mod.similar_pairs(part, t, index="ivf",
                                                                              nprobe=args.nprobe[0]))
        recall = np.isin(keys(exact.a, exact.b, m), keys(ivf.a, ivf.b, m)).mean() if len(exact) else float("nan")
        auto = "exact" if pairs_mod.exact_is_practical(part) else "ivf"
        fitted.append(c_exact / m**2)
        print(f"| {m:,} | {t_exact:.1f} | {c_exact:.1f} | {c_exact / m**2 * 1e9:.1f} | {t_ivf:.1f} | {c_ivf:.1f} | "
              f"{c_exact / c_ivf:.1f}x | {len(exact):,} | {recall:.4f} | {auto} |")
    if fitted:
        per_pair = fitted[-1]  # CPU seconds; on 2 idle cores the wall time is about half
        projected = per_pair * n**2
        minute_rows = int((2 * 60 / per_pair) ** 0.5)
        switch_rows = int((pairs_mod.EXACT_MAX_WORK / args.dim) ** 0.5)
        first = ivf_cpu[args.nprobe[0]]
        print(f"\nexact at {n:,} rows, projected from the largest size (N^2): {projected:,.0f} CPU s "
              f"({projected / 3600:.1f} h), {projected / first:,.0f}x the IVF search's {first:.1f} CPU s")
        print(f"exact search takes a minute of 2 cores' time at about {minute_rows:,} rows of {args.dim}; "
              f"index='auto' switches to IVF above {switch_rows:,} rows of {args.dim} "
              f"(EXACT_MAX_WORK = {pairs_mod.EXACT_MAX_WORK:.0e} rows x rows x dimensions)")
    print(f"process peak (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB; "
          f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
