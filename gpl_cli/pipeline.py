"""The embed job, end to end: inputs -> engine -> writer, with metadata and reporting."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime, timezone

from gpl_cli import __version__
from gpl_cli.backbones import Backbone, load_backbone
from gpl_cli.engine import EmbedConfig, Embedder, RunOptions, Summary
from gpl_cli.images import Failure
from gpl_cli.inputs import InputList
from gpl_cli.pooling import out_dims
from gpl_cli.whiten import load_whitening, match_whitenings
from gpl_cli.writers import open_writer


@dataclass
class OutputTarget:
    path: str
    format: str | None = None  # None: from the extension
    overwrite: bool = False


def versions() -> dict[str, str]:
    import timm
    import torch
    import torchvision

    return {"gpl": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}


def build_metadata(config: EmbedConfig, embedder: Embedder, inputs: InputList, summary: Summary) -> dict:
    specs = embedder.specs
    whitened = embedder.whitenings
    return {
        **embedder.backbone.metadata(),
        "preprocess": embedder.preprocess.as_dict(),
        "pool_keys": [s.key for s in specs],
        "pools": {
            s.key: {"op": s.op, "params": s.all_params(), "dim": summary.dims[s.key],
                    **({"whiten": whitened[s.key].describe()} if s.key in whitened else {})}
            for s in specs
        },
        "normalize": config.normalize,
        "power": config.power,
        "config": config.as_dict(),
        "root": inputs.root,
        "count": summary.embedded,
        "failed": summary.failed,
        "seconds": round(summary.seconds, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }


def run_embed(
    config: EmbedConfig,
    inputs: InputList,
    target: OutputTarget,
    options: RunOptions,
    quiet: bool = False,
    backbone: Backbone | None = None,
) -> Summary:
    """Embed every input into `target`; failures are reported on stderr and recorded in the file."""
    from tqdm import tqdm

    specs = config.pool_specs()
    loaded = [load_whitening(path) for path in config.whiten]  # a bad file fails before the model loads
    backbone = backbone or load_backbone(config.backbone, config.weights, config.layer)
    whitenings = match_whitenings(loaded, backbone.metadata(), out_dims(specs, backbone.channels), config.power)
    embedder = Embedder(
        backbone, specs, config.normalize, options.device,
        power=config.power, whitenings=whitenings, preprocess=config.preprocess_for(backbone),
    )
    writer = open_writer(target.path, target.format, embedder.dims, target.overwrite)
    bar = tqdm(total=len(inputs.items), unit="img", file=sys.stderr, disable=quiet, dynamic_ncols=True)

    def report(failure: Failure) -> None:
        tqdm.write(f"gpl: skipped {failure.path}: {failure.reason}", file=sys.stderr)

    try:
        summary = embedder.run(inputs.items, writer, options, on_failure=report, on_progress=bar.update)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    writer.close(build_metadata(config, embedder, inputs, summary))
    return summary
