"""The embedding engine: batches of images through the trunk and every pooling at once.

One forward pass of the backbone feeds all requested poolings. Decoding runs in
DataLoader workers; on a CPU each worker also runs the model on its own batches (one
thread each: `WorkerEmbedding`), with an accelerator the main process does. Pixels travel as uint8 and are
normalised on the model's device, in the memory layout the trunk runs fastest in. The
trunk may compute in bfloat16 or float16 (autocast); pooling always runs in float32.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
import torch

from gpl_cli.backbones import Backbone, load_backbone
from gpl_cli.config import EmbedConfig
from gpl_cli.images import Batch, Failure, ImageDataset, Preprocess, collate
from gpl_cli.inference import prepare_trunk
from gpl_cli.inputs import InputItem
from gpl_cli.outputs import Sink
from gpl_cli.pooling import pool
from gpl_cli.poolspec import PoolSpec, out_dims
from gpl_cli.postprocess import Projection, postprocess
from gpl_cli.runtime import die_with_parent
from gpl_cli.settings import RunSettings, check_precision, resolve_device
from gpl_cli.whiten import load_whitening, match_whitenings

if TYPE_CHECKING:  # ray_engine imports this module
    from gpl_cli.ray_engine import RayOptions




@dataclass
class RunOptions:
    """How a run is executed, as asked for (gpl_cli.settings resolves it for this machine); none of it
    changes the vectors."""

    batch_size: int | None = None  # None: the plan tuned for this machine (see tuning.py)
    workers: int | None = None  # loader processes; None: settings.default_workers(device)
    device: str = "auto"
    timeout: float | None = 60.0  # seconds to decode one image
    engine: str = "local"  # or "ray": the same batches scheduled on Ray Data (gpl_cli.ray_engine)
    ray: RayOptions | None = None  # what only the Ray engine reads (None: its defaults)


@dataclass
class Summary:
    embedded: int = 0
    failed: int = 0
    reused: int = 0  # rows not computed by this run: resumed from a journal or kept by --update
    seconds: float = 0.0
    dims: dict[str, int] = field(default_factory=dict)
    pool_seconds: dict[str, float] = field(default_factory=dict)  # per pooling: pool, normalise, copy to host
    plan: str = ""  # batch size and memory layout the run used, in words
    execution: str = ""  # processes and threads, in words
    zero_rows: dict[str, int] = field(default_factory=dict)  # per pooling: all-zero vectors written

    @property
    def rate(self) -> float:
        return (self.embedded - self.reused) / self.seconds if self.seconds > 0 else 0.0


class Engine(Protocol):
    """What runs the embed job's batches: `Embedder` on this machine, `ray_engine.RayEmbedder` on Ray.

    `run` hands every item's failure or row to `sink` in input order and returns the run's Summary.
    """

    def run(self, items: list[InputItem], sink: Sink, settings: RunSettings,
            on_failure: Callable[[Failure], None] | None = None,
            on_progress: Callable[[int], None] | None = None) -> Summary: ...


def deliver(
    items: list[InputItem],
    sink: Sink,
    summary: Summary,
    on_failure: Callable[[Failure], None] | None,
    failures: list[tuple[int, Failure]],
    indices: list[int],
    vectors: dict[str, np.ndarray],
    stats: list[tuple[int, int]],
) -> None:
    """Hand one group of results to the sink: its failures, then its rows (`indices` into `items`).

    A row with a non-finite value (NaN, inf: an operator pushed past float32, e.g. crow:a=1e-9)
    is no embedding: it becomes that image's failure. All-zero rows are kept and counted in
    `summary.zero_rows` (cosine similarity with them is 0 by definition).
    """
    if indices:
        finite = np.logical_and.reduce([np.isfinite(v).all(axis=1) for v in vectors.values()])
        for pos in np.flatnonzero(~finite):
            bad = [key for key, v in vectors.items() if not np.isfinite(v[pos]).all()]
            reason = f"pooling {bad[0]} gave a non-finite vector (NaN or inf); try other parameters"
            failures = [*failures, (indices[pos], Failure(items[indices[pos]].path, reason))]
        if not finite.all():
            keep = np.flatnonzero(finite)
            indices, stats = [indices[i] for i in keep], [stats[i] for i in keep]
            vectors = {key: v[keep] for key, v in vectors.items()}
        for key, v in vectors.items():
            zero = int((~v.any(axis=1)).sum())
            if zero:
                summary.zero_rows[key] = summary.zero_rows.get(key, 0) + zero
    for index, failure in failures:
        sink.fail(items[index].name, failure.reason)
        summary.failed += 1
        if on_failure:
            on_failure(failure)
    if indices:
        sink.write([items[i].name for i in indices], vectors, stats)
        summary.embedded += len(indices)


class Embedder:
    """A loaded backbone plus poolings: uint8 pixel batches in, float32 vectors out.

    Each pooled vector goes through postprocess(): `power`, then the whitening learned
    for its pooling key (if any in `whitenings`), then `normalize`.
    `channels_last` runs the trunk in NHWC memory layout and `precision` sets its compute
    dtype (autocast); neither changes what is computed, only how fast and how exactly.
    `jpeg_draft` lets `run` decode large JPEGs at a reduced scale (see images.open_rgb).
    The trunk runs as a copy with its batch norms folded (inference.py); the backbone passed in
    is never modified, so one loaded backbone can serve several embedders.
    """

    def __init__(
        self,
        backbone: Backbone,
        specs: list[PoolSpec],
        normalize: str = "none",
        device: str = "auto",
        *,
        power: float | None = None,
        whitenings: dict[str, Projection] | None = None,
        preprocess: Preprocess | None = None,
        precision: str = "fp32",
        channels_last: bool = False,
        jpeg_draft: bool = False,
    ):
        self.backbone = backbone
        self.specs = specs
        self.normalize = normalize
        self.power = power
        self.whitenings = whitenings or {}
        self.preprocess = preprocess or backbone.preprocess
        self.precision = precision
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.jpeg_draft = jpeg_draft
        self._place(resolve_device(device))

    def _place(self, device: torch.device) -> None:
        """Everything that lives on the device: the prepared trunk, the normalisation constants, the dtype."""
        self.device = device
        self.dtype = check_precision(self.precision, device)
        self.trunk = prepare_trunk(self.backbone.trunk, device, self.memory_format, self.dtype)
        self._mean = torch.tensor(self.preprocess.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.preprocess.std, device=device).view(1, 3, 1, 1)
        self.pool_seconds = {s.key: 0.0 for s in self.specs}

    def on_device(self, device: str | torch.device) -> Embedder:
        """The same backbone, poolings and post-processing on another device (a Ray model actor's)."""
        moved = copy.copy(self)
        moved._place(resolve_device(device))
        return moved

    @property
    def dims(self) -> dict[str, int]:
        """Dimension of each written vector (a whitening may reduce it)."""
        pooled = out_dims(self.specs, self.backbone.channels)
        return {k: self.whitenings[k].out_dim if k in self.whitenings else d for k, d in pooled.items()}

    @torch.inference_mode()
    def feature_maps(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W -> the trunk's N x C x h x w map (float32 from fp32, else the autocast dtype)."""
        # One pass converts dtype and layout; the arithmetic is torchvision's ToTensor + Normalize,
        # so float32 vectors match reference pipelines bit for bit.
        x = torch.empty(pixels.shape, dtype=torch.float32, device=self.device, memory_format=self.memory_format)
        x.copy_(pixels.to(self.device, non_blocking=True)).div_(255.0)
        x.sub_(self._mean).div_(self._std)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.trunk(x)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        """Every pooling of one forward pass, post-processed, as float32 arrays keyed by pooling.

        `pixels` is one same-shape stack; the poolings run in float32 whatever the trunk's precision.
        Time spent on each pooling accumulates in `pool_seconds`; the trunk is waited for first
        so that its asynchronous GPU work is not charged to the first pooling.
        """
        fmap = self.feature_maps(pixels).float()
        self._synchronize()
        out = {}
        for s in self.specs:
            start = time.perf_counter()
            pooled = postprocess(pool(s, fmap), self.normalize, self.power, self.whitenings.get(s.key))
            out[s.key] = pooled.cpu().numpy().astype(np.float32, copy=False)
            self.pool_seconds[s.key] += time.perf_counter() - start
        return out

    def embed_batch(self, batch: Batch) -> dict[str, np.ndarray]:
        """Vectors of a batch's images in input order, one forward pass per same-shape group."""
        out = {key: np.empty((len(batch.indices), dim), np.float32) for key, dim in self.dims.items()}
        for positions, pixels in batch.groups:
            for key, rows in self.embed_pixels(pixels).items():
                out[key][positions] = rows
        return out

    def embedded(self, batch: Batch) -> Embedded:
        """A decoded batch through the model, with its failures and what each pooling cost on it."""
        before = dict(self.pool_seconds)
        vectors = self.embed_batch(batch) if batch.indices else {}
        return Embedded(batch.indices, batch.stats, vectors, batch.failures, {k: self.pool_seconds[k] - before[k] for k in before})

    def run(
        self,
        items: list[InputItem],
        sink: Sink,
        settings: RunSettings,
        on_failure: Callable[[Failure], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Summary:
        """Embed `items` in order (the Engine protocol); each failure goes to the sink (and `on_failure`),
        rows never shift. `settings` gives batch size, loader workers and the decode timeout; the
        device is this Embedder's own.

        On a CPU each loader worker decodes and embeds its own batches (WorkerEmbedding); with an
        accelerator the workers decode and the main process runs the model.
        """
        dataset = ImageDataset([it.path for it in items], self.preprocess, settings.timeout, self.jpeg_draft)
        on_cpu = self.device.type == "cpu"
        workers = settings.workers
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=settings.batch_size,
            num_workers=workers,
            collate_fn=WorkerEmbedding(self) if on_cpu else collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=functools.partial(die_with_parent, os.getpid()) if workers else None,
        )
        summary = Summary(dims=self.dims, pool_seconds=dict.fromkeys(self.pool_seconds, 0.0))
        start = time.perf_counter()
        for batch in loader:
            done = batch if on_cpu else self.embedded(batch)
            deliver(items, sink, summary, on_failure, done.failures, done.indices, done.vectors, done.stats)
            for key, seconds in done.pool_seconds.items():
                summary.pool_seconds[key] += seconds
            if on_progress:
                on_progress(len(batch.indices) + len(batch.failures))
        summary.seconds = time.perf_counter() - start
        summary.execution = (f"{workers} worker(s) x 1 thread" if on_cpu and workers else
                             f"{workers} decoding worker(s)" if workers else f"in-process, {torch.get_num_threads()} threads")
        return summary


def build_embedder(config: EmbedConfig, device: str | torch.device = "auto", backbone: Backbone | None = None,
                   channels_last: bool = False) -> Embedder:
    """The Embedder a config describes: backbone (or the one given), poolings, power, whitening, resizing,
    precision; `channels_last` is a speed choice (tuning.py), not part of the config."""
    specs = config.pool_specs()
    loaded = [load_whitening(path) for path in config.whiten]  # a bad file fails before the model loads
    backbone = backbone or load_backbone(config.backbone, config.weights, config.layer)
    whitenings = match_whitenings(loaded, backbone.metadata(), out_dims(specs, backbone.channels), config.power)
    return Embedder(
        backbone, specs, config.normalize, device,
        power=config.power, whitenings=whitenings, preprocess=config.preprocess_for(backbone),
        precision=config.precision, channels_last=channels_last, jpeg_draft=config.jpeg_draft,
    )


class Embedded(NamedTuple):
    """A batch after the model: vectors of the images that decoded, failures of the others."""

    indices: list[int]
    stats: list[tuple[int, int]]  # (size, mtime_ns) of each embedded file when it was decoded
    vectors: dict[str, np.ndarray]  # empty when every image of the batch failed
    failures: list[tuple[int, Failure]]
    pool_seconds: dict[str, float]  # what each pooling cost on this batch


class WorkerEmbedding:
    """On a CPU, the model runs inside the DataLoader's workers: this is their collate_fn.

    A worker that has decoded a batch's images embeds them too, with one thread, and only the
    vectors (a few KB per image) travel back to the main process, never the pixels. Each core
    then decodes and runs the model side by side with the others, with no thread waiting on
    another; on 2 cores that is 1.15-1.4x the throughput of one process running the model on
    both (see settings.default_workers). With an accelerator the workers only decode
    (images.collate) and the main process runs the model.
    """

    def __init__(self, embedder: Embedder):
        self.embedder = embedder

    def __call__(self, samples: list) -> Embedded:
        return self.embedder.embedded(collate(samples, leaves_worker=False))
