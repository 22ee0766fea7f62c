"""Global pooling operators as pure torch functions: N x C x H x W feature maps to N x D vectors.

Each operator is a function `fn(x, mask=None, **params)` in FUNCTIONS under the name
gpl_cli.pooling.spec registers it with (parameters, references, output keys: torch-free);
`pool(spec, x)` applies a parsed `gem:p=4`. This module needs nothing of the spec module at run
time, so a PoolSpec can call `pool` (gpl_cli.pooling.spec.PoolSpec.__call__) without an import
cycle; gpl_cli.pooling.ops is what users import. `mask` (N x 1 x H x W bool, True = valid) lets a
padded batch of mixed image sizes pool only over each image's own region: every operator gives the
same vector for a padded map with its mask as for the unpadded map alone. Operators
that need the region's geometry (R-MAC's grid, SPoC's centre prior) expect each
image's valid cells to form a rectangle, which is what padding produces.

Pooling always runs in float32, whatever precision produced the map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gpl_cli.pooling.postprocess import l2_normalize

if TYPE_CHECKING:
    from gpl_cli.pooling.spec import PoolSpec

_NEG_INF = float("-inf")


# --- mask helpers ----------------------------------------------------------------------


def _prepare(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """x as float32, and the mask as a bool N x 1 x H x W tensor with at least one valid cell per image."""
    if x.ndim != 4:
        raise ValueError(f"pooling needs an N x C x H x W map, got shape {tuple(x.shape)}")
    x = x.float()
    if mask is None:
        return x, None
    mask = mask.to(device=x.device, dtype=torch.bool)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.shape != (x.shape[0], 1, x.shape[2], x.shape[3]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit map {tuple(x.shape)}; expected N x 1 x H x W")
    if not bool(mask.flatten(1).any(dim=1).all()):
        raise ValueError("every image needs at least one valid cell in the mask")
    return x, mask


def _count(x: Tensor, mask: Tensor | None) -> Tensor:
    """Valid cells per image, N x 1."""
    if mask is None:
        return torch.full((x.shape[0], 1), x.shape[2] * x.shape[3], dtype=x.dtype, device=x.device)
    return mask.flatten(1).sum(dim=1, keepdim=True).to(x.dtype)


def _sum(x: Tensor, mask: Tensor | None) -> Tensor:
    # masked_fill, not a product: whatever sits in the padding (even inf) must not reach the sum.
    return (x if mask is None else x.masked_fill(~mask, 0.0)).sum(dim=(2, 3))


def _max(x: Tensor, mask: Tensor | None) -> Tensor:
    return (x if mask is None else x.masked_fill(~mask, _NEG_INF)).amax(dim=(2, 3))


def valid_boxes(x: Tensor, mask: Tensor | None) -> list[tuple[int, int, int, int]]:
    """Each image's valid rectangle as (top, left, height, width) in map cells."""
    n, _, h, w = x.shape
    if mask is None:
        return [(0, 0, h, w)] * n
    boxes = []
    for m in mask[:, 0]:
        rows = torch.nonzero(m.any(dim=1)).flatten()
        cols = torch.nonzero(m.any(dim=0)).flatten()
        top, left = int(rows[0]), int(cols[0])
        height, width = int(rows[-1]) - top + 1, int(cols[-1]) - left + 1
        if int(m.sum()) != height * width:
            raise ValueError("this pooling needs each image's valid cells to form a rectangle (as padding makes)")
        boxes.append((top, left, height, width))
    return boxes


def _by_box(x: Tensor, mask: Tensor | None) -> dict[tuple[int, int, int, int], list[int]]:
    """Images grouped by identical valid rectangle, so geometry is computed once per group."""
    groups: dict[tuple[int, int, int, int], list[int]] = {}
    for i, box in enumerate(valid_boxes(x, mask)):
        groups.setdefault(box, []).append(i)
    return groups


# --- the operators ---------------------------------------------------------------------


