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
from gpl_cli.errors import (
    EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, GplError, OutputClosed,
)

DEFAULT_WORKERS = min(4, max(0, (os.cpu_count() or 1) - 1))
# The same as gpl_cli.writers.FORMATS, spelled out so `gpl --help` need not import numpy.
OUTPUT_FORMATS = ["h5", "npy", "jsonl", "csv", "tsv", "parquet"]


def _err(message: str) -> None:
    click.echo(message, err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # click would swallow it with exit status 1; gpl gives it its own status.
            raise OutputClosed() from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gpl")
def cli() -> None:
    """gpl - Global Pooling Layer: image embeddings from CNN feature maps.

    \b
    Examples:
      gpl embed photos/ -o photos.h5
      gpl embed photos/ -o photos.h5 --pool avg --pool max --normalize l2
      find photos -name '*.jpg' -print0 | gpl embed - -0 -o - | head -1
      gpl info photos.h5
      gpl neighbors photos.h5 photos/cat.jpg -k 5
      gpl neighbors photos.h5 --duplicates --threshold 0.95
      gpl export photos.h5 --format parquet -o photos_parquet

    \b
    Exit status: 0 ok, 1 internal error, 2 usage or input error, 3 some images failed,
    130 interrupted (Ctrl-C), 141 the reader of stdout went away.
    Shell completion (bash): eval "$(_GPL_COMPLETE=bash_source gpl)"
    """


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True,
              help="Output: FILE.h5, .npy, .jsonl, .csv, .tsv; a folder with --format parquet; - for stdout.")
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS),
              help="Output format (default: from the extension; jsonl for -o -).")
@click.option("-b", "--backbone", default="efficientnet_lite0", show_default=True,
              help="Backbone: efficientnet_lite0/1/2 (offline), a torchvision CNN (resnet50, ...), or timm:NAME.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state dict (.pth/.pt/.safetensors) instead of the published weights.")
@click.option("-p", "--pool", "pools", multiple=True, default=["avg"], show_default=True,
              help="Pooling; repeat or comma-separate for several from one forward pass (avg, max, ...).")
