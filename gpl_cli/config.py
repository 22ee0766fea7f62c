"""What decides the numbers in an output: `EmbedConfig`, torch-free.

The command line builds and checks it before anything heavy is imported, so a bad option is
refused at once; the engine (gpl_cli.engine) turns it into a model and poolings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from gpl_cli.defaults import DEFAULT_BACKBONE, DEFAULT_POOLS, RESIZE_MODES
from gpl_cli.errors import GplError
from gpl_cli.poolspec import PoolSpec, parse_pool_list

if TYPE_CHECKING:
    from gpl_cli.backbones import Backbone
    from gpl_cli.images import Preprocess



@dataclass
class EmbedConfig:
    """Everything that decides the numbers in an output file (and goes into its metadata)."""

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None  # a local state dict instead of the backbone's published weights
    pools: tuple[str, ...] = DEFAULT_POOLS
    normalize: str = "none"
    power: float | None = None  # signed power normalisation exponent, applied first
    whiten: tuple[str, ...] = ()  # whitening files (gpl whiten fit), each for the pooling it was learned on
    layer: str | None = None  # an intermediate layer instead of the final map
    resize: str = "crop"  # or "keep-aspect"
    max_size: int | None = None  # longer side with keep-aspect (default: the backbone's crop size)
    precision: str = "fp32"  # the trunk's compute precision: fp32, bf16 or fp16 (see settings.DTYPES)
    jpeg_draft: bool = False  # let libjpeg decode large JPEGs at a reduced scale (images.open_rgb)

    def pool_specs(self) -> list[PoolSpec]:
        return parse_pool_list(self.pools)

    def check(self) -> None:
        """Every option that can be judged before loading anything; raises GplError."""
        self.pool_specs()
        if self.resize not in RESIZE_MODES:
            raise GplError(f"unknown --resize {self.resize!r}; valid: {', '.join(RESIZE_MODES)}")
        if self.max_size is not None and self.resize != "keep-aspect":
            raise GplError("--max-size applies only with --resize keep-aspect")
        if self.max_size is not None and self.max_size < 1:
            raise GplError(f"--max-size must be at least 1, got {self.max_size}")
        if self.power is not None and not self.power > 0:
            raise GplError(f"--power must be > 0, got {self.power}")

    def preprocess_for(self, backbone: Backbone) -> Preprocess:
        """The backbone's preprocessing, switched to keep-aspect resizing when asked."""
        pre = backbone.preprocess
        if self.resize == "keep-aspect":
            return replace(pre, mode="keep-aspect", max_size=self.max_size or pre.crop)
        return pre

    def as_dict(self) -> dict:
        """JSON-ready, with poolings in canonical form ('avg,max' and 'avg' + 'max' are the same run)."""
        return {**asdict(self), "pools": [s.key for s in self.pool_specs()]}
