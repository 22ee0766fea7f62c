"""PCA whitening learned from an embeddings file, saved with its provenance, applied at embed time.

Learning (as in Radenovic, Tolias & Chum's retrieval pipeline): the vectors are
L2-normalised, centred on their mean m, and the covariance S = Xc^T Xc / n is
diagonalised, S = U diag(lambda) U^T with lambda descending. The projection keeps the
first d eigenvectors and scales each by 1/sqrt(lambda): P = diag(lambda_1..d)^-1/2 U_d^T.
Applying it: y = P (x/||x|| - m), then y/||y||.

Only directions with variance are kept: with n vectors at most n - 1 eigenvalues are
non-zero, and dividing by the square root of a zero eigenvalue would amplify noise.
Each eigenvector's sign is fixed so that its largest-magnitude entry is positive, so
the same data always gives the same file.

The file (.npz, no pickles) holds mean, projection, eigenvalues and a JSON provenance:
the source file and its sha256, how many vectors, the backbone and its weights' sha256,
the layer, the pooling key and the power normalisation that produced them. A whitening
is only applied to vectors made the same way; anything else is a clear error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from gpl_cli.errors import GplError
from gpl_cli.models.weights import file_sha256

if TYPE_CHECKING:
    from torch import Tensor

_ARRAYS = ("mean", "projection", "eigenvalues", "provenance")


@dataclass
class Whitening:
    mean: np.ndarray  # D, float64
    projection: np.ndarray  # d x D, float64: rows are eigenvectors divided by sqrt(eigenvalue)
    eigenvalues: np.ndarray  # d kept eigenvalues, descending
    provenance: dict = field(default_factory=dict)
    path: str | None = None  # the file it was loaded from
    _on_device: dict = field(default_factory=dict, repr=False)

    @property
    def in_dim(self) -> int:
        return self.projection.shape[1]

    @property
    def out_dim(self) -> int:
        return self.projection.shape[0]

    def project(self, v: Tensor) -> Tensor:
        """Centre and project N x D float rows (already L2-normalised): N x d float32."""
        import torch

        key = str(v.device)
        if key not in self._on_device:
            self._on_device[key] = (
                torch.as_tensor(self.mean, dtype=torch.float32, device=v.device),
                torch.as_tensor(self.projection.T, dtype=torch.float32, device=v.device).contiguous(),
            )
        mean, proj_t = self._on_device[key]
        return (v.float() - mean) @ proj_t

    def write(self, f) -> None:
        """The .npz (no pickles) into an open binary file."""
        np.savez(f, mean=self.mean, projection=self.projection, eigenvalues=self.eigenvalues,
                 provenance=np.array(json.dumps(self.provenance)))

    def check_fits(self, backbone: dict, key: str, dim: int, power: float | None,
                   scales: tuple[float, ...] = (1.0,)) -> None:
        """Refuse to whiten vectors made differently from those it was learned on (GplError naming the file)."""
        p = self.provenance
        made = f"{p.get('backbone')} / {p.get('pooling')}" + (f" / layer {p['layer']}" if p.get("layer") else "")
        problems = []
        if p.get("backbone") != backbone.get("backbone"):
            problems.append(f"backbone {p.get('backbone')}, this run uses {backbone.get('backbone')}")
        elif p.get("weights_sha256") != backbone.get("weights_sha256"):
            problems.append("other weights (sha256 differs) for the same backbone")
        if p.get("layer") != backbone.get("layer"):
            problems.append(f"layer {p.get('layer') or 'final map'}, this run uses {backbone.get('layer') or 'final map'}")
        if p.get("pooling") != key:
            problems.append(f"pooling {p.get('pooling')}, not {key}")
        if self.in_dim != dim:
            problems.append(f"{self.in_dim}-d vectors, this run's {key} vectors are {dim}-d")
        if p.get("power") != power:
            problems.append(f"--power {_power(p.get('power'))}, this run uses --power {_power(power)}")
        # Vectors combined over several input sizes are distributed differently from one size's (a file
        # from before scales were recorded was made at one size)
        learned = tuple(float(s) for s in p.get("scales") or (1.0,))
        if learned != tuple(float(s) for s in scales):
            problems.append(f"--scales {_scales(learned)}, this run uses --scales {_scales(scales)}")
        if problems:
            raise GplError(f"whitening {self.path} was learned on {made} and does not fit: " + "; ".join(problems))

    def describe(self) -> dict:
        """What goes into an output's metadata about the whitening applied."""
        return {"file": self.path, "sha256": file_sha256(self.path) if self.path else None,
                "in_dim": self.in_dim, "out_dim": self.out_dim, "provenance": self.provenance}


