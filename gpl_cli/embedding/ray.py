"""`gpl embed --engine ray`: the local engine's work, scheduled by Ray Data across a cluster.

One Ray Data pipeline per run:

    (index, path) rows -> decode + preprocess      CPU tasks: images.load_sample, as in DataLoader workers
                       -> trunk + every pooling    a pool of model actors: Embedder.embed_batch, as locally
                       -> this process             rows put back in input order, handed to the sink

Only the vectors (a few KB per image) come back to the driver; pixels stay on the workers.
The driver feeds the same sink the local engine feeds (job.py: journal, resume, assembly,
every output format), so the two engines differ in scheduling only. Ray is imported lazily:
it is an optional extra.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager

import numpy as np

from gpl_cli.embedding.config import RayOptions
from gpl_cli.embedding.embedder import Embedder
from gpl_cli.embedding.engine import Summary, deliver
from gpl_cli.embedding.images import (
    Failure,
    Preprocess,
    Sample,
    collate,
    draft_min_side,
    load_sample,
    pixels_from_bytes,
    pixels_to_bytes,
)
from gpl_cli.embedding.inputs import InputItem
from gpl_cli.embedding.settings import RunSettings
from gpl_cli.errors import EXIT_FAILURE, GplError, missing
from gpl_cli.store.sink import Sink

RAY_MISSING = missing("--engine ray needs Ray", "'ray[data]'", "ray")
# A decode task reserves half a CPU: decoding waits on storage as much as it computes, and a
# reservation unlike the model actors' keeps Ray Data from fusing the two stages into one
# (it fuses map stages with equal resources: ray-project/ray#54433).
DECODE_CPUS = 0.5
BATCHES_PER_BLOCK = 4  # input rows per Ray block, in batches: one decode task's work


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise GplError(RAY_MISSING) from None
    return ray


def joined_ray(address: str | None):
    """Ray for a run: the instance this process already joined, else the cluster at `address`.

    Without an address Ray's own rule applies: RAY_ADDRESS, else a `ray start` cluster on this
    machine, else a new local instance. The session then lasts as long as this process (Ray stops it
    at exit), and later runs in the process use it: Ray does not support being started again in one
    process, as the first session's native threads outlive ray.shutdown() (ray-project/ray#31145).
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    # Workers' output is not relayed: this process's stdout carries data only. Ray's own logs go to stderr.
    settings = {"log_to_driver": False, "logging_level": logging.WARNING}
    if not address:
        settings["include_dashboard"] = False
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with _quiet(_TOKEN_NOTICE):
            ray.init(address=address, **settings)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise GplError(f"cannot start or reach Ray (--ray-address {address or 'none: local instance'}): {exc}") from None
    finally:
        # ray.init makes SIGTERM exit at once; gpl's handler stops after the rows in hand and keeps them
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
    return ray


# Ray's notices about its own defaults, not about the run: that a new local instance uses token authentication
# (it does, as Ray's default; the token lives in ~/.ray), and that Ray Data's progress bars are off (gpl shows its
# own). Their loggers are raised to ERROR while gpl uses Ray, so errors from the same places still show.
_TOKEN_NOTICE = "ray._private.authentication.authentication_token_setup"
_PROGRESS_NOTICE = "ray.data._internal.progress"


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Logger `name` passes only errors in the block."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextmanager
def _data_context(ray) -> Iterator:
    """Ray Data settings for one run, restored after it.

    preserve_order: blocks come back in input order, so rows reach the journal steadily from the
    start instead of waiting behind one slow early block (InOrder still checks and restores the
    order; it does not depend on this). No Ray progress bars (gpl shows one), no per-run INFO lines.
    """
    ctx = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    previous = ctx.enable_progress_bars, ctx.execution_options.preserve_order, logger.level
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        with _quiet(_PROGRESS_NOTICE):
            yield ctx
    finally:
        ctx.enable_progress_bars, ctx.execution_options.preserve_order, _ = previous
        logger.setLevel(previous[2])


