"""What a run is asked for, torch-free: `EmbedConfig` (what decides the numbers in an output) and
`RunOptions` (how the run executes: none of it changes the vectors).

The command line builds and checks both before anything heavy is imported, so a bad option is
refused at once; `gpl_cli.embedding.job.Job` turns them into a model, poolings and run settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from gpl_cli.defaults import DEFAULT_BACKBONE, DEFAULT_POOLS, DEVICES, ENGINES, RESIZE_MODES
from gpl_cli.errors import GplError
from gpl_cli.pooling.spec import PoolSpec, parse_pool_list
from gpl_cli.store.journal import FLUSH_ROWS

if TYPE_CHECKING:
    from gpl_cli.embedding.images import Preprocess
    from gpl_cli.models.backbones import Backbone



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


@dataclass(frozen=True)
class RayOptions:
    """What only the Ray engine reads (gpl embed --engine ray)."""

    address: str | None = None  # the Ray cluster to join; None: RAY_ADDRESS, else a local instance
    concurrency: int | None = None  # model actors (default: one per GPU, else half the cluster's CPUs)
    num_gpus: float | None = None  # GPUs per model actor (default: 1 when the cluster has GPUs)


@dataclass
class RunOptions:
    """How a run is executed, as asked for (gpl_cli.embedding.settings resolves it for this machine);
    none of it changes the vectors."""

    batch_size: int | None = None  # None: the plan tuned for this machine (see tuning.py)
    workers: int | None = None  # loader processes; None: settings.default_workers(device)
    device: str = "auto"
    timeout: float | None = 60.0  # seconds to decode one image
    engine: str = "local"  # or "ray": the same batches scheduled on Ray Data (gpl_cli.embedding.ray)
    ray: RayOptions | None = None  # what only the Ray engine reads (None: its defaults)

    def check(self) -> None:
        """The checks of the command line's option types, for callers of the Python API; raises GplError."""
        for name in ("batch_size", "workers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < (1 if name == "batch_size" else 0)):
                raise GplError(f"{name} must be an integer of at least {1 if name == 'batch_size' else 0}, got {value!r}")
        if self.device not in DEVICES:
            raise GplError(f"unknown device {self.device!r}; valid: {', '.join(DEVICES)}")
        if self.engine not in ENGINES:
            raise GplError(f"unknown engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        if self.ray is not None and self.engine != "ray":
            raise GplError("Ray options apply to the Ray engine only")


@dataclass
class RunMode:
    """What a run into an existing output may do with it."""

    resume: bool = False  # finish an interrupted run from its journal
    update: bool = False  # re-embed only new or changed files of an existing output
    checkpoint_rows: int = FLUSH_ROWS  # finished rows are made durable at least this often