def _power(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def _scales(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def load_whitening(path: str) -> Whitening:
    if not os.path.isfile(path):
        raise GplError(f"whitening file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in _ARRAYS if k not in f.files]
            if missing:
                raise GplError(f"{path} is not a gpl whitening file (no {', '.join(missing)}; make one with gpl whiten fit)")
            w = Whitening(f["mean"], f["projection"], f["eigenvalues"], json.loads(str(f["provenance"])), path)
    except GplError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a usage error
        raise GplError(f"cannot read whitening file {path}: {exc}") from None
    if w.projection.ndim != 2 or w.mean.shape != (w.in_dim,) or w.eigenvalues.shape != (w.out_dim,):
        raise GplError(f"{path}: inconsistent whitening arrays (mean {w.mean.shape}, projection {w.projection.shape})")
    # A NaN would pass every check and make every vector NaN: refused here, before any image is embedded.
    if not all(a.dtype.kind in "fiu" and np.isfinite(a).all() for a in (w.mean, w.projection, w.eigenvalues)):
        raise GplError(f"{path}: the whitening holds NaN, infinite or non-numeric values; fit it again with gpl whiten fit")
    return w


def fit_whitening(vectors: np.ndarray, dims: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, projection d x D, eigenvalues) of PCA whitening learned on the L2-normalised rows of `vectors`."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise GplError(f"whitening needs at least 2 vectors, got {len(x)}")
    if not np.isfinite(x).all():
        raise GplError("the vectors hold NaN or infinite values")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    mean = x.mean(axis=0)
    centred = x - mean
    wide = len(x) < x.shape[1]
    # Fewer vectors than dimensions: the covariance Xc^T Xc / n shares its non-zero eigenvalues with the n x n
    # Gram matrix Xc Xc^T / n, whose eigenvector v gives the covariance's as Xc^T v / sqrt(n lambda); an n x n
    # eigendecomposition instead of a D x D one (ms instead of seconds for 200 vectors of 1280 dimensions).
    square = centred @ centred.T if wide else centred.T @ centred
    values, vectors_ = np.linalg.eigh((square + square.T) / (2 * len(x)))
    order = np.argsort(values)[::-1]
    values, vectors_ = values[order], vectors_[:, order]
    if wide:
        vectors_ = centred.T @ vectors_ / np.sqrt(np.maximum(values, np.finfo(np.float64).tiny) * len(x))
    tolerance = max(values[0], 0.0) * max(x.shape) * np.finfo(np.float64).eps
    rank = int((values > tolerance).sum())
    if rank == 0:
        raise GplError("the vectors have no variance (all identical after L2 normalisation); nothing to whiten")
    if dims is None:
        dims = rank
    elif not 1 <= dims <= rank:
        raise GplError(f"--dims must be between 1 and {rank}: only {rank} directions have variance "
                       f"({len(x)} vectors of dimension {x.shape[1]})")
    basis = vectors_[:, :dims]
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(dims)])
    basis = basis * signs
    projection = basis.T / np.sqrt(values[:dims])[:, None]
    return mean, projection, values[:dims]


def match_whitenings(whitenings: list[Whitening], backbone: dict, dims: dict[str, int],
                     power: float | None, scales: tuple[float, ...] = (1.0,)) -> dict[str, Whitening]:
    """Each loaded whitening keyed by the pooling it was learned on, after checking it fits this run.

    `backbone` is Backbone.metadata(); `dims` the run's pooled dimension per pooling key.
    """
    found: dict[str, Whitening] = {}
    for w in whitenings:
        key = w.provenance.get("pooling")
        if key not in dims:
            raise GplError(f"whitening {w.path} was learned for pooling {key}, which this run does not compute "
                           f"(--pool {','.join(dims)})")
        if key in found:
            raise GplError(f"two whitening files for pooling {key}: {found[key].path} and {w.path}")
        w.check_fits(backbone, key, dims[key], power, scales)
        found[key] = w
    return found
