"""OpenVINO as a second runtime for a backbone's trunk: converted once per machine, cached, compiled per process.

- `convert(trunk, example)`: the trunk as an OpenVINO model whose input is float32 NCHW with a dynamic batch,
  height and width (one model serves keep-aspect's many shapes and every scale), checked against torch at a
  second, odd input size: a trunk whose traced graph holds its example's size (padding computed in Python
  from the input's size, say) is refused as `Unconvertible` rather than run wrong.
- `cached(parts, build)`: the IR of a model in gpl's cache folder (`<cache>/gpl/openvino/<key>/`), keyed by
  `parts` (a JSON-ready dict) plus the OpenVINO, torch and gpl versions. An entry records the sha256 of its
  files and is read whole and checked before use: a damaged or half-written one is rebuilt, never trusted.
  It is written in a folder of this process's own and renamed into place, so two first runs side by side
  each build a complete entry and one of them lands; readers hold the bytes, never a path a rename may take.
- `converted(backbone)`: the cached conversion of a loaded backbone's trunk (its --layer tap included).
- `Compiled(ir, precision)`: a picklable callable, NCHW float32 (numpy or a CPU tensor) in, the map out as a
  float32 array; it compiles in the process that first calls it (a forked loader worker or a Ray actor compiles
  its own: compiled models do not survive a fork), on as many threads as torch has there.

Every call that compiles (`keeps_signal_stack`) leaves the calling thread's alternate signal stack as it found it:
OpenVINO's CPU plugin gives the compiling thread a signal stack of its own, unmaps it when the compiled model
goes, and leaves the thread pointing at it when models go in the order they came (not the reverse). The next signal
handled there (a child's SIGCHLD with torch's loader handler installed, gpl's decode timeout) then killed the
process or wrote its frame over reused memory.

OpenVINO is an optional extra, imported only when a run uses it: `installed` and `openvino_version` read the
package's metadata without importing it, so `--runtime auto` costs nothing where torch is chosen.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
from torch import nn

from gpl_cli.atomic import write_failed
from gpl_cli.errors import GplError, missing
from gpl_cli.models.catalog import cache_dir
from gpl_cli.version import __version__

OPENVINO_MISSING = missing("--runtime openvino needs OpenVINO", "openvino", "openvino")
INPUT_POLICY = "float32 NCHW, dynamic batch, height and width"
# --precision -> INFERENCE_PRECISION_HINT. The IR keeps float32 weights; bf16 is chosen when compiling.
HINTS = {"fp32": "f32", "bf16": "bf16"}
# How far float32 OpenVINO may be from torch, relative to the largest value (of the map at conversion; of each
# row's vector in the tests): measured at most 5e-6 for every pooling of efficientnet_lite0 and of a resnet18
# --layer tap, at the crop size and another (docs/runtime.md). A graph that went wrong is off by O(1).
TOLERANCE = 1e-4
MODEL_XML, MODEL_BIN, ENTRY = "model.xml", "model.bin", "entry.json"
log = logging.getLogger(__name__)


class Unconvertible(GplError):
    """OpenVINO cannot run this trunk as torch does; the message says why."""


def installed() -> bool:
    """Whether OpenVINO can be imported here, without importing it (a fraction of a second saved per run)."""
    return importlib.util.find_spec("openvino") is not None


def without_usage_reports() -> None:
    """Keep OpenVINO's converter and NNCF from reporting usage: both send statistics to Google Analytics unless
    a consent file in the user's home says no, and write that folder (~/intel) on first use. Both fall back to a
    stub when their telemetry package cannot be imported, which an entry of None in sys.modules makes so."""
    sys.modules.setdefault("openvino_telemetry", None)


def import_openvino():
    without_usage_reports()
    try:
        import openvino
    except ImportError:
        raise GplError(OPENVINO_MISSING) from None
    return openvino


def openvino_version() -> str:
    """The installed OpenVINO's version, from its package metadata (no import)."""
    try:
        return version("openvino")
    except PackageNotFoundError:
        raise GplError(OPENVINO_MISSING) from None


# --- conversion ---------------------------------------------------------------------------


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]  # Linux's stack_t


def keeps_signal_stack(function: Callable) -> Callable:
    """`function` (a call into OpenVINO that may compile a model) run so that the calling thread's alternate
    signal stack is as it was when the call returns (module docstring). Linux only, where it was seen."""

    @functools.wraps(function)
    def kept(*args, **kwargs):
        sigaltstack = ctypes.CDLL(None).sigaltstack if sys.platform.startswith("linux") else None
        before = _SignalStack()
        if sigaltstack is None or sigaltstack(None, ctypes.byref(before)) != 0:
            return function(*args, **kwargs)
        try:
            return function(*args, **kwargs)
        finally:
            sigaltstack(ctypes.byref(before), None)

    return kept


