"""Self-contained HTML pages: the compare report, neighbours, near-duplicate groups, outliers.

Each page is one file that works offline from file://: thumbnails (longer side <= THUMB_SIDE,
JPEG) are embedded as data URIs, the plot as a PNG data URI, the style inline; nothing is
fetched, and a Content-Security-Policy allows neither scripts nor any other source, so even
a mistake in escaping could not run code. Every text goes through `_text` (html.escape); file
names and labels through `_visible` first, which shows control and bidirectional formatting
characters as escapes instead of obeying them, and are shown isolated in <bdi>. An image whose
file is gone or unreadable is drawn as a box with the reason and the path, never as a broken
<img>. Thumbnails cost about 5-6 KB each in the page (README: a 1,000-thumbnail page is a few MB).

Images are read only below one folder: the root the embeddings file records, or the one the user
names (--images); a stored name that is absolute or climbs out of it is shown as outside, so a
crafted file cannot pull a private image into a page. Only regular files are opened (a FIFO at a
stored path would block for ever), each within the per-image decode time limit of embedding.

The page functions take result objects and return one HTML string; `write_page` puts it in
place atomically.
"""

from __future__ import annotations

import base64
import html
import io
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from gpl_cli.store.sink import line_name
from gpl_cli.version import __version__

if TYPE_CHECKING:
    from gpl_cli.store.output import Output

THUMB_SIDE = 160  # longer side of a thumbnail, pixels
THUMB_QUALITY = 70  # JPEG quality: 4-6 KB a photo thumbnail

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
:root { --same: #1a7f37; --other: #b42318; --line: #d0d0d0; --muted: #555; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: #111; background: #fff;
       margin: 1.5rem auto; padding: 0 1rem; max-width: 1180px; }
