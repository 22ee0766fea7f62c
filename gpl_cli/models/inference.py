"""A trunk made ready for fast inference: batch norms folded into their convolutions, 1x1
convolutions kept on oneDNN, layout, device.

In eval mode a batch norm is a fixed per-channel scale and shift; when it directly follows a
convolution whose output nothing else reads, the scale and shift can live in the convolution's
weight and bias instead, which saves one full pass over every such activation map (see
bench/RESULTS.md, 'Speed techniques, one at a time': batch norms folded; `python bench/techniques.py
fold`). Only the float rounding changes. The graph comes from torch.fx; a trunk fx cannot trace runs unfolded.

torch sends a float32 1x1 convolution on fewer than 16 images in a single-threaded process to
its reference kernel rather than oneDNN (a heuristic in its convolution dispatch), and gpl's CPU
workers are single-threaded: there oneDNN runs the default backbone faster at small batches (the
same values up to float rounding), and the same at two threads, where torch already picks it (see
bench/RESULTS.md, 'Speed techniques, one at a time': 1x1 convolutions on oneDNN; `python
bench/techniques.py pointwise`). So on a CPU in float32 those convolutions call oneDNN directly
(`OneDnnConv2d`).
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

# Names how prepare_trunk transforms a trunk; a measured plan (tuning.py) holds for this form only.
TRUNK_FORM = "bn-folded, 1x1 on oneDNN"


class _Tracer(fx.Tracer):
    """Convolutions and batch norms stay whole modules (TF-style 'same' convolutions compute their
    padding from the input shape, which symbolic tracing cannot follow)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What remains of a batch-norm module once its normalisation is folded away; None if unknown."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):  # timm: bn, drop, act
        return nn.Sequential(bn.drop, bn.act)
    return None


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where `root.get_submodule(name)` is."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv <- bn(conv(.)) for the running statistics (eval mode)."""
    scale = bn.running_var.add(bn.eps).rsqrt()
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)


@torch.no_grad()
def fold_batchnorm(trunk: nn.Module) -> tuple[nn.Module, int]:
    """`trunk` (modified: pass a copy) with every foldable batch norm folded; and how many were.

    A batch norm is folded when its input is the output of a convolution that is called once and
    read by nothing else, and the batch norm is a plain one or timm's BatchNormAct2d.
    """
    try:
        graph = _Tracer().trace(trunk)
    except Exception:  # noqa: BLE001 - any untraceable model simply runs as it is
        return trunk, 0
    module = fx.GraphModule(trunk, graph, type(trunk).__name__)
    modules = dict(module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None or calls[node.target] != 1:
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        conv = modules.get(source.target) if isinstance(source, fx.Node) and source.op == "call_module" else None
        remainder = _after_norm(bn)
        if not isinstance(conv, nn.Conv2d) or calls[source.target] != 1 or len(source.users) != 1 or remainder is None:
            continue
        _fold_into(conv, bn)
        replace_submodule(module, node.target, remainder)
        folded += 1
    return (module, folded) if folded else (trunk, 0)


class OneDnnConv2d(nn.Conv2d):
    """A float32 CPU convolution that always runs on oneDNN, whatever the batch size and threads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups)


def as_conv(conv: nn.Conv2d, cls: type[nn.Conv2d]) -> nn.Conv2d:
    """The same convolution (its parameters shared, not copied) as an instance of `cls`."""
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
              conv.dilation, conv.groups, bias=conv.bias is not None, device="meta")
    new.weight, new.bias = conv.weight, conv.bias
    return new


def pointwise_on_onednn(trunk: nn.Module) -> int:
    """Replace, in place, every plain 1x1 convolution of `trunk` by its OneDnnConv2d; returns how many.

    A convolution with hooks (a --layer tap) stays as it is, so the hook still fires."""
    targets = [name for name, m in trunk.named_modules()
               if type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.padding_mode == "zeros"
               and isinstance(m.padding, tuple) and not (m._forward_hooks or m._forward_pre_hooks)]
    for name in targets:
        replace_submodule(trunk, name, as_conv(trunk.get_submodule(name), OneDnnConv2d))
    return len(targets)


def prepare_trunk(trunk: nn.Module, device: torch.device, memory_format: torch.memory_format,
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of `trunk` for inference on `device` with compute type `dtype`: batch norms folded,
    1x1 convolutions on oneDNN (CPU, float32), in `memory_format`."""
    ready, _ = fold_batchnorm(copy.deepcopy(trunk).eval())
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        pointwise_on_onednn(ready)
    return ready.to(device, memory_format=memory_format).eval()
