"""The local engine: the Embedder on this machine, images decoded by DataLoader workers.

On a CPU each loader worker also runs the model on its own batches (one thread each: `WorkerEmbedding`);
with an accelerator the workers only decode and the main process runs the model.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import torch

from gpl_cli.embedding.embedder import Embedder
from gpl_cli.embedding.engine import Embedded, Summary, deliver
from gpl_cli.embedding.images import Failure, ImageDataset, collate
from gpl_cli.embedding.inputs import InputItem
from gpl_cli.embedding.runtime import die_with_parent
from gpl_cli.embedding.settings import RunSettings
from gpl_cli.store.sink import Sink


class LocalEngine:
    """The Engine protocol (engine.Engine) on this machine."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder

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
        device is the Embedder's own.

        On a CPU each loader worker decodes and embeds its own batches (WorkerEmbedding); with an
        accelerator the workers decode and the main process runs the model.
        """
        # An image inside a tar shard or parquet file is read by its source, in the worker that decodes it.
        sources = [it.source for it in items] if any(it.source is not None for it in items) else None
        dataset = ImageDataset([it.path for it in items], self.embedder.preprocess, settings.timeout,
                               self.embedder.jpeg_draft, sources)
        on_cpu = self.embedder.device.type == "cpu"
        workers = settings.workers
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=settings.batch_size,
            num_workers=workers,
            collate_fn=WorkerEmbedding(self.embedder) if on_cpu else collate,
            pin_memory=self.embedder.device.type == "cuda",
            worker_init_fn=functools.partial(die_with_parent, os.getpid()) if workers else None,
        )
        summary = Summary(dims=self.embedder.dims, pool_seconds=dict.fromkeys(self.embedder.pool_seconds, 0.0),
                          scale_seconds=dict.fromkeys(self.embedder.scale_seconds, 0.0))
        start = time.perf_counter()
        for batch in loader:
            done = batch if on_cpu else self.embedder.embedded(batch)
            deliver(items, sink, summary, on_failure, done.failures, done.indices, done.vectors, done.stats)
            for key, seconds in done.pool_seconds.items():
                summary.pool_seconds[key] += seconds
            for label, seconds in done.scale_seconds.items():
                summary.scale_seconds[label] += seconds
            if on_progress:
                on_progress(len(batch.indices) + len(batch.failures))
        summary.seconds = time.perf_counter() - start
        summary.execution = (f"{workers} worker(s) x 1 thread" if on_cpu and workers else
                             f"{workers} decoding worker(s)" if workers else f"in-process, {torch.get_num_threads()} threads")
        return summary


class WorkerEmbedding:
    """On a CPU, the model runs inside the DataLoader's workers: this is their collate_fn.

    A worker that has decoded a batch's images embeds them too, with one thread, and only the
    vectors (a few KB per image) travel back to the main process, never the pixels. Each core
    then decodes and runs the model side by side with the others, with no thread waiting on
    another, which beats one process running the model on all cores (see settings.default_workers and
    bench/RESULTS.md, 'Speed techniques, one at a time'). With an accelerator the workers only decode
    (images.collate) and the main process runs the model.
    """

    def __init__(self, embedder: Embedder):
        self.embedder = embedder

    def __call__(self, samples: list) -> Embedded:
        return self.embedder.embedded(collate(samples, leaves_worker=False))
