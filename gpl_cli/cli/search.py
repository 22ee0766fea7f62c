"""`gpl neighbors`: nearest images, near-duplicate groups, outliers, clusters and likely mislabels in an embeddings
file."""

from __future__ import annotations

import click

from gpl_cli.cli.options import use
from gpl_cli.errors import GplError

KEEP_RULES = ("largest", "smallest", "oldest", "newest", "first")  # gpl_cli.analysis.duplicates.keep.RULES


@click.command()
@click.argument("file", required=False)
@click.argument("queries", nargs=-1)
@click.option("-k", "k", type=click.IntRange(min=1), default=None,
              help="Neighbours per query; with --outliers, score by the k-th nearest; with --mislabels, the "
                   "neighbours whose labels count.  [default: 10; 5 with --outliers and --mislabels]")
@click.option("-p", "--pool", "key", help="Pooling to compare by (default: the file's first).")
@click.option("--duplicates", is_flag=True, help="Instead of queries: groups of near-duplicate images across FILE.")
@click.option("--outliers", is_flag=True, help="Instead of queries: the images least like any other in FILE.")
@click.option("--clusters", is_flag=True,
              help="Instead of queries: clusters of similar images across FILE, largest first (connected components "
                   "at --cluster-threshold, looser than duplicates).")
@click.option("--cluster-threshold", "cluster_threshold", type=click.FloatRange(-1.0, 1.0), default=None,
              help="With --clusters: cosine similarity from which two images join one cluster.  [default: 0.1 below "
                   "the duplicate threshold: the calibration saved beside FILE, else 0.95]")
@click.option("--mislabels", is_flag=True,
              help="Instead of queries: the labelled images whose -k nearest others mostly carry another label "
                   "(likely label errors), the label most common among them proposed.")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False),
              help="With --mislabels: CSV of path,label rows.  [default: each image's class folder]")
@click.option("--top", type=click.IntRange(min=1), default=None, help="With --outliers: how many to list.  [default: 20]")
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=None,
              help="With --duplicates: cosine similarity from which two images are duplicates.  [default: the "
                   "calibration saved beside FILE, else 0.95]")
@click.option("--calibrate", is_flag=True,
              help="With --duplicates: fit the threshold to FILE's own images first: edited copies of a sample of "
                   "them (JPEG, crop, resize, mirror, greyscale, brightness/contrast, rotation, caption), embedded as "
                   "FILE was, against the nearest distinct images; tens of seconds on a CPU. Saved beside FILE "
                   "(FILE.duplicates.json) and reused by later runs. Exit 2 when fewer than 20 images can be read.")
@click.option("--target-precision", "target_precision", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              default=None, metavar="P", help="With --calibrate: the precision the threshold must reach.  [default: 0.99]")
@click.option("--keep", type=click.Choice(KEEP_RULES),
              help="With --duplicates: the one image of each group to keep. largest: most pixels, then most bytes; "
                   "smallest: fewest pixels, then fewest bytes; oldest/newest: file time when embedded; first: "
                   "earliest row of FILE. Ties go to the first path in sort order.")
@click.option("--list", "list_what", type=click.Choice(["keep", "remove"]),
              help="With --keep: print only the images to keep, or to remove, one per line (see --format).")
@click.option("--format", "list_format", type=click.Choice(["text", "csv", "jsonl"]),
              help="With --list: text (one path per line, for xargs -d '\\n'), csv or jsonl (group, action, score, "
                   "kind, path).  [default: text]")
@click.option("--move-to", "move_to", type=click.Path(file_okay=False), metavar="DIR",
              help="With --keep: move each image not kept into DIR, under its path below the embedded folder. "
                   "Journaled: a rerun finishes an interrupted move; a file in DIR is never replaced; an image "
                   "changed since it was embedded is not moved (exit 3).")
