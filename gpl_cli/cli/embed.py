"""`gpl embed` and `gpl classify`: images in, rows out."""

from __future__ import annotations

import sys

import click

from gpl_cli.cli import console
from gpl_cli.cli.options import use
from gpl_cli.defaults import DEFAULT_POOLS, ENGINES
from gpl_cli.errors import EXIT_SOME_FAILED, GplError


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True,
              help="Output: FILE.h5, .npy, .jsonl, .csv, .tsv; a folder with --format shards (= parquet); - for stdout.")
@use("format", "backbone", "weights")
@click.option("-p", "--pool", "pools", multiple=True, default=list(DEFAULT_POOLS), show_default=True,
              help="Pooling; repeat or comma-separate for several from one forward pass (avg, max, ...).")
@use("normalize")
@click.option("--power", type=float, help="Signed power normalisation sign(x)|x|^POWER before anything else (0.5: signed square root).")
@click.option("--whiten", "whiten", multiple=True, type=click.Path(dir_okay=False),
              help="PCA whitening from 'gpl whiten fit' (L2, whiten, L2) for the pooling it was learned on; repeatable.")
@click.option("--layer", help="Pool this intermediate layer's map instead of the last one (gpl models --layers BACKBONE).")
@use("resize", "max_size", "scales", "batch_size", "workers", "device", "precision", "runtime")
@click.option("--calibration", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="--precision int8: calibrate the quantization on the images in DIR.  [default: up to 300 of the "
                   "run's own images]")
@click.option("--jpeg-draft", is_flag=True,
              help="Decode large JPEGs (shorter side >= 4x the resize size) at 1/2 to 1/8 scale: faster, vectors differ slightly.")
@use("nul", "overwrite")
@click.option("--image-key", metavar="EXT",
              help="Tar shards: the member extension that holds each sample's image.  [default: the first of jpg, jpeg, "
                   "png, webp, bmp, gif, tif, tiff the sample has]")
@click.option("--image-column", metavar="NAME",
              help="Parquet inputs: the column of image bytes (binary, or a {bytes, path} struct).  [default: the first "
                   "of jpg, jpeg, png, webp, image]")
@click.option("--key-column", metavar="NAME",
              help="Parquet inputs: the column that names each row (FILE/KEY).  [default: key if the file has one, "
                   "else the row number]")
@click.option("--keep-fields", metavar="LIST",
              help="Comma-separated fields stored with each row as string columns: tar sidecar members (txt, cls, json) "
                   "or their JSON fields (json.url), parquet columns (caption, image.path).")
@click.option("--resume", is_flag=True, help="Finish an interrupted run into the same OUTPUT (same options).")
@click.option("--update", is_flag=True, help="Embed only new or changed files (path, size, mtime) into an existing OUTPUT; drop vanished ones.")
@click.option("--strict", is_flag=True, help="Stop at the first image that cannot be embedded.")
@click.option("--checkpoint-rows", type=click.IntRange(min=1), default=256, show_default=True,
              help="Save finished work to the output's journal at least every N images (and every 5 s); a kill loses no more.")
@use("timeout", "quiet", "shard_rows")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: this machine; ray: Ray Data on a cluster (pip install 'ray[data]').")
@click.option("--ray-address", help="--engine ray: the cluster to join (auto, HOST:PORT, ray://HOST:10001); default: a local Ray instance.")
@click.option("--concurrency", type=click.IntRange(min=1), default=None,
              help="--engine ray: model actors.  [default: one per GPU; without GPUs half the CPUs]")
@click.option("--num-gpus", type=click.FloatRange(min=0), default=None,
              help="--engine ray: GPUs per model actor (0.5 puts two on a GPU).  [default: 1 if the cluster has GPUs]")
