"""gpl for notebooks and scripts: `gpl_cli.embed` and `gpl_cli.read`.

    import gpl_cli
    emb = gpl_cli.embed("photos/", pool=["avg", "gem"], normalize="l2")
    emb.paths[0], emb.vectors["gem"].shape, emb.failures
    same = gpl_cli.read("photos.h5")  # any gpl output: .h5, .npy, a shards (parquet) folder

`embed` takes the options of `gpl embed`, with the same defaults, and returns the rows in memory
(no file is written); `read` returns the same `Embeddings` shape for a file. This module imports
no torch: `import gpl_cli` and `gpl_cli.read` stay light, the model loads when `embed` runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from gpl_cli.defaults import DEFAULT_BACKBONE, DEFAULT_POOLS
from gpl_cli.embedding.inputs import InputList, collect_inputs
from gpl_cli.errors import GplError
from gpl_cli.store.embeddings import Embeddings
from gpl_cli.store.formats import read_embeddings

if TYPE_CHECKING:
    from gpl_cli.embedding.images import Failure
    from gpl_cli.models.backbones import Backbone

__all__ = ["Embeddings", "embed", "read"]


def _names(value: str | Iterable[str], what: str) -> tuple[str, ...]:
    """A name or several as a tuple (a string is one name, never its characters); GplError for anything else."""
    if isinstance(value, str):
        return (value,)
    names = tuple(value) if isinstance(value, Iterable) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise GplError(f"{what} must be a name or a list of names, got {value!r}")
    return names


def embed(
    inputs: str | os.PathLike | Iterable[str | os.PathLike] | InputList,
    backbone: str = DEFAULT_BACKBONE,
    pool: str | Iterable[str] = DEFAULT_POOLS,
    normalize: str = "none",
    *,
    weights: str | None = None,
    power: float | None = None,
    whiten: str | Iterable[str] = (),
    layer: str | None = None,
    resize: str = "crop",
    max_size: int | None = None,
    precision: str = "fp32",
    calibration: str | os.PathLike | None = None,
    jpeg_draft: bool = False,
    scales: float | Iterable[float] = (1.0,),
    device: str = "auto",
    runtime: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    timeout: float | None = 60.0,
    engine: str = "local",
    strict: bool = False,
    model: Backbone | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_failure: Callable[[Failure], None] | None = None,
) -> Embeddings:
    """Embed images (files, folders searched recursively, or an InputList) in memory, as `gpl embed` would.

    Returns an Embeddings: `paths` (names as gpl embed stores them), `vectors` (pooling key -> N x D
    float32, row i belongs to paths[i]), `failures` [(path, reason)], `metadata` (what a file records)
    and `summary` (timings). Images that cannot be read are failures, not errors, unless `strict`.
    `model`: an already loaded backbone (gpl_cli.models.backbones.load_backbone) to reuse across calls; it
    must be the one `backbone`, `weights` and `layer` name. `scales`: a number or several (1, 1.41, 2), or
    the text of --scales ("1,1.41,2"): each image is run at every scale and each pooling's vectors combined
    into one, as `gpl embed --scales`. `runtime`: torch, openvino or auto, as `gpl embed --runtime`.
    `calibration`: with precision="int8", a folder of images to calibrate on, as `gpl embed --calibration`.
    `on_progress(label, done, total)` and `on_failure(failure)` follow the run; nothing is printed.
    """
    from gpl_cli.embedding.config import EmbedConfig, RunOptions, parse_scales
    from gpl_cli.embedding.job import Job

    if isinstance(scales, str):
        scales = parse_scales(scales)
    config = EmbedConfig(backbone=backbone, weights=weights, pools=_names(pool, "pool"), normalize=normalize, power=power,
                         whiten=_names(whiten, "whiten"), layer=layer, resize=resize, max_size=max_size, precision=precision,
                         calibration=os.fspath(calibration) if calibration is not None else None, jpeg_draft=jpeg_draft,
                         scales=tuple(scales) if isinstance(scales, Iterable) else (scales,))
    options = RunOptions(batch_size, workers, device, timeout or None, engine=engine, runtime=runtime)
    config.check()
    options.check(config)
    if not isinstance(inputs, InputList):
        single = isinstance(inputs, (str, os.PathLike))
        inputs = collect_inputs([os.fspath(p) for p in ([inputs] if single else inputs)])
    job = Job(config, options, len(inputs.items), backbone=model, strict=strict, on_progress=on_progress,
              on_failure=on_failure)
    return job.embeddings(inputs)


def read(path: str | os.PathLike, pools: str | Iterable[str] | None = None) -> Embeddings:
    """Any gpl output (.h5, an .npy output by any of its files or its .json, a shards/parquet folder),
    with all its poolings or only `pools` (a key, or several)."""
    return read_embeddings(os.fspath(path), None if pools is None else list(_names(pools, "pools")))
