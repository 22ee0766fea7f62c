"""A backbone's own trained classifier, applied to pooled vectors.

The head of a GAP network is one affine map from the avg-pooled final map to class logits
(`Backbone.classifier`, found where each family is loaded). Here it becomes numpy arrays plus
the ImageNet class names (imagenet_classes.txt: the names torchvision gives its weights, kept here
so that classifying with a bundled backbone does not import torchvision).
`gpl classify` and the class activation maps of `gpl explain` both read it from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from gpl_cli.errors import GplError

IMAGENET_CLASSES = 1000
CLASS_NAMES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.txt")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order."""
    with open(CLASS_NAMES_FILE, encoding="utf-8") as f:
        return f.read().splitlines()


@dataclass(frozen=True)
class ClassifierHead:
    weight: np.ndarray  # K x C float32
    bias: np.ndarray  # K float32
    names: list[str] | None  # class names in index order, when the head has ImageNet's 1000 outputs
    trained_pool: str = "avg"  # the pooling the head was trained on

    def logits(self, vectors: np.ndarray) -> np.ndarray:
        """N x C pooled vectors -> N x K logits."""
        return vectors.astype(np.float64) @ self.weight.T.astype(np.float64) + self.bias

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        z = self.logits(vectors)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def name(self, index: int) -> str:
        return self.names[index] if self.names else f"class {index}"

    def top_k(self, vectors: np.ndarray, k: int) -> list[list[tuple[int, str, float]]]:
        """Per row, the k most probable classes as (index, name, probability), most probable first."""
        probs = self.probabilities(vectors)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(int(i), self.name(int(i)), float(p[i])) for i in row] for row, p in zip(order, probs)]


def classifier_head(backbone) -> ClassifierHead:
    """The trained head of `backbone` (a `backbones.Backbone`), or a GplError saying why there is none."""
    linear = backbone.classifier
    if linear is None:
        why = (f"--layer {backbone.layer} is not the map the head was trained on" if backbone.layer
               else "its classifier is not one linear layer on the average-pooled map")
        raise GplError(f"{backbone.name} has no usable trained classifier head: {why}")
    weight = linear.weight.detach().float().cpu().numpy()
    bias = (linear.bias.detach().float().cpu().numpy() if linear.bias is not None
            else np.zeros(weight.shape[0], np.float32))
    if weight.shape[1] != backbone.channels:
        raise GplError(f"{backbone.name}: the classifier takes {weight.shape[1]} features, the map has {backbone.channels}")
    names = imagenet_class_names() if weight.shape[0] == IMAGENET_CLASSES else None
    return ClassifierHead(weight, bias, names)
