"""The `gpl` command line: parse options, call the library, print.

Heavy modules (torch, timm, h5py) are imported inside commands so `gpl --help` stays fast.
stdout carries data only; progress, warnings and errors go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from gpl_cli.defaults import (
    COMPARE_POOLS,
    DEFAULT_BACKBONE,
    DEFAULT_POOLS,
    DEVICES,
    ENGINES,
    NORMALIZATIONS,
    OUTPUT_FORMATS,
    PRECISIONS,
    RESIZE_MODES,
)
from gpl_cli.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_TERMINATED,
    GplError,
    OutputClosed,
)
from gpl_cli.runtime import tune_process
from gpl_cli.version import __version__

WORKERS_HELP = ("Loader processes (default: on a CPU one per core, each decoding and embedding with one thread; "
                "with a GPU, decoders on all but one core, at most 4). 0: all in this process.")


def _err(message: str) -> None:
    click.echo(message, err=True)


def _say(message: str) -> None:
    """A line on stderr that leaves any progress bar intact."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def _skipped(failure) -> None:
    """The library's on_failure: one line per image that could not be embedded."""
    _say(f"gpl: skipped {failure.path}: {failure.reason}")


class _LogLines(logging.Handler):
    """gpl_cli's log records (library notes and warnings) as `gpl: ...` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        _say(f"gpl: {kind}{record.getMessage()}")


def _show_library_logs(notes: bool = True) -> None:
    """Show gpl_cli's log records on stderr: warnings always, notes (INFO) unless `notes` is False (-q)."""
    logger = logging.getLogger("gpl_cli")
    if not any(isinstance(h, _LogLines) for h in logger.handlers):
        logger.addHandler(_LogLines())
        logger.propagate = False
    logger.setLevel(logging.INFO if notes else logging.WARNING)


