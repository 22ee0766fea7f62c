"""`gpl explain`: what each pooling keeps from an image, or where two images' similarity comes from."""

from __future__ import annotations

import sys

import click

from gpl_cli.cli import console
from gpl_cli.cli.options import use
from gpl_cli.errors import EXIT_SOME_FAILED


@click.command()
@click.argument("images", nargs=-1, required=True, metavar="IMAGE [IMAGE2 | IMAGE...]")
@click.option("-o", "--output", required=True, help="Figure to write: .png, .pdf or .svg.")
@use("backbone")
@use("weights")
@click.option("-p", "--pool", "pools", multiple=True, default=["avg,max,gem,rmac,crow"], show_default=True,
              help="Poolings to explain, as for gpl embed; one panel each.")
@click.option("--classes", type=click.IntRange(min=0), default=3, show_default=True,
              help="Class activation maps of the K most probable classes of the backbone's own head (0: none).")
@click.option("--each", is_flag=True, help="With two images: draw what each keeps, one row per image, instead of comparing them.")
@click.option("--json", "json_path", help="Also write the maps, cosines and top classes to this JSON file (- for stdout).")
@click.option("--resize", type=click.Choice(["crop", "keep-aspect"]), default="crop", show_default=True,
              help="As for gpl embed: explain the vectors a run with this --resize writes.")
@click.option("--max-size", type=click.IntRange(min=1), help="Longer side with --resize keep-aspect.")
@click.option("--dpi", type=click.IntRange(min=10, max=600), default=100, show_default=True,
              help="Pixels per inch of a .png: each panel is 2.4 x 2.9 inches.")
@use("device")
@use("overwrite", "quiet", overwrite="Replace an existing figure or --json file.",
     quiet="No summary or notes on stderr (images that cannot be read are still reported).")
def explain(images, output, backbone, weights, pools, classes, each, json_path, resize, max_size, dpi, device, overwrite,
            quiet):
    """See what each pooling keeps from IMAGE, or where the similarity of two images comes from.

    \b
    One image: the input as the model saw it, then per pooling a map on the feature-map grid
    (avg: each cell's share of the vector's sum; max: channels taking their maximum in the cell;
    gem: share of the sum of x^p; rmac: its regions and their weights; crow: its spatial weights),
    then the class activation maps of the head's top --classes classes.
    Two images: per pooling, the cosine of the two pooled vectors split exactly over the cells of
    each image (each image's cells sum to the cosine). Three or more images, or --each: one row
    per image, as for one image.

    The vectors explained are the raw pooled vectors gpl embed writes (before --power, --whiten,
    --normalize; the cosine is the same with --normalize l2). A missing or unreadable image exits
    with status 2, except with several images drawn one per row: the others are drawn, status 3.

    \b
    Examples:
      gpl explain photo.jpg -o explain.png
      gpl explain a.jpg b.jpg -o why.png --pool avg,max,gem --json why.json
      gpl explain photos/*.jpg -o rows.png --classes 0
    """
    from gpl_cli.analysis.explain_run import run_explain
    from gpl_cli.embedding.config import EmbedConfig

    console.show_library_logs(notes=not quiet)
    config = EmbedConfig(backbone=backbone, weights=weights, pools=tuple(pools), resize=resize, max_size=max_size)
    result = run_explain(list(images), output, config, each, classes, json_path, dpi, device, overwrite)
    if not quiet:
        for text in result.notes:
            console.err(f"gpl: {text}")
    for f in result.failures:
        console.err(f"gpl: cannot read {f.path}: {f.reason}")
    if result.json_text is not None:
        click.echo(result.json_text)
    elif result.pair:
        for t in result.pair:
            click.echo(f"{t.key}\t{t.cosine:.6f}")
    if not quiet:
        width, height = result.pixels
        console.err(f"gpl: explained {len(result.done)} image(s), failed {len(result.failures)} -> {output} "
                    f"({width} x {height} px)")
    if result.failures:
        sys.exit(EXIT_SOME_FAILED)
