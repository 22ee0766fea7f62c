"""Global pooling in torch, as users import it: every operator's pure function (`gem_pool(x, mask=None,
p=3.0)`, from gpl_cli.pooling.functions), `pool(spec, x)` for a parsed spec, `parse_pool_spec`, and
`GlobalPool`, the nn.Module form. A parsed spec is itself callable: `parse_pool_spec("gem:p=4")(x, mask)`.

The functions live in their own module because this one needs the spec parser (for GlobalPool) while
a spec needs the functions (to apply itself): apart, neither imports the other in a cycle.
"""

from __future__ import annotations

from torch import Tensor, nn

from gpl_cli.pooling.functions import (
    FUNCTIONS,
    avg_pool,
    avgmax_pool,
    catavgmax_pool,
    centre_prior,
    crow_pool,
    crow_weights,
    gem_pool,
    lse_pool,
    max_pool,
    pool,
    rmac_pool,
    rmac_regions,
    spoc_pool,
    valid_boxes,
)
from gpl_cli.pooling.spec import PoolSpec, parse_pool_spec

__all__ = [
    "FUNCTIONS", "GlobalPool", "PoolSpec", "avg_pool", "avgmax_pool", "catavgmax_pool", "centre_prior", "crow_pool",
    "crow_weights", "gem_pool", "lse_pool", "max_pool", "parse_pool_spec", "pool", "rmac_pool", "rmac_regions",
    "spoc_pool", "valid_boxes",
]


class GlobalPool(nn.Module):
    """nn.Module form of a registered operator: GlobalPool('gem', p=3)(x, mask=None) -> N x D float32."""

    def __init__(self, name: str, **params: float):
        super().__init__()
        self.spec = parse_pool_spec(name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else ""))

    def out_dim(self, channels: int) -> int:
        return self.spec.operator.out_dim(channels)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return pool(self.spec, x, mask)

    def extra_repr(self) -> str:
        return self.spec.key
