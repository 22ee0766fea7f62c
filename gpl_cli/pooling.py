"""Global pooling operators: N x C x H x W feature maps to N x D vectors.

Each operator is a pure function `fn(x, mask=None, **params)` registered under one
name; `GlobalPool` is its nn.Module form and `PoolSpec` an operator with its parameter
values (`gem:p=4`). `mask` (N x 1 x H x W bool, True = valid) lets a padded batch of
mixed image sizes pool only over each image's own region: every operator gives the
same vector for a padded map with its mask as for the unpadded map alone. Operators
that need the region's geometry (R-MAC's grid, SPoC's centre prior) expect each
image's valid cells to form a rectangle, which is what padding produces.

Pooling always runs in float32, whatever precision produced the map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from gpl_cli.errors import GplError
from gpl_cli.postprocess import l2_normalize

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


def _centre_prior(height: int, width: int, device: torch.device) -> Tensor:
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
        out[rows] = (region * _centre_prior(h, w, x.device)).sum(dim=(2, 3))
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
    return (x * spatial).sum(dim=(2, 3)) * channel


# --- the registry ----------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    default: float
    help: str
    minimum: float | None = None  # exclusive lower bound, if any
    integer: bool = False
    choices: tuple[float, ...] = ()

    def describe(self) -> str:
        return f"{self.name}={_fmt(self.default)}"


@dataclass(frozen=True)
class PoolOperator:
    name: str
    fn: Callable[..., Tensor]
    summary: str  # the formula in words
    reference: str
    dim_rule: str = "C"  # output dimension as a function of the channel count C
    params: tuple[Param, ...] = ()
    aliases: tuple[str, ...] = ()

    def out_dim(self, channels: int) -> int:
        return {"C": channels, "2C": 2 * channels}[self.dim_rule]


REGISTRY: dict[str, PoolOperator] = {}
_ALIASES: dict[str, str] = {}


def register(op: PoolOperator) -> PoolOperator:
    REGISTRY[op.name] = op
    for alias in op.aliases:
        _ALIASES[alias] = op.name
    return op


register(PoolOperator(
    "avg", avg_pool, "mean of each channel over the map", "Lin et al. 2014, Network in Network (global average pooling)",
))
register(PoolOperator(
    "max", max_pool, "maximum of each channel over the map",
    "Razavian et al. 2016, Visual instance retrieval with deep convolutional networks (MAC)", aliases=("mac",),
))
register(PoolOperator(
    "avgmax", avgmax_pool, "half the sum of avg and max, channel by channel", "timm adaptive_avgmax_pool2d",
))
register(PoolOperator(
    "catavgmax", catavgmax_pool, "avg and max concatenated: [avg(C), max(C)]", "timm adaptive_catavgmax_pool2d",
    dim_rule="2C",
))
register(PoolOperator(
    "gem", gem_pool, "p-th root of the mean of the p-th powers of the activations clamped at eps (p=1 avg, p->inf max)",
    "Radenovic, Tolias & Chum 2018, Fine-tuning CNN image retrieval with no human annotation (TPAMI)",
    params=(
        Param("p", 3.0, "power", minimum=0.0),
        Param("eps", 1e-6, "activations below eps are raised to eps (keeps the power real)", minimum=0.0),
    ),
))
register(PoolOperator(
    "lse", lse_pool, "1/r times the log of the mean of exp(r x) (r->0 avg, r->inf max)",
    "Pinheiro & Collobert 2015, From image-level to pixel-level labeling with convolutional networks (CVPR)",
    params=(Param("r", 10.0, "temperature (the paper leaves it a hyperparameter; 10 is gpl's default)", minimum=0.0),),
))
register(PoolOperator(
    "spoc", spoc_pool,
    "sum of each channel over the map, optionally weighted by a Gaussian centre prior (center=1); "
    "unlike avg it is not divided by the area, so its magnitude grows with the image",
    "Babenko & Lempitsky 2015, Aggregating local deep features for image retrieval (ICCV)",
    params=(Param("center", 0, "1 weights positions by the Gaussian centre prior", integer=True, choices=(0, 1)),),
))
register(PoolOperator(
    "rmac", rmac_pool,
    "max over square regions at `levels` scales (~40% overlap), each region L2-normalised, summed, L2-normalised",
    "Tolias, Sicre & Jegou 2016, Particular object retrieval with integral max-pooling of CNN activations (ICLR)",
    params=(Param("levels", 3, "number of region scales L", minimum=0.0, integer=True),),
))
register(PoolOperator(
    "crow", crow_pool,
    "channel sums weighted by the normalised channel-sum map (exponents a, b), times log inverse non-zero frequency",
    "Kalantidis, Mellina & Osindero 2016, Cross-dimensional weighting for aggregated deep convolutional features "
    "(ECCV workshops)",
    params=(Param("a", 2.0, "norm of the spatial normalisation", minimum=0.0),
            Param("b", 2.0, "root applied to the normalised spatial map", minimum=0.0)),
))


@dataclass(frozen=True)
class PoolSpec:
    """An operator with its parameter values; `key` names its output (dataset, column)."""

    op: str
    params: dict[str, float] = field(default_factory=dict)

    @property
    def operator(self) -> PoolOperator:
        return REGISTRY[self.op]

    @property
    def key(self) -> str:
        """Canonical name: the operator, plus the parameters that differ from their defaults."""
        defaults = {p.name: p.default for p in self.operator.params}
        changed = [f"{k}={_fmt(v)}" for k, v in self.params.items() if v != defaults[k]]
        return f"{self.op}:{','.join(changed)}" if changed else self.op

    def all_params(self) -> dict[str, float]:
        values = {p.name: p.default for p in self.operator.params}
        values.update(self.params)
        return values

    def __call__(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.operator.fn(x, mask, **self.all_params())


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def valid_names() -> str:
    names = sorted(REGISTRY) + sorted(f"{a} (= {t})" for a, t in _ALIASES.items())
    return ", ".join(names)


def _parse_value(op: PoolOperator, param: Param, value: str) -> float:
    if value.lower() == "auto" and (op.name, param.name) == ("gem", "p"):  # gpl compare's (gpl_cli.gem_auto)
        raise GplError(f"{op.name}:{param.name}=auto chooses {param.name} on labelled images and exists only in gpl "
                       f"compare (gpl compare DIR --pool {op.name}:{param.name}=auto); here give a number, "
                       f"e.g. {op.name}:{param.name}={_fmt(param.default)}")
    try:
        number = float(value)
    except ValueError:
        raise GplError(f"parameter {param.name} of pooling {op.name!r} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise GplError(f"parameter {param.name} of pooling {op.name!r} must be finite, got {value!r}")
    if param.integer:
        if not number.is_integer():
            raise GplError(f"parameter {param.name} of pooling {op.name!r} must be a whole number, got {value!r}")
        number = int(number)
    if param.choices and number not in param.choices:
        valid = " or ".join(_fmt(c) for c in param.choices)
        raise GplError(f"parameter {param.name} of pooling {op.name!r} must be {valid}, got {value!r}")
    if param.minimum is not None and not number > param.minimum:
        raise GplError(f"parameter {param.name} of pooling {op.name!r} must be > {_fmt(param.minimum)}, got {value!r}")
    return number


def parse_pool_spec(text: str) -> PoolSpec:
    """Parse 'gem' or 'gem:p=4' or 'crow:a=2,b=2' into a PoolSpec, with clear errors."""
    name, _, arg_text = text.strip().partition(":")
    name = name.strip().lower()
    name = _ALIASES.get(name, name)
    if name not in REGISTRY:
        raise GplError(f"unknown pooling {text!r}; valid: {valid_names()} (gpl pools lists them)")
    op = REGISTRY[name]
    known = {p.name: p for p in op.params}
    params: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in arg_text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in known or not eq:
            valid = ", ".join(f"{p.name} (default {_fmt(p.default)})" for p in op.params) or "none"
            raise GplError(f"bad parameter {item!r} for pooling {name!r}; its parameters: {valid}")
        params[key] = _parse_value(op, known[key], value.strip())
    return PoolSpec(name, params)


def parse_pool_list(values: Iterable[str]) -> list[PoolSpec]:
    """Parse repeated/comma-joined --pool values; 'avg,max' is two, 'crow:a=2,b=2' is one.

    A comma-separated piece that holds '=' but no ':' continues the previous spec's parameters.
    """
    specs = [parse_pool_spec(p) for p in pool_pieces(values)]
    keys = [s.key for s in specs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise GplError(f"pooling given more than once: {', '.join(duplicates)}")
    return specs


def pool_pieces(values: Iterable[str]) -> list[str]:
    """Repeated/comma-joined --pool values cut into one text per spec (see parse_pool_list)."""
    pieces: list[str] = []
    for value in values:
        for piece in value.split(","):
            piece = piece.strip()
            if not piece:
                continue
            if "=" in piece and ":" not in piece and pieces:
                pieces[-1] += "," + piece
            else:
                pieces.append(piece)
    return pieces


def out_dims(specs: Iterable[PoolSpec], channels: int) -> dict[str, int]:
    """Each spec's output dimension for a map with `channels` channels, keyed by spec key."""
    return {s.key: s.operator.out_dim(channels) for s in specs}


def operator_table() -> list[dict]:
    """Every operator as plain data: what `gpl pools` prints."""
    return [
        {
            "name": op.name,
            "usage": op.name + (":" + ",".join(p.describe() for p in op.params) if op.params else ""),
            "aliases": list(op.aliases),
            "params": [{"name": p.name, "default": p.default, "help": p.help} for p in op.params],
            "dim": op.dim_rule,
            "formula": op.summary,
            "reference": op.reference,
        }
        for op in REGISTRY.values()
    ]


class GlobalPool(nn.Module):
    """nn.Module form of a registered operator: GlobalPool('gem', p=3)(x, mask=None) -> N x D float32."""

    def __init__(self, name: str, **params: float):
        super().__init__()
        self.spec = parse_pool_spec(name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else ""))

    def out_dim(self, channels: int) -> int:
        return self.spec.operator.out_dim(channels)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.spec(x, mask)

    def extra_repr(self) -> str:
        return self.spec.key