def _check_size(size: int) -> tuple[int, int]:
    """An input height and width unlike the example's: odd, so any size-dependent padding the trace froze shows."""
    return size + 7, size * 3 // 4 + 1


@keeps_signal_stack
def convert(trunk: nn.Module, example: torch.Tensor):
    """`trunk` (float32 NCHW in, N x C x h x w out) as an openvino.Model taking any batch, height and width,
    traced on `example`; Unconvertible when OpenVINO cannot convert it, or its output at another input size
    differs from torch's by more than TOLERANCE."""
    ov = import_openvino()
    trunk = trunk.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values; the check below is what counts
            model = ov.convert_model(trunk, example_input=example, input=[(-1, 3, -1, -1)])
    except Exception as exc:  # noqa: BLE001 - any failure of the converter means: run it on torch
        raise Unconvertible(f"OpenVINO cannot convert it ({type(exc).__name__}: {_first_line(exc)})") from None
    height, width = _check_size(example.shape[-1])
    probe = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        expected = trunk(probe).float().numpy()
    got = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(probe.numpy())[0]
    scale = max(float(np.abs(expected).max()), 1e-6)
    if got.shape != expected.shape:
        differs = f"gives a {'x'.join(map(str, got.shape[1:]))} map where torch gives {'x'.join(map(str, expected.shape[1:]))}"
    elif float(np.abs(got - expected).max()) > TOLERANCE * scale:
        differs = f"differs from torch by {float(np.abs(got - expected).max()) / scale:.1e} of the map's range"
    else:
        return model
    raise Unconvertible(f"its converted form {differs} at a {height}x{width} input: the traced graph depends on "
                        "the input size")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"


# --- the cache ----------------------------------------------------------------------------


@dataclass(frozen=True)
class IR:
    """A model in OpenVINO's IR form, in memory: its graph (.xml) and weights (.bin)."""

    xml: bytes
    weights: bytes

    def model(self):
        """The openvino.Model (for a transformation such as quantization)."""
        return import_openvino().Core().read_model(model=self.xml, weights=self.weights)


def cache_root() -> str:
    return os.path.join(cache_dir(), "openvino")


def compiled_cache() -> str:
    """Where OpenVINO keeps the compiled forms of the cached models (its own format and checks)."""
    return os.path.join(cache_root(), "compiled")


def entry_parts(parts: dict) -> dict:
    """What a cache entry is keyed by: the caller's `parts` and the software that made it."""
    return {**parts, "openvino": openvino_version(), "torch": torch.__version__, "gpl": __version__}


def entry_folder(parts: dict) -> str:
    keyed = entry_parts(parts)
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:32]
    return os.path.join(cache_root(), digest)


def is_cached(parts: dict) -> bool:
    """Whether an entry for `parts` exists (not checked: `cached` checks it when it reads it)."""
    return os.path.isfile(os.path.join(entry_folder(parts), ENTRY))


def cached(parts: dict, build: Callable[[], object]) -> tuple[IR, bool]:
    """The IR cached for `parts`, or `build()`'s openvino.Model saved there first (also when the entry there is
    damaged); and whether it was built now. A build that raised Unconvertible is remembered as such: later
    calls raise it again at once (another OpenVINO, torch or gpl version is another entry, and tries again)."""
    folder, keyed = entry_folder(parts), entry_parts(parts)
    found = _read(folder, keyed)
    built = found is None
    if built:
        try:
            model = build()
        except Unconvertible as exc:
            _store(folder, keyed, None, str(exc))
            raise
        _store(folder, keyed, model)
        found = _read(folder, keyed)
        if found is None:
            raise GplError(f"the OpenVINO model cached in {folder} could not be read back just after it was written")
    if isinstance(found, str):
        raise Unconvertible(found)
    return found, built


def _read(folder: str, keyed: dict) -> IR | str | None:
    """The entry's IR if it is whole (its record names these parts and its files have the recorded sha256), or
    the reason it records that the model is unconvertible; None for no entry or a damaged one."""
    try:
        with open(os.path.join(folder, ENTRY), encoding="utf-8") as f:
            record = json.load(f)
        if isinstance(record, dict) and record.get("parts") == keyed and isinstance(record.get("unconvertible"), str):
            return record["unconvertible"]
        files = {}
        for name in (MODEL_XML, MODEL_BIN):
            with open(os.path.join(folder, name), "rb") as f:
                files[name] = f.read()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("parts") != keyed:
        return None
    if any(record.get("sha256", {}).get(name) != hashlib.sha256(data).hexdigest() for name, data in files.items()):
        return None
    return IR(files[MODEL_XML], files[MODEL_BIN])


