"""Batch-norm folding: the folded trunk computes what PyTorch's own eager forward of the original does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gpl_cli.models.inference import OneDnnConv2d, fold_batchnorm, pointwise_on_onednn, prepare_trunk


def randomise_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            if m.running_mean is None:  # batch statistics only
                continue
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=g))
                m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def folded_and_plain(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        expected = model(x)
        folded, count = fold_batchnorm(copy.deepcopy(model))
        return folded, count, expected, folded(x)


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_every_batchnorm_of_lite0_is_folded_and_the_maps_agree(lite0):
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    folded, count, expected, got = folded_and_plain(lite0.trunk.eval(), x)
    assert count == count_batchnorms(lite0.trunk) == 49
    assert count_batchnorms(folded) == 0
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)  # values up to 6 (ReLU6)


def test_resnet_with_random_statistics_folds_exactly_up_to_rounding():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    trunk = randomise_batchnorms(nn.Sequential(*list(resnet18(weights=None).children())[:-2]))
    x = torch.randn(2, 3, 64, 64)
    folded, count, expected, got = folded_and_plain(trunk, x)
    assert count == count_batchnorms(trunk) == 20  # the downsample branches too
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale


class TwoReaders(nn.Module):
    """The convolution's output is read by the batch norm and by the sum: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    """One convolution called twice, followed once by a batch norm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


class ScaledNorm(nn.BatchNorm2d):
    """A batch-norm subclass that does more than normalise: unknown, so never folded."""

    def forward(self, x):
        return super().forward(x) * 2


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y  # control flow on values: symbolic tracing fails


@pytest.mark.parametrize("model, foldable", [
    (TwoReaders(), 0),
    (SharedConv(), 0),
    (nn.Sequential(nn.Conv2d(3, 4, 1), ScaledNorm(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), 1),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)), 0),  # not directly after the convolution
    (nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4, affine=False)), 1),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)), 0),  # batch statistics
])
def test_only_batchnorms_that_can_be_folded_are(model, foldable):
    x = torch.randn(3, 3, 8, 8)
    _, count, expected, got = folded_and_plain(randomise_batchnorms(model), x)
    assert count == foldable
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_an_untraceable_trunk_runs_unfolded():
    model = randomise_batchnorms(Untraceable())
    same, count = fold_batchnorm(model)
    assert count == 0 and same is model


def test_prepare_trunk_leaves_the_original_alone():
    from torchvision.models import resnet18

    trunk = randomise_batchnorms(nn.Sequential(*list(resnet18(weights=None).children())[:-2]))
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    ready = prepare_trunk(trunk, torch.device("cpu"), torch.channels_last)
    assert count_batchnorms(ready) == 0 and count_batchnorms(trunk) == 20
    assert all(torch.equal(before[k], v) for k, v in trunk.state_dict().items())
    assert ready.get_submodule("0").weight.is_contiguous(memory_format=torch.channels_last)


# --- 1x1 convolutions on oneDNN ---------------------------------------------------------------------


def _lite_with_random_weights():
    from gpl_cli.models.efficientnet_lite import EfficientNetLite

    torch.manual_seed(1)
    return randomise_batchnorms(EfficientNetLite("efficientnet_lite0")).eval()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("batch", [1, 4])
def test_pointwise_convolutions_on_onednn_compute_the_same_maps(memory_format, batch):
    """Single-threaded, small batches: torch would run these 1x1 convolutions on its reference
    kernel; on oneDNN the values are the same up to float rounding."""
    model = _lite_with_random_weights()
    reference = model.to(memory_format=memory_format)
    routed = copy.deepcopy(model)
    assert pointwise_on_onednn(routed) == 32  # 16 blocks' (1 or 2 each) and the head's
    assert all(type(m) is not nn.Conv2d or m.kernel_size != (1, 1) for m in routed.modules())
    x = torch.randn(batch, 3, 97, 130).contiguous(memory_format=memory_format)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            want, got = reference.forward_features(x), routed.forward_features(x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))


def test_pointwise_routing_keeps_hooked_convolutions_and_spares_other_precisions():
    model = _lite_with_random_weights()
    model.conv_head.register_forward_hook(lambda *a: None)  # what a --layer tap does
    assert pointwise_on_onednn(copy.deepcopy(model)) == 31
    bf16 = prepare_trunk(model, torch.device("cpu"), torch.channels_last, torch.bfloat16)
    assert not any(isinstance(m, OneDnnConv2d) for m in bf16.modules())  # autocast does not cover oneDNN's op
    fp32 = prepare_trunk(model, torch.device("cpu"), torch.channels_last)
    assert sum(isinstance(m, OneDnnConv2d) for m in fp32.modules()) == 31  # the tapped one stays
