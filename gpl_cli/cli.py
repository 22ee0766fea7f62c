"""The `gpl` command line: parse options, call the library, print.

Heavy modules (torch, timm, h5py) are imported inside commands so `gpl --help` stays fast.
stdout carries data only; progress, warnings and errors go to stderr.
"""

from __future__ import annotations

import json
import sys

import click

from gpl_cli import __version__
from gpl_cli.errors import EXIT_OK, EXIT_SOME_FAILED, GplError
from gpl_cli.runtime import tune_process

WORKERS_HELP = ("Loader processes (default: on a CPU one per core, each decoding and embedding with one thread; "
                "with a GPU, decoders on all but one core, at most 4). 0: all in this process.")


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
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Images per forward pass (default: the fastest measured on this machine, see gpl tune; "
                   "unmeasured: 4 on a CPU, 16 on a GPU).")
@click.option("--workers", type=click.IntRange(min=0), help=WORKERS_HELP)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Compute precision of the backbone: bf16 on CPUs with native bfloat16 or GPUs, fp16 on GPUs. Pooling stays fp32.")
@click.option("--jpeg-draft", is_flag=True,
              help="Decode large JPEGs (shorter side >= 4x the resize size) at 1/2 to 1/8 scale: faster, vectors differ slightly.")
@click.option("-0", "--null", "nul", is_flag=True, help="With '-': paths on stdin are NUL-separated (find -print0).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--resume", is_flag=True, help="Finish an interrupted run into the same OUTPUT (same options).")
@click.option("--update", is_flag=True, help="Embed only new or changed files (path, size, mtime) into an existing OUTPUT; drop vanished ones.")
@click.option("--strict", is_flag=True, help="Stop at the first image that cannot be embedded.")
@click.option("--timeout", type=click.FloatRange(min=0), default=60, show_default=True, help="Seconds allowed to decode one image (0: no limit).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def embed(inputs, output, fmt, backbone, weights, pools, normalize, batch_size, workers, device, precision, jpeg_draft,
          nul, overwrite, resume, update, strict, timeout, quiet):
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
      gpl embed photos/ -o emb.h5 --resume     # finish an interrupted run
      gpl embed photos/ -o emb.h5 --update     # add new/changed photos, drop deleted ones
    """
    from gpl_cli.engine import EmbedConfig, RunOptions
    from gpl_cli.inputs import collect_inputs
    from gpl_cli.pipeline import OutputTarget, RunMode, run_embed

    config = EmbedConfig(backbone=backbone, weights=weights, pools=tuple(pools), normalize=normalize,
                         precision=precision, jpeg_draft=jpeg_draft)
    config.pool_specs()  # fail on a bad --pool before loading anything
    inputs = collect_inputs(inputs, nul_separated=nul)
    if not inputs.items:
        raise GplError("no images found in the inputs (extensions: jpg jpeg png webp bmp gif tif tiff)")
    if inputs.duplicates:
        _err(f"gpl: warning: {len(inputs.duplicates)} duplicate input(s) embedded once (first: {inputs.duplicates[0]})")
    summary = run_embed(
        config, inputs, OutputTarget(output, fmt, overwrite), RunOptions(batch_size, workers, device, timeout or None),
        quiet, RunMode(resume=resume, update=update, strict=strict),
    )
    if not quiet:
        dims = ", ".join(f"{k}={d}" for k, d in summary.dims.items())
        reused = f" ({summary.reused} reused)" if summary.reused else ""
        _err(
            f"gpl: embedded {summary.embedded}{reused}, failed {summary.failed}, dims {dims}, "
            f"{summary.seconds:.1f} s, {summary.rate:.1f} images/s ({summary.plan}; {summary.execution}) -> {output}"
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


# Options of `compare` that only mean something when images are embedded.
_COMPARE_IMAGE_OPTIONS = ("backbone", "weights", "normalize", "batch_size", "workers", "device", "nul", "save", "overwrite")


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-p", "--pool", "pools", multiple=True,
              help="Pooling to compare; repeat or comma-separate. Default: avg and max (from embedding files: all they hold).")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False),
              help="CSV of path,label rows. Default: each image's class is its folder under DIR.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the report as CSV (pooling,versus,metric,value).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw cosine distributions and mAP bars into this .png/.pdf/.svg.")
@click.option("--save", help="Also keep the embeddings computed in this .h5 or .npy file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --save file.")
@click.option("-b", "--backbone", default="efficientnet_lite0", show_default=True, help="Backbone, as for gpl embed.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state dict instead of the published weights.")
@click.option("--normalize", type=click.Choice(["none", "l2"]), default="none", show_default=True,
              help="Normalisation of the vectors (cosine metrics do not change; norm statistics do).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass (default: as gpl embed).")
@click.option("--workers", type=click.IntRange(min=0), help=WORKERS_HELP)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@click.option("-0", "--null", "nul", is_flag=True, help="With '-': paths on stdin are NUL-separated.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.pass_context
def compare(ctx, inputs, pools, labels_csv, as_json, as_csv, plot, save, overwrite, backbone, weights, normalize,
            batch_size, workers, device, nul, quiet):
    """Compare poolings on your own images: retrieval quality, agreement and cost.

    INPUTS is a folder with one subfolder per class (or images plus --labels), embedded once
    with every pooling from the same forward pass; or one or two embedding files written by
    gpl embed (one file with several poolings, or two files over the same images).

    With labels: mAP (each image a query against all others), precision@1/@5, leave-one-out
    kNN accuracy (k=1, 5, cosine), per-class AP, and for each pair of poolings the mAP
    difference with a 95 % paired-bootstrap interval and a verdict. Always: dimension, norms,
    share of zeros, mean pairwise cosine, effective rank, pooling time, and for each pair the
    overlap of the 10 nearest neighbours and the rank correlation of pairwise similarities.

    \b
    Examples:
      gpl compare photos/
      gpl compare photos/ --pool avg --pool max --pool gem --plot report.png
      gpl compare photos/ --save emb.h5 --json > report.json
      gpl compare emb.h5 --labels labels.csv --csv
      gpl compare resnet50.h5 lite0.h5 --pool avg
    """
    from gpl_cli import compare as cmp

    if as_json and as_csv:
        raise GplError("--json and --csv are alternatives; give one")
    if all(cmp.is_embeddings_file(arg) for arg in inputs):
        given = [name for name in _COMPARE_IMAGE_OPTIONS
                 if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
        if given:
            raise GplError(f"--{given[0].replace('_', '-')} applies to images; {inputs[0]} already holds embeddings")
        emb = cmp.load_embedding_files(list(inputs), list(pools))
        pool_seconds, source = None, f"{emb.metadata.get('backbone', '?')} from {' + '.join(inputs)}"
    elif any(cmp.is_embeddings_file(arg) for arg in inputs):
        raise GplError("give either images (folders, files, -) or embedding files (.h5/.npy), not both")
    else:
        from gpl_cli.engine import EmbedConfig, RunOptions
        from gpl_cli.inputs import collect_inputs
        from gpl_cli.pipeline import OutputTarget

        config = EmbedConfig(backbone=backbone, weights=weights, pools=tuple(pools or cmp.DEFAULT_POOLS), normalize=normalize)
        config.pool_specs()  # fail on a bad --pool before loading anything
        items = collect_inputs(inputs, nul_separated=nul)
        if not items.items:
            raise GplError("no images found in the inputs (extensions: jpg jpeg png webp bmp gif tif tiff)")
        cmp.image_labels([it.name for it in items.items], labels_csv, items.root)  # fail before loading a model
        target = OutputTarget(save, None, overwrite) if save else None
        emb, summary = cmp.embed_images(config, items, RunOptions(batch_size, workers, device), target, quiet)
        pool_seconds, source = summary.pool_seconds, f"{backbone} on {' '.join(inputs)}"
    if emb.failures:
        _err(f"gpl: {len(emb.failures)} images could not be read and are left out of the comparison")
    labels = cmp.image_labels(emb.paths, labels_csv, emb.metadata.get("root"))
    report = cmp.compare(emb, labels, pool_seconds=pool_seconds, source=source, quiet=quiet)
    if plot:
        from gpl_cli.plots import plot_report

        plot_report(report, plot)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    elif as_csv:
        click.echo(report.csv_text(), nl=False)
    else:
        click.echo(report.table(), nl=False)


@cli.command()
@click.option("-b", "--backbone", default="efficientnet_lite0", show_default=True, help="Backbone, as for gpl embed.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state dict instead of the published weights.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), help="As for gpl embed: the model's threads depend on it.")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
def tune(backbone, weights, device, precision, workers, as_json):
    """Measure the fastest batch size and memory layout for a backbone on this machine.

    Times the backbone at growing batch sizes in NCHW and channels-last layout and caches
    the result for this machine (backbone, device, precision, torch version, threads);
    gpl embed then uses the fastest unless --batch-size is given. gpl embed measures once
    by itself on runs of 1000 images or more; run this to measure again (say, after the
    first measurement was disturbed by other load).

    \b
    Examples:
      gpl tune
      gpl tune -b resnet50 --precision bf16
    """
    from gpl_cli.backbones import load_backbone
    from gpl_cli.engine import check_precision, model_threads, resolve_device, resolve_workers
    from gpl_cli.tuning import cache_file, tune as run_tune

    where = resolve_device(device)
    check_precision(precision, where)
    threads = model_threads(where, resolve_workers(workers, where))
    loaded = load_backbone(backbone, weights)
    if not as_json:
        _err(f"gpl: timing {backbone} ({precision}, {threads} thread(s)) at growing batch sizes...")
    table, plan = run_tune(loaded, device, precision, threads,
                           on_row=None if as_json else lambda r: _err(f"  {r['layout']:<14} batch {r['batch']:>3}  {r['rate']:8.1f} images/s"))
    if as_json:
        click.echo(json.dumps({"backbone": backbone, "precision": precision, "table": table,
                               "batch_size": plan.batch_size, "channels_last": plan.channels_last}, indent=2))
    else:
        click.echo(f"fastest: {plan.describe()}; saved in {cache_file()}")


def main() -> None:
    """Console entry point: user errors become one line on stderr and an exit status."""
    tune_process()  # before any command imports torch
    try:
        cli.main(standalone_mode=False)
    except GplError as exc:
        interrupted = exc.exit_code in (130, 143)
        _err(f"gpl: {exc}" if interrupted else f"gpl: error: {exc}")
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