@click.option("--undo", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Put back every image a --move-to moved into DIR, byte for byte (FILE may be left out).")
@click.option("--against", metavar="FILE2",
              help="With --duplicates: only the pairs between FILE and FILE2 (leaks between training and test "
                   "sets). FILE2 must be embedded like FILE.")
@click.option("--index", type=click.Choice(["auto", "exact", "ivf"]), default=None,
              help="With --duplicates: exact compares every pair; ivf searches an approximate FAISS index; auto: "
                   "exact while it stays practical (about a minute), else ivf.  [default: auto]")
@click.option("--backend", type=click.Choice(["auto", "numpy", "faiss"]), default="auto", show_default=True,
              help="k-NN search: auto uses FAISS (if installed) from 1e8 rows x queries, else numpy; both exact.")
@click.option("--rerank", multiple=True, metavar="SPEC",
              help="Re-rank the queries' neighbours: dba:k=2,alpha=0 (augment every vector of FILE with its "
                   "neighbours), aqe:k=2,alpha=3 (alpha query expansion), krr:k1=20,k2=6,lambda=0.3,n=100 "
                   "(k-reciprocal re-ranking of the first n). Parameters may be left out. Repeat or comma-join "
                   "to chain, in order: dba first, krr last.")
@use("device", device="Where query images not in FILE, and --calibrate's edited copies, are embedded.")
@use("json", json="Print the results as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Also write a page with the images (thumbnails embedded, works offline).")
@use("images", images="The folder the stored names are below, instead of the root FILE records: where --html "
                        "reads the images and --duplicates finds the files (exact copies, --keep, --move-to).")
@use("overwrite", overwrite="Replace an existing --html file.")
def neighbors(file, queries, k, key, duplicates, outliers, top, threshold, calibrate, target_precision, keep, list_what,
              list_format, move_to, undo,
              against, index, backend, rerank, device, as_json, html_path, images_dir, overwrite, clusters,
              cluster_threshold, mislabels, labels_csv):
    """Nearest images in FILE by cosine similarity, near-duplicate groups, outliers, clusters or likely mislabels.

    A QUERY is a path stored in FILE, or any image file: it is then embedded with the
    backbone, weights, preprocessing and pooling recorded in FILE. A query that is in FILE
    finds itself first (score 1.0), except with --rerank. Output: one line per neighbour,
    rank TAB score TAB path; with several queries each block starts with a line ==> QUERY <==.

    --duplicates prints group TAB score TAB path TAB kind, one line per image in a group; score is
    the image's highest similarity to another member; kind is exact when another member has
    identical bytes (found first, by content), else near. Groups are connected components: A~B
    and B~C make one group. With --keep a column keep or remove follows; with --against, the
    embeddings file the image is in. The threshold is --threshold, else the calibration saved
    beside FILE, else 0.95; stderr says which. Exit 3 when --move-to could not move every file.

    --calibrate fits the threshold to FILE's own images before the search: the lowest one whose
    precision on edited copies against distinct images reaches --target-precision. It is
    explicit because it embeds several hundred copies (tens of seconds on a CPU); stderr shows
    the recall per kind of edit and the precision/recall curve, --json carries them too.

    --outliers prints rank TAB score TAB path for the --top images with the lowest score, the
    cosine similarity to their k-th nearest other image.

    --clusters prints cluster TAB score TAB path, largest cluster first: the connected
    components at --cluster-threshold, by default 0.1 below the duplicate threshold in effect,
    so that edited copies and near-identical shots gather while distinct photos stay apart.

    --mislabels prints rank TAB score TAB path TAB label TAB proposed for each labelled image
    whose k nearest others mostly carry another label; score is the share of them that do,
    proposed the label most common among them. Labels come from --labels, else class folders.

    --rerank re-ranks each query's neighbours (docs/retrieval.md has the maths): dba
    replaces every vector of FILE by the normalised sum of itself and its k nearest others
    (weights similarity^alpha); aqe replaces the query by the normalised sum of itself and its
    k nearest (weights similarity^alpha) and searches again; krr re-scores the first n
    candidates by the overlap of their k-reciprocal neighbourhoods with the query's. Scores are
    then the cosine of the expanded query to the augmented vectors, or with krr (1 - lambda)
    Jaccard + lambda cosine. A QUERY that is in FILE is searched leave-one-out: its own row
    neither expands it nor is listed.

    --html FILE also writes a page showing the images, one row per query, group or outlier. It shows
    images below the folder FILE records as its root, or below --images DIR.

    Names in text output are escaped so that each stays one field of one line: backslash, tab,
    newline and CR as \\\\ \\t \\n \\r, other control characters as \\xNN (--json carries them as JSON strings).

    \b
    Examples:
      gpl neighbors emb.h5 photos/cat.jpg
      gpl neighbors emb.h5 ~/Downloads/new_photo.jpg -k 5 --json
      gpl neighbors emb.h5 photos/cat.jpg --rerank dba --rerank aqe:k=3
      gpl neighbors emb.h5 --duplicates --threshold 0.95
      gpl neighbors emb.h5 --duplicates --calibrate
      gpl neighbors emb.h5 --duplicates | cut -f3
      gpl neighbors emb.h5 --duplicates --keep largest --list remove
      gpl neighbors emb.h5 --duplicates --keep largest --move-to removed/
      gpl neighbors --undo removed/
      gpl neighbors train.h5 --against val.h5 --duplicates
      gpl neighbors emb.h5 --outliers -k 5 --top 20 --html outliers.html
      gpl neighbors emb.h5 --clusters --cluster-threshold 0.8 --html clusters.html
      gpl neighbors emb.h5 --mislabels -k 5 --labels labels.csv
    """
    from gpl_cli.cli import neighbors_modes as run

    modes = {"--duplicates": duplicates, "--outliers": outliers, "--clusters": clusters, "--mislabels": mislabels}
    given = {**{m: True for m, on in modes.items() if on}, "QUERY": queries or None, "-k": k, "--top": top,
             "--threshold": threshold, "--calibrate": calibrate or None, "--target-precision": target_precision,
             "--keep": keep, "--list": list_what, "--format": list_format, "--move-to": move_to, "--against": against,
             "--index": index, "--cluster-threshold": cluster_threshold, "--labels": labels_csv,
             "--rerank": rerank or None, "--html": html_path, "--images": images_dir}
    given = {option: value for option, value in given.items() if value is not None}
    if undo is not None:
        if given:
            raise GplError(f"--undo {undo} puts back what a --move-to moved there; give it without {next(iter(given))}")
        run.undo(undo)
        return
    if file is None:
        raise click.UsageError("Missing argument 'FILE'.")
    mode = check_options(given, [m for m, on in modes.items() if on], as_json)
    page = run.page_output(html_path, overwrite, file)
    if mode == "--duplicates":
        run.duplicates(file, key, threshold, calibrate, target_precision, keep, list_what, list_format, move_to,
                       against, index, device, as_json, page, images_dir)
    elif mode == "--outliers":
        run.outliers(file, k, top, key, backend, as_json, page, images_dir)
    elif mode == "--clusters":
        run.clusters(file, cluster_threshold, key, as_json, page, images_dir)
    elif mode == "--mislabels":
        run.mislabels(file, k, key, labels_csv, backend, as_json, page, images_dir)
    else:
        run.queries(file, queries, k, key, backend, rerank, device, as_json, page, images_dir)


QUERIES = "queries"
# Which modes each option applies to (the rest of the command line is checked against this table).
APPLIES = {
    "QUERY": (QUERIES,), "-k": (QUERIES, "--outliers", "--mislabels"), "--top": ("--outliers",),
    "--rerank": (QUERIES,), "--cluster-threshold": ("--clusters",), "--labels": ("--mislabels",),
    **dict.fromkeys(("--threshold", "--calibrate", "--target-precision", "--keep", "--list", "--format", "--move-to",
                     "--against", "--index"), ("--duplicates",)),
}
# Options that only make sense beside another one: (the other, the refusal).
NEEDS = {
    "--list": ("--keep", "--list keep|remove needs a --keep rule to say which image of each group is kept"),
    "--format": ("--list", "--format applies to --list only"),
    "--target-precision": ("--calibrate", "--target-precision applies to --calibrate only"),
    "--move-to": ("--keep", "--move-to moves what --keep does not keep: give a --keep rule"),
    "--images": ("--html", "--images applies to --html and --duplicates only"),
}


def check_options(given: dict, modes: list[str], as_json: bool) -> str:
    """The one mode of this command line (QUERIES or a mode flag), after refusing what does not go with it."""
    if len(modes) > 1:
        raise GplError("--duplicates, --outliers, --clusters and --mislabels are alternatives; give one")
    mode = modes[0] if modes else QUERIES
    if mode != QUERIES and "QUERY" in given:
        raise GplError(f"{mode} searches the whole file: give no QUERY with it")
    for option in given:
        allowed = APPLIES.get(option)
        if allowed is None or mode in allowed:
            continue
        if allowed == (QUERIES,):
            raise GplError(f"{option} applies to queries only, not to {mode}")
        if len(allowed) == 1:
            raise GplError(f"{option} applies to {allowed[0]} only")
        raise GplError(f"{option} applies to {', '.join(allowed[:-1])} and {allowed[-1]}, not to {mode}")
    for option, (other, refusal) in NEEDS.items():
        if option in given and other not in given and not (option == "--images" and mode == "--duplicates"):
            raise GplError(refusal)
    if "--calibrate" in given and "--threshold" in given:
        raise GplError("--calibrate fits the threshold that --threshold gives: give one of them")
    if "--list" in given and as_json:
        raise GplError("--list prints its own format (--format text, csv or jsonl): drop --json")
    return mode
