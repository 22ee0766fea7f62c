"""How a run executes on this machine, resolved once from the options: device, precision, runtime, loader
processes, model threads, batch size and memory layout. None of it changes what is computed (the runtime:
within float rounding at fp32, gpl_cli.models.openvino.TOLERANCE).

`resolve_settings` turns the user's choices ("auto", None for "pick for me") into one `RunSettings`;
the engines, tuning and `gpl tune` all receive that object instead of resolving --device again.
`RunSettings.planned` adds the batch size and layout measured for the machine (gpl_cli.embedding.tuning), and
with --runtime auto the runtime that measured faster for this backbone (torch where nothing says so).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from gpl_cli.defaults import PRECISIONS
from gpl_cli.errors import GplError
from gpl_cli.models.openvino import HINTS, OPENVINO_MISSING, installed


@dataclass(frozen=True)
class RunSettings:
    device: torch.device
    precision: str  # a name of defaults.PRECISIONS
    dtype: torch.dtype  # the trunk's compute dtype for `precision`
    workers: int  # loader processes (0: all in this process)
    threads: int  # threads one copy of the model runs on
    batch_size: int  # images per forward pass
    channels_last: bool = False  # the trunk's memory layout
    timeout: float | None = 60.0  # seconds to decode one image
    plan: str = ""  # where batch size and layout came from, in words (tuning.Plan.describe)
    runtime: str = "torch"  # what runs the trunk: torch or openvino ("auto" until planned: resolve_runtime)

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def planned(self, plan) -> RunSettings:
        """These settings with a tuning.Plan's batch size, memory layout and runtime."""
        return replace(self, batch_size=plan.batch_size, channels_last=plan.channels_last, plan=plan.describe(),
                       runtime=plan.runtime)


def resolve_settings(device: str | torch.device = "auto", precision: str = "fp32", workers: int | None = None,
                     batch_size: int | None = None, timeout: float | None = 60.0,
                     images: int | None = None, runtime: str = "auto") -> RunSettings:
    """The settings for these options on this machine, for a run of `images` images (None: unknown);
    raises GplError for a precision the device cannot run fast, or a runtime it cannot run."""
    where = resolve_device(device)
    dtype = check_precision(precision, where)
    processes = resolve_workers(workers, where, images)
    return RunSettings(where, precision, dtype, processes, model_threads(where, processes),
                       batch_size or default_batch_size(where), timeout=timeout,
                       runtime=resolve_runtime(runtime, where, precision))


def resolve_runtime(runtime: str, device: torch.device, precision: str) -> str:
    """--runtime for this device and precision: torch or openvino, or "auto" where the measured plan is
    to decide (tuning.plan_run): OpenVINO is installed and can run this precision on this device. An
    explicit openvino that cannot run is a GplError."""
    if precision == "int8":  # a quantized OpenVINO model: no other runtime runs it
        if runtime == "torch":
            raise GplError("--precision int8 runs on OpenVINO (it quantizes the model for it), not on torch: "
                           "use --runtime openvino or auto")
        runtime = "openvino"
    if runtime == "torch":
        return "torch"
    refusal = openvino_refusal(device, precision)
    if runtime == "openvino":
        if refusal:
            raise GplError(refusal)
        return "openvino"
    return "torch" if refusal else "auto"


def openvino_refusal(device: torch.device, precision: str) -> str | None:
    """Why OpenVINO cannot run the trunk here, in a user's words; None when it can."""
    if device.type != "cpu":
        return f"--runtime openvino runs on the CPU, and this run is on {device.type}: use --device cpu"
    if precision not in (*HINTS, "int8"):
        return f"--runtime openvino runs {' and '.join(HINTS)}, not --precision {precision}"
    if not installed():
        return OPENVINO_MISSING
    return None


def resolve_device(name: str | torch.device) -> torch.device:
    """The device for --device `name`: "auto" picks CUDA, then MPS, then the CPU; an accelerator asked for
    by name that this machine lacks is a GplError here, before any model loads or output is opened."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    missing = {"cuda": ("CUDA", torch.cuda.is_available), "mps": ("MPS", torch.backends.mps.is_available)}
    if device.type in missing:
        kind, available = missing[device.type]
        if not available():
            raise GplError(f"--device {name}: no {kind} device is available on this machine; "
                           "use --device cpu (or auto)")
    return device


# --precision -> torch dtype; around an int8 trunk (which OpenVINO runs) torch's share, the pooling, is float32
DTYPES = dict(zip(PRECISIONS, (torch.float32, torch.bfloat16, torch.float16, torch.float32)))


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively here (AVX512-BF16 or AMX), not emulated (slower than fp32)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_precision(precision: str, device: torch.device) -> torch.dtype:
    """The torch dtype for `precision`, or a GplError when this device cannot run it fast."""
    if precision not in PRECISIONS:
        raise GplError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type not in ("cuda", "mps"):
        raise GplError("--precision fp16 needs a GPU (--device cuda or mps); on a CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        raise GplError("--precision bf16 needs a CPU with native bfloat16 (AVX512-BF16 or AMX); "
                       "this one would emulate it, slower than fp32: use --precision fp32")
    if precision == "int8" and device.type != "cpu":
        raise GplError(f"--precision int8 runs on the CPU (OpenVINO), and this run is on {device.type}: "
                       "use --device cpu")
    return DTYPES[precision]


def default_batch_size(device: torch.device) -> int:
    """When neither the user nor a measured plan (tuning.py) sets one: small batches that stay in
    cache win on CPUs (see bench/RESULTS.md, 'Speed techniques, one at a time')."""
    return 4 if device.type == "cpu" else 16


# Each CPU worker holds its own activations; beyond this many, memory grows for little gain.
MAX_CPU_WORKERS = 8
# A CPU run of fewer images runs in this process: forking the workers and warming up a model in
# each costs more than it saves on a small run, and the workers win on large ones (see bench/RESULTS.md,
# 'Start-up': workers or not, by the size of the run; python bench/startup.py --cutover).
IN_PROCESS_BELOW = 64


def resolve_workers(workers: int | None, device: torch.device, images: int | None = None) -> int:
    return default_workers(device, images) if workers is None else workers


def default_workers(device: torch.device, images: int | None = None) -> int:
    """Loader processes: on a CPU one per core, each decoding and embedding with one thread (more
    throughput than one process running the model on all cores: no thread ever waits for another; see
    bench/RESULTS.md, 'Speed techniques, one at a time'), or none for a run of fewer than
    IN_PROCESS_BELOW images; with an accelerator, decoders on all but one core, at most 4."""
    cores = os.cpu_count() or 1
    if device.type == "cpu":
        return 0 if images is not None and images < IN_PROCESS_BELOW else min(cores, MAX_CPU_WORKERS)
    return min(4, max(0, cores - 1))


def model_threads(device: torch.device, workers: int) -> int:
    """Threads one copy of the model runs on: one in each CPU worker, else this process's."""
    return 1 if device.type == "cpu" and workers > 0 else torch.get_num_threads()
