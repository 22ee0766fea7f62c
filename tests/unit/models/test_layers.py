"""--layer: an intermediate map instead of the last one, and `gpl models --layers` listing what can be tapped."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLE_IMAGES
from torchvision import models

from gpl_cli.cli import cli
from gpl_cli.embedding.images import Preprocess, open_rgb, preprocess_image
from gpl_cli.errors import GplError
from gpl_cli.models.backbones import Backbone, LayerTap, _torchvision_cut, layer_table, measure_feature_map, tap_layer
from gpl_cli.store.formats import read_embeddings


def _random_resnet18() -> tuple[torch.nn.Module, Backbone]:
    """A resnet18 with random weights (never presented as pretrained): geometry only."""
    torch.manual_seed(0)
    model = models.resnet18().eval()
    cut, where = _torchvision_cut("resnet18")
    pre = Preprocess(64, 64, (0.5,) * 3, (0.5,) * 3)
    return model, Backbone("resnet18", cut(model).eval(), pre, "random (test)", "-", where)


def test_tap_returns_that_module_output_and_skips_the_rest():
    model, backbone = _random_resnet18()
    ran = []
    model.layer4.register_forward_hook(lambda *a: ran.append("layer4"))
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        want = model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))))
        got = LayerTap(backbone.trunk, "layer3")(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert ran == []


def test_lite0_intermediate_block(lite0):
    backbone = copy.deepcopy(lite0)
    tap_layer(backbone, "blocks.5")
    assert backbone.layer == "blocks.5" and backbone.metadata()["layer"] == "blocks.5"
    assert "--layer blocks.5" in backbone.cut
    assert measure_feature_map(backbone.trunk, 224) == (192, 7, 7)
    m = lite0.trunk.model
    x = torch.rand(1, 3, 96, 128)
    with torch.inference_mode():
        want = m.blocks[:6](m.bn1(m.conv_stem(x)))
        torch.testing.assert_close(backbone.trunk(x), want, rtol=0, atol=0)


def test_unknown_or_ambiguous_layers_are_clear_errors():
    _, backbone = _random_resnet18()
    with pytest.raises(GplError) as err:
        tap_layer(backbone, "layer33")
    assert "did you mean layer3" in str(err.value) and "gpl models --layers resnet18" in str(err.value)
    with pytest.raises(GplError, match="runs 2 times in one forward pass"):
        tap_layer(backbone, "layer1.0.relu")  # torchvision reuses one ReLU module inside each block


def test_layer_table_lists_maps_in_forward_order():
    model, backbone = _random_resnet18()
    table = layer_table(backbone.trunk, 64)
    names = [t.name for t in table]
    assert names[0] == "conv1" and names.index("layer2") < names.index("layer3.0.conv1") < names.index("layer4")
    info = {t.name: t for t in table}
    assert info["layer4"].shape == (512, 2, 2) and info["layer4"].calls == 1
    assert info["layer1.0.relu"].calls == 2
    assert "fc" not in info and "avgpool" not in info  # cut away: never run


def test_models_layers_command(tmp_path):
    result = CliRunner().invoke(cli, ["models", "--layers", "resnet18", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["layer4"] == {"name": "layer4", "kind": "Sequential", "channels": 512, "map_size": [7, 7]}
    assert rows["layer3.1.conv2"]["channels"] == 256
    assert "layer1.0.relu" not in rows  # runs twice: not usable with --layer
    text = CliRunner().invoke(cli, ["models", "--layers", "efficientnet_lite0"])
    assert text.exit_code == 0 and "blocks.5" in text.stdout and "usable with --layer" in text.stderr


def test_embed_with_layer_records_it_and_pools_that_map(lite0, tmp_path):
    out = tmp_path / "l.h5"
    image = SAMPLE_IMAGES / "coffee.png"
    result = CliRunner().invoke(cli, ["embed", str(image), "-o", str(out), "--layer", "blocks.4", "-p", "avg,max", "-q"])
    assert result.exit_code == 0, result.output
    emb = read_embeddings(str(out))
    assert emb.metadata["layer"] == "blocks.4" and emb.metadata["config"]["layer"] == "blocks.4"
    m = lite0.trunk.model
    pixels = preprocess_image(open_rgb(str(image)), lite0.preprocess)[None].float() / 255.0
    with torch.inference_mode():
        fmap = m.blocks[:5](m.bn1(m.conv_stem((pixels - 0.5) / 0.5))).double().numpy()[0]
    assert emb.vectors["avg"].shape == (1, fmap.shape[0])
    np.testing.assert_allclose(emb.vectors["avg"][0], fmap.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(emb.vectors["max"][0], fmap.max(axis=(1, 2)), rtol=1e-4, atol=1e-5)
