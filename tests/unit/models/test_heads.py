"""The backbone's own classifier head: real ImageNet predictions, and which heads exist."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpl_cli.embedding.embedder import Embedder
from gpl_cli.embedding.images import open_rgb, preprocess_image
from gpl_cli.errors import GplError
from gpl_cli.models.backbones import Backbone, load_backbone
from gpl_cli.models.heads import classifier_head, imagenet_class_names
from gpl_cli.pooling.spec import parse_pool_list
from tests.conftest import SAMPLE_IMAGES


def test_imagenet_names_come_in_index_order():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert (names[0], names[282], names[967]) == ("tench", "tiger cat", "espresso")
    from torchvision.models import ResNet18_Weights  # the list gpl keeps is torchvision's, name for name

    assert names == list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def test_lite0_head_predicts_the_sample_photos(lite0, timm_lite0):
    head = classifier_head(lite0)
    assert head.weight.shape == (1000, 1280)
    embedder = Embedder(lite0, parse_pool_list(["avg"]))
    pixels = torch.stack([preprocess_image(open_rgb(str(SAMPLE_IMAGES / n)), lite0.preprocess)
                          for n in ("cat_chelsea.png", "coffee.png")])
    vectors = embedder.embed_pixels(pixels)["avg"]
    (cat, *_), (coffee, *_) = head.top_k(vectors, 3)
    assert 281 <= cat[0] <= 285 and "cat" in cat[1]
    assert coffee[:2] == (967, "espresso")
    # Independent check: the timm model's own forward (its pooling and its classifier).
    model = timm_lite0
    with torch.inference_mode():
        x = (pixels.float() / 255 - 0.5) / 0.5
        reference = torch.softmax(model(x), dim=1).numpy()
    np.testing.assert_allclose(head.probabilities(vectors), reference, atol=1e-5)


def test_top_k_is_sorted_and_sums_below_one(lite0):
    head = classifier_head(lite0)
    rows = head.top_k(np.random.default_rng(0).random((2, 1280), dtype=np.float32), 5)
    for row in rows:
        probs = [p for _, _, p in row]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9


def test_a_tapped_layer_has_no_head():
    backbone = load_backbone("efficientnet_lite0", layer="blocks.5")
    with pytest.raises(GplError, match="--layer blocks.5"):
        classifier_head(backbone)


@pytest.mark.parametrize("name,has_head", [("resnet18", True), ("efficientnet_b0", True), ("mobilenet_v3_small", False),
                                           ("convnext_tiny", False), ("vgg11", False), ("squeezenet1_0", False)])
def test_torchvision_heads_only_where_they_are_one_linear_layer(name, has_head):
    from torchvision import models

    from gpl_cli.models.backbones import _linear_head

    model = models.get_model(name, weights=None)
    head = _linear_head(model)
    assert (head is not None) == has_head
    if has_head:
        assert head.out_features == 1000


def test_missing_head_names_the_backbone():
    backbone = Backbone("x", torch.nn.Identity(), None, "w", "-", "cut", (8, 1, 1))
    with pytest.raises(GplError, match="x has no usable trained classifier head"):
        classifier_head(backbone)