class _Bars:
    """The library's on_progress(label, done, total) as tqdm bars on stderr, one per label.

    The "embed" bar stays on screen when done, as the run's record; other passes ("ranking avg")
    are transient and titled by their label.
    """

    def __init__(self):
        self.bars = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        bar = self.bars.get(label)
        if bar is None:
            from tqdm import tqdm

            lasting = label == "embed"
            bar = self.bars[label] = tqdm(total=total, initial=done, desc=None if lasting else f"gpl: {label}",
                                          unit="img", file=sys.stderr, leave=lasting, dynamic_ncols=lasting)
        bar.update(done - bar.n)
        if done >= total:
            self.close(label)

    def close(self, label: str | None = None) -> None:
        for key in [label] if label else list(self.bars):
            bar = self.bars.pop(key, None)
            if bar is not None:
                bar.close()


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
      gpl classify photos/cat.jpg -k 3
      gpl neighbors photos.h5 photos/cat.jpg -k 5
      gpl neighbors photos.h5 --duplicates --threshold 0.95
      gpl export photos.h5 --format parquet -o photos_parquet
      gpl explain photo.jpg -o explain.png

    \b
    Exit status: 0 ok, 1 internal error, 2 usage or input error, 3 some images failed,
    130 interrupted (Ctrl-C), 141 the reader of stdout went away, 143 terminated (SIGTERM).
    Shell completion (bash): eval "$(_GPL_COMPLETE=bash_source gpl)"
    """
    _show_library_logs()


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True,
              help="Output: FILE.h5, .npy, .jsonl, .csv, .tsv; a folder with --format shards (= parquet); - for stdout.")
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS),
              help="Output format (default: from the extension; jsonl for -o -).")
@click.option("-b", "--backbone", default=DEFAULT_BACKBONE, show_default=True,
              help="Backbone: efficientnet_lite0/1/2 (offline), a torchvision CNN (resnet50, ...), or timm:NAME.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state dict (.pth/.pt/.safetensors) instead of the published weights.")
@click.option("-p", "--pool", "pools", multiple=True, default=list(DEFAULT_POOLS), show_default=True,
              help="Pooling; repeat or comma-separate for several from one forward pass (avg, max, ...).")
@click.option("--normalize", type=click.Choice(NORMALIZATIONS), default="none", show_default=True, help="Normalisation of each vector.")
@click.option("--power", type=float, help="Signed power normalisation sign(x)|x|^POWER before anything else (0.5: signed square root).")
@click.option("--whiten", "whiten", multiple=True, type=click.Path(dir_okay=False),
              help="PCA whitening from 'gpl whiten fit' (L2, whiten, L2) for the pooling it was learned on; repeatable.")
@click.option("--layer", help="Pool this intermediate layer's map instead of the last one (gpl models --layers BACKBONE).")
@click.option("--resize", type=click.Choice(RESIZE_MODES), default="crop", show_default=True,
              help="crop: the backbone's resize + centre crop; keep-aspect: longer side --max-size, nothing cropped.")
@click.option("--max-size", type=click.IntRange(min=1), help="Longer side with --resize keep-aspect (default: the backbone's crop size).")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Images per forward pass (default: the fastest measured on this machine, see gpl tune; "
                   "unmeasured: 4 on a CPU, 16 on a GPU).")
@click.option("--workers", type=click.IntRange(min=0), help=WORKERS_HELP)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Compute precision of the backbone: bf16 on CPUs with native bfloat16 or GPUs, fp16 on GPUs. Pooling stays fp32.")
@click.option("--jpeg-draft", is_flag=True,
              help="Decode large JPEGs (shorter side >= 4x the resize size) at 1/2 to 1/8 scale: faster, vectors differ slightly.")
@click.option("-0", "--null", "nul", is_flag=True, help="With '-': paths on stdin are NUL-separated (find -print0).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--resume", is_flag=True, help="Finish an interrupted run into the same OUTPUT (same options).")
@click.option("--update", is_flag=True, help="Embed only new or changed files (path, size, mtime) into an existing OUTPUT; drop vanished ones.")
@click.option("--strict", is_flag=True, help="Stop at the first image that cannot be embedded.")
@click.option("--checkpoint-rows", type=click.IntRange(min=1), default=256, show_default=True,
              help="Save finished work to the output's journal at least every N images (and every 5 s); a kill loses no more.")
@click.option("--timeout", type=click.FloatRange(min=0), default=60, show_default=True, help="Seconds allowed to decode one image (0: no limit).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--shard-rows", type=click.IntRange(min=1), default=None,
              help="--format shards: rows per npy/parquet shard.  [default: 100000]")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: this machine; ray: Ray Data on a cluster (pip install 'gpl-cli[ray]').")
@click.option("--ray-address", help="--engine ray: the cluster to join (auto, HOST:PORT, ray://HOST:10001); default: a local Ray instance.")
@click.option("--concurrency", type=click.IntRange(min=1), default=None,
              help="--engine ray: model actors.  [default: one per GPU; without GPUs half the CPUs]")
@click.option("--num-gpus", type=click.FloatRange(min=0), default=None,
              help="--engine ray: GPUs per model actor (0.5 puts two on a GPU).  [default: 1 if the cluster has GPUs]")
def embed(inputs, output, fmt, backbone, weights, pools, normalize, power, whiten, layer, resize, max_size,
          batch_size, workers, device, precision, jpeg_draft, nul, overwrite, resume, update, strict, checkpoint_rows,
          timeout, quiet,
          shard_rows, engine, ray_address, concurrency, num_gpus):
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
      gpl embed photos/ -o emb.h5 --resume     # finish an interrupted run
      gpl embed photos/ -o emb.h5 --update     # add new/changed photos, drop deleted ones
      gpl embed photos/ -o emb.h5 --pool gem:p=4,rmac --resize keep-aspect --max-size 512
      gpl embed photos/ -o emb.h5 --pool gem --whiten whiten.npz
      gpl embed photos/ -o emb.h5 --engine ray                       # Ray Data, local instance
      gpl embed photos/ -o emb_dir --format shards --engine ray --ray-address auto
    """
    from gpl_cli.config import EmbedConfig
    from gpl_cli.formats import check_output_location
    from gpl_cli.inputs import collect_inputs

    # Everything that can be judged without torch is, before the seconds its import takes.
    config = EmbedConfig(backbone=backbone, weights=weights, pools=tuple(pools), normalize=normalize, power=power,
                         whiten=tuple(whiten), layer=layer, resize=resize, max_size=max_size,
                         precision=precision, jpeg_draft=jpeg_draft)
    config.check()
    keys = [s.key for s in config.pool_specs()]
    check_output_location(output, fmt, keys)
    given = [name for name, value in (("--ray-address", ray_address), ("--concurrency", concurrency),
                                      ("--num-gpus", num_gpus)) if value is not None]
    if given and engine != "ray":
        raise GplError(f"{given[0]} applies to --engine ray only")
    inputs = collect_inputs(inputs, nul_separated=nul)
    if not inputs.items:
        raise GplError("no images found in the inputs (extensions: jpg jpeg png webp bmp gif tif tiff)")
    if inputs.duplicates:
        _err(f"gpl: warning: {len(inputs.duplicates)} duplicate input(s) embedded once (first: {inputs.duplicates[0]})")
    check_output_location(output, fmt, keys, [it.path for it in inputs.items])

    from gpl_cli.engine import RunOptions
    from gpl_cli.pipeline import OutputTarget, RunMode, run_embed
    from gpl_cli.ray_engine import RayOptions

    ray = RayOptions(ray_address, concurrency, num_gpus) if engine == "ray" else None
    options = RunOptions(batch_size, workers, device, timeout or None, engine=engine, ray=ray)
    bars = _Bars()
    try:
        summary = run_embed(
            config, inputs, OutputTarget(output, fmt, overwrite, shard_rows), options,
            quiet, RunMode(resume=resume, update=update, strict=strict, checkpoint_rows=checkpoint_rows),
            on_progress=None if quiet else bars, on_failure=_skipped,
        )
    finally:
        bars.close()
    if not quiet:
        dims = ", ".join(f"{k}={d}" for k, d in summary.dims.items())
        reused = f" ({summary.reused} reused)" if summary.reused else ""
        _err(
            f"gpl: embedded {summary.embedded}{reused}, failed {summary.failed}, dims {dims}, "
            f"{summary.seconds:.1f} s, {summary.rate:.1f} images/s ({summary.plan}; {summary.execution}) "
            f"-> {'stdout' if output == '-' else output}"
        )
    for key, count in summary.zero_rows.items():
        _err(f"gpl: warning: {count} image(s) got an all-zero {key} vector: their cosine similarity to every "
             "image is 0, so search cannot rank them (try other pooling parameters)")
    if summary.failed:
        sys.exit(EXIT_SOME_FAILED)


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="Classes per image.")
@click.option("-o", "--output", default="-", show_default=True, help="- for stdout, or FILE.jsonl / FILE.csv.")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl", "csv"]),
              help="Output format (default: text on stdout, else from the extension).")