h1 { font-size: 1.45rem; margin: 0 0 .2rem; }
h2 { font-size: 1.15rem; border-bottom: 2px solid var(--line); padding-bottom: .15rem; margin: 2rem 0 .6rem; }
h3 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
p.sub, p.help, .help { color: var(--muted); margin: .2rem 0 .6rem; }
table { border-collapse: collapse; margin: .4rem 0 .8rem; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e6e6e6; text-align: right; font-variant-numeric: tabular-nums;
         white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { border-bottom: 2px solid var(--line); }
td.best { font-weight: bold; }
ul.verdicts { font-size: 1.05rem; padding-left: 1.2rem; }
img.plot { max-width: 100%; border: 1px solid #e6e6e6; }
.cells { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; }
figure.cell { width: 128px; margin: 0; padding: 2px; border: 3px solid transparent; }
figure.cell.query-image { border-color: #333; }
figure.cell.same { border-color: var(--same); }
figure.cell.other { border-color: var(--other); border-style: dashed; }
.media { width: 118px; height: 118px; display: flex; align-items: center; justify-content: center;
         background: #f3f3f3; overflow: hidden; }
.media img { max-width: 118px; max-height: 118px; display: block; }
.missing { width: 118px; height: 118px; padding: 6px; border: 2px dashed #999; font-size: 11px;
           color: #333; overflow: hidden; overflow-wrap: normal; background: #fafafa; }
figcaption { font-size: 11px; line-height: 1.3; margin-top: 2px; overflow-wrap: normal; }
figure.cell.only { background: #fff2b3; }
.tag.only { border-color: #b08800; background: #fff2b3; }
figcaption .score { font-weight: bold; font-variant-numeric: tabular-nums; white-space: nowrap; }
.mark { font-weight: bold; display: block; }
.mark.same { color: var(--same); }
.mark.other { color: var(--other); }
.path { color: var(--muted); display: block; }
.row { display: flex; gap: 14px; align-items: flex-start; border-top: 1px solid var(--line); padding: 8px 0;
       break-inside: avoid; }
.row > figure.cell { flex: none; }
.poolings { display: flex; flex-direction: column; gap: 4px; }
.pooling { display: flex; gap: 8px; align-items: flex-start; }
.pname { width: 84px; flex: none; font-weight: bold; padding-top: 4px; }
.pname small { display: block; font-weight: normal; color: var(--muted); }
.tag { display: inline-block; white-space: nowrap; font-size: 11px; padding: 0 5px; border: 1px solid #999; border-radius: 3px;
       color: #333; margin-top: 2px; }
.card { border: 1px solid var(--line); border-radius: 4px; padding: 8px 10px; margin: 0 0 12px; break-inside: avoid; }
.card h3 { margin: 0 0 6px; }
.pair { display: flex; align-items: center; gap: 4px; margin-right: 14px; }
.arrow { font-size: 20px; color: var(--muted); }
.legend > span { margin-right: 1.5rem; }
.legend .mark { display: inline; }
footer { margin-top: 2.5rem; color: var(--muted); font-size: 12px; }
nav.toc { border: 1px solid var(--line); border-radius: 4px; padding: 4px 12px; margin: .8rem 0; display: inline-block; }
nav.toc ol { margin: .2rem 0; padding-left: 1.4rem; columns: 2; column-gap: 2.5rem; }
nav.toc a { color: #0b5cad; }
pre.commands { background: #f6f6f6; border: 1px solid #e6e6e6; padding: 6px 10px; overflow-x: auto; font-size: 12px; }
ul.failures { font-size: 13px; }
@page { margin: 12mm; }
@media print {
  body { margin: 0; padding: 0; max-width: none; font-size: 10pt; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  h2 { break-after: avoid; }
  figure.cell { width: 100px; }
  .media, .missing { width: 90px; height: 90px; }
  .media img { max-width: 90px; max-height: 90px; }
  .tag { white-space: normal; }
  nav.toc { display: none; }
}
"""


# --- text --------------------------------------------------------------------------------


# Bidirectional formatting characters, shown as \\uXXXX and never obeyed: "\u202eevil>gpj.jpg" would
# otherwise be drawn as "evil>gpj.jpg" reversed, a .jpg name for what is not one.
_BIDI = {c: f"\\u{c:04x}" for c in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def _visible(name) -> str:
    """A file name or label as HTML text or attribute: control characters escaped as every line output
    writes them (store.sink.line_name), bidirectional formatting characters as \\uXXXX."""
    return _text(line_name(str(name)).translate(_BIDI))


def _name(name) -> str:
    """A file name or label shown as text, isolated (right-to-left letters in it do not reorder its neighbours),
    that may wrap after its slashes and underscores and nowhere else: 'renewable_/energy', never mid-word."""
    # the characters of the name, escaped: the markup added holds no slash or underscore of its own
    return f"<bdi>{_visible(name).replace('/', '/<wbr>').replace('_', '_<wbr>')}</bdi>"


def _text(value) -> str:
    """Any name or label as HTML text (also safe inside a quoted attribute). Bytes of a file
    name that are not UTF-8 (carried as surrogates) are shown as \\xNN."""
    s = str(value).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return html.escape(s, quote=True)


def _pct(value: float | None) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# --- thumbnails --------------------------------------------------------------------------


@dataclass
class Picture:
    uri: str | None  # data:image/jpeg;base64,... or None when the image cannot be shown
    problem: str | None = None  # why not
    thumb_size: tuple[int, int] | None = None  # thumbnail width, height
    size: tuple[int, int] | None = None  # the image's width, height (EXIF orientation applied)
    file_bytes: int | None = None


OUTSIDE = "outside the folder of the file's images: not read (--images DIR reads images from DIR)"


def make_picture(file: str | None, timeout: float | None = None) -> Picture:
    """A thumbnail of one image file as a data URI, or the reason there is none. `file` None: a stored name
    outside the folder images are read from. `timeout`: seconds to make it (embedding's time_limit)."""
    from PIL import Image

    from gpl_cli.embedding.images import Rejected, describe_error, open_rgb, time_limit

    if file is None:
        return Picture(None, OUTSIDE)
    try:
        with time_limit(timeout):
            st = os.stat(file)
            if not stat.S_ISREG(st.st_mode):  # opening a FIFO waits for a writer that never comes
                raise Rejected("not a regular file (a FIFO, device, socket or folder): not opened")
            with Image.open(file) as head:
                width, height = head.size
                if head.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that turn it by 90 degrees
                    width, height = height, width
            im = open_rgb(file, min_side=THUMB_SIDE)  # large JPEGs decoded at a reduced scale
            im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            im.save(out, "JPEG", quality=THUMB_QUALITY, optimize=True)
    except FileNotFoundError:
        return Picture(None, "file not found: moved or deleted since it was embedded")
    except Exception as exc:  # noqa: BLE001 - any unreadable image becomes a placeholder with the reason
        return Picture(None, describe_error(exc))
    uri = "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")
    return Picture(uri, None, im.size, (width, height), st.st_size)


class Thumbnails:
    """The images a page shows, made once each, one at a time in this thread: the decode time limit (a
    SIGALRM) and Ctrl-C reach only the main thread, and a decoder in another thread could hold the
    process for ever.

    Stored names are read below one folder: `images` when the user names one, else the embeddings'
    `root` (else the current folder). `timeout`: seconds per thumbnail, by default embedding's."""

    def __init__(self, root: str | None = None, images: str | None = None, timeout: float | None = None):
        from gpl_cli.embedding.config import RunOptions

        self.folder = os.path.abspath(images or root or os.curdir)
        self.timeout = RunOptions.timeout if timeout is None else timeout
        self._made: dict[str | None, Picture] = {}

    def file(self, name: str) -> str | None:
        """Where the image of a stored name is; None when the name is absolute or climbs out of the folder.
        Judged on the name alone: links inside the folder are the user's own."""
        path = os.path.normpath(os.path.join(self.folder, name))
        return path if path.startswith(os.path.join(self.folder, "")) else None

    def __getitem__(self, file: str | None) -> Picture:
        if file not in self._made:
            self._made[file] = make_picture(file, self.timeout)
        return self._made[file]


# --- building blocks ---------------------------------------------------------------------


def _page(title: str, subtitle: str, body: str) -> str:
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_text(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{_text(title)}</h1><p class=\"sub\">{subtitle}</p></header>\n{body}\n"
        f"<footer>Made by gpl {_text(__version__)} on {made}. Similarities are cosine similarities "
        "(1: the same direction).</footer>\n</body>\n</html>\n"
    )


def _figure(thumbs: Thumbnails, name: str, caption: str = "", css: str = "", file: str | None = None,
            attrs: str = "") -> str:
    """One image cell: the thumbnail (or a placeholder box naming the path) and its caption."""
    picture = thumbs[file or thumbs.file(name)]
    if picture.uri:
        w, h = picture.thumb_size
        media = f'<div class="media"><img src="{picture.uri}" alt="{_visible(name)}" width="{w}" height="{h}"></div>'
    else:
        media = (f'<div class="missing" title="{_visible(name)}"><b>{_text(picture.problem)}</b><br>'
                 f'{_name(name)}</div>')
    return (f'<figure class="cell {css}"{attrs}>{media}<figcaption>{caption}'
            f'<span class="path">{_name(name)}</span></figcaption></figure>')


def _table(rows: list[tuple[str, list[str]]], best: list[int | None] | None = None) -> str:
    head, *body = rows
    out = ["<table><thead><tr><th>" + _text(head[0]) + "</th>"
           + "".join(f"<th>{_text(c)}</th>" for c in head[1]) + "</tr></thead><tbody>"]
    for i, (label, cells) in enumerate(body):
        mark = best[i] if best else None
        tds = "".join(f'<td class="best">{_text(c)}</td>' if j == mark else f"<td>{_text(c)}</td>"
                      for j, c in enumerate(cells))
        out.append(f"<tr><td>{_name(label)}</td>{tds}</tr>")  # a class name, a pooling, a metric
    return "".join(out) + "</tbody></table>"


def _score(value: float) -> str:
    return f'<span class="score">{value:.3f}</span>'


def _plot_uri(report) -> str | None:
    from gpl_cli.report.plots import draw_report

    out = io.BytesIO()
    draw_report(report).savefig(out, dpi=100, format="png")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


# --- compare -----------------------------------------------------------------------------


def _probe_sections(report) -> list[tuple[str, str, str]]:
    """compare --probe and --pool gem:p=auto, when they ran: (id, title, html) with the text report's cells."""
    out = []
    if report.probe:
        rows, pairs = report.probe.table_rows()
        out.append(("probe", "Linear probe", _table(rows) + (_table(pairs) if len(pairs) > 1 else "")
                    + f'<p class="help">{_text(report.probe.method())}</p>'
                    + "".join(f'<p class="help">Note: {_text(n)}</p>' for n in report.probe.notes)))
    if report.gem_auto:
        lines = report.gem_auto.table_lines()
        out.append(("gem-auto", "GeM p fitted to the labels",
                    "<ul>" + "".join(f"<li>{_text(line.strip())}</li>" for line in lines) + "</ul>"
                    + "".join(f'<p class="help">Note: {_text(n)}</p>' for n in report.gem_auto.notes)))
    return out


def _search_section(result) -> str:
    """compare --search: the winner, its nested-CV gain, the choice of each fold, every pipeline's figures and
    the commands that reproduce the winner."""
    from gpl_cli.analysis.compare import shown

    lo, hi = (shown(v) for v in result.gain_ci)
    folds = "".join(f"<li>fold {i + 1}: {_text(p.describe())}</li>" for i, p in enumerate(result.fold_choices))
    return (f'<p class="verdict-line"><b>{_text(result.verdict())}</b></p>'
            f"<p>Held-out mAP {100 * result.held_out_map:.1f} % against {100 * result.default_map:.1f} % for the "
            f"default ({_text(result.default.describe())}): a gain of {shown(result.gain):+.1f} points, 95 % interval "
            f"{lo:+.1f} to {hi:+.1f}. Each fold chose (on the other folds' images only):</p><ol>{folds}</ol>"
            "<h3>Reproduce the winner</h3><pre class=\"commands\"><code>"
            + "\n".join(_text(c) for c in result.commands) + "</code></pre>"
            "<h3>Every pipeline</h3>" + _table(result.table_rows())
            + '<p class="help">CV mAP: each query scored in its outer fold, whitening fitted without that fold; an '
            "honest figure for one pipeline, but the best of many such figures is optimistic, which is why the gain "
            "above is the nested one. Passes: forward passes per image. Model ms/image: the forward passes and "
            "poolings of those scales, per image (summed over loader processes). Re-rank ms: re-ranking every query "
            f"once. {_text(result.method())}. Searched {len(result.candidates)} pipelines in {result.seconds:.1f} s "
            "after the forward passes.</p>"
            + "".join(f'<p class="help">Note: {_text(n)}</p>' for n in result.notes))


def _failure_section(failures: list[tuple[str, str]]) -> str:
    items = "".join(f"<li>{_name(path)}: {_text(reason)}</li>" for path, reason in failures)
    return (f'<p class="help">{len(failures)} of the images given could not be read; they are in none of the '
            f'figures above.</p><ul class="failures">{items}</ul>')


def compare_page(report, emb, labels: list[str] | None, thumbs: Thumbnails, queries_per_class: int = 3) -> str:
    """The compare report: a table of contents, verdicts, the search, metrics, re-ranking, plots, per-class AP,
    confusions, query galleries and the images that could not be read."""
    from gpl_cli.analysis import metrics
    from gpl_cli.report import gallery

    keys = [p.key for p in report.poolings]
    codes = class_names = None
    if report.labelled:
        class_names, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
        class_names = [str(c) for c in class_names]
    ap = {p.key: p.ap for p in report.poolings} if report.labelled else None
    picked = gallery.pick_queries(ap, {p.key: p.neighbors for p in report.poolings}, codes, queries_per_class)
    views = gallery.query_views({k: emb.vectors[k] for k in keys}, emb.paths, picked, ap)
    confusions = {p.key: gallery.confusions(emb.vectors[p.key], p.neighbors, codes, class_names)
                  for p in report.poolings} if report.labelled else {}

    failed = f" ({len(emb.failures)} more could not be read)" if emb.failures else ""
    sub = f"{report.images} images{failed}; {_visible(report.source)}"
    if report.classes:
        sub += "; classes: " + ", ".join(f"{_name(c)} ({n})" for c, n in report.classes.items())
    recommendation = report.recommendation()
    sections = [("verdict", "Verdict", '<ul class="verdicts">'
                 + "".join(f"<li>{_text(v)}</li>" for v in report.verdicts()) + "</ul>"
                 + (f"<p><b>{_text(recommendation)}</b></p>" if recommendation else "")
                 + "".join(f'<p class="help">Note: {_text(n)}</p>' for n in report.notes))]
    if report.search:
        sections.append(("search", "Best pipeline (compare --search)", _search_section(report.search)))
    rows, pair_rows = report.table_rows()
    help_text = (
        '<p class="help">mAP: mean average precision with every image a query against all others (95 % bootstrap '
        "interval over queries). P@k: share of same-class images among the k nearest. kNN: leave-one-out "
        f"k-nearest-neighbour accuracy. Jaccard@{metrics.JACCARD_K}: overlap of the {metrics.JACCARD_K} nearest "
        "neighbours between two poolings (1: the same). Effective rank: how many directions the vectors really "
        "use.</p>" if report.labelled else
        f'<p class="help">No labels: only label-free statistics. Jaccard@{metrics.JACCARD_K}: overlap of the '
        f"{metrics.JACCARD_K} nearest neighbours between two poolings (1: the same). Effective rank: how many "
        "directions the vectors really use.</p>")
    sections.append(("metrics", "Metrics", _table(rows) + ("<h3>Pairs of poolings</h3>" + _table(pair_rows)
                                                           if pair_rows else "") + help_text))
    if report.reranked:
        sections.append(("rerank", "Re-ranking", _table(report.rerank_rows())
                         + '<p class="help">Each pooling again with each --rerank, every image a query against all '
                         "others, its own row left out of its expansion and its results. Gain: mAP with the "
                         "re-ranking minus without, paired 95 % bootstrap interval. Jaccard: overlap of the "
                         f"{metrics.JACCARD_K} nearest with the plain pooling's. Re-rank ms: re-ranking the "
                         "whole collection.</p>"))
    sections += _probe_sections(report)
    sections.append(("plots", "Similarity distributions" + (" and mAP" if report.labelled else ""),
                     f'<img class="plot" src="{_plot_uri(report)}" alt="cosine distributions per pooling">'))
    if report.labelled:
        sections.append(("classes", "Average precision per class", _class_section(report, keys)))
        sections.append(("confusions", "Classes each pooling confuses most",
                         _confusion_section(confusions, emb.paths, thumbs)))
    sections.append(("queries", "Queries under every pooling",
                     _query_section(report, views, emb.paths, labels, keys, queries_per_class, thumbs)))
    if emb.failures:
        sections.append(("unreadable", "Images that could not be read", _failure_section(emb.failures)))
    toc = ('<nav class="toc" aria-label="Contents"><b>Contents</b><ol>'
           + "".join(f'<li><a href="#{sid}">{_text(title)}</a></li>' for sid, title, _ in sections) + "</ol></nav>")
    body = [toc] + [f'<section id="{sid}"><h2>{_text(title)}</h2>{content}</section>' for sid, title, content in sections]
    return _page("gpl compare: which pooling for these images?", sub, "\n".join(body))


def _class_section(report, keys: list[str]) -> str:
    rows = [("class", ["images", *(f"AP {k} %" for k in keys)])]
    best = []
    for c, count in report.classes.items():
        values = [p.class_ap.get(c) for p in report.poolings]
        rows.append((c, [str(count), *(_pct(v) for v in values)]))
        finite = [v if v is not None else -1.0 for v in values]
        best.append(1 + int(np.argmax(finite)) if count >= 2 and len(keys) > 1 else None)
    return '<p class="help">Mean AP of the queries of each class; the best pooling in bold.</p>' + _table(rows, best)


def _confusion_section(confusions: dict, paths: list[str], thumbs: Thumbnails) -> str:
    from gpl_cli.analysis.metrics import JACCARD_K

    out = [(f'<p class="help">Among the {JACCARD_K} nearest neighbours of every query: how often a neighbour is of '
            "another class, counted by (query class, neighbour class). Examples: queries (left) whose nearest "
            "neighbour of the other class ranks highest (right, with its similarity).</p>")]
    for key, items in confusions.items():
        out.append(f'<h3>{_text(key)}</h3>')
        if not items:
            out.append('<p class="help">No neighbour of another class.</p>')
        for c in items:
            pairs = "".join(
                '<div class="pair">'
                + _figure(thumbs, paths[q], f'<span class="tag">{_name(c.query_class)}</span> ')
                + '<span class="arrow" aria-hidden="true">&rarr;</span>'
                + _figure(thumbs, paths[nb], _score(s) + f'<span class="mark other">&#10007;&nbsp;{_name(c.neighbor_class)}'
                          "</span>", "other")
                + "</div>"
                for q, nb, s in c.examples
            )
            out.append(f'<div class="card confusion"><h3>{_name(c.query_class)} taken for '
                       f'{_name(c.neighbor_class)}: {c.count} neighbours ({100 * c.share:.1f} % of the '
                       f'{_name(c.query_class)} queries\' {JACCARD_K} nearest)</h3><div class="cells">{pairs}</div></div>')
    return "".join(out)


_REASONS = {
    "disagree": "poolings disagree",
    "typical": "typical",
    "hardest": "lowest AP",
    "sample": "sample",
}


def _query_section(report, views, paths, labels, keys, n, thumbs) -> str:
    from gpl_cli.report.gallery import GALLERY_K

    only = (f'<span><span class="tag only">only {_text(keys[0])}</span> on a yellow ground: an image only this '
            "pooling shows</span>" if len(keys) > 1 else "")
    if report.labelled:
        how = (f"For each class, up to {n} queries whose {GALLERY_K} nearest images differ most between the "
               "poolings (first where one pooling finds the query's class and another does not, then by the images "
               "only one pooling shows), then a typical query (mean AP closest to the class's median)."
               if len(keys) > 1 else
               f"For each class, the {n} queries with the lowest AP, then the one closest to the class's median AP.")
        legend = ('<p class="legend"><span><span class="mark same">&#10003;&nbsp;same class</span>: solid green '
                  'frame</span><span><span class="mark other">&#10007;&nbsp;other class</span> (its class named): '
                  f"dashed red frame</span>{only}</p>")
    else:
        how = (f"Up to {n} queries with the most images that only one pooling shows among the {GALLERY_K} nearest, "
               "then a typical query (the median number of such images)." if len(keys) > 1 else
               f"{n + 1} queries spread evenly over the file.")
        legend = f'<p class="legend">{only}</p>' if only else ""
    out = [f'<p class="help">{_text(how)} Each query (black frame) is shown with its {GALLERY_K} nearest other images '
           "under each pooling, nearest first, with their cosine similarity.</p>" + legend]
    if not any(v.reason == "disagree" for v in views) and len(keys) > 1:
        out.append(f'<p class="help">The poolings show the same {GALLERY_K} nearest images for every query.</p>')
    current = None
    for v in views:
        label = labels[v.row] if report.labelled else None
        if report.labelled and label != current:
            current = label
            out.append(f"<h3>{_name(label)}</h3>")
        caption = f'<span class="tag">{_text(_REASONS[v.reason])}</span> '
        if label is not None:
            caption += f'<span class="tag">{_name(label)}</span> '
        lines = []
        for key in keys:
            cells = []
            for nb in v.neighbors[key]:
                only = nb.row in v.only[key]
                text, css = f"#{nb.rank} " + _score(nb.score), "only" if only else ""
                if label is not None:
                    same = labels[nb.row] == label
                    text += ('<span class="mark same">&#10003; same</span>' if same else
                             f'<span class="mark other">&#10007;&nbsp;{_name(labels[nb.row])}</span>')
                    css += " same" if same else " other"
                text += f' <span class="tag only">only {_text(key)}</span>' if only else ""  # below the mark
                cells.append(_figure(thumbs, nb.path, text, css.strip()))
            ap = f"<small>AP {_pct(v.ap[key])} %</small>" if v.ap is not None else ""
            lines.append(f'<div class="pooling" data-pooling="{_text(key)}"><div class="pname">{_text(key)}{ap}</div>'
                         f'<div class="cells">{"".join(cells)}</div></div>')
        out.append(f'<div class="row query" data-row="{v.row}">'
                   + _figure(thumbs, paths[v.row], caption, "query-image")
                   + f'<div class="poolings">{"".join(lines)}</div></div>')
    return "".join(out)


# --- neighbours, duplicates, outliers ----------------------------------------------------


def neighbors_page(results, thumbs: Thumbnails, source: str, key: str, rerank: str = "") -> str:
    """Each query (black frame) with its nearest images and their similarity (`rerank`: the re-ranking steps)."""
    rows = []
    for r in results:
        where = "in the file" if r.source == "file" else "embedded for this query"
        cells = "".join(_figure(thumbs, n.path, f"#{n.rank} " + _score(n.score)) for n in r.neighbors)
        rows.append('<div class="row query">'
                    + _figure(thumbs, r.query, f'<span class="tag">query, {where}</span> ', "query-image",
                              _query_file(r, thumbs))
                    + f'<div class="cells">{cells}</div></div>')
    k = max((len(r.neighbors) for r in results), default=0)
    if rerank:
        sub = (f"{len(results)} queries, {k} nearest images each, re-ranked with {_text(rerank)} over the "
               f"{_text(key)} vectors in {_visible(source)}. A query that is in the file is left out of its own list.")
    else:
        sub = (f"{len(results)} queries, {k} nearest images each, by cosine similarity of the {_text(key)} vectors "
               f"in {_visible(source)}. A query that is in the file finds itself first (similarity 1).")
    return _page("gpl neighbors", sub, "<section>" + "\n".join(rows) + "</section>")


def _query_file(result, thumbs: Thumbnails) -> str | None:
    """Where a query's image is: a path given on the command line (the user named it: read wherever it is),
    or a name stored in the file (read below the folder only)."""
    if result.source == "embedded":
        return result.query
    stored = thumbs.file(result.query)
    given = os.path.exists(result.query) and (stored is None or not os.path.exists(stored))
    return result.query if given else stored


def duplicates_page(groups, thumbs: Thumbnails, source: str, key: str, threshold: float) -> str:
    """One card per group: members with their similarity, pixel size and file size."""
    cards = []
    for number, members in enumerate(groups, 1):
        pictures = [thumbs[thumbs.file(m.path)] for m in members]
        areas = [(p.size[0] * p.size[1], p.file_bytes) if p.size else (-1, -1) for p in pictures]
        largest = max(range(len(members)), key=lambda i: areas[i]) if max(areas)[0] > 0 else None
        cells = []
        for i, (m, p) in enumerate(zip(members, pictures)):
            facts = (f"{p.size[0]} &times; {p.size[1]} px, {human_bytes(p.file_bytes)}" if p.size else "not readable")
            badge = ' <span class="tag">largest</span>' if i == largest else ""
            cells.append(_figure(thumbs, m.path, f"best match {_score(m.score)}<br>{facts}{badge}"))
        cards.append(f'<div class="card group"><h3>Group {number}: {len(members)} images</h3>'
                     f'<div class="cells">{"".join(cells)}</div></div>')
    sub = (f"{len(groups)} groups of near-duplicates in {_visible(source)} ({_text(key)} vectors): images whose cosine "
           f"similarity is at least {threshold:g}, joined into groups (A~B and B~C make one group). "
           "Under each image: its highest similarity to another member, its size in pixels and on disk; "
           "'largest' marks the most pixels (then the most bytes).")
    body = "\n".join(cards) if cards else '<p class="help">No near-duplicates at this threshold.</p>'
    return _page("gpl neighbors --duplicates", sub, "<section>" + body + "</section>")


def outliers_page(outliers, thumbs: Thumbnails, source: str, key: str, k: int) -> str:
    """The images least like any other, each with its k nearest other images."""
    rows = []
    for o in outliers:
        cells = "".join(_figure(thumbs, nb.path, f"#{nb.rank} " + _score(nb.score)) for nb in o.neighbors)
        rows.append('<div class="row outlier">'
                    + _figure(thumbs, o.path, f'<span class="tag">outlier {o.rank}</span><br>'
                              f'{_ordinal(k)} nearest: {_score(o.score)}',
                              "query-image")
                    + f'<div class="cells">{cells}</div></div>')
    sub = (f"The {len(outliers)} images of {_visible(source)} least like any other ({_text(key)} vectors): lowest cosine "
           f"similarity to their {_ordinal(k)} nearest other image (the score under each outlier), each followed by "
           f"its {k} nearest other images.")
    return _page("gpl neighbors --outliers", sub, "<section>" + "\n".join(rows) + "</section>")


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


# --- writing -----------------------------------------------------------------------------


def write_page(output: Output, page: str) -> None:
    """Write the page whole or not at all; `output` (a PAGE Output) was checked before any work."""
    with output.open("w", encoding="utf-8") as f:
        f.write(page)


def write_results_page(output: Output, file: str, key: str | None, kind: str, results, images: str | None = None,
                       **options) -> None:
    """The page of a `gpl neighbors` result (`kind`: neighbors, duplicates or outliers) over `file`; its
    images read below `images` when given, else below the root `file` records."""
    from gpl_cli.analysis.neighbors import choose_pooling
    from gpl_cli.store.formats import read_metadata

    page = {"neighbors": neighbors_page, "duplicates": duplicates_page, "outliers": outliers_page}[kind]
    metadata = read_metadata(file)
    thumbs = Thumbnails(metadata.get("root"), images)
    write_page(output, page(results, thumbs, file, choose_pooling(metadata, key, file), **options))
