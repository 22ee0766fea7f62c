"""What happens to a pooled vector before it is written.

The chain, in order: signed power normalisation (`--power`), PCA whitening (`--whiten`,
which is L2 -> project -> L2 as in the retrieval literature), then `--normalize`.
Everything runs in float32.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from gpl_cli.defaults import NORMALIZATIONS


class Projection(Protocol):
    """A learned linear map of pooled vectors (gpl_cli.pooling.whiten.Whitening)."""

    @property
    def out_dim(self) -> int: ...

    def project(self, v: Tensor) -> Tensor: ...


def l2_normalize(v: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows scaled to unit L2 norm; an all-zero row stays zero."""
    return v / v.norm(dim=1, keepdim=True).clamp_min(eps)


def signed_power(v: Tensor, alpha: float) -> Tensor:
    """sign(v) * |v|^alpha, element-wise (power-law normalisation; alpha = 0.5 is the signed square root)."""
    return v.sign() * v.abs().pow(alpha)


def postprocess(
    v: Tensor, normalize: str = "none", power: float | None = None, whitening: Projection | None = None
) -> Tensor:
    v = v.float()
    if power is not None:
        v = signed_power(v, power)
    if whitening is not None:
        v = l2_normalize(whitening.project(l2_normalize(v)))
    if normalize == "none":
        return v
    if normalize == "l2":
        return l2_normalize(v)
    raise ValueError(f"unknown normalisation {normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
