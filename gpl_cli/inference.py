"""A trunk made ready for fast inference: batch norms folded into their convolutions, layout, device.

In eval mode a batch norm is a fixed per-channel scale and shift; when it directly follows a
convolution whose output nothing else reads, the scale and shift can live in the convolution's
weight and bias instead, which saves one full pass over every such activation map (1.13-1.17x
for EfficientNet-Lite0 on a CPU, `python bench/techniques.py fold`). Only the float rounding
changes. The graph comes from torch.fx; a trunk fx cannot trace runs unfolded.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

# Names how prepare_trunk transforms a trunk; a measured plan (tuning.py) holds for this form only.
TRUNK_FORM = "bn-folded"


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
        parent, _, name = node.target.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, name, remainder)
        folded += 1
    return (module, folded) if folded else (trunk, 0)


def prepare_trunk(trunk: nn.Module, device: torch.device, memory_format: torch.memory_format) -> nn.Module:
    """A copy of `trunk` for inference on `device`: batch norms folded, in `memory_format`."""
    ready, _ = fold_batchnorm(copy.deepcopy(trunk).eval())
    return ready.to(device, memory_format=memory_format).eval()
