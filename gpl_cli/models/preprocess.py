"""`Preprocess`: what a backbone expects of its input (sizes, interpolation, mean and std), torch-free.

Each backbone family states its own (gpl_cli.models.backbones); decoding applies it (gpl_cli.embedding.images).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes a network input.

    mode "crop": resize the shorter side to `resize`, centre-crop `crop` x `crop`.
    mode "keep-aspect": resize so the longer side is `max_size`, no crop (shapes then vary).
    Then normalise with mean/std. With several `scales` each image becomes one input per scale (`at`).
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # or "bicubic"
    mode: str = "crop"
    max_size: int | None = None
    scales: tuple[float, ...] = (1.0,)  # multiples of the input size each image is run at (--scales)

    def at(self, scale: float) -> Preprocess:
        """The one-scale preprocessing at `scale` times the input size: with a crop, the resize and the crop
        sizes scaled; keeping the aspect, the longer side; each rounded to the nearest integer."""
        if self.mode == "keep-aspect":
            return replace(self, max_size=round(self.max_size * scale), scales=(1.0,))
        return replace(self, resize=round(self.resize * scale), crop=round(self.crop * scale), scales=(1.0,))

    def as_dict(self) -> dict:
        """The sizes at scale 1; a file records its scales beside them (metadata "scales")."""
        return {k: v for k, v in asdict(self).items() if k != "scales"}
