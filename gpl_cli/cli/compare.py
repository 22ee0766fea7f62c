"""`gpl compare`: which pooling suits these images."""

from __future__ import annotations

import json

import click

from gpl_cli.cli import console
from gpl_cli.cli.options import use
from gpl_cli.defaults import NORMALIZATIONS, RESIZE_MODES
from gpl_cli.errors import GplError

# Options of `compare` that only mean something when images are embedded.
_IMAGE_OPTIONS = ("backbone", "weights", "normalize", "resize", "scales", "batch_size", "workers", "device", "runtime",
                  "nul", "save")


def _scale_sets(ctx, param, values: tuple[str, ...]) -> tuple[tuple[float, ...], ...]:
    from gpl_cli.embedding.config import parse_scales  # torch-free; a bad list is one line and exit 2

    return tuple(parse_scales(v) for v in values)


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-p", "--pool", "pools", multiple=True,
              help="Pooling to compare; repeat or comma-separate. Default: avg and max (with --search: avg, max and gem; "
                   "from embedding files: all they hold).")
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
@click.option("--resize", type=click.Choice(RESIZE_MODES), multiple=True,
              help="Images only: crop (the default: the backbone's resize + centre crop) or keep-aspect (longer side "
                   "the crop size), as gpl embed --resize. With --search, repeat it: the modes to try.")
@click.option("--scales", callback=_scale_sets, multiple=True, metavar="LIST",
              help="Images only: run each image at these multiples of the input size (e.g. 1,1.41,2) and combine each "
                   "pooling's vectors (L2-normalised per scale, averaged), as gpl embed --scales. Default 1. With "
                   "--search, repeat it: the sets to try.")
@use("batch_size", batch_size="Images per forward pass (default: as gpl embed).")
@use("workers")
@use("device", "runtime")
@click.option("-0", "--null", "nul", is_flag=True, help="With '-': paths on stdin are NUL-separated.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--probe", is_flag=True,
              help="Also a linear probe per pooling (logistic regression, k-fold test and train accuracy, head "
                   "parameters), and on the flattened map when it fits; needs labels and scikit-learn.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Outer cross-validation folds of --probe, --pool gem:p=auto and --search.")
@click.option("--rerank", "reranks", multiple=True, metavar="SPEC",
              help="Also score every pooling re-ranked with SPEC (dba, aqe, krr, chained with commas as in gpl "
                   "neighbors --rerank); repeat for several, each one variant. With --search: the re-rankings to try.")
@click.option("--search", is_flag=True,
              help="Labelled images: search poolings x resize and scales x PCA whitening x re-ranking for the best "
                   "retrieval pipeline, measured by nested cross-validation against crop, scale 1, avg.")
@click.pass_context
def compare(ctx, inputs, pools, labels_csv, as_json, as_csv, plot, save, html_path, html_queries, images_dir, overwrite,
            backbone, weights, normalize, resize, scales, batch_size, workers, device, runtime, nul, quiet, probe, folds,
            reranks, search):
    """Compare poolings on your own images: retrieval quality, agreement and cost.

    INPUTS is a folder with one subfolder per class (or images plus --labels), embedded once
    with every pooling from the same forward pass; or one or two embedding files written by
    gpl embed (one file with several poolings, or two files over the same images).

    With labels: mAP (each image a query against all others), precision@1/@5, leave-one-out
    kNN accuracy (k=1, 5, cosine), per-class AP, and for each pair of poolings the mAP
    difference with a 95 % paired-bootstrap interval and a verdict (a difference under 1 point is
    called too small to matter), then a recommendation that weighs the pooling cost. Always:
    dimension, norms, share of zeros, mean pairwise cosine, effective rank, pooling time, and for
    each pair the overlap of the 10 nearest neighbours and the rank correlation of pairwise
    similarities.

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
      gpl compare emb.h5 --rerank dba --rerank aqe --rerank dba,aqe
      gpl compare photos/ --search                    # the best retrieval pipeline, nested CV

    --probe: per pooling, multinomial logistic regression on the standardised vectors, C chosen
    by inner CV on the training folds; stratified --folds test accuracy with a 95 % t interval
    over the folds, train accuracy, paired differences, and the parameters of a linear head (D*K + K;
    C*H*W*K + K on the flattened map, which is probed too when its maps fit in 512 MiB).
    gem:p=auto pools GeM at p = 1, 1.5, 2, 3, 4, 6, 8 from the same forward pass and chooses p
    by nested CV on the labels (held-out mAP, p per fold, the --pool to use).

    --rerank: every pooling again re-ranked (each image a query, its own row left out), with the
    gain over the plain pooling and its paired-bootstrap interval. --search: every combination of
    the poolings (default avg, max, gem), --resize modes (default crop), --scales sets (default 1
    and 1,1.414,2), PCA whitening or not, and re-rankings (default none, dba, aqe, dba,aqe); the
    pipeline is chosen in each of --folds outer folds on the other folds' images only (whitening
    fitted by inner folds) and scored on the fold's queries searching the whole collection. It
    reports the winner, the choice per fold, the gain over crop, scale 1, avg with a 95 % interval,
    each pipeline's cost and the gpl embed / gpl neighbors commands that reproduce the winner.
    """
    from gpl_cli.analysis.compare_run import CompareRequest, run_compare
    from gpl_cli.embedding.config import RunOptions

    if as_json and as_csv:
        raise GplError("--json and --csv are alternatives; give one")
    if not search:
        for name, values in (("--resize", resize), ("--scales", scales)):
            if len(values) > 1:
                raise GplError(f"{name} was given {len(values)} times: several values are a search space (add --search)")
    if probe and scales and not search and scales[0] != (1.0,):
        raise GplError("--probe also probes the flattened feature map, which has the backbone's one input size: "
                       "give it no --scales")
    console.show_library_logs(notes=not quiet)
    given = [name for name in _IMAGE_OPTIONS if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
    request = CompareRequest(list(inputs), list(pools), labels_csv, plot, save, html_path, html_queries, images_dir,
                             overwrite, backbone, weights, normalize, RunOptions(batch_size, workers, device, runtime=runtime), nul,
                             probe, folds, given, rerank=list(reranks), search=search)
    if search:  # the report itself is the default pipeline's: crop at scale 1
        request.search_resizes, request.search_scales = resize, scales
    else:
        request.resize, request.scales = (resize or ("crop",))[0], (scales or ((1.0,),))[0]
    with console.Bars(quiet) as bars:
        report = run_compare(request, on_progress=bars.callback, on_failure=console.skipped,
                             on_note=lambda text: console.note(text) if not quiet or text.startswith(("wrote", "warning")) else None)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    elif as_csv:
        click.echo(report.csv_text(), nl=False)
    else:
        click.echo(report.table(), nl=False)
