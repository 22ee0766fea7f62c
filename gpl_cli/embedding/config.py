"""What a run is asked for, torch-free: `EmbedConfig` (what decides the numbers in an output) and
`RunOptions` (how the run executes: none of it changes the vectors).

The command line builds and checks both before anything heavy is imported, so a bad option is
refused at once; `gpl_cli.embedding.job.Job` turns them into a model, poolings and run settings.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from gpl_cli.defaults import DEFAULT_BACKBONE, DEFAULT_POOLS, DEVICES, ENGINES, NORMALIZATIONS, RESIZE_MODES, RUNTIMES
from gpl_cli.errors import GplError
from gpl_cli.pooling.scales import scale_label
from gpl_cli.pooling.spec import PoolSpec, parse_pool_list
from gpl_cli.store.journal import FLUSH_ROWS

if TYPE_CHECKING:
    from gpl_cli.embedding.images import Preprocess
    from gpl_cli.models.backbones import Backbone

# What the machine can hold bounds every size and count option, judged before the model loads (a run
# beyond it would exhaust memory minutes later, or take the machine down with it):
# - one image in flight costs about PIXEL_BYTES per pixel of its resized form (the decoded and
#   normalised image and the trunk's activations: 240 bytes measured for efficientnet_lite0 at 1024 to
#   3072 px), and a batch of them must fit in MEMORY_SHARE of the physical memory;
# - each loader process holds its own interpreter, torch and (on a CPU) a copy of the model: WORKER_BYTES
#   at least, and more than WORKERS_PER_CPU per core only queue for the same cores.
PIXEL_BYTES = 256
MEMORY_SHARE = 0.5
WORKER_BYTES = 256 << 20
WORKERS_PER_CPU = 4
CROP_SIDE = 224  # the usual crop: what the batch bound assumes in crop mode (a lower estimate for larger crops)


def physical_memory() -> int:
    """Bytes of physical memory on this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