def actor_pool_size(resources: dict[str, float], device: str, options: RayOptions) -> tuple[int, float]:
    """(model actors, GPUs per actor) for a cluster with `resources` (ray.cluster_resources()).

    One actor per GPU when the cluster has GPUs (unless --device cpu); without GPUs, half the
    cluster's CPUs run model actors and the rest decode. --concurrency and --num-gpus override.
    """
    gpus = resources.get("GPU", 0.0)
    cpus = resources.get("CPU", 1.0)
    if device == "cpu":
        if options.num_gpus:
            raise GplError("--num-gpus asks for GPUs but --device cpu forbids them")
        num_gpus = 0.0
    else:
        num_gpus = options.num_gpus if options.num_gpus is not None else (1.0 if gpus else 0.0)
    if device == "cuda" and not num_gpus:
        raise GplError("--device cuda: the Ray cluster has no GPUs (or --num-gpus 0 was given)")
    if num_gpus > gpus:
        raise GplError(f"--num-gpus {num_gpus:g} per model actor, but the Ray cluster has {gpus:g} GPUs")
    if options.concurrency:
        return options.concurrency, num_gpus
    if num_gpus:
        return max(1, int(gpus // num_gpus)), num_gpus
    return max(1, int(cpus) // 2), num_gpus


def decode_stage(batch: dict[str, np.ndarray], pre: Preprocess, timeout: float | None,
                 min_side: int | None) -> dict[str, np.ndarray]:
    """CPU stage: each path decoded and preprocessed as locally; a failure travels as its reason. An image
    inside a tar shard or parquet file is read by its source (pickled), with gpl's own reader, as locally.

    Pixels travel as raw bytes plus their shape (3 numbers per scale), since shapes differ under --resize
    keep-aspect.
    """
    samples = [load_sample(int(i), os.fsdecode(bytes(p)), pre, timeout, min_side, pickle.loads(bytes(s)) if s else None)
               for i, p, s in zip(batch["index"], batch["path"], batch["source"])]
    packed = [(b"", [0, 0, 0] * len(pre.scales)) if s.failure else pixels_to_bytes(s.pixels) for s in samples]
    return {
        "index": np.asarray(batch["index"], np.int64),
        "pixels": _objects([data for data, _ in packed]),
        "shape": np.array([shape for _, shape in packed], np.int64).reshape(len(samples), 3 * len(pre.scales)),
        "error": _objects([s.failure.reason if s.failure else "" for s in samples]),
        "stat": np.array([s.stat for s in samples], np.int64).reshape(-1, 2),
    }


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


class ModelActor:
    """Model stage: one Embedder per actor, on the actor's device; rows that failed to decode pass through."""

    def __init__(self, embedder: Embedder, device: str):
        self.embedder = embedder.on_device(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        samples = [
            Sample(int(i), pixels_from_bytes(px, shape), None)
            for i, px, shape in zip(batch["index"][ok], batch["pixels"][ok], batch["shape"][ok])
        ]
        done = self.embedder.embedded(collate(samples)) if samples else None
        vectors = done.vectors if done else {}
        out = {"index": batch["index"], "error": batch["error"], "stat": batch["stat"]}
        # Each scale's model time, spread over the batch's rows: the driver sums it per scale.
        for j, label in enumerate(self.embedder.scale_seconds):
            out[f"t{j}"] = np.full(len(ok), done.scale_seconds[label] / len(ok) if done else 0.0)
        for j, (key, dim) in enumerate(self.embedder.dims.items()):
            column = np.zeros((len(ok), dim), np.float32)
            if samples:
                column[ok] = vectors[key]
            out[f"v{j}"] = column
        return out


class InOrder:
    """Results that arrive in any order, released in input order (0, 1, 2, ...) as soon as they can be."""

    def __init__(self):
        self.next = 0
        self.waiting: dict[int, object] = {}

    def add(self, index: int, value) -> None:
        self.waiting[index] = value

    def release(self) -> list[tuple[int, object]]:
        out = []
        while self.next in self.waiting:
            out.append((self.next, self.waiting.pop(self.next)))
            self.next += 1
        return out


def build_dataset(ray, embedder: Embedder, items: list[InputItem], settings: RunSettings, options: RayOptions,
                  device: str):
    """The Ray Data pipeline over `items`; each output row carries its input index, error and vectors.

    The driver's Embedder (on the CPU) travels to each model actor, which moves it to its own device:
    the actors run exactly the weights the output's metadata names, and need no model download.
    """
    import pyarrow as pa

    actors, num_gpus = actor_pool_size(ray.cluster_resources(), device, options)
    rows = settings.batch_size * BATCHES_PER_BLOCK
    blocks = [
        pa.table({
            "index": pa.array(range(start, min(start + rows, len(items))), pa.int64()),
            "path": pa.array([os.fsencode(it.path) for it in items[start:start + rows]], pa.binary()),
            "source": pa.array([pickle.dumps(it.source) if it.source else b"" for it in items[start:start + rows]],
                               pa.binary()),
        })
        for start in range(0, len(items), rows)
    ]
    # max_restarts=0: a model actor that dies ends the run with its error, every finished row kept in the journal
    # for --resume. Ray Data's default re-creates it and retries its batches without limit (a batch that kills its
    # actor each time never ends), and makes Ray's core print an error line about re-creation on every run. Ray
    # 2.60 calls such extra arguments of map_batches deprecated but names no parameter that replaces this one.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        return (
            ray.data.from_arrow(blocks)
            .map_batches(decode_stage,
                         fn_kwargs={"pre": embedder.preprocess, "timeout": settings.timeout,
                                    "min_side": draft_min_side(embedder.preprocess, embedder.jpeg_draft)},
                         batch_size=settings.batch_size, batch_format="numpy", num_cpus=DECODE_CPUS)
            .map_batches(ModelActor, fn_constructor_kwargs={"embedder": embedder, "device": device},
                         batch_size=settings.batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=num_gpus, max_restarts=0)
        )


class RayEngine:
    """The Engine protocol (engine.Engine) executed on Ray; `embedder` is the driver's copy (on the CPU),
    `device` the one the user asked the model actors to run on (auto, cpu, cuda)."""

    def __init__(self, embedder: Embedder, options: RayOptions, device: str = "auto"):
        self.embedder = embedder
        self.options = options
        self.device = device

    def run(
        self,
        items: list[InputItem],
        sink: Sink,
        settings: RunSettings,
        on_failure: Callable[[Failure], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Summary:
        """Embed `items`; the sink sees failures and rows in input order, as from the local engine."""
        summary = Summary(dims=self.embedder.dims, execution="Ray: decode tasks, model actors",
                          scale_seconds=dict.fromkeys(self.embedder.scale_seconds, 0.0))
        start = time.perf_counter()
        if items:  # nothing left to do (a finished --resume) needs no cluster
            ray = joined_ray(self.options.address)
            dataset = build_dataset(ray, self.embedder, items, settings, self.options, self.device)
            # closed here, not when the garbage collector finds it: a run that stops early (an error, an
            # interrupt) releases its actors and the CPUs they hold before it returns
            with _data_context(ray), closing(iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))) as blocks:
                order = InOrder()
                try:
                    for block in blocks:
                        vectors = [block[f"v{j}"] for j in range(len(self.embedder.dims))]
                        for j, label in enumerate(summary.scale_seconds):
                            summary.scale_seconds[label] += float(block[f"t{j}"].sum())
                        for r, index in enumerate(block["index"]):
                            order.add(int(index), (block["error"][r], [v[r] for v in vectors], tuple(block["stat"][r])))
                        self._deliver(order.release(), items, sink, summary, on_failure, on_progress)
                except ray.exceptions.RayError as exc:
                    raise GplError(f"the Ray run failed: {_last_line(exc)}", EXIT_FAILURE) from None
                if order.waiting or order.next != len(items):
                    raise RuntimeError(f"internal error: Ray returned {order.next} of {len(items)} rows in order")
        summary.seconds = time.perf_counter() - start
        return summary

    def _deliver(self, released, items, sink, summary, on_failure, on_progress) -> None:
        """Released rows to the sink as one group: its failures, then its rows (as a local batch)."""
        if not released:
            return
        failures = [(i, Failure(items[i].path, error)) for i, (error, _, _) in released if error]
        done = [(i, row, stat) for i, (error, row, stat) in released if not error]
        vectors = {key: np.stack([r[j] for _, r, _ in done]) for j, key in enumerate(self.embedder.dims)} if done else {}
        deliver(items, sink, summary, on_failure, failures, [i for i, _, _ in done], vectors,
                [(int(a), int(b)) for _, _, (a, b) in done])
        if on_progress:
            on_progress(len(released))


def _last_line(exc: BaseException) -> str:
    """The cause of a Ray error: its message ends with the remote exception, after the remote traceback."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__