def embed(inputs, output, fmt, backbone, weights, pools, normalize, power, whiten, layer, resize, max_size, scales,
          batch_size, workers, device, precision, runtime, calibration, jpeg_draft, nul, overwrite, resume, update, strict, checkpoint_rows,
          timeout, quiet, shard_rows, engine, ray_address, concurrency, num_gpus, image_key, image_column, key_column,
          keep_fields):
    """Embed images (files, directories, tar shards, parquet files, or - for a list on stdin) into OUTPUT.

    Directories are searched recursively and sorted by relative path; a tar shard's samples
    (WebDataset layout) are read in stream order, a parquet file's rows in row order, and named
    SHARD/KEY. Patterns such as 'shards/{00000..00999}.tar' are expanded. Row i of every
    pooling belongs to paths[i]; files that cannot be read are skipped, reported on
    stderr and recorded as failures in the output (exit status 3).

    With -o - the rows stream to stdout as they are made: jsonl (one object per image,
    failures as {"path", "error"} objects), csv or tsv (header, then one row per image),
    or npy (one array, one pooling). Only data goes to stdout.

    \b
    Examples:
      gpl embed sample_images -o emb.h5
      gpl embed photos/ -o emb.npy --pool avg,max --normalize l2
      find photos -name '*.jpg' -print0 | gpl embed - -0 -o emb.h5
      gpl embed photos/ -o - | jq -c '{path, n: (.embeddings.avg | length)}'
      gpl embed photos/ -o - --format csv > emb.csv
      gpl embed photos/ -o emb.h5 --backbone resnet50
      gpl embed photos/ -o emb.h5 --resume     # finish an interrupted run
      gpl embed photos/ -o emb.h5 --update     # add new/changed photos, drop deleted ones
      gpl embed photos/ -o emb.h5 --pool gem:p=4,rmac --resize keep-aspect --max-size 512
      gpl embed photos/ -o emb.h5 --pool gem --whiten whiten.npz
      gpl embed photos/ -o emb.h5 --pool gem --resize keep-aspect --scales 1,1.41,2
      gpl embed 'shards/{00000..00099}.tar' -o emb.h5 --keep-fields json.url,txt
      gpl embed data/*.parquet -o emb.h5 --image-column jpg --key-column key
      gpl embed photos/ -o emb.h5 --engine ray                       # Ray Data, local instance
      gpl embed photos/ -o emb_dir --format shards --engine ray --ray-address auto
    """
    from gpl_cli.embedding.config import EmbedConfig, RayOptions, RunMode, RunOptions
    from gpl_cli.embedding.run import embed_into
    from gpl_cli.embedding.sources import SourceOptions
    from gpl_cli.store.output import Output

    # Everything that can be judged without torch is, before the seconds its import takes.
    config = EmbedConfig(backbone=backbone, weights=weights, pools=tuple(pools), normalize=normalize, power=power,
                         whiten=tuple(whiten), layer=layer, resize=resize, max_size=max_size,
                         precision=precision, calibration=calibration, jpeg_draft=jpeg_draft, scales=scales)
    config.check()
    target = Output.resolve(output, fmt, keys=[s.key for s in config.pool_specs()], overwrite=overwrite,
                            shard_rows=shard_rows)
    given = [name for name, value in (("--ray-address", ray_address), ("--concurrency", concurrency),
                                      ("--num-gpus", num_gpus)) if value is not None]
    if given and engine != "ray":
        raise GplError(f"{given[0]} applies to --engine ray only")
    ray = RayOptions(ray_address, concurrency, num_gpus) if engine == "ray" else None
    options = RunOptions(batch_size, workers, device, timeout or None, engine=engine, ray=ray, runtime=runtime)
    mode = RunMode(resume=resume, update=update, checkpoint_rows=checkpoint_rows)
    kept = tuple(f.strip() for f in keep_fields.split(",")) if keep_fields is not None else ()
    if kept and target.to_stdout and target.format == "npy":
        raise GplError("--keep-fields: a bare npy array on stdout has no place for them; use --format jsonl, csv or tsv")
    sources = SourceOptions(image_key, image_column, key_column, kept)
    sources.check()
    with console.Bars(quiet) as bars:
        summary = embed_into(target, inputs, config, options, mode, nul=nul, strict=strict, sources=sources,
                             on_progress=bars.callback, on_failure=console.skipped, on_note=console.note)
    if not quiet:
        dims = ", ".join(f"{k}={d}" for k, d in summary.dims.items())
        reused = f" ({summary.reused} reused)" if summary.reused else ""
        scaled = ("scales " + ", ".join(f"{label}: {seconds:.1f} s" for label, seconds in summary.scale_seconds.items())
                  + " (model time), " if len(summary.scale_seconds) > 1 else "")
        console.err(
            f"gpl: embedded {summary.embedded}{reused}, failed {summary.failed}, dims {dims}, precision {config.precision}, "
            f"runtime {summary.runtime}, "
            f"{scaled}"
            f"{summary.seconds:.1f} s, {summary.rate:.1f} images/s ({summary.plan}; {summary.execution}) "
            f"-> {'stdout' if target.to_stdout else output}"
        )
    for key, count in summary.zero_rows.items():
        console.err(f"gpl: warning: {count} image(s) got an all-zero {key} vector: their cosine similarity to every "
                    "image is 0, so search cannot rank them (try other pooling parameters)")
    if summary.failed:
        sys.exit(EXIT_SOME_FAILED)


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="Classes per image.")
@click.option("-o", "--output", default="-", show_default=True, help="- for stdout, or FILE.jsonl / FILE.csv.")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl", "csv"]),
              help="Output format (default: text on stdout, else from the extension).")
