"""`Preprocess`: what a backbone expects of its input (sizes, interpolation, mean and std), torch-free.

Each backbone family states its own (gpl_cli.models.backbones); decoding applies it (gpl_cli.embedding.images).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes a network input.

    mode "crop": resize the shorter side to `resize`, centre-crop `crop` x `crop`.
    mode "keep-aspect": resize so the longer side is `max_size`, no crop (shapes then vary).
    Then normalise with mean/std.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # or "bicubic"
    mode: str = "crop"
    max_size: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)
