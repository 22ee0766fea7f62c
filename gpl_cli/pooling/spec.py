"""Pooling specs without torch: the operators' names, parameters and references, parsing
`--pool gem:p=4` into a `PoolSpec`, and the key that names each output.

The maths lives in gpl_cli.pooling.functions (one function per operator, under the same name), and
a parsed spec applies it when called: `parse_pool_spec("gem:p=4")(x, mask)`. This half is torch-free
at import so that the command line can refuse a bad --pool at once, before the seconds that importing
torch takes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpl_cli.errors import GplError

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Param:
    name: str
    default: float
    help: str
    minimum: float | None = None  # exclusive lower bound, if any
    integer: bool = False
    choices: tuple[float, ...] = ()

    def describe(self) -> str:
        return f"{self.name}={fmt_number(self.default)}"


@dataclass(frozen=True)
class PoolOperator:
    name: str
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
    "avg", "mean of each channel over the map", "Lin et al. 2014, Network in Network (global average pooling)",
))
register(PoolOperator(
    "max", "maximum of each channel over the map",
    "Razavian et al. 2016, Visual instance retrieval with deep convolutional networks (MAC)", aliases=("mac",),
))
register(PoolOperator(
    "avgmax", "half the sum of avg and max, channel by channel", "timm adaptive_avgmax_pool2d",
))
register(PoolOperator(
    "catavgmax", "avg and max concatenated: [avg(C), max(C)]", "timm adaptive_catavgmax_pool2d",
    dim_rule="2C",
))
register(PoolOperator(
    "gem", "p-th root of the mean of the p-th powers of the activations clamped at eps (p=1 avg, p->inf max)",
    "Radenovic, Tolias & Chum 2018, Fine-tuning CNN image retrieval with no human annotation (TPAMI)",
    params=(
        Param("p", 3.0, "power", minimum=0.0),
        Param("eps", 1e-6, "activations below eps are raised to eps (keeps the power real)", minimum=0.0),
    ),
))
register(PoolOperator(
    "lse", "1/r times the log of the mean of exp(r x) (r->0 avg, r->inf max)",
    "Pinheiro & Collobert 2015, From image-level to pixel-level labeling with convolutional networks (CVPR)",
    params=(Param("r", 10.0, "temperature (the paper leaves it a hyperparameter; 10 is gpl's default)", minimum=0.0),),
))
register(PoolOperator(
    "spoc",
    "sum of each channel over the map, optionally weighted by a Gaussian centre prior (center=1); "
    "unlike avg it is not divided by the area, so its magnitude grows with the image",
    "Babenko & Lempitsky 2015, Aggregating local deep features for image retrieval (ICCV)",
    params=(Param("center", 0, "1 weights positions by the Gaussian centre prior", integer=True, choices=(0, 1)),),
))
register(PoolOperator(
    "rmac",
    "max over square regions at `levels` scales (~40% overlap), each region L2-normalised, summed, L2-normalised",
    "Tolias, Sicre & Jegou 2016, Particular object retrieval with integral max-pooling of CNN activations (ICLR)",
    params=(Param("levels", 3, "number of region scales L", minimum=0.0, integer=True),),
))
register(PoolOperator(
    "crow",
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
        changed = [f"{k}={fmt_number(v)}" for k, v in self.params.items() if v != defaults[k]]
        return f"{self.op}:{','.join(changed)}" if changed else self.op

    def all_params(self) -> dict[str, float]:
        values = {p.name: p.default for p in self.operator.params}
        values.update(self.params)
        return values

    def __call__(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """This pooling applied to an N x C x H x W map (`mask`: N x 1 x H x W, True = valid): N x D float32.
        Torch is imported here, on the first call, so that parsing stays torch-free."""
        from gpl_cli.pooling.functions import pool

        return pool(self, x, mask)


def fmt_number(v: float) -> str:
    """The shortest text that reads back as the same float: 3 for 3.0, 0.5, 1e+30 (never 30 digits)."""
    text = repr(float(v))
    return text[:-2] if text.endswith(".0") else text


def valid_names() -> str:
    names = sorted(REGISTRY) + sorted(f"{a} (= {t})" for a, t in _ALIASES.items())
    return ", ".join(names)


def parse_number(text: str, what: str, integer: bool = False) -> float:
    """`text` as a finite number (an int when `integer`), or a GplError saying what `what` must be."""
    try:
        number = float(text)
    except ValueError:
        raise GplError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(number):
        raise GplError(f"{what} must be finite, got {text!r}")
    if integer and not number.is_integer():
        raise GplError(f"{what} must be a whole number, got {text!r}")
    return int(number) if integer else number


def _parse_value(op: PoolOperator, param: Param, value: str) -> float:
    if value.lower() == "auto" and (op.name, param.name) == ("gem", "p"):  # gpl compare's (gpl_cli.analysis.gem_auto)
        raise GplError(f"{op.name}:{param.name}=auto chooses {param.name} on labelled images and exists only in gpl "
                       f"compare (gpl compare DIR --pool {op.name}:{param.name}=auto); here give a number, "
                       f"e.g. {op.name}:{param.name}={fmt_number(param.default)}")
    number = parse_number(value, f"parameter {param.name} of pooling {op.name!r}", param.integer)
    if param.choices and number not in param.choices:
        valid = " or ".join(fmt_number(c) for c in param.choices)
        raise GplError(f"parameter {param.name} of pooling {op.name!r} must be {valid}, got {value!r}")
    if param.minimum is not None and not number > param.minimum:
        raise GplError(f"parameter {param.name} of pooling {op.name!r} must be > {fmt_number(param.minimum)}, got {value!r}")
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
    for item in (s.strip() for s in arg_text.split(",")) if arg_text.strip() else ():
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in known or not eq:
            valid = ", ".join(f"{p.name} (default {fmt_number(p.default)})" for p in op.params) or "none"
            raise GplError(f"bad parameter {item!r} in pooling {text.strip()!r}; its parameters: {valid}")
        if key in params:
            raise GplError(f"parameter {key} given twice in pooling {text.strip()!r}")
        params[key] = _parse_value(op, known[key], value.strip())
    return PoolSpec(name, params)


def parse_pool_list(values: Iterable[str]) -> list[PoolSpec]:
    """Parse repeated/comma-joined --pool values; 'avg,max' is two, 'crow:a=2,b=2' is one.

    A comma-separated piece that holds '=' but no ':' continues the previous spec's parameters.
    """
    pieces = spec_pieces(values)
    if not pieces:
        raise GplError("no pooling given; use --pool avg, for example (gpl pools lists them)")
    specs = [parse_pool_spec(p) for p in pieces]
    keys = [s.key for s in specs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise GplError(f"pooling given more than once: {', '.join(duplicates)}")
    return specs


def spec_pieces(values: Iterable[str], option: str = "--pool",
                example: str = "pooling names such as avg,max (gpl pools lists them)") -> list[str]:
    """Repeated/comma-joined values of `option` cut into one text per spec (see parse_pool_list); the
    --rerank specs are written the same way."""
    pieces: list[str] = []
    for value in values:
        for piece in value.split(","):
            piece = piece.strip()
            if not piece:
                what = "is empty" if not value.strip() else "has an empty item (two commas, or one at an end)"
                raise GplError(f"{option} {value!r} {what}; give {example}")
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
