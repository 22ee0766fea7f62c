"""int8 post-training quantization of a converted OpenVINO model (NNCF), and how far it moves the vectors.

`quantize_checked` splits a calibration sample: most of it calibrates the quantization ranges, and the rest
(HELD_OUT, never seen by the calibration) measures the quantized model's agreement with the float32 one, as
the cosine between the average-pooled feature maps of each held-out image. Inputs are what the model takes
(normalised float32 arrays, one image per array, any H x W the model accepts); the caller prepares them.

`quantized_trunk` is what a run uses: the backbone's converted trunk (gpl_cli.models.openvino) quantized on a
sample and cached like the conversion, keyed by the sample's identity too; the agreement travels inside the
cached model (its runtime info), so a cached run reports it without quantizing again.
openvino and nncf are imported only when a model is quantized or run.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gpl_cli.errors import GplError, missing
from gpl_cli.models import openvino

log = logging.getLogger(__name__)
AGREEMENT_INFO = ["gpl", "int8_agreement"]  # where a quantized model carries its Agreement (runtime info)
HELD_OUT = 0.2  # the share of the sample kept out of the calibration to measure the agreement
MIN_IMAGES = 10  # below this, neither the ranges nor the agreement would mean anything


@dataclass(frozen=True)
class Agreement:
    """Cosines between the quantized model's and the float32 model's average-pooled maps, on held-out images."""

    smallest: float
    median: float
    images: int

    def describe(self) -> str:
        return (f"int8 agreement with f32 on {self.images} held-out images: smallest cosine {self.smallest:.4f}, "
                f"median {self.median:.4f}")

    def as_metadata(self) -> dict:
        return {"min_cosine": round(self.smallest, 6), "median_cosine": round(self.median, 6),
                "held_out_images": self.images}

    @classmethod
    def from_metadata(cls, doc: dict) -> Agreement:
        return cls(float(doc["min_cosine"]), float(doc["median_cosine"]), int(doc["held_out_images"]))


def check_sample_size(count: int, origin: str = "this sample") -> None:
    if count < MIN_IMAGES:
        raise GplError(f"--precision int8 calibrates on at least {MIN_IMAGES} images and {origin} has {count}: "
                       "embed more images or give a folder of similar photos with --calibration DIR")


def split(count: int) -> tuple[list[int], list[int]]:
    """(calibration, held-out) positions of a sample of `count` images: every fifth image held out, so both
    parts spread over the whole sample, the same way on every run."""
    check_sample_size(count)
    step = round(1 / HELD_OUT)
    held = list(range(step - 1, count, step))
    return [i for i in range(count) if (i + 1) % step], held


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two N x D arrays (1 where both rows are zero)."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1), 1.0)


def agreement(reference: np.ndarray, quantized: np.ndarray) -> Agreement:
    """Smallest and median cosine between two N x D arrays of pooled vectors, row by row."""
    cos = cosines(reference.astype(np.float64), quantized.astype(np.float64))
    return Agreement(float(cos.min()), float(np.median(cos)), len(cos))


def pooled(infer: Callable[[np.ndarray], np.ndarray], inputs: Sequence[np.ndarray]) -> np.ndarray:
    """N x C: each input's feature map (1 x C x h x w) averaged over h and w."""
    return np.concatenate([np.asarray(infer(x), np.float32).mean(axis=(2, 3)) for x in inputs])


def import_nncf():
    # NNCF loads torch's extension builder, which warns that this machine has no CUDA: not the user's concern
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    openvino.without_usage_reports()
    try:
        import nncf
    except ImportError:
        raise GplError(missing("--precision int8 quantizes the model with NNCF", "nncf", "openvino")) from None
    return nncf


@openvino.keeps_signal_stack
def quantize(model, inputs: Sequence[np.ndarray]):
    """The OpenVINO model `model` quantized to int8 with ranges calibrated on `inputs` (NNCF post-training,
    its default preset: symmetric int8 weights and activations, with fast bias correction)."""
    nncf = import_nncf()
    logging.getLogger("nncf").setLevel(logging.ERROR)
    # NNCF draws its progress bars on stdout, which carries gpl's data: they are dropped.
    with contextlib.redirect_stdout(io.StringIO()):
        return nncf.quantize(model, nncf.Dataset(list(inputs)), subset_size=len(inputs))


def quantize_checked(model, inputs: Sequence[np.ndarray], compile: Callable) -> tuple[object, Agreement]:
    """`model` quantized on most of `inputs`, and its Agreement with `model` itself on the rest (`split`).

    `compile(model)` returns a callable from one input array to the model's output map, running in float32
    (for the reference) or as quantized: the caller's runtime settings (threads, precision hint) apply."""
    calibrate, held = split(len(inputs))
    quantized = quantize(model, [inputs[i] for i in calibrate])
    held_inputs = [inputs[i] for i in held]
    return quantized, agreement(pooled(compile(model), held_inputs), pooled(compile(quantized), held_inputs))


def int8_parts(backbone, sample: str) -> dict:
    """What a quantized trunk depends on: the converted trunk's parts, and the calibration sample's identity."""
    return {**openvino.trunk_parts(backbone), "precision": "int8", "calibration": sample}


@openvino.keeps_signal_stack
def _compile_f32(model) -> Callable[[np.ndarray], np.ndarray]:
    """`model` compiled for the agreement check: float32 where not quantized, this process's threads."""
    import torch

    ov = openvino.import_openvino()
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                      "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    return openvino.keeps_signal_stack(lambda x: compiled(x)[0])  # its first call makes an infer request


def quantized_trunk(backbone, sample: str, inputs: Callable[[], Sequence[np.ndarray]],
                    origin: str = "the calibration sample") -> tuple[openvino.Compiled, Agreement]:
    """The backbone's trunk quantized to int8 on the sample identified by `sample`, whose model inputs
    `inputs()` gives (called only when nothing is cached), as a Compiled; and its Agreement with float32."""
    parts = int8_parts(backbone, sample)
    if not openvino.is_cached(parts):
        import_nncf()  # missing: say so before converting anything
        log.info("quantizing %s to int8 on %s (once for this sample; cached in %s)", backbone.name, origin,
                 openvino.cache_root())

    def build():
        ir, _ = openvino.converted(backbone)
        model, agree = quantize_checked(ir.model(), inputs(), _compile_f32)
        model.set_rt_info(json.dumps(agree.as_metadata()), AGREEMENT_INFO)
        return model

    ir, _ = openvino.cached(parts, build)
    agree = Agreement.from_metadata(json.loads(ir.model().get_rt_info(AGREEMENT_INFO).astype(str)))
    return openvino.Compiled(ir, "fp32"), agree
