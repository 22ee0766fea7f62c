"""What `gpl neighbors` does in each of its modes (queries, --duplicates, --outliers, --clusters, --mislabels,
--undo): call the one library function, print the result (stdout: data; stderr: what the user should know)."""

from __future__ import annotations

import json
import os
import sys

import click

from gpl_cli.cli import console
from gpl_cli.errors import EXIT_SOME_FAILED
from gpl_cli.store.sink import line_name


def page_output(html_path: str | None, overwrite: bool, file: str):
    """The --html page's Output, checked before any work (it may not replace FILE)."""
    if html_path is None:
        return None
    from gpl_cli.store.output import PAGE, Output

    return Output.resolve(html_path, kind=PAGE, overwrite=overwrite).check([file])


def queries(file, queries, k, key, backend, rerank, device, as_json, page, images_dir) -> None:
    from gpl_cli.analysis import neighbors as nb, rerank as rr

    steps = rr.parse_rerank_list(rerank) if rerank else None
    results = nb.nearest(file, list(queries), 10 if k is None else k, key, backend, device,
                         search=rr.searcher(steps, backend) if steps else None)
    for r in results:
        if r.zero:
            console.err(f"gpl: warning: {r.query} has an all-zero vector: its similarity to every image is 0, "
                        "so its neighbours are in file order")
    _page(page, file, key, "neighbors", results, images=images_dir, rerank=", ".join(map(str, steps or ())))
    _print_neighbors(results, as_json)


def outliers(file, k, top, key, backend, as_json, page, images_dir) -> None:
    from gpl_cli.analysis import outliers as ol

    k = ol.DEFAULT_K if k is None else k
    found = ol.find_outliers(file, k, ol.DEFAULT_TOP if top is None else top, key, backend)
    _print_rows(found, as_json, lambda o: {"rank": o.rank, "score": o.score, "path": o.path,
                                           "neighbors": [_neighbor(n) for n in o.neighbors]})
    _page(page, file, key, "outliers", found, images=images_dir, k=k)


def duplicates(file, key, threshold, calibrate, target_precision, keep, list_what, list_format, move_to, against,
               index, device, as_json, page, images_dir) -> None:
    from gpl_cli.analysis.duplicates.groups import find_duplicates
    from gpl_cli.analysis.duplicates.model import Threshold

    calibration = _calibrate(file, key, target_precision, device, images_dir) if calibrate else None
    found = find_duplicates(file, None if threshold is None else Threshold(threshold, "--threshold"), key,
                            calibration=calibration, against=against, keep=keep, index=index or "auto",
                            images=images_dir, move_to=move_to)
    _say_how(found)
    if list_what is not None:
        _print_list(found, list_what, list_format or "text")
    else:
        _print_duplicates(found, as_json)
    _page(page, file, key, "duplicates", found, images=images_dir)
    if found.moves is not None:
        _say_moves(found.moves, move_to)


def clusters(file, cluster_threshold, key, as_json, page, images_dir) -> None:
    from gpl_cli.analysis.duplicates.clusters import find_clusters

    found = find_clusters(file, cluster_threshold, key)
    console.err(f"gpl: cluster threshold {found.threshold.value:.3f}: {found.threshold.source}")
    if as_json:
        click.echo(json.dumps({"file": found.file, "pooling": found.key, "threshold": {
            "value": found.threshold.value, "source": found.threshold.source}, "clusters": [
            {"cluster": c, "size": len(g.members), "members": [{"path": m.path, "score": m.score} for m in g.members]}
            for c, g in enumerate(found.groups, 1)]}, indent=2))
    elif found.groups:
        click.echo("\n".join(f"{c}\t{m.score:.4f}\t{line_name(m.path)}"
                             for c, g in enumerate(found.groups, 1) for m in g.members))
    if not found.groups:
        console.err("gpl: no clusters at that threshold")
    _page(page, file, key, "clusters", found, images=images_dir)


def mislabels(file, k, key, labels_csv, backend, as_json, page, images_dir) -> None:
    from gpl_cli.analysis.duplicates.mislabels import DEFAULT_K, find_mislabels

    found = find_mislabels(file, DEFAULT_K if k is None else k, key, labels_csv, backend,
                           on_note=lambda text: console.err(f"gpl: {text}"))
    if as_json:
        click.echo(json.dumps([{"rank": m.rank, "score": m.score, "path": m.path, "label": m.label,
                                "proposed": m.proposed, "neighbors": [
                                    {**_neighbor(n), "label": found.labels[n.row]} for n in m.neighbors]}
                               for m in found.items], indent=2))
    elif found.items:
        click.echo("\n".join(f"{m.rank}\t{m.score:.4f}\t{line_name(m.path)}\t{line_name(m.label)}\t"
                             f"{line_name(m.proposed)}" for m in found.items))
    if not found.items:
        console.err(f"gpl: no image has mostly other labels among its {found.k} nearest")
    _page(page, file, key, "mislabels", found, images=images_dir)


def _neighbor(n) -> dict:
    return {"rank": n.rank, "score": n.score, "path": n.path}


def _print_rows(found, as_json: bool, as_dict) -> None:
    if as_json:
        click.echo(json.dumps([as_dict(o) for o in found], indent=2))
    else:
        click.echo("\n".join(f"{o.rank}\t{o.score:.4f}\t{line_name(o.path)}" for o in found))