@use("backbone", backbone="A backbone with a trained linear head: efficientnet_lite0/1/2, torchvision classification CNNs.")
@use("weights")
@click.option("-p", "--pool", default="avg", show_default=True,
              help="Pooling fed to the head; the head was trained on avg (others are shown with a warning).")
@use("batch_size", "workers", "device", "runtime", "timeout", "nul", "overwrite", "quiet")
@click.option("--scales", hidden=True)  # refused with the reason (below), not as an unknown option
def classify(inputs, k, output, fmt, backbone, weights, pool, batch_size, workers, device, runtime, timeout, nul, overwrite,
             quiet, scales):
    """Top-k ImageNet classes of images, from the backbone's own trained classifier head.

    The head is applied to the pooled vector of the final feature map, as in gpl embed
    (no normalisation or whitening: the head needs the raw vector). It takes no --scales: the
    head was trained on raw vectors of one input size, and the average of unit vectors from
    several sizes has another scale, which would distort its probabilities. Inputs, decoding,
    failures and exit status are those of gpl embed.

    \b
    Output (text, on stdout): path TAB rank TAB probability TAB class index TAB class name,
    one line per class; jsonl: {"path", "pooling", "classes": [{"rank", "index", "name",
    "probability"}]} per image; csv: path,rank,index,name,probability,error. In text and csv
    a path's backslash, tab, newline and other control characters are written as escapes
    (\\\\ \\t \\n \\xNN), so a name never adds a line or a field.

    \b
    Examples:
      gpl classify sample_images/coffee.png
      gpl classify photos/ -k 1 -o predictions.csv
      gpl classify photos/ --pool max -o - --format jsonl   # max-pooled features into an avg-trained head
    """
    from gpl_cli.analysis.classify import classify as run_classify
    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.store.output import PREDICTIONS, Output

    if scales is not None:
        raise GplError("classify takes no --scales: the head was trained on raw vectors of one input size, and an "
                       "average of unit vectors from several sizes would distort its probabilities")
    target = Output.resolve(output, fmt, kind=PREDICTIONS, overwrite=overwrite)
    config = EmbedConfig(backbone=backbone, weights=weights, pools=(pool,))
    config.check()
    items = collect_inputs(inputs, nul_separated=nul)
    if items.duplicates:
        console.err(f"gpl: warning: {len(items.duplicates)} duplicate input(s) classified once "
                    f"(first: {items.duplicates[0]})")
    options = RunOptions(batch_size, workers, device, timeout or None, runtime=runtime)
    with console.Bars(quiet) as bars:
        summary = run_classify(items, target, config, k, options,
                               on_failure=console.skipped, on_progress=bars.callback,
                               on_warning=lambda text: console.say(f"gpl: warning: {text}"))
    if not quiet:
        console.err(f"gpl: classified {summary.classified}, failed {len(summary.failed)} ({backbone}, {summary.pool} "
                    f"pooling) -> {'stdout' if target.to_stdout else output}")
    if summary.failed:
        sys.exit(EXIT_SOME_FAILED)
