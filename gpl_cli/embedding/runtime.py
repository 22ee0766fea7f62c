"""Process-wide settings for throughput, applied by the `gpl` command before torch loads.

Both are measured in bench/RESULTS.md (`python bench/techniques.py openmp` and `... malloc`).
A variable the user has set is never overridden.
"""

from __future__ import annotations

import ctypes
import os
import signal

# libgomp's threads spin about 300,000 times waiting for work before they sleep. When cores are
# shared (with decoding workers or other jobs), a spinning thread holds a core that the thread it
# waits for needs, and throughput collapses; 1,000 spins keep most of it, at a small cost on an idle
# machine where one process runs the model on several threads (gpl's CPU default runs one thread per
# worker, where no thread waits on another). See bench/RESULTS.md, 'Speed techniques, one at a time'
# (OpenMP spin-wait). Only effective if set before torch loads.
OPENMP_ENV = {"GOMP_SPINCOUNT": "1000"}

# glibc hands blocks of 128 KiB and more (adaptively up to 32 MiB) back to the OS when they are
# freed, so every forward pass page-faults its activations in again. Keeping freed memory in the
# heap makes the model faster on CPU once a batch's buffers pass glibc's threshold (see bench/RESULTS.md,
# 'Speed techniques, one at a time': glibc malloc thresholds); memory stays at the working set's peak.
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, malloc.h
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_process() -> None:
    """Apply both settings to this process (and the workers it forks)."""
    for name, value in OPENMP_ENV.items():
        os.environ.setdefault(name, value)
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False where there is no glibc or the user set them."""
    if any(name in os.environ for name in MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


_PR_SET_PDEATHSIG = 1  # prctl option, linux/prctl.h


def die_with_parent(parent_pid: int, worker_id: int | None = None) -> None:
    """Have the kernel kill this (forked worker) process when `parent_pid` dies, even by SIGKILL.

    Without it a loader worker of a killed run can block for ever writing to a pipe nobody reads.
    Usable as a DataLoader worker_init_fn (which passes `worker_id`). The death signal follows the parent *thread*; gpl starts its workers from the main thread.
    Linux only; elsewhere the loader's own watchdog remains.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)
