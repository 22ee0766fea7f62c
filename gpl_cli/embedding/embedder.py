"""The pure `Embedder`: uint8 pixel batches in, float32 pooled vectors out, one forward pass for every pooling.

Pixels are normalised on the model's device, in the memory layout the trunk runs fastest in. The trunk
may compute in bfloat16 or float16 (autocast), and run on torch or on OpenVINO (gpl_cli.models.openvino, on the
CPU: the normalised float32 NCHW batch goes in, the float32 map comes back as a tensor); pooling always runs in
float32 on torch. It schedules nothing: the engines (`local`, `ray`) decide where and when it runs.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from gpl_cli.embedding.config import EmbedConfig
from gpl_cli.embedding.engine import Embedded
from gpl_cli.embedding.images import Batch, Preprocess
from gpl_cli.embedding.settings import check_precision, resolve_device
from gpl_cli.errors import GplError
from gpl_cli.models import openvino
from gpl_cli.models.backbones import Backbone, load_backbone
from gpl_cli.models.inference import prepare_trunk
from gpl_cli.models.quantize import Agreement, quantized_trunk
from gpl_cli.pooling.ops import pool
from gpl_cli.pooling.postprocess import Projection, postprocess
from gpl_cli.pooling.scales import combine_scales, scale_key, scale_label
from gpl_cli.pooling.spec import PoolSpec, out_dims
from gpl_cli.pooling.whiten import load_whitening, match_whitenings

MAP_KEY = "map"  # the one output of an Embedder built with flattened=True


class Embedder:
    """A loaded backbone plus poolings: uint8 pixel batches in, float32 vectors out.

    Each pooled vector goes through postprocess(): `power`, then the whitening learned
    for its pooling key (if any in `whitenings`), then `normalize`.
    `channels_last` runs the trunk in NHWC memory layout and `precision` sets its compute
    dtype (autocast); neither changes what is computed, only how fast and how exactly.
    `jpeg_draft` lets the engines decode large JPEGs at a reduced scale (see images.open_rgb).
    `flattened` replaces the poolings by the trunk's whole map, flattened (C*H*W numbers under
    MAP_KEY): the linear probe's second pass. On torch the trunk runs as a copy with its batch norms folded
    (inference.py); with `runtime="openvino"` it runs as its cached OpenVINO conversion, compiled in each process
    that runs it (float32 NCHW in: `channels_last` does not apply). The backbone passed in is never modified, so
    one loaded backbone can serve several embedders.

    Several scales (`preprocess.scales`): every image comes in once per scale (images.model_inputs), each
    scale's same-shape images go through one forward pass together, each pooling is computed per scale, and
    the per-scale vectors of a pooling are combined into one (gpl_cli.pooling.scales.combine_scales: L2-normalised,
    then averaged) before the post-processing above. Model time per scale accumulates in `scale_seconds`.

    `per_scale=True` skips both the combination and the post-processing: the output keys are
    f"{pooling key}@{scale_label(scale)}" (pooling.scales.scale_key: 'gem@1', 'gem@1.41', 'gem@2'), for each
    pooling in `specs` order, each scale in `preprocess.scales` order; each is that pooling's raw N x D float32
    vector at that scale (as pooled: no power, whitening or normalisation; even with one scale), rows in input
    order as always. combine_scales over any subset of one pooling's per-scale arrays, then postprocess() with
    the run's normalize, power and whitening, gives what a run at that subset of scales writes, up to float32
    rounding (one scale: postprocess alone). Dims are the pooled ones (a whitening is not applied).
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
        flattened: bool = False,
        per_scale: bool = False,
        runtime: str = "torch",
    ):
        self.backbone = backbone
        self.specs = specs
        self.normalize = normalize
        self.power = power
        self.whitenings = whitenings or {}
        self.preprocess = preprocess or backbone.preprocess
        self.precision = precision
        self.runtime = runtime
        self.channels_last = channels_last and runtime == "torch"
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.jpeg_draft = jpeg_draft
        self.flattened = flattened
        self.per_scale = per_scale
        self.scales = self.preprocess.scales
        if flattened and (per_scale or self.scales != (1.0,)):
            raise GplError("the flattened feature map is the backbone's at its own input size: it takes no --scales")
        # converted (or read from the cache) once, here: a copy moved to another process compiles the same IR;
        # int8 gets its model from quantize(), which needs the run's calibration sample
        self._openvino = (openvino.compiled_trunk(backbone, precision)
                          if runtime == "openvino" and precision != "int8" else None)
        self.int8: dict | None = None  # int8: the calibration and the agreement with float32, once quantized
        self._place(resolve_device(device))

    def _place(self, device: torch.device) -> None:
        """Everything that lives on the device: the prepared trunk, the normalisation constants, the dtype."""
        self.device = device
        self.dtype = check_precision(self.precision, device)
        if self.runtime == "openvino":
            if device.type != "cpu":
                raise GplError(f"--runtime openvino runs on the CPU, not on {device.type}: use --device cpu")
            self.trunk = self._openvino
        else:
            self.trunk = prepare_trunk(self.backbone.trunk, device, self.memory_format, self.dtype)
        self._mean = torch.tensor(self.preprocess.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.preprocess.std, device=device).view(1, 3, 1, 1)
        self.pool_seconds = {s.key: 0.0 for s in self.specs}
        self.scale_seconds = {scale_label(s): 0.0 for s in self.scales}  # forward pass and poolings, per scale

    def quantize(self, calibration) -> Agreement:
        """int8: the trunk quantized on `calibration` (gpl_cli.embedding.calibration: the run's images, a
        --calibration folder, or random pixels for timing), or read from the cache; its Agreement with float32."""
        pre = self.preprocess
        sample = calibration.identity(pre)
        self._openvino, agreement = quantized_trunk(self.backbone, sample,
                                                    lambda: calibration.inputs(pre, self.jpeg_draft), calibration.origin)
        self.trunk = self._openvino
        self.int8 = {"calibration": calibration.origin, "calibration_identity": sample, **agreement.as_metadata()}
        return agreement

    def on_device(self, device: str | torch.device) -> Embedder:
        """The same backbone, poolings and post-processing on another device (a Ray model actor's)."""
        moved = copy.copy(self)
        moved._place(resolve_device(device))
        return moved

    @property
    def dims(self) -> dict[str, int]:
        """Dimension of each written vector (a whitening may reduce it)."""
        if self.flattened:
            return {MAP_KEY: int(np.prod(self.backbone.feature_map))}
        pooled = out_dims(self.specs, self.backbone.channels)
        if self.per_scale:
            return {scale_key(k, scale): d for k, d in pooled.items() for scale in self.scales}
        return {k: self.whitenings[k].out_dim if k in self.whitenings else d for k, d in pooled.items()}

    @torch.inference_mode()
    def feature_maps(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W -> the trunk's N x C x h x w map (float32 from fp32 or OpenVINO, else the autocast dtype)."""
        # One pass converts dtype and layout; the arithmetic is torchvision's ToTensor + Normalize,
        # so float32 vectors match reference pipelines bit for bit.
        x = torch.empty(pixels.shape, dtype=torch.float32, device=self.device, memory_format=self.memory_format)
        x.copy_(pixels.to(self.device, non_blocking=True)).div_(255.0)
        x.sub_(self._mean).div_(self._std)
        if self.runtime == "openvino":
            if self.trunk is None:
                raise RuntimeError("an int8 Embedder runs once quantized: call quantize() first")
            return torch.from_numpy(self.trunk(x))
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.trunk(x)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor, scale: int = 0, post: bool = True) -> dict[str, np.ndarray]:
        """Every pooling of one forward pass, post-processed (unless not `post`), as float32 arrays keyed by pooling.

        `pixels` is one same-shape stack, at the scale of index `scale`; the poolings run in float32
        whatever the trunk's precision. Time spent on each pooling accumulates in `pool_seconds`, and
        the whole pass in `scale_seconds`; the trunk is waited for first so that its asynchronous GPU
        work is not charged to the first pooling.
        """
        begin = time.perf_counter()
        fmap = self.feature_maps(pixels).float()
        if self.flattened:
            return {MAP_KEY: fmap.flatten(1).cpu().numpy()}
        self._synchronize()
        out = {}
        for s in self.specs:
            start = time.perf_counter()
            pooled = pool(s, fmap)
            if post:
                pooled = postprocess(pooled, self.normalize, self.power, self.whitenings.get(s.key))
            out[s.key] = pooled.cpu().numpy().astype(np.float32, copy=False)
            self.pool_seconds[s.key] += time.perf_counter() - start
        self.scale_seconds[scale_label(self.scales[scale])] += time.perf_counter() - begin
        return out

    def embed_batch(self, batch: Batch) -> dict[str, np.ndarray]:
        """Vectors of a batch's images in input order, one forward pass per scale and same-shape group; with
        several scales (or `per_scale`), pooled per scale and then combined and post-processed (class docstring)."""
        rows = len(batch.indices)
        if not self.per_scale and len(self.scales) == 1:
            out = {key: np.empty((rows, dim), np.float32) for key, dim in self.dims.items()}
            for positions, pixels, _ in batch.groups:
                for key, vectors in self.embed_pixels(pixels).items():
                    out[key][positions] = vectors
            return out
        dims = out_dims(self.specs, self.backbone.channels)
        pooled = [{key: np.empty((rows, dim), np.float32) for key, dim in dims.items()} for _ in self.scales]
        for positions, pixels, scale in batch.groups:
            for key, vectors in self.embed_pixels(pixels, scale, post=False).items():
                pooled[scale][key][positions] = vectors
        if self.per_scale:
            return {scale_key(key, s): pooled[i][key] for key in dims for i, s in enumerate(self.scales)}
        return {key: self._combined(key, [by_scale[key] for by_scale in pooled]) for key in dims}

    def _combined(self, key: str, vectors: list[np.ndarray]) -> np.ndarray:
        """One pooling's per-scale vectors combined, then post-processed (charged to the pooling's time)."""
        start = time.perf_counter()
        combined = torch.from_numpy(combine_scales(vectors))
        out = postprocess(combined, self.normalize, self.power, self.whitenings.get(key)).numpy().astype(np.float32, copy=False)
        self.pool_seconds[key] += time.perf_counter() - start
        return out

    def embedded(self, batch: Batch) -> Embedded:
        """A decoded batch through the model, with its failures and what each pooling cost on it."""
        before, scales_before = dict(self.pool_seconds), dict(self.scale_seconds)
        vectors = self.embed_batch(batch) if batch.indices else {}
        return Embedded(batch.indices, batch.stats, vectors, batch.failures,
                        {k: self.pool_seconds[k] - before[k] for k in before},
                        {k: self.scale_seconds[k] - scales_before[k] for k in scales_before})


def build_embedder(config: EmbedConfig, device: str | torch.device = "auto", backbone: Backbone | None = None,
                   channels_last: bool = False, flattened: bool = False, per_scale: bool = False,
                   runtime: str = "torch") -> Embedder:
    """The Embedder a config describes: backbone (or the one given), poolings, power, whitening, resizing and
    scales, precision; `channels_last` and `runtime` are speed choices (tuning.py), not part of the config;
    `flattened`: the whole map instead of the poolings; `per_scale`: each scale's raw pooled vectors (both: Embedder)."""
    specs = config.pool_specs()
    loaded = [load_whitening(path) for path in config.whiten]  # a bad file fails before the model loads
    backbone = backbone or load_backbone(config.backbone, config.weights, config.layer)
    whitenings = match_whitenings(loaded, backbone.metadata(), out_dims(specs, backbone.channels), config.power,
                                  config.scales)
    return Embedder(
        backbone, specs, config.normalize, device,
        power=config.power, whitenings=whitenings, preprocess=config.preprocess_for(backbone),
        precision=config.precision, channels_last=channels_last, jpeg_draft=config.jpeg_draft,
        flattened=flattened, per_scale=per_scale, runtime=runtime,
    )
