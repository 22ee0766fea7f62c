"""How to run a backbone fast on this machine: memory layout and batch size, measured.

The same network runs several times faster or slower depending on its memory layout
(NCHW or channels-last), the batch size and the precision, and which wins depends on the
backbone and the machine (on a small CPU, batches that stay in cache beat the usual 32).
So gpl measures: `measure` times the real per-batch path (`Embedder.embed_pixels`) on
synthetic images for each candidate, and the table is cached per machine in
`<user cache dir>/gpl/plans.json`, keyed by backbone, input size, device, precision, runtime (torch
or OpenVINO, with its version) and the threads the model runs on. Later runs read the cache and start at once.
A run too short to repay the measurement uses the default plan; `gpl tune` measures on demand.

With --runtime auto both runtimes are measured (OpenVINO in its one layout, NCHW), and a run takes OpenVINO
when its table says it is faster at the run's batch size by enough to repay its start: compiling the cached
conversion in each process, or converting first where nothing is cached (`repays`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from gpl_cli.atomic import atomic_file
from gpl_cli.embedding.calibration import Synthetic
from gpl_cli.embedding.embedder import Embedder
from gpl_cli.embedding.settings import RunSettings, default_batch_size
from gpl_cli.models import openvino
from gpl_cli.models.backbones import Backbone
from gpl_cli.models.inference import TRUNK_FORM
from gpl_cli.pooling.spec import parse_pool_list

CPU_BATCHES = (1, 2, 4, 8, 16, 32, 64)
GPU_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MEASURE_SECONDS = 0.3  # timed per candidate, after one warm-up batch
# Measuring costs a few seconds once per machine; below this many images it would not pay for itself.
# On a GPU, where the best batch size is worth several times the default, that is soon. On a small
# CPU the measured plan barely beats the default CPU plan (batch 4, channels-last) and measuring takes
# seconds, so only a long run repays it (see bench/RESULTS.md, 'Side by side, model loaded (the
# 2026-11-30 command)': the time measuring took and the plans it chose).
MEASURE_MIN_IMAGES = {"cpu": 20_000}
MEASURE_MIN_IMAGES_ACCELERATOR = 1000
# Rates fall off on both sides of the best batch size; two sizes in a row this far below the
# best so far end the sweep of a layout.
GIVE_UP_BELOW = 0.75
LAYOUTS = {"nchw": False, "channels_last": True}  # a timing table's layout -> channels_last
RUNTIME_LAYOUTS = {"torch": LAYOUTS, "openvino": {"nchw": False}}  # OpenVINO takes NCHW and picks its own layout
# What starting OpenVINO costs a process, beyond torch's start, in seconds (docs/speed.md, 'Runtimes': measured
# for efficientnet_lite0 on the 2-core EPYC): importing it and compiling a cached conversion, ~1 s; converting
# a backbone first, 20-30 s. A run takes OpenVINO only where the time it saves pays this back.
OPENVINO_START_SECONDS = 1.0
OPENVINO_CONVERT_SECONDS = 30.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    batch_size: int
    channels_last: bool
    source: str  # "cache", "measured", "default" or "--batch-size" (with the layout from the cache or a measurement)
    runtime: str = "torch"  # torch or openvino

    def describe(self) -> str:
        layout = f", {layout_name(self.channels_last)}" if self.runtime == "torch" else ""
        return f"batch {self.batch_size}{layout} ({self.source})"


def layout_name(channels_last: bool) -> str:
    """A memory layout as gpl shows it to people (plans, gpl tune's table and help)."""
    return "channels-last" if channels_last else "NCHW"


# A timing table: one row per candidate measured, {"layout": "nchw"|"channels_last", "batch": n, "rate": images/s}.
Table = list[dict]


def cache_file() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpl", "plans.json")


def device_name(device: torch.device, threads: int) -> str:
    """What the speed depends on: the GPU model, or the CPU model and the threads the model runs on."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return f"mps {platform.machine()}"
    return f"cpu {cpu_model()} x{threads} threads"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plan_key(backbone: Backbone, settings: RunSettings, runtime: str = "torch") -> str:
    where = f"{backbone.name} {backbone.preprocess.crop}px | {device_name(settings.device, settings.threads)}"
    if runtime == "openvino":
        return f"{where} | {settings.precision} | openvino {openvino.openvino_version()}"
    return f"{where} | {settings.precision} | torch {torch.__version__} | {TRUNK_FORM}"


def load_table(key: str) -> Table | None:
    try:
        with open(cache_file(), encoding="utf-8") as f:
            return json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None  # no cache yet, or an unreadable one that the next save replaces


def save_table(key: str, table: Table) -> None:
    path = cache_file()
    try:
        with open(path, encoding="utf-8") as f:
            plans = json.load(f)
        if not isinstance(plans, dict):
            plans = {}
    except (OSError, ValueError):
        plans = {}
    plans[key] = table
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # a temporary of this process's own: runs on the same machine may save at the same time
    with atomic_file(path, "w", overwrite=True, suffix=f".{os.getpid()}.tmp", encoding="utf-8") as f:
        json.dump(plans, f, indent=1)


def _best_time(embedder: Embedder, pixels: torch.Tensor, seconds: float) -> float:
    """The fastest of repeated batches (after a warm-up): the least disturbed by other load."""
    embedder.embed_pixels(pixels)
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        start = time.perf_counter()
        embedder.embed_pixels(pixels)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return best


@contextmanager
def torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure(backbone: Backbone, settings: RunSettings, seconds: float = MEASURE_SECONDS,
            on_row: Callable[[dict], None] | None = None, runtime: str = "torch") -> Table:
    """Time each layout of `runtime` at growing batch sizes (average pooling, random pixels, on the settings'
    device, precision and model threads) until the rate falls well below the best."""
    with torch_threads(settings.threads):
        return _measure(backbone, settings, seconds, on_row, runtime)


def _measure(backbone: Backbone, settings: RunSettings, seconds: float, on_row, runtime: str) -> Table:
    specs = parse_pool_list(["avg"])
    size = backbone.preprocess.crop
    table: Table = []
    for layout, channels_last in RUNTIME_LAYOUTS[runtime].items():
        embedder = Embedder(backbone, specs, device=settings.device, precision=settings.precision,
                            channels_last=channels_last, runtime=runtime)
        if settings.precision == "int8":  # timed on a model quantized on random pixels: as fast as any other
            embedder.quantize(Synthetic())
        best, worse = 0.0, 0
        for batch in CPU_BATCHES if embedder.device.type == "cpu" else GPU_BATCHES:
            pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
            pixels = pixels.contiguous(memory_format=torch.channels_last)  # as images.collate makes them
            try:
                rate = batch / _best_time(embedder, pixels, seconds)
            except torch.OutOfMemoryError:
                break
            row = {"runtime": runtime, "layout": layout, "batch": batch, "rate": round(rate, 2)}
            table.append(row)
            if on_row:
                on_row(row)
            worse = worse + 1 if rate < GIVE_UP_BELOW * best else 0
            best = max(best, rate)
            if worse == 2:
                break
        del embedder
    return table


def _best_row(table: Table, batch_size: int | None = None) -> dict:
    """The fastest row of `table`; with `batch_size`, the fastest at the measured batch nearest to it."""
    rows = table
    if batch_size is not None:
        nearest = min({r["batch"] for r in table}, key=lambda b: abs(b - batch_size))
        rows = [r for r in table if r["batch"] == nearest]
    return max(rows, key=lambda r: r["rate"])


def choose(table: Table, batch_size: int | None = None) -> tuple[int, bool]:
    """The fastest (batch, channels_last) in `table`; with `batch_size`, the faster layout at the
    measured batch nearest to it."""
    best = _best_row(table, batch_size)
    return (batch_size or best["batch"]), LAYOUTS[best["layout"]]


def candidate_runtimes(settings: RunSettings) -> tuple[str, ...]:
    """The runtimes a plan chooses among: the one asked for, or both under auto (settings.resolve_runtime)."""
    return ("torch", "openvino") if settings.runtime == "auto" else (settings.runtime,)


def tune(backbone: Backbone, settings: RunSettings,
         on_row: Callable[[dict], None] | None = None) -> tuple[dict[str, Table], Plan]:
    """Measure each candidate runtime now, cache its table for this machine, and return the tables with the
    plan they give a long run. Under auto, a backbone OpenVINO cannot run is said once (a warning) and
    measured on torch alone."""
    tables = {}
    for runtime in candidate_runtimes(settings):
        try:
            tables[runtime] = measure(backbone, settings, on_row=on_row, runtime=runtime)
        except openvino.Unconvertible as exc:
            if settings.runtime != "auto":
                raise
            log.warning("%s runs on torch only: %s", backbone.name, exc)
            continue
        save_table(plan_key(backbone, settings, runtime), tables[runtime])
    return tables, _plan(backbone, settings, tables, None, None, "measured")


def _plan(backbone: Backbone, settings: RunSettings, tables: dict[str, Table], batch_size: int | None,
          images: int | None, source: str) -> Plan:
    """The plan the measured `tables` give (runtime -> table; not empty) for a run of `images` (None: long)."""
    runtime = next(iter(tables))
    if settings.runtime == "auto":
        runtime = "openvino" if "torch" in tables and "openvino" in tables and repays(
            backbone, settings, _best_row(tables["torch"], batch_size)["rate"],
            _best_row(tables["openvino"], batch_size)["rate"], images) else "torch"
    batch, channels_last = choose(tables[runtime], batch_size)
    return Plan(batch, channels_last, "--batch-size" if batch_size else source, runtime)


def repays(backbone: Backbone, settings: RunSettings, torch_rate: float, openvino_rate: float,
           images: int | None) -> bool:
    """Whether OpenVINO at `openvino_rate` saves more than its start costs over `images` images (None: a run
    long enough for any start), against torch at `torch_rate` (images/s of one model copy). Each loader
    worker starts its own copy and embeds its share of the images."""
    if openvino_rate <= torch_rate:
        return False
    if images is None:
        return True
    start = OPENVINO_START_SECONDS if openvino.is_cached(openvino.trunk_parts(backbone)) else OPENVINO_CONVERT_SECONDS
    share = images / max(1, settings.workers)
    return share * (1 / torch_rate - 1 / openvino_rate) > start


def measure_min_images(device: torch.device) -> int:
    """The smallest run that measures the machine's plan before it starts (when none is cached)."""
    return MEASURE_MIN_IMAGES.get(device.type, MEASURE_MIN_IMAGES_ACCELERATOR)


def plan_run(backbone: Backbone, settings: RunSettings, batch_size: int | None, images: int) -> Plan:
    """The plan for a run of `images` images with these settings: from the cache, else a measurement when
    the run is long enough to repay it, else the default. A given `batch_size` always wins. Under
    --runtime auto, torch unless both runtimes are measured and OpenVINO's gain repays its start (`repays`)."""
    tables = {r: t for r in candidate_runtimes(settings) if (t := load_table(plan_key(backbone, settings, r)))}
    source = "cache"
    if not tables and images >= measure_min_images(settings.device):
        log.info("measuring the fastest batch size and layout for %s here (once; cached in %s)",
                 backbone.name, cache_file())
        tables, _ = tune(backbone, settings)
        source = "measured"
    if tables:
        return _plan(backbone, settings, tables, batch_size, images, source)
    runtime = "openvino" if settings.runtime == "openvino" else "torch"
    # Unmeasured: channels-last beat NCHW at every batch size for the default backbone on CPU here.
    return Plan(batch_size or default_batch_size(settings.device), settings.on_cpu and runtime == "torch",
                "--batch-size" if batch_size else "default", runtime)
