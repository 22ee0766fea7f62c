"""Commands on files gpl wrote, and the pooling list: `gpl info`, `gpl export`, `gpl whiten fit`, `gpl pools`.

None of them imports torch.
"""

from __future__ import annotations

import json

import click

from gpl_cli.cli import console
from gpl_cli.cli.options import use
from gpl_cli.defaults import OUTPUT_FORMATS

PATH_LINES_PER_WRITE = 4096  # gpl info --paths writes its lines in blocks of this many


@click.command()
@click.argument("file")
@use("json", json="Print everything as one JSON object, the stored paths in row order included.")
@click.option("--paths", "paths_only", is_flag=True,
              help="Print only the stored paths, one per line in row order (row i of every pooling is line i).")
def info(file, as_json, paths_only):
    """Show what an embeddings file holds: size, count, poolings, backbone, precision, preprocessing, failures.

    FILE is an .h5, an .npy output (any of its .npy files or its .json), or a parquet output folder.
    The size counts all of the output's files. Names (--paths, failed images) are escaped so that each
    stays on its line: backslash, tab, newline and CR as \\\\ \\t \\n \\r, other control characters as
    \\xNN (--json carries them as JSON strings).

    \b
    Examples:
      gpl info emb.h5
      gpl info emb.h5 --paths | head
      gpl info emb.h5 --json | jq '.poolings | keys'
      gpl info emb.h5 --json | python -c 'import json,sys; print(json.load(sys.stdin)["count"])'
    """
    from gpl_cli.store.formats import describe

    if as_json and paths_only:
        raise click.UsageError("--json already lists the paths: give --json or --paths, not both")
    doc = describe(file)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif paths_only:
        from gpl_cli.store.sink import line_name

        names = [line_name(p) for p in doc["paths"]]
        # In blocks, not one write: a reader that leaves early (| head) then meets a later write and gpl exits
        # 141, where one huge write could end half done without an error.
        for start in range(0, len(names), PATH_LINES_PER_WRITE):
            click.echo("\n".join(names[start:start + PATH_LINES_PER_WRITE]))
    else:
        click.echo(_info_text(doc))


def _info_text(doc: dict) -> str:
    """`gpl info` for people; fields a file does not record are left out."""
    from gpl_cli.pooling.scales import scale_label
    from gpl_cli.report.html import human_bytes
    from gpl_cli.store.sink import line_name

    files = f" in {doc['file_count']} files" if doc["file_count"] > 1 else ""
    lines = [
        f"file          {line_name(doc['file'])}  ({doc['format']}, {human_bytes(doc['size_bytes'])}{files})",
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
        geometry = (f"longer side {pre['max_size']}, aspect kept" if pre.get("mode") == "keep-aspect"
                    else f"resize {pre['resize']}, centre crop {pre['crop']}")
        lines.append(f"preprocess    {geometry}, {pre['interpolation']}, mean {pre['mean']}, std {pre['std']}")
    if doc.get("scales", [1.0]) != [1.0]:
        lines.append("scales        " + ", ".join(map(scale_label, doc["scales"])) + _scaled_sizes(pre, doc["scales"])
                     + ", combined per pooling")
    if doc.get("layer"):
        lines.append(f"layer         {doc['layer']}")
    if "precision" in doc.get("config", {}):
        int8 = doc.get("int8")
        lines.append(f"precision     {doc['config']['precision']}" + (
            f"  (calibrated on {int8['calibration']}; agreement with f32 on {int8['held_out_images']} held-out "
            f"images: smallest cosine {int8['min_cosine']:.4f}, median {int8['median_cosine']:.4f})" if int8 else ""))
    if "runtime" in doc:
        lines.append(f"runtime       {doc['runtime']}")
    if "normalize" in doc:
        post = [f"power {doc['power']}"] if doc.get("power") else []
        post += [f"whiten {k} to {p['dim']} dims" for k, p in doc["poolings"].items() if "whiten" in p]
        lines.append(f"normalize     {doc['normalize']}" + (f"  (after {', '.join(post)})" if post else ""))
    pools = [f"{key} ({p['dim']})" if "dim" in p else key for key, p in doc["poolings"].items()]
    lines.append("poolings      " + ", ".join(pools))
    if "created" in doc:
        versions = ", ".join(f"{k} {v}" for k, v in doc.get("versions", {}).items())
        lines.append(f"created       {doc['created']}" + (f"  ({versions})" if versions else ""))
    if "exported_from" in doc:
        lines.append(f"exported from {doc['exported_from']}")
    failures = doc["failures"]
    lines += [f"  failed: {line_name(f['path'])}: {line_name(f['reason'])}" for f in failures[:20]]
    if len(failures) > 20:
        lines.append(f"  ... and {len(failures) - 20} more failures (gpl info --json lists all)")
    return "\n".join(lines)


def _scaled_sizes(pre: dict | None, scales: list[float]) -> str:
    """The input sizes of the scales, in words ('' when the file records no preprocessing)."""
    from gpl_cli.models.preprocess import Preprocess

    if not pre:
        return ""
    keep = pre.get("mode") == "keep-aspect"
    sizes = [Preprocess(**pre).at(s).max_size if keep else Preprocess(**pre).at(s).crop for s in scales]
    return f"  ({'longer side' if keep else 'crop'} {', '.join(map(str, sizes))} px)"


@click.command("export")
@click.argument("file")
@click.option("-o", "--output", required=True, help="Target file, folder (parquet), or - for stdout.")
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS),
              help="Target format (default: from the extension of -o; jsonl for -o -).")
