"""The embedding engine: batches of images through the trunk and every pooling at once.

One forward pass of the backbone feeds all requested poolings. Decoding runs in
DataLoader workers; pixels travel as uint8 and are normalised on the model's device.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Protocol

import numpy as np
import torch

from gpl_cli.backbones import DEFAULT_BACKBONE, Backbone
from gpl_cli.errors import GplError
from gpl_cli.images import RESIZE_MODES, Batch, Failure, ImageDataset, Preprocess, collate
from gpl_cli.inputs import InputItem
from gpl_cli.pooling import PoolSpec, out_dims, parse_pool_list
from gpl_cli.postprocess import Projection, postprocess


@dataclass
class EmbedConfig:
    """Everything that decides the numbers in an output file (and goes into its metadata)."""

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None  # a local state dict instead of the backbone's published weights
    pools: tuple[str, ...] = ("avg",)
    normalize: str = "none"
    power: float | None = None  # signed power normalisation exponent, applied first
    whiten: tuple[str, ...] = ()  # whitening files (gpl whiten fit), each for the pooling it was learned on
    layer: str | None = None  # an intermediate layer instead of the final map
    resize: str = "crop"  # or "keep-aspect"
    max_size: int | None = None  # longer side with keep-aspect (default: the backbone's crop size)

    def pool_specs(self) -> list[PoolSpec]:
        return parse_pool_list(self.pools)

    def check(self) -> None:
        """Every option that can be judged before loading anything; raises GplError."""
        self.pool_specs()
        if self.resize not in RESIZE_MODES:
            raise GplError(f"unknown --resize {self.resize!r}; valid: {', '.join(RESIZE_MODES)}")
        if self.max_size is not None and self.resize != "keep-aspect":
            raise GplError("--max-size applies only with --resize keep-aspect")
        if self.max_size is not None and self.max_size < 1:
            raise GplError(f"--max-size must be at least 1, got {self.max_size}")
        if self.power is not None and not self.power > 0:
            raise GplError(f"--power must be > 0, got {self.power}")

    def preprocess_for(self, backbone: Backbone) -> Preprocess:
        """The backbone's preprocessing, switched to keep-aspect resizing when asked."""
        pre = backbone.preprocess
        if self.resize == "keep-aspect":
            return replace(pre, mode="keep-aspect", max_size=self.max_size or pre.crop)
        return pre

    def as_dict(self) -> dict:
        """JSON-ready, with poolings in canonical form ('avg,max' and 'avg' + 'max' are the same run)."""
        return {**asdict(self), "pools": [s.key for s in self.pool_specs()]}


@dataclass
class RunOptions:
    """How a run is executed; none of it changes the vectors."""

    batch_size: int = 16
    workers: int = 0
    device: str = "auto"
    timeout: float | None = 60.0  # seconds to decode one image
    engine: str = "local"  # or "ray": the same batches scheduled on Ray Data (gpl_cli.ray_engine)
    ray_address: str | None = None  # the Ray cluster to join; None: RAY_ADDRESS, else a local instance
    concurrency: int | None = None  # Ray model actors (default: one per GPU, else half the cluster's CPUs)
    num_gpus: float | None = None  # GPUs per Ray model actor (default: 1 when the cluster has GPUs)


@dataclass
class Summary:
    embedded: int = 0
    failed: int = 0
    reused: int = 0  # rows not computed by this run: resumed from a journal or kept by --update
    seconds: float = 0.0
    dims: dict[str, int] = field(default_factory=dict)
    pool_seconds: dict[str, float] = field(default_factory=dict)  # per pooling: pool, normalise, copy to host

    @property
    def rate(self) -> float:
        return (self.embedded - self.reused) / self.seconds if self.seconds > 0 else 0.0


class Sink(Protocol):
    """Where results go, in input order (an output writer)."""

    def write(self, names: list[str], vectors: dict[str, np.ndarray]) -> None: ...

    def fail(self, name: str, reason: str) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def deliver(
    items: list[InputItem],
    sink: Sink,
    summary: Summary,
    on_failure: Callable[[Failure], None] | None,
    failures: list[tuple[int, Failure]],
    indices: list[int],
    vectors: dict[str, np.ndarray],
) -> None:
    """Hand one group of results to the sink: its failures, then its rows (`indices` into `items`)."""
    for index, failure in failures:
        sink.fail(items[index].name, failure.reason)
        summary.failed += 1
        if on_failure:
            on_failure(failure)
    if indices:
        sink.write([items[i].name for i in indices], vectors)
        summary.embedded += len(indices)


class Embedder:
    """A loaded backbone plus poolings: uint8 pixel batches in, float32 vectors out.

    Each pooled vector goes through postprocess(): `power`, then the whitening learned
    for its pooling key (if any in `whitenings`), then `normalize`.
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
    ):
        self.backbone = backbone
        self.specs = specs
        self.normalize = normalize
        self.power = power
        self.whitenings = whitenings or {}
        self.preprocess = preprocess or backbone.preprocess
        self.device = resolve_device(device)
        self.trunk = backbone.trunk.to(self.device).eval()
        pre = self.preprocess
        self._mean = torch.tensor(pre.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(pre.std, device=self.device).view(1, 3, 1, 1)
        self.pool_seconds = {s.key: 0.0 for s in specs}

    def on_device(self, device: str) -> Embedder:
        """The same backbone, poolings and post-processing on another device (a Ray model actor's)."""
        return Embedder(self.backbone, self.specs, self.normalize, device, power=self.power,
                        whitenings=self.whitenings, preprocess=self.preprocess)

    @property
    def dims(self) -> dict[str, int]:
        """Dimension of each written vector (a whitening may reduce it)."""
        pooled = out_dims(self.specs, self.backbone.channels)
        return {k: self.whitenings[k].out_dim if k in self.whitenings else d for k, d in pooled.items()}

    @torch.inference_mode()
    def feature_maps(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W -> the trunk's N x C x h x w map."""
        # Same arithmetic as torchvision's ToTensor + Normalize, so vectors match reference pipelines bit for bit.
        x = pixels.to(self.device, non_blocking=True).float().div_(255.0)
        return self.trunk(x.sub_(self._mean).div_(self._std))

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
            pooled = postprocess(s(fmap), self.normalize, self.power, self.whitenings.get(s.key))
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

    def run(
        self,
        items: list[InputItem],
        sink: Sink,
        options: RunOptions,
        on_failure: Callable[[Failure], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Summary:
        """Embed `items` in order; each failure goes to the sink (and `on_failure`), rows never shift."""
        dataset = ImageDataset([it.path for it in items], self.preprocess, options.timeout)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=options.batch_size,
            num_workers=options.workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )
        summary = Summary(dims=self.dims)
        self.pool_seconds = dict.fromkeys(self.pool_seconds, 0.0)
        start = time.perf_counter()
        for batch in loader:
            vectors = self.embed_batch(batch) if batch.indices else {}
            deliver(items, sink, summary, on_failure, batch.failures, batch.indices, vectors)
            if on_progress:
                on_progress(len(batch.indices) + len(batch.failures))
        summary.seconds = time.perf_counter() - start
        summary.pool_seconds = dict(self.pool_seconds)
        return summary
