"""What happens to a pooled vector before it is written: normalisation."""

from __future__ import annotations

from torch import Tensor

NORMALIZATIONS = ("none", "l2")


def l2_normalize(v: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows scaled to unit L2 norm; an all-zero row stays zero."""
    return v / v.norm(dim=1, keepdim=True).clamp_min(eps)


def postprocess(v: Tensor, normalize: str = "none") -> Tensor:
    if normalize == "none":
        return v
    if normalize == "l2":
        return l2_normalize(v)
    raise ValueError(f"unknown normalisation {normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