@click.option("-b", "--backbone", default="efficientnet_lite0", show_default=True,
              help="A backbone with a trained linear head: efficientnet_lite0/1/2, torchvision classification CNNs.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state dict instead of the published weights.")
@click.option("-p", "--pool", default="avg", show_default=True,
              help="Pooling fed to the head; the head was trained on avg (others are shown with a warning).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass (default: 4 on a CPU, 16 on a GPU).")
@click.option("--workers", type=click.IntRange(min=0), help=WORKERS_HELP)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@click.option("--timeout", type=click.FloatRange(min=0), default=60, show_default=True, help="Seconds allowed to decode one image (0: no limit).")
@click.option("-0", "--null", "nul", is_flag=True, help="With '-': paths on stdin are NUL-separated (find -print0).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def classify(inputs, k, output, fmt, backbone, weights, pool, batch_size, workers, device, timeout, nul, overwrite,
             quiet):
    """Top-k ImageNet classes of images, from the backbone's own trained classifier head.

    The head is applied to the pooled vector of the final feature map, as in gpl embed
    (no normalisation or whitening: the head needs the raw vector). Inputs, decoding,
    failures and exit status are those of gpl embed.

    \b
    Output (text, on stdout): path TAB rank TAB probability TAB class index TAB class name,
    one line per class; jsonl: {"path", "pooling", "classes": [{"rank", "index", "name",
    "probability"}]} per image; csv: path,rank,index,name,probability,error.

    \b
    Examples:
      gpl classify sample_images/coffee.png
      gpl classify photos/ -k 1 -o predictions.csv
      gpl classify photos/ --pool max -o - --format jsonl   # max-pooled features into an avg-trained head
    """
    from tqdm import tqdm

    from gpl_cli.classify import classify as run_classify
    from gpl_cli.engine import RunOptions
    from gpl_cli.inputs import collect_inputs

    items = collect_inputs(inputs, nul_separated=nul)
    if not items.items:
        raise GplError("no images found in the inputs (extensions: jpg jpeg png webp bmp gif tif tiff)")
    if items.duplicates:
        _err(f"gpl: warning: {len(items.duplicates)} duplicate input(s) classified once (first: {items.duplicates[0]})")
    with tqdm(total=len(items.items), unit="img", file=sys.stderr, disable=quiet, dynamic_ncols=True) as bar:
        summary = run_classify(
            items.items, output, fmt, backbone, weights, pool, k,
            RunOptions(batch_size, workers, device, timeout or None), overwrite,
            on_failure=lambda name, reason: tqdm.write(f"gpl: skipped {name}: {reason}", file=sys.stderr),
            on_progress=bar.update,
            on_warning=lambda text: tqdm.write(f"gpl: warning: {text}", file=sys.stderr),
        )
    if not quiet:
        _err(f"gpl: classified {summary.classified}, failed {len(summary.failed)} ({backbone}, {summary.pool} pooling) "
             f"-> {'stdout' if output == '-' else output}")
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
    from gpl_cli.formats import describe

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
        geometry = (f"longer side {pre['max_size']}, aspect kept" if pre.get("mode") == "keep-aspect"
                    else f"resize {pre['resize']}, centre crop {pre['crop']}")
        lines.append(f"preprocess    {geometry}, {pre['interpolation']}, mean {pre['mean']}, std {pre['std']}")
    if doc.get("layer"):
        lines.append(f"layer         {doc['layer']}")
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
    lines += [f"  failed: {f['path']}: {f['reason']}" for f in failures[:20]]
    if len(failures) > 20:
        lines.append(f"  ... and {len(failures) - 20} more failures (gpl info --json lists all)")
    return "\n".join(lines)