def _check_fits(what: str, need: int, most: int | str) -> None:
    """Refuse an option whose run needs more than MEMORY_SHARE of this machine's memory, saying the most it can hold
    (`most`: the largest value, or the advice in words)."""
    have = physical_memory()
    if need > have * MEMORY_SHARE:
        raise GplError(f"{what} needs about {_gib(need)} of memory, more than half of this machine's {_gib(have)}; "
                       + (f"use at most {most}" if isinstance(most, int) else most))


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
    precision: str = "fp32"  # the trunk's compute precision: fp32, bf16, fp16 or int8 (see settings.DTYPES)
    calibration: str | None = None  # int8: the folder of images the quantization is calibrated on (None: the run's)
    jpeg_draft: bool = False  # let libjpeg decode large JPEGs at a reduced scale (images.open_rgb)
    scales: tuple[float, ...] = (1.0,)  # input sizes, as multiples of the resize (pooling.scales combines them)

    def pool_specs(self) -> list[PoolSpec]:
        return parse_pool_list(self.pools)

    def check(self) -> None:
        """Every option that can be judged before loading anything; raises GplError."""
        self.pool_specs()
        if self.resize not in RESIZE_MODES:
            raise GplError(f"unknown --resize {self.resize!r}; valid: {', '.join(RESIZE_MODES)}")
        if self.max_size is not None and self.resize != "keep-aspect":
            raise GplError("--max-size applies only with --resize keep-aspect")
        if self.normalize not in NORMALIZATIONS:
            raise GplError(f"unknown --normalize {self.normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
        if self.max_size is not None and (not _is_int(self.max_size) or self.max_size < 1):
            raise GplError(f"--max-size must be an integer of at least 1, got {self.max_size!r}")
        check_scales(self.scales)
        if self.max_size is not None or self.scales != (1.0,):
            side = self.input_side()
            asked = " ".join(f"{flag} {value}" for flag, value in (("--max-size", self.max_size),
                             ("--scales", ",".join(map(scale_label, self.scales)))) if value is not None)
            most = self.largest_side()
            _check_fits(f"{asked} (one {side} x {side} image, about {PIXEL_BYTES} bytes a pixel)", side ** 2 * PIXEL_BYTES,
                        most if self.scales == (1.0,) else f"use scales that keep the largest input within {most} px")
        if self.calibration is not None and self.precision != "int8":
            raise GplError("--calibration applies to --precision int8 only")
        if self.power is not None and (not _is_number(self.power) or not math.isfinite(self.power) or self.power <= 0):
            raise GplError(f"--power must be > 0 and finite, got {self.power!r}")

    @staticmethod
    def largest_side() -> int:
        """The largest --max-size whose one image fits in this machine's memory (see PIXEL_BYTES)."""
        return math.isqrt(int(physical_memory() * MEMORY_SHARE) // PIXEL_BYTES)

    def input_side(self) -> int:
        """The side of the largest input a run makes: the longer side with keep-aspect (CROP_SIDE for the
        backbone's default), the usual crop otherwise, at the largest scale."""
        return max(1, round(int(self.max_size or CROP_SIDE) * max(self.scales)))

    def preprocess_for(self, backbone: Backbone) -> Preprocess:
        """The backbone's preprocessing, switched to keep-aspect resizing when asked, at the scales asked."""
        pre = replace(backbone.preprocess, scales=tuple(float(s) for s in self.scales))
        if self.resize == "keep-aspect":
            pre = replace(pre, mode="keep-aspect", max_size=self.max_size or pre.crop)
        small = [s for s in pre.scales if (pre.at(s).max_size if pre.mode == "keep-aspect" else pre.at(s).crop) < 1]
        if small:
            raise GplError(f"--scales {scale_label(small[0])} makes {backbone.name}'s input smaller than one pixel")
        return pre

    def as_dict(self) -> dict:
        """JSON-ready, with poolings in canonical form ('avg,max' and 'avg' + 'max' are the same run), scales as floats
        (1 and 1.0 are the same scale)."""
        doc = {**asdict(self), "pools": [s.key for s in self.pool_specs()], "scales": [float(s) for s in self.scales]}
        if doc["calibration"] is None:  # only int8 runs name one: other files record what they always did
            del doc["calibration"]
        return doc


def parse_scales(text: str) -> tuple[float, ...]:
    """--scales 1,1.41,2 as (1.0, 1.41, 2.0), checked (check_scales); GplError for anything else."""
    scales = []
    for piece in text.split(","):
        try:
            scales.append(float(piece))
        except ValueError:
            raise GplError(f"--scales takes numbers separated by commas (e.g. 1,1.41,2); {piece.strip()!r} in "
                           f"{text!r} is not one") from None
    check_scales(tuple(scales))
    return tuple(scales)


def check_scales(scales) -> None:
    """Scales are finite numbers > 0, at least one, none twice; GplError otherwise."""
    if not isinstance(scales, tuple) or not scales:
        raise GplError(f"--scales must be one or more numbers, got {scales!r}")
    for scale in scales:
        if not _is_number(scale) or not math.isfinite(scale) or scale <= 0:
            raise GplError(f"--scales must be numbers > 0, got {scale!r}")
    twice = [s for i, s in enumerate(scales) if s in scales[:i]]
    if twice:
        raise GplError(f"--scales lists {scale_label(twice[0])} twice")


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
    runtime: str = "auto"  # what runs the trunk: torch, openvino, or auto (the measured faster; settings.py)

    def check(self, config: EmbedConfig | None = None) -> None:
        """The checks of the command line's option types, for callers of the Python API, and the bounds of what
        this machine can hold (`config`: the run's, for the size of its images); raises GplError."""
        for name in ("batch_size", "workers"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < (1 if name == "batch_size" else 0)):
                raise GplError(f"--{name.replace('_', '-')} must be an integer of at least "
                               f"{1 if name == 'batch_size' else 0}, got {value!r}")
        if self.timeout is not None and (not _is_number(self.timeout) or not math.isfinite(self.timeout)
                                         or self.timeout < 0):
            raise GplError(f"--timeout must be a finite number of seconds (0: no limit), got {self.timeout!r}")
        if self.workers:
            cpus = usable_cpus()
            most = min(WORKERS_PER_CPU * cpus, int(physical_memory() * MEMORY_SHARE) // WORKER_BYTES)
            if self.workers > WORKERS_PER_CPU * cpus:
                raise GplError(f"--workers {self.workers} is more than {WORKERS_PER_CPU} per CPU core ({cpus} here): "
                               f"more only queue for the same cores; use at most {most}")
            _check_fits(f"--workers {self.workers} (at least {WORKER_BYTES >> 20} MiB each)",
                        int(self.workers) * WORKER_BYTES, most)
        if self.batch_size:
            side = config.input_side() if config else CROP_SIDE
            image = side * side * PIXEL_BYTES
            _check_fits(f"--batch-size {self.batch_size} (images of {side} x {side} px, about {PIXEL_BYTES} bytes a pixel)",
                        int(self.batch_size) * image, max(1, int(physical_memory() * MEMORY_SHARE) // image))
        if self.device not in DEVICES:
            raise GplError(f"unknown device {self.device!r}; valid: {', '.join(DEVICES)}")
        if self.runtime not in RUNTIMES:
            raise GplError(f"unknown runtime {self.runtime!r}; valid: {', '.join(RUNTIMES)}")
        if self.engine not in ENGINES:
            raise GplError(f"unknown engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        if self.ray is not None and self.engine != "ray":
            raise GplError("Ray options apply to the Ray engine only")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's integers too


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class RunMode:
    """What a run into an existing output may do with it."""

    resume: bool = False  # finish an interrupted run from its journal
    update: bool = False  # re-embed only new or changed files of an existing output
    checkpoint_rows: int = FLUSH_ROWS  # finished rows are made durable at least this often
