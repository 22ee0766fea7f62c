"""Options that several commands share, declared once (as data) and applied as decorators.

Each entry is a click option's flags and settings; `use(*names)` applies them in order, so a command lists what it takes
and the help texts stay identical everywhere. Defaults and choices come from gpl_cli.defaults.
"""

from __future__ import annotations

import click

from gpl_cli.defaults import (
    DEFAULT_BACKBONE,
    DEVICES,
    NORMALIZATIONS,
    OUTPUT_FORMATS,
    PRECISIONS,
    RESIZE_MODES,
    RUNTIMES,
)

WORKERS_HELP = ("Loader processes (default: on a CPU one per core, each decoding and embedding with one thread; "
                "with a GPU, decoders on all but one core, at most 4). 0: all in this process.")

def _opt(*args, **settings) -> tuple[tuple, dict]:
    return args, settings


def _scales(ctx, param, value: str) -> tuple[float, ...]:
    from gpl_cli.embedding.config import parse_scales  # torch-free; a bad list is one line and exit 2

    return parse_scales(value)


SHARED = {
    "backbone": _opt("-b", "--backbone", default=DEFAULT_BACKBONE, show_default=True,
                             help="Backbone: efficientnet_lite0/1/2 (offline), a torchvision CNN (resnet50, ...), "
                                  "or timm:NAME."),
    "weights": _opt("--weights", type=click.Path(dir_okay=False),
                            help="Local state dict (.pth/.pt/.safetensors) instead of the published weights."),
    "normalize": _opt("--normalize", type=click.Choice(NORMALIZATIONS), default="none", show_default=True,
                              help="Normalisation of each vector."),
    "resize": _opt("--resize", type=click.Choice(RESIZE_MODES), default="crop", show_default=True,
                           help="crop: the backbone's resize + centre crop; keep-aspect: longer side --max-size, "
                                "nothing cropped."),
    "max_size": _opt("--max-size", type=click.IntRange(min=1),
                             help="Longer side with --resize keep-aspect (default: the backbone's crop size)."),
    "batch_size": _opt("--batch-size", type=click.IntRange(min=1),
                               help="Images per forward pass (default: the fastest measured on this machine, see "
                                    "gpl tune; unmeasured: 4 on a CPU, 16 on a GPU)."),
    "workers": _opt("--workers", type=click.IntRange(min=0), help=WORKERS_HELP),
    "device": _opt("--device", type=click.Choice(DEVICES), default="auto", show_default=True),
    "precision": _opt("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                              help="Compute precision of the backbone: bf16 on CPUs with native bfloat16 or GPUs, "
                                   "fp16 on GPUs, int8 on a CPU (OpenVINO, the model quantized on a calibration "
                                   "sample). Pooling stays fp32."),
    "runtime": _opt("--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
                    help="What runs the backbone: torch, openvino (CPU; pip install openvino), or auto: OpenVINO where "
                         "gpl tune measured it faster here and the run is long enough to repay its start, else torch."),
    "scales": _opt("--scales", default="1", show_default=True, callback=_scales, metavar="LIST",
                   help="Run each image at these multiples of the input size (e.g. 1,1.41,2) and combine each "
                        "pooling's vectors: L2-normalised per scale, averaged, then post-processed."),
    "timeout": _opt("--timeout", type=click.FloatRange(min=0), default=60, show_default=True,
                            help="Seconds allowed to decode one image (0: no limit)."),
    "nul": _opt("-0", "--null", "nul", is_flag=True,
                        help="With '-': paths on stdin are NUL-separated (find -print0)."),
    "overwrite": _opt("--overwrite", is_flag=True, help="Replace an existing output."),
    "quiet": _opt("-q", "--quiet", is_flag=True, help="No progress bar or summary."),
    "json": _opt("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    "format": _opt("--format", "fmt", type=click.Choice(OUTPUT_FORMATS),
                           help="Output format (default: from the extension; jsonl for -o -)."),
    "shard_rows": _opt("--shard-rows", type=click.IntRange(min=1), default=None,
                               help="--format shards (= parquet): rows per npy/parquet shard.  [default: 100000]"),
    "images": _opt("--images", "images_dir", type=click.Path(exists=True, file_okay=False),
                   help="--html: read the images from this folder (stored names relative to it) instead of the "
                        "folder the embeddings file records as its root. Names outside it are never read."),
}


def use(*names: str, **helps: str):
    """Decorate a command with the shared options `names`, in that order; `helps` gives an option the
    help text this command needs (name -> text), its flags, type and default staying the shared ones."""
    def apply(command):
        for name in reversed(names):
            args, settings = SHARED[name]
            command = click.option(*args, **{**settings, "help": helps.get(name, settings.get("help"))})(command)
        return command

    return apply