@click.option("--normalize", type=click.Choice(["none", "l2"]), default="none", show_default=True, help="Normalisation of each vector.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=DEFAULT_WORKERS, show_default=True, help="Image decoding processes.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@click.option("-0", "--null", "nul", is_flag=True, help="With '-': paths on stdin are NUL-separated (find -print0).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def embed(inputs, output, fmt, backbone, weights, pools, normalize, batch_size, workers, device, nul, overwrite, quiet):
    """Embed images (files, directories, or - for a list on stdin) into OUTPUT.

    Directories are searched recursively and sorted by relative path. Row i of every
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
    """
    from gpl_cli.engine import EmbedConfig, RunOptions
    from gpl_cli.inputs import collect_inputs
    from gpl_cli.pipeline import OutputTarget, run_embed
    from gpl_cli.writers import format_for

    config = EmbedConfig(backbone=backbone, weights=weights, pools=tuple(pools), normalize=normalize)
    config.pool_specs()  # fail on a bad --pool or --format before loading anything
    format_for(output, fmt)
    inputs = collect_inputs(inputs, nul_separated=nul)
    if not inputs.items:
        raise GplError("no images found in the inputs (extensions: jpg jpeg png webp bmp gif tif tiff)")
    summary = run_embed(config, inputs, OutputTarget(output, fmt, overwrite), RunOptions(batch_size, workers, device), quiet)
    if not quiet:
        dims = ", ".join(f"{k}={d}" for k, d in summary.dims.items())
        _err(
            f"gpl: embedded {summary.embedded}, failed {summary.failed}, dims {dims}, "
            f"{summary.seconds:.1f} s, {summary.rate:.1f} images/s -> {'stdout' if output == '-' else output}"
        )
    if summary.failed:
        sys.exit(EXIT_SOME_FAILED)


@cli.command()
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
def info(file, as_json):
    """Show what an embeddings file holds: count, poolings, backbone, preprocessing, failures.

    FILE is an .h5, an .npy output (any of its .npy files or its .json), or a parquet output folder.

    \b
    Examples:
      gpl info emb.h5
      gpl info emb.h5 --json | jq '.poolings | keys'
      gpl info emb.h5 --json | python -c 'import json,sys; print(json.load(sys.stdin)["count"])'
    """
    from gpl_cli.readers import describe

    doc = describe(file)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(_info_text(doc))


def _info_text(doc: dict) -> str:
    """`gpl info` for people; fields a file does not record are left out."""
    lines = [
        f"file          {doc['file']}  ({doc['format']})",
        f"images        {doc['count']} embedded, {doc['failed']} failed",
    ]
    if "backbone" in doc:
        shape = " x ".join(map(str, doc.get("feature_map_shape", [])))
        lines.append(f"backbone      {doc['backbone']}  (feature map C x H x W = {shape})")
    if "weights" in doc:
        lines += [f"weights       {doc['weights']}", f"              sha256 {doc.get('weights_sha256')}"]
    if "cut" in doc:
        lines.append(f"cut at        {doc['cut']}")
    pre = doc.get("preprocess")
    if pre:
        lines.append(
            f"preprocess    resize {pre['resize']}, centre crop {pre['crop']}, {pre['interpolation']}, "
            f"mean {pre['mean']}, std {pre['std']}"
        )
    if "normalize" in doc:
        lines.append(f"normalize     {doc['normalize']}")
    pools = [f"{key} ({p['dim']})" if "dim" in p else key for key, p in doc["poolings"].items()]
    lines.append("poolings      " + ", ".join(pools))
    if "created" in doc:
        versions = ", ".join(f"{k} {v}" for k, v in doc.get("versions", {}).items())
        lines.append(f"created       {doc['created']}" + (f"  ({versions})" if versions else ""))
    if "exported_from" in doc:
        lines.append(f"exported from {doc['exported_from']}")
    failures = doc["failures"]
    lines += [f"  failed: {f['path']}: {f['reason']}" for f in failures[:20]]
    if len(failures) > 20:
        lines.append(f"  ... and {len(failures) - 20} more failures (gpl info --json lists all)")
    return "\n".join(lines)


@cli.command()
@click.argument("file")
@click.argument("queries", nargs=-1)
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours per query.")
@click.option("-p", "--pool", "key", help="Pooling to compare by (default: the file's first).")
@click.option("--duplicates", is_flag=True, help="Instead of queries: groups of near-duplicate images across FILE.")
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=None,
              help="With --duplicates: cosine similarity from which two images are duplicates.  [default: 0.95]")
@click.option("--backend", type=click.Choice(["auto", "numpy", "faiss"]), default="auto", show_default=True,
              help="k-NN search: auto uses FAISS (if installed) from 1e8 rows x queries, else numpy; both exact.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="Where query images not in FILE are embedded.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def neighbors(file, queries, k, key, duplicates, threshold, backend, device, as_json):
    """Nearest images in FILE by cosine similarity, or near-duplicate groups.

    A QUERY is a path stored in FILE, or any image file: it is then embedded with the
    backbone, weights, preprocessing and pooling recorded in FILE. A query that is in FILE
    finds itself first (score 1.0). Output: one line per neighbour, rank TAB score TAB path;
    with several queries each block starts with a line ==> QUERY <==.

    --duplicates prints group TAB score TAB path, one line per image in a group; score is the
    image's highest similarity to another member. Groups are connected components: A~B and
    B~C make one group.

    \b
    Examples:
      gpl neighbors emb.h5 photos/cat.jpg
      gpl neighbors emb.h5 ~/Downloads/new_photo.jpg -k 5 --json
      gpl neighbors emb.h5 --duplicates --threshold 0.95
      gpl neighbors emb.h5 --duplicates | cut -f3
    """
    from gpl_cli import neighbors as nb

    if duplicates:
        if queries:
            raise GplError("--duplicates searches the whole file: give no QUERY with it")
        groups = nb.near_duplicates(file, 0.95 if threshold is None else threshold, key)
        if as_json:
            doc = [
                {"group": g, "size": len(members), "members": [{"path": m.path, "score": m.score} for m in members]}
                for g, members in enumerate(groups, 1)
            ]
            click.echo(json.dumps(doc, indent=2))
        else:
            lines = [f"{g}\t{m.score:.4f}\t{m.path}" for g, members in enumerate(groups, 1) for m in members]
            if lines:
                click.echo("\n".join(lines))
        if not groups:
            _err("gpl: no near-duplicates at that threshold")
        return
    if threshold is not None:
        raise GplError("--threshold applies to --duplicates only")
    results = nb.nearest(file, list(queries), k, key, backend, device)
    if as_json:
        doc = [
            {"query": r.query, "source": r.source,
             "neighbors": [{"rank": n.rank, "score": n.score, "path": n.path} for n in r.neighbors]}
            for r in results
        ]
        click.echo(json.dumps(doc, indent=2))
        return
    blocks = []
    for r in results:
        lines = [f"==> {r.query} <=="] if len(results) > 1 else []
        lines += [f"{n.rank}\t{n.score:.4f}\t{n.path}" for n in r.neighbors]
        blocks.append("\n".join(lines))
    click.echo("\n\n".join(blocks))


@cli.command("export")
@click.argument("file")
@click.option("-o", "--output", required=True, help="Target file, folder (parquet), or - for stdout.")
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS),
              help="Target format (default: from the extension of -o; jsonl for -o -).")
@click.option("--shard-rows", type=click.IntRange(min=1), default=None,
              help="parquet: rows per npy/parquet shard.  [default: 100000]")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
def export_command(file, output, fmt, shard_rows, overwrite, quiet):
    """Convert an embeddings output to another format (rows, poolings and metadata kept).

    parquet writes a folder of npy shards per pooling plus parquet files of the paths in the
    same order (OUT/avg_emb/emb_00000.npy, OUT/metadata/metadata_00000.parquet), the layout
    embedding-reader (parquet_npy) and autofaiss read; it needs pyarrow. csv and tsv carry
    no failure records.

    \b
    Examples:
      gpl export emb.h5 --format parquet -o emb_parquet
      gpl export emb.h5 -o emb.jsonl
      gpl export emb.h5 -o - --format csv | head -3
      gpl export emb_parquet -o emb.h5
    """
    from gpl_cli.export import export_embeddings

    summary = export_embeddings(file, output, fmt, overwrite, shard_rows)
    if summary.failures_dropped:
        _err(f"gpl: note: the {summary.failures} failure records of {file} have no place in this format and were left out")
    if not quiet:
        target = "stdout" if output == "-" else ", ".join(summary.files)
        _err(f"gpl: exported {summary.rows} rows -> {target}")


def _quiet_stdout() -> None:
    """Point fd 1 at /dev/null, so the interpreter's final flush of stdout cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main() -> None:
    """Console entry point: user errors become one line on stderr and an exit status.

    The statuses are listed in gpl_cli.errors and the README ("Exit codes").
    """
    try:
        cli.main(prog_name="gpl", standalone_mode=False)  # also under python -m gpl_cli: usage and _GPL_COMPLETE
    except GplError as exc:
        _err(f"gpl: error: {exc}")
        sys.exit(exc.exit_code)
    except OutputClosed:
        _quiet_stdout()
        sys.exit(EXIT_BROKEN_PIPE)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _err("gpl: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(EXIT_OK)
