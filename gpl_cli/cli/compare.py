"""`gpl compare`: which pooling suits these images."""

from __future__ import annotations

import json

import click

from gpl_cli.cli import console
from gpl_cli.cli.options import use
from gpl_cli.defaults import NORMALIZATIONS
from gpl_cli.errors import GplError

# Options of `compare` that only mean something when images are embedded.
_IMAGE_OPTIONS = ("backbone", "weights", "normalize", "batch_size", "workers", "device", "nul", "save")


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-p", "--pool", "pools", multiple=True,
              help="Pooling to compare; repeat or comma-separate. Default: avg and max (from embedding files: all they hold).")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False),
              help="CSV of path,label rows. Default: each image's class is its folder under DIR.")
@use("json", json="Print the report as JSON instead of the table.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the report as CSV (pooling,versus,metric,value).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw cosine distributions and mAP bars into this .png/.pdf/.svg.")
@click.option("--save", help="Also keep the embeddings computed in this .h5 or .npy file.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Also write a report page with the images (thumbnails embedded, works offline).")
@click.option("--html-queries", type=click.IntRange(min=1), default=3, show_default=True,
              help="--html: per class, how many queries where the poolings disagree most to show.")
@use("images")
@use("overwrite", overwrite="Replace an existing --save, --plot or --html file.")
@use("backbone")
@use("weights")
@click.option("--normalize", type=click.Choice(NORMALIZATIONS), default="none", show_default=True,
              help="Normalisation of the vectors (cosine metrics do not change; norm statistics do).")
@use("batch_size", batch_size="Images per forward pass (default: as gpl embed).")
@use("workers")
@use("device")
@click.option("-0", "--null", "nul", is_flag=True, help="With '-': paths on stdin are NUL-separated.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--probe", is_flag=True,
              help="Also a linear probe per pooling (logistic regression, k-fold test and train accuracy, head "
                   "parameters), and on the flattened map when it fits; needs labels and scikit-learn.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Outer cross-validation folds of --probe and of --pool gem:p=auto.")
@click.pass_context
def compare(ctx, inputs, pools, labels_csv, as_json, as_csv, plot, save, html_path, html_queries, images_dir, overwrite,
            backbone, weights, normalize, batch_size, workers, device, nul, quiet, probe, folds):
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
      gpl compare photos/ --html report.html
      gpl compare photos/ --probe                     # + linear probe, head parameters
      gpl compare photos/ --pool avg --pool gem:p=auto  # GeM's p chosen on the labels

    --probe: per pooling, multinomial logistic regression on the standardised vectors, C chosen
    by inner CV on the training folds; stratified --folds test accuracy with a 95 % t interval
    over the folds, train accuracy, paired differences, and the parameters of a linear head (D*K + K;
    C*H*W*K + K on the flattened map, which is probed too when its maps fit in 512 MiB).
    gem:p=auto pools GeM at p = 1, 1.5, 2, 3, 4, 6, 8 from the same forward pass and chooses p
    by nested CV on the labels (held-out mAP, p per fold, the --pool to use).
    """
    from gpl_cli.analysis.compare_run import CompareRequest, run_compare
    from gpl_cli.embedding.config import RunOptions

    if as_json and as_csv:
        raise GplError("--json and --csv are alternatives; give one")
    console.show_library_logs(notes=not quiet)
    given = [name for name in _IMAGE_OPTIONS if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
    request = CompareRequest(list(inputs), list(pools), labels_csv, plot, save, html_path, html_queries, images_dir,
                             overwrite, backbone, weights, normalize, RunOptions(batch_size, workers, device), nul,
                             probe, folds, given)
    with console.Bars(quiet) as bars:
        report = run_compare(request, on_progress=bars.callback, on_failure=console.skipped,
                             on_note=lambda text: console.note(text) if not quiet or text.startswith("wrote") else None)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    elif as_csv:
        click.echo(report.csv_text(), nl=False)
    else:
        click.echo(report.table(), nl=False)