def _calibrate(file: str, key: str | None, target_precision: float | None, device: str, images: str | None):
    """The calibration of FILE, made now; its report on stderr."""
    from gpl_cli.analysis.duplicates import calibrate as cal

    def announce(images: int, copies: int) -> None:
        console.err(f"gpl: calibrating on {copies} edited copies of {images} images of {file}, embedded as it was")

    calibration = cal.calibrate(file, key, cal.TARGET if target_precision is None else target_precision,
                                device=device, images=images, on_start=announce)
    first, *rest = calibration.text()
    console.err(f"gpl: {first}")
    for line in rest:
        console.err(f"  {line}")
    console.err(f"gpl: saved {calibration.path}")
    return calibration


def _say_how(found) -> None:
    """On stderr: the threshold when it was not given (where it came from), and what the search could not do."""
    t = found.threshold
    if t.source != "--threshold":
        advice = "; --calibrate fits one to these images" if found.calibration is None else ""
        console.err(f"gpl: threshold {t.value:g}: {t.source}{advice}")
    for note in found.notes:
        console.err(f"gpl: {note}")


def _kind(m) -> str:
    return "exact" if m.exact else "near"


def _print_duplicates(found, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(_duplicates_doc(found), indent=2))
    else:
        lines = []
        for g, group in enumerate(found.groups, 1):
            for m in group.members:
                fields = [str(g), f"{m.score:.4f}", line_name(m.path), _kind(m)]
                if found.keep_rule:
                    fields.append("keep" if m.keep else "remove")
                if found.against:
                    fields.append(line_name(found.against if m.other else found.file))
                lines.append("\t".join(fields))
        if lines:
            click.echo("\n".join(lines))
    if not found.groups:
        console.err("gpl: no duplicates at that threshold" + (f" between {found.file} and {found.against}"
                                                              if found.against else ""))
    if found.near_misses:
        a, b, score = found.near_misses[0]
        n = len(found.near_misses)
        console.err(f"gpl: {n} {'pair' if n == 1 else 'pairs'} just below the threshold, the closest {score:.4f} "
                    f"({line_name(a)} ~ {line_name(b)}); --json and --html list them")


def _duplicates_doc(found) -> dict:
    def member(m) -> dict:
        doc = {"path": m.path, "score": m.score, "kind": _kind(m)}
        if found.keep_rule:
            doc["keep"] = m.keep
        if found.against:
            doc["embeddings"] = found.against if m.other else found.file
        return doc

    doc = {
        "file": found.file, "pooling": found.key, "against": found.against,
        "threshold": {"value": found.threshold.value, "source": found.threshold.source},
        "keep": found.keep_rule,
        "groups": [{"group": g, "size": len(group.members), "exact": group.exact,
                    "members": [member(m) for m in group.members],
                    "pairs": [{"a": a, "b": b, "score": s} for a, b, s in group.pairs]}
                   for g, group in enumerate(found.groups, 1)],
        "near_misses": [{"a": a, "b": b, "score": s} for a, b, s in found.near_misses],
    }
    if found.calibration is not None:
        doc["calibration"] = found.calibration.to_dict()
    if found.moves is not None:
        doc["moves"] = {"moved": [{"from": a, "to": b} for a, b in found.moves.done + found.moves.earlier],
                        "not_moved": [{"path": p, "reason": r} for p, r in found.moves.refused]}
    return doc


def _shown(path: str) -> str:
    """A path as the list prints it: relative to the current folder when below it, else absolute."""
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


def _print_list(found, action: str, fmt: str) -> None:
    """The images to keep or to remove, where they are now, one per line (text, csv or jsonl)."""
    chosen = [(g, m) for g, group in enumerate(found.groups, 1) for m in group.members if m.keep == (action == "keep")]
    rows = [(g, m, _shown(m.file) if m.file else m.path) for g, m in chosen]
    if fmt == "jsonl":
        lines = [json.dumps({"group": g, "action": action, "score": m.score, "kind": _kind(m), "path": path,
                             "name": m.path}) for g, m, path in rows]
    elif fmt == "csv":
        import csv
        import io

        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["group", "action", "score", "kind", "path"])
        writer.writerows([g, action, f"{m.score:.4f}", _kind(m), line_name(path)] for g, m, path in rows)
        lines = out.getvalue().splitlines()
    else:
        lines = [line_name(path) for _, _, path in rows]
    if lines:
        click.echo("\n".join(lines))


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _say_moves(outcome, folder: str) -> None:
    """The moves on stderr; exit 3 when some file was not moved."""
    from gpl_cli.store.moves import JOURNAL
    if outcome.done:
        console.err(f"gpl: moved {_files(len(outcome.done))} into {folder} (journal: {os.path.join(folder, JOURNAL)}); "
                    f"gpl neighbors --undo {folder} puts {'it' if len(outcome.done) == 1 else 'them'} back")
    if outcome.earlier:
        console.err(f"gpl: {_files(len(outcome.earlier))} already moved into {folder} by an earlier run")
    for path, reason in outcome.refused:
        console.err(f"gpl: not moved: {line_name(_shown(path))}: {reason}")
    if outcome.refused:
        sys.exit(EXIT_SOME_FAILED)


def undo(folder: str) -> None:
    from gpl_cli.store.moves import undo
    outcome = undo(folder)
    if outcome.done:
        console.err(f"gpl: put back {_files(len(outcome.done))} from {folder}")
    elif not outcome.refused:
        console.err(f"gpl: nothing to put back from {folder}")
    for path, reason in outcome.refused:
        console.err(f"gpl: not put back: {line_name(_shown(path))}: {reason}")
    if outcome.refused:
        sys.exit(EXIT_SOME_FAILED)


def _print_neighbors(results, as_json: bool) -> None:
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
