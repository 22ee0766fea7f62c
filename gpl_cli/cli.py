"""The `gpl` command line: parse options, call the library, print.

Heavy modules (torch, timm, h5py) are imported inside commands so `gpl --help` stays fast.
stdout carries data only; progress, warnings and errors go to stderr.
"""

from __future__ import annotations

import json
import os
import sys

import click

from gpl_cli import __version__
from gpl_cli.errors import EXIT_OK, EXIT_SOME_FAILED, GplError

DEFAULT_WORKERS = min(4, max(0, (os.cpu_count() or 1) - 1))


def _err(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gpl")
def cli() -> None:
    """gpl - Global Pooling Layer: image embeddings from CNN feature maps.

    \b
    Examples:
      gpl embed photos/ -o photos.h5
      gpl embed photos/ -o photos.h5 --pool avg --pool max --normalize l2
      gpl info photos.h5
    """


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Output file: .h5 (HDF5) or .npy.")
@click.option("--format", "fmt", type=click.Choice(["h5", "npy"]), help="Output format (default: from the extension).")
@click.option("-b", "--backbone", default="efficientnet_lite0", show_default=True,
              help="Backbone: efficientnet_lite0/1/2 (offline), a torchvision CNN (resnet50, ...), or timm:NAME.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state dict (.pth/.pt/.safetensors) instead of the published weights.")
@click.option("-p", "--pool", "pools", multiple=True, default=["avg"], show_default=True,
              help="Pooling; repeat or comma-separate for several from one forward pass (avg, max, ...).")
@click.option("--normalize", type=click.Choice(["none", "l2"]), default="none", show_default=True, help="Normalisation of each vector.")
@click.option("--power", type=float, help="Signed power normalisation sign(x)|x|^POWER before anything else (0.5: signed square root).")
@click.option("--whiten", "whiten", multiple=True, type=click.Path(dir_okay=False),
              help="PCA whitening from 'gpl whiten fit' (L2, whiten, L2) for the pooling it was learned on; repeatable.")
@click.option("--layer", help="Pool this intermediate layer's map instead of the last one (gpl models --layers BACKBONE).")
@click.option("--resize", type=click.Choice(["crop", "keep-aspect"]), default="crop", show_default=True,
              help="crop: the backbone's resize + centre crop; keep-aspect: longer side --max-size, nothing cropped.")
@click.option("--max-size", type=click.IntRange(min=1), help="Longer side with --resize keep-aspect (default: the backbone's crop size).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=DEFAULT_WORKERS, show_default=True, help="Image decoding processes.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@click.option("-0", "--null", "nul", is_flag=True, help="With '-': paths on stdin are NUL-separated (find -print0).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def embed(inputs, output, fmt, backbone, weights, pools, normalize, power, whiten, layer, resize, max_size,
          batch_size, workers, device, nul, overwrite, quiet):
    """Embed images (files, directories, or - for a list on stdin) into OUTPUT.

    Directories are searched recursively and sorted by relative path. Row i of every
    pooling belongs to paths[i]; files that cannot be read are skipped, reported on
    stderr and recorded as failures in the output.

    \b
    Examples:
      gpl embed sample_images -o emb.h5
      gpl embed photos/ -o emb.npy --pool avg,max --normalize l2
      find photos -name '*.jpg' -print0 | gpl embed - -0 -o emb.h5
      gpl embed photos/ -o emb.h5 --backbone resnet50
      gpl embed photos/ -o emb.h5 --pool gem:p=4,rmac --resize keep-aspect --max-size 512
      gpl embed photos/ -o emb.h5 --pool gem --whiten whiten.npz
    """
    from gpl_cli.engine import EmbedConfig, RunOptions
    from gpl_cli.inputs import collect_inputs
    from gpl_cli.pipeline import OutputTarget, run_embed

    config = EmbedConfig(backbone=backbone, weights=weights, pools=tuple(pools), normalize=normalize, power=power,
                         whiten=tuple(whiten), layer=layer, resize=resize, max_size=max_size)
    config.check()  # fail on bad options before loading anything
    inputs = collect_inputs(inputs, nul_separated=nul)
    if not inputs.items:
        raise GplError("no images found in the inputs (extensions: jpg jpeg png webp bmp gif tif tiff)")
    summary = run_embed(config, inputs, OutputTarget(output, fmt, overwrite), RunOptions(batch_size, workers, device), quiet)
    if not quiet:
        dims = ", ".join(f"{k}={d}" for k, d in summary.dims.items())
        _err(
            f"gpl: embedded {summary.embedded}, failed {summary.failed}, dims {dims}, "
            f"{summary.seconds:.1f} s, {summary.rate:.1f} images/s -> {output}"
        )
    if summary.failed:
        sys.exit(EXIT_SOME_FAILED)


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def info(file, as_json):
    """Show what an embeddings file holds: count, poolings, backbone, failures.

    \b
    Examples:
      gpl info emb.h5
      gpl info emb.h5 --json | jq .pools
    """
    from gpl_cli.readers import read_embeddings

    emb = read_embeddings(file)
    meta = emb.metadata
    if as_json:
        doc = dict(meta, count=len(emb), failures=[{"path": p, "reason": r} for p, r in emb.failures])
        click.echo(json.dumps(doc, indent=2))
        return
    pre = meta["preprocess"]
    lines = [
        f"file          {file}",
        f"images        {len(emb)} embedded, {len(emb.failures)} failed",
        f"backbone      {meta['backbone']}  (feature map C x H x W = {' x '.join(map(str, meta['feature_map_shape']))})",
        f"weights       {meta['weights']}",
        f"              sha256 {meta['weights_sha256']}",
        f"preprocess    resize {pre['resize']}, centre crop {pre['crop']}, {pre['interpolation']}, mean {pre['mean']}, std {pre['std']}",
        f"normalize     {meta['normalize']}",
        "poolings      " + ", ".join(f"{k} ({v['dim']})" for k, v in meta["pools"].items()),
        f"created       {meta['created']}  (" + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ")",
    ]
    lines += [f"  failed: {p}: {r}" for p, r in emb.failures[:20]]
    if len(emb.failures) > 20:
        lines.append(f"  ... and {len(emb.failures) - 20} more failures (gpl info --json lists all)")
    click.echo("\n".join(lines))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the operators as JSON.")
def pools(as_json):
    """List the pooling operators: parameters (defaults), output dimension, formula, reference.

    C is the channel count of the feature map. Parameters go after a colon:
    --pool gem:p=4, --pool rmac:levels=3, --pool crow:a=2,b=2.

    \b
    Examples:
      gpl pools
      gpl pools --json | jq '.[].name'
    """
    from gpl_cli.pooling import operator_table

    table = operator_table()
    if as_json:
        click.echo(json.dumps(table, indent=2))
        return
    blocks = []
    for op in table:
        names = ", ".join([op["name"], *op["aliases"]])
        lines = [f"{names:<12} dim {op['dim']:<3} --pool {op['usage']}", f"    {op['formula']}"]
        lines += [f"    {p['name']}: {p['help']}" for p in op["params"]]
        lines.append(f"    ref: {op['reference']}")
        blocks.append("\n".join(lines))
    click.echo("\n\n".join(blocks))


@cli.group()
def whiten():
    """PCA whitening: learn it from an embeddings file, apply it with gpl embed --whiten."""


@whiten.command("fit")
@click.argument("embeddings", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, help="Whitening file to write (.npz).")
@click.option("--dims", type=click.IntRange(min=1), help="Output dimension (default: every direction with variance).")
@click.option("--pool", "pool", help="Which pooling of EMBEDDINGS to learn from (needed when it holds several).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def whiten_fit(embeddings, output, dims, pool, overwrite):
    """Learn PCA whitening from the vectors of one pooling in EMBEDDINGS.

    The vectors are L2-normalised, centred and projected onto their principal directions,
    each scaled to unit variance. The file records where it came from (source file,
    count, backbone, weights, layer, pooling, power) and gpl embed --whiten refuses to
    apply it to vectors made any other way.

    \b
    Examples:
      gpl embed train/ -o train.h5 --pool gem
      gpl whiten fit train.h5 -o whiten.npz --dims 512
      gpl embed photos/ -o photos.h5 --pool gem --whiten whiten.npz
    """
    from gpl_cli.whiten import learn_from_file

    w = learn_from_file(embeddings, pool, dims)
    w.save(output, overwrite)
    p = w.provenance
    _err(f"gpl: whitening learned on {p['count']} {p['pooling']} vectors of {p['backbone']}: "
         f"{w.in_dim} -> {w.out_dim} dims -> {output}")


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--all", "include_timm", is_flag=True, help="Also timm's CNNs with published weights (slow the first time).")
@click.option("--layers", "layers_of", metavar="BACKBONE", help="List BACKBONE's layers usable with --layer instead.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(names, include_timm, layers_of, as_json):
    """List the backbones gpl knows (or only NAMES): feature dimension, input size, weights offline.

    Nothing is downloaded: 'weights yes' means the file is on this machine now. Shapes
    are measured on empty architectures once and cached.

    \b
    Examples:
      gpl models
      gpl models resnet50 efficientnet_lite0 --json
      gpl models --all
      gpl models --layers resnet50
    """
    if layers_of:
        _list_layers(layers_of, as_json)
        return
    from tqdm import tqdm

    from gpl_cli.catalog import backbone_catalog

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="gpl: measuring backbone shapes (cached afterwards)", file=sys.stderr,
                       unit="model", dynamic_ncols=True)
        bar.update(1)

    try:
        catalog, skipped = backbone_catalog(include_timm, list(names) or None, on_progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if skipped:
        _err(f"gpl: {len(skipped)} not listed: their features are not an N x C x H x W map ({', '.join(skipped[:5])}"
             + (", ..." if len(skipped) > 5 else "") + ")")
    if as_json:
        click.echo(json.dumps([info.as_dict() for info in catalog], indent=2))
        return
    width = max([len(i.name) for i in catalog] + [4])
    lines = [f"{'NAME':<{width}}  {'SOURCE':<11}  {'DIM':>5}  {'MAP':>7}  {'INPUT':>5}  WEIGHTS"]
    for i in catalog:
        fmap = f"{i.map_size[0]}x{i.map_size[1]}"
        lines.append(f"{i.name:<{width}}  {i.source:<11}  {i.channels:>5}  {fmap:>7}  {i.input_size:>5}  "
                     f"{'yes' if i.weights_available else 'no'}")
    click.echo("\n".join(lines))


def _list_layers(name: str, as_json: bool) -> None:
    from gpl_cli.backbones import architecture, layer_table

    trunk, pre = architecture(name)
    table = [info for info in layer_table(trunk, pre.crop) if info.calls == 1]
    if as_json:
        click.echo(json.dumps([{"name": i.name, "kind": i.kind, "channels": i.shape[0], "map_size": list(i.shape[1:])}
                               for i in table], indent=2))
        return
    _err(f"gpl: layers of {name} usable with --layer, in forward order; map size at a {pre.crop}x{pre.crop} input")
    width = max(len(i.name) for i in table)
    kind_width = max(len(i.kind) for i in table)
    lines = [f"{'LAYER':<{width}}  {'TYPE':<{kind_width}}  {'CHANNELS':>8}  MAP"]
    lines += [f"{i.name:<{width}}  {i.kind:<{kind_width}}  {i.shape[0]:>8}  {i.shape[1]}x{i.shape[2]}" for i in table]
    click.echo("\n".join(lines))


def main() -> None:
    """Console entry point: user errors become one line on stderr and an exit status."""
    try:
        cli.main(standalone_mode=False)
    except GplError as exc:
        _err(f"gpl: error: {exc}")
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _err("gpl: interrupted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _err("gpl: interrupted")
        sys.exit(130)
    sys.exit(EXIT_OK)