def avg_pool(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Global average pooling (GAP): mean over the valid positions of each channel."""
    x, mask = _prepare(x, mask)
    return _sum(x, mask) / _count(x, mask)


def max_pool(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Global max pooling (GMP, 'MAC' in retrieval): max over the valid positions of each channel."""
    x, mask = _prepare(x, mask)
    return _max(x, mask)


def avgmax_pool(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """timm's 'avgmax': the mean of average and max pooling, channel by channel."""
    return 0.5 * (avg_pool(x, mask) + max_pool(x, mask))


def catavgmax_pool(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """timm's 'catavgmax': average pooling and max pooling concatenated (2C values)."""
    return torch.cat([avg_pool(x, mask), max_pool(x, mask)], dim=1)


def gem_pool(x: Tensor, mask: Tensor | None = None, p: float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalized mean: (mean(clamp(x, eps)^p))^(1/p) per channel.

    Computed as m * (mean((x/m)^p))^(1/p) with m the channel's maximum, which is the same
    number but cannot overflow float32 for large p.
    """
    x, mask = _prepare(x, mask)
    x = x.clamp_min(eps)
    top = _max(x, mask)
    scaled = (x / top[:, :, None, None]).pow(p)
    return top * (_sum(scaled, mask) / _count(x, mask)).pow(1.0 / p)


def lse_pool(x: Tensor, mask: Tensor | None = None, r: float = 10.0) -> Tensor:
    """Log-sum-exp pooling: (1/r) log(mean(exp(r x))) per channel.

    Stable form: m + (1/r) log1p(mean(expm1(r (x - m)))) with m the channel's maximum;
    expm1/log1p keep it exact for small r, where the result approaches the mean.
    """
    x, mask = _prepare(x, mask)
    top = _max(x, mask)
    shifted = torch.expm1(r * (x - top[:, :, None, None]))
    return top + torch.log1p(_sum(shifted, mask) / _count(x, mask)) / r


def centre_prior(height: int, width: int, device: torch.device) -> Tensor:
    """Babenko & Lempitsky's Gaussian weights over a height x width region.

    A cell's position is its centre (i + 0.5); the Gaussian is centred on the region's
    centre with sigma one third of the distance from the centre to the closest border.
    """
    sigma = min(height, width) / 6.0
    dy = torch.arange(height, device=device, dtype=torch.float32) + 0.5 - height / 2.0
    dx = torch.arange(width, device=device, dtype=torch.float32) + 0.5 - width / 2.0
    return torch.exp(-(dy[:, None] ** 2 + dx[None, :] ** 2) / (2.0 * sigma * sigma))


def spoc_pool(x: Tensor, mask: Tensor | None = None, center: float = 0) -> Tensor:
    """Sum pooling (SPoC): the sum of each channel over the valid positions.

    With center=1 each position is first weighted by a Gaussian centred on the image's
    valid region (the paper's centre prior).
    """
    x, mask = _prepare(x, mask)
    if not center:
        return _sum(x, mask)
    out = x.new_zeros(x.shape[:2])
    for (top, left, h, w), rows in _by_box(x, mask).items():
        region = x[rows, :, top : top + h, left : left + w]
        out[rows] = (region * centre_prior(h, w, x.device)).sum(dim=(2, 3))
    return out


def _starts(extent: int, size: int, count: int) -> list[int]:
    """`count` region offsets spread evenly from 0 to extent - size (floored, in exact integers)."""
    if count == 1:
        return [0]
    return [k * (extent - size) // (count - 1) for k in range(count)]


def rmac_regions(height: int, width: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int]]:
    """Tolias et al.'s square regions over a height x width map, as (top, left, side) in cells.

    Level l has regions of side floor(2 min(H, W) / (l + 1)), l regions along the short
    side and l + extra along the long one, where extra (the same at every level) makes
    neighbouring level-1 regions overlap as close to `overlap` as 2..7 regions allow.
    Levels whose side would be under one cell are skipped.
    """
    short, long = min(height, width), max(height, width)
    extra = 0
    if long > short:
        def overlap_of(n: int) -> float:
            step = (long - short) / (n - 1)
            return (short - step) / short

        extra = min(range(2, 8), key=lambda n: abs(overlap_of(n) - overlap)) - 1
    regions = []
    for level in range(1, levels + 1):
        side = (2 * short) // (level + 1)
        if side < 1:
            continue
        rows = level + (extra if height > width else 0)
        cols = level + (extra if width > height else 0)
        for top in _starts(height, side, rows):
            for left in _starts(width, side, cols):
                regions.append((top, left, side))
    return regions


def rmac_pool(x: Tensor, mask: Tensor | None = None, levels: int = 3) -> Tensor:
    """R-MAC: max over each region of the multi-scale grid, each L2-normalised, summed, L2-normalised.

    The grid is laid on each image's own valid region, so padding never moves it.
    """
    x, mask = _prepare(x, mask)
    out = x.new_zeros(x.shape[:2])
    for (top, left, h, w), rows in _by_box(x, mask).items():
        image = x[rows, :, top : top + h, left : left + w]
        total = image.new_zeros(image.shape[:2])
        for y, x0, side in rmac_regions(h, w, int(levels)):
            total += l2_normalize(image[:, :, y : y + side, x0 : x0 + side].amax(dim=(2, 3)))
        out[rows] = l2_normalize(total)
    return out


_CROW_EPS = 1e-6


def crow_pool(x: Tensor, mask: Tensor | None = None, a: float = 2.0, b: float = 2.0) -> Tensor:
    """CroW: sum of each channel weighted by a spatial map, times a per-channel weight.

    Spatial weight S = (s / ||s||_a)^(1/b) with s the sum over channels at each position;
    channel weight log((C eps + sum_h q_h) / (eps + q_k)) with q_k the share of positions
    where channel k is non-zero. Negative activations are taken as zero (CroW is defined
    on post-ReLU maps, where 'non-zero' means 'active').
    """
    x, spatial, channel = crow_weights(x, mask, a, b)
    return (x * spatial).sum(dim=(2, 3)) * channel


def crow_weights(x: Tensor, mask: Tensor | None = None, a: float = 2.0,
                 b: float = 2.0) -> tuple[Tensor, Tensor, Tensor]:
    """CroW's pieces: the map it sums (clamped at 0, padding zeroed), its N x 1 x H x W spatial
    weights and its N x C channel weights (`gpl explain` draws and decomposes them)."""
    x, mask = _prepare(x, mask)
    x = x.clamp_min(0.0)
    if mask is not None:
        x = x.masked_fill(~mask, 0.0)
    tiny = torch.finfo(torch.float32).tiny
    s = x.sum(dim=1, keepdim=True)
    peak = s.amax(dim=(2, 3), keepdim=True).clamp_min(tiny)
    norm = peak * (s / peak).pow(a).sum(dim=(2, 3), keepdim=True).pow(1.0 / a)  # ||s||_a without overflow
    spatial = (s / norm.clamp_min(tiny)).pow(1.0 / b)  # an all-zero map has zero weights, not 0/0
    share = (x > 0).flatten(2).sum(dim=2).to(x.dtype) / _count(x, mask)
    channel = torch.log((x.shape[1] * _CROW_EPS + share.sum(dim=1, keepdim=True)) / (_CROW_EPS + share))
    return x, spatial, channel


# --- the registry: each operator's function under its name in gpl_cli.pooling.spec -------------

FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "avg": avg_pool,
    "max": max_pool,
    "avgmax": avgmax_pool,
    "catavgmax": catavgmax_pool,
    "gem": gem_pool,
    "lse": lse_pool,
    "spoc": spoc_pool,
    "rmac": rmac_pool,
    "crow": crow_pool,
}


def pool(spec: PoolSpec, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Apply one parsed spec (`gem:p=4`) to an N x C x H x W map: N x D float32."""
    return FUNCTIONS[spec.op](x, mask, **spec.all_params())
