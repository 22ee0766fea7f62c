"""EfficientNet-Lite0/1/2 in plain torch: the default backbone without importing timm.

timm builds the same networks, but importing timm imports torchvision, and the two would take
most of a one-image `gpl embed` (see bench/RESULTS.md, 'Start-up'; `python bench/startup.py`). The
modules here are named and ordered as in timm's tf_efficientnet_liteN, so the same state dicts load
strictly and `--layer` names stay the same; tests/unit/models/test_efficientnet_lite.py checks the
outputs against timm's.

The architecture is the paper's (Tan & Le, 2019) in its Lite form: ReLU6, no squeeze-and-excitation,
stem (32) and head (1280) not scaled, the first and last stage not deepened, and TensorFlow's
"SAME" padding, which pads a stride-2 convolution more on the bottom and right.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# Stages as (block, repeats, kernel, stride, expansion, output channels): "ds" is a depthwise-
# separable block, "ir" an inverted residual (expand 1x1, depthwise, project 1x1).
STAGES = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
STEM, HEAD, CLASSES = 32, 1280, 1000
VARIANTS = {  # name: (width multiplier, depth multiplier)
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}
BN_EPS = 1e-3  # TensorFlow's default, which the weights were trained with


def scaled_channels(channels: int, width: float) -> int:
    """channels x width, to a multiple of 8, never more than 10% below the exact product."""
    exact = channels * width
    rounded = max(8, int(exact + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * exact else rounded


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME": the output is ceil(size / stride); the odd padding pixel goes after.

    Integer arithmetic only, which a trace follows for any input size (one OpenVINO conversion serves every
    size: gpl_cli/models/openvino.py); kernel >= stride in these networks, so the total is never negative."""
    total = kernel - stride + (stride - size % stride) % stride
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A strided convolution padded from its input's size, as TensorFlow pads it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        return self._conv_forward(F.pad(x, (left, right, top, bottom)), self.weight, self.bias)


class BatchNormAct2d(nn.BatchNorm2d):
    """Batch norm then ReLU6 (or nothing), with timm's submodule names (drop, act).

    inference.fold_batchnorm folds the normalisation into the convolution before it and keeps
    `drop` and `act`."""

    def __init__(self, channels: int, act: bool):
        super().__init__(channels, eps=BN_EPS)
        self.drop = nn.Identity()
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride == 1:  # an odd kernel at stride 1: "SAME" is symmetric, fixed padding
        return nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
    return SameConv2d(cin, cout, kernel, stride, groups=groups, bias=False)


class Block(nn.Module):
    """Its layers in the order they were registered, plus the input where the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.children():
            out = layer(out)
        return out + x if self.skip else out


class DepthwiseSeparable(Block):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__(cin, cout, stride)
        self.conv_dw = conv(cin, cin, kernel, stride, groups=cin)
        self.bn1 = BatchNormAct2d(cin, act=True)
        self.conv_pw = conv(cin, cout, 1)
        self.bn2 = BatchNormAct2d(cout, act=False)


class InvertedResidual(Block):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int):
        super().__init__(cin, cout, stride)
        mid = cin * expansion
        self.conv_pw = conv(cin, mid, 1)
        self.bn1 = BatchNormAct2d(mid, act=True)
        self.conv_dw = conv(mid, mid, kernel, stride, groups=mid)
        self.bn2 = BatchNormAct2d(mid, act=True)
        self.conv_pwl = conv(mid, cout, 1)
        self.bn3 = BatchNormAct2d(cout, act=False)


class EfficientNetLite(nn.Module):
    """The classification network; `forward_features` is the trunk gpl pools (1280 x h x w after ReLU6)."""

    def __init__(self, name: str):
        super().__init__()
        width, depth = VARIANTS[name]
        self.num_features = HEAD
        self.conv_stem = conv(3, STEM, 3, stride=2)
        self.bn1 = BatchNormAct2d(STEM, act=True)
        stages, cin = [], STEM
        for i, (kind, repeats, kernel, stride, expansion, channels) in enumerate(STAGES):
            cout = scaled_channels(channels, width)
            n = repeats if i in (0, len(STAGES) - 1) else math.ceil(repeats * depth)
            blocks = []
            for b in range(n):
                s = stride if b == 0 else 1
                blocks.append(DepthwiseSeparable(cin, cout, kernel, s) if kind == "ds"
                              else InvertedResidual(cin, cout, kernel, s, expansion))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = conv(cin, HEAD, 1)
        self.bn2 = BatchNormAct2d(HEAD, act=True)
        self.classifier = nn.Linear(HEAD, CLASSES)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
