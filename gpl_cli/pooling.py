"""Global pooling operators: N x C x H x W feature maps to N x D vectors.

Each operator is a pure function `fn(x, mask=None, **params)` registered under one
name; `GlobalPool` is its nn.Module form. `mask` (N x 1 x H x W, True = valid) lets
padded batches of mixed image sizes pool only over each image's own region.
Pooling always runs in float32, whatever precision produced the map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from gpl_cli.errors import GplError


def _valid(x: Tensor, mask: Tensor | None) -> Tensor:
    """The mask as a float weight broadcastable to x (all ones when there is no mask)."""
    if mask is None:
        return torch.ones_like(x[:, :1])
    return mask.to(dtype=x.dtype)


def avg_pool(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Global average pooling (GAP): mean over the valid positions of each channel."""
    x = x.float()
    if mask is None:
        return x.mean(dim=(2, 3))
    w = _valid(x, mask)
    return (x * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3)).clamp_min(1.0)


def max_pool(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Global max pooling (GMP, 'MAC' in retrieval): max over the valid positions of each channel."""
    x = x.float()
    if mask is not None:
        x = x.masked_fill(~mask.bool(), float("-inf"))
    return x.amax(dim=(2, 3))


@dataclass(frozen=True)
class Param:
    name: str
    default: float
    help: str
    minimum: float | None = None  # exclusive lower bound, if any


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


register(PoolOperator("avg", avg_pool, "mean of each channel over H x W", "Lin et al. 2014, Network in Network"))
register(
    PoolOperator(
        "max",
        max_pool,
        "maximum of each channel over H x W",
        "Razavian et al. 2016, Visual instance retrieval with deep convolutional networks",
        aliases=("mac",),
    )
)


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


def parse_pool_spec(text: str) -> PoolSpec:
    """Parse 'gem' or 'gem:p=4' or 'crow:a=2,b=2' into a PoolSpec, with clear errors."""
    name, _, arg_text = text.strip().partition(":")
    name = name.strip().lower()
    name = _ALIASES.get(name, name)
    if name not in REGISTRY:
        raise GplError(f"unknown pooling {text!r}; valid: {valid_names()}")
    op = REGISTRY[name]
    known = {p.name: p for p in op.params}
    params: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in arg_text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in known or not eq:
            valid = ", ".join(f"{p.name} (default {_fmt(p.default)})" for p in op.params) or "none"
            raise GplError(f"bad parameter {item!r} for pooling {name!r}; its parameters: {valid}")
        try:
            number = float(value)
        except ValueError:
            raise GplError(f"parameter {key} of pooling {name!r} must be a number, got {value!r}") from None
        bound = known[key].minimum
        if bound is not None and not number > bound:
            raise GplError(f"parameter {key} of pooling {name!r} must be > {_fmt(bound)}, got {value}")
        params[key] = number
    return PoolSpec(name, params)


def parse_pool_list(values: Iterable[str]) -> list[PoolSpec]:
    """Parse repeated/comma-joined --pool values; 'avg,max' is two, 'crow:a=2,b=2' is one.

    A comma-separated piece that holds '=' but no ':' continues the previous spec's parameters.
    """
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
    specs = [parse_pool_spec(p) for p in pieces]
    keys = [s.key for s in specs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise GplError(f"pooling given more than once: {', '.join(duplicates)}")
    return specs


class GlobalPool(nn.Module):
    """nn.Module form of a registered operator: GlobalPool('gem', p=3)(x) -> N x D float32."""

    def __init__(self, name: str, **params: float):
        super().__init__()
        self.spec = parse_pool_spec(name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else ""))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.spec(x, mask)

    def extra_repr(self) -> str:
        return self.spec.key
