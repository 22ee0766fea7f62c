"""Several input scales into one vector per pooling: the combination rule, torch-free.

An image run at several sizes (`--scales 1,1.41,2`) gives one pooled vector per scale and pooling. Each is
L2-normalised, and the unit vectors are averaged: every scale then counts equally, whatever the norm of its
pooled vector (a larger input gives a larger map, and a sum or a max over more cells grows with it; without
the normalisation the largest scale would dominate the average). The usual post-processing (power,
whitening, --normalize) applies to the combined vector afterwards, as it would to a one-scale vector.
One scale is combined with nothing: its vector is passed on as it is, so a run at scale 1 is a plain run.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12  # the floor of a norm: an all-zero vector stays zero (as postprocess.l2_normalize)


def combine_scales(vectors: list[np.ndarray]) -> np.ndarray:
    """One pooling's N x D vectors at each scale (un-post-processed, same rows in the same order) -> the
    N x D float32 combination: each row L2-normalised per scale, then the mean over the scales.

    A single array is returned as it is (as float32): a one-scale run combines nothing.
    """
    if not vectors:
        raise ValueError("combine_scales needs the vectors of at least one scale")
    if len(vectors) == 1:
        return np.asarray(vectors[0], dtype=np.float32)
    stacked = np.stack([np.asarray(v, dtype=np.float32) for v in vectors])  # scales x N x D
    norms = np.linalg.norm(stacked, axis=2, keepdims=True)
    return (stacked / np.maximum(norms, EPS)).mean(axis=0, dtype=np.float32)


def scale_label(scale: float) -> str:
    """A scale as written in keys and messages: 1, 1.41, 2 (no trailing .0)."""
    return str(int(scale)) if float(scale).is_integer() else repr(float(scale))


def scale_key(key: str, scale: float) -> str:
    """The key of one pooling's un-combined vectors at one scale (Embedder per_scale): 'gem@1.41'."""
    return f"{key}@{scale_label(scale)}"