@cli.command()
@click.argument("file")
@click.argument("queries", nargs=-1)
@click.option("-k", "k", type=click.IntRange(min=1), default=None,
              help="Neighbours per query; with --outliers, score by the k-th nearest.  [default: 10; 5 with --outliers]")
@click.option("-p", "--pool", "key", help="Pooling to compare by (default: the file's first).")
@click.option("--duplicates", is_flag=True, help="Instead of queries: groups of near-duplicate images across FILE.")
@click.option("--outliers", is_flag=True, help="Instead of queries: the images least like any other in FILE.")
@click.option("--top", type=click.IntRange(min=1), default=None, help="With --outliers: how many to list.  [default: 20]")
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=None,
              help="With --duplicates: cosine similarity from which two images are duplicates.  [default: 0.95]")
@click.option("--backend", type=click.Choice(["auto", "numpy", "faiss"]), default="auto", show_default=True,
              help="k-NN search: auto uses FAISS (if installed) from 1e8 rows x queries, else numpy; both exact.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where query images not in FILE are embedded.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Also write a page with the images (thumbnails embedded, works offline).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --html file.")
def neighbors(file, queries, k, key, duplicates, outliers, top, threshold, backend, device, as_json, html_path,
              overwrite):
    """Nearest images in FILE by cosine similarity, near-duplicate groups, or outliers.

    A QUERY is a path stored in FILE, or any image file: it is then embedded with the
    backbone, weights, preprocessing and pooling recorded in FILE. A query that is in FILE
    finds itself first (score 1.0). Output: one line per neighbour, rank TAB score TAB path;
    with several queries each block starts with a line ==> QUERY <==.

    --duplicates prints group TAB score TAB path, one line per image in a group; score is the
    image's highest similarity to another member. Groups are connected components: A~B and
    B~C make one group.

    --outliers prints rank TAB score TAB path for the --top images with the lowest score, the
    cosine similarity to their k-th nearest other image.

    --html FILE also writes a page showing the images, one row per query, group or outlier.

    \b
    Examples:
      gpl neighbors emb.h5 photos/cat.jpg
      gpl neighbors emb.h5 ~/Downloads/new_photo.jpg -k 5 --json
      gpl neighbors emb.h5 --duplicates --threshold 0.95
      gpl neighbors emb.h5 --duplicates | cut -f3
      gpl neighbors emb.h5 --outliers -k 5 --top 20 --html outliers.html
    """
    from gpl_cli import neighbors as nb

    if html_path:
        from gpl_cli.html_report import check_output

        check_output(html_path, overwrite)
    if duplicates and outliers:
        raise GplError("--duplicates and --outliers are alternatives; give one")
    if top is not None and not outliers:
        raise GplError("--top applies to --outliers only")
    if outliers:
        if queries:
            raise GplError("--outliers searches the whole file: give no QUERY with it")
        if threshold is not None:
            raise GplError("--threshold applies to --duplicates only")
        _outliers(file, k, top, key, backend, as_json, html_path)
        return
    if duplicates:
        if queries:
            raise GplError("--duplicates searches the whole file: give no QUERY with it")
        threshold = 0.95 if threshold is None else threshold
        groups = nb.near_duplicates(file, threshold, key)
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
        if html_path:
            from gpl_cli.html_report import duplicates_page

            _write_html(html_path, file, key, duplicates_page, groups, threshold=threshold)
        return
    if threshold is not None:
        raise GplError("--threshold applies to --duplicates only")
    results = nb.nearest(file, list(queries), 10 if k is None else k, key, backend, device)
    for r in results:
        if r.zero:
            _err(f"gpl: warning: {r.query} has an all-zero vector: its similarity to every image is 0, "
                 "so its neighbours are in file order")
    if html_path:
        from gpl_cli.html_report import neighbors_page

        _write_html(html_path, file, key, neighbors_page, results)
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


