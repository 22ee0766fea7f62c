"""Learning a PCA whitening from a gpl embeddings file (`gpl whiten fit`); the whitening itself, its file
and how it is applied live in gpl_cli.pooling.whiten."""

from __future__ import annotations

import os
from datetime import UTC, datetime

from gpl_cli.errors import GplError
from gpl_cli.models.weights import file_sha256
from gpl_cli.pooling.whiten import Whitening, fit_whitening
from gpl_cli.store.formats import read_embeddings
from gpl_cli.store.output import Output
from gpl_cli.version import __version__


def fit_file(source: str, output: Output, pool: str | None = None, dims: int | None = None) -> Whitening:
    """`gpl whiten fit`: learn from one pooling of `source` and write `output` (a WHITENING Output), which is
    checked before the minutes a large file can take to learn from."""
    output.check([source])
    whitening = learn_from_file(source, pool, dims)
    with output.open("wb") as f:
        whitening.write(f)
    return whitening


def learn_from_file(path: str, pool: str | None = None, dims: int | None = None) -> Whitening:
    """A Whitening learned on one pooling of a gpl embeddings file, with its provenance."""
    emb = read_embeddings(path)
    keys = list(emb.vectors)
    if pool is None:
        if len(keys) != 1:
            raise GplError(f"{path} holds several poolings ({', '.join(keys)}); choose one with --pool")
        pool = keys[0]
    if pool not in emb.vectors:
        raise GplError(f"{path} has no pooling {pool!r}; it holds: {', '.join(keys)}")
    meta = emb.metadata
    if (meta.get("pools", {}).get(pool) or {}).get("whiten"):
        raise GplError(f"{path}: the {pool} vectors are already whitened; learn from unwhitened embeddings")
    mean, projection, values = fit_whitening(emb.vectors[pool], dims)
    config = meta.get("config", {})
    provenance = {
        "source": os.path.abspath(path),
        "source_sha256": file_sha256(path),
        "count": len(emb.vectors[pool]),
        "pooling": pool,
        "backbone": meta.get("backbone"),
        "weights_sha256": meta.get("weights_sha256"),
        "layer": meta.get("layer"),
        "power": config.get("power"),
        "scales": [float(s) for s in config.get("scales") or (1.0,)],
        "preprocess": meta.get("preprocess"),
        "in_dim": int(projection.shape[1]),
        "dims": int(projection.shape[0]),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpl": __version__,
    }
    return Whitening(mean, projection, values, provenance)