@click.option("--shard-rows", type=click.IntRange(min=1), default=None,
              help="parquet: rows per npy/parquet shard.  [default: 100000]")
@use("overwrite", "quiet", quiet="No summary on stderr.")
def export_command(file, output, fmt, shard_rows, overwrite, quiet):
    """Convert an embeddings output to another format (rows, poolings and metadata kept).

    parquet writes a folder of npy shards per pooling plus parquet files of the paths in the
    same order (OUT/avg_emb/emb_00000.npy, OUT/metadata/metadata_00000.parquet), the layout
    embedding-reader (parquet_npy) and autofaiss read; it needs pyarrow. csv and tsv carry
    no failure records; their names are escaped as in every line output (\\\\ \\t \\n \\xNN).

    \b
    Examples:
      gpl export emb.h5 --format parquet -o emb_parquet
      gpl export emb.h5 -o emb.jsonl
      gpl export emb.h5 -o - --format csv | head -3
      gpl export emb_parquet -o emb.h5
    """
    from gpl_cli.store.export import export_embeddings

    summary = export_embeddings(file, output, fmt, overwrite, shard_rows)
    if summary.failures_dropped:
        console.err(f"gpl: note: the {summary.failures} failure records of {file} have no place in this format and were left out")
    if not quiet:
        target = "stdout" if output == "-" else ", ".join(summary.files)
        console.err(f"gpl: exported {summary.rows} rows -> {target}")


@click.group()
def whiten():
    """PCA whitening: learn it from an embeddings file, apply it with gpl embed --whiten.

    \b
    Examples:
      gpl whiten fit train.h5 -o whiten.npz --dims 512
      gpl embed photos/ -o photos.h5 --pool gem --whiten whiten.npz
    """


@whiten.command("fit")
@click.argument("embeddings", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, help="Whitening file to write (.npz).")
@click.option("--dims", type=click.IntRange(min=1), help="Output dimension (default: every direction with variance).")
@click.option("-p", "--pool", "pool", help="Which pooling of EMBEDDINGS to learn from (needed when it holds several).")
@use("overwrite")
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
    from gpl_cli.analysis.whitening import fit_file
    from gpl_cli.store.output import WHITENING, Output

    target = Output.resolve(output, kind=WHITENING, overwrite=overwrite)
    w = fit_file(embeddings, target, pool, dims)
    p = w.provenance
    console.err(f"gpl: whitening learned on {p['count']} {p['pooling']} vectors of {p['backbone']}: "
         f"{w.in_dim} -> {w.out_dim} dims -> {output}")


@click.command()
@use("json", json="Print the operators as JSON.")
def pools(as_json):
    """List the pooling operators: parameters (defaults), output dimension, formula, reference.

    C is the channel count of the feature map. Parameters go after a colon:
    --pool gem:p=4, --pool rmac:levels=3, --pool crow:a=2,b=2.

    \b
    Examples:
      gpl pools
      gpl pools --json | jq '.[].name'
    """
    from gpl_cli.pooling.spec import operator_table

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