def _outliers(file, k, top, key, backend, as_json, html_path):
    from gpl_cli import outliers as ol

    k = ol.DEFAULT_K if k is None else k
    found = ol.find_outliers(file, k, ol.DEFAULT_TOP if top is None else top, key, backend)
    if as_json:
        doc = [{"rank": o.rank, "score": o.score, "path": o.path,
                "neighbors": [{"rank": n.rank, "score": n.score, "path": n.path} for n in o.neighbors]}
               for o in found]
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo("\n".join(f"{o.rank}\t{o.score:.4f}\t{o.path}" for o in found))
    if html_path:
        from gpl_cli.html_report import outliers_page

        _write_html(html_path, file, key, outliers_page, found, k=k)


def _write_html(html_path, file, key, page, results, **options):
    """page(results, thumbnails, source, pooling, **options) written to html_path."""
    from gpl_cli.formats import read_metadata
    from gpl_cli.html_report import Thumbnails, write_page
    from gpl_cli.neighbors import choose_pooling

    metadata = read_metadata(file)
    thumbs = Thumbnails(metadata.get("root"))
    write_page(html_path, page(results, thumbs, file, choose_pooling(metadata, key, file), **options))
    _err(f"gpl: wrote {html_path}")


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


# Options of `compare` that only mean something when images are embedded.
_COMPARE_IMAGE_OPTIONS = ("backbone", "weights", "normalize", "batch_size", "workers", "device", "nul", "save")


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
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Also write a report page with the images (thumbnails embedded, works offline).")
@click.option("--html-queries", type=click.IntRange(min=1), default=3, show_default=True,
              help="--html: per class, how many queries where the poolings disagree most to show.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --save or --html file.")
