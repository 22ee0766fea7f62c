"""gpl: image embeddings from the final feature maps of CNN backbones, pooled globally.

`gpl_cli.embed(...)` and `gpl_cli.read(path)` are the Python API (gpl_cli.api); they load on first
use, so `import gpl_cli` stays free of torch.
"""

from gpl_cli.version import __version__

__all__ = ["__version__", "embed", "read", "Embeddings"]
_API = ("embed", "read", "Embeddings")


def __getattr__(name: str):
    if name in _API:
        from gpl_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'gpl_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
