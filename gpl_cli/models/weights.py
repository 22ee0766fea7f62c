"""Weight files: their identity (sha256) and loading their tensors into a model.

Torch-free at import, so that commands on files (`gpl whiten fit`) can hash a file without
loading torch; the functions that load tensors import it when called.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from typing import TYPE_CHECKING

from gpl_cli.errors import GplError

if TYPE_CHECKING:
    import torch
    from torch import nn


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a .pth/.pt file loaded with weights_only=True.

    A pickle that carries anything but tensors and plain containers is refused, never run.
    """
    import torch

    if not os.path.isfile(path):
        raise GplError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise GplError(
            f"refusing to load {path}: it is a pickle holding Python objects other than tensors, "
            f"which could run code when loaded ({str(exc).splitlines()[0]}). "
            "Save a plain state_dict (torch.save(model.state_dict(), ...)) or use .safetensors."
        ) from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a usage error
        raise GplError(f"cannot read weights file {path}: {exc}") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GplError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly, with an error that names the file and sums up the mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # torch lists every key on one line: thousands of characters for another architecture's file
        why = mismatch(model.state_dict(), state) or str(exc).strip().splitlines()[0]
        raise GplError(f"weights in {source} do not fit this architecture: {why}") from None


SHOWN_NAMES = 5  # names of each kind of mismatch that an error shows


def mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """How `given` differs from the `expected` state dict, in one line: how many tensors are missing,
    unexpected and of another shape, with the first few names of each ("" when none)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    reshaped = [f"{k} {_dims(given[k])} vs {_dims(v)}" for k, v in expected.items()
                if k in given and given[k].shape != v.shape]
    parts = []
    for what, names in (("missing tensors", missing), ("unexpected tensors", unexpected),
                        ("tensors of another shape, file vs architecture", reshaped)):
        if names:
            more = f", ... {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
            parts.append(f"{len(names)} {what} ({', '.join(names[:SHOWN_NAMES])}{more})")
    return "; ".join(parts)


def load_by_position(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load tensors pairwise in order (for the same network saved under other names), checking every shape."""
    target = model.state_dict()
    if len(target) != len(state):
        raise GplError(f"{source} holds {len(state)} tensors, the architecture needs {len(target)}")
    mapped = {}
    for (name, want), (src_name, have) in zip(target.items(), state.items()):
        if want.shape != have.shape:
            raise GplError(f"{source}: tensor {src_name} {tuple(have.shape)} does not fit {name} {tuple(want.shape)}")
        mapped[name] = have
    model.load_state_dict(mapped, strict=True)


def _dims(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"