@click.option("-b", "--backbone", default=DEFAULT_BACKBONE, show_default=True, help="Backbone, as for gpl embed.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state dict instead of the published weights.")
@click.option("--normalize", type=click.Choice(NORMALIZATIONS), default="none", show_default=True,
              help="Normalisation of the vectors (cosine metrics do not change; norm statistics do).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass (default: as gpl embed).")
@click.option("--workers", type=click.IntRange(min=0), help=WORKERS_HELP)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("-0", "--null", "nul", is_flag=True, help="With '-': paths on stdin are NUL-separated.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--probe", is_flag=True,
              help="Also a linear probe per pooling (logistic regression, k-fold test and train accuracy, head "
                   "parameters), and on the flattened map when it fits; needs labels and scikit-learn.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Outer cross-validation folds of --probe and of --pool gem:p=auto.")
@click.pass_context
def compare(ctx, inputs, pools, labels_csv, as_json, as_csv, plot, save, html_path, html_queries, overwrite, backbone,
            weights, normalize, batch_size, workers, device, nul, quiet, probe, folds):
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
    from gpl_cli import compare as cmp
    from gpl_cli.formats import is_embeddings_file
    from gpl_cli.gem_auto import split_auto

    if as_json and as_csv:
        raise GplError("--json and --csv are alternatives; give one")
    _show_library_logs(notes=not quiet)
    if html_path:
        from gpl_cli.html_report import check_output

        check_output(html_path, overwrite)
    pools, auto = split_auto(list(pools))
    if probe or auto:
        from gpl_cli.probe import MapSource, check_labels, model_module, probe_report

        model_module()  # scikit-learn missing: say how to install it before anything runs
    loaded = keys = maps_from = None
    if all(is_embeddings_file(arg) for arg in inputs):
        given = [name for name in _COMPARE_IMAGE_OPTIONS
                 if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
        if given:
            raise GplError(f"--{given[0].replace('_', '-')} applies to images; {inputs[0]} already holds embeddings")
        if auto:
            raise GplError("gem:p=auto pools a grid of p from the images' feature maps: give the images (class "
                           f"folders or --labels), not the embeddings file {inputs[0]}")
        emb = cmp.load_embedding_files(list(inputs), list(pools))
        pool_seconds, source = None, f"{emb.metadata.get('backbone', '?')} from {' + '.join(inputs)}"
    elif any(is_embeddings_file(arg) for arg in inputs):
        raise GplError("give either images (folders, files, -) or embedding files (.h5/.npy), not both")
    else:
        from gpl_cli.config import EmbedConfig
        from gpl_cli.engine import RunOptions
        from gpl_cli.gem_auto import grid_keys
        from gpl_cli.inputs import collect_inputs
        from gpl_cli.pipeline import OutputTarget

        asked = pools or ([] if auto else list(COMPARE_POOLS))
        config = EmbedConfig(backbone=backbone, weights=weights, pools=tuple(asked), normalize=normalize)
        keys = [s.key for s in config.pool_specs()] if asked else []  # a bad --pool fails before any loading
        if auto:
            config.pools = (*keys, *(k for k in grid_keys() if k not in keys))
        items = collect_inputs(inputs, nul_separated=nul)
        if not items.items:
            raise GplError("no images found in the inputs (extensions: jpg jpeg png webp bmp gif tif tiff)")
        early = cmp.image_labels([it.name for it in items.items], labels_csv, items.root)  # fail before loading a model
        if probe or auto:
            check_labels(early, probe, auto, folds)
        target = OutputTarget(save, None, overwrite) if save else None
        options = RunOptions(batch_size, workers, device)
        if probe:
            from gpl_cli.backbones import load_backbone

            loaded = load_backbone(backbone, weights)  # shared by both forward passes
            maps_from = MapSource(loaded, config.preprocess_for(loaded), items.items, options)
        bars = _Bars()
        try:
            emb, summary = cmp.embed_images(config, items, options, target, quiet, backbone=loaded,
                                            on_progress=None if quiet else bars, on_failure=_skipped)
        finally:
            bars.close()
        pool_seconds, source = summary.pool_seconds, f"{backbone} on {' '.join(inputs)}"
    if emb.failures:
        _err(f"gpl: {len(emb.failures)} images could not be read and are left out of the comparison")
    labels = cmp.image_labels(emb.paths, labels_csv, emb.metadata.get("root"))
    if probe or auto:
        check_labels(labels, probe, auto, folds)
    gem = None
    if auto:
        from gpl_cli import gem_auto

        gem = gem_auto.choose_p({p: emb.vectors[k] for p, k in zip(gem_auto.GRID, gem_auto.grid_keys())}, labels, folds)
        chosen = gem_auto.grid_keys()[gem_auto.GRID.index(gem.best_p)]
        keys = [*keys, *([chosen] if chosen not in keys else [])]
    bars = _Bars()
    try:
        report = cmp.compare(emb, labels, keys=keys, pool_seconds=pool_seconds, source=source,
                             on_progress=None if quiet else bars)
    finally:
        bars.close()
    report.gem_auto = gem
    if probe:
        if maps_from and not quiet:
            _err("gpl: a second forward pass keeps the flattened feature maps for the probe")
        report.probe = probe_report(emb, labels, [p.key for p in report.poolings], folds, maps_from,
                                    on_progress=None if quiet else lambda key: _err(f"gpl: probing {key}"))
    if plot:
        from gpl_cli.plots import plot_report

        plot_report(report, plot)
    if html_path:
        from gpl_cli import html_report

        thumbs = html_report.Thumbnails(emb.metadata.get("root"))
        html_report.write_page(html_path, html_report.compare_page(report, emb, labels, thumbs, html_queries))
        _err(f"gpl: wrote {html_path}")
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    elif as_csv:
        click.echo(report.csv_text(), nl=False)
    else:
        click.echo(report.table(), nl=False)
FIGURE_EXTENSIONS = (".png", ".pdf", ".svg")


@cli.command()
@click.argument("images", nargs=-1, required=True, metavar="IMAGE [IMAGE2 | IMAGE...]")
@click.option("-o", "--output", required=True, help="Figure to write: .png, .pdf or .svg.")
@click.option("-b", "--backbone", default="efficientnet_lite0", show_default=True, help="Backbone, as for gpl embed.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state dict instead of the published weights.")
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
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing figure or --json file.")
def explain(images, output, backbone, weights, pools, classes, each, json_path, resize, max_size, dpi, device, overwrite):
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
    from gpl_cli.atomic import check_output_folder, refuse_existing
    from gpl_cli.config import EmbedConfig
    from gpl_cli.engine import build_embedder
    from gpl_cli.explain import explain_files, explain_pair, explanation_json
    from gpl_cli.explain_plot import draw_images, draw_pair, figure_pixels, save_figure
    from gpl_cli.heads import classifier_head

    if os.path.splitext(output)[1].lower() not in FIGURE_EXTENSIONS:
        raise GplError(f"cannot write figure {output}: use a {', '.join(FIGURE_EXTENSIONS)} file")
    written = [output] + ([json_path] if json_path and json_path != "-" else [])
    for path in written:
        check_output_folder(path)
    refuse_existing(written, overwrite)
    config = EmbedConfig(backbone=backbone, weights=weights, pools=tuple(pools), resize=resize, max_size=max_size)
    config.check()  # a bad --pool fails before the model loads
    mode = "pair" if len(images) == 2 and not each else "one" if len(images) == 1 else "each"
    embedder = build_embedder(config, device)
    head = None
    if classes:
        try:
            head = classifier_head(embedder.backbone)
        except GplError as exc:
            _err(f"gpl: note: no CAM panels: {exc}")
    done, failures = explain_files(embedder, list(images), head, classes)
    if failures and mode != "each":  # one line: the image, or the pair, cannot be explained
        reasons = "; ".join(f"{f.path}: {f.reason}" for f in failures)
        raise GplError(f"cannot explain {reasons}" if mode == "one" else f"nothing to compare: {reasons}")
    for f in failures:
        _err(f"gpl: cannot read {f.path}: {f.reason}")
    if not done:
        raise GplError("no image could be read")
    pair = explain_pair(*done) if mode == "pair" else None
    fig = draw_pair(*done, pair, backbone) if pair else draw_images(done, backbone)
    save_figure(fig, output, dpi)
    rows, columns = fig.axes[0].get_gridspec().get_geometry()
    width, height = figure_pixels(rows, columns, dpi)
    if json_path:
        meta = {"backbone": backbone, "weights_sha256": embedder.backbone.weights_sha256, "mode": mode,
                "poolings": [s.key for s in embedder.specs], "figure": output,
                "panels": {"rows": rows, "columns": columns}, "figure_pixels": [width, height]}
        text = json.dumps(explanation_json(done, pair, failures, meta), indent=1)
        if json_path == "-":
            click.echo(text)
        else:
            try:
                with open(json_path, "w", encoding="utf-8") as fh:
                    fh.write(text + "\n")
            except OSError as exc:
                raise GplError(f"cannot write {json_path}: {exc.strerror or exc}") from None
    if pair and json_path != "-":
        for t in pair:
            click.echo(f"{t.key}\t{t.cosine:.6f}")
    _err(f"gpl: explained {len(done)} image(s), failed {len(failures)} -> {output} ({width} x {height} px)")
    if failures:
        sys.exit(EXIT_SOME_FAILED)


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
    from gpl_cli.poolspec import operator_table

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
    from gpl_cli.atomic import check_output_folder, refuse_existing
    from gpl_cli.whiten import learn_from_file

    check_output_folder(output)
    refuse_existing([output], overwrite)  # before the minutes a large file can take to learn from
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


@cli.command()
@click.option("-b", "--backbone", default=DEFAULT_BACKBONE, show_default=True, help="Backbone, as for gpl embed.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state dict instead of the published weights.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), help="As for gpl embed: the model's threads depend on it.")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
def tune(backbone, weights, device, precision, workers, as_json):
    """Measure the fastest batch size and memory layout for a backbone on this machine.

    Times the backbone at growing batch sizes in NCHW and channels-last layout and caches
    the result for this machine (backbone, device, precision, torch version, threads);
    gpl embed then uses the fastest unless --batch-size is given. gpl embed measures once
    by itself on runs long enough to repay it (1,000 images on a GPU, 20,000 on a CPU); run
    this to measure now, or again (say, after a measurement disturbed by other load).

    \b
    Examples:
      gpl tune
      gpl tune -b resnet50 --precision bf16
    """
    from gpl_cli.backbones import load_backbone
    from gpl_cli.settings import resolve_settings
    from gpl_cli.tuning import cache_file, tune as run_tune

    settings = resolve_settings(device, precision, workers)
    loaded = load_backbone(backbone, weights)
    if not as_json:
        _err(f"gpl: timing {backbone} ({precision}, {settings.threads} thread(s)) at growing batch sizes...")
    table, plan = run_tune(loaded, settings,
                           on_row=None if as_json else lambda r: _err(f"  {r['layout']:<14} batch {r['batch']:>3}  {r['rate']:8.1f} images/s"))
    if as_json:
        click.echo(json.dumps({"backbone": backbone, "precision": precision, "table": table,
                               "batch_size": plan.batch_size, "channels_last": plan.channels_last}, indent=2))
    else:
        click.echo(f"fastest: {plan.describe()}; saved in {cache_file()}")


def main() -> None:
    """Console entry point: user errors become one line on stderr and an exit status.

    The statuses are listed in gpl_cli.errors and the README ("Exit codes").
    """
    tune_process()  # before any command imports torch
    try:
        cli.main(prog_name="gpl", standalone_mode=False)  # also under python -m gpl_cli: usage and _GPL_COMPLETE
    except GplError as exc:
        interrupted = exc.exit_code in (EXIT_INTERRUPTED, EXIT_TERMINATED)
        _err(f"gpl: {exc}" if interrupted else f"gpl: error: {exc}")
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
