"""`gpl neighbors`: nearest images, near-duplicate groups and outliers in an embeddings file."""

from __future__ import annotations

import json

import click

from gpl_cli.cli import console
from gpl_cli.cli.options import use
from gpl_cli.errors import GplError


@click.command()
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
@click.option("--rerank", multiple=True, metavar="SPEC",
              help="Re-rank the queries' neighbours: dba:k=2,alpha=0 (augment every vector of FILE with its "
                   "neighbours), aqe:k=2,alpha=3 (alpha query expansion), krr:k1=20,k2=6,lambda=0.3,n=100 "
                   "(k-reciprocal re-ranking of the first n). Parameters may be left out. Repeat or comma-join "
                   "to chain, in order: dba first, krr last.")
@use("device", device="Where query images not in FILE are embedded.")
@use("json", json="Print the results as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Also write a page with the images (thumbnails embedded, works offline).")
@use("images")
@use("overwrite", overwrite="Replace an existing --html file.")
def neighbors(file, queries, k, key, duplicates, outliers, top, threshold, backend, rerank, device, as_json,
              html_path, images_dir, overwrite):
    """Nearest images in FILE by cosine similarity, near-duplicate groups, or outliers.

    A QUERY is a path stored in FILE, or any image file: it is then embedded with the
    backbone, weights, preprocessing and pooling recorded in FILE. A query that is in FILE
    finds itself first (score 1.0), except with --rerank. Output: one line per neighbour,
    rank TAB score TAB path; with several queries each block starts with a line ==> QUERY <==.

    --duplicates prints group TAB score TAB path, one line per image in a group; score is the
    image's highest similarity to another member. Groups are connected components: A~B and
    B~C make one group.

    --outliers prints rank TAB score TAB path for the --top images with the lowest score, the
    cosine similarity to their k-th nearest other image.

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
      gpl neighbors emb.h5 --duplicates | cut -f3
      gpl neighbors emb.h5 --outliers -k 5 --top 20 --html outliers.html
    """
    from gpl_cli.analysis import neighbors as nb, rerank as rr
    from gpl_cli.store.output import PAGE, Output

    steps = rr.parse_rerank_list(rerank) if rerank else None
    page = Output.resolve(html_path, kind=PAGE, overwrite=overwrite).check([file]) if html_path else None
    if duplicates and outliers:
        raise GplError("--duplicates and --outliers are alternatives; give one")
    if top is not None and not outliers:
        raise GplError("--top applies to --outliers only")
    if (duplicates or outliers) and queries:
        raise GplError(f"--{'duplicates' if duplicates else 'outliers'} searches the whole file: give no QUERY with it")
    if threshold is not None and not duplicates:
        raise GplError("--threshold applies to --duplicates only")
    if images_dir is not None and not html_path:
        raise GplError("--images applies to --html only")
    if steps and (duplicates or outliers):
        raise GplError(f"--rerank applies to queries only, not to --{'duplicates' if duplicates else 'outliers'}")
    if outliers:
        from gpl_cli.analysis import outliers as ol

        k = ol.DEFAULT_K if k is None else k
        found = ol.find_outliers(file, k, ol.DEFAULT_TOP if top is None else top, key, backend)
        _print_rows(found, as_json, lambda o: {"rank": o.rank, "score": o.score, "path": o.path,
                                               "neighbors": [_neighbor(n) for n in o.neighbors]})
        _page(page, file, key, "outliers", found, images=images_dir, k=k)
    elif duplicates:
        threshold = 0.95 if threshold is None else threshold
        groups = nb.near_duplicates(file, threshold, key)
        _print_duplicates(groups, as_json)
        _page(page, file, key, "duplicates", groups, images=images_dir, threshold=threshold)
    else:
        results = nb.nearest(file, list(queries), 10 if k is None else k, key, backend, device,
                             search=rr.searcher(steps, backend) if steps else None)
        for r in results:
            if r.zero:
                console.err(f"gpl: warning: {r.query} has an all-zero vector: its similarity to every image is 0, "
                            "so its neighbours are in file order")
        _page(page, file, key, "neighbors", results, images=images_dir, rerank=", ".join(map(str, steps or ())))
        _print_neighbors(results, as_json)


def _neighbor(n) -> dict:
    return {"rank": n.rank, "score": n.score, "path": n.path}


def _print_rows(found, as_json: bool, as_dict) -> None:
    from gpl_cli.store.sink import line_name

    if as_json:
        click.echo(json.dumps([as_dict(o) for o in found], indent=2))
    else:
        click.echo("\n".join(f"{o.rank}\t{o.score:.4f}\t{line_name(o.path)}" for o in found))


def _print_duplicates(groups, as_json: bool) -> None:
    from gpl_cli.store.sink import line_name

    if as_json:
        doc = [{"group": g, "size": len(members), "members": [{"path": m.path, "score": m.score} for m in members]}
               for g, members in enumerate(groups, 1)]
        click.echo(json.dumps(doc, indent=2))
    else:
        lines = [f"{g}\t{m.score:.4f}\t{line_name(m.path)}" for g, members in enumerate(groups, 1) for m in members]
        if lines:
            click.echo("\n".join(lines))
    if not groups:
        console.err("gpl: no near-duplicates at that threshold")


def _print_neighbors(results, as_json: bool) -> None:
    from gpl_cli.store.sink import line_name

    if as_json:
        doc = [{"query": r.query, "source": r.source, "neighbors": [_neighbor(n) for n in r.neighbors]}
               for r in results]
        click.echo(json.dumps(doc, indent=2))
        return
    blocks = []
    for r in results:
        lines = [f"==> {line_name(r.query)} <=="] if len(results) > 1 else []
        lines += [f"{n.rank}\t{n.score:.4f}\t{line_name(n.path)}" for n in r.neighbors]
        blocks.append("\n".join(lines))
    click.echo("\n\n".join(blocks))


def _page(page, file: str, key: str | None, kind: str, results, **options) -> None:
    if page is not None:
        from gpl_cli.report.html import write_results_page

        write_results_page(page, file, key, kind, results, **options)
        console.err(f"gpl: wrote {page.path}")