def _store(folder: str, keyed: dict, model, unconvertible: str | None = None) -> None:
    """Save `model` (or the reason it is `unconvertible`) as the entry `folder`: written in a folder of this
    process's own, then renamed into place."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    partial = f"{folder}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        os.makedirs(partial)
        record = {"parts": keyed}
        if unconvertible is None:
            import_openvino().save_model(model, os.path.join(partial, MODEL_XML), compress_to_fp16=False)  # as converted
            record["sha256"] = {}
            for name in (MODEL_XML, MODEL_BIN):
                with open(os.path.join(partial, name), "rb") as f:
                    record["sha256"][name] = hashlib.sha256(f.read()).hexdigest()
        else:
            record["unconvertible"] = unconvertible
        with open(os.path.join(partial, ENTRY), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        if os.path.exists(folder) and _read(folder, keyed) is None:  # damaged: moved away whole, then deleted
            trash = f"{partial}.damaged"
            with suppress(FileNotFoundError):  # another run may be replacing it too
                os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
        with suppress(OSError):  # a run beside this one landed its entry first: theirs is as good
            os.rename(partial, folder)
    except OSError as exc:
        raise write_failed(exc, folder) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def trunk_parts(backbone) -> dict:
    """What a backbone's converted trunk depends on (besides the software: entry_parts)."""
    return {"backbone": backbone.name, "weights_sha256": backbone.weights_sha256, "layer": backbone.layer,
            "input": INPUT_POLICY, "precision": "fp32"}


def compiled_trunk(backbone, precision: str) -> Compiled:
    """The backbone's trunk on OpenVINO at `precision`, converted first (with a note) where nothing is cached."""
    if not is_cached(trunk_parts(backbone)):
        log.info("converting %s for OpenVINO (once on this machine, up to a minute; cached in %s)",
                 backbone.name, cache_root())
    ir, _ = converted(backbone)
    return Compiled(ir, precision)


def converted(backbone) -> tuple[IR, bool]:
    """The backbone's trunk as a cached IR (converted now if it is not cached, Unconvertible if it cannot be);
    and whether it was converted now."""
    size = backbone.preprocess.crop
    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return cached(trunk_parts(backbone), lambda: convert(backbone.trunk, example))


# --- running ------------------------------------------------------------------------------


class Compiled:
    """A compiled IR as a callable: float32 NCHW (numpy, or a CPU tensor) in, the output as a new float32 array.

    Compiled on first use in each process (see the module docstring), with the precision hint of `precision`
    (HINTS) and as many threads as torch has in that process, unless `threads` is given; pickling carries the
    IR, not the compiled model."""

    def __init__(self, ir: IR, precision: str = "fp32", threads: int | None = None):
        self.ir, self.precision, self.threads = ir, precision, threads
        self._request, self._pid = None, None

    def __getstate__(self) -> dict:
        return {"ir": self.ir, "precision": self.precision, "threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["ir"], state["precision"], state["threads"])

    @keeps_signal_stack
    def compile(self) -> None:
        """Compile now, in this process (the first call does it otherwise)."""
        ov = import_openvino()
        threads = self.threads or torch.get_num_threads()
        config = {"INFERENCE_PRECISION_HINT": HINTS[self.precision], "INFERENCE_NUM_THREADS": threads,
                  "PERFORMANCE_HINT": "LATENCY"}
        try:  # OpenVINO's own cache of compiled models: a cached compile takes a fraction of the time
            compiled = ov.Core().compile_model(self.ir.model(), "CPU", {**config, "CACHE_DIR": compiled_cache()})
        except RuntimeError:  # its cache unusable (unwritable, damaged): compile afresh
            compiled = ov.Core().compile_model(self.ir.model(), "CPU", config)
        self._request = compiled.create_infer_request()
        self._pid = os.getpid()

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        if self._pid != os.getpid():
            self.compile()
        if isinstance(x, torch.Tensor):
            x = x.detach().contiguous().numpy()
        # the output is copied out: the request reuses its buffer on the next call
        return self._request.infer(np.ascontiguousarray(x, dtype=np.float32), share_inputs=True,
                                   share_outputs=False)[0]
