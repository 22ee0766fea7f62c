"""The model zoo and this machine: `gpl models` and `gpl tune`."""

from __future__ import annotations

import json
import sys

import click

from gpl_cli.cli import console
from gpl_cli.cli.options import use


@click.command()
@click.argument("names", nargs=-1)
@click.option("--all", "include_timm", is_flag=True, help="Also timm's CNNs with published weights (slow the first time).")
@click.option("--layers", "layers_of", metavar="BACKBONE", help="List BACKBONE's layers usable with --layer instead.")
@use("json", json="Print JSON.")
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

    from gpl_cli.models.catalog import backbone_catalog

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="gpl: measuring backbone shapes (cached afterwards)", file=sys.stderr,
                       unit="model", dynamic_ncols=True, disable=not sys.stderr.isatty())  # as console.Bars
        bar.update(1)

    try:
        catalog, skipped = backbone_catalog(include_timm, list(names) or None, on_progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if skipped:
        console.err(f"gpl: {len(skipped)} not listed: their features are not an N x C x H x W map ({', '.join(skipped[:5])}"
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
    from gpl_cli.models.backbones import architecture, layer_table

    trunk, pre = architecture(name)
    table = [info for info in layer_table(trunk, pre.crop) if info.calls == 1]
    if as_json:
        click.echo(json.dumps([{"name": i.name, "kind": i.kind, "channels": i.shape[0], "map_size": list(i.shape[1:])}
                               for i in table], indent=2))
        return
    console.err(f"gpl: layers of {name} usable with --layer, in forward order; map size at a {pre.crop}x{pre.crop} input")
    width = max(len(i.name) for i in table)
    kind_width = max(len(i.kind) for i in table)
    lines = [f"{'LAYER':<{width}}  {'TYPE':<{kind_width}}  {'CHANNELS':>8}  MAP"]
    lines += [f"{i.name:<{width}}  {i.kind:<{kind_width}}  {i.shape[0]:>8}  {i.shape[1]}x{i.shape[2]}" for i in table]
    click.echo("\n".join(lines))


@click.command()
@use("backbone", "weights", "device", "precision", "runtime")
@use("workers", "json", workers="As for gpl embed: the model's threads depend on it.", json="Print the measurements as JSON.",
     runtime="The runtimes to measure: torch, openvino, or auto: both where OpenVINO is installed (CPU).")
def tune(backbone, weights, device, precision, runtime, workers, as_json):
    """Measure the fastest batch size, memory layout and runtime for a backbone on this machine.

    Times the backbone at growing batch sizes in each memory layout, NCHW then channels-last, one
    row per measurement on stderr, on torch and then on OpenVINO where it is installed (in NCHW;
    converting the backbone first, once per machine), and caches the tables for this machine
    (backbone, device, precision, runtime and its version, threads); gpl embed then uses the fastest
    unless --batch-size is given, and with --runtime auto OpenVINO where it measured faster and the
    run is long enough to repay its start. gpl embed measures once by itself on runs long enough to repay
    it (1,000 images on a GPU, 20,000 on a CPU); run this to measure now, or again (say, after a
    measurement disturbed by other load).

    \b
    Examples:
      gpl tune
      gpl tune -b resnet50 --precision bf16
      gpl tune --runtime torch
    """
    from gpl_cli.embedding.settings import resolve_settings
    from gpl_cli.embedding.tuning import LAYOUTS, cache_file, layout_name, tune as run_tune
    from gpl_cli.models.backbones import load_backbone

    settings = resolve_settings(device, precision, workers, runtime=runtime)
    loaded = load_backbone(backbone, weights)
    if not as_json:
        console.err(f"gpl: timing {backbone} ({precision}, {settings.threads} thread(s)) at growing batch sizes...")

    def show(row: dict) -> None:
        console.err(f"  {layout_name(LAYOUTS[row['layout']]):<13} batch {row['batch']:>3}  {row['rate']:8.1f} images/s"
                    f"  {row['runtime']}")

    tables, plan = run_tune(loaded, settings, on_row=None if as_json else show)
    if as_json:
        click.echo(json.dumps({"backbone": backbone, "precision": precision, "tables": tables,
                               "batch_size": plan.batch_size, "channels_last": plan.channels_last,
                               "runtime": plan.runtime}, indent=2))
    else:
        click.echo(f"fastest: {plan.describe()} on {plan.runtime}; saved in {cache_file()}")
